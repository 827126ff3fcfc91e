"""Device choices: the linear kernel a weight gets, and that every kernel computes x @ W^T."""

import pytest
import torch
import torch.nn.functional as F

from hexcore.kernels import panel_linear
from hexcore.kernels.select import PACKED_WEIGHT_MIN_ELEMENTS, linear_kernel
from tests.hexcore.kernels.tolerance import assert_within, matmul_tolerance


def _kernel_run(kernel, x) -> str:
    """Which kernel ran: oneDNN's op, torch's linear, or neither torch matmul (the compiled loop)."""
    with torch.profiler.profile() as profile:
        kernel(x)
    ops = {event.name for event in profile.events()}
    if "mkldnn::_linear_pointwise" in ops:
        return "oneDNN"
    if "aten::linear" in ops:
        return "F.linear"
    return "other torch matmul" if ops & {"aten::mm", "aten::addmm", "aten::matmul", "aten::bmm"} else "panels"


@pytest.fixture(params=["panels", "oneDNN"])
def kernel_choice(request, monkeypatch):
    """Both CPU float32 kernels: the panel loop, and oneDNN's where the loop cannot be built."""
    if request.param == "oneDNN":
        if not torch.backends.mkldnn.is_available():
            pytest.skip("oneDNN not built into this torch")
        monkeypatch.setattr(panel_linear, "packed_linear", lambda weight: None)
    return request.param


@pytest.mark.parametrize("shape", [(1024, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_linear_kernel_equals_f_linear(kernel_choice, shape, rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(shape, generator=generator)
    x = torch.randn(rows, shape[1], generator=generator)
    expected = F.linear(x, weight)
    kernel = linear_kernel(weight)
    assert _kernel_run(kernel, x) == kernel_choice
    tolerance = matmul_tolerance(x, weight)  # each kernel sums the products in its own order
    assert_within(kernel(x), expected, tolerance)
    # a flattened batch of any leading shape, as the layers pass it
    assert_within(kernel(x.view(1, rows, -1)), expected.view(1, rows, -1), tolerance.view(1, rows, -1))


def test_which_weights_get_which_kernel(kernel_choice):
    x = torch.randn(4, 576)
    small = torch.randn(64, 576)
    assert small.numel() < PACKED_WEIGHT_MIN_ELEMENTS
    # the loop takes every float32 CPU weight; oneDNN only those large enough to pay for its call
    assert _kernel_run(linear_kernel(small), x) == ("panels" if kernel_choice == "panels" else "F.linear")


def test_bfloat16_without_bfloat16_units_runs_the_float32_loop():
    """bfloat16 in and out; on a CPU without bfloat16 matmul units the panel loop computes it in float32
    (where there are such units, or the loop cannot be built: F.linear)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, 576, generator=generator).bfloat16()
    x = torch.randn(32, 576, generator=generator).bfloat16()
    kernel = linear_kernel(weight)
    emulated = not torch.ops.mkldnn._is_mkldnn_bf16_supported() and panel_linear.packed_linear(torch.ones(1, 1))
    assert _kernel_run(kernel, x) == ("panels" if emulated else "F.linear")
    out = kernel(x)
    assert out.dtype == torch.bfloat16 and out.shape == (32, 1024)
    expected = F.linear(x.float(), weight.float())  # the same bfloat16 values, products and sums in float32
    tolerance = matmul_tolerance(x.float(), weight.float()) + expected.abs() * 2**-8  # + bfloat16's rounding
    assert_within(out.float(), expected, tolerance)
