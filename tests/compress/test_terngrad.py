import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradzip
from gradzip.compress import CompressionError, ResidualMemory
from gradzip.compress.terngrad import TernGrad

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check_unbiased(comp: TernGrad, x: torch.Tensor, target: torch.Tensor, seeds: int) -> None:
    total = torch.zeros(x.shape, dtype=torch.float64)
    for seed in range(seeds):
        total += comp.decompress(*comp.compress(x, seed=seed)).double()
    mean = total / seeds
    s = float(comp.shared_stat(x))
    # each element is s * Bernoulli(|t|/s) * sign(t): variance s^2 p (1 - p)
    p = target.double().abs() / s
    sigma = s * torch.sqrt(p * (1 - p) / seeds)
    err = (mean - target.double()).abs()
    assert bool((err <= 5 * sigma + 1e-6 * s).all()), float((err / (sigma + 1e-12)).max())


def test_unbiased_without_clipping() -> None:
    x = torch.randn(64, generator=torch.Generator().manual_seed(3))
    _check_unbiased(TernGrad(clip=None), x, x, seeds=600)


def test_unbiased_for_the_clipped_gradient() -> None:
    x = torch.randn(64, generator=torch.Generator().manual_seed(4))
    x[5] = 40.0  # an outlier, clipped to 2.5 * sigma
    sigma = float(x.norm()) / math.sqrt(64)
    clipped = x.clamp(-2.5 * sigma, 2.5 * sigma)
    comp = TernGrad()
    assert float(comp.shared_stat(x)) == pytest.approx(2.5 * sigma, rel=1e-6)
    _check_unbiased(comp, x, clipped, seeds=600)


def test_constant_and_single_element_gradients_are_not_clipped_to_zero() -> None:
    comp = TernGrad()
    for x in (torch.full((10,), 0.3), torch.tensor([-2.0])):
        values, scaler = comp.ternarize(x, seed=0)
        assert float(scaler) == pytest.approx(float(x.abs().max()))
        assert bool((values == x.sign().to(torch.int8)).all())  # p = 1: always kept


