"""Faults under the real launchers: a rank SIGKILLed under ``torchrun`` (gloo) and
``horovodrun --gloo`` makes the surviving rank raise a PeerLost naming the collective and that a
peer is gone, and the job ends within seconds instead of hanging; ``torchrun --max-restarts 1``
with a checkpoint every 2 steps and a rank killed between two checkpoints resumes (residuals,
DGC state, step counters) and ends with the parameters of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("launcher_worker.py")
BIN = Path(sys.executable).parent
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")


def _launch(launcher: str, out: Path, *args: str, restarts: int = 0) -> tuple[int, float]:
    out.mkdir(parents=True, exist_ok=True)
    if launcher == "torch":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"]
        cmd += ["--max-restarts", str(restarts), "--monitor-interval", "0.5"]
        cmd += [str(WORKER), str(out), "--launcher", "torch", *args]
    else:
        cmd = [str(BIN / "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2"]
        cmd += ["--gloo-timeout-seconds", "30", sys.executable, str(WORKER), str(out)]
        cmd += ["--launcher", "horovod", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    (out / "log").write_text(proc.stdout + proc.stderr)
    return proc.returncode, time.monotonic() - start


def _result(out: Path, rank: int, attempt: int = 0) -> dict[str, Any]:
    return json.loads((out / f"rank{rank}-attempt{attempt}.json").read_text())


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "launcher, where",
    [("torch", "backward"), ("torch", "collective"), ("torch", "between"),
     ("horovod", "backward"), ("horovod", "between")],
)  # fmt: skip
def test_a_killed_rank_ends_the_job_with_a_peer_lost_error(
    tmp_path: Path, launcher: str, where: str
) -> None:
    if launcher == "horovod" and not (BIN / "horovodrun").exists():
        pytest.fail(f"{BIN / 'horovodrun'} is missing; run `make horovod`")
    rc, took = _launch(launcher, tmp_path, "--kill", where)
    log = (tmp_path / "log").read_text()
    assert rc != 0 and took < 60, (rc, took, log[-3000:])
    survivor = _result(tmp_path, 0)
    assert survivor["kind"] == "PeerLost", (survivor, log[-3000:])
    assert "a peer is gone" in survivor["message"]
    killed = float((tmp_path / "killed").read_text())
    assert survivor["at"] - killed < 20  # within the configured timeout (20 s)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec", ["onebit", "dgc:ratio=0.05", "qsgd"])
def test_torchrun_restart_from_checkpoints_equals_an_uninterrupted_run(
    tmp_path: Path, spec: str
) -> None:
    rc, _ = _launch("torch", tmp_path / "plain", "--compression", spec, "--checkpoint-every", "2")
    assert rc == 0, (tmp_path / "plain" / "log").read_text()[-3000:]
    rc, _ = _launch(
        "torch", tmp_path / "crash", "--compression", spec, "--checkpoint-every", "2",
        "--kill", "between", restarts=1,
    )  # fmt: skip
    log = (tmp_path / "crash" / "log").read_text()
    assert rc == 0, log[-3000:]
    for rank in (0, 1):
        resumed = _result(tmp_path / "crash", rank, attempt=1)
        assert resumed["start"] == 2 and resumed["kind"] is None, resumed  # from ckpt of step 1
        assert resumed["params"] == _result(tmp_path / "plain", rank)["params"], spec
