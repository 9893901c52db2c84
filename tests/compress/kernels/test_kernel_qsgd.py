"""QSGD kernels (bucket norms, quantize + pack, receive-side sum) vs. the torch reference."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from gradzip.compress import kernels
from gradzip.compress.packing import packed_size
from gradzip.compress.qsgd import QSGD

Load = Callable[[str], ModuleType]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# every code width: levels 1 -> 2 bits, 3 -> 3, 7 -> 4, 20 -> 6, 127 -> 8
CONFIGS = [
    QSGD(),
    QSGD(levels=1, bucket_size=7, norm="max"),
    QSGD(levels=3, bucket_size=100),
    QSGD(levels=20, bucket_size=1, norm="max"),
    QSGD(levels=127, bucket_size=64),
]


def _randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("comp", CONFIGS, ids=lambda c: c.spec())
@pytest.mark.parametrize("n", [1, 1023])
def test_one_wire_format_both_ways(comp: QSGD, n: int) -> None:
    x = _randn((n,), torch.float32, n)
    payload, ctx = kernels.compress(comp, x, seed=5)
    ref, ref_ctx = comp.compress(x, seed=5)
    assert ctx == ref_ctx and payload.layout() == ref.layout()
    # a kernel payload decodes identically with both; the reference's with the kernel
    assert torch.equal(kernels.decompress(comp, payload, ctx), comp.decompress(payload, ctx))
    assert torch.equal(kernels.decompress(comp, ref, ctx), comp.decompress(ref, ctx))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_shapes_and_norms(dtype: torch.dtype) -> None:
    for comp in (QSGD(bucket_size=96), QSGD(bucket_size=96, norm="max")):
        x = _randn((33, 31), dtype, 7)
        payload, ctx = kernels.compress(comp, x, seed=1)
        ref, _ = comp.compress(x, seed=1)
        assert ctx.shape == x.shape and ctx.dtype == dtype
        if comp.norm == "max":  # a max is exact in any order
            assert torch.equal(payload[1], ref[1])
        else:  # another summation order: within an fp32 rounding or two
            assert torch.allclose(payload[1], ref[1], rtol=3e-7, atol=0)
        out = kernels.decompress(comp, payload, ctx)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, comp.decompress(payload, ctx))
        assert torch.equal(kernels.decompress(comp, ref, ctx), comp.decompress(ref, ctx))


def test_exact_sums_give_exact_l2_norms() -> None:
    comp = QSGD(bucket_size=50)
    x = torch.randint(-64, 64, (1000,), generator=torch.Generator().manual_seed(3)) / 8
    assert torch.equal(kernels.compress(comp, x)[0][1], comp.compress(x)[0][1])


@pytest.mark.parametrize("norm", ["l2", "max"])
def test_norm_tiles_along_both_axes_of_the_grid(norm: str) -> None:
    # buckets longer than a tile: several programs per bucket, mapped from a 1-D grid
    comp = QSGD(bucket_size=10000, norm=norm)
    x = torch.randint(-64, 64, (30001,), generator=torch.Generator().manual_seed(4)) / 8
    assert torch.equal(kernels.compress(comp, x)[0][1], comp.compress(x)[0][1])


@pytest.mark.parametrize("comp", CONFIGS, ids=lambda c: c.spec())
def test_integer_levels_pack_bit_for_bit(comp: QSGD) -> None:
    """With the max norm equal to ``levels``, ``a_i = |x_i|`` is an integer: no randomness is
    left, so the packed bytes must equal the reference's whatever the generator."""
    comp = QSGD(levels=comp.levels, bucket_size=comp.bucket_size, norm="max")
    n = 1003
    gen = torch.Generator().manual_seed(comp.levels)
    x = torch.randint(-comp.levels, comp.levels + 1, (n,), generator=gen).float()
    x[:: comp.bucket_size] = comp.levels  # every bucket reaches the max
    payload, _ = kernels.compress(comp, x, seed=1)
    ref, _ = comp.compress(x, seed=2)
    assert payload[0].numel() == packed_size(n, comp.bits)
    assert torch.equal(payload[0], ref[0]) and torch.equal(payload[1], ref[1])


