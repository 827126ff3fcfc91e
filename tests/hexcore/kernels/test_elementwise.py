"""The one-pass CPU RMSNorm and SiLU-and-mul loops against torch's ops, and where they are used."""

import pytest
import torch
import torch.nn.functional as F

from hexcore.kernels import elementwise
from hexcore.kernels.select import elementwise_kernels
from hexcore.model.layers import ColumnParallelLinear, RowParallelLinear
from hexcore.model.llama import LlamaMLP, RMSNorm
from hexcore.model.parallel import SINGLE
from tests.hexcore.kernels.tolerance import EPS32, assert_within, reduction_tolerance

# Roundings per output outside the sum of squares (RMSNorm: the mean, eps, square root, reciprocal, two
# products) or in SiLU-and-mul (exp, sum, quotient, product), counted on both sides: a few eps each.
ELEMENTWISE_EPS = 8


@pytest.fixture(scope="module")
def kernels():
    kernels = elementwise.load()
    assert kernels is not None, "the CPU elementwise loops must build here (a C++ compiler and ninja)"
    return kernels


def _rms_norm_tolerance(x: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Each row is scaled by (sum(x^2) / C + eps)^-1/2, the loop and torch summing the C squares in their
    own orders: terms of one sign, so the sums differ by at most reduction_tolerance(C, 1) relative,
    which the inverse square root halves; the output's other roundings are relative too."""
    return expected.abs() * (reduction_tolerance(x.shape[-1], 1.0) / 2 + ELEMENTWISE_EPS * EPS32)


@pytest.mark.parametrize("num_rows, width", [(1, 576), (7, 100), (300, 576)])  # one thread, odd widths, many rows
def test_rms_norm_matches_torch(kernels, num_rows, width):
    generator = torch.Generator().manual_seed(num_rows)
    x, weight = torch.randn(num_rows, width, generator=generator) * 3, torch.randn(width, generator=generator)
    expected = weight * F.rms_norm(x, (width,), eps=1e-5)
    assert_within(kernels.rms_norm(x, weight, 1e-5), expected, _rms_norm_tolerance(x, expected))


@pytest.mark.parametrize("num_rows, width", [(1, 1536), (7, 50), (300, 1536)])
def test_silu_and_mul_matches_torch(kernels, num_rows, width):
    gate_up = torch.randn(num_rows, 2 * width, generator=torch.Generator().manual_seed(num_rows)) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_and_mul(gate_up), F.silu(gate) * up)


def test_silu_and_mul_stays_finite_where_exp_overflows(kernels):
    gate_up = torch.tensor([[-100.0, -90.0, -88.0, 100.0, 1.0, 1.0, 1.0, 1.0]])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_and_mul(gate_up), F.silu(gate) * up)


def test_any_rows_any_layout(kernels):
    """Like torch's ops: leading dims are rows, and a non-contiguous input is read as its values."""
    x, weight = torch.randn(4, 6, 8).transpose(0, 1), torch.randn(8)
    expected = weight * F.rms_norm(x, (8,), eps=1e-5)
    assert_within(kernels.rms_norm(x, weight, 1e-5), expected, _rms_norm_tolerance(x, expected))
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_and_mul(x), F.silu(gate) * up)


def test_bad_inputs_raise_instead_of_reading_astray(kernels):
    with pytest.raises(RuntimeError, match="one contiguous float32 weight per column"):
        kernels.rms_norm(torch.randn(4, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.silu_and_mul(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="at least one column"):
        kernels.rms_norm(torch.randn(4, 0), torch.randn(0), 1e-5)
    with pytest.raises(RuntimeError, match="halves of equal width"):
        kernels.silu_and_mul(torch.randn(4, 7))


def test_the_model_gives_the_same_with_and_without_the_loops(kernels):
    """RMSNorm and the MLP: the loops (CPU float32) and the torch ops (every other device and dtype)."""
    weight, x = torch.randn(64), torch.randn(5, 64)
    expected = RMSNorm(weight, 1e-6)(x)
    assert_within(RMSNorm(weight, 1e-6, kernels)(x), expected, _rms_norm_tolerance(x, expected))
    gate_up, down = torch.randn(2 * 96, 64) * 0.1, torch.randn(64, 96) * 0.1
    with_loops = LlamaMLP(ColumnParallelLinear(gate_up), RowParallelLinear(down, SINGLE), kernels)
    torch_ops = LlamaMLP(ColumnParallelLinear(gate_up), RowParallelLinear(down, SINGLE))
    # Both use the same linear kernels; only SiLU-and-mul rounds differently, by a few eps of each of
    # its outputs h, which the down projection then sums: |difference| <= few eps * |h| @ |down|^T.
    gate, up = ColumnParallelLinear(gate_up)(x).chunk(2, dim=-1)
    tolerance = ELEMENTWISE_EPS * EPS32 * (F.silu(gate) * up).abs() @ down.abs().T
    assert_within(with_loops(x), torch_ops(x), tolerance)


def test_only_cpu_float32_gets_the_loops():
    assert elementwise_kernels(torch.device("cpu"), torch.float32) is not None
    assert elementwise_kernels(torch.device("cpu"), torch.bfloat16) is None
