"""benchmarks/train_check.py (the first part of scripts/gpu_check.sh) on the CPU: every
compressor through the optimizer and the DDP hook on 2 spawned gloo ranks, plain and with fp16
AMP and an injected Inf; every check must pass, and a broken one must show as FAIL."""

from __future__ import annotations

import subprocess
from pathlib import Path

from benchmarks import train_check


def test_every_check_passes_on_the_cpu(tmp_path: Path) -> None:
    assert train_check.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "train_check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| gloo")]
    # 11 labels x (optimizer, hook) x (fp32, AMP), minus SFB's two hook rows
    assert len(rows) == len(train_check.SPECS) * 4 - 2
    assert all("| ok |" in r for r in rows)
    assert "feedback state kept: True" in table


def test_a_failing_check_is_reported(tmp_path: Path) -> None:
    assert train_check.main(["--device", "cpu", "--out", str(tmp_path), "--specs", "nosuch"]) == 1
    assert "| FAIL |" in (tmp_path / "train_check.md").read_text()


def test_gpu_script_parses() -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
