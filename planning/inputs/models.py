"""The model dimensions the cost model needs: built-in names or an HF config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    dtype: str = "float16"  # float32 | float16 | bfloat16
    is_tied_embeddings: bool = False
    path: str | None = None  # set when loaded from a file: what a deployment's `model:` should say

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @cached_property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @cached_property
    def kv_dim(self) -> int:
        """Width of the K (or V) projection: KV heads x head dim (grouped-query attention)."""
        return self.num_kv_heads * self.head_dim

    @cached_property
    def params_per_layer(self) -> int:
        """Q and O projections (H x H each), K and V (H x kv_dim each), gated MLP (3 x H x I)."""
        h = self.hidden_size
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate_size

    @cached_property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @cached_property
    def layer_bytes(self) -> int:
        return self.params_per_layer * self.dtype_bytes

    @cached_property
    def kv_bytes_per_token_per_layer(self) -> int:
        """K and V of one token in one layer, over all KV heads."""
        return 2 * self.kv_dim * self.dtype_bytes

    @cached_property
    def weight_bytes(self) -> int:
        num_embeddings = 1 if self.is_tied_embeddings else 2
        return self.num_layers * self.layer_bytes + num_embeddings * self.embedding_params * self.dtype_bytes

    def valid_tp_degrees(self) -> list[int]:
        """TP degrees that divide both the attention heads and the KV heads."""
        return [t for t in range(1, self.num_kv_heads + 1) if self.num_kv_heads % t == 0 and self.num_heads % t == 0]

    def with_dtype(self, dtype: str) -> "ModelSpec":
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(_DTYPE_BYTES)}")
        return replace(self, dtype=dtype)


# Dimensions from the models' published config.json files.
BUILTIN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("llama-2-7b", 32, 4096, 11008, 32, 32, 32000),
        ModelSpec("llama-2-13b", 40, 5120, 13824, 40, 40, 32000),
        ModelSpec("llama-2-70b", 80, 8192, 28672, 64, 8, 32000),
        ModelSpec("llama-3-8b", 32, 4096, 14336, 32, 8, 128256, dtype="bfloat16"),
        ModelSpec("llama-3-70b", 80, 8192, 28672, 64, 8, 128256, dtype="bfloat16"),
        ModelSpec("smollm2-135m", 30, 576, 1536, 9, 3, 49152, dtype="bfloat16", is_tied_embeddings=True),
    )
}


def load_model(name_or_path: str) -> ModelSpec:
    """A built-in model name, or a path to an HF config.json or to a directory holding one."""
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path]
    path = Path(name_or_path).expanduser()
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ValueError(
            f"unknown model {name_or_path!r}: expected one of {sorted(BUILTIN_MODELS)} "
            "or a path to an HF config.json or model directory"
        )
    try:
        config = json.loads(config_path.read_text())
        num_heads = config["num_attention_heads"]
        dtype = config.get("torch_dtype") or config.get("dtype") or "float16"
        return ModelSpec(
            name=config.get("_name_or_path") or path.name,
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            vocab_size=config["vocab_size"],
            dtype=dtype if dtype in _DTYPE_BYTES else "float16",
            is_tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            path=str(name_or_path),
        )
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"model config {str(config_path)!r} is missing a field or is not JSON: {err}") from None
