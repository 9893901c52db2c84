"""A backend double that lives on a device other than the gradients' and refuses the rest.

:class:`DeviceBackend` wraps a real backend (gloo, CPU) and declares ``device`` to be the lazy
tensor device (``lazy:0``, torch's TorchScript lazy backend, which carries real data on a
CPU-only machine). Every tensor handed to one of its collectives must live there, exactly as
an NCCL group demands CUDA tensors; anything else raises :class:`WrongDevice` naming the
collective and the device. The data then runs through the wrapped backend on the CPU and
comes back on the lazy device. A control tensor made on the CPU by a caller (a flag, a
fingerprint, a size) fails here as it would fail on a CUDA backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradzip.allreduce.backend import Backend, CommStats, MappedWork, ReduceOp, Work

__all__ = ["DeviceBackend", "WrongDevice", "lazy_device"]


class WrongDevice(AssertionError):
    """A tensor on another device than the backend's reached a collective."""


def lazy_device() -> torch.device:
    """The lazy tensor device, initialised once per process."""
    import torch._lazy.ts_backend as ts

    if not getattr(lazy_device, "ready", False):
        ts.init()
        lazy_device.ready = True  # type: ignore[attr-defined]
    return torch.device("lazy", 0)


class DeviceBackend:
    """``inner``'s collectives, for tensors on ``device`` only (see the module docstring)."""

    def __init__(self, inner: Backend, device: torch.device) -> None:
        self.inner = inner
        self._device = device
        self.seen: dict[str, int] = {}  # collective kind -> calls that passed the check

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def stats(self) -> CommStats:
        return self.inner.stats

    @property
    def device(self) -> torch.device:
        return self._device

    def _in(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        if t.device != self._device:
            raise WrongDevice(
                f"{kind}: a tensor on {t.device} (dtype {t.dtype}, shape {tuple(t.shape)}) "
                f"reached a backend on {self._device}"
            )
        self.seen[kind] = self.seen.get(kind, 0) + 1
        return t.cpu()

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self._device)

    def allreduce(self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM) -> Work[torch.Tensor]:
        return MappedWork(self.inner.allreduce(self._in(tensor, "allreduce"), op), self._out)

    def allgather(self, tensor: torch.Tensor, same_size: bool = False) -> Work[list[torch.Tensor]]:
        work = self.inner.allgather(self._in(tensor, "allgather"), same_size)
        return MappedWork(work, lambda ts: [self._out(t) for t in ts])

    def alltoall(self, tensors: Sequence[torch.Tensor]) -> Work[list[torch.Tensor]]:
        work = self.inner.alltoall([self._in(t, "alltoall") for t in tensors])
        return MappedWork(work, lambda ts: [self._out(t) for t in ts])

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> Work[torch.Tensor]:
        return MappedWork(self.inner.broadcast(self._in(tensor, "broadcast"), root), self._out)


def wrap(backend: Any) -> DeviceBackend:
    """``backend`` behind a :class:`DeviceBackend` on the lazy device."""
    return DeviceBackend(backend, lazy_device())
