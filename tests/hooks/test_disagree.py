"""Ranks that disagree on their configuration fail on the first step, on every rank, at once.

Rank 1 differs from rank 0 in one thing at a time. The optimizer: the compressor spec, the
fusion size, the parameter set, the dense steps, the backward passes per step, the dtype of
the model, the strategy and the non-finite policy. The DDP hook: the compressor, the dense
steps, the strategy, the non-finite policy and the dtype (DDP itself checks the parameter
shapes when it is built and hands every rank rank 0's bucket layout when it rebuilds). Each
case must raise on both ranks within seconds (the process group's timeout is 20 s), naming
the setting or tensor that differs.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "allreduce"))

from dist_utils import RankError, run_ranks

import gradzip
from gradzip.allreduce.backend import Backend

# case -> (rank 0's options, rank 1's options, what the message must show)
OPT_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "compressor": ({}, {"compression": "topk:ratio=0.1"}, r"onebit.*topk:ratio=0\.1"),
    "fusion size": ({}, {"fusion_bytes": 8192}, r"'fusion_bytes=4096' against 'fusion_bytes=8192'"),
    "parameter set": ({}, {"extra": True}, r"key 'extra\.weight'|'extra\.weight'"),
    "dense steps": ({}, {"dense_steps": 2}, r"'dense_steps=0' against 'dense_steps=2'"),
    "backward passes": (
        {},
        {"backward_passes_per_step": 2},
        r"'backward_passes_per_step=1' against 'backward_passes_per_step=2'",
    ),
    "dtype": ({}, {"dtype": torch.bfloat16}, r"torch\.float32.*torch\.bfloat16"),
    "strategy": (
        {"gather": "allgather"},
        {"gather": "scatter_gather"},
        r"'gather=allgather' against 'gather=scatter_gather'",
    ),
    "nonfinite": ({}, {"nonfinite": "raise"}, r"'nonfinite=propagate' against 'nonfinite=raise'"),
}
HOOK_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "compressor": ({}, {"compression": "topk:ratio=0.1"}, r"compression=onebit.*compression=topk"),
    "dense steps": ({}, {"dense_steps": 2}, r"'dense_steps=0' against 'dense_steps=2'"),
    "strategy": (
        {"gather": "allgather"},
        {"gather": "scatter_gather"},
        r"'gather=allgather' against 'gather=scatter_gather'",
    ),
    "nonfinite": ({}, {"nonfinite": "raise"}, r"'nonfinite=propagate' against 'nonfinite=raise'"),
    # the model's dtype shows in the bucket (DDP itself gives every rank rank 0's bucket
    # layout when it rebuilds, so another bucket_cap_mb cannot make ranks disagree)
    "dtype": ({}, {"dtype": torch.float64}, r"torch\.float32.*torch\.float64|float64"),
}


class Net(nn.Module):
    def __init__(self, extra: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 4)
        self.extra = nn.Linear(48, 48) if extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h if self.extra is None else h + self.extra(h))


def _optimizer(backend: Backend, case: str) -> str:
    mine = OPT_CASES[case][backend.rank]
    kw = {"compression": "onebit", "fusion_bytes": 4096, "dense_steps": 0, **mine}
    extra, dtype = kw.pop("extra", False), kw.pop("dtype", torch.float32)
    model = Net(extra).to(dtype)
    opt = gradzip.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
        backend=backend, min_compress_numel=0, **kw,
    )  # fmt: skip
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 16, dtype=dtype)).square().mean().backward()
        opt.step()
    return "no error"


def _hook(backend: Backend, case: str) -> str:
    from torch.nn.parallel import DistributedDataParallel

    from gradzip.hooks.ddp import DDPHookState, compressed_hook

    mine = HOOK_CASES[case][backend.rank]
    kw = {"compression": "onebit", **mine}
    dtype = kw.pop("dtype", torch.float32)
    model = DistributedDataParallel(Net(False).to(dtype), bucket_cap_mb=0.01)
    state = DDPHookState(backend=backend, **{"dense_steps": 0, **kw})
    model.register_comm_hook(state, compressed_hook)
    for _ in range(3):
        model(torch.randn(8, 16, dtype=dtype)).square().mean().backward()
    return "no error"


def _check(fn: Any, case: str, pattern: str) -> None:
    start = time.monotonic()
    errors = run_ranks(fn, 2, case, expect_errors=True, pg_timeout_s=20, timeout_s=60)
    took = time.monotonic() - start
    assert took < 15, took  # an error at once, not a wait for the timeout
    for e in errors:
        assert isinstance(e, RankError) and e.kind == "CompressionError", (case, e)
        assert "ranks disagree" in e.message, e.message
    assert any(re.search(pattern, e.message) for e in errors), [e.message for e in errors]


@pytest.mark.parametrize("case", list(OPT_CASES))
def test_optimizer_ranks_that_disagree_fail_on_the_first_step(case: str) -> None:
    _check(_optimizer, case, OPT_CASES[case][2])


@pytest.mark.parametrize("case", list(HOOK_CASES))
def test_ddp_hook_ranks_that_disagree_fail_on_the_first_step(case: str) -> None:
    _check(_hook, case, HOOK_CASES[case][2])
