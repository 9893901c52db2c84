"""GATHER payloads reduced in two phases, with server-side error feedback."""

from __future__ import annotations

from typing import Any

import torch

from gradzip.allreduce.backend import Backend, MappedWork, Work, to_backend
from gradzip.allreduce.entry import Entry, Reduced
from gradzip.allreduce.gather import combine
from gradzip.allreduce.strategy import (
    Strategy,
    compress_entries,
    data_device,
    flat_gradient,
    gradient_dtype,
    gradient_shape,
)
from gradzip.allreduce.wire import pack, unpack
from gradzip.compress import kernels
from gradzip.compress.base import Compressor, Payload, Reduction, derive_seed
from gradzip.compress.memory import NoMemory, ResidualMemory

__all__ = ["ScatterGatherStrategy"]


class ScatterGatherStrategy(Strategy):
    """Two-phase compressed allreduce with worker- and server-side error feedback
    (1-bit SGD's aggregation, Seide et al. 2014; as in Tang et al. 2019,
    https://arxiv.org/abs/1905.05957 DoubleSqueeze).

    Each rank splits its compensated gradient into P chunks, compresses each and sends chunk
    ``j`` to rank ``j`` (alltoall). Rank ``j`` decompresses and sums its chunk from all
    ranks, adds its server residual, re-compresses it and keeps the new residual; an
    allgather then gives every rank every reduced chunk. Bytes per rank: ``2(P-1)/P·n/r``.
    """

    name = "scatter_gather"
    kinds = (Reduction.GATHER,)

    def __init__(self, *, average: bool = True, verify: bool = True) -> None:
        super().__init__(average=average, verify=verify)
        self.server: ResidualMemory | NoMemory | None = None
        # key -> (compensated, decompressed) of this step's server update, until settle()
        self.staged: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def _chunks(
        self, backend: Backend, c: Compressor, entries: list[Entry], seed: int, step: int
    ) -> tuple[list[list[Payload]], list[list[Any]]]:
        """Per entry, the P chunk payloads and ctxs (``[entry][dest]``)."""
        p = backend.size
        chunks = [
            Entry(f"{e.key}/chunk{j}", t.contiguous())
            for e in entries
            for j, t in enumerate(torch.tensor_split(flat_gradient(e, self.name), p))
        ]
        payloads, ctxs = compress_entries(backend, c, chunks, seed, step)
        return (
            [payloads[i * p : (i + 1) * p] for i in range(len(entries))],
            [ctxs[i * p : (i + 1) * p] for i in range(len(entries))],
        )

    def _start(
        self, backend: Backend, c: Compressor, entries: list[Entry], seed: int, step: int
    ) -> Work[list[Reduced]]:
        if self.server is None:
            self.server = ResidualMemory() if c.error_feedback else NoMemory()
        payloads, ctxs = self._chunks(backend, c, entries, seed, step)
        local: list[torch.Tensor | None] = [None] * len(entries)
        if c.error_feedback:
            local = [
                torch.cat(
                    [kernels.decompress(c, p, x).reshape(-1) for p, x in zip(ps, xs, strict=True)]
                )
                for ps, xs in zip(payloads, ctxs, strict=True)
            ]
        me, p = backend.rank, backend.size
        home = data_device(entries)
        work = backend.alltoall(
            [to_backend(backend, pack([ps[j] for ps in payloads])) for j in range(p)]
        )

        def finish(bufs: list[torch.Tensor]) -> list[Reduced]:
            mine = [ps[me] for ps in payloads]
            got = [unpack(b.to(home), mine, source=f"rank {r}") for r, b in enumerate(bufs)]
            served = [
                self._serve(c, e, [g[i] for g in got], xs[me], seed, step, me)
                for i, (e, xs) in enumerate(zip(entries, ctxs, strict=True))
            ]
            gathered = backend.allgather(to_backend(backend, pack(served))).wait()
            parts = [
                unpack(b.to(home), [ps[j] for ps in payloads], source=f"rank {j}")
                for j, b in enumerate(gathered)
            ]
            out = []
            for i, e in enumerate(entries):
                total = torch.cat(
                    [
                        kernels.decompress(c, parts[j][i], ctxs[i][j]).float().reshape(-1)
                        for j in range(p)
                    ]
                )
                shaped = total.view(gradient_shape(e))
                loc = None if local[i] is None else local[i].view(gradient_shape(e))  # type: ignore[union-attr]
                out.append(Reduced(self._finish(shaped, p, gradient_dtype(e)), loc))
            return out

        return MappedWork(work, finish)

    def _serve(
        self,
        c: Compressor,
        e: Entry,
        received: list[Payload],
        ctx: Any,
        seed: int,
        step: int,
        me: int,
    ) -> Payload:
        """Server side of chunk ``me`` of entry ``e``: sum, compensate, re-compress, update."""
        assert self.server is not None
        total = combine(c, received, ctx)
        compensated = self.server.compensate(e.key, total)
        shared = kernels.shared_stat(c, compensated)
        s = derive_seed(seed, step, f"{e.key}/server", me)
        payload, sctx = kernels.compress(c, compensated, seed=s, shared=shared)
        decompressed = kernels.decompress(c, payload, sctx)
        if self.deferred:
            self.staged[e.key] = (compensated, decompressed)
        else:
            self.server.update(e.key, compensated, decompressed)
        return payload

    def settle(self, key: Any, keep: bool) -> None:
        """Store this step's server residual of ``key`` (``keep``), or leave the old one (a
        step called off: a NaN/Inf on some rank, or an entry no rank used)."""
        staged = self.staged.pop(key, None)
        if staged is not None and keep:
            assert self.server is not None
            self.server.update(key, *staged)

    def state_dict(self) -> dict[str, Any]:
        if self.staged:
            raise RuntimeError("scatter_gather: state_dict() while a step is not settled")
        return {"server": self.server.state_dict() if self.server is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("server"):
            self.server = ResidualMemory()
            self.server.load_state_dict(state["server"])
