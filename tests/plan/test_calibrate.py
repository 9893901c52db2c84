"""Calibration: the fit, the rates cache, and a link measured identically on every rank."""

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "allreduce"))
from dist_utils import run_ranks

from gradzip import compressor
from gradzip.allreduce.backend import Backend, LocalBackend
from gradzip.plan import calibrate
from gradzip.plan.model import Link, Rates


def test_fit_line_recovers_a_line_and_never_goes_negative() -> None:
    a, b = calibrate.fit_line([1.0, 2.0, 3.0], [5.0, 7.0, 9.0])
    assert (a, b) == pytest.approx((3.0, 2.0))
    a, b = calibrate.fit_line([1.0, 2.0], [3.0, 1.0])  # falling: the slope is clipped at 0
    assert b == 0.0 and a == pytest.approx(2.0)
    with pytest.raises(ValueError, match="two points"):
        calibrate.fit_line([1.0], [1.0])


def test_rates_are_measured_once_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADZIP_CACHE", str(tmp_path))
    calls: list[str] = []
    real = calibrate.measure_rates

    def counting(comp: Any, **kw: Any) -> Rates:
        calls.append(comp.spec())
        return real(comp, numels=(1 << 10, 1 << 18), repeats=3, **kw)

    monkeypatch.setattr(calibrate, "measure_rates", counting)
    first = calibrate.cached_rates("onebit")
    again = calibrate.cached_rates("onebit")
    assert first == again and len(calls) == 1
    assert first.compress_byte > 0 and first.decompress_byte >= 0
    assert first.compress_call >= 0 and first.decompress_call >= 0
    table = json.loads((tmp_path / "plan-rates.json").read_text())
    assert len(table) == 1 and next(iter(table)).endswith("|" + compressor("onebit").spec())
    calibrate.cached_rates("onebit", refresh=True)
    assert len(calls) == 2
    # rates of other compression code are not reused
    monkeypatch.setattr(calibrate, "code_digest", lambda: "0123456789abcdef")
    calibrate.cached_rates("onebit")
    assert len(calls) == 3


def test_round_trip_sends_and_sums_one_payload() -> None:
    grad = torch.randn(5000)
    trip = calibrate.RoundTrip(compressor("topk", ratio=0.1), grad)
    out = trip()
    assert out.shape == (5000,) and int((out != 0).sum()) == 500
    assert torch.equal(out[out != 0], grad[out != 0])  # top-k sends values exactly


def _link(backend: Backend) -> Link:
    return calibrate.measure_link(backend, sizes=(64, 1 << 18, 1 << 22), repeats=3)


def test_a_measured_link_is_the_same_on_every_rank() -> None:
    links = run_ranks(_link, 2, timeout_s=120)
    assert links[0] == links[1]
    assert links[0].alpha >= 0 and links[0].beta > 0
    assert links[0].reduce_beta is not None and links[0].reduce_beta >= 0
    assert calibrate.measure_link(LocalBackend()) == Link(0.0, 0.0)
