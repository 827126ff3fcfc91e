"""A Llama decoder layer's two halves, each one C++ call on CPU in float32, compiled on first use.

At batch 1 a decode step's linear layers take ~75% of it and the other quarter is the ~80 torch ops per
layer issued from Python around them (RMSNorm, slicing and rope, the KV writes, views, the activation),
each costing more in dispatch than in arithmetic. Here each half of a layer is one call that runs the
same loops as the unfused path (csrc/: the panel linear, RMSNorm, SiLU-and-mul and paged decode
attention, called directly from C++), plus one pass that rotates queries and keys and writes keys and
values to the cache:

    attention_block(x) = o_proj(decode_attention(rope(qkv_proj(rms_norm(x)))))   steps where every sequence decodes
    mlp_block(x)       = down(silu(gate(rms_norm(x))) * up(rms_norm(x)))          every step

Each returns this rank's part of its half; the caller all-reduces it over its tensor-parallel group and
adds it to the residual stream (hexcore/model/llama.py FusedLlamaDecoderLayer). The C++ is
csrc/fused_layer.cpp; `load()` returns None where it cannot be built (hexcore/kernels/build.py).
"""

from __future__ import annotations

from types import ModuleType

from hexcore.kernels.build import CppExtension

_EXTENSION = CppExtension("hexgen_cpu_fused_layer", "fused_layer.cpp", ["attention_block", "mlp_block"],
                          "CPU fused decoder-layer loops",
                          includes=("panel_linear.cpp", "elementwise.cpp", "paged_attention.cpp"))


def load() -> ModuleType | None:
    """The built module (attention_block, mlp_block), or None where it cannot be built."""
    return _EXTENSION.module()
