"""x @ W^T on CPU in float32 with the weight packed once into column panels, compiled on first use.

At decode batch sizes (a few to a few dozen rows) a linear layer reads its whole weight to do little
arithmetic with each element, and oneDNN's packed GEMM reaches 60-75% of its large-batch rate there.
This loop keeps every element's work in registers instead:

    packed [P, K, 16]   = W [N, K] cut into P = ceil(N / 16) panels of 16 output columns, each stored
                          k-major (padded with zero columns), so a panel is read front to back
    out[m0:m0+6, n0:n0+16] = sum over k of x[m0:m0+6, k] (broadcast) * packed[p, k, :]

A tile of 6 rows x 16 columns is 12 vector accumulators (8 floats each) that stay in registers over
the whole of K; each panel is read from memory once and reused for every row, and the next panel is
prefetched while it is (memory, not arithmetic, is what a few rows wait on). Panels are split over
torch's thread pool. At 16-32 rows it runs 1.4-1.7x oneDNN's packed kernel over SmolLM2's layers, and
1.2x at 512 (prefill chunks): BENCHMARKS.md, `benchmarks/bench_linear.py`. The vectors are GCC/Clang vector extensions,
which the compiler maps to the host's units (-march=native: AVX2 here, NEON on ARM). The C++ is
csrc/panel_linear.cpp; `packed_linear()` returns None where the loop cannot be built
(hexcore/kernels/build.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hexcore.kernels.build import CppExtension

PANEL_WIDTH = 16  # output columns per panel: two 8-float vectors
# bfloat16 panels hold columns c and c + 8 side by side (0, 8, 1, 9, ...): one 32-bit lane holds a pair,
# whose top half is column c + 8 as a float once the bottom is masked off, and column c shifted up.
BFLOAT16_PAIRS = [c + half * 8 for c in range(8) for half in (0, 1)]

_EXTENSION = CppExtension("hexgen_cpu_linear", "panel_linear.cpp", ["packed_linear"], "CPU packed-panel linear loop")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> panels [ceil(N / 16), K, 16]: column block p, k-major, zero-padded (one new
    tensor: the LM head is 113 MB)."""
    num_out, num_in = weight.shape
    num_full, num_rest = divmod(num_out, PANEL_WIDTH)
    packed = weight.new_zeros(num_full + bool(num_rest), num_in, PANEL_WIDTH)
    packed[:num_full] = weight[: num_full * PANEL_WIDTH].reshape(num_full, PANEL_WIDTH, num_in).transpose(1, 2)
    if num_rest:
        packed[num_full, :, :num_rest] = weight[num_full * PANEL_WIDTH:].T
    return packed


@dataclass(frozen=True)
class PanelLinear:
    """x [..., K] -> x @ weight^T [..., N] over the weight's panels (the C++ of fused layers reads them too)."""

    panels: torch.Tensor  # [ceil(N / 16), K, 16]: float32, or bfloat16 paired (BFLOAT16_PAIRS)
    num_out: int  # N
    run: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # the C++ loop: (x, panels, N)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.panels.dtype == torch.bfloat16:
            return self.run(x.float(), self.panels, self.num_out).to(torch.bfloat16)
        return self.run(x, self.panels, self.num_out)


def packed_linear(weight: torch.Tensor) -> PanelLinear | None:
    """x [..., K] -> x @ weight^T [..., N] for a float32 or bfloat16 CPU weight [N, K], packed here
    once in its dtype (the caller drops the plain weight), or None where the loop cannot be built
    (built on first use on this machine; later calls and processes reuse the build).

    bfloat16 (for CPUs without bfloat16 matmul units): the loop widens each panel entry to float32
    as it reads it (exact), x is widened before and the float32 result rounded to bfloat16 after,
    so products and sums are float32 as in a bfloat16 GEMM, and the weight streams at 2 bytes."""
    assert weight.dtype in (torch.float32, torch.bfloat16), f"no panel loop for {weight.dtype}"
    module = _EXTENSION.module()
    if module is None or weight.numel() == 0:  # an empty weight: F.linear's zeros serve
        return None
    packed = pack(weight)
    if weight.dtype == torch.bfloat16:
        packed = packed[..., BFLOAT16_PAIRS].contiguous()
    return PanelLinear(packed, weight.shape[0], module.packed_linear)
