"""The figures of the network benchmark, from a made-up worker result, and its CLI checks."""

from __future__ import annotations

import math

import pytest

import benchmarks.netns as netns
from benchmarks import network
from benchmarks.network import HEADERS, main, rows


def _method(name: str, step_s: float, ratio: float, accs: list[float]) -> dict[str, object]:
    curve = [(10 * (i + 1), step_s * 10 * (i + 1), a) for i, a in enumerate(accs)]
    return {"method": name, "step_s": step_s, "ratio": ratio, "bytes_per_step": 400e3 / ratio,
            "curve": curve}  # fmt: skip


def _result() -> dict[str, object]:
    return {
        "compute_s": 0.06,
        "comm_s": 0.04,
        "methods": [
            _method("none", 0.10, 1.0, [0.5, 0.7, 0.8]),
            {**_method("onebit", 0.08, 32.0, [0.6, 0.81, 0.82]), "predicted_s": 0.09},
            _method("topk", 0.07, 100.0, [0.4, 0.6, 0.7]),
            {"method": "qsgd", "skipped": "not registered"},
        ],
    }


def test_rows_follow_the_definitions() -> None:
    table, target = rows(_result())
    assert target == 0.8
    by_name = {r[0]: dict(zip(HEADERS, r, strict=True)) for r in table}
    assert by_name["none"]["speedup"] == 1.0 and by_name["none"]["efficiency"] == 1.0
    one = by_name["onebit"]
    ideal = (0.06 + 0.04) / (0.06 + 0.04 / 32)
    assert math.isclose(one["ideal"], ideal)
    assert math.isclose(one["speedup"], 0.10 / 0.08)
    assert math.isclose(one["efficiency"], (0.10 / 0.08) / ideal)
    # reached 0.81 >= 0.8 at the second evaluation, after 20 steps of 0.08 s
    assert math.isclose(one["time to target s"], 1.6)
    assert by_name["topk"]["time to target s"] == "not reached"
    assert by_name["qsgd"]["time to target s"] == "skipped"
    assert [r[0] for r in table] == ["none", "onebit", "topk", "qsgd"]
    assert math.isclose(one["predicted ms"], 90.0)
    assert math.isclose(one["model error %"], 100 * (0.09 - 0.08) / 0.08)
    assert by_name["topk"]["predicted ms"] == "n/a" == by_name["qsgd"]["model error %"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "1"], "--workers=1"),
        (["--steps", "5"], "--steps=5"),
        (["--compressors", "fp16", "none"], "first method must be 'none'"),
    ],
)
def test_bad_options_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_not_root_is_explained(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert main(["--steps", "20"]) == 2
    assert "needs root" in capsys.readouterr().err


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--steps", "--workers", "--rate", "--compressors", "--delay"):
        assert option in out
    assert "--rank" not in out  # the worker's options stay hidden
    assert network.ALIASES["dgc"] in out
