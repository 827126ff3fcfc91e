"""Device choices: the linear kernel a weight gets, and that every kernel computes x @ W^T."""

import pytest
import torch
import torch.nn.functional as F

from hexcore.devices import PACKED_WEIGHT_MIN_ELEMENTS, linear_kernel


@pytest.mark.parametrize("shape", [(1024, 576), (576, 1536)])  # packed on CPU in float32
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_linear_kernel_equals_f_linear(shape, rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(shape, generator=generator)
    x = torch.randn(rows, shape[1], generator=generator)
    expected = F.linear(x, weight)
    got = linear_kernel(weight)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # a flattened batch of any leading shape, as the layers pass it
    torch.testing.assert_close(linear_kernel(weight)(x.view(1, rows, -1)), expected.view(1, rows, -1), rtol=1e-5, atol=1e-4)


def _ops_run(kernel, x) -> set[str]:
    with torch.profiler.profile() as profile:
        kernel(x)
    return {event.name for event in profile.events()}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not built into this torch")
def test_only_large_float32_cpu_weights_are_packed():
    x = torch.randn(4, 576)
    assert "mkldnn::_linear_pointwise" in _ops_run(linear_kernel(torch.randn(1024, 576)), x)
    small = torch.randn(64, 576)
    assert small.numel() < PACKED_WEIGHT_MIN_ELEMENTS
    assert "mkldnn::_linear_pointwise" not in _ops_run(linear_kernel(small), x)
    half = torch.randn(1024, 576, dtype=torch.bfloat16)
    assert "mkldnn::_linear_pointwise" not in _ops_run(linear_kernel(half), x.bfloat16())
