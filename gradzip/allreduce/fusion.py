"""Tensor fusion: many gradients per collective, payloads as one flat byte buffer.

A model with hundreds of small tensors would pay hundreds of collective latencies; instead
gradients are grouped into buckets of about ``fusion_bytes`` (:func:`plan_buckets`) and each
bucket travels as one collective (Horovod's tensor fusion, Sergeev & Del Balso 2018,
https://arxiv.org/abs/1802.05799).

Wire format of a gathered bucket (:func:`pack` / :func:`unpack`): an int32 header
``[parts, numel_0, ..., numel_{parts-1}]`` followed by the raw bytes of every payload part, in
order, without padding. The header makes payloads of varying size (sampled top-k, DGC, SFB
batch factors) self-describing; the dtypes and the number of parts of each payload come from
the receiver's own payloads of the same bucket, which the consistency check has shown to be
built by the same compressor for the same keys. The header costs ``4 * (1 + parts)`` bytes
and is counted like everything else.

Consistency (:func:`check_consistent`): before a bucket's data moves, the ranks compare a
fingerprint of (strategy, compressor spec, keys, sizes, dtypes) with one MAX allreduce of
``[h, -h]``. If any rank differs, all ranks see it at once, exchange readable descriptions and
raise a :class:`~gradzip.compress.base.CompressionError` naming the first differing key and
both values — instead of a collective that hangs or mixes up bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from gradzip.allreduce.backend import Backend, DoneWork, MappedWork, ReduceOp, Work, control
from gradzip.compress.base import CompressionError, Compressor, Payload

if TYPE_CHECKING:
    from gradzip.allreduce.strategies import Strategy

__all__ = [
    "DEFAULT_FUSION_BYTES",
    "BucketItem",
    "Entry",
    "Reduced",
    "Reducer",
    "check_consistent",
    "pack",
    "plan_buckets",
    "unpack",
]

#: default bucket size in bytes (of the uncompressed gradients)
DEFAULT_FUSION_BYTES = 4 * 1024 * 1024

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


def pack(payloads: Sequence[Payload]) -> torch.Tensor:
    """Payloads as one flat uint8 buffer: int32 header of part sizes, then the parts' bytes."""
    parts = [t for p in payloads for t in p.tensors]
    device = parts[0].device if parts else torch.device("cpu")
    header = torch.tensor([len(parts)] + [t.numel() for t in parts], dtype=torch.int32)
    chunks = [header.to(device).view(torch.uint8)]
    chunks += [t.contiguous().view(torch.uint8) for t in parts if t.numel()]
    return torch.cat(chunks)


def _typed(chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View a uint8 slice as ``dtype``; copies when the slice is not aligned for it."""
    size = torch.empty(0, dtype=dtype).element_size()
    if chunk.storage_offset() % size:
        chunk = chunk.clone()
    return chunk.view(dtype)


def unpack(
    buf: torch.Tensor, template: Sequence[Payload], *, source: str = "peer"
) -> list[Payload]:
    """Inverse of :func:`pack`; dtypes and part counts come from ``template`` (own payloads)."""
    dtypes = [[t.dtype for t in p.tensors] for p in template]
    n_parts = sum(len(d) for d in dtypes)
    if buf.numel() < 4:
        raise CompressionError(f"{source} sent a fused buffer of {buf.numel()} bytes; no header")
    count = int(_typed(buf[:4], torch.int32)[0])
    if count != n_parts:
        raise CompressionError(
            f"{source} sent {count} payload parts for a bucket whose payloads have {n_parts}"
        )
    head = 4 * (1 + count)
    numels = _typed(buf[4:head], torch.int32).tolist()
    offset, k, out = head, 0, []
    for part_dtypes in dtypes:
        parts = []
        for dtype in part_dtypes:
            size = numels[k] * torch.empty(0, dtype=dtype).element_size()
            parts.append(_typed(buf[offset : offset + size], dtype))
            offset, k = offset + size, k + 1
        out.append(Payload(tuple(parts)))
    if offset != buf.numel():
        raise CompressionError(
            f"{source} sent a fused buffer of {buf.numel()} bytes; its header describes {offset}"
        )
    return out


def _digest(text: str) -> int:
    """A 62-bit hash, stable across processes (fits int64 with its negation)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def _describe(items: Sequence[BucketItem], config: str) -> str:
    return json.dumps({"config": config, "items": [[str(k), n, d] for k, n, d in items]})


def _first_difference(mine: dict[str, Any], other: dict[str, Any], rank: int, peer: int) -> str:
    """A sentence naming the first key where two bucket descriptions differ, with both values."""
    if mine["config"] != other["config"]:
        key = mine["items"][0][0] if mine["items"] else "(empty bucket)"
        ours, theirs = mine["config"].split(), other["config"].split()
        diff = next(
            (f" ({a!r} against {b!r})" for a, b in zip(ours, theirs, strict=False) if a != b), ""
        )
        return (
            f"bucket starting at key {key!r}: rank {rank} uses {mine['config']!r} but "
            f"rank {peer} uses {other['config']!r}{diff}"
        )
    for pos, (a, b) in enumerate(zip(mine["items"], other["items"], strict=False)):
        if a != b:
            return (
                f"tensor {pos} of the bucket: rank {rank} has key {a[0]!r} with numel={a[1]} "
                f"dtype={a[2]}, rank {peer} has key {b[0]!r} with numel={b[1]} dtype={b[2]}"
            )
    return (
        f"rank {rank} has {len(mine['items'])} tensors in the bucket, rank {peer} has "
        f"{len(other['items'])} (keys {[i[0] for i in mine['items']]} vs "
        f"{[i[0] for i in other['items']]})"
    )


def check_consistent(backend: Backend, items: Sequence[BucketItem], config: str) -> None:
    """Fail on every rank, naming the key and both values, when ranks disagree on a bucket.

    ``items`` lists (key, numel, dtype) of the bucket's tensors; ``config`` is the strategy and
    compressor spec. Costs one allreduce of two int64 when all agree.
    """
    text = _describe(items, config)
    h = _digest(text)
    both = backend.allreduce(control(backend, [h, -h], torch.int64), ReduceOp.MAX).wait()
    if int(both[0]) == -int(both[1]):  # max == min: every rank has the same fingerprint
        return
    raw = control(backend, list(text.encode()), torch.uint8)
    texts = [bytes(t.tolist()).decode() for t in backend.allgather(raw).wait()]
    mine = json.loads(text)
    for peer, other_text in enumerate(texts):
        if other_text != text:
            detail = _first_difference(mine, json.loads(other_text), backend.rank, peer)
            raise CompressionError(f"ranks disagree on what to reduce: {detail}")
    raise CompressionError(  # this rank agrees with all, but some pair of others does not
        "ranks disagree on what to reduce: "
        + _first_difference(json.loads(texts[0]), json.loads(texts[-1]), 0, len(texts) - 1)
    )


class Reducer:
    """Reduce a model's gradients: fuse them into buckets, one strategy call per bucket.

    ``start(entries, step=...)`` cuts the entries (``strategies.Entry``, in order) into
    buckets of about ``fusion_bytes`` uncompressed bytes and starts every bucket; ``wait()``
    on the result gives ``{key: Reduced}``. Error feedback stays with the caller: compensate
    before, ``memory.update(key, compensated, reduced.local)`` after.
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
        from gradzip.allreduce.strategies import strategy_for

        plan_buckets([], fusion_bytes)  # validates fusion_bytes
        self.backend = backend
        self.compressor = compressor
        self.strategy = strategy if strategy is not None else strategy_for(compressor)
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
