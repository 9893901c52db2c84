"""Every compressor trains through DistributedOptimizer on real data (2 gloo ranks).

An MLP learns a Fashion-MNIST subset (each rank its half); after a fixed number of SGD steps
the test loss must fall below a threshold that plain (uncompressed) SGD also reaches, and the
parameters must be bit-identical on both ranks after every step.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dist_utils import run_ranks
from opt_workers import same_on_all_ranks

import gradzip
from gradzip.allreduce.backend import Backend

P, BATCH, STEPS, N_TRAIN, N_TEST = 2, 32, 64, 2048, 1000
#: the test loss plain SGD gets below in STEPS steps (it starts at about 2.3)
THRESHOLD = 0.85
SPECS = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "onebit": ("onebit", {"gather": "scatter_gather"}),
    "qsgd": ("qsgd", {}),
    "terngrad": ("terngrad", {}),
    "topk": ("topk:ratio=0.01", {}),
    "dgc": ("dgc:ratio=0.01,warmup_epochs=1", {}),
}
EPOCH = N_TRAIN // P // BATCH


def _train(backend: Backend, data: Any, names: list[str]) -> dict[str, Any]:
    (x, y), (tx, ty) = data
    xs, ys = x[backend.rank :: backend.size], y[backend.rank :: backend.size]
    out = {}
    for name in names:
        spec, kw = SPECS[name]
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = gradzip.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model.named_parameters(),
            compression=spec,
            backend=backend,
            **kw,
            dense_steps=0,
        )
        same = []
        for step in range(STEPS):
            if step % EPOCH == 0:
                opt.set_epoch(step // EPOCH)
            lo = step * BATCH % len(xs)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[lo : lo + BATCH]), ys[lo : lo + BATCH]).backward()
            opt.step()
            same.append(same_on_all_ranks(backend, model))
        with torch.no_grad():
            loss = nn.functional.cross_entropy(model(tx), ty).item()
        out[name] = {"loss": loss, "same": same, "plan": opt.compression_plan()}
    return out


@pytest.fixture(scope="module")
def trained() -> list[dict[str, Any]]:
    from benchmarks.data import load_fashion_mnist

    train = load_fashion_mnist("train", limit=N_TRAIN)
    test = load_fashion_mnist("test", limit=N_TEST)
    data = ((train.x, train.y), (test.x, test.y))
    names = [n for n, (spec, _) in SPECS.items() if spec.split(":")[0] in gradzip.available()]
    return run_ranks(_train, P, data, names, timeout_s=240)


@pytest.mark.parametrize("name", list(SPECS))
def test_compressor_trains_below_plain_sgd_threshold(
    trained: list[dict[str, Any]], name: str
) -> None:
    assert trained[0]["none"]["loss"] < THRESHOLD  # the threshold is one plain SGD reaches
    if name not in trained[0]:
        pytest.skip(f"compressor {name!r} is not registered (gradzip/compress/{name}.py)")
    for r in trained:
        assert r[name]["same"] == [True] * STEPS
        assert r[name]["loss"] < THRESHOLD, r[name]["loss"]
    spec = SPECS[name][0]
    assert trained[0][name]["plan"]["1.weight"] == gradzip.compressor(spec).spec() or (
        name == "dgc"  # DGC's world_size is filled in for its clipping scale
    )
    assert trained[0][name]["plan"]["3.bias"] == "none"  # small tensors stay dense
