"""Reduce compressed payloads over ranks, one strategy per :class:`Reduction` kind.

| kind | strategy | bytes sent per rank (payload of n elements, ratio r, P ranks) |
|---|---|---|
| SUM | :class:`AllreduceStrategy`: the payloads themselves are allreduced | ``2(P-1)/P·n/r`` |
| GATHER | :class:`AllgatherStrategy`: gather all payloads, decompress each, sum | ``(P-1)·n/r`` |
| GATHER | :class:`ScatterGatherStrategy`: two-phase compressed allreduce | ``< 2·n/r`` |
| GATHER | :class:`TernarySumStrategy`: TernGrad's int8 values, allreduced | ``2(P-1)/P·n`` |
| SPARSE | :class:`AllgatherStrategy` or :class:`SparseStrategy` (``sparse.py``) | |
| FACTORS | :class:`AllgatherStrategy`: gather factors, one matmul (SFB) | |

A strategy reduces one *bucket* (a list of :class:`Entry`) with one collective per phase;
``fusion.Reducer`` cuts a model's gradients into buckets. Every strategy returns, per entry,
the sum over ranks (divided by the world size when ``average``) and this rank's own
decompressed payload (``local``, for the worker's error-feedback update
``residual = compensated - local``). All ranks get bit-identical results: every sum is taken
in rank order, or by the engine.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from gradzip.allreduce.backend import (
    Backend,
    DoneWork,
    MappedWork,
    ReduceOp,
    Work,
    to_backend,
)
from gradzip.allreduce.fusion import Entry, Reduced, check_consistent, pack, unpack
from gradzip.compress import kernels
from gradzip.compress.base import (
    CompressionError,
    Compressor,
    Payload,
    Reduction,
    derive_seed,
)
from gradzip.compress.memory import NoMemory, ResidualMemory
from gradzip.compress.topk import desparsify_into

__all__ = [
    "AllgatherStrategy",
    "AllreduceStrategy",
    "Entry",
    "Reduced",
    "ScatterGatherStrategy",
    "Strategy",
    "TernarySumStrategy",
    "agree_shared",
    "combine",
    "compress_entries",
    "data_device",
    "local_results",
    "strategy_for",
]


def agree_shared(
    backend: Backend,
    compressor: Compressor,
    tensors: Sequence[torch.Tensor],
    *,
    kernel: bool = True,
) -> list[torch.Tensor | None]:
    """The MAX over ranks of ``compressor.shared_stat`` of each tensor (one allreduce), so all
    ranks compress with the same scaler (TernGrad); Nones when the compressor has none.

    ``kernel``: take the statistic as :func:`kernels.compress` will (the GPU kernel for CUDA
    tensors); False when the torch code compresses afterwards (its own statistic is the bound
    the shared value is checked against)."""
    stat = kernels.shared_stat if kernel else type(compressor).shared_stat
    stats = [stat(compressor, t) for t in tensors]
    if not stats or all(s is None for s in stats):
        return [None] * len(tensors)
    if any(s is None for s in stats):
        raise CompressionError(f"{compressor.spec()}: shared_stat returned None for some tensors")
    flat = torch.stack([s.reshape(()).to(torch.float32) for s in stats if s is not None])
    agreed = backend.allreduce(to_backend(backend, flat), ReduceOp.MAX).wait()
    return list(agreed.to(flat.device).unbind())


def data_device(entries: Sequence[Entry]) -> torch.device:
    """Where a bucket's gradients live: received buffers are brought there before they are
    decompressed (gloo moves CUDA payloads through the CPU; the kernels run on the GPU)."""
    for e in entries:
        if e.tensor is not None:
            return e.tensor.device
        if e.payload is not None and len(e.payload):
            return e.payload[0].device
    return torch.device("cpu")


def compress_entries(
    backend: Backend, compressor: Compressor, entries: Sequence[Entry], seed: int, step: int
) -> tuple[list[Payload], list[Any]]:
    """Payload and ctx of every entry (precompressed ones pass through)."""
    todo = [(e.key, e.tensor) for e in entries if e.tensor is not None]
    agreed = agree_shared(backend, compressor, [t for _, t in todo])
    shared = {key: s for (key, _), s in zip(todo, agreed, strict=True)}
    payloads, ctxs = [], []
    for e in entries:
        if e.tensor is None:
            payload, ctx = e.payload, e.ctx
        else:
            s = derive_seed(seed, step, e.key, backend.rank)
            payload, ctx = kernels.compress(compressor, e.tensor, seed=s, shared=shared[e.key])
        payloads.append(payload)
        ctxs.append(ctx)
    return payloads, ctxs  # type: ignore[return-value]


class Strategy(abc.ABC):
    """Reduce a bucket of entries over ranks; see the module docstring.

    ``average``: divide the sum by the world size. ``verify``: compare a fingerprint of the
    bucket across ranks first (one tiny allreduce) and fail with a message naming the key
    when ranks disagree, instead of hanging or mixing up bytes.
    """

    name: ClassVar[str]
    kinds: ClassVar[tuple[Reduction, ...]]
    #: entries may arrive compressed already (a fused error-feedback step, SFB factors)
    takes_payloads: ClassVar[bool] = False

    def __init__(self, *, average: bool = True, verify: bool = True) -> None:
        self.average = average
        self.verify = verify
        #: hold state changes (server residuals) until :meth:`settle`; the optimizer and the
        #: DDP hook set it, so that a step called off on every rank changes nothing
        self.deferred = False

    def start(
        self,
        backend: Backend,
        compressor: Compressor,
        entries: Sequence[Entry],
        *,
        seed: int = 0,
        step: int = 0,
    ) -> Work[list[Reduced]]:
        """Compress and launch; ``wait()`` gives one :class:`Reduced` per entry, in order."""
        if compressor.reduction not in self.kinds:
            allowed = ", ".join(k.name for k in self.kinds)
            raise CompressionError(
                f"strategy {self.name!r} reduces {allowed} payloads; compressor "
                f"{compressor.spec()!r} is {compressor.reduction.name}"
            )
        if self.verify:
            items = [e.item() for e in entries]
            check_consistent(backend, items, f"{self.name} {compressor.spec()}")
        return self._start(backend, compressor, list(entries), seed, step)

    @abc.abstractmethod
    def _start(
        self, backend: Backend, c: Compressor, entries: list[Entry], seed: int, step: int
    ) -> Work[list[Reduced]]: ...

    def _finish(self, total: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
        return (total / size if self.average else total).to(dtype)

    def settle(self, key: Any, keep: bool) -> None:
        """After a step's results are in: keep (``keep``) or call off the strategy state that
        entry ``key`` changed this step (server-side residuals); nothing for most."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Strategy state for a checkpoint (server-side residuals); empty for most."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} has no state, got keys {sorted(state)}")


