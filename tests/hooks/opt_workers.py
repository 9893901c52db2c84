"""Shared pieces of the DistributedOptimizer tests: models, data shards, references.

Rank ``r`` of ``P`` trains on its own shard; the single-process reference recomputes every
rank's gradient on one model copy and combines them by hand, as the wrapper should.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradzip.allreduce.backend import Backend


class Net(nn.Module):
    """Two Linear layers, an optional branch (unused-parameter tests) and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(12, 12)
        self.fc1 = nn.Linear(12, 40)
        self.branch = nn.Linear(40, 40)
        self.fc2 = nn.Linear(40, 4)
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, use_branch: bool = False) -> torch.Tensor:
        h = torch.relu(self.fc1(self.frozen(x)))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.fc2(h)


def batch(step: int, rank: int, n: int = 8, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic regression batch of rank ``rank`` at ``step`` (``extra``: micro-batch)."""
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + extra)
    return torch.randn(n, 12, generator=gen), torch.randn(n, 4, generator=gen)


def loss_of(model: Net, x: torch.Tensor, y: torch.Tensor, use_branch: bool = False) -> torch.Tensor:
    return (model(x, use_branch) - y).square().mean()


def grads_of(model: nn.Module, closure: Callable[[], torch.Tensor]) -> list[torch.Tensor | None]:
    """Gradients of ``closure()`` w.r.t. the trainable parameters (None where unused)."""
    model.zero_grad(set_to_none=True)
    closure().backward()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def combine(per_rank: Sequence[Sequence[torch.Tensor | None]], average: bool = True) -> list[Any]:
    """Sum (or mean) over ranks in rank order; None only where every rank has None."""
    out: list[Any] = []
    for parts in zip(*per_rank, strict=True):
        have = [g for g in parts if g is not None]
        if not have:
            out.append(None)
            continue
        total = torch.zeros_like(have[0])
        for g in parts:
            if g is not None:
                total = total + g
        out.append(total / len(parts) if average else total)
    return out


def set_grads(model: nn.Module, grads: Sequence[torch.Tensor | None]) -> None:
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = None if g is None else g.clone()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def same_on_all_ranks(backend: Backend, model: nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters (a digest, allgathered)."""
    digest = hashlib.blake2b(flat(model).numpy().tobytes(), digest_size=7).digest()
    mine = torch.tensor([int.from_bytes(digest, "little")], dtype=torch.int64)
    got = backend.allgather(mine).wait()
    return all(int(t[0]) == int(mine[0]) for t in got)
