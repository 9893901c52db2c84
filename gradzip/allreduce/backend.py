"""The Backend protocol: the only place that talks to a communication engine.

A backend offers four asynchronous collectives, each returning a :class:`Work` whose ``wait()``
gives the result. Every call is counted in :class:`CommStats` (``backend.stats``), and the
compression ratios reported by the project come from these counts, never from assumptions.

Two byte counts are kept per collective kind:

* ``bytes_in`` — the bytes this rank hands to the engine (the input tensors, padding included).
* ``bytes_sent`` — the bytes this rank puts on the wire under the bandwidth-optimal schedule
  of that collective (see :func:`wire_bytes`): ring allreduce ``2(P-1)/P·n``, ring allgather
  ``(P-1)·m``, alltoall the chunks for the other ranks, broadcast ``n`` at the root. This is the
  number that grows with world size for an allgather and stays flat for an allreduce.

Implementations: ``torch_dist.TorchDistBackend`` (gloo / NCCL), ``horovod.HorovodBackend``,
and :class:`LocalBackend` (a world of one process, for single-process use and simulations).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar, runtime_checkable

import torch

__all__ = [
    "Backend",
    "CommStats",
    "DoneWork",
    "KindStats",
    "LocalBackend",
    "MappedWork",
    "PeerLost",
    "ReduceOp",
    "Work",
    "check_device",
    "check_flat",
    "control",
    "nbytes",
    "on_device",
    "to_backend",
    "wire_bytes",
]

T = TypeVar("T")
U = TypeVar("U")
T_co = TypeVar("T_co", covariant=True)


class PeerLost(RuntimeError):
    """A collective failed because a peer is gone: it crashed or was killed (the engine saw
    its connection close), or it did not join within the backend's timeout. The message
    names the collective (and, from the optimizer or the DDP hook, the bucket)."""


def peer_lost(what: str, rank: int, size: int, timeout: float, exc: BaseException) -> PeerLost:
    """The :class:`PeerLost` for collective ``what`` that failed on ``rank`` with ``exc``."""
    return PeerLost(
        f"{what} failed on rank {rank} of {size}: a peer is gone (it crashed or was killed, "
        f"or it did not join within the timeout of {timeout:g} s); the engine said: "
        f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    )


class ReduceOp(enum.Enum):
    """Elementwise reduction of an allreduce."""

    SUM = "sum"
    MAX = "max"
    MIN = "min"


@runtime_checkable
class Work(Protocol[T_co]):
    """Handle of an asynchronous collective; ``wait()`` blocks and returns the result."""

    def wait(self) -> T_co: ...


class DoneWork(Generic[T]):
    """A Work that is already complete (for size-1 worlds and results computed locally)."""

    def __init__(self, value: T) -> None:
        self._value = value

    def wait(self) -> T:
        return self._value


class MappedWork(Generic[T, U]):
    """``fn(inner.wait())``, evaluated once, on the first ``wait()``."""

    def __init__(self, inner: Work[T], fn: Callable[[T], U]) -> None:
        self._inner = inner
        self._fn = fn
        self._done = False
        self._value: U | None = None

    def wait(self) -> U:
        if not self._done:
            self._value = self._fn(self._inner.wait())
            self._done = True
        return self._value  # type: ignore[return-value]


KINDS = ("allreduce", "allgather", "alltoall", "broadcast")


def wire_bytes(kind: str, nbytes_in: int, world_size: int, *, root: bool = False) -> int:
    """Bytes one rank sends for a collective under its bandwidth-optimal schedule.

    ``nbytes_in`` is what the rank hands to the engine; for ``alltoall`` pass the bytes
    destined for the *other* ranks.
    """
    p = world_size
    if p <= 1:
        return 0
    if kind == "allreduce":  # ring: reduce-scatter + allgather
        return 2 * (p - 1) * nbytes_in // p
    if kind == "allgather":  # ring: every rank forwards every other rank's block once
        return (p - 1) * nbytes_in
    if kind == "alltoall":
        return nbytes_in
    if kind == "broadcast":
        return nbytes_in if root else 0
    raise ValueError(f"unknown collective kind {kind!r}; expected one of {', '.join(KINDS)}")


@dataclasses.dataclass
class KindStats:
    """Counters of one collective kind."""

    calls: int = 0
    bytes_in: int = 0
    bytes_sent: int = 0


@dataclasses.dataclass
class CommStats:
    """What a backend handed to its engine, by collective kind. ``reset()`` between steps."""

    by_kind: dict[str, KindStats] = dataclasses.field(
        default_factory=lambda: {k: KindStats() for k in KINDS}
    )

    def record(self, kind: str, nbytes_in: int, bytes_sent: int) -> None:
        """Count one collective of ``kind``."""
        if kind not in self.by_kind:
            raise ValueError(f"unknown collective kind {kind!r}; expected one of {KINDS}")
        s = self.by_kind[kind]
        s.calls += 1
        s.bytes_in += nbytes_in
        s.bytes_sent += bytes_sent

    @property
    def collectives(self) -> int:
        """Number of collectives of all kinds."""
        return sum(s.calls for s in self.by_kind.values())

    @property
    def bytes_in(self) -> int:
        """Bytes handed to the engine, all kinds."""
        return sum(s.bytes_in for s in self.by_kind.values())

    @property
    def bytes_sent(self) -> int:
        """Bytes put on the wire by this rank (schedule model of :func:`wire_bytes`)."""
        return sum(s.bytes_sent for s in self.by_kind.values())

    def reset(self) -> None:
        for k in self.by_kind:
            self.by_kind[k] = KindStats()

    def snapshot(self) -> dict[str, dict[str, int]]:
        """A plain-dict copy (picklable, for logs and for returning from worker processes)."""
        return {k: dataclasses.asdict(s) for k, s in self.by_kind.items()}


@runtime_checkable
class Backend(Protocol):
    """The collectives gradzip needs from an engine. All are asynchronous.

    * ``allreduce(tensor, op)`` -> Work[Tensor]: elementwise ``op`` over ranks (same shape and
      dtype on every rank). The input may be reduced in place; use the returned tensor.
    * ``allgather(tensor)`` -> Work[list[Tensor]]: every rank's flat tensor, in rank order.
      Sizes may differ between ranks; the dtype must not.
    * ``alltoall(tensors)`` -> Work[list[Tensor]]: ``tensors[j]`` (flat) goes to rank ``j``;
      the result's ``[i]`` came from rank ``i``. Sizes may differ; one dtype for all.
    * ``broadcast(tensor, root)`` -> Work[Tensor]: ``root``'s tensor on every rank (same shape
      and dtype everywhere).

    A call that waits on a peer which died or never arrives fails after the backend's timeout
    instead of hanging.

    ``device`` is where every tensor handed to a collective must live, and where results come
    back: the current CUDA device for NCCL, the CPU for gloo, the gradients' device for
    Horovod. Callers make control tensors with :func:`control` and move data with
    :func:`to_backend`; a tensor on another device is refused (:func:`check_device`).
    """

    @property
    def rank(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def size(self) -> int: ...

    @property
    def stats(self) -> CommStats: ...

    def allreduce(
        self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM
    ) -> Work[torch.Tensor]: ...

    def allgather(
        self, tensor: torch.Tensor, same_size: bool = False
    ) -> Work[list[torch.Tensor]]: ...

    def alltoall(self, tensors: Sequence[torch.Tensor]) -> Work[list[torch.Tensor]]: ...

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> Work[torch.Tensor]: ...


def nbytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s elements."""
    return t.numel() * t.element_size()


