import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradzip
from gradzip.compress import CompressionError, NoMemory, ResidualMemory
from gradzip.compress import onebit as onebit_module
from gradzip.compress.onebit import OneBit
from gradzip.compress.packing import pack_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _reference_scales(x: torch.Tensor, comp: OneBit) -> torch.Tensor:
    """Per-group [mean of >= 0, mean of < 0] in fp64, straight from the definition."""
    flat = x.reshape(-1).double()
    n = flat.numel()
    if comp.columns and x.dim() >= 2 and x.shape[0] >= comp.min_rows:
        groups = list(flat.view(x.shape[0], -1).T)
    else:
        groups = [flat[i : i + comp.bucket_size] for i in range(0, n, comp.bucket_size)]
    out = []
    for g in groups:
        pos, neg = g[g >= 0], g[g < 0]
        out += [pos.mean() if pos.numel() else 0.0, neg.mean() if neg.numel() else 0.0]
    return torch.tensor(out, dtype=torch.float64)


def _check_against_definition(x: torch.Tensor, comp: OneBit) -> None:
    payload, ctx = comp.compress(x)
    packed, scales = payload
    assert torch.equal(packed, pack_bits(x.reshape(-1) < 0, 1))
    ref = _reference_scales(x, comp)
    # fp32 rounding of a mean of fp32 values: a few ulps of the largest magnitude in the group
    tol = 4 * torch.finfo(torch.float32).eps * float(x.abs().max()) if x.numel() else 0.0
    torch.testing.assert_close(scales.double(), ref, rtol=1e-6, atol=tol)
    out = comp.decompress(payload, ctx)
    # every element is rebuilt as exactly one of its group's two scales
    bits = (x.reshape(-1) < 0).long()
    if comp.columns and x.dim() >= 2 and x.shape[0] >= comp.min_rows:
        group = torch.arange(x.numel()) % (x.numel() // x.shape[0])
    else:
        group = torch.arange(x.numel()) // comp.bucket_size
    assert torch.equal(out.reshape(-1), scales[2 * group + bits])


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 30),
    chunk=st.sampled_from([8, 64, 1 << 16]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31),
)
def test_columns_are_per_column_means(
    rows: int, cols: int, chunk: int, scale: float, seed: int
) -> None:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onebit_module, "_CHUNK", chunk)  # exercise multi-chunk sweeps too
        _check_against_definition(x, OneBit(min_rows=1))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 300),
    bucket=st.sampled_from([8, 16, 40, 8192]),
    chunk=st.sampled_from([8, 1 << 16]),
    seed=st.integers(0, 2**31),
)
def test_flat_buckets_are_per_bucket_means(n: int, bucket: int, chunk: int, seed: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onebit_module, "_CHUNK", chunk)
        _check_against_definition(x, OneBit(bucket_size=bucket))


def test_short_columns_fall_back_to_flat_buckets() -> None:
    x = torch.randn(8, 50)  # 8 rows < min_rows (4096): scales would cost more than signs
    payload, _ = OneBit(bucket_size=16).compress(x)
    assert payload[1].numel() == 2 * math.ceil(400 / 16)
    payload, _ = OneBit(min_rows=8).compress(x)
    assert payload[1].numel() == 2 * 50


def test_default_keeps_the_ratio_of_a_typical_linear_layer() -> None:
    # a (128, 3136) Linear weight: per-column scales would cost 64 bits per 128 sign bits
    x = torch.randn(128, 3136)
    payload, _ = OneBit().compress(x)
    assert x.numel() * 4 / payload.nbytes >= 31.0
    payload, _ = OneBit(min_rows=128).compress(x)  # the paper's per-column layout, on request
    assert payload[1].numel() == 2 * 3136


def test_wire_size_of_a_million_fp32_elements() -> None:
    n = 2**20
    payload, _ = OneBit().compress(torch.randn(n))
    assert payload.nbytes <= math.ceil(n / 8) * 1.01
    assert n * 4 / payload.nbytes >= 31


