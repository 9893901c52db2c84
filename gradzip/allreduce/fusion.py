"""Tensor fusion: many gradients per collective.

A model with hundreds of small tensors would pay hundreds of collective latencies; instead
gradients are grouped into buckets of about ``fusion_bytes`` (:func:`plan_buckets`) and each
bucket travels as one collective (Horovod's tensor fusion, Sergeev & Del Balso 2018,
https://arxiv.org/abs/1802.05799).

The buckets' wire format is in :mod:`~gradzip.allreduce.wire`, the check that ranks agree on a
bucket in :mod:`~gradzip.allreduce.consistency`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradzip.allreduce.backend import Backend, DoneWork, MappedWork, Work
from gradzip.allreduce.entry import Entry, Reduced
from gradzip.allreduce.select import strategy_for
from gradzip.allreduce.strategy import Strategy
from gradzip.compress.base import Compressor

__all__ = ["DEFAULT_FUSION_BYTES", "Reducer", "plan_buckets"]

#: default bucket size in bytes (of the uncompressed gradients)
DEFAULT_FUSION_BYTES = 4 * 1024 * 1024


def plan_buckets(sizes: Sequence[int], fusion_bytes: int = DEFAULT_FUSION_BYTES) -> list[list[int]]:
    """Group consecutive tensors (by index) into buckets of at most ``fusion_bytes`` bytes.

    ``sizes`` are byte sizes in the order the tensors should travel. A tensor larger than
    ``fusion_bytes`` gets a bucket of its own; order is kept.
    """
    if isinstance(fusion_bytes, bool) or not isinstance(fusion_bytes, int) or fusion_bytes < 1:
        raise ValueError(f"fusion_bytes={fusion_bytes!r}; expected a positive number of bytes")
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, size in enumerate(sizes):
        if current and filled + size > fusion_bytes:
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += size
    if current:
        buckets.append(current)
    return buckets


class Reducer:
    """Reduce a model's gradients: fuse them into buckets, one strategy call per bucket.

    ``start(entries, step=...)`` cuts the entries (:class:`~gradzip.allreduce.entry.Entry`,
    in order) into buckets of about ``fusion_bytes`` uncompressed bytes and starts every
    bucket; ``wait()`` on the result gives ``{key: Reduced}``. Error feedback stays with the
    caller: compensate before, ``memory.update(key, compensated, reduced.local)`` after.
    ``strategy`` None: :func:`~gradzip.allreduce.select.strategy_for` at the backend's world
    size.
    """

    def __init__(
        self,
        backend: Backend,
        compressor: Compressor,
        strategy: Strategy | None = None,
        *,
        fusion_bytes: int = DEFAULT_FUSION_BYTES,
        seed: int = 0,
    ) -> None:
        plan_buckets([], fusion_bytes)  # validates fusion_bytes
        self.backend = backend
        self.compressor = compressor
        if strategy is None:
            strategy = strategy_for(compressor, world_size=backend.size)
        self.strategy = strategy
        self.fusion_bytes = fusion_bytes
        self.seed = seed

    def start(self, entries: Sequence[Entry], *, step: int = 0) -> Work[dict[Any, Reduced]]:
        """Launch every bucket; the Work's ``wait()`` waits for all of them."""
        entries = list(entries)
        keys = [e.key for e in entries]
        if len(set(keys)) != len(keys):
            dupes = sorted({str(k) for k in keys if keys.count(k) > 1})
            raise ValueError(f"keys must be unique within one reduction; repeated: {dupes}")
        sizes = [_dense_bytes(e) for e in entries]
        works = []
        for bucket in plan_buckets(sizes, self.fusion_bytes):
            part = [entries[i] for i in bucket]
            work = self.strategy.start(
                self.backend, self.compressor, part, seed=self.seed, step=step
            )
            works.append((part, work))

        def finish(_: None) -> dict[Any, Reduced]:
            out: dict[Any, Reduced] = {}
            for part, work in works:
                out.update(zip((e.key for e in part), work.wait(), strict=True))
            return out

        return MappedWork(DoneWork(None), finish)


def _dense_bytes(e: Entry) -> int:
    if e.tensor is not None:
        return e.tensor.numel() * e.tensor.element_size()
    assert e.payload is not None
    return e.payload.nbytes
