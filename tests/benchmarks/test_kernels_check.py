"""benchmarks/kernels_check (the GPU acceptance script) runs and passes under the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, interpret: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GRADZIP_KERNELS")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.kernels_check", "--device", "cpu", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def test_every_check_passes_on_the_interpreted_kernels() -> None:
    proc = _run("--sizes", "1023", "--dtypes", "bf16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "6 of 6 checks passed on cpu"
    assert sum(line.startswith("ok ") for line in lines) == 6


def test_cpu_without_the_interpreter_is_refused() -> None:
    proc = _run("--sizes", "1", interpret=False)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr
