"""The Llama-family decoder (Llama-2/3, SmolLM2, Mistral without sliding window), one stage of it.

A `LlamaStage` holds layers [first_layer, first_layer + len(layers)) of one tensor-parallel rank; the first stage also
holds the embedding, the last one the final norm and LM head. The model knows its layer range, never
its pipeline rank; the tensor-parallel layers carry their own process group.

Shapes: T = tokens in the step (all sequences concatenated), H/Hkv = this rank's query/KV heads,
D = head dim, C = hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from hexcore.model.attention import AttentionMetadata, paged_attention
from hexcore.kernels.elementwise import ElementwiseKernels
from hexcore.kernels.panel_linear import PanelLinear
from hexcore.kernels.select import elementwise_kernels, fused_layer_kernels
from hexcore.model.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead
from hexcore.model.parallel import TPGroup, shard_range
from hexcore.model.weights import Checkpoint

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class LlamaDims:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, config) -> "LlamaDims":
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {config.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(config, "sliding_window", None):
            raise ValueError("sliding-window attention is not supported")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ValueError("attention or MLP biases are not supported")
        num_heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=config.max_position_embeddings,
        )


@dataclass(frozen=True)
class RopeSpec:
    """The rotary embedding of a model: inverse frequencies [D/2] and the attention scaling factor."""

    inv_freq: tuple[float, ...]
    attention_scaling: float

    @classmethod
    def from_hf(cls, config) -> "RopeSpec":
        """Uses transformers' own rope initialisation, so every static rope_scaling matches HF."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})")
        rotary = LlamaRotaryEmbedding(config)
        return cls(tuple(rotary.inv_freq.float().tolist()), float(rotary.attention_scaling))

    def tables(self, max_len: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin: [max_len, D] for positions 0 .. max_len-1. The sin table's first half is
        negated, so that rotating x is x * cos + roll(x, D/2) * signed_sin (see `apply_rope`)."""
        inv_freq = torch.tensor(self.inv_freq, dtype=torch.float)
        freqs = torch.arange(max_len, dtype=torch.float)[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        sign = torch.cat((-torch.ones_like(inv_freq), torch.ones_like(inv_freq)))
        scaling = self.attention_scaling
        return (angles.cos() * scaling).to(device, dtype), (angles.sin() * sign * scaling).to(device, dtype)


def read_model_config(model_dir) -> tuple[LlamaDims, RopeSpec]:
    """The dimensions and rotary embedding of the model in an HF directory (its config.json)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return LlamaDims.from_hf(config), RopeSpec.from_hf(config)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by position: HF's x * cos + rotate_half(x) * sin, where rotate_half(x)
    = (-x2, x1) = roll(x, D/2) with the first half's sign folded into the table."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, kernels: ElementwiseKernels | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)  # in float32, like the reference
        return self.weight * normed.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, qkv: ColumnParallelLinear, o: RowParallelLinear, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.qkv, self.o = qkv, o
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5

    def forward(self, x, cos, signed_sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens, num_qk_heads = x.shape[0], self.num_heads + self.num_kv_heads
        qkv = self.qkv(x)  # [T, (H + 2 Hkv) * D]
        qk = qkv[:, : num_qk_heads * self.head_dim].view(num_tokens, num_qk_heads, self.head_dim)
        qk = apply_rope(qk, cos.unsqueeze(1), signed_sin.unsqueeze(1))  # queries and keys rotated together
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, H, D], [T, Hkv, D]
        v = qkv[:, num_qk_heads * self.head_dim :].view(num_tokens, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)  # [T, H, D]
        return self.o(out.reshape(num_tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, gate_up: ColumnParallelLinear, down: RowParallelLinear, kernels: ElementwiseKernels | None = None):
        super().__init__()
        self.gate_up, self.down, self.kernels = gate_up, down, kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)  # [T, 2 I/tp]: gate columns, then up columns
        if self.kernels is not None:
            return self.down(self.kernels.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, input_norm: RMSNorm, attention: LlamaAttention, post_norm: RMSNorm, mlp: LlamaMLP):
        super().__init__()
        self.input_norm, self.attention, self.post_norm, self.mlp = input_norm, attention, post_norm, mlp

    def forward(self, x, cos, signed_sin, kv_cache, meta) -> torch.Tensor:
        x = x + self.attention(self.input_norm(x), cos, signed_sin, kv_cache, meta)
        return x + self.mlp(self.post_norm(x))


class FusedLlamaDecoderLayer(nn.Module):
    """A LlamaDecoderLayer whose halves each run as one C++ call (hexcore/kernels/fused_layer.py): the MLP
    half in every step, the attention half in steps where every sequence decodes (steps with prompt
    chunks take the layer's own attention). The same loops over the same weights as the layer's own
    path: only the torch ops issued from Python between them are gone."""

    def __init__(self, layer: LlamaDecoderLayer, kernels: ModuleType):  # hexcore/kernels/fused_layer.py load()
        super().__init__()
        self.layer, self.kernels = layer, kernels
        attention, mlp = layer.attention, layer.mlp
        self.tp = attention.o.tp
        self.attention_weights = (layer.input_norm.weight, layer.input_norm.eps, attention.qkv.matmul.panels,
                                  attention.o.matmul.panels)
        self.mlp_weights = (layer.post_norm.weight, layer.post_norm.eps, mlp.gate_up.matmul.panels,
                            mlp.down.matmul.panels)

    @staticmethod
    def can_fuse(layer: LlamaDecoderLayer) -> bool:
        """Its linear layers run the float32 panel loop, whose panels the fused calls read."""
        linears = (layer.attention.qkv, layer.attention.o, layer.mlp.gate_up, layer.mlp.down)
        return all(isinstance(linear.matmul, PanelLinear) and linear.matmul.panels.dtype == torch.float32
                   for linear in linears)

    def forward(self, x, cos, signed_sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        attention = self.layer.attention
        if meta.is_all_decode:
            attended = self.kernels.attention_block(
                x, *self.attention_weights, cos, signed_sin, kv_cache[0], kv_cache[1], meta.slot_mapping,
                meta.decode_block_tables, meta.decode_context_lens, attention.num_heads, attention.scale)
            x = x + self.tp.all_reduce(attended)
        else:
            x = x + attention(self.layer.input_norm(x), cos, signed_sin, kv_cache, meta)
        return x + self.tp.all_reduce(self.kernels.mlp_block(x, *self.mlp_weights))


class LlamaStage(nn.Module):
    def __init__(self, dims: LlamaDims, first_layer: int, layers: list[nn.Module],
                 embed: VocabParallelEmbedding | None, norm: RMSNorm | None,
                 lm_head: VocabParallelLMHead | None, cos: torch.Tensor, signed_sin: torch.Tensor):
        super().__init__()
        self.dims = dims
        self.first_layer = first_layer
        self.layers = nn.ModuleList(layers)
        self.embed, self.norm, self.lm_head = embed, norm, lm_head
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("signed_sin", signed_sin, persistent=False)

    @property
    def has_embedding(self) -> bool:
        return self.first_layer == 0

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """inputs: token ids [T] on the first stage, hidden states [T, C] elsewhere -> hidden [T, C].
        kv_caches: [num_local_layers, 2, num_blocks, block_size, Hkv, D]."""
        x = self.embed(inputs) if self.has_embedding else inputs
        cos, signed_sin = self.cos[positions], self.signed_sin[positions]  # [T, D]
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, signed_sin, kv_cache, meta)
        return x

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, C] -> float32 logits [N, vocab] on the stage leader, None on other ranks."""
        return self.lm_head(self.norm(hidden))


def load_stage(checkpoint: Checkpoint, dims: LlamaDims, rope: RopeSpec, first_layer: int, num_layers: int,
               tp: TPGroup, max_model_len: int) -> LlamaStage:
    """Build this rank's shard of layers [first_layer, first_layer + num_layers), reading only its slices.
    The stage that ends the model holds the final norm and LM head."""
    heads = dims.num_heads // tp.size
    kv_heads = dims.num_kv_heads // tp.size
    q_rows = (tp.rank * heads * dims.head_dim, (tp.rank + 1) * heads * dims.head_dim)
    kv_rows = (tp.rank * kv_heads * dims.head_dim, (tp.rank + 1) * kv_heads * dims.head_dim)
    mlp_rows = shard_range(dims.intermediate_size, tp.rank, tp.size)
    kernels = elementwise_kernels(checkpoint.device, checkpoint.dtype)
    fused = fused_layer_kernels(checkpoint.device, checkpoint.dtype)

    def norm(name: str) -> RMSNorm:
        return RMSNorm(checkpoint.full(name), dims.rms_norm_eps, kernels)

    layers = []
    for index in range(first_layer, first_layer + num_layers):
        p = f"model.layers.{index}."
        qkv = torch.cat([checkpoint.rows(p + "self_attn.q_proj.weight", *q_rows),
                         checkpoint.rows(p + "self_attn.k_proj.weight", *kv_rows),
                         checkpoint.rows(p + "self_attn.v_proj.weight", *kv_rows)])
        gate_up = torch.cat([checkpoint.rows(p + "mlp.gate_proj.weight", *mlp_rows),
                             checkpoint.rows(p + "mlp.up_proj.weight", *mlp_rows)])
        attention = LlamaAttention(ColumnParallelLinear(qkv),
                                   RowParallelLinear(checkpoint.cols(p + "self_attn.o_proj.weight", *q_rows), tp),
                                   heads, kv_heads, dims.head_dim)
        mlp = LlamaMLP(ColumnParallelLinear(gate_up),
                       RowParallelLinear(checkpoint.cols(p + "mlp.down_proj.weight", *mlp_rows), tp), kernels)
        layer = LlamaDecoderLayer(norm(p + "input_layernorm.weight"), attention,
                                  norm(p + "post_attention_layernorm.weight"), mlp)
        is_fused = fused is not None and FusedLlamaDecoderLayer.can_fuse(layer)
        layers.append(FusedLlamaDecoderLayer(layer, fused) if is_fused else layer)

    vocab_shard = -(-dims.vocab_size // tp.size)  # ceil: every rank but the last holds this many rows
    vocab_rows = (min(tp.rank * vocab_shard, dims.vocab_size), min((tp.rank + 1) * vocab_shard, dims.vocab_size))
    embed_name = "model.embed_tokens.weight"
    is_first = first_layer == 0
    has_head = first_layer + num_layers == dims.num_layers
    embed_rows = checkpoint.rows(embed_name, *vocab_rows) if is_first or (has_head and dims.tie_word_embeddings) else None
    embed = VocabParallelEmbedding(embed_rows, vocab_rows[0], tp) if is_first else None
    norm_out = lm_head = None
    if has_head:
        head_name = embed_name if dims.tie_word_embeddings or "lm_head.weight" not in checkpoint else "lm_head.weight"
        head_rows = embed_rows if head_name == embed_name else checkpoint.rows(head_name, *vocab_rows)
        norm_out = norm("model.norm.weight")
        lm_head = VocabParallelLMHead(head_rows, dims.vocab_size, vocab_shard, tp)
    cos, signed_sin = rope.tables(max_model_len, checkpoint.dtype, checkpoint.device)
    return LlamaStage(dims, first_layer, layers, embed, norm_out, lm_head, cos, signed_sin)
