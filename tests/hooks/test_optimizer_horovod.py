"""gradzip.DistributedOptimizer under a real ``horovodrun --gloo -np 2`` job: with
``compression="none"`` it trains exactly as ``hvd.DistributedOptimizer`` (a branch used by
one rank at a time included), and a lossy compressor keeps the ranks identical.

Horovod is built by ``make horovod``: when it is missing this test fails, it does not skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.horovod

WORKER = Path(__file__).with_name("horovod_opt_worker.py")
VENV_BIN = Path(sys.executable).parent


def test_none_equals_horovod_distributed_optimizer(tmp_path: Path) -> None:
    horovodrun = VENV_BIN / "horovodrun"
    if not horovodrun.exists():
        pytest.fail(f"{horovodrun} is missing; run `make horovod`")
    env = dict(
        os.environ,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        OMP_NUM_THREADS="1",
    )
    cmd = [
        str(horovodrun),
        "--gloo",
        "-np",
        "2",
        "-H",
        "localhost:2",
        "--gloo-timeout-seconds",
        "60",
        sys.executable,
        str(WORKER),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["size"] == 2
        assert res["backend"] == "HorovodBackend"
        assert res["equal"], res["max_diff"]
    assert results[0]["topk_digests"] == results[1]["topk_digests"]
