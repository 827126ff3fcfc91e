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
    assert _kernel_run(linear_kernel(torch.randn(64, 576, dtype=torch.bfloat16)), x.bfloat16()) == "F.linear"