def on_device(device: torch.device | str) -> torch.device:
    """``device`` with its index filled in for CUDA (``"cuda"`` -> ``cuda:<current>``), so two
    spellings of one device compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_device(backend: Backend, t: torch.Tensor, what: str) -> None:
    """Raise ValueError unless ``t`` lives on ``backend.device`` (see :class:`Backend`)."""
    if t.device != backend.device:
        raise ValueError(
            f"{what}: a tensor on {t.device} was handed to a collective of a backend on "
            f"{backend.device}; control tensors come from gradzip.allreduce.backend.control() "
            "and data from to_backend()"
        )


def control(
    backend: Backend, values: Sequence[int] | Sequence[float], dtype: torch.dtype
) -> torch.Tensor:
    """A small control tensor (flags, fingerprints, sizes, scalers) on ``backend.device``: the
    one place such tensors are made."""
    return torch.tensor(list(values), dtype=dtype, device=backend.device)


def to_backend(backend: Backend, t: torch.Tensor) -> torch.Tensor:
    """``t`` on ``backend.device`` (itself when it is there already)."""
    return t if t.device == backend.device else t.to(backend.device)


def check_flat(t: torch.Tensor, what: str) -> None:
    """Raise ValueError unless ``t`` is one-dimensional."""
    if t.dim() != 1:
        raise ValueError(f"{what} needs a flat (1-D) tensor, got shape {tuple(t.shape)}")


class LocalBackend:
    """A world of one rank: every collective returns its input. Counts calls like the others.

    Used by single-process code paths and by simulations of the distributed algorithms.
    ``device`` (default CPU) is where control tensors are made; being a world of one it moves
    nothing, so it takes data on any device.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self._stats = CommStats()
        self._device = on_device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return 1

    @property
    def stats(self) -> CommStats:
        return self._stats

    def allreduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM) -> Work[torch.Tensor]:
        self._stats.record("allreduce", nbytes(tensor), 0)
        return DoneWork(tensor)

    def allgather(self, tensor: torch.Tensor, same_size: bool = False) -> Work[list[torch.Tensor]]:
        check_flat(tensor, "allgather")
        self._stats.record("allgather", nbytes(tensor), 0)
        return DoneWork([tensor])

    def alltoall(self, tensors: Sequence[torch.Tensor]) -> Work[list[torch.Tensor]]:
        if len(tensors) != 1:
            raise ValueError(f"alltoall needs one tensor per rank (1), got {len(tensors)}")
        check_flat(tensors[0], "alltoall")
        self._stats.record("alltoall", nbytes(tensors[0]), 0)
        return DoneWork([tensors[0]])

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> Work[torch.Tensor]:
        if root != 0:
            raise ValueError(f"broadcast root {root} is not a rank of a world of size 1")
        self._stats.record("broadcast", nbytes(tensor), 0)
        return DoneWork(tensor)
