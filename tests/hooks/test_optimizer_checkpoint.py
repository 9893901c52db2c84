"""Checkpoints resume exactly: K steps, save on every rank, restore in *fresh* processes,
M more steps == K + M uninterrupted steps, bit for bit (stochastic compressors use the same
seed; the step counter that seeds them is part of the state). Plus the broadcast helpers.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "allreduce"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import run_ranks
from opt_workers import Net, batch, flat, loss_of

import gradzip
from gradzip.allreduce.backend import Backend

P, K, M = 2, 3, 3
SPECS = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "topk": ("topk:ratio=0.1", {}),
    "dgc": ("dgc:ratio=0.1,warmup_epochs=2", {}),
    "onebit": ("onebit", {"gather": "scatter_gather"}),  # server-side residuals too
    "qsgd": ("qsgd", {}),
    "terngrad": ("terngrad", {}),
}


def _build(
    backend: Backend, name: str, init_seed: int, correction: bool | None = None
) -> tuple[Net, Any]:
    spec, kw = SPECS[name]
    torch.manual_seed(init_seed)
    model = Net()
    momentum = 0.0 if name == "dgc" else 0.9  # DGC brings its own momentum
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    opt = gradzip.DistributedOptimizer(
        base,
        model.named_parameters(),
        compression=spec,
        backend=backend,
        min_compress_numel=64,
        seed=7,
        momentum_correction=correction,
        **kw,
        dense_steps=0,
    )
    opt.set_epoch(0)
    return model, opt


def _steps(backend: Backend, model: Net, opt: Any, steps: range) -> None:
    for step in steps:
        if step == K:
            opt.set_epoch(1)
        opt.zero_grad()
        loss_of(model, *batch(step, backend.rank)).backward()
        opt.step()


def _path(folder: str, name: str, rank: int) -> str:
    return str(Path(folder) / f"{name}-rank{rank}.pt")


def _first(backend: Backend, folder: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Uninterrupted K + M steps, saving a checkpoint after K."""
    out = {}
    for name in names:
        model, opt = _build(backend, name, init_seed=0)
        _steps(backend, model, opt, range(K))
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict()},
            _path(folder, name, backend.rank),
        )
        _steps(backend, model, opt, range(K, K + M))
        out[name] = flat(model)
    return out


def _resumed(backend: Backend, folder: str, names: list[str]) -> dict[str, Any]:
    """Fresh processes: a different init, then the checkpoint, then M steps."""
    out: dict[str, Any] = {}
    for name in names:
        model, opt = _build(backend, name, init_seed=1)
        state = torch.load(_path(folder, name, backend.rank), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        _steps(backend, model, opt, range(K, K + M))
        out[name] = flat(model)
    # broadcast helpers: rank-dependent init and optimizer state become rank 0's
    # (momentum left in the optimizer, so that its momentum buffers are what is broadcast)
    model, opt = _build(backend, "topk", init_seed=10 + backend.rank, correction=False)
    gradzip.broadcast_parameters(model.state_dict(), root_rank=0, backend=backend)
    out["bcast_params"] = flat(model)
    _steps(backend, model, opt, range(1))  # every rank now has momentum buffers
    for s in opt.state.values():  # ... made to differ from rank to rank
        s["momentum_buffer"].add_(float(backend.rank + 1))
    residuals = opt.state_dict()["gradzip"]["memories"]
    gradzip.broadcast_optimizer_state(opt, root_rank=0)
    after = opt.state_dict()
    out["bcast_momentum"] = torch.cat(
        [s["momentum_buffer"].reshape(-1) for s in after["state"].values()]
    )
    out["bcast_residuals_kept"] = str(after["gradzip"]["memories"]) == str(residuals)
    return out


@pytest.fixture(scope="module")
def runs() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    names = [n for n, (spec, _) in SPECS.items() if spec.split(":")[0] in gradzip.available()]
    with tempfile.TemporaryDirectory() as folder:
        first = run_ranks(_first, P, folder, names, timeout_s=120)
        second = run_ranks(_resumed, P, folder, names, timeout_s=120)
    return first, second


@pytest.mark.parametrize("name", list(SPECS))
def test_resume_equals_uninterrupted(runs: Any, name: str) -> None:
    first, second = runs
    if name not in first[0]:
        pytest.skip(f"compressor {name!r} is not registered (gradzip/compress/{name}.py)")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a[name], b[name])
    assert torch.equal(first[0][name], first[1][name])


def test_broadcast_helpers(runs: Any) -> None:
    _, second = runs
    assert torch.equal(second[0]["bcast_params"], second[1]["bcast_params"])
    assert torch.equal(second[0]["bcast_momentum"], second[1]["bcast_momentum"])
    assert second[1]["bcast_residuals_kept"]
