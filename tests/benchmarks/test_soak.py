"""benchmarks/soak.py, short: the table has one row per compressor, error-feedback state is
measured where there is some, and the verdict columns are filled from real samples."""

from __future__ import annotations

import csv
from pathlib import Path

from benchmarks import soak


def test_short_soak_writes_its_table(tmp_path: Path) -> None:
    soak.main(["--steps", "40", "--every", "5", "--warmup", "10", "--specs", "none,onebit",
               "--out", str(tmp_path)])  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "soak.csv")))
    assert [r["compressor"] for r in rows] == ["none", "onebit"]
    none, onebit = rows
    assert none["state_norm_late_over_early"] == "no state" and float(none["state_MB"]) == 0
    assert float(onebit["state_MB"]) > 0 and float(onebit["state_norm_late_over_early"]) > 0
    assert float(onebit["grad_MB"]) > 4  # the 1.1M-parameter MLP
    assert all(r["ok"] in ("ok", "FAIL") for r in rows)
    assert "| onebit |" in (tmp_path / "soak.md").read_text()
