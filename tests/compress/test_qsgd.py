import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradzip
from gradzip.compress import CompressionError, ResidualMemory
from gradzip.compress.qsgd import QSGD, elias_decode, elias_encode

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mean_over_seeds(comp: QSGD, x: torch.Tensor, seeds: int) -> torch.Tensor:
    total = torch.zeros_like(x, dtype=torch.float64)
    for seed in range(seeds):
        payload, ctx = comp.compress(x, seed=seed)
        total += comp.decompress(payload, ctx).double()
    return total / seeds


@pytest.mark.parametrize("norm", ["l2", "max"])
@pytest.mark.parametrize("levels", [1, 4])
def test_unbiased_within_the_quantizer_variance(norm: str, levels: int) -> None:
    comp = QSGD(levels=levels, bucket_size=16, norm=norm)  # type: ignore[arg-type]
    x = torch.randn(48, generator=torch.Generator().manual_seed(7))
    seeds = 600
    mean = _mean_over_seeds(comp, x, seeds)
    # each element is step * (floor(a) + Bernoulli(p)): variance step^2 p (1 - p)
    v = x.view(-1, 16).double()
    norms = v.norm(dim=1) if norm == "l2" else v.abs().amax(dim=1)
    step = (norms / levels).repeat_interleave(16)
    a = x.double().abs() / step
    p = a - a.floor()
    sigma = step * torch.sqrt(p * (1 - p) / seeds)
    err = (mean - x.double()).abs()
    assert bool((err <= 5 * sigma + 1e-6 * step).all()), float((err / (sigma + 1e-12)).max())
    # and the test has teeth: deterministic rounding would be off by far more than that
    biased = (a.round() * step * x.sign()).double()
    assert bool(((biased - x.double()).abs() > 5 * sigma + 1e-6 * step).any())


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 600),
    levels=st.integers(1, 127),
    bucket=st.integers(1, 200),
    seed=st.integers(0, 2**40),
)
def test_fixed_width_and_elias_decode_to_the_same_values(
    n: int, levels: int, bucket: int, seed: int
) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed % 1000))
    fixed, elias = QSGD(levels, bucket), QSGD(levels, bucket, elias=True)
    p_fixed, ctx = fixed.compress(x, seed=seed)
    p_elias, _ = elias.compress(x, seed=seed)
    assert torch.equal(fixed.decompress(p_fixed, ctx), elias.decompress(p_elias, ctx))
    bits = math.ceil(math.log2(levels + 1)) + 1
    assert fixed.bits == bits
    assert p_fixed.nbytes == math.ceil(n * bits / 8) + 4 * math.ceil(n / bucket)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 127), st.booleans()), max_size=200))
def test_elias_gamma_round_trip(codes: list[tuple[int, bool]]) -> None:
    levels = torch.tensor([c[0] for c in codes], dtype=torch.uint8)
    negative = torch.tensor([c[1] and c[0] > 0 for c in codes], dtype=torch.bool)
    stream = elias_encode(levels, negative)
    # gamma code of level+1: 2*floor(log2(level+1)) + 1 bits, plus a sign bit if level > 0
    lengths = [2 * int(math.log2(c[0] + 1)) + 1 + (c[0] > 0) for c in codes]
    assert stream.numel() == sum(lengths)
    padded = torch.cat([stream, torch.zeros(5, dtype=torch.uint8)])  # byte padding
    got_levels, got_negative = elias_decode(padded, len(codes))
    assert torch.equal(got_levels, levels.long())
    assert torch.equal(got_negative, negative)


