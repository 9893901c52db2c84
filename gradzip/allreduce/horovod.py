"""Horovod backend: the :class:`~gradzip.allreduce.backend.Backend` collectives on Horovod.

Horovod (Sergeev & Del Balso 2018, https://arxiv.org/abs/1802.05799) runs every collective on
its own background thread; this backend submits them with Horovod's asynchronous calls
(``allreduce_async_``, ``allgather_async``, ``alltoall_async``, ``broadcast_async_``) and
wraps each handle in a :class:`HorovodWork`. ``horovod.torch`` is imported only when a
:class:`HorovodBackend` is created, so gradzip imports without Horovod installed (build it
with ``make horovod``).

Dtypes Horovod's torch binding lacks are carried losslessly where possible: bfloat16 and bool
travel as int16/uint8 bit patterns through allgather, alltoall and broadcast; an allreduce of
bfloat16 runs in float32 and of 8/16-bit integers in int32 (the wider tensor is what is
handed to the engine, and what the byte counters count).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import torch

from gradzip.allreduce.backend import (
    CommStats,
    PeerLost,
    ReduceOp,
    Work,
    check_device,
    check_flat,
    nbytes,
    wire_bytes,
)

__all__ = ["HorovodBackend", "HorovodWork"]

T = TypeVar("T")

# Dtypes Horovod's torch binding moves as they are (allgather / alltoall / broadcast) ...
_MOVE_NATIVE = frozenset(
    {
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
    }
)
# ... the bit-pattern stand-ins for the others ...
_MOVE_AS = {torch.bfloat16: torch.int16, torch.bool: torch.uint8}
# ... and what an allreduce runs in (Horovod reduces int32/int64/float16/32/64 only).
_REDUCE_NATIVE = frozenset({torch.int32, torch.int64, torch.float16, torch.float32, torch.float64})
_REDUCE_AS = {
    torch.bfloat16: torch.float32,
    torch.uint8: torch.int32,
    torch.int8: torch.int32,
    torch.int16: torch.int32,
}


class HorovodWork(Generic[T]):
    """A Horovod handle; ``wait()`` polls it until done, or raises after ``timeout`` seconds.

    Polling (rather than Horovod's blocking ``synchronize``) is what lets a collective whose
    peer died or never called it fail with a message instead of hanging.
    """

    def __init__(
        self,
        hvd: Any,
        handles: Sequence[int],
        finish: Callable[[list[Any]], T],
        *,
        what: str,
        timeout: float,
    ) -> None:
        self._hvd = hvd
        self._handles = list(handles)
        self._finish = finish
        self._what = what
        self._timeout = timeout
        self._done = False
        self._value: T | None = None

    def wait(self) -> T:
        if not self._done:
            deadline = time.monotonic() + self._timeout
            pause = 1e-5
            while not all(self._hvd.poll(h) for h in self._handles):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"Horovod {self._what} did not complete within {self._timeout:g} s: "
                        "a peer died, or the ranks did not call the same collectives in the "
                        "same order"
                    )
                time.sleep(pause)
                pause = min(2 * pause, 2e-3)
            try:
                results = [self._hvd.synchronize(h) for h in self._handles]
            except RuntimeError as e:  # HorovodInternalError: a peer is gone, or a mismatch
                if "mismatch" in str(e).lower() or "shape" in str(e).lower():
                    raise type(e)(f"Horovod {self._what} failed: {e}") from e
                raise PeerLost(
                    f"Horovod {self._what} failed: a peer is gone (it crashed or was killed, or "
                    f"it did not join within {self._timeout:g} s); Horovod said: {e}"
                ) from e
            self._value = self._finish(results)
            self._done = True
        return self._value  # type: ignore[return-value]


def _movable(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` as a contiguous tensor of a dtype Horovod can move (bit pattern kept)."""
    t = t.contiguous()
    if t.dtype in _MOVE_NATIVE:
        return t
    if t.dtype in _MOVE_AS:
        return t.view(_MOVE_AS[t.dtype])
    allowed = sorted(str(d) for d in (*_MOVE_NATIVE, *_MOVE_AS))
    raise ValueError(f"{what}: Horovod cannot move dtype {t.dtype}; allowed: {', '.join(allowed)}")


class HorovodBackend:
    """:class:`~gradzip.allreduce.backend.Backend` over Horovod (Gloo, MPI or NCCL inside).

    Initialises Horovod if the caller has not. Every rank must issue the same collectives in
    the same order: each gets the name ``{prefix}.{kind}.{n}`` from a per-backend counter, and
    Horovod matches ranks by that name (a shape or dtype mismatch is reported by Horovod under
    it). ``timeout`` (seconds) bounds every ``wait()``.

    ``device``: the current CUDA device when Horovod was built with GPU operations (NCCL) and
    a GPU is present, else the CPU; every tensor handed to a collective must live there.
    """

    def __init__(self, *, timeout: float = 300.0, prefix: str = "gradzip") -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        try:
            import horovod.torch as hvd
        except ImportError as e:
            raise ImportError(
                f"HorovodBackend needs horovod.torch, which failed to import ({e}); "
                "build and install it with `make horovod`"
            ) from e
        if not hvd.is_initialized():
            hvd.init()
        self._hvd = hvd
        self._timeout = float(timeout)
        self._prefix = prefix
        self._seq = 0
        self._stats = CommStats()
        gpu = bool(getattr(hvd, "nccl_built", lambda: False)()) and torch.cuda.is_available()
        self._device = (
            torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        )

    # ------------------------------------------------------------------ world
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return int(self._hvd.rank())

    @property
    def size(self) -> int:
        return int(self._hvd.size())

    @property
    def stats(self) -> CommStats:
        return self._stats

    # ------------------------------------------------------------------ helpers
    def _name(self, kind: str) -> str:
        self._seq += 1
        return f"{self._prefix}.{kind}.{self._seq}"

    def _work(self, handles: Sequence[int], finish: Callable[[list[Any]], T], what: str) -> Work[T]:
        return HorovodWork(self._hvd, handles, finish, what=what, timeout=self._timeout)

    # ------------------------------------------------------------------ collectives
    def allreduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM) -> Work[torch.Tensor]:
        """Elementwise ``op`` over ranks; the result is written into ``tensor`` when it can be."""
        ops = {
            ReduceOp.SUM: self._hvd.Sum,
            ReduceOp.MAX: self._hvd.Max,
            ReduceOp.MIN: self._hvd.Min,
        }
        if op not in ops:
            raise ValueError(f"allreduce op {op!r} is not one of {[o.name for o in ops]}")
        check_device(self, tensor, "allreduce")
        if tensor.dtype in _REDUCE_NATIVE:
            buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        elif tensor.dtype in _REDUCE_AS:
            buf = tensor.to(_REDUCE_AS[tensor.dtype])
        else:
            allowed = sorted(str(d) for d in (*_REDUCE_NATIVE, *_REDUCE_AS))
            raise ValueError(
                f"allreduce: Horovod cannot reduce dtype {tensor.dtype}; allowed: "
                f"{', '.join(allowed)}"
            )
        name = self._name("allreduce")
        self._stats.record(
            "allreduce", nbytes(buf), wire_bytes("allreduce", nbytes(buf), self.size)
        )
        handle = self._hvd.allreduce_async_(buf, name=name, op=ops[op])

        def finish(out: list[Any]) -> torch.Tensor:
            result: torch.Tensor = out[0]
            if result is tensor:
                return tensor
            return tensor.copy_(result.view(tensor.shape))

        return self._work([handle], finish, f"allreduce {name!r}")

    def allgather(self, tensor: torch.Tensor, same_size: bool = False) -> Work[list[torch.Tensor]]:
        """Every rank's flat tensor in rank order; sizes may differ (Horovod gathers natively,
        and the sizes ride along in a second, tiny allgather unless ``same_size`` says every
        rank hands a tensor of this size)."""
        check_flat(tensor, "allgather")
        check_device(self, tensor, "allgather")
        dtype = tensor.dtype
        data = _movable(tensor, "allgather")
        name = self._name("allgather")
        if same_size:
            n = data.numel()
            self._stats.record(
                "allgather", nbytes(data), wire_bytes("allgather", nbytes(data), self.size)
            )

            def split(out: list[Any]) -> list[torch.Tensor]:
                flat = out[0]
                return [flat[r * n : (r + 1) * n].view(dtype) for r in range(self.size)]

            handle = [self._hvd.allgather_async(data, name=name)]
            return self._work(handle, split, f"allgather {name!r}")
        size = torch.tensor([data.numel()], dtype=torch.int64)
        # The per-rank sizes ride along in a second, tiny allgather so the result can be split.
        handles = [
            self._hvd.allgather_async(size, name=name + ".sizes"),
            self._hvd.allgather_async(data, name=name),
        ]
        for t in (size, data):  # two collectives handed to the engine; count both
            self._stats.record(
                "allgather", nbytes(t), wire_bytes("allgather", nbytes(t), self.size)
            )

        def finish(out: list[Any]) -> list[torch.Tensor]:
            sizes, flat = out
            return [c.view(dtype) for c in torch.split(flat, sizes.tolist())]

        return self._work(handles, finish, f"allgather {name!r}")

    def alltoall(self, tensors: Sequence[torch.Tensor]) -> Work[list[torch.Tensor]]:
        """``tensors[j]`` goes to rank ``j``; the result's ``[i]`` came from rank ``i``."""
        if len(tensors) != self.size:
            raise ValueError(
                f"alltoall needs one tensor per rank ({self.size}), got {len(tensors)}"
            )
        for j, t in enumerate(tensors):
            check_flat(t, f"alltoall (tensor for rank {j})")
            check_device(self, t, f"alltoall (tensor for rank {j})")
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1:
            raise ValueError(
                f"alltoall needs one dtype for all tensors, got {sorted(map(str, dtypes))}"
            )
        dtype = tensors[0].dtype
        parts = [_movable(t, "alltoall") for t in tensors]
        splits = torch.tensor([p.numel() for p in parts], dtype=torch.int32)
        name = self._name("alltoall")
        total = sum(nbytes(p) for p in parts)
        to_others = total - nbytes(parts[self.rank])
        self._stats.record("alltoall", total, wire_bytes("alltoall", to_others, self.size))
        handle = self._hvd.alltoall_async(torch.cat(parts), splits=splits, name=name)

        def finish(out: list[Any]) -> list[torch.Tensor]:
            flat, received = out[0]
            return [c.view(dtype) for c in torch.split(flat, received.tolist())]

        return self._work([handle], finish, f"alltoall {name!r}")

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> Work[torch.Tensor]:
        """``root``'s tensor on every rank, written into ``tensor`` when it can be."""
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of a world of size {self.size}")
        check_device(self, tensor, "broadcast")
        buf = _movable(tensor, "broadcast")
        name = self._name("broadcast")
        self._stats.record(
            "broadcast",
            nbytes(buf),
            wire_bytes("broadcast", nbytes(buf), self.size, root=self.rank == root),
        )
        handle = self._hvd.broadcast_async_(buf, root, name=name)

        def finish(out: list[Any]) -> torch.Tensor:
            result: torch.Tensor = out[0].view(tensor.dtype).view(tensor.shape)
            if result.data_ptr() == tensor.data_ptr():
                return tensor
            return tensor.copy_(result)

        return self._work([handle], finish, f"broadcast {name!r}")
