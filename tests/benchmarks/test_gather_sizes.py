"""``benchmarks/gather_sizes.py`` on a tiny run: 2 gloo ranks, two bucket sizes, a few reps."""

from __future__ import annotations

from pathlib import Path

from benchmarks import gather_sizes


def test_tiny_run_writes_one_row_per_size(tmp_path: Path) -> None:
    out = tmp_path / "g.md"
    assert gather_sizes.main(["--ranks", "2", "--reps", "2", "--sizes", "64", "4096",
                              "--out", str(out)]) == 0  # fmt: skip
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["64", "4096"]
    for r in rows[1:]:
        same, exchange, ratio = (float(c) for c in r.split("|")[2:5])
        assert same > 0 and exchange > 0 and abs(ratio - same / exchange) < 0.05
