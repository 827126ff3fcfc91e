"""RMSNorm and SiLU-and-multiply on CPU in float32, each one pass over its rows, compiled on first use.

In torch each is several ops (RMSNorm: square, mean, rsqrt, two products; the MLP's activation:
split, SiLU, product), and at decode batch sizes every op costs more in dispatch than in arithmetic.
Rows are split over torch's thread pool only when there are enough of them to pay for waking it.
The C++ is csrc/elementwise.cpp; `load()` returns None where the loops cannot be built
(hexcore/kernels/build.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hexcore.kernels.build import CppExtension

_EXTENSION = CppExtension("hexgen_cpu_elementwise", "elementwise.cpp", ["rms_norm", "silu_and_mul"],
                          "CPU RMSNorm and SiLU-and-mul loops")


@dataclass(frozen=True)
class ElementwiseKernels:
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # x [..., C], weight [C], eps
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]  # [..., 2I] -> [..., I]


def load() -> ElementwiseKernels | None:
    module = _EXTENSION.module()
    return ElementwiseKernels(module.rms_norm, module.silu_and_mul) if module is not None else None
