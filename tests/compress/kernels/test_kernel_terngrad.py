"""TernGrad kernels (clip statistics, ternarize + pack, receive-side sum) vs. the reference."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from gradzip.compress import kernels
from gradzip.compress.base import Payload
from gradzip.compress.packing import pack_base3, pack_bits
from gradzip.compress.terngrad import TernGrad

Load = Callable[[str], ModuleType]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONFIGS = [TernGrad(), TernGrad(packing="base3"), TernGrad(clip=None), TernGrad(clip=0.5)]


def _randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("comp", CONFIGS, ids=lambda c: c.spec())
@pytest.mark.parametrize("n", [1, 1023])
def test_one_wire_format_both_ways(comp: TernGrad, n: int) -> None:
    x = _randn((n,), torch.float32, n)
    payload, ctx = kernels.compress(comp, x, seed=5)
    ref, ref_ctx = comp.compress(x, seed=5)
    assert ctx == ref_ctx and payload.layout() == ref.layout()
    assert torch.allclose(payload[1], ref[1], rtol=3e-7, atol=0)  # scaler (clip bound: l2)
    assert torch.equal(kernels.decompress(comp, payload, ctx), comp.decompress(payload, ctx))
    assert torch.equal(kernels.decompress(comp, ref, ctx), comp.decompress(ref, ctx))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_exact_scalers(dtype: torch.dtype) -> None:
    x = _randn((45, 23), dtype, 3)
    # without clipping the scaler is a max: exact; with dyadic data the sum of squares is
    # exact too, and so are sigma, the clip bound and the scaler
    dyadic = torch.randint(-64, 64, (45, 23), generator=torch.Generator().manual_seed(1)) / 8
    for comp, t in ((TernGrad(clip=None), x), (TernGrad(), dyadic.to(dtype))):
        payload, ctx = kernels.compress(comp, t, seed=2)
        ref, _ = comp.compress(t, seed=2)
        assert torch.equal(payload[1], ref[1])
        out = kernels.decompress(comp, payload, ctx)
        assert out.dtype == dtype and out.shape == t.shape
        assert torch.equal(out, comp.decompress(payload, ctx))
        assert torch.equal(kernels.decompress(comp, ref, ctx), comp.decompress(ref, ctx))


@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_given_trit_pattern_packs_bit_for_bit(packing: str) -> None:
    """Values in {-1, 0, 1} with scaler 1 keep each sign with probability 1 or 0: the trits
    are fixed, so the packed bytes must equal the reference's packing of them."""
    comp = TernGrad(clip=None, packing=packing)  # type: ignore[arg-type]
    trits = torch.randint(0, 3, (1003,), generator=torch.Generator().manual_seed(4))
    trits[7] = 2  # the scaler is 1
    x = trits.float() - 1
    payload, _ = kernels.compress(comp, x, seed=9)
    codes = trits.to(torch.uint8)
    expect = pack_bits(codes, 2) if packing == "2bit" else pack_base3(codes)
    assert torch.equal(payload[0], expect)
    assert torch.equal(payload[0], comp.compress(x, seed=1)[0][0])


def test_both_packings_draw_the_same_trits() -> None:
    x = _randn((2049,), torch.float32, 6)
    two = kernels.decompress(TernGrad(), *kernels.compress(TernGrad(), x, seed=8))
    base3 = TernGrad(packing="base3")
    assert torch.equal(two, kernels.decompress(base3, *kernels.compress(base3, x, seed=8)))