@pytest.mark.parametrize("chunk", [8, 1 << 16])
@pytest.mark.parametrize("shape", [(1000,), (70, 9), (64, 3, 2, 2), (), (0,)])
def test_fused_feedback_matches_unfused_steps(shape: tuple[int, ...], chunk: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onebit_module, "_CHUNK", chunk)
    monkeypatch.setenv("GRADZIP_NUMBA", "0")  # the torch sweep: same sums as compress()
    comp = OneBit(bucket_size=64)
    fused, plain = ResidualMemory(), ResidualMemory()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(shape, generator=gen)
        compensated = plain.compensate("w", grad)
        expected = compensated.clone()
        payload, ctx = comp.compress(compensated)
        decompressed = comp.decompress(payload, ctx)
        plain.update("w", compensated, decompressed)
        assert torch.equal(plain.residuals["w"], expected - decompressed)
        fused_payload, _ = comp.compress_with_feedback(fused, "w", grad)
        for a, b in zip(fused_payload, payload, strict=True):
            assert torch.equal(a, b)
        # the fused residual is exactly compensated - decompressed, one rounding per element
        assert torch.equal(fused.residuals["w"], plain.residuals["w"])
        assert fused.residuals["w"].shape == torch.Size(shape)


def test_feedback_with_half_precision_and_non_contiguous_grads() -> None:
    comp, mem = OneBit(), ResidualMemory()
    base = torch.randn(100, 70)
    for dtype in (torch.float16, torch.bfloat16):
        grad = base.to(dtype).T  # non-contiguous, 70 rows
        old = mem.residuals.get("w", torch.zeros(70, 100)).clone()
        payload, ctx = comp.compress_with_feedback(mem, "w", grad)
        assert ctx.dtype == dtype
        # the residual is taken against the fp32 decoded values, as in the unfused steps
        # (where the compressor sees the fp32 compensated tensor)
        decompressed = comp.decompress(payload, ctx._replace(dtype=torch.float32))
        assert torch.equal(mem.residuals["w"], (old + grad.float()) - decompressed)


def test_feedback_without_residual_memory_uses_the_plain_steps() -> None:
    comp = OneBit()
    x = torch.randn(300)
    payload, _ = comp.compress_with_feedback(NoMemory(), "w", x)
    for a, b in zip(payload, comp.compress(x)[0], strict=True):
        assert torch.equal(a, b)


def test_nan_names_the_key_and_keeps_the_residual() -> None:
    comp, mem = OneBit(), ResidualMemory()
    comp.compress_with_feedback(mem, "fc.weight", torch.randn(20))
    before = mem.residuals["fc.weight"].clone()
    bad = torch.randn(20)
    bad[3] = float("nan")
    with pytest.raises(CompressionError, match=r"'fc.weight' has 1 NaN"):
        comp.compress_with_feedback(mem, "fc.weight", bad)
    assert torch.equal(mem.residuals["fc.weight"], before)
    with pytest.raises(CompressionError, match=r"'fc\.weight'"):
        mem.compensate("fc.weight", bad)
    with pytest.raises(CompressionError, match="NaN or Inf"):
        comp.compress(bad)


SHAPES = [(), (1,), (0,), (0, 5), (1023,), (2**20 + 7,), (65, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_any_shape_and_dtype(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    comp = OneBit()
    x = torch.randn(shape).to(dtype)
    state = torch.random.get_rng_state()
    payload, ctx = comp.compress(x, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    out = comp.decompress(payload, ctx)
    assert out.shape == x.shape and out.dtype == dtype
    assert payload[0].dtype == torch.uint8 and payload[1].dtype == torch.float32
    assert payload[0].numel() == math.ceil(x.numel() / 8)
    if x.numel():  # the signs survive, and the scale of each side has the right sign
        assert torch.equal(out.float() < 0, x.float() < 0)
    again, _ = comp.compress(x, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(payload, again, strict=True))


def test_non_contiguous_input_equals_its_contiguous_copy() -> None:
    x = torch.randn(90, 70).T[::2]  # 35 x 90, strided
    assert not x.is_contiguous()
    comp = OneBit(min_rows=8)
    for a, b in zip(comp.compress(x)[0], comp.compress(x.contiguous())[0], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bucket_size": 12}, "positive multiple of 8"),
        ({"bucket_size": 0}, "positive multiple of 8"),
        ({"min_rows": 0}, "integer >= 1"),
        ({"columns": "yes"}, "True or False"),
    ],
)
def test_bad_options_say_what_is_allowed(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OneBit(**options)  # type: ignore[arg-type]


def test_spec_round_trip_and_registry() -> None:
    comp = gradzip.compressor("onebit:bucket_size=64,columns=false")
    assert comp == OneBit(bucket_size=64, columns=False)
    assert gradzip.compressor(comp.spec()) == comp
    assert comp.reduction is gradzip.Reduction.GATHER
    assert OneBit().error_feedback and isinstance(OneBit().make_memory(), ResidualMemory)
