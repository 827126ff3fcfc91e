"""The one place that chooses kernels per device: a weight's linear kernel, the paged decode-attention
kernel, the fused elementwise kernels and the fused decoder-layer halves. On CPU in float32 these are
hexcore's compiled C++ loops (this folder; built on first use by build.py), and so are bfloat16 linear
layers on CPUs without bfloat16 matmul units; everywhere else, torch's own ops."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from hexcore.kernels.elementwise import ElementwiseKernels

# The batch size oneDNN lays a packed weight out for: decode steps of tens of sequences.
PACKED_WEIGHT_BATCH_HINT = 32
# Smaller weights stay plain: a oneDNN call costs ~30 us more than F.linear's, more than a small
# matrix gains from packing (a 64 x 192 weight: 4 us plain, 36 us packed).
PACKED_WEIGHT_MIN_ELEMENTS = 1 << 18


def linear_kernel(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [..., in] -> x @ weight^T [..., out] with the fastest kernel for the weight's device.

    On CPU in float32: hexcore/kernels/panel_linear.py's loop over the weight packed into column panels
    (~1.3x oneDNN at decode batch sizes); where it cannot be built, large weights are packed into
    oneDNN's blocked layout (at decode batch sizes MKL's plain GEMM re-packs the weight on every call,
    which costs it up to half its speed). Elsewhere: F.linear. A packed copy replaces the plain
    weight, except for a tied LM head on the stage that also embeds: the embedding keeps the plain
    table, so such a stage holds vocab x hidden floats twice (113 MB for SmolLM2).

    On CPU in bfloat16 without bfloat16 matmul units (AVX2: torch's bfloat16 GEMM is emulated there,
    6-8x slower than float32), the same loop over bfloat16 panels, widened to float32 as they are
    read: bfloat16 in and out, float32 products and sums as in a bfloat16 GEMM."""
    is_float32_loop = _has_cpu_loops(weight.device, weight.dtype)
    if is_float32_loop or _is_emulated_bfloat16(weight.device, weight.dtype):
        from hexcore.kernels import panel_linear

        matmul = panel_linear.packed_linear(weight)
        if matmul is not None:
            return matmul
    if is_float32_loop and torch.backends.mkldnn.is_available() and weight.numel() >= PACKED_WEIGHT_MIN_ELEMENTS:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_WEIGHT_BATCH_HINT)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return lambda x: F.linear(x, weight)


def _is_emulated_bfloat16(device: torch.device, dtype: torch.dtype) -> bool:
    """bfloat16 on a CPU whose oneDNN has no bfloat16 units to run it on (no AVX512-BF16 or AMX)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _has_cpu_loops(device: torch.device, dtype: torch.dtype) -> bool:
    """hexcore's compiled C++ loops (hexcore/kernels/build.py) are written for CPU float32."""
    return device.type == "cpu" and dtype == torch.float32


def decode_attention_kernel(device: torch.device, dtype: torch.dtype) -> Callable | None:
    """A paged decode-attention kernel that reads the KV cache in place, or None for the torch path:
    on CPU in float32, hexcore/kernels/paged_attention.py (compiled on first use)."""
    if _has_cpu_loops(device, dtype):
        from hexcore.kernels import paged_attention

        return paged_attention.load()
    return None


def elementwise_kernels(device: torch.device, dtype: torch.dtype) -> ElementwiseKernels | None:
    """One-pass RMSNorm and SiLU-and-mul (hexcore/kernels/elementwise.py) on CPU in float32, where they
    build; None elsewhere: the model's torch ops."""
    if _has_cpu_loops(device, dtype):
        from hexcore.kernels import elementwise

        return elementwise.load()
    return None


def fused_layer_kernels(device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """A decoder layer's halves as one C++ call each (hexcore/kernels/fused_layer.py) on CPU in float32,
    where they build; None elsewhere: the layer's ops one by one."""
    if _has_cpu_loops(device, dtype):
        from hexcore.kernels import fused_layer

        return fused_layer.load()
    return None


def build_cpu_kernels() -> None:
    """Compile (or load) every CPU loop now, so the first worker does not wait for the compiler
    (`python -m hexcore.kernels.select`, run by `make install`). Without a compiler each logs a
    warning and the torch path serves."""
    from hexcore.kernels import elementwise, fused_layer, paged_attention, panel_linear

    elementwise.load()
    fused_layer.load()
    paged_attention.load()
    panel_linear.packed_linear(torch.zeros(1, 1))


if __name__ == "__main__":
    build_cpu_kernels()
