"""Fail fast, on every rank, when ranks disagree on what a bucket holds.

Before a bucket's data moves, the ranks compare a fingerprint of (strategy, compressor spec,
keys, sizes, dtypes) with one MAX allreduce of ``[h, -h]`` (:func:`check_consistent`). If any
rank differs, all ranks see it at once, exchange readable descriptions and raise a
:class:`~gradzip.compress.base.CompressionError` naming the first differing key and both
values — instead of a collective that hangs or mixes up bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch

from gradzip.allreduce.backend import Backend, ReduceOp, control
from gradzip.allreduce.entry import BucketItem
from gradzip.compress.base import CompressionError

__all__ = ["check_consistent"]


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
