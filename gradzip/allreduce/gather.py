"""Gather every rank's payloads and sum them locally: GATHER, SPARSE and FACTORS payloads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradzip.allreduce.backend import Backend, MappedWork, Work, to_backend
from gradzip.allreduce.entry import Entry, Reduced
from gradzip.allreduce.strategy import Strategy, compress_entries, data_device, local_results
from gradzip.allreduce.wire import pack, unpack
from gradzip.compress import kernels
from gradzip.compress.base import CompressionError, Compressor, Payload, Reduction
from gradzip.compress.topk import desparsify_into

__all__ = ["AllgatherStrategy", "combine"]


def combine(c: Compressor, payloads: Sequence[Payload], ctx: Any) -> torch.Tensor:
    """Sum over ranks of ``decompress(payload_r)``, in fp32, in rank order.

    SPARSE payloads are added rank by rank into one dense fp32 tensor: within one rank's
    payload every index appears once, so each ``index_add_`` touches an element at most once
    and the sum is taken in rank order on CPU and CUDA alike (one ``index_add_`` over the
    concatenation of all ranks would leave the order of repeated indices to the GPU's
    atomics). FACTORS payloads concatenate into one payload whose ``decompress`` is that sum
    (``cat(dY)^T cat(X)``, one matmul); GATHER payloads go to :func:`kernels.decompress_sum`
    (one receive-side kernel for CUDA payloads, no dense tensor per rank; rank by rank on
    the torch path).
    """
    if c.reduction is Reduction.SPARSE and payloads:
        total = torch.zeros(ctx.numel, dtype=torch.float32, device=payloads[0][1].device)
        for p in payloads:  # rank order
            desparsify_into(total, p[0], p[1])
        return total.view(ctx.shape)
    if c.reduction is Reduction.FACTORS and payloads:
        n_parts = len(payloads[0])
        joined = Payload(tuple(torch.cat([p[i] for p in payloads]) for i in range(n_parts)))
        return c.decompress(joined, ctx).to(torch.float32)
    if not payloads:
        raise CompressionError("combine needs at least one payload")
    return kernels.decompress_sum(c, list(payloads), [ctx] * len(payloads))


class AllgatherStrategy(Strategy):
    """Gather every rank's payloads (one fused allgather), decompress and sum them."""

    name = "allgather"
    kinds = (Reduction.GATHER, Reduction.SPARSE, Reduction.FACTORS)
    takes_payloads = True

    def _start(
        self, backend: Backend, c: Compressor, entries: list[Entry], seed: int, step: int
    ) -> Work[list[Reduced]]:
        payloads, ctxs = compress_entries(backend, c, entries, seed, step)
        local = local_results(c, entries, payloads, ctxs)
        home = data_device(entries)
        # every rank packs the same layout (the plan's fingerprint, the hook's layout check):
        # where the payload's size follows from it, no size exchange is needed first
        work = backend.allgather(to_backend(backend, pack(payloads)), same_size=c.fixed_payload())

        def finish(bufs: list[torch.Tensor]) -> list[Reduced]:
            per_rank = [
                unpack(b.to(home), payloads, source=f"rank {r}") for r, b in enumerate(bufs)
            ]
            out = []
            for i, (ctx, loc) in enumerate(zip(ctxs, local, strict=True)):
                total = combine(c, [got[i] for got in per_rank], ctx)
                t = entries[i].tensor
                dtype = t.dtype if t is not None else total.dtype
                out.append(Reduced(self._finish(total, backend.size, dtype), loc))
            return out

        return MappedWork(work, finish)
