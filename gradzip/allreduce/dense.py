"""SUM payloads (fp16/bf16 casts, none): the payloads themselves are allreduced."""

from __future__ import annotations

from typing import Any

import torch

from gradzip.allreduce.backend import Backend, DoneWork, MappedWork, Work, to_backend
from gradzip.allreduce.entry import Entry, Reduced
from gradzip.allreduce.strategy import Strategy, compress_entries, data_device, local_results
from gradzip.compress.base import Compressor, Payload, Reduction
from gradzip.compress.none import NoCompression

__all__ = ["AllreduceStrategy"]


class AllreduceStrategy(Strategy):
    """SUM payloads (fp16/bf16 casts, none): one allreduce per wire dtype of the bucket.

    With ``average`` each rank divides by the world size *before* the sum (as DDP does, and
    torch's fp16 hook since PR 57410): two ranks at 40000 then average to 40000 in fp16
    instead of overflowing at 80000. A NaN/Inf on any rank still reaches every rank as one.
    """

    name = "allreduce"
    kinds = (Reduction.SUM,)
    takes_payloads = True

    def __init__(self, *, average: bool = True, verify: bool = True) -> None:
        super().__init__(average=average, verify=verify)
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}  # by keys, dtype, device

    def _start(
        self, backend: Backend, c: Compressor, entries: list[Entry], seed: int, step: int
    ) -> Work[list[Reduced]]:
        size = backend.size
        # the division moves before the sum where the compressor keeps no feedback of its own
        first = self.average and not c.error_feedback and all(e.tensor is not None for e in entries)
        # ``none`` sends the gradients as they are: they are divided where they are fused
        # (one pass fewer; the same quotients); a cast divides in fp32 before it rounds
        after_cat = first and size > 1 and isinstance(c, NoCompression)
        if first and size > 1 and not after_cat:
            entries = [Entry(e.key, torch.div(e.tensor, size)) for e in entries]  # type: ignore[arg-type]
        payloads, ctxs = compress_entries(backend, c, entries, seed, step)
        local = local_results(c, entries, payloads, ctxs)
        home = data_device(entries)
        parts = [t for p in payloads for t in p.tensors]
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(parts):
            groups.setdefault(t.dtype, []).append(i)
        fused = {dt: self._fuse(entries, [parts[i] for i in idx]) for dt, idx in groups.items()}
        if after_cat:
            for buf in fused.values():
                buf.div_(size)
        works = {dt: backend.allreduce(to_backend(backend, buf)) for dt, buf in fused.items()}

        def finish(_: None) -> list[Reduced]:
            summed: list[torch.Tensor] = list(parts)
            for dt, idx in groups.items():
                pieces = works[dt].wait().to(home).split([parts[i].numel() for i in idx])
                for i, piece in zip(idx, pieces, strict=True):
                    summed[i] = piece
            out, k = [], 0
            for p, ctx, loc in zip(payloads, ctxs, local, strict=True):
                total = c.decompress(Payload(tuple(summed[k : k + len(p)])), ctx)
                k += len(p)
                divide = 1 if first else size
                out.append(Reduced(self._finish(total.float(), divide, total.dtype), loc))
            return out

        return MappedWork(DoneWork(None), finish)

    def _fuse(self, entries: list[Entry], parts: list[torch.Tensor]) -> torch.Tensor:
        """``parts`` concatenated; with :attr:`reuse_buffers`, into this bucket's buffer of the
        step before when it fits (as DDP keeps its bucket buffers: a new one each step costs
        its page faults again)."""
        if not self.reuse_buffers:
            return torch.cat(parts)
        key = (tuple(e.key for e in entries), parts[0].dtype, parts[0].device)
        numel = sum(t.numel() for t in parts)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != numel:
            buf = torch.empty(numel, dtype=parts[0].dtype, device=parts[0].device)
            self._buffers[key] = buf
        return torch.cat(parts, out=buf)