def local_results(
    c: Compressor, entries: Sequence[Entry], payloads: list[Payload], ctxs: list[Any]
) -> list[torch.Tensor | None]:
    """This rank's decompressed payloads, for the caller's error-feedback update; None where
    the compressor keeps no feedback, or where the entry arrived compressed (whoever
    compressed it, e.g. a fused feedback step, has updated its memory already)."""
    if not c.error_feedback:
        return [None] * len(payloads)
    return [
        kernels.decompress(c, p, x) if e.tensor is not None else None
        for e, p, x in zip(entries, payloads, ctxs, strict=True)
    ]


class AllreduceStrategy(Strategy):
    """SUM payloads (fp16/bf16 casts, none): one allreduce per wire dtype of the bucket.

    With ``average`` each rank divides by the world size *before* the sum (as DDP does, and
    torch's fp16 hook since PR 57410): two ranks at 40000 then average to 40000 in fp16
    instead of overflowing at 80000. A NaN/Inf on any rank still reaches every rank as one.
    """

    name = "allreduce"
    kinds = (Reduction.SUM,)
    takes_payloads = True

    def _start(
        self, backend: Backend, c: Compressor, entries: list[Entry], seed: int, step: int
    ) -> Work[list[Reduced]]:
        size = backend.size
        # the division moves before the sum where the compressor keeps no feedback of its own
        first = self.average and not c.error_feedback and all(e.tensor is not None for e in entries)
        if first and size > 1:
            entries = [Entry(e.key, torch.div(e.tensor, size)) for e in entries]  # type: ignore[arg-type]
        payloads, ctxs = compress_entries(backend, c, entries, seed, step)
        local = local_results(c, entries, payloads, ctxs)
        home = data_device(entries)
        parts = [t for p in payloads for t in p.tensors]
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(parts):
            groups.setdefault(t.dtype, []).append(i)
        works = {
            dt: backend.allreduce(to_backend(backend, torch.cat([parts[i] for i in idx])))
            for dt, idx in groups.items()
        }

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
            for j, t in enumerate(torch.tensor_split(_flat(e), p))
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
                shaped = total.view(_shape(e))
                loc = None if local[i] is None else local[i].view(_shape(e))  # type: ignore[union-attr]
                out.append(Reduced(self._finish(shaped, p, _dtype(e)), loc))
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


