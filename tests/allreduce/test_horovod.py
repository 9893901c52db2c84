"""HorovodBackend under a real ``horovodrun --gloo`` job (2 and 4 ranks on this machine).

The ranks check every collective's result themselves (tests/allreduce/horovod_worker.py);
this file launches them, then checks the byte counters they report, the error raised for
ranks that disagree on a size, and the timeout of a collective no peer joins.

Horovod is built by ``make horovod`` (a dependency of ``make test``): when it is missing these
tests fail, they do not skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.horovod

WORKER = Path(__file__).with_name("horovod_worker.py")
VENV_BIN = Path(sys.executable).parent


def require_horovod() -> Path:
    """The venv's horovodrun, or a test failure that says how to get it."""
    try:
        import horovod.torch  # noqa: F401
    except ImportError as e:
        pytest.fail(f"Horovod is not importable in {sys.executable} ({e}); run `make horovod`")
    run = VENV_BIN / "horovodrun"
    if not run.exists():
        pytest.fail(f"{run} is missing although horovod imports; run `make horovod`")
    return run


def run_job(np: int, out: Path) -> list[dict]:
    horovodrun = require_horovod()
    env = dict(
        os.environ,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    cmd = [
        str(horovodrun),
        "--gloo",
        "-np",
        str(np),
        "-H",
        f"localhost:{np}",
        "--gloo-timeout-seconds",
        "60",
        sys.executable,
        str(WORKER),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n--- output tail ---\n"
        f"{(proc.stdout + proc.stderr)[-6000:]}"
    )
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(np)]
    assert [res["rank"] for res in results] == list(range(np))
    assert all(res["size"] == np for res in results)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("np", [2, 4])
def test_collectives_under_horovodrun(np: int, tmp_path: Path) -> None:
    results = run_job(np, tmp_path)
    for r, res in enumerate(results):
        s = res["stats"]
        # the allgather is two: the per-rank sizes (one int64), then the data
        assert {k: v["calls"] for k, v in s.items()} == {
            "allreduce": 1,
            "allgather": 2,
            "alltoall": 1,
            "broadcast": 1,
        }
        # allreduce of 1000 float32: a ring sends 2(P-1)/P of it
        assert s["allreduce"]["bytes_in"] == 4000
        assert s["allreduce"]["bytes_sent"] == 2 * (np - 1) * 4000 // np
        # allgather of 100(r+1) bytes (+ 8 for the size): every other rank gets a copy, so it
        # grows with the world
        assert s["allgather"]["bytes_in"] == 100 * (r + 1) + 8
        assert s["allgather"]["bytes_sent"] == (np - 1) * (100 * (r + 1) + 8)
        # alltoall of float64 chunks of j+1 elements for rank j; its own chunk stays home
        total = 8 * sum(j + 1 for j in range(np))
        assert s["alltoall"]["bytes_in"] == total
        assert s["alltoall"]["bytes_sent"] == total - 8 * (r + 1)
        # broadcast of 1000 bytes: only the root sends
        assert s["broadcast"]["bytes_in"] == 1000
        assert s["broadcast"]["bytes_sent"] == (1000 if r == 0 else 0)
        # different sizes on different ranks: an error naming the collective, not a hang
        assert "Horovod allreduce 'gradzip.allreduce." in res["mismatch"], res["mismatch"]
        assert "shape" in res["mismatch"].lower(), res["mismatch"]
    assert "did not complete within 1 s" in results[0]["timeout"], results[0]["timeout"]


def test_timeout_must_be_positive() -> None:
    from gradzip.allreduce.horovod import HorovodBackend

    with pytest.raises(ValueError, match="timeout must be > 0 seconds, got 0"):
        HorovodBackend(timeout=0)


def test_missing_horovod_points_to_make(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradzip.allreduce.horovod import HorovodBackend

    monkeypatch.setitem(sys.modules, "horovod.torch", None)  # makes the import fail
    with pytest.raises(ImportError, match="make horovod"):
        HorovodBackend()
