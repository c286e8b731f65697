"""The int8 product (`runtime/int8_product.cpp`): against its reference, `cpu_kernels.int8_linear`, which
rounds the weights' rows and each group of a row of x to int8; a row gets the same bits alone or among others;
bad operands are refused. Where the CPU has no AMX tiles this tests the portable loop."""

import pytest
import torch
import torch.nn.functional as F

from runtime import cpu_kernels
from runtime.cpu_kernels import int8_linear, int8_product, quantize_weight
from tests.runtime.test_cpu_kernels import padded_with_nan

pytestmark = pytest.mark.skipif(not cpu_kernels.built(), reason="no C++ compiler to build our CPU kernels")

# one rounding of the output (bf16), or a few of float32's: the kernel multiplies-and-adds where the
# reference rounds twice
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2 ** -7, "atol": 1e-3}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows, out_features, in_features, group, bias", [
    (1, 16, 64, 0, False),  # one block, one chunk of k
    (4, 96, 576, 0, True),  # a tree level's rows, SmolLM2's K
    (3, 64, 1152, 576, True),  # the draft layer's fc: [feature; embedding], a scale for each
    (17, 32, 128, 64, False),  # two tiles of rows, the second of one row; groups of one chunk
    (70, 48, 192, 0, True),  # more rows than a pass takes (64), three blocks
])
def test_int8_product_is_its_reference(dtype, rows, out_features, in_features, group, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = padded_with_nan(rows, in_features, dtype, gen)  # a read past the last row gives NaN
    weight = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    ours = int8_product(x, quantize_weight(weight), b, group)
    reference = int8_linear(x, weight, b, group)
    assert ours.dtype == dtype and ours.shape == (rows, out_features) and not ours.isnan().any()
    torch.testing.assert_close(ours, reference, **TOLERANCE[dtype])
    # the reference rounds: it is ~1% from the exact product, well outside the tolerance above
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    off = (reference.double() - exact).norm() / exact.norm()
    assert 1e-3 < off < 0.03


def test_where_rounding_loses_nothing_it_is_the_exact_product():
    """Weights and rows already int8 times a power of two round to themselves: the product is exact."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (32, 128), generator=gen).float()
    weight[:, 0] = 127  # each row's largest |w| is 127: its scale is 1
    x = torch.randint(-127, 128, (5, 128), generator=gen).float() / 4
    x[:, 0] = 127 / 4
    ours = int8_product(x, quantize_weight(weight), None, 0)
    torch.testing.assert_close(ours, x @ weight.T, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_row_gets_the_same_bits_alone_or_among_others(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 576, generator=gen).to(dtype)
    weight = quantize_weight(torch.randn(64, 576, generator=gen))
    together = int8_product(x, weight, None, 0)
    for r in (0, 17, 39):
        assert torch.equal(int8_product(x[r:r + 1], weight, None, 0), together[r:r + 1])


def test_a_row_of_zeros_gives_the_bias():
    weight = quantize_weight(torch.randn(16, 64))
    bias = torch.randn(16)
    assert torch.equal(int8_product(torch.zeros(2, 64), weight, bias, 0), bias.expand(2, 16))


def test_bad_operands_raise_clear_errors():
    weight = quantize_weight(torch.randn(16, 64))
    with pytest.raises(RuntimeError, match="multiple"):
        int8_product(torch.randn(1, 64), weight, None, 48)  # a group that is not a multiple of 64
    with pytest.raises(RuntimeError, match="x \\[..., K\\]"):
        int8_product(torch.randn(1, 32), weight, None, 0)
    with pytest.raises(RuntimeError, match="int8"):
        int8_product(torch.randn(1, 64), torch.randn(16, 68), None, 0)
    with pytest.raises(AssertionError, match="multiple of 16"):
        quantize_weight(torch.randn(8, 64))
