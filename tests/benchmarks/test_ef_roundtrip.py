"""benchmarks/ef_roundtrip.py: paired timing, the floor and a small run."""

import pytest

import gradzip
from benchmarks.ef_roundtrip import floor, paired_times, run


def test_paired_times_alternate_base_and_fn() -> None:
    calls: list[str] = []
    base_t, fn_t = paired_times(lambda: calls.append("f"), lambda: calls.append("b"), 3, warmup=1)
    assert calls == ["b", "f"] * 4  # one warm-up pair, then three timed pairs
    assert len(base_t) == len(fn_t) == 3 and min(base_t + fn_t) >= 0
    with pytest.raises(ValueError, match="repeats=0"):
        paired_times(lambda: None, lambda: None, 0)


def test_floor_counts_state_payload_and_result() -> None:
    n = 1000
    # 1-bit: read g, read+write the residual, the payload twice, the dense result
    assert floor(gradzip.compressor("onebit"), n, 125) == pytest.approx(
        (4 * n + 8 * n + 250 + 4 * n) / (8 * n))
    # TernGrad (no residual) reads the gradient twice; DGC keeps two state tensors
    assert floor(gradzip.compressor("terngrad"), n, 250) == pytest.approx(
        (8 * n + 500 + 4 * n) / (8 * n))
    assert floor(gradzip.compressor("dgc"), n, 8) == pytest.approx(
        (4 * n + 16 * n + 16 + 4 * n) / (8 * n))


def test_a_small_run_gives_one_row_per_size_and_spec() -> None:
    rows = run([10], ["onebit", "terngrad"], repeats=2)
    assert [r[:2] for r in rows] == [["2**10", "onebit"], ["2**10", "terngrad"]]
    for row in rows:
        clone_ms, trip_ms, ratio_min, ratio_med = row[2:6]
        assert clone_ms > 0 and trip_ms > 0 and ratio_min > 0 and ratio_med > 0
        assert row[7] == "" and row[8] == ""  # targets apply at 2**22 only
