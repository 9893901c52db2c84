"""The :class:`Strategy` base, and the steps every strategy shares: compress a bucket's
entries (with a scaler agreed across ranks where the compressor has one), and this rank's own
decompressed payloads for the error-feedback update.

Strategies reduce compressed payloads over ranks, one per :class:`Reduction` kind:

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

from gradzip.allreduce.backend import Backend, ReduceOp, Work, to_backend
from gradzip.allreduce.consistency import check_consistent
from gradzip.allreduce.entry import Entry, Reduced
from gradzip.compress import kernels
from gradzip.compress.base import CompressionError, Compressor, Payload, Reduction, derive_seed

__all__ = [
    "Strategy",
    "agree_shared",
    "compress_entries",
    "data_device",
    "flat_gradient",
    "gradient_dtype",
    "gradient_shape",
    "local_results",
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
    if compressor.gather_shares_stat():
        agreed = agree_shared(backend, compressor, [t for _, t in todo])
    else:  # each payload carries its own scaler: no blocking allreduce before the gather
        agreed = [None] * len(todo)
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
        #: the reduced tensors may live in buffers the strategy reuses the next step (set by
        #: callers that copy them out first, as the optimizer does into ``.grad``); off, every
        #: step's results are tensors of their own
        self.reuse_buffers = False

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
        """The reduced ``total`` (a tensor of this step's own, never kept) averaged over
        ``size`` ranks when averaging, in ``dtype``: divided in place, no copy when there is
        nothing to divide."""
        if not self.average or size == 1:
            return total.to(dtype)
        if total.dtype == torch.float32 and not total.requires_grad:
            return total.div_(size).to(dtype)
        return (total / size).to(dtype)

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


def flat_gradient(e: Entry, strategy: str) -> torch.Tensor:
    """The entry's gradient as a flat view; ``strategy`` (its name, for the message) splits
    or re-encodes the gradient itself, so it cannot take a precompressed payload."""
    if e.tensor is None:
        raise CompressionError(f"entry {e.key!r}: {strategy} needs the gradient, not a payload")
    return e.tensor.reshape(-1)


def gradient_shape(e: Entry) -> torch.Size:
    """Shape of the entry's gradient (the reduced result keeps it)."""
    assert e.tensor is not None
    return e.tensor.shape


def gradient_dtype(e: Entry) -> torch.dtype:
    """Dtype of the entry's gradient (the reduced result keeps it)."""
    assert e.tensor is not None
    return e.tensor.dtype
