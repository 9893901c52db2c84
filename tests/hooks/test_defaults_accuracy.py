"""The defaults keep dense accuracy: a short user-style training, every compressor as it ships.

Two gloo ranks train an MLP on a Fashion-MNIST subset as a user's script would: SGD with
momentum 0.9 and a cosine schedule, the optimizer wrapped with ``compression=<name>`` and
nothing else (DGC: the optimizer without momentum, as its docstring asks). Plain DDP
trains the same model from the same weights on the same batches. Every compressor must end
within 1 pp of DDP's accuracy on the 10,000 test images. The run goes on until DDP has
converged (500 steps of 64 images over a 2,000-image subset: 16 epochs), so it measures the
accuracy reached, not how fast: in a shorter run (400 steps over 4,000 images) compressors
that hold gradient back still lag by about 1 pp (top-k and DGC, measured with these
defaults). Seeded, so the result is the same on every run; an accuracy test, not a timed
one.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "allreduce"))

from dist_utils import run_ranks

import gradzip
from benchmarks.data import load_image_dataset
from gradzip.allreduce.backend import Backend

COMPRESSORS = ("none", "fp16", "onebit", "qsgd", "terngrad", "topk", "dgc", "sfb")
STEPS, BATCH, LR = 500, 32, 0.05
TRAIN, TEST = 2000, 10000


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def _train(backend: Backend, method: str) -> float:
    torch.set_num_threads(1)
    train = load_image_dataset("train", TRAIN)
    test = load_image_dataset("test", TEST)
    model = _model()
    dgc = method.startswith("dgc")
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0 if dgc else 0.9)
    if method == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        module: nn.Module = DistributedDataParallel(model)
        opt: Any = base
    else:
        module = model
        opt = gradzip.DistributedOptimizer(
            base, model.named_parameters(), compression=method, backend=backend, model=model
        )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(TRAIN, generator=gen)
    per_epoch = TRAIN // (BATCH * backend.size)
    for step in range(STEPS):
        if step % per_epoch == 0:
            order = torch.randperm(TRAIN, generator=gen)
        lo = (step % per_epoch) * BATCH * backend.size + backend.rank * BATCH
        idx = order[lo : lo + BATCH]
        opt.zero_grad()
        nn.functional.cross_entropy(module(train.x[idx]), train.y[idx]).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return float((model(test.x).argmax(1) == test.y).float().mean()) * 100


def _all(backend: Backend) -> dict[str, float]:
    return {m: _train(backend, m) for m in ("ddp", *COMPRESSORS)}


@pytest.fixture(scope="module")
def accuracy() -> dict[str, float]:
    runs = run_ranks(_all, 2, timeout_s=300)
    assert runs[0] == runs[1]  # every rank evaluates the same weights
    print("test accuracy %:", {m: round(a, 2) for m, a in runs[0].items()})
    return runs[0]


@pytest.mark.parametrize("method", COMPRESSORS)
def test_defaults_end_within_1pp_of_ddp(accuracy: dict[str, float], method: str) -> None:
    ddp = accuracy["ddp"]
    assert ddp > 80.0, accuracy  # the task is learned at all
    assert math.isfinite(accuracy[method])
    assert accuracy[method] >= ddp - 1.0, accuracy
