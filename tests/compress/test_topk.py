import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradzip
from gradzip.compress import CompressionError, ResidualMemory
from gradzip.compress.topk import (
    TopK,
    desparsify,
    sparsify,
    sparsify_sampled,
    topk_count,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_largest(flat: torch.Tensor, idx: torch.Tensor) -> None:
    """``idx`` (unique) holds entries whose magnitudes are >= every other entry's magnitude."""
    mag = flat.abs().to(torch.float32)
    idx = idx.long()
    assert idx.unique().numel() == idx.numel()
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[idx] = True
    if idx.numel() and (~kept).any():
        assert mag[kept].min() >= mag[~kept].max()
    # the same multiset of magnitudes as a sort would keep (ties: any of them will do)
    top = torch.sort(mag, descending=True).values[: idx.numel()]
    assert torch.equal(torch.sort(mag[idx], descending=True).values, top)


@settings(deadline=None, max_examples=60)
@given(
    values=st.lists(st.integers(-4, 4), min_size=1, max_size=200),
    ratio=st.floats(0.001, 1.0),
)
def test_exact_keeps_the_k_largest_even_with_ties(values: list[int], ratio: float) -> None:
    flat = torch.tensor(values, dtype=torch.float32) / 2
    k = topk_count(ratio, flat.numel())
    idx, vals = sparsify(flat, k)
    assert idx.dtype == torch.int32 and vals.dtype == torch.float32
    assert idx.numel() == k == max(1, math.ceil(round(ratio * flat.numel(), 9)))
    _assert_largest(flat, idx)
    assert torch.equal(vals, flat[idx.long()])


def test_topk_count() -> None:
    assert topk_count(0.07, 100) == 7  # 0.07 * 100 is 7.000000000000001 in binary floats
    assert topk_count(0.01, 1) == 1
    assert topk_count(0.01, 0) == 0
    assert topk_count(1.0, 5) == 5
    assert topk_count(0.001, 2**20) == math.ceil(2**20 / 1000)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (0,), (1023,), (33, 31), (2**20 + 7,)])
@pytest.mark.parametrize("selection", ["exact", "sampled"])
def test_round_trip_any_shape(shape: tuple[int, ...], dtype: torch.dtype, selection: str) -> None:
    comp = TopK(ratio=0.01, selection=selection)  # type: ignore[arg-type]
    x = _rand(*shape, seed=1, dtype=dtype)
    payload, ctx = comp.compress(x, seed=3)
    n = x.numel()
    k = topk_count(0.01, n)
    assert payload[0].numel() <= k
    if selection == "exact":
        assert payload.nbytes == k * 8
    out = comp.decompress(payload, ctx)
    assert out.shape == x.shape and out.dtype == dtype
    sent = out.reshape(-1) != 0
    # what was sent is exact (up to the input dtype), what was not is zero
    assert torch.equal(out.reshape(-1)[sent], x.reshape(-1)[sent])
    _assert_largest(x.reshape(-1), payload[0])


def test_non_contiguous_input() -> None:
    x = _rand(40, 30, seed=2).t()
    assert not x.is_contiguous()
    comp = TopK(ratio=0.05)
    out = comp.decompress(*comp.compress(x))
    dense = torch.where(out != 0, x, torch.zeros_like(x))
    assert torch.equal(out, dense)
    _assert_largest(x.reshape(-1), comp.compress(x)[0][0])


def test_nbytes_is_k_times_8_for_fp32() -> None:
    n = 2**20
    payload, _ = TopK(ratio=0.001).compress(_rand(n))
    k = math.ceil(n / 1000)
    assert payload.nbytes == k * 8
    assert 4 * n / payload.nbytes > 490  # ~500x