def test_unbiased_with_the_variance_of_the_method() -> None:
    """Many independent draws of the same 64 values (one per bucket copy and seed): the mean
    is within a few standard errors of the input, and the z-scores have variance about 1
    (too large or too small reveals wrong probabilities or correlated draws)."""
    comp, copies, seeds = QSGD(levels=3, bucket_size=64), 4096, 3
    base = _randn((64,), torch.float32, 11)
    x = base.repeat(copies)
    total = torch.zeros(64, dtype=torch.float64)
    for seed in range(seeds):
        payload, ctx = kernels.compress(comp, x, seed=seed)
        total += kernels.decompress(comp, payload, ctx).view(copies, 64).double().sum(0)
    mean, draws = total / (copies * seeds), copies * seeds
    step = float(payload[1][0]) / comp.levels  # every bucket holds ``base``: one norm
    frac = (base.abs().double() / step) % 1
    var = step**2 * frac * (1 - frac)
    z = (mean - base.double()) / (var / draws).sqrt()
    assert float(z.abs().max()) < 5.5
    assert 0.4 < float((z**2).mean()) < 1.8


def test_seeded_and_deterministic() -> None:
    comp, x = QSGD(), _randn((4099,), torch.float32, 2)
    a, _ = kernels.compress(comp, x, seed=2**62 + 5)
    b, _ = kernels.compress(comp, x, seed=2**62 + 5)
    c, _ = kernels.compress(comp, x, seed=6)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_large_odd_size() -> None:
    comp, x = QSGD(), _randn((2**20 + 7,), torch.float32, 4)
    payload, ctx = kernels.compress(comp, x, seed=3)
    ref, _ = comp.compress(x, seed=3)
    assert payload.layout() == ref.layout()
    out = kernels.decompress(comp, payload, ctx)
    assert torch.equal(out, comp.decompress(payload, ctx))
    # each element lands on one of its two neighbouring levels
    step = (payload[1] / comp.levels).repeat_interleave(comp.bucket_size)[: x.numel()]
    assert bool(((out - x).abs() <= step * (1 + 1e-6)).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_decompress_sum_equals_the_reference_sum(dtype: torch.dtype) -> None:
    comp = QSGD(levels=5, bucket_size=40)
    pairs = [kernels.compress(comp, _randn((37, 9), dtype, r), seed=r) for r in range(3)]
    payloads, ctxs = [p for p, _ in pairs], [c for _, c in pairs]
    total = kernels.decompress_sum(comp, payloads, ctxs, scale=1 / 3)
    expect = comp.decompress(payloads[0], ctxs[0]).float()
    for p, c in pairs[1:]:
        expect = expect + comp.decompress(p, c).float()
    assert total.dtype == torch.float32 and total.shape == (37, 9)
    assert torch.equal(total, expect * (1 / 3))


def test_elias_takes_the_torch_path(load: Load) -> None:
    comp, x = QSGD(elias=True), _randn((300,), torch.float32, 1)
    assert not load("qsgd").supports(comp, x)
    payload, ctx = kernels.compress(comp, x, seed=4)
    ref, _ = comp.compress(x, seed=4)
    assert torch.equal(payload[0], ref[0])
    assert torch.equal(kernels.decompress_sum(comp, [payload], [ctx]), comp.decompress(ref, ctx))


def test_bad_input_is_named() -> None:
    comp = QSGD()
    with pytest.raises(ValueError, match="NaN or Inf"):
        kernels.compress(comp, torch.tensor([1.0, float("nan"), 2.0]))
    payload, ctx = kernels.compress(comp, torch.randn(100))
    with pytest.raises(ValueError, match=r"need 100 torch\.uint8"):
        kernels.decompress(comp, payload, ctx._replace(shape=torch.Size([200])))
    with pytest.raises(ValueError, match="disagree on the dtype"):
        kernels.decompress_sum(comp, [payload, payload], [ctx, ctx._replace(dtype=torch.half)])


def test_empty_tensor() -> None:
    comp = QSGD()
    payload, ctx = kernels.compress(comp, torch.empty(0, 3))
    assert payload.nbytes == 0
    assert kernels.decompress(comp, payload, ctx).shape == (0, 3)
