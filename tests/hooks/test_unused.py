"""Unused parameters under every compressor and strategy, the fused 1-bit path included.

A branch of the model is used by some ranks only, step by step. The reference is the same run
in which the ranks that skip the branch add ``0 * branch(h)`` to their output, so their
gradient of it exists and is zero: gradzip must count a missing gradient as exactly that
(error feedback included), with identical replicas. A final step in which no rank uses the
branch leaves its ``.grad`` None and its error-feedback state untouched.
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

RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "onebit": ("onebit", {"gather": "allgather"}),  # the default at 2 ranks only
    "onebit scatter_gather": ("onebit", {"gather": "scatter_gather"}),
    "qsgd": ("qsgd", {}),
    "qsgd scatter_gather": ("qsgd", {"gather": "scatter_gather"}),
    "terngrad": ("terngrad", {}),
    "terngrad ternary_sum": ("terngrad", {"gather": "ternary_sum"}),
    "topk": ("topk:ratio=0.05", {}),
    "topk recursive": ("topk:ratio=0.05", {"sparse": "recursive"}),
    "dgc": ("dgc:ratio=0.05,warmup_epochs=0", {}),
    "onebit dense_steps": ("onebit", {"dense_steps": 1}),
}
# which ranks use the branch at each step (rank r uses it when r % 3 in the set)
USES = [{0}, {1}, {0, 1, 2}, {1, 2}, {0}]  # some rank uses it at every step


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 40)
        self.branch = nn.Linear(40, 40)
        self.fc2 = nn.Linear(40, 4)

    def forward(self, x: torch.Tensor, use: bool, zero: bool) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if use:
            h = h + self.branch(h)
        elif zero:  # the reference: a gradient of exact zeros instead of none
            h = h + 0.0 * self.branch(h)
        return self.fc2(h)


def _run(backend: Backend, spec: str, kw: dict[str, Any], zero: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net()
    momentum = 0.0 if spec.startswith("dgc") else 0.9
    opt = gradzip.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum),
        model.named_parameters(), compression=spec, backend=backend,
        min_compress_numel=0, fusion_bytes=4096, **{"dense_steps": 0, **kw},
    )  # fmt: skip
    gen = torch.Generator().manual_seed(backend.rank)
    for uses in USES:
        opt.zero_grad()
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        use = backend.rank % 3 in uses
        (model(x, use, zero) - y).square().mean().backward()
        opt.step()
    state = opt.state_dict()["gradzip"]
    before = {k: v for k, v in state["memories"].items() if k.startswith("branch")}
    opt.zero_grad()
    x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
    (model(x, False, False) - y).square().mean().backward()  # no rank uses it
    grad_none = model.branch.weight.grad is None
    opt.step()
    after = {k: v for k, v in opt.state_dict()["gradzip"]["memories"].items() if k in before}
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"params": params, "grad_none": grad_none, "kept": _equal(before, after)}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _all(backend: Backend) -> dict[str, Any]:
    out = {}
    for label, (spec, kw) in RUNS.items():
        if "ternary_sum" in label and backend.size > 2:
            continue
        out[label] = (_run(backend, spec, kw, zero=False), _run(backend, spec, kw, zero=True))
    return out


@pytest.mark.parametrize("ranks", [2, 3])
def test_missing_gradients_count_as_zeros(ranks: int) -> None:
    runs = run_ranks(_all, ranks, timeout_s=300)
    for label in runs[0]:
        for r in runs:
            missing, zeros = r[label]
            assert torch.equal(missing["params"], zeros["params"]), label
            assert torch.equal(missing["params"], runs[0][label][0]["params"]), label
            assert missing["grad_none"] and missing["kept"], label
