"""SFB in the optimizer path on 2 gloo ranks: factors instead of weight gradients where the
cost model says they are cheaper, dense elsewhere; training equals dense training up to
float rounding, with fewer bytes sent.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "allreduce"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import run_ranks
from opt_workers import flat, same_on_all_ranks

import gradzip
from gradzip.allreduce.backend import Backend, LocalBackend
from gradzip.compress.base import CompressionError

P, STEPS, B = 2, 4, 4


class Wide(nn.Module):
    """fc1 sees a 3-D input (B x 2 x 64), fc2 is called twice, fc3 is too narrow for SFB."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 3)
        self.tied = tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu(self.fc1(x), inplace=True).mean(1)
        h = torch.tanh(self.fc2(torch.relu(self.fc2(h))))
        if self.tied:  # the weight is used outside fc2's forward: factors cannot explain it
            h = h + 0.1 * nn.functional.linear(h, self.fc2.weight)
        return self.fc3(h)


def _data(step: int, rank: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + 10 * rank + micro)
    return torch.randn(B, 2, 64, generator=gen), torch.randn(B, 3, generator=gen)


def _train(backend: Backend, compression: Any, passes: int = 1, amp: bool = False) -> Any:
    torch.manual_seed(0)
    model = Wide()
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = gradzip.DistributedOptimizer(
        base,
        compression=compression,
        backend=backend,
        model=model,
        backward_passes_per_step=passes,
        min_compress_numel=0,
        dense_steps=0,
    )
    before = backend.stats.bytes_sent
    same = []
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(passes):
            x, y = _data(step, backend.rank, micro)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = (model(x) - y).square().mean()
            loss.backward()
        opt.step()
        same.append(same_on_all_ranks(backend, model))
    sent = backend.stats.bytes_sent - before
    return {"params": flat(model), "plan": opt.compression_plan(), "sent": sent, "same": same}


def _tied(backend: Backend) -> str:
    torch.manual_seed(0)
    model = Wide(tied=True)
    opt = gradzip.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        compression="sfb",
        backend=backend,
        model=model,
        dense_steps=0,
    )
    x, y = _data(0, backend.rank)
    try:
        (model(x) - y).square().mean().backward()
        opt.step()
    except CompressionError as e:
        return str(e)
    return "no error"


def _all(backend: Backend) -> dict[str, Any]:
    return {
        "dense": _train(backend, "none"),
        "sfb": _train(backend, "sfb"),
        "dense2": _train(backend, "none", passes=2),
        "sfb2": _train(backend, "sfb", passes=2),
        "dense_amp": _train(backend, "none", amp=True),
        "sfb_amp": _train(backend, "sfb", amp=True),
        "mixed": _train(backend, {"fc1.weight": "sfb", "fc2.weight": "fp16"}),
        "tied": _tied(backend),
    }


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return run_ranks(_all, P, timeout_s=120)


@pytest.mark.parametrize(("dense", "sfb"), [("dense", "sfb"), ("dense2", "sfb2")])
def test_sfb_matches_dense_training(runs: list[dict[str, Any]], dense: str, sfb: str) -> None:
    for r in runs:
        torch.testing.assert_close(r[sfb]["params"], r[dense]["params"], rtol=1e-5, atol=1e-6)
        assert all(r[sfb]["same"])
        assert r[sfb]["sent"] < r[dense]["sent"] / 2
        plan = r[sfb]["plan"]
        assert plan["fc1.weight"] == plan["fc2.weight"] == "sfb"
        # 2 ranks x B rows x (128 + 3) is not below 2 x 128 x 3: the cost model says dense
        assert plan["fc3.weight"] == "none"
        assert plan["fc1.bias"] == "none"


def test_sfb_under_autocast_matches_up_to_bf16_rounding(runs: list[dict[str, Any]]) -> None:
    for r in runs:
        got, want = r["sfb_amp"]["params"], r["dense_amp"]["params"]
        moved = (r["dense"]["params"] - want).norm()
        assert (got - want).norm() < 0.05 * moved + 1e-3
        assert all(r["sfb_amp"]["same"])


def test_per_layer_choice(runs: list[dict[str, Any]]) -> None:
    for r in runs:
        plan = r["mixed"]["plan"]
        assert plan["fc1.weight"] == "sfb" and plan["fc2.weight"] == "fp16"
        assert plan["fc3.weight"] == "none"
        torch.testing.assert_close(r["mixed"]["params"], r["dense"]["params"], rtol=0, atol=2e-3)


def test_weight_used_outside_its_layer_fails_clearly(runs: list[dict[str, Any]]) -> None:
    for r in runs:
        assert "fc2.weight" in r["tied"] and "tied weights" in r["tied"]


def test_sfb_needs_the_model() -> None:
    model = Wide()
    with pytest.raises(CompressionError, match="pass model="):
        gradzip.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model.named_parameters(),
            compression="sfb",
            backend=LocalBackend(),
            dense_steps=0,
        )


def test_sfb_never_pays_in_a_world_of_one() -> None:
    model = Wide()
    opt = gradzip.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        compression="sfb",
        backend=LocalBackend(),
        model=model,
        min_compress_numel=0,
        dense_steps=0,
    )
    (model(torch.randn(2, 2, 64)).sum()).backward()
    opt.step()
    assert set(opt.compression_plan().values()) == {"none"}
