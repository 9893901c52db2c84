"""Bad input, fuzzed: specs, tensors and payloads. Whatever comes in, a compressor either works
or raises a ValueError (CompressionError is one) that says what was wrong: never another
exception, a crash, a hang, or a decompressed tensor from a payload that does not fit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradzip
from gradzip.compress.base import Payload

NAMES = gradzip.available()
SPECS = [
    "none",
    "fp16",
    "bf16",
    "onebit",
    "onebit:min_rows=1",
    "qsgd",
    "qsgd:levels=3,bucket_size=64",
    "terngrad",
    "terngrad:packing=base3",
    "topk:ratio=0.1",
    "dgc:ratio=0.1",
    "sfb",
]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_WORDS = "ratio levels bucket_size packing min_rows base3 x true none nan inf".split()
_NUMBERS = ["-1", "0", "1e308", "1.5", "0.0", "99999999999999999999"]
_piece = st.sampled_from([*NAMES, "zip", "", " ", ":", ",", "=", "=,", "::", *_WORDS, *_NUMBERS])


@FUZZ
@given(st.lists(_piece, min_size=1, max_size=8).map("".join))
def test_any_spec_string_builds_or_is_a_value_error(spec: str) -> None:
    try:
        c = gradzip.compressor(spec)
    except ValueError as e:
        assert str(e), spec  # a message, naming what was wrong
        return
    assert gradzip.compressor(c.spec()) == c  # what it built round-trips


_NAMES = st.sampled_from(["qsgd", "terngrad", "topk", "dgc", "onebit"])
_OPTIONS = st.sampled_from(
    ["levels", "bucket_size", "ratio", "clip", "min_rows", "momentum", "sample_ratio"]
)
_VALUES = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.booleans(), st.text(max_size=5)
)


@FUZZ
@given(_NAMES, _OPTIONS, _VALUES)
def test_any_option_value_is_taken_or_refused_with_a_value_error(
    name: str, option: str, value: Any
) -> None:
    try:
        c = gradzip.compressor(name, **{option: value})
    except (ValueError, TypeError) as e:  # TypeError: a non-number where a number is due
        assert option in str(e) or name in str(e) or "option" in str(e), str(e)
        return
    x = torch.randn(300)
    c.decompress(*c.compress(x)) if c.reduction.name != "FACTORS" else None


def _bad_tensors() -> dict[str, torch.Tensor]:
    base = torch.randn(12, 10)
    return {
        "float64": base.double(),
        "int64": base.long(),
        "int8": base.to(torch.int8),
        "bool": base > 0,
        "complex": torch.complex(base, base),
        "sparse": base.to_sparse(),
        "meta": torch.empty(12, 10, device="meta"),
    }


def _good_tensors() -> dict[str, torch.Tensor]:
    base = torch.randn(12, 10)
    return {
        "0-d": torch.tensor(3.5),
        "empty": torch.empty(0),
        "empty 2-d": torch.empty(0, 7),
        "non-contiguous": base.t(),
        "strided": base[:, ::3],
        "fp16": base.half(),
        "bf16": base.bfloat16(),
        "one element": torch.tensor([-2.0]),
    }


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.startswith("sfb")])
@pytest.mark.parametrize("kind", list(_bad_tensors()))
def test_unsupported_tensors_raise_a_compression_error_naming_the_dtype(
    spec: str, kind: str
) -> None:
    c = gradzip.compressor(spec)
    t = _bad_tensors()[kind]
    with pytest.raises(gradzip.CompressionError) as info:
        c.compress(t)
    message = str(info.value)
    assert (
        str(t.dtype).split(".")[-1] in message
        or t.layout is not torch.strided
        or (t.device.type == "meta" and "meta" in message)
    ), message


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.startswith("sfb")])
@pytest.mark.parametrize("kind", list(_good_tensors()))
def test_odd_but_valid_tensors_round_trip(spec: str, kind: str) -> None:
    c = gradzip.compressor(spec)
    t = _good_tensors()[kind]
    payload, ctx = c.compress(t)
    out = c.decompress(payload, ctx)
    assert out.shape == t.shape and out.dtype == t.dtype, (out.shape, out.dtype)
    assert bool(torch.isfinite(out).all())


def _mutations(payload: Payload) -> dict[str, Payload]:
    parts = list(payload.tensors)
    out: dict[str, Payload] = {}

    def swap(i: int, part: torch.Tensor) -> Payload:
        return Payload((*parts[:i], part, *parts[i + 1 :]))

    for i, p in enumerate(parts):
        if p.numel():
            out[f"part {i} one short"] = swap(i, p[:-1])
        extra = p[:1] if p.numel() else torch.zeros(1, dtype=p.dtype)
        out[f"part {i} one long"] = swap(i, torch.cat([p, extra]))
        other = torch.float64 if p.dtype != torch.float64 else torch.int16
        out[f"part {i} as {other}"] = swap(i, p.to(other))
    out["a part missing"] = Payload(tuple(parts[:-1]))
    out["a part too many"] = Payload((*parts, torch.zeros(3)))
    return out


@pytest.mark.parametrize(
    "spec", [s for s in SPECS if not s.startswith(("sfb", "none", "fp16", "bf16"))]
)
def test_payloads_that_do_not_fit_their_ctx_are_refused(spec: str) -> None:
    c = gradzip.compressor(spec)
    payload, ctx = c.compress(torch.randn(40, 33))
    for what, bad in _mutations(payload).items():
        try:
            out = c.decompress(bad, ctx)
        except ValueError as e:  # CompressionError included
            assert str(e), what
            continue
        raise AssertionError(f"{spec}: a payload with {what} decompressed to {tuple(out.shape)}")


@pytest.mark.parametrize("spec", ["none", "fp16", "bf16"])
def test_dense_payloads_that_do_not_fit_are_refused(spec: str) -> None:
    c = gradzip.compressor(spec)
    payload, ctx = c.compress(torch.randn(40, 33))
    for what, bad in _mutations(payload).items():
        if "as torch" in what:
            continue  # another float dtype of the right size is a valid cast
        with pytest.raises(ValueError):
            c.decompress(bad, ctx)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_the_optimizer_names_a_parameter_it_cannot_reduce(dtype: torch.dtype) -> None:
    from gradzip.allreduce.backend import LocalBackend

    good, bad = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3).to(dtype))
    with pytest.raises(gradzip.CompressionError, match=f"parameter 'bad' .*{dtype!s}"):
        gradzip.DistributedOptimizer(
            torch.optim.SGD([good, bad], lr=0.1), [("good", good), ("bad", bad)],
            backend=LocalBackend(),
            dense_steps=0,
        )  # fmt: skip
