"""How far apart two float32 results may be that sum the same terms in different orders.

A kernel and its torch reference (a panel loop and F.linear, a running softmax and SDPA) add the same
terms in different orders, so they round differently; how much follows from the number of terms and
their size, not from a fixed atol that one machine's summation order happens to meet.

Model (Higham & Mary, "A new approach to probabilistic rounding error analysis", SISC 2019): each
float32 operation returns its exact result times (1 + d), |d| <= u = eps/2, the d independent with
mean zero. A sum of K terms t_k (a dot product: t_k = a_k * b_k) in any order then errs by
sum_j d_j * s_j over its <= 2K roundings, s_j the intermediate results, each a sum of some of the terms:

- in the worst case |s_j| <= sum|t_k| and every d_j has the same sign: the error is at most
  ~K * u * sum|t_k| (Wilkinson). Far too loose to test with: at K = 1536 and unit-variance data it
  is ~0.09, where the kernels differ by ~1e-4.
- for terms of random sign (independent zero-mean data, like the tests' randn) E[s_j^2] <= sum t_k^2
  =: S^2, so the error's standard deviation is at most u * sqrt(2K / 3) * S: it grows like sqrt(K)
  times the terms' root-sum-square. For terms of one sign (sums of squares, softmax denominators)
  |s_j| <= sum|t_k|, and the same holds with S = sum|t_k|.

Two results summed in different orders differ by the difference of two such errors. Measured on the
panel loop (and oneDNN) against F.linear (K = 576 to 4096, 8e6 outputs): |difference| divided by
eps * sqrt(K) * S has an rms of 0.16, the greatest was 2.2, and the tail falls e-fold every ~0.13
(exponential rather than Gaussian: the partial sums of a random walk wander). The tolerance is
REDUCTION_TOLERANCE = 6 times eps * sqrt(K) * S: ~40 of those rms, nearly 3x anything seen, yet small
enough to catch a wrong result: at K = 1536 with unit-variance inputs (S ~ 39) it is 1.1e-3, so an
output off by 1e-2 fails, and a missing or misplaced term (~1) fails by far.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2^-23: twice float32's unit roundoff
REDUCTION_TOLERANCE = 6.0  # multiples of eps * sqrt(K) * S (module docstring)


def reduction_tolerance(num_terms: int, scale):
    """Greatest difference allowed between two float32 sums of the same `num_terms` terms taken in
    different orders. `scale`: the terms' root-sum-square sqrt(sum t^2) where they have random signs,
    or sum|t| where they do not (a float or a tensor: elementwise)."""
    return REDUCTION_TOLERANCE * EPS32 * math.sqrt(num_terms) * scale


def matmul_tolerance(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Elementwise tolerance for x @ weight^T (x [..., K], weight [N, K]) summed in another order than
    the reference's: each output sums K products of random sign, root-sum-square sqrt(x^2 @ (w^2)^T)."""
    return reduction_tolerance(x.shape[-1], (x.square() @ weight.square().T).sqrt())


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tolerance) -> None:
    """|actual - expected| <= tolerance elementwise (a NaN fails), with the same shape and dtype."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    difference = (actual - expected).abs()
    tolerance = torch.as_tensor(tolerance, dtype=difference.dtype).expand_as(difference)
    outside = ~(difference <= tolerance)
    if outside.any():
        ratio = torch.where(outside, difference / tolerance, 0).nan_to_num(nan=math.inf)
        worst = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), difference.shape))
        raise AssertionError(
            f"{int(outside.sum())} of {difference.numel()} elements differ by more than their tolerance; the worst, "
            f"at {worst}: |{actual[worst].item()} - {expected[worst].item()}| = {difference[worst].item():.3g} > "
            f"{tolerance[worst].item():.3g} (greatest absolute difference {difference.max().item():.3g})")

