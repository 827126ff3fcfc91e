"""The packed-panel CPU linear loop against F.linear: every tile remainder, ragged panels, any layout."""

import pytest
import torch
import torch.nn.functional as F

from hexcore.kernels import panel_linear
from tests.hexcore.kernels.tolerance import assert_within, matmul_tolerance


@pytest.fixture(scope="module")
def linear():
    assert panel_linear.packed_linear(torch.randn(16, 4)) is not None, "the loop must build here (a C++ compiler and ninja)"
    return panel_linear.packed_linear


def test_pack_lays_columns_out_in_zero_padded_k_major_panels():
    weight = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)  # 20 outputs: a full panel and 4 columns
    packed = panel_linear.pack(weight)
    assert packed.shape == (2, 3, 16)
    assert torch.equal(packed[0], weight[:16].T)
    assert torch.equal(packed[1, :, :4], weight[16:].T)
    assert not packed[1, :, 4:].any()
    shard = torch.arange(20 * 6, dtype=torch.float32).view(20, 6)[:, 3:]  # a column shard: not contiguous
    assert torch.equal(panel_linear.pack(shard), panel_linear.pack(shard.contiguous()))


@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 6, 7, 11, 13, 32, 300])  # 6-row tiles and every remainder
@pytest.mark.parametrize("num_out, num_in", [(64, 576), (100, 37), (7, 1536)])  # ragged last panel, one short panel
def test_matches_f_linear(linear, num_rows, num_out, num_in):
    generator = torch.Generator().manual_seed(num_rows * num_out)
    weight = torch.randn(num_out, num_in, generator=generator)
    x = torch.randn(num_rows, num_in, generator=generator)
    assert_within(linear(weight)(x), F.linear(x, weight), matmul_tolerance(x, weight))


def test_more_rows_than_one_pass_holds(linear):
    """Rows are taken in blocks that stay in cache (256 KiB of x: 42 rows at 1536 inputs)."""
    weight, x = torch.randn(50, 1536), torch.randn(100, 1536)
    assert_within(linear(weight)(x), F.linear(x, weight), matmul_tolerance(x, weight))


def test_any_leading_shape_any_layout_and_no_rows(linear):
    weight = torch.randn(40, 8)
    x = torch.randn(8, 3, 5).transpose(0, 2)  # [5, 3, 8], not contiguous
    assert_within(linear(weight)(x), F.linear(x, weight), matmul_tolerance(x, weight))
    assert linear(weight)(torch.randn(0, 8)).shape == (0, 40)


def test_threads_split_panels_without_changing_the_result(linear):
    weight, x = torch.randn(1009, 576), torch.randn(32, 576)  # a ragged last panel, split over threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear(weight)(x)
        torch.set_num_threads(2)
        two = linear(weight)(x)
    finally:
        torch.set_num_threads(threads)
    assert_within(two, F.linear(x, weight), matmul_tolerance(x, weight))
    assert torch.equal(one, two)  # each output is summed by one thread in the same order


def test_bad_inputs_raise_instead_of_reading_astray(linear):
    matmul = linear(torch.randn(20, 8))
    with pytest.raises(RuntimeError, match="last dimension must be the weight's in_features"):
        matmul(torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="float32"):
        matmul(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="inference only"):
        matmul(torch.randn(4, 8, requires_grad=True))
    module, packed = panel_linear._EXTENSION.module(), panel_linear.pack(torch.randn(20, 8))  # 2 panels
    for out_features in (33, 16, -1):  # more than 2 panels hold, fewer than 2 panels need, negative
        with pytest.raises(RuntimeError, match="does not match the number of panels"):
            module.packed_linear(torch.randn(4, 8), packed, out_features)
    with pytest.raises(RuntimeError, match="contiguous"):
        module.packed_linear(torch.randn(4, 8), torch.randn(2, 16, 8).transpose(1, 2), 20)
    with pytest.raises(RuntimeError, match=r"\[panels, in_features, 16\]"):
        module.packed_linear(torch.randn(4, 8), torch.randn(2, 8, 8), 20)
    with pytest.raises(RuntimeError, match="float32"):
        module.packed_linear(torch.randn(4, 8), packed.double(), 20)


def test_an_empty_weight_is_left_to_torch(linear):
    assert linear(torch.randn(16, 0)) is None


@pytest.mark.parametrize("num_rows", [1, 5, 32])
def test_bfloat16_panels_compute_in_float32(linear, num_rows):
    """bfloat16 weight and input: the products and sums of their (exactly widened) values in float32,
    rounded to bfloat16 once at the end."""
    generator = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(100, 576, generator=generator).bfloat16()  # a ragged last panel
    x = torch.randn(num_rows, 576, generator=generator).bfloat16()
    out = linear(weight)(x)
    assert out.dtype == torch.bfloat16 and out.shape == (num_rows, 100)
    assert panel_linear.pack(weight).dtype == torch.bfloat16  # 2 bytes per weight, as loaded
    expected = F.linear(x.float(), weight.float())
    assert_within(out.float(), expected, matmul_tolerance(x.float(), weight.float()) + expected.abs() * 2**-8)
