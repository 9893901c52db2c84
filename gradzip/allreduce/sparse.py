"""Sparse allreduce of (indices, values) vectors that turns dense when dense is cheaper.

Two algorithms, both giving the dense fp32 sum of every rank's sparse vector of length n:

* :func:`sparse_allgather` — every rank gets every rank's (indices, values) and adds them up.
  One collective; each rank receives ``(P-1)·nnz·8`` bytes.
* :func:`sparse_allreduce` — recursive doubling (SparCML, Renggli et al. 2019,
  https://arxiv.org/abs/1802.08021): in round ``k`` rank ``r`` swaps its merged vector with
  rank ``r XOR 2^k`` and merges, so after ``log2 P`` rounds every rank holds the sum. A
  message goes dense (``n·4`` bytes) as soon as its merged count makes sparse dearer
  (``nnz·(4+4) >= n·4``). Before any round, the ranks agree (one allreduce of the total nnz)
  whether the whole exchange would cost more than a dense ring allreduce
  (``2(P-1)/P·n·4``); if so they densify and allreduce at once. A world size that is not a
  power of two first folds the extra ranks ``r >= 2^m`` into ``r - 2^m`` and sends them the
  result at the end. Point-to-point messages travel as alltoalls with empty parts for
  everyone else, since the Backend has no send/recv.

Each merge adds two vectors, each with unique indices, so an element gets at most two
addends and ``a + b == b + a``: all ranks end bit-identical, whatever order the device's
``index_add_`` (atomics on CUDA) takes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gradzip.allreduce.backend import (
    Backend,
    DoneWork,
    MappedWork,
    ReduceOp,
    Work,
    control,
    to_backend,
)
from gradzip.allreduce.entry import Entry, Reduced
from gradzip.allreduce.strategy import Strategy, compress_entries, local_results
from gradzip.compress.base import CompressionError, Compressor, Reduction

__all__ = [
    "SparseResult",
    "SparseStrategy",
    "sparse_allgather",
    "sparse_allreduce",
    "sparse_rounds_cost",
]


class SparseResult(NamedTuple):
    """The dense fp32 sum, and whether the exchange went dense (at the start or on the way)."""

    tensor: torch.Tensor
    dense: bool


class _Vec(NamedTuple):
    """A vector being merged: sorted unique int64 indices and fp32 values, or dense values."""

    idx: torch.Tensor | None  # None when dense
    vals: torch.Tensor


def _check(idx: torch.Tensor, vals: torch.Tensor, n: int) -> None:
    if idx.dim() != 1 or vals.dim() != 1 or idx.numel() != vals.numel():
        raise CompressionError(
            f"sparse allreduce needs flat indices and values of one length, got "
            f"{tuple(idx.shape)} and {tuple(vals.shape)}"
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise CompressionError(
            f"sparse index range [{int(idx.min())}, {int(idx.max())}] does not fit n={n}"
        )


def _dense(v: _Vec, n: int) -> torch.Tensor:
    if v.idx is None:
        return v.vals
    out = torch.zeros(n, dtype=torch.float32, device=v.vals.device)
    return out.index_add_(0, v.idx, v.vals)


def _coalesce(idx: torch.Tensor, vals: torch.Tensor, n: int) -> _Vec:
    """Sum repeated indices; dense when ``nnz·8 >= n·4``."""
    uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
    if 2 * uniq.numel() >= n:
        return _Vec(None, _dense(_Vec(idx, vals), n))
    summed = torch.zeros(uniq.numel(), dtype=torch.float32, device=vals.device)
    return _Vec(uniq, summed.index_add_(0, inverse, vals))


def _merge(a: _Vec, b: _Vec, n: int) -> _Vec:
    if a.idx is None or b.idx is None:
        dense, other = (a, b) if a.idx is None else (b, a)
        if other.idx is None:
            return _Vec(None, dense.vals + other.vals)
        return _Vec(None, dense.vals.clone().index_add_(0, other.idx, other.vals))
    return _coalesce(torch.cat([a.idx, b.idx]), torch.cat([a.vals, b.vals]), n)


def _encode(v: _Vec) -> torch.Tensor:
    """Dense: n fp32; sparse: nnz int32 indices then nnz fp32 values (always < n·4 bytes)."""
    if v.idx is None:
        return v.vals.view(torch.uint8)
    return torch.cat([v.idx.to(torch.int32).view(torch.uint8), v.vals.view(torch.uint8)])


def _decode(buf: torch.Tensor, n: int) -> _Vec:
    buf = buf.clone() if buf.storage_offset() % 4 else buf
    if buf.numel() == 4 * n:
        return _Vec(None, buf.view(torch.float32))
    half = buf.numel() // 2
    return _Vec(buf[:half].view(torch.int32).long(), buf[half:].view(torch.float32))


def _send(backend: Backend, v: _Vec, to: int | None, frm: int | None, n: int) -> _Vec | None:
    """One point-to-point step as an alltoall: send ``v`` to rank ``to`` (None: nothing) and
    return what rank ``frm`` sent (None: expect nothing). Empty parts for everyone else."""
    home = v.vals.device
    empty = torch.empty(0, dtype=torch.uint8, device=backend.device)
    parts = [empty] * backend.size
    if to is not None:
        parts[to] = to_backend(backend, _encode(v))
    got = backend.alltoall(parts).wait()
    return None if frm is None else _decode(got[frm].to(home), n)


def sparse_rounds_cost(nnz_per_rank: float, n: int, world_size: int) -> int:
    """Bytes one rank sends in recursive doubling, assuming merges never overlap (worst case)."""
    p2 = 1 << (world_size.bit_length() - 1)
    cost, count = 0.0, nnz_per_rank
    rounds = p2.bit_length() - 1 + (2 if p2 < world_size else 0)
    for _ in range(rounds):
        cost += min(8 * count, 4 * n)
        count = min(2 * count, n)
    return int(cost)


def sparse_allreduce(
    backend: Backend, indices: torch.Tensor, values: torch.Tensor, n: int
) -> SparseResult:
    """The dense sum over ranks of the sparse vectors ``(indices, values)`` of length ``n``.

    Blocking (the rounds depend on each other). See the module docstring for the algorithm.
    """
    _check(indices, values, n)
    p, r = backend.size, backend.rank
    total = backend.allreduce(control(backend, [indices.numel()], torch.int64), ReduceOp.SUM)
    nnz = int(total.wait()[0]) / p
    if sparse_rounds_cost(nnz, n, p) >= 2 * (p - 1) * n * 4 // p:
        dense = _dense(_Vec(indices.long(), values.to(torch.float32)), n)
        summed = backend.allreduce(to_backend(backend, dense)).wait()
        return SparseResult(summed.to(values.device), True)
    v = _coalesce(indices.long(), values.to(torch.float32), n)
    p2 = 1 << (p.bit_length() - 1)
    extra = p - p2  # ranks p2..p-1 fold into ranks 0..extra-1
    if extra:
        got = _send(backend, v, r - p2 if r >= p2 else None, r + p2 if r < extra else None, n)
        if got is not None:
            v = _merge(v, got, n)
    d = 1
    while d < p2:
        partner = r ^ d if r < p2 else None
        got = _send(backend, v, partner, partner, n)
        if got is not None:
            v = _merge(v, got, n)
        d *= 2
    if extra:  # hand the result back to the extra ranks
        got = _send(backend, v, r + p2 if r < extra else None, r - p2 if r >= p2 else None, n)
        if got is not None:
            v = got
    return SparseResult(_dense(v, n), v.idx is None)


def sparse_allgather(
    backend: Backend, indices: torch.Tensor, values: torch.Tensor, n: int
) -> Work[torch.Tensor]:
    """The dense sum over ranks via one allgather of ``int32 indices ++ fp32 values``."""
    _check(indices, values, n)
    v = _Vec(indices.long(), values.to(torch.float32))
    work = backend.allgather(to_backend(backend, _encode(v)))

    def finish(bufs: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.float32, device=values.device)
        for b in bufs:  # rank order; indices are unique within one rank's vector
            if b.numel():
                got = _decode(
                    b.to(values.device), n + 1
                )  # n + 1: never mistaken for a dense message
                assert got.idx is not None
                out.index_add_(0, got.idx, got.vals)
        return out

    return MappedWork(work, finish)


class SparseStrategy(Strategy):
    """SPARSE payloads of a bucket as one long sparse vector, reduced by
    :func:`~gradzip.allreduce.sparse.sparse_allreduce` (recursive doubling that turns dense)."""

    name = "sparse"
    kinds = (Reduction.SPARSE,)

    def _start(
        self, backend: Backend, c: Compressor, entries: list[Entry], seed: int, step: int
    ) -> Work[list[Reduced]]:
        payloads, ctxs = compress_entries(backend, c, entries, seed, step)
        local = local_results(c, entries, payloads, ctxs)
        sizes = [e.tensor.numel() if e.tensor is not None else 0 for e in entries]
        offsets = torch.tensor([0, *sizes]).cumsum(0)
        idx = torch.cat([p[0].long() + int(o) for p, o in zip(payloads, offsets[:-1], strict=True)])
        vals = torch.cat([p[1].to(torch.float32) for p in payloads])
        result = sparse_allreduce(backend, idx, vals, int(offsets[-1]))
        out = []
        for e, piece, loc in zip(entries, result.tensor.split(sizes), local, strict=True):
            assert e.tensor is not None
            total = piece.view(e.tensor.shape)
            out.append(Reduced(self._finish(total, backend.size, e.tensor.dtype), loc))
        return DoneWork(out)
