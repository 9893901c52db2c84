"""Start every rank from the same model and optimizer state (as Horovod's
``broadcast_parameters`` / ``broadcast_optimizer_state``).

Run both once, after building the model and the optimizer and before training (and after
loading a checkpoint on the root rank only). Error-feedback residuals are per rank and are
*not* broadcast: a gradzip optimizer keeps its own.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from gradzip.allreduce.auto import default_backend
from gradzip.allreduce.backend import Backend, control, to_backend

__all__ = ["broadcast_optimizer_state", "broadcast_parameters"]

Params = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[torch.Tensor]


def _tensors(params: Params) -> list[torch.Tensor]:
    if isinstance(params, Mapping):
        return [params[k] for k in sorted(params)]
    out = []
    for item in params:
        t = item[1] if isinstance(item, tuple) else item
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"broadcast_parameters expects tensors, (name, tensor) pairs or a state_dict, "
                f"got an item of type {type(t).__name__}"
            )
        out.append(t)
    return out


def _check_root(root_rank: int, backend: Backend) -> None:
    if not 0 <= root_rank < backend.size:
        raise ValueError(f"root_rank={root_rank} is not a rank of a world of size {backend.size}")


def broadcast_parameters(
    params: Params, root_rank: int = 0, *, backend: Backend | None = None
) -> None:
    """Overwrite ``params`` in place with ``root_rank``'s values: a ``state_dict()``
    (broadcast in sorted-key order), ``named_parameters()`` or tensors. One broadcast per
    dtype."""
    backend = backend if backend is not None else default_backend(prefix="gradzip.bcast")
    _check_root(root_rank, backend)
    tensors = _tensors(params)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            flat = backend.broadcast(to_backend(backend, flat), root_rank).wait().to(flat.device)
            for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
                t.copy_(part.view(t.shape))


def _to_bytes(obj: Any) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def broadcast_optimizer_state(
    optimizer: torch.optim.Optimizer, root_rank: int = 0, *, backend: Backend | None = None
) -> None:
    """Give every rank ``root_rank``'s optimizer state (momentum buffers, step counts, learning
    rates). For a gradzip optimizer its backend is used and its compression state stays."""
    if backend is None:
        backend = getattr(optimizer, "backend", None)
    if backend is None:
        backend = default_backend(prefix="gradzip.bcast")
    _check_root(root_rank, backend)
    state = optimizer.state_dict()
    state.pop("gradzip", None)
    data = _to_bytes(state) if backend.rank == root_rank else torch.empty(0, dtype=torch.uint8)
    size = backend.broadcast(control(backend, [data.numel()], torch.int64), root_rank).wait()
    if backend.rank != root_rank:
        data = torch.empty(int(size[0]), dtype=torch.uint8)
    data = backend.broadcast(to_backend(backend, data), root_rank).wait()
    if backend.rank != root_rank:
        raw = data.cpu().numpy().tobytes()
        loaded = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        optimizer.load_state_dict(loaded)
