"""Pick the communication engine a training script already set up (einops-style: by what is in
``sys.modules``, never by importing an optional framework).

Horovod wins when ``horovod.torch`` has been imported and ``hvd.init()`` ran; otherwise
torch.distributed when its default process group is initialised; otherwise a clear error.
"""

from __future__ import annotations

import datetime
import sys

import torch.distributed as dist

from gradzip.allreduce.backend import Backend

__all__ = ["default_backend", "horovod_initialized"]


def horovod_initialized() -> bool:
    """Whether ``horovod.torch`` is imported and ``hvd.init()`` has run (imports nothing)."""
    hvd = sys.modules.get("horovod.torch")
    if hvd is None:
        return False
    try:
        return bool(hvd.is_initialized())
    except (AttributeError, ValueError, RuntimeError):
        return False


def default_backend(*, prefix: str = "gradzip", timeout: float | None = None) -> Backend:
    """The backend of the engine the script initialised: Horovod, else torch.distributed.

    ``prefix`` names Horovod collectives (ranks match them by name, so it must be the same on
    every rank). torch.distributed gets a new process group over all ranks (a collective call:
    every rank must call this at the same point). ``timeout``: seconds a collective may wait
    for its peers before it raises (None: the backend's default, 5 minutes).
    """
    if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
        raise ValueError(f"timeout={timeout!r}; expected seconds > 0, or None for the default")
    if horovod_initialized():
        from gradzip.allreduce.horovod import HorovodBackend

        if timeout is None:
            return HorovodBackend(prefix=prefix)
        return HorovodBackend(prefix=prefix, timeout=float(timeout))
    if dist.is_available() and dist.is_initialized():
        from gradzip.allreduce.torch_dist import TorchDistBackend

        if timeout is None:
            return TorchDistBackend()
        return TorchDistBackend(timeout=datetime.timedelta(seconds=float(timeout)))
    raise RuntimeError(
        "no communication engine is initialised: call hvd.init() (Horovod) or "
        "torch.distributed.init_process_group(...) before building a gradzip "
        "DistributedOptimizer, or pass backend=... (e.g. gradzip.allreduce.backend."
        "LocalBackend() for a single process)"
    )
