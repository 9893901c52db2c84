"""A dead peer: a rank SIGKILLed in backward, inside a collective or between steps makes every
surviving rank raise a PeerLost within the timeout, naming the collective, the bucket and that
a peer is gone; nothing hangs. The optimizer (onebit, topk, none) and the DDP hook, on 3 forked
gloo ranks; every test bounds its own time."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "allreduce"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import run_ranks
from fault_points import WHERE, arm, between

import gradzip
from gradzip.allreduce.backend import Backend

VICTIM, AT, TIMEOUT = 2, 2, 15.0


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


def _train(backend: Backend, where: str, spec: str, hook: bool, stamp: str) -> dict[str, Any]:
    model = _model()
    opt: Any = torch.optim.SGD(model.parameters(), lr=0.05)
    forward: Any = model
    if hook:
        from torch.nn.parallel import DistributedDataParallel

        from gradzip.hooks.ddp import DDPHookState, compressed_hook

        forward = DistributedDataParallel(model, bucket_cap_mb=0.005)
        state = DDPHookState(spec, backend=backend, dense_steps=0)
        forward.register_comm_hook(state, compressed_hook)
    else:
        opt = gradzip.DistributedOptimizer(
            opt, model.named_parameters(), compression=spec, backend=backend,
            min_compress_numel=0, fusion_bytes=4096,
            dense_steps=0,
        )  # fmt: skip
    step = [0]
    if backend.rank == VICTIM:
        arm(model, backend, where, step, AT, stamp)
    try:
        for s in range(6):
            step[0] = s
            opt.zero_grad()
            forward(torch.randn(8, 16)).square().mean().backward()
            opt.step()
            if backend.rank == VICTIM:
                between(where, s, AT, stamp)
    except Exception as e:  # what a survivor raised, and when
        return {"kind": type(e).__name__, "message": str(e), "at": time.time(), "step": step[0]}
    return {"kind": None, "message": "finished", "at": time.time(), "step": step[0]}


def survivors(where: str, spec: str, hook: bool) -> list[dict[str, Any]]:
    """What ranks 0 and 1 raised when rank 2 died at ``where``; ``"after"``: seconds from the
    victim's death to the survivor's error."""
    with tempfile.TemporaryDirectory() as tmp:
        stamp = str(Path(tmp) / "killed")
        start = time.monotonic()
        got = run_ranks(
            _train, 3, where, spec, hook, stamp,
            dead={VICTIM}, pg_timeout_s=TIMEOUT, timeout_s=60,
        )  # fmt: skip
        took = time.monotonic() - start
        killed = float(Path(stamp).read_text())
    assert took < TIMEOUT + 20, took
    return [{**g, "after": g["at"] - killed} for g in got[:VICTIM]]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("spec", ["onebit", "topk:ratio=0.05", "none"])
def test_optimizer_survivors_raise_naming_the_collective_and_bucket(where: str, spec: str) -> None:
    for err in survivors(where, spec, hook=False):
        assert err["kind"] == "PeerLost", err
        assert "a peer is gone" in err["message"], err
        assert "bucket" in err["message"] or "flags of step" in err["message"], err
        assert any(k in err["message"] for k in ("allreduce", "allgather", "alltoall")), err
        # a collective the victim issued before it died may still complete on the others
        steps = {"backward": (AT,), "collective": (AT, AT + 1), "between": (AT + 1,)}[where]
        assert err["step"] in steps and err["after"] < TIMEOUT, err


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["backward", "between"])
def test_ddp_hook_survivors_raise_naming_the_bucket(where: str) -> None:
    for err in survivors(where, "onebit", hook=True):
        assert err["kind"] == "PeerLost", err
        assert "a peer is gone" in err["message"] and "DDP bucket" in err["message"], err
        assert err["after"] < TIMEOUT, err


def _silent_peer(backend: Backend, hook: bool) -> dict[str, Any]:
    """Rank 1 stays alive but does not join the first step for 8 s; gradzip's own group was
    built with ``timeout=2``, so rank 0 must raise after about 2 s."""
    model = _model()
    opt: Any = torch.optim.SGD(model.parameters(), lr=0.05)
    forward: Any = model
    if hook:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, bucket_cap_mb=0.005)
        forward.register_comm_hook(*gradzip.ddp_comm_hook("onebit", timeout=2.0, dense_steps=0))
    else:
        opt = gradzip.DistributedOptimizer(
            opt, model.named_parameters(), compression="onebit", timeout=2.0, dense_steps=0
        )
    if backend.rank == 1:
        time.sleep(8)
        return {"kind": None, "took": 0.0}
    start = time.monotonic()
    try:
        forward(torch.randn(8, 16)).square().mean().backward()
        opt.step()
    except Exception as e:
        return {"kind": type(e).__name__, "message": str(e), "took": time.monotonic() - start}
    return {"kind": None, "took": time.monotonic() - start}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("hook", [False, True])
def test_timeout_is_honoured_for_a_peer_that_never_joins(hook: bool) -> None:
    got = run_ranks(_silent_peer, 2, hook, pg_timeout_s=30, timeout_s=60)[0]
    assert got["kind"] == "PeerLost" and "timeout of 2 s" in got["message"], got
    assert 1.5 < got["took"] < 6, got  # gradzip's 2 s, not the process group's 30 s