@pytest.mark.parametrize("clip", [None, 1.0])
def test_unbiased_with_the_variance_of_the_method(clip: float | None) -> None:
    """Many independent draws of the same 64 values: the mean is within a few standard errors
    of the (clipped) input and the z-scores have variance about 1."""
    comp, copies, seeds = TernGrad(clip=clip), 4096, 3
    base = _randn((64,), torch.float32, 12)
    x = base.repeat(copies)
    total = torch.zeros(64, dtype=torch.float64)
    for seed in range(seeds):
        payload, ctx = kernels.compress(comp, x, seed=seed)
        total += kernels.decompress(comp, payload, ctx).view(copies, 64).double().sum(0)
    mean, draws, s = total / (copies * seeds), copies * seeds, float(payload[1])
    target = base.double()
    if clip:  # s = min(max|x|, clip * sigma): elements beyond it are sent as +-s
        bound = clip * float(base.double().pow(2).mean().sqrt())
        assert s == pytest.approx(min(bound, float(base.abs().max())), rel=1e-6)
        target = target.clamp(-s, s)
    p = target.abs() / s
    z = (mean - target) / (s**2 * p * (1 - p) / draws).sqrt().clamp(min=1e-12)
    assert float(z.abs().max()) < 5.5
    assert 0.4 < float((z**2).mean()) < 1.8


def test_shared_scaler(load: Load) -> None:
    comp, x = TernGrad(), _randn((500,), torch.float32, 2)
    local = kernels.shared_stat(comp, x)
    assert local is not None and local.shape == ()
    assert float(local) == pytest.approx(float(comp.shared_stat(x)), rel=1e-6)
    assert torch.equal(load("terngrad").shared_stat(TernGrad(clip=None), x), x.abs().max())
    shared = local * 3
    payload, ctx = kernels.compress(comp, x, seed=1, shared=shared)
    assert torch.equal(payload[1], shared.reshape(1))
    out = kernels.decompress(comp, payload, ctx)
    assert set(out.unique().tolist()) <= {-float(shared), 0.0, float(shared)}
    with pytest.raises(ValueError, match="below this rank's scaler"):
        kernels.compress(comp, x, seed=1, shared=local / 2)


def test_large_odd_size() -> None:
    comp, x = TernGrad(), _randn((2**20 + 7,), torch.float32, 4)
    payload, ctx = kernels.compress(comp, x, seed=3)
    ref, _ = comp.compress(x, seed=3)
    assert payload.layout() == ref.layout()
    out = kernels.decompress(comp, payload, ctx)
    assert torch.equal(out, comp.decompress(payload, ctx))
    s = float(payload[1])
    assert bool(((out == 0) | (out.sign() == x.sign())).all())
    # about sum(|clip(x)|) / s of the elements are sent
    sent, expect = int((out != 0).sum()), float(x.abs().clamp(max=s).sum()) / s
    assert abs(sent - expect) < 6 * expect**0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_decompress_sum_equals_the_reference_sum(dtype: torch.dtype, packing: str) -> None:
    comp = TernGrad(packing=packing)  # type: ignore[arg-type]
    pairs = [kernels.compress(comp, _randn((37, 9), dtype, r), seed=r) for r in range(3)]
    payloads, ctxs = [p for p, _ in pairs], [c for _, c in pairs]
    total = kernels.decompress_sum(comp, payloads, ctxs, scale=0.25)
    expect = comp.decompress(payloads[0], ctxs[0]).float()
    for p, c in pairs[1:]:
        expect = expect + comp.decompress(p, c).float()
    assert total.dtype == torch.float32 and total.shape == (37, 9)
    assert torch.equal(total, expect * 0.25)


def test_bad_input_is_named() -> None:
    comp = TernGrad()
    with pytest.raises(ValueError, match="NaN or Inf"):
        kernels.compress(comp, torch.tensor([1.0, float("inf"), 2.0]))
    payload, ctx = kernels.compress(comp, torch.randn(100))
    with pytest.raises(ValueError, match=r"need 50 torch\.uint8"):
        kernels.decompress(comp, payload, ctx._replace(shape=torch.Size([200])))
    bad = Payload((torch.full_like(payload[0], 0xFF), payload[1]))
    with pytest.raises(ValueError, match="outside"):
        kernels.decompress(comp, bad, ctx)


def test_empty_tensor() -> None:
    comp = TernGrad()
    payload, ctx = kernels.compress(comp, torch.empty(0))
    ref, _ = comp.compress(torch.empty(0))
    assert payload.layout() == ref.layout() and float(payload[1]) == 0.0
    assert kernels.decompress(comp, payload, ctx).shape == (0,)
