from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradzip
from gradzip.compress import CompressionError
from gradzip.compress.sfb import SFB, concat_factors, sfb_pays


def _autograd_factors(
    lead: tuple[int, ...], n: int, m: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A Linear layer, its input X and output gradient dY after one backward pass."""
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(n, m).to(dtype)
    x = torch.randn((*lead, n), generator=gen).to(dtype)
    y = layer(x)
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(dy)
    return layer, x, dy


@settings(deadline=None, max_examples=40)
@given(
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
    n=st.integers(1, 24),
    m=st.integers(1, 24),
    seed=st.integers(0, 1000),
)
def test_equals_autograd_gradient_of_linear(
    lead: tuple[int, ...], n: int, m: int, seed: int
) -> None:
    layer, x, dy = _autograd_factors(lead, n, m, seed)
    comp = SFB()
    payload, ctx = comp.compress_factors(x, dy)
    batch = x.numel() // n
    assert payload.nbytes == batch * (n + m) * 4
    grad_w = comp.decompress(payload, ctx)
    assert grad_w.shape == layer.weight.shape
    assert layer.weight.grad is not None and layer.bias.grad is not None
    torch.testing.assert_close(grad_w, layer.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comp.decompress_bias(payload, ctx), layer.bias.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_factors_travel_in_their_dtype(dtype: torch.dtype) -> None:
    layer, x, dy = _autograd_factors((4, 3), 16, 8, seed=1)
    payload, ctx = SFB().compress_factors(x.to(dtype), dy.to(dtype))
    assert payload.nbytes == 12 * (16 + 8) * 2
    out = SFB().decompress(payload, ctx)
    assert out.dtype == dtype
    assert layer.weight.grad is not None
    ref = layer.weight.grad
    snr = 20 * torch.log10(ref.norm() / (ref - out.float()).norm())
    assert snr > 30  # only the rounding of the factors to half precision


def test_mixed_dtypes_go_in_fp32_and_non_contiguous_inputs() -> None:
    layer, x, dy = _autograd_factors((6,), 5, 7, seed=2)
    x_nc = x.t().contiguous().t()  # same values, column-major
    assert not x_nc.is_contiguous()
    payload, ctx = SFB().compress_factors(x_nc, dy.half())
    assert ctx.dtype == torch.float32 and payload[1].dtype == torch.float32
    out = SFB().decompress(payload, ctx)
    assert layer.weight.grad is not None
    torch.testing.assert_close(out, layer.weight.grad, rtol=1e-3, atol=1e-3)


def test_gathered_factors_sum_the_ranks_gradients() -> None:
    comp = SFB()
    grads, payloads = [], []
    for rank, batch in enumerate((3, 5, 1)):  # batch sizes may differ per rank
        layer, x, dy = _autograd_factors((batch,), 10, 4, seed=rank)
        torch.nn.init.zeros_(layer.weight)  # irrelevant to the gradient
        assert layer.weight.grad is not None
        grads.append(layer.weight.grad)
        payloads.append(comp.compress_factors(x, dy))
    ctx = payloads[0][1]
    total = comp.decompress(concat_factors([p for p, _ in payloads]), ctx)
    torch.testing.assert_close(total, sum(grads), rtol=1e-5, atol=1e-5)


def test_compress_of_a_weight_gradient_explains_itself() -> None:
    with pytest.raises(CompressionError, match=r"compress_factors\(inputs, grad_outputs\)"):
        SFB().compress(torch.zeros(4, 3))
    assert gradzip.compressor("sfb") == SFB()
    assert SFB.reduction is gradzip.Reduction.FACTORS


def test_bad_factors() -> None:
    with pytest.raises(CompressionError, match="same leading"):
        SFB().compress_factors(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(CompressionError, match="feature dimension"):
        SFB().compress_factors(torch.tensor(1.0), torch.zeros(2))
    with pytest.raises(CompressionError, match="int64"):
        SFB().compress_factors(torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, 2))
    payload, ctx = SFB().compress_factors(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(CompressionError, match="one batch size"):
        SFB().decompress(payload, ctx._replace(in_features=5))


def test_sfb_pays_cost_model() -> None:
    # small batch, wide layer: 4 * 32 * 8192 = 1.0e6 numbers vs 2 * 4096**2 = 3.4e7
    assert sfb_pays(batch=32, in_features=4096, out_features=4096, world_size=4)
    # large batch, narrow layer: factors are bigger than the gradient
    assert not sfb_pays(batch=1024, in_features=128, out_features=10, world_size=4)
    # more ranks: every rank receives every other rank's factors
    assert not sfb_pays(batch=32, in_features=1024, out_features=1024, world_size=64)
    assert not sfb_pays(batch=1, in_features=4096, out_features=4096, world_size=1)


@settings(deadline=None, max_examples=50)
@given(
    batch=st.integers(0, 512),
    n=st.integers(1, 4096),
    m=st.integers(1, 4096),
    p=st.integers(2, 64),
)
def test_sfb_pays_agrees_with_byte_counts(batch: int, n: int, m: int, p: int) -> None:
    gathered = (p - 1) * batch * (n + m) * 4  # bytes a rank receives, ring allgather
    allreduce = Fraction(2 * (p - 1), p) * n * m * 4  # bytes a rank receives, ring allreduce
    assert sfb_pays(batch, n, m, p) == (gathered < allreduce)


@pytest.mark.parametrize("bad", [{"batch": -1}, {"world_size": 0}, {"in_features": 2.5}])
def test_sfb_pays_rejects_bad_sizes(bad: dict) -> None:
    args = {"batch": 8, "in_features": 16, "out_features": 16, "world_size": 2, **bad}
    with pytest.raises(ValueError, match=r"expected an int >= "):
        sfb_pays(**args)
