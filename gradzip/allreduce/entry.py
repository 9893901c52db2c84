"""What a strategy reduces and what it hands back: one :class:`Entry` per tensor of a bucket,
one :class:`Reduced` per entry.

:class:`~gradzip.allreduce.fusion.Reducer` builds the entries, a
:class:`~gradzip.allreduce.strategy.Strategy` reduces them; both sides import them from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from gradzip.compress.base import Payload

__all__ = ["BucketItem", "Entry", "Key", "Reduced"]

#: (key, numel, dtype name) of one tensor of a bucket, as the consistency check compares it
BucketItem = tuple[Any, int, str]


Key = str | int


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of a bucket: its key and the (compensated) gradient, or a payload and ctx
    compressed beforehand (SFB factors, which a finished gradient does not hold)."""

    key: Key
    tensor: torch.Tensor | None = None
    payload: Payload | None = None
    ctx: Any = None

    def __post_init__(self) -> None:
        if (self.tensor is None) == (self.payload is None):
            raise ValueError(f"entry {self.key!r} needs either a tensor or a payload (not both)")

    def item(self) -> BucketItem:
        """(key, numel, dtype) for the consistency check; the ctx for precompressed entries."""
        if self.tensor is not None:
            return (self.key, self.tensor.numel(), str(self.tensor.dtype))
        return (self.key, -1, repr(self.ctx))


@dataclasses.dataclass(frozen=True)
class Reduced:
    """The result for one entry: ``reduced`` (sum or mean over ranks, input shape and dtype)
    and ``local`` (this rank's decompressed payload; None when the compressor keeps no
    error feedback)."""

    reduced: torch.Tensor
    local: torch.Tensor | None
