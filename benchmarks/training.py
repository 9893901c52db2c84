"""Plain single-process training helpers shared by the benchmarks: batches, SGD, accuracy."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from benchmarks.data import Dataset

__all__ = ["batches", "evaluate", "sgd_step"]


def batches(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh permutation of ``range(n)`` per epoch, cut into full
    batches of ``batch`` (the ragged end of an epoch is dropped)."""
    if not 1 <= batch <= n:
        raise ValueError(f"batch={batch} must be between 1 and the {n} examples")
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield order[i : i + batch]


@torch.no_grad()
def sgd_step(model: nn.Module, lr: float) -> None:
    """Plain SGD, ``p -= lr * p.grad`` (torch.optim would import torch._dynamo: seconds)."""
    for p in model.parameters():
        if p.grad is not None:
            p.add_(p.grad, alpha=-lr)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (in eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(data.x[i : i + batch]).argmax(1) == data.y[i : i + batch]).sum())
        for i in range(0, len(data.y), batch)
    )
    model.train(was_training)
    return correct / max(1, len(data.y))