class TernarySumStrategy(Strategy):
    """TernGrad as a SUM (Wen et al. 2017, https://arxiv.org/abs/1705.07878): with a scaler
    ``S`` shared by all ranks, the ternary values are small integers that add up exactly.

    One allreduce of the raw values (int8, int16 beyond 127 ranks) per bucket: ``2(P-1)/P·n``
    bytes per rank against ``(P-1)·n/4`` for an allgather of 2-bit codes, so it pays from about
    8 ranks on. Needs a compressor with ``ternarize(tensor, seed=, shared=) -> (values,
    scaler)`` (:class:`~gradzip.compress.terngrad.TernGrad`).
    """

    name = "ternary_sum"
    kinds = (Reduction.GATHER,)

    def _start(
        self, backend: Backend, c: Compressor, entries: list[Entry], seed: int, step: int
    ) -> Work[list[Reduced]]:
        ternarize = getattr(c, "ternarize", None)
        if ternarize is None:
            raise CompressionError(
                f"strategy 'ternary_sum' needs a compressor with ternarize() (terngrad); "
                f"got {c.spec()!r}"
            )
        tensors = [_flat(e) for e in entries]
        shared = agree_shared(backend, c, tensors, kernel=False)  # ternarize is torch code
        ternary = [
            ternarize(t, seed=derive_seed(seed, step, e.key, backend.rank), shared=s)
            for e, t, s in zip(entries, tensors, shared, strict=True)
        ]
        wire = torch.int8 if backend.size <= 127 else torch.int16
        flat = (
            torch.cat([v.to(wire) for v, _ in ternary]) if ternary else torch.empty(0, dtype=wire)
        )
        home = flat.device
        work = backend.allreduce(to_backend(backend, flat))

        def finish(summed: torch.Tensor) -> list[Reduced]:
            out = []
            pieces = summed.to(home).split([t.numel() for t in tensors])
            for e, piece, (values, scaler) in zip(entries, pieces, ternary, strict=True):
                total = (piece.to(torch.float32) * scaler).view(_shape(e))
                loc = (
                    (values.to(torch.float32) * scaler).view(_shape(e))
                    if c.error_feedback
                    else None
                )
                out.append(Reduced(self._finish(total, backend.size, _dtype(e)), loc))
            return out

        return MappedWork(work, finish)


def _flat(e: Entry) -> torch.Tensor:
    if e.tensor is None:
        raise CompressionError(f"entry {e.key!r}: scatter_gather needs the gradient, not a payload")
    return e.tensor.reshape(-1)


def _shape(e: Entry) -> torch.Size:
    assert e.tensor is not None
    return e.tensor.shape


def _dtype(e: Entry) -> torch.dtype:
    assert e.tensor is not None
    return e.tensor.dtype


def strategy_for(
    compressor: Compressor,
    *,
    gather: str = "allgather",
    sparse: str = "allgather",
    average: bool = True,
    verify: bool = True,
) -> Strategy:
    """The strategy for ``compressor.reduction``; ``gather`` picks ``"allgather"``,
    ``"scatter_gather"`` or ``"ternary_sum"`` (TernGrad only) for GATHER; ``sparse`` picks
    ``"allgather"`` or ``"recursive"``."""
    from gradzip.allreduce.sparse import SparseStrategy  # sparse.py builds on this module

    kind = compressor.reduction
    option, value = {
        Reduction.SUM: ("sum", "allreduce"),
        Reduction.GATHER: ("gather", gather),
        Reduction.SPARSE: ("sparse", sparse),
        Reduction.FACTORS: ("factors", "allgather"),
    }[kind]
    tables: dict[Reduction, dict[str, type[Strategy]]] = {
        Reduction.SUM: {"allreduce": AllreduceStrategy},
        Reduction.GATHER: {
            "allgather": AllgatherStrategy,
            "scatter_gather": ScatterGatherStrategy,
            "ternary_sum": TernarySumStrategy,
        },
        Reduction.SPARSE: {"allgather": AllgatherStrategy, "recursive": SparseStrategy},
        Reduction.FACTORS: {"allgather": AllgatherStrategy},
    }
    table = tables[kind]
    if value not in table:
        raise ValueError(
            f"{option}={value!r} is not a strategy for {compressor.spec()!r}; "
            f"expected one of {sorted(table)}"
        )
    return table[value](average=average, verify=verify)
