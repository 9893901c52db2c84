"""The examples run as their users would start them, for a few steps, on real Fashion-MNIST.

``examples/ddp_mnist.py`` under ``torchrun`` (``python -m torch.distributed.run``) and
``examples/horovod_mnist.py`` under ``horovodrun --gloo``, 2 ranks each. The checks read what
rank 0 prints: every logged loss finite, the loss falling from the first logged step to the
last, a final loss and a test accuracy well above chance.

Horovod is built by ``make horovod`` (a dependency of ``make test``): when it is missing the
Horovod example fails, it does not skip.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
STEPS = ["--steps", "30", "--log-every", "10", "--dense-steps", "10"]  # compressed from step 11
FIRST_LOSS = math.log(10)  # cross-entropy of a uniform guess over 10 classes

pytestmark = pytest.mark.slow  # two process launches each (torch import, rendezvous)


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{out[-4000:]}"
    return out


def _check_training(out: str) -> None:
    losses = [float(v) for v in re.findall(r"step \d+ loss (\S+)", out)]
    assert len(losses) == 4, f"expected losses at steps 1, 10, 20, 30:\n{out[-3000:]}"
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[0] == pytest.approx(FIRST_LOSS, abs=0.2), losses
    assert losses[-1] < 0.8 * losses[0], f"loss did not fall: {losses}"
    final = re.search(r"final loss (\S+)", out)
    accuracy = re.search(r"test accuracy (\S+) after 30 steps", out)
    assert final is not None and float(final.group(1)) == losses[-1], out[-3000:]
    assert accuracy is not None and float(accuracy.group(1)) > 0.25, out[-3000:]


def test_ddp_example() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _check_training(_run([*cmd, "examples/ddp_mnist.py", *STEPS]))


@pytest.mark.horovod
def test_horovod_example() -> None:
    horovodrun = VENV_BIN / "horovodrun"
    if not horovodrun.exists():
        pytest.fail(f"{horovodrun} is missing; run `make horovod`")
    cmd = [str(horovodrun), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable]
    _check_training(_run([*cmd, "examples/horovod_mnist.py", *STEPS]))
