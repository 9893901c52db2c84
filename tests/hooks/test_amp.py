"""fp16 mixed precision with GradScaler at its default scale, on 2 and 4 gloo ranks.

Every rank trains with ``torch.autocast("cpu", dtype=torch.float16)`` and
``torch.amp.GradScaler("cpu")`` (initial scale 2**16, as users start), the loop exactly as
without gradzip (``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``). At
step :data:`BAD` rank 1 alone gets an Inf in one gradient. What must hold, for the optimizer
and the DDP hook, with every compressor: no exception; every rank skips that step (parameters
unchanged, the scale backed off on every rank); every error-feedback state (residuals, DGC's
momenta and velocities, scatter-gather's server residuals) after the skipped step equals the
state before it; replicas identical after every step; and with ``none`` the parameters equal
those of plain DDP + GradScaler on the same data.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "allreduce"))

from dist_utils import run_ranks

import gradzip
from gradzip.allreduce.backend import Backend

STEPS, BAD, BAD_RANK = 6, 3, 1
OPT_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "onebit": ("onebit", {"gather": "allgather"}),  # the default at 2 ranks only
    "onebit scatter_gather": ("onebit", {"gather": "scatter_gather"}),
    "qsgd": ("qsgd", {}),
    "terngrad": ("terngrad", {}),
    "topk": ("topk:ratio=0.05", {}),
    "topk recursive": ("topk:ratio=0.05", {"sparse": "recursive"}),
    "dgc": ("dgc:ratio=0.05,warmup_epochs=0", {}),
    "sfb": ("sfb", {}),
}
HOOK_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "onebit": ("onebit", {"gather": "allgather"}),  # the default at 2 ranks only
    "onebit scatter_gather": ("onebit", {"gather": "scatter_gather"}),
    "qsgd": ("qsgd", {}),
    "topk": ("topk:ratio=0.05", {}),
    "dgc": ("dgc:ratio=0.05,warmup_epochs=0", {}),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _inject(model: nn.Module, rank: int, step: list[int]) -> None:
    """An Inf in the first layer's weight gradient on BAD_RANK at step BAD (before any
    gradzip hook sees the accumulated gradient)."""

    def hook(g: torch.Tensor) -> torch.Tensor:
        if rank == BAD_RANK and step[0] == BAD:
            g = g.clone()
            g[0, 0] = float("inf")
        return g

    model[0].weight.register_hook(hook)  # type: ignore[index]


def _state(state: Any) -> Any:
    """A deep copy of tensors in nested dicts/lists (to compare states across steps)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_state(v) for v in state)
    return state


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _loop(backend: Backend, model: nn.Module, forward: Any, opt: Any, snap: Any) -> dict[str, Any]:
    """The user's AMP loop; records what every step did."""
    step = [0]
    _inject(model, backend.rank, step)
    scaler = torch.amp.GradScaler("cpu")
    gen = torch.Generator().manual_seed(10 + backend.rank)
    out: dict[str, Any] = {"params": [], "scales": [], "skipped": [], "state_kept": None}
    for s in range(STEPS):
        step[0] = s
        x, y = torch.randn(16, 32, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        before, state_before = _flat(model), _state(snap())
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(forward(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        out["params"].append(_flat(model))
        out["scales"].append(scaler.get_scale())
        out["skipped"].append(torch.equal(before, _flat(model)))
        if s == BAD:
            out["state_kept"] = _equal(state_before, _state(snap()))
    return out


def _optimizer(backend: Backend, spec: str, kw: dict[str, Any]) -> dict[str, Any]:
    model = _model()
    momentum = 0.0 if spec.startswith("dgc") else 0.9
    opt = gradzip.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum),
        model.named_parameters(), compression=spec, backend=backend, model=model,
        min_compress_numel=0, fusion_bytes=8192, **kw,
        dense_steps=0,
    )  # fmt: skip

    def snap() -> Any:  # the error-feedback state (not the step counter, which moves on)
        state = opt.state_dict()["gradzip"]
        return {"memories": state["memories"], "strategies": state["strategies"]}

    return _loop(backend, model, model, opt, snap)


def _ddp(backend: Backend, spec: str | None, kw: dict[str, Any]) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    from gradzip.hooks.ddp import DDPHookState, compressed_hook

    model = _model()
    momentum = 0.0 if spec is not None and spec.startswith("dgc") else 0.9
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.01)
    state = None
    if spec is not None:
        state = DDPHookState(spec, backend=backend, optimizer=opt, **{"dense_steps": 0, **kw})
        ddp.register_comm_hook(state, compressed_hook)

    def snap() -> Any:
        if state is None:
            return {}
        return {"memory": state.memory.state_dict(), "strategy": state.strategy.state_dict()}

    return _loop(backend, model, ddp, opt, snap)


def _all(backend: Backend) -> dict[str, Any]:
    return {
        "plain": _ddp(backend, None, {}),
        "opt": {label: _optimizer(backend, spec, kw) for label, (spec, kw) in OPT_RUNS.items()},
        "hook": {label: _ddp(backend, spec, kw) for label, (spec, kw) in HOOK_RUNS.items()},
    }


@pytest.fixture(scope="module", params=[2, 4])
def runs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return run_ranks(_all, request.param, timeout_s=300)


@pytest.mark.parametrize("where", ["opt", "hook"])
def test_an_inf_on_one_rank_skips_the_step_everywhere_and_keeps_feedback_state(
    runs: list[dict[str, Any]], where: str
) -> None:
    for label in runs[0][where]:
        for r in runs:
            got = r[where][label]
            assert got["skipped"][BAD], (label, r["plain"]["scales"])  # params unchanged
            assert got["scales"][BAD] < got["scales"][BAD - 1] or got["skipped"][BAD - 1]
            assert got["state_kept"], label  # every error-feedback state as before the step
            assert got["scales"] == runs[0][where][label]["scales"]  # same skips on all ranks
            for s in range(STEPS):  # replicas identical after every step
                assert torch.equal(got["params"][s], runs[0][where][label]["params"][s]), label
        assert not all(runs[0][where][label]["skipped"]), label  # it did train


@pytest.mark.parametrize("where", ["opt", "hook"])
def test_none_with_gradscaler_equals_plain_ddp(runs: list[dict[str, Any]], where: str) -> None:
    for r in runs:
        plain, none = r["plain"], r[where]["none"]
        assert none["scales"] == plain["scales"] and none["skipped"] == plain["skipped"]
        for a, b in zip(none["params"], plain["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_is_finite_sees_every_nan_and_inf_and_no_overflow() -> None:
    from gradzip.hooks.pipeline import is_finite

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.ones(1000, dtype=dtype)
        assert is_finite(t) and is_finite(torch.empty(0, dtype=dtype))
        for bad in (float("nan"), float("inf"), -float("inf")):
            u = t.clone()
            u[637] = bad
            assert not is_finite(u), (dtype, bad)
        huge = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)  # the sum overflows
        assert is_finite(huge), dtype
        both = torch.tensor([float("inf"), -float("inf")], dtype=dtype)  # the sum is NaN
        assert not is_finite(both)