def test_truncated_elias_stream_is_an_error() -> None:
    levels = torch.tensor([5, 9, 3], dtype=torch.uint8)
    stream = elias_encode(levels, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(CompressionError, match="does not hold 3 codes"):
        elias_decode(stream[:-2], 3)


def test_elias_is_smaller_for_typical_gradients() -> None:
    x = torch.randn(2**14, generator=torch.Generator().manual_seed(0))
    fixed, _ = QSGD().compress(x, seed=1)
    elias, _ = QSGD(elias=True).compress(x, seed=1)
    assert elias.nbytes < 0.7 * fixed.nbytes


def test_wire_size_of_a_million_fp32_elements() -> None:
    n = 2**20
    payload, _ = QSGD(levels=7, bucket_size=512).compress(torch.randn(n))
    assert payload.nbytes == n * 4 // 8 + 4 * (n // 512)  # 4-bit codes + one norm per bucket
    assert n * 4 / payload.nbytes > 7.8


def test_max_norm_keeps_the_largest_element_exactly() -> None:
    x = torch.tensor([0.5, -2.0, 1.0, 0.25])
    comp = QSGD(levels=4, bucket_size=4, norm="max")
    for seed in range(5):
        out = comp.decompress(*comp.compress(x, seed=seed))
        assert float(out[1]) == -2.0 and bool((out.abs() <= 2.0).all())
        assert float(out[2]) == 1.0  # a = 2 levels exactly: no randomness


def test_zero_bucket_stays_zero() -> None:
    x = torch.cat([torch.zeros(8), torch.randn(8)])
    out = QSGD(bucket_size=8).decompress(*QSGD(bucket_size=8).compress(x))
    assert torch.equal(out[:8], torch.zeros(8))


SHAPES = [(), (1,), (0,), (0, 5), (1023,), (2**20 + 7,), (17, 3, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_any_shape_and_dtype(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    comp = QSGD()
    x = torch.randn(shape).to(dtype)
    state = torch.random.get_rng_state()
    payload, ctx = comp.compress(x, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)  # no global RNG
    out = comp.decompress(payload, ctx)
    assert out.shape == x.shape and out.dtype == dtype
    again, _ = comp.compress(x, seed=11)
    assert all(torch.equal(a, b) for a, b in zip(payload, again, strict=True))
    if x.numel() > 100:
        other, _ = comp.compress(x, seed=12)
        assert not torch.equal(other[0], payload[0])


def test_non_contiguous_input_equals_its_contiguous_copy() -> None:
    x = torch.randn(40, 30).T[:, ::3]
    comp = QSGD(bucket_size=32)
    for a, b in zip(comp.compress(x, seed=3)[0], comp.compress(x.contiguous(), seed=3)[0],
                    strict=True):
        assert torch.equal(a, b)


def test_error_feedback_identity_with_qsgd() -> None:
    comp, mem = QSGD(levels=2), ResidualMemory()
    for step in range(3):
        g = mem.compensate("w", torch.randn(700, generator=torch.Generator().manual_seed(step)))
        expected = g.clone()
        out = comp.decompress(*comp.compress(g, seed=step))
        mem.update("w", g, out)
        assert torch.equal(mem.residuals["w"], expected - out)


def test_nan_raises_naming_the_key_via_the_memory() -> None:
    comp = QSGD()
    bad = torch.tensor([1.0, float("inf"), 2.0])
    with pytest.raises(CompressionError, match=r"'layer1\.bias' has 0 NaN and 1 Inf"):
        comp.make_memory().compensate("layer1.bias", bad)
    with pytest.raises(CompressionError, match="NaN or Inf"):
        comp.compress(bad)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"levels": 0}, r"levels=0: expected an integer in 1\.\.127"),
        ({"levels": 128}, r"in 1\.\.127"),
        ({"bucket_size": 0}, r"integer in 1\.\.2\*\*62"),
        ({"norm": "l1"}, "expected 'l2' or 'max'"),
        ({"elias": "no"}, "True or False"),
    ],
)
def test_bad_options_say_what_is_allowed(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QSGD(**options)  # type: ignore[arg-type]
    spec = "qsgd:" + ",".join(f"{k}={v}" for k, v in options.items())
    if "elias" not in options:
        with pytest.raises(ValueError, match=message):
            gradzip.compressor(spec)


def test_spec_round_trip_and_registry() -> None:
    assert gradzip.compressor("qsgd:levels=16") == gradzip.compressor("qsgd", levels=16)
    comp = QSGD(levels=3, bucket_size=100, norm="max", elias=True)
    assert gradzip.compressor(comp.spec()) == comp
    assert comp.reduction is gradzip.Reduction.GATHER