@settings(max_examples=30, deadline=None)
@given(n1=st.integers(1, 300), scale=st.floats(0.01, 100.0), seed=st.integers(0, 2**31))
def test_shared_scaler_makes_ranks_add_up_exactly(n1: int, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    g0, g1 = torch.randn(n1, generator=gen), torch.randn(n1, generator=gen) * scale
    comp = TernGrad()
    shared = torch.maximum(comp.shared_stat(g0), comp.shared_stat(g1))  # the MAX allreduce
    outs = []
    for rank, g in enumerate((g0, g1)):
        payload, ctx = comp.compress(g, seed=rank, shared=shared)
        assert float(payload[1]) == float(shared)
        outs.append(comp.decompress(payload, ctx))
        ternary = comp.ternarize(g, seed=rank, shared=shared).values
        assert torch.equal(outs[-1], ternary.float() * shared)
    # each rank sends integer multiples of the same scaler: the sum is one too, exactly
    ratio = (outs[0] + outs[1]) / shared
    assert torch.equal(ratio, ratio.round()) and bool((ratio.abs() <= 2).all())


def test_a_shared_scaler_below_the_local_one_is_rejected() -> None:
    comp = TernGrad(clip=None)
    with pytest.raises(CompressionError, match="must be the MAX of shared_stat"):
        comp.compress(torch.tensor([1.0, -3.0]), shared=torch.tensor(2.0))


def test_ternarize_gives_int8_trits_that_the_payload_carries() -> None:
    comp = TernGrad(packing="base3")
    x = torch.randn(1003)
    ternary = comp.ternarize(x, seed=9)
    assert ternary.values.dtype == torch.int8 and ternary.scaler.dim() == 0
    assert set(ternary.values.unique().tolist()) <= {-1, 0, 1}
    payload, _ = comp.compress(x, seed=9)
    unpacked = comp.unpack(payload, 1003)
    assert torch.equal(unpacked.values, ternary.values)
    assert torch.equal(unpacked.scaler, ternary.scaler)


def test_wire_sizes_of_a_million_fp32_elements() -> None:
    n = 2**20
    x = torch.randn(n)
    two_bit, _ = TernGrad().compress(x)
    assert two_bit.nbytes == n // 4 + 4 and two_bit.nbytes <= n / 4 * 1.01
    assert n * 4 / two_bit.nbytes >= 15.8
    base3, _ = TernGrad(packing="base3").compress(x)
    assert base3.nbytes == math.ceil(n / 5) + 4
    assert n * 4 / base3.nbytes >= 19


SHAPES = [(), (1,), (0,), (0, 5), (1023,), (2**20 + 7,), (17, 3, 5)]


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_any_shape_and_dtype(shape: tuple[int, ...], dtype: torch.dtype, packing: str) -> None:
    comp = TernGrad(packing=packing)  # type: ignore[arg-type]
    x = torch.randn(shape).to(dtype)
    state = torch.random.get_rng_state()
    payload, ctx = comp.compress(x, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # no global RNG
    out = comp.decompress(payload, ctx)
    assert out.shape == x.shape and out.dtype == dtype
    scaler = payload[1].to(dtype)
    assert bool(((out == 0) | (out.abs() == scaler)).all())
    again, _ = comp.compress(x, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(payload, again, strict=True))


def test_input_is_not_modified() -> None:
    x = torch.randn(100)
    before = x.clone()
    TernGrad(clip=None).compress(x)
    assert torch.equal(x, before)


def test_error_feedback_identity_with_terngrad() -> None:
    comp, mem = TernGrad(), ResidualMemory()
    for step in range(3):
        g = mem.compensate(0, torch.randn(500, generator=torch.Generator().manual_seed(step)))
        expected = g.clone()
        out = comp.decompress(*comp.compress(g, seed=step))
        mem.update(0, g, out)
        assert torch.equal(mem.residuals[0], expected - out)


def test_nan_raises_naming_the_key_via_the_memory() -> None:
    comp = TernGrad()
    bad = torch.tensor([1.0, float("nan")])
    with pytest.raises(CompressionError, match=r"'conv1\.weight' has 1 NaN"):
        comp.make_memory().compensate("conv1.weight", bad)
    with pytest.raises(CompressionError, match="NaN or Inf"):
        comp.compress(bad)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"clip": -1.0}, "finite number >= 0"),
        ({"clip": float("inf")}, "finite number >= 0"),
        ({"packing": "3bit"}, "expected '2bit' or 'base3'"),
    ],
)
def test_bad_options_say_what_is_allowed(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TernGrad(**options)  # type: ignore[arg-type]


def test_spec_round_trip_and_registry() -> None:
    for comp in (TernGrad(), TernGrad(clip=None, packing="base3"), TernGrad(clip=0.0)):
        assert gradzip.compressor(comp.spec()) == comp
    assert gradzip.compressor("terngrad:clip=none") == TernGrad(clip=None)
    assert TernGrad().reduction is gradzip.Reduction.GATHER


@pytest.mark.parametrize("share", [False, True])
def test_the_allgather_shares_the_scaler_only_when_asked(share: bool) -> None:
    # two ranks on one process: rank 1's gradient is 4x rank 0's. Its own scaler goes with
    # each payload (no MAX allreduce before the gather) unless share=True
    from gradzip.allreduce.backend import LocalBackend, ReduceOp
    from gradzip.allreduce.entry import Entry
    from gradzip.allreduce.strategy import compress_entries

    comp = gradzip.compressor("terngrad" + (":share=True" if share else ""))
    assert comp.gather_shares_stat() is share
    g = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    scalers, calls = [], []
    for grad in (g, 4 * g):
        backend = LocalBackend()
        plain = backend.allreduce

        def allreduce(t: torch.Tensor, op: ReduceOp = ReduceOp.SUM, plain=plain):  # type: ignore[no-untyped-def]
            calls.append(op)
            return plain(t.clone().fill_(float(4 * comp.shared_stat(g))), op)  # rank 1's max

        backend.allreduce = allreduce  # type: ignore[method-assign]
        (payload,), _ = compress_entries(backend, comp, [Entry("w", grad)], seed=0, step=0)
        scalers.append(float(payload[1]))
    own = [float(comp.shared_stat(g)), float(comp.shared_stat(4 * g))]
    assert scalers == (own[1:] * 2 if share else own)
    assert calls == ([ReduceOp.MAX] * 2 if share else [])
