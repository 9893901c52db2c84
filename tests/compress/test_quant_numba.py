"""The numba path of QSGD and TernGrad on CPU tensors against the torch path (GRADZIP_NUMBA=0).

One wire format: a numba payload decodes with the torch code bit for bit and the other way
round; the levels/trits come from another generator, so they are checked for unbiasedness and
determinism instead of equality, except where no randomness is left (integer levels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import gradzip
from gradzip.compress import CompressionError, kernels
from gradzip.compress import _numba as switch
from gradzip.compress._quant_numba import _round_to
from gradzip.compress.base import DenseCtx, Payload
from gradzip.compress.packing import pack_base3, pack_bits
from gradzip.compress.qsgd import QSGD
from gradzip.compress.terngrad import TernGrad

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LEVELS = [1, 3, 7, 15, 127]  # 2, 3, 4, 5 and 8 bits per code
SIZES = [0, 1, 7, 513, 1000003]


def _randn(n: int | tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    shape = (n,) if isinstance(n, int) else n
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _torch_path(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], Any]) -> Any:
    """``fn()`` with the numba kernels switched off (the torch reference)."""
    monkeypatch.setenv("GRADZIP_NUMBA", "0")
    try:
        return fn()
    finally:
        monkeypatch.setenv("GRADZIP_NUMBA", "1")


@pytest.fixture(autouse=True)
def _numba_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADZIP_NUMBA", "1")


def test_the_switch_picks_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert switch.numba_kernels("_quant_numba") is not None
    x = _randn(5000, 1)
    fast = QSGD().compress(x, seed=3)[0]
    slow = _torch_path(monkeypatch, lambda: QSGD().compress(x, seed=3)[0])
    assert fast.layout() == slow.layout()
    assert not torch.equal(fast[0], slow[0])  # another generator: other levels
    monkeypatch.setenv("GRADZIP_NUMBA", "0")
    assert switch.numba_kernels("_quant_numba") is None
    assert QSGD().decompress_sum([slow], [DenseCtx(x.shape, x.dtype)]) is None


# --- QSGD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l2", "max"])
@pytest.mark.parametrize("levels", LEVELS)
def test_qsgd_is_unbiased_within_the_quantizer_variance(levels: int, norm: str) -> None:
    comp = QSGD(levels=levels, bucket_size=20, norm=norm)  # type: ignore[arg-type]
    x = _randn(50, levels)  # buckets of 20, 20, 10
    seeds = 800
    total = torch.zeros(50, dtype=torch.float64)
    for seed in range(seeds):
        total += comp.decompress(*comp.compress(x, seed=seed)).double()
    mean = total / seeds
    v = torch.cat([x, x.new_zeros(10)]).view(-1, 20).double()
    norms = v.norm(dim=1) if norm == "l2" else v.abs().amax(dim=1)
    step = (norms / levels).repeat_interleave(20)[:50]
    a = x.double().abs() / step
    p = a - a.floor()
    sigma = step * torch.sqrt(p * (1 - p) / seeds)
    err = (mean - x.double()).abs()
    assert bool((err <= 5 * sigma + 1e-6 * step).all()), float((err / (sigma + 1e-12)).max())
    # the test has teeth: always rounding down is off by far more than that
    floor = a.floor() * step * x.sign().double()
    assert bool(((floor - x.double()).abs() > 5 * sigma + 1e-6 * step).any())


def test_qsgd_levels_are_a_function_of_seed_and_index() -> None:
    x = _randn(3001, 2)
    comp = QSGD(levels=7, bucket_size=100)
    a, _ = comp.compress(x, seed=2**63 + 5)
    b, _ = comp.compress(x.clone(), seed=2**63 + 5)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    c, _ = comp.compress(x, seed=6)
    assert not torch.equal(a[0], c[0])
    # the same draws whatever the code width: 8-bit codes of quantize() hold the same levels
    level, negative, _ = comp.quantize(x, seed=6)
    codes = (level << 1) | negative.to(torch.uint8)
    assert torch.equal(c[0], pack_bits(codes, comp.bits))
    # and the Elias-coded payload decodes to the same values
    elias = QSGD(levels=7, bucket_size=100, elias=True)
    ctx = DenseCtx(x.shape, x.dtype)
    assert torch.equal(elias.decompress(elias.compress(x, seed=6)[0], ctx),
                       comp.decompress(c, ctx))


def test_qsgd_does_not_touch_the_global_rng() -> None:
    state = torch.random.get_rng_state()
    QSGD().compress(_randn(1000, 3), seed=1)
    TernGrad().compress(_randn(1000, 3), seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("bucket", [1, 7, 512])
def test_integer_levels_pack_exactly_as_pack_bits(
    levels: int, bucket: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max|x| = levels`` per bucket with integer ``x``: ``a_i = |x_i|`` exactly, nothing is
    random, so the numba bytes must equal the torch path's (``pack_bits``) at every width."""
    comp = QSGD(levels=levels, bucket_size=bucket, norm="max")
    n = 1003
    gen = torch.Generator().manual_seed(levels)
    x = torch.randint(-levels, levels + 1, (n,), generator=gen).float()
    x[::bucket] = levels  # every bucket's max is levels
    ours, _ = comp.compress(x, seed=1)
    ref, _ = _torch_path(monkeypatch, lambda: comp.compress(x, seed=2))
    assert torch.equal(ours[1], ref[1]) and torch.equal(ours[0], ref[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("n", SIZES)
def test_qsgd_one_wire_format_both_ways(
    n: int, levels: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = 512 if n != 513 else 100  # 100 does not divide 513
    for comp in (QSGD(levels=levels, bucket_size=bucket), QSGD(levels, 7, norm="max")):
        x = _randn(n, n + levels, dtype)
        ours, ctx = comp.compress(x, seed=4)
        ref, ref_ctx = _torch_path(monkeypatch, lambda c=comp, t=x: c.compress(t, seed=4))
        assert ctx == ref_ctx and ours.layout() == ref.layout()
        for payload in (ours, ref):
            fast = comp.decompress(payload, ctx)
            slow = _torch_path(
                monkeypatch, lambda c=comp, p=payload, d=ctx: c.decompress(p, d)
            )
            assert fast.dtype == dtype and fast.shape == x.shape
            assert torch.equal(fast, slow)
        if comp.norm == "max":
            assert torch.equal(ours[1], ref[1])  # a max is exact in any order
        else:
            torch.testing.assert_close(ours[1], ref[1], rtol=3e-7, atol=0)


def test_qsgd_any_shape_non_contiguous_and_huge_buckets() -> None:
    x = torch.randn(40, 30).T[:, ::3]
    comp = QSGD(bucket_size=32)
    a, ctx = comp.compress(x, seed=3)
    b, _ = comp.compress(x.contiguous(), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert comp.decompress(a, ctx).shape == x.shape
    big = QSGD(bucket_size=10**6)  # one bucket longer than a chunk: two reads of it
    y = _randn(9001, 5)
    payload, ctx = big.compress(y, seed=1)
    assert payload[1].numel() == 1
    torch.testing.assert_close(payload[1], y.norm().reshape(1), rtol=1e-6, atol=0)
    for shape in [(), (0, 5), (17, 3, 5)]:
        t = torch.randn(shape)
        assert comp.decompress(*comp.compress(t)).shape == t.shape


@pytest.mark.parametrize("norm", ["l2", "max"])
def test_qsgd_nan_inf_and_overflow_raise(norm: str) -> None:
    comp = QSGD(bucket_size=4, norm=norm)  # type: ignore[arg-type]
    elias = QSGD(bucket_size=4, norm=norm, elias=True)  # type: ignore[arg-type]
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(13)
        x[9] = bad
        for method in (comp.compress, comp.quantize, elias.compress):
            with pytest.raises(CompressionError, match="NaN or Inf"):
                method(x)
    if norm == "l2":  # squares that add up past fp32's range, as the torch path's fp32 sum
        with pytest.raises(CompressionError, match="overflow fp32"):
            QSGD(bucket_size=512).compress(torch.full((512,), 1e19))


def test_qsgd_bad_payloads_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    comp = QSGD(bucket_size=10)
    x = _randn(95, 1)
    (codes, norms), ctx = comp.compress(x)
    bad = [
        Payload((codes,)),
        Payload((codes[:-1], norms)),
        Payload((codes, norms[:-1])),
        Payload((codes.to(torch.int16), norms)),
        Payload((codes, norms.double())),
    ]
    for payload in bad:
        with pytest.raises(CompressionError):
            comp.decompress(payload, ctx)
        with pytest.raises(CompressionError):
            comp.decompress_sum([Payload((codes, norms)), payload], [ctx, ctx])
        with pytest.raises(CompressionError):
            _torch_path(monkeypatch, lambda p=payload: comp.decompress(p, ctx))
    with pytest.raises(CompressionError, match="disagree on the shape"):
        comp.decompress_sum([Payload((codes, norms))] * 2, [ctx, DenseCtx((5, 19), x.dtype)])


# --- the receive side -----------------------------------------------------------------------


def _reference_sum(
    comp: Any, payloads: list[Payload], ctxs: list[DenseCtx], scale: float,
    monkeypatch: pytest.MonkeyPatch,
) -> torch.Tensor:
    return _torch_path(  # type: ignore[no-any-return]
        monkeypatch, lambda: kernels.decompress_sum(comp, payloads, ctxs, scale=scale)
    )


SUM_CONFIGS: list[Any] = [
    QSGD(), QSGD(levels=1, bucket_size=7), QSGD(levels=3, bucket_size=100, norm="max"),
    QSGD(levels=15, bucket_size=33), QSGD(levels=127, bucket_size=64), TernGrad(),
    TernGrad(clip=None, packing="base3"),
]


@pytest.mark.parametrize("scale", [1.0, 1 / 3])
@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("comp", SUM_CONFIGS, ids=lambda c: c.spec())
def test_decompress_sum_equals_the_torch_sum(
    comp: Any, dtype: torch.dtype, ranks: int, scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape = (97, 83)  # 8051 elements: two chunks and a partial one
    pairs = [comp.compress(_randn(shape, r, dtype) * 10.0 ** (r - 1), seed=r) for r in range(ranks)]
    payloads, ctxs = [p for p, _ in pairs], [c for _, c in pairs]
    fast = kernels.decompress_sum(comp, payloads, ctxs, scale=scale)
    assert fast.dtype == torch.float32 and fast.shape == shape
    assert torch.equal(fast, _reference_sum(comp, payloads, ctxs, scale, monkeypatch))
    assert torch.equal(comp.decompress_sum(payloads, ctxs, scale=scale), fast)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_to_the_gradient_dtype_is_torchs(dtype: torch.dtype) -> None:
    """fp16/bf16 round to nearest even as ``.to(dtype)``, over every binade: subnormals, ties,
    the overflow threshold (65520 in fp16), Inf and NaN."""
    gen = torch.Generator().manual_seed(0)
    exps = torch.randint(-40, 40, (200000,), generator=gen).float()
    x = (torch.rand(200000, generator=gen) + 1) * torch.exp2(exps)
    special = [65504.0, 65519.99, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 3 * 2.0**-25,
               2.0**-14 - 2.0**-26, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 0.0, float("inf"), 3e38,
               float(torch.finfo(torch.bfloat16).max) * (1 + 2.0**-9)]
    x = torch.cat([x, torch.tensor(special)])
    x = torch.cat([x, -x, torch.tensor([float("nan")])])
    vals = x.numpy().copy()
    _round_to(vals, vals.view(np.uint32), vals.size, 1 if dtype == torch.float16 else 2)
    expect = x.to(dtype).to(torch.float32)
    torch.testing.assert_close(torch.from_numpy(vals), expect, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.from_numpy(vals).view(torch.int32)[:-1].signbit(),
                       expect.view(torch.int32)[:-1].signbit())


# --- TernGrad -------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("clip", [None, 0.0, 2.5])
def test_terngrad_is_unbiased_for_the_clipped_gradient(clip: float | None, packing: str) -> None:
    comp = TernGrad(clip=clip, packing=packing)  # type: ignore[arg-type]
    x = _randn(67, 3)
    x[5] = 40.0  # an outlier, clipped to 2.5 * sigma when clipping is on
    bound = 2.5 * float(x.norm()) / math.sqrt(67) if clip else math.inf
    target = x.double().clamp(-bound, bound)
    s = float(comp.shared_stat(x))
    assert s == pytest.approx(float(target.abs().max()), rel=1e-6)
    seeds = 800
    total = torch.zeros(67, dtype=torch.float64)
    for seed in range(seeds):
        total += comp.decompress(*comp.compress(x, seed=seed)).double()
    p = target.abs() / s
    sigma = s * torch.sqrt(p * (1 - p) / seeds)
    err = (total / seeds - target).abs()
    assert bool((err <= 5 * sigma + 1e-6 * s).all()), float((err / (sigma + 1e-12)).max())
    assert bool(((target.sign() * s - target).abs() > 5 * sigma + 1e-6 * s).any())  # teeth


def test_terngrad_scaler_matches_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for comp in (TernGrad(), TernGrad(clip=None), TernGrad(clip=0.0), TernGrad(clip=1.0)):
        for x in (_randn(10007, 1) * 3, torch.full((9,), -0.25), torch.tensor([2.0]),
                  torch.zeros(5), torch.empty(0)):
            ours = comp.shared_stat(x)
            ref = _torch_path(monkeypatch, lambda c=comp, t=x: c.shared_stat(t))
            assert ours.dtype == torch.float32 and ours.dim() == 0
            if not comp.clip:  # max|g|: exact
                assert torch.equal(ours, ref)
            else:  # the clip bound's norm: another summation order
                torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("n", SIZES)
def test_terngrad_fixed_trits_pack_exactly(
    n: int, packing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values in {-1, 0, 1} with scaler 1 keep each one with probability 1 or 0: the bytes must
    be ``pack_bits``/``pack_base3`` of the trits, and decode both ways."""
    comp = TernGrad(clip=None, packing=packing)  # type: ignore[arg-type]
    trits = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(n))
    if n:
        trits[n // 2] = 2
    x = trits.float() - 1
    payload, ctx = comp.compress(x, seed=9)
    codes = trits.to(torch.uint8)
    assert torch.equal(payload[0], pack_bits(codes, 2) if packing == "2bit" else pack_base3(codes))
    assert torch.equal(comp.decompress(payload, ctx), x)
    assert torch.equal(_torch_path(monkeypatch, lambda: comp.decompress(payload, ctx)), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("n", SIZES)
def test_terngrad_one_wire_format_both_ways(
    n: int, packing: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    comp = TernGrad(packing=packing)  # type: ignore[arg-type]
    x = _randn(n, n, dtype)
    ours, ctx = comp.compress(x, seed=2)
    again, _ = comp.compress(x, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(ours, again, strict=True))
    ref, _ = _torch_path(monkeypatch, lambda: comp.compress(x, seed=2))
    assert ours.layout() == ref.layout()
    for payload in (ours, ref):
        fast = comp.decompress(payload, ctx)
        assert fast.dtype == dtype and fast.shape == x.shape
        slow = _torch_path(monkeypatch, lambda p=payload: comp.decompress(p, ctx))
        assert torch.equal(fast, slow)
    if n > 100:  # another generator: other trits
        assert not torch.equal(ours[0], ref[0])


def test_terngrad_shared_scaler_is_checked_and_sent() -> None:
    comp = TernGrad()
    g0, g1 = _randn(1000, 1), _randn(1000, 2) * 3
    shared = torch.maximum(comp.shared_stat(g0), comp.shared_stat(g1))
    outs = []
    for rank, g in enumerate((g0, g1)):
        payload, ctx = comp.compress(g, seed=rank, shared=shared)
        assert float(payload[1]) == float(shared)
        outs.append(comp.decompress(payload, ctx))
        ternary = comp.ternarize(g, seed=rank, shared=shared)
        assert torch.equal(outs[-1], ternary.values.float() * shared)
    ratio = (outs[0] + outs[1]) / shared
    assert torch.equal(ratio, ratio.round())
    local = comp.shared_stat(g1)
    for below in (local * (1 - 2**-20), torch.tensor(float("nan")), torch.tensor(float("inf"))):
        with pytest.raises(CompressionError, match="must be the MAX of shared_stat"):
            comp.compress(g1, shared=below)
    assert float(comp.compress(g1, shared=local)[0][1]) == float(local)  # equal is fine


def test_terngrad_takes_the_kept_statistics_only_for_an_unchanged_tensor() -> None:
    comp = TernGrad()
    g = _randn(10000, 4)
    stat = comp.shared_stat(g)
    assert "_gradzip_terngrad_stats" in g.__dict__
    kept, _ = comp.compress(g, seed=1, shared=stat)
    assert "_gradzip_terngrad_stats" not in g.__dict__  # used once
    fresh, _ = comp.compress(g.clone(), seed=1, shared=stat)  # read again: the same bytes
    assert torch.equal(kept[0], fresh[0])
    # an in-place change after shared_stat: the statistics are taken again, and the old
    # scaler is now below this rank's own
    comp.shared_stat(g)
    g.mul_(10)
    with pytest.raises(CompressionError, match="must be the MAX of shared_stat"):
        comp.compress(g, seed=1, shared=stat)
    # a view at the same address with the same version: its shape tells it apart, even with
    # the entry copied over (reusing the whole tensor's max|g| = 100 would refuse its scaler)
    unclipped = TernGrad(clip=None)
    g[9000] = 100.0
    half = g[:5000]
    own = unclipped.shared_stat(half.clone())
    unclipped.shared_stat(g)
    half.__dict__.update(g.__dict__)
    assert half.data_ptr() == g.data_ptr() and half._version == g._version
    assert float(unclipped.compress(half, seed=1, shared=own)[0][1]) == float(own)
    with torch.inference_mode():  # no version counter: nothing is kept
        t = _randn(100, 5)
        assert torch.equal(comp.shared_stat(t), TernGrad().shared_stat(t.clone()))
        assert "_gradzip_terngrad_stats" not in t.__dict__
        comp.compress(t, shared=comp.shared_stat(t))


def test_terngrad_nan_inf_raise() -> None:
    for comp in (TernGrad(), TernGrad(clip=None), TernGrad(packing="base3")):
        for bad in (float("nan"), float("inf")):
            x = torch.ones(4003)
            x[4001] = bad
            for method in (comp.compress, comp.shared_stat, comp.ternarize):
                with pytest.raises(CompressionError, match="NaN or Inf"):
                    method(x)


def test_terngrad_bad_payloads_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    comp = TernGrad()
    x = _randn(41, 1)
    (codes, scaler), ctx = comp.compress(x)
    bad = [Payload((codes,)), Payload((codes[:-1], scaler)), Payload((codes, scaler.repeat(2))),
           Payload((codes.to(torch.int8), scaler))]
    for payload in bad:
        with pytest.raises(CompressionError):
            comp.decompress(payload, ctx)
        with pytest.raises(CompressionError):
            comp.decompress_sum([Payload((codes, scaler)), payload], [ctx, ctx])
    junk = codes.clone()
    junk[3] = 0xFF  # code 3: not a trit
    for call in (lambda: comp.decompress(Payload((junk, scaler)), ctx),
                 lambda: comp.decompress_sum([Payload((codes, scaler)), Payload((junk, scaler))],
                                             [ctx, ctx]),
                 lambda: _torch_path(monkeypatch,
                                     lambda: comp.decompress(Payload((junk, scaler)), ctx))):
        with pytest.raises(CompressionError, match=r"outside \{0, 1, 2\}"):
            call()


@pytest.mark.parametrize("spec", ["qsgd", "qsgd:levels=127", "terngrad", "terngrad:packing=base3"])
def test_the_round_trip_of_the_benchmark(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Send side (compensate, shared stat, compress) and receive side through the dispatch,
    with the numba kernels and without: both decode to values of the same distribution."""
    comp = gradzip.compressor(spec)
    g = _randn(20000, 7)

    def run() -> torch.Tensor:
        mem = comp.make_memory()
        c = mem.compensate("g", g)
        payload, ctx = kernels.compress(comp, c, seed=1, shared=kernels.shared_stat(comp, c))
        return kernels.decompress_sum(comp, [payload], [ctx])

    fast, slow = run(), _torch_path(monkeypatch, run)
    assert fast.shape == slow.shape == g.shape
    for out in (fast, slow):  # unbiased estimates of g: the errors average out
        assert abs(float((out - g).mean())) < 0.05
        assert 10 * math.log10(float(g.pow(2).sum() / (out - g).pow(2).sum())) > -6