@pytest.mark.parametrize("seed", range(5))
def test_sampled_is_a_prefix_of_the_sort_and_close_to_k(seed: int) -> None:
    x = _rand(100_000, seed=seed)
    k = topk_count(0.01, x.numel())
    gen = torch.Generator().manual_seed(seed)
    idx, vals = sparsify_sampled(x, k, sample_ratio=0.01, gen=gen)
    assert k * 0.9 <= idx.numel() <= k
    _assert_largest(x, idx)
    assert torch.equal(vals, x[idx.long()])


@settings(deadline=None, max_examples=30)
@given(n=st.integers(1, 5000), ratio=st.floats(0.0005, 1.0), seed=st.integers(0, 2**31))
def test_sampled_never_exceeds_k(n: int, ratio: float, seed: int) -> None:
    x = _rand(n, seed=seed % 1000) * (torch.arange(n) % 3)  # zeros and ties too
    k = topk_count(ratio, n)
    idx, _ = sparsify_sampled(x, k, sample_ratio=0.05, gen=torch.Generator().manual_seed(seed))
    assert 1 <= idx.numel() <= k
    _assert_largest(x, idx)


@pytest.mark.parametrize("selection", ["exact", "sampled"])
def test_same_seed_same_payload_and_no_global_rng(selection: str) -> None:
    comp = TopK(ratio=0.003, selection=selection)  # type: ignore[arg-type]
    x = _rand(50_000, seed=4)
    state = torch.get_rng_state()
    a, _ = comp.compress(x, seed=11)
    b, _ = comp.compress(x, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


def test_error_feedback_residual_is_the_unsent_part() -> None:
    comp = gradzip.compressor("topk", ratio=0.02)
    assert comp.error_feedback
    mem = comp.make_memory()
    assert isinstance(mem, ResidualMemory)
    for step in range(3):
        g = mem.compensate("w", _rand(20, 10, seed=step))
        before = g.clone()
        payload, ctx = comp.compress(g, seed=step)
        out = comp.decompress(payload, ctx)
        mem.update("w", g, out)
        residual = mem.residuals["w"]
        assert torch.equal(residual, before - out)
        sent = payload[0].long()
        assert torch.all(residual.reshape(-1)[sent] == 0)
        unsent = torch.ones(before.numel(), dtype=torch.bool)
        unsent[sent] = False
        assert torch.equal(residual.reshape(-1)[unsent], before.reshape(-1)[unsent])


def test_desparsify_adds_repeated_indices() -> None:
    idx = torch.tensor([0, 3, 0], dtype=torch.int32)
    vals = torch.tensor([1.0, 2.0, 4.0])
    assert torch.equal(desparsify(idx, vals, 5), torch.tensor([5.0, 0, 0, 2, 0]))
    with pytest.raises(CompressionError, match=r"index range \[0, 3\] .* 3 elements"):
        desparsify(idx, vals, 3)
    with pytest.raises(CompressionError, match="one length"):
        desparsify(idx, vals[:2], 5)


@pytest.mark.parametrize("ratio", [0, 2, -0.1, float("nan")])
def test_bad_ratio_says_what_is_allowed(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"ratio=.* 0 < ratio <= 1"):
        TopK(ratio=ratio)
    with pytest.raises(ValueError, match=r"0 < ratio <= 1"):
        gradzip.compressor(f"topk:ratio={ratio}")


def test_bad_selection_and_dtype() -> None:
    with pytest.raises(ValueError, match=r"selection='fast'.*'exact', 'sampled'"):
        gradzip.compressor("topk:selection=fast")
    with pytest.raises(CompressionError, match=r"torch.int64; expected one of float32"):
        TopK().compress(torch.arange(5))


def test_spec_round_trip() -> None:
    comp = TopK(ratio=0.05, selection="sampled", sample_ratio=0.02, error_feedback=False)
    assert gradzip.compressor(comp.spec()) == comp
    assert gradzip.compressor("topk", ratio=0.05) == gradzip.compressor("topk:ratio=0.05")
    assert TopK.reduction is gradzip.Reduction.SPARSE
