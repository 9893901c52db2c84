"""The Backend over ``torch.distributed``: gloo for CPU tensors, NCCL for CUDA tensors.

Variable sizes (``allgather``, ``alltoall``) cost one extra tiny collective that exchanges the
sizes first; the data then travels padded (allgather) or with uneven splits (alltoall, via
``all_to_all_single``, which gloo and NCCL both support). Both collectives are counted.

Timeouts: every collective runs in a process group created with ``timeout`` (default
:data:`DEFAULT_TIMEOUT`). By default :class:`TorchDistBackend` creates its own group over all
ranks with that timeout (``dist.new_group(timeout=...)``), so a dead or missing peer makes the
waiting call raise after ``timeout`` instead of hanging, whatever timeout the user gave
``init_process_group``. On gloo a peer that crashes is detected at once (connection closed);
one that stays alive but never joins is detected after the timeout. On NCCL the timeout is
enforced by its watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default), which aborts
the communicator and raises.

Devices: ``device`` is the current CUDA device for an NCCL group and the CPU otherwise (gloo
with CUDA gradients moves its buffers through the CPU: the callers do it with
``to_backend``). A tensor on another device is refused with a message, not handed to the
engine, where NCCL would fail obscurely and gloo would move it silently.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from gradzip.allreduce.backend import (
    CommStats,
    MappedWork,
    PeerLost,
    ReduceOp,
    Work,
    check_device,
    check_flat,
    nbytes,
    peer_lost,
    wire_bytes,
)

__all__ = ["DEFAULT_TIMEOUT", "TorchDistBackend"]

#: how long a collective may wait for its peers before it raises
DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)

_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.MIN: dist.ReduceOp.MIN,
}


class _TorchWork:
    """A torch.distributed Work that returns ``result`` when done; an engine error while
    waiting becomes a :class:`PeerLost` naming ``what``."""

    def __init__(self, work: Any, result: Any, lost: Callable[[BaseException], PeerLost]) -> None:
        self._work = work
        self._result = result
        self._lost = lost

    def wait(self) -> Any:
        if self._work is not None:
            try:
                self._work.wait()
            except RuntimeError as e:  # DistBackendError, gloo's "Connection closed by peer"
                raise self._lost(e) from e
            self._work = None
        return self._result


class TorchDistBackend:
    """:class:`~gradzip.allreduce.backend.Backend` over ``torch.distributed``.

    ``group``: the process group to use; ``None`` creates a new group over all ranks with
    ``timeout`` (a collective call: every rank must construct its backend). The default
    process group must be initialised first (``dist.init_process_group``).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call "
                "torch.distributed.init_process_group(...) before building TorchDistBackend"
            )
        if group is None:
            group = dist.new_group(timeout=timeout)
        self.group = group
        self.timeout = timeout
        self._rank = dist.get_rank(group)
        self._size = dist.get_world_size(group)
        self._stats = CommStats()
        nccl = dist.get_backend(group) == "nccl"
        self._device = (
            torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        )

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def stats(self) -> CommStats:
        return self._stats

    def _lost(self, what: str) -> Callable[[BaseException], PeerLost]:
        seconds = self.timeout.total_seconds()
        return lambda e: peer_lost(what, self._rank, self._size, seconds, e)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)`` (a torch.distributed call); an engine error becomes PeerLost."""
        try:
            return fn(*args, **kw)
        except RuntimeError as e:
            raise self._lost(what)(e) from e

    def _record(self, kind: str, nbytes_in: int, *, sent: int | None = None) -> None:
        if sent is None:
            sent = wire_bytes(kind, nbytes_in, self._size)
        self._stats.record(kind, nbytes_in, sent)

    def allreduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM) -> Work[torch.Tensor]:
        """Elementwise ``op`` over ranks; reduces a contiguous copy when ``tensor`` is not."""
        check_device(self, tensor, "allreduce")
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        self._record("allreduce", nbytes(tensor))
        what = f"allreduce of {nbytes(tensor)} bytes"
        work = self._call(
            what, dist.all_reduce, tensor, op=_OPS[ReduceOp(op)], group=self.group, async_op=True
        )
        return _TorchWork(work, tensor, self._lost(what))

    def _exchange_sizes(self, n: int) -> list[int]:
        """Every rank's ``n`` (a blocking allgather of one int64 each)."""
        mine = torch.tensor([n], dtype=torch.int64, device=self._device)
        out = [torch.empty_like(mine) for _ in range(self._size)]
        self._record("allgather", nbytes(mine))
        self._call("allgather of the sizes", dist.all_gather, out, mine, group=self.group)
        return [int(t.item()) for t in out]

    def allgather(self, tensor: torch.Tensor, same_size: bool = False) -> Work[list[torch.Tensor]]:
        """Every rank's flat tensor. Sizes may differ: they are exchanged first (a blocking
        allgather of one int64 each), then the tensors are padded, unless ``same_size`` says
        every rank hands a tensor of this size (a payload whose layout follows from a bucket
        layout every rank agreed on): then no exchange."""
        check_flat(tensor, "allgather")
        check_device(self, tensor, "allgather")
        if same_size:
            sizes = [tensor.numel()] * self._size
        else:
            sizes = self._exchange_sizes(tensor.numel())
        width = max(sizes)
        padded = tensor.contiguous()
        if tensor.numel() < width:
            pad = torch.zeros(width - tensor.numel(), dtype=tensor.dtype, device=tensor.device)
            padded = torch.cat([padded, pad])
        out = [torch.empty_like(padded) for _ in range(self._size)]
        self._record("allgather", nbytes(padded))
        what = f"allgather of {nbytes(padded)} bytes"
        work = self._call(what, dist.all_gather, out, padded, group=self.group, async_op=True)
        return MappedWork(
            _TorchWork(work, out, self._lost(what)),
            lambda parts: [p[:s] for p, s in zip(parts, sizes, strict=True)],
        )

    def alltoall(self, tensors: Sequence[torch.Tensor]) -> Work[list[torch.Tensor]]:
        """``tensors[j]`` goes to rank ``j``; sizes may differ (exchanged first)."""
        if len(tensors) != self._size:
            raise ValueError(
                f"alltoall needs one tensor per rank ({self._size}), got {len(tensors)}"
            )
        for t in tensors:
            check_flat(t, "alltoall")
            check_device(self, t, "alltoall")
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) != 1:
            raise ValueError(
                f"alltoall tensors must share one dtype, got {sorted(map(str, dtypes))}"
            )
        send_sizes = [t.numel() for t in tensors]
        mine = torch.tensor(send_sizes, dtype=torch.int64, device=self._device)
        theirs = torch.empty_like(mine)
        self._record("alltoall", nbytes(mine), sent=nbytes(mine) * (self._size - 1) // self._size)
        self._call("alltoall of the sizes", dist.all_to_all_single, theirs, mine, group=self.group)
        recv_sizes = [int(v) for v in theirs.tolist()]
        send = torch.cat([t.contiguous() for t in tensors])
        recv = torch.empty(sum(recv_sizes), dtype=send.dtype, device=send.device)
        to_others = nbytes(send) - nbytes(tensors[self._rank])
        self._record("alltoall", nbytes(send), sent=to_others)
        what = f"alltoall of {nbytes(send)} bytes"
        work = self._call(
            what,
            dist.all_to_all_single,
            recv,
            send,
            output_split_sizes=recv_sizes,
            input_split_sizes=send_sizes,
            group=self.group,
            async_op=True,
        )
        return MappedWork(
            _TorchWork(work, recv, self._lost(what)), lambda buf: list(buf.split(recv_sizes))
        )

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> Work[torch.Tensor]:
        """``root``'s tensor on every rank (in place on a contiguous tensor)."""
        if not 0 <= root < self._size:
            raise ValueError(f"broadcast root {root} is not a rank of a world of size {self._size}")
        check_device(self, tensor, "broadcast")
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        src = dist.get_global_rank(self.group, root)
        self._record("broadcast", nbytes(tensor), sent=nbytes(tensor) if root == self._rank else 0)
        what = f"broadcast of {nbytes(tensor)} bytes from rank {root}"
        work = self._call(what, dist.broadcast, tensor, src=src, group=self.group, async_op=True)
        return _TorchWork(work, tensor, self._lost(what))
