"""Error-feedback memory keyed by DDP bucket index, carried per parameter across bucket rebuilds.

DDP regroups parameters into new buckets after its first iteration, so bucket ``i`` may hold
other parameters afterwards. :class:`BucketMemory` remembers which parameters (and sizes) each
bucket index held. When a bucket's layout changes, every stored tensor of the wrapped memory
(residuals; DGC's momenta and velocities) is cut into per-parameter pieces, and each new
bucket is reassembled from the pieces of its parameters: error feedback survives exactly.

Parameters are known by ``id`` inside one process. A pickled memory keeps only the sizes of
each bucket's parameters: after unpickling, a bucket of the same index and sizes takes its
memory back; anything else starts from zero and is counted in ``resets``.
"""

from __future__ import annotations

from typing import Any

import torch

from gradzip.compress.base import CompressionError
from gradzip.compress.memory import Memory

__all__ = ["BucketMemory"]

# (parameter id, or None after unpickling; numel) per tensor of a bucket, in buffer order
Layout = tuple[tuple[int | None, int], ...]


class BucketMemory:
    """``memory`` (any :class:`~gradzip.compress.memory.Memory`) keyed by bucket index, with
    :meth:`track` to call before a bucket is compensated."""

    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.layouts: dict[int, Layout] = {}
        self.pool: dict[str, dict[int, torch.Tensor]] = {}  # field -> parameter id -> piece
        self.rebuilds = 0
        self.resets = 0

    def track(self, index: int, params: list[torch.Tensor], numel: int) -> bool:
        """Record bucket ``index``'s parameters; re-key the memory when they changed.

        Returns True when this call detected a rebuild.
        """
        layout: Layout = tuple((id(p), p.numel()) for p in params)
        if sum(n for _, n in layout) != numel:
            raise CompressionError(
                f"DDP bucket {index} holds {numel} gradient elements but its parameters have "
                f"{sum(n for _, n in layout)}; cannot map its error feedback to parameters"
            )
        old = self.layouts.get(index)
        rebuilt = old is not None and old != layout
        if rebuilt:
            assert old is not None
            if _restored(old) and [n for _, n in old] == [n for _, n in layout]:
                self.layouts[index] = layout  # unpickled memory fits: bind it to these params
                return False
            self._cut()
        if index not in self.layouts and self.pool:
            self._assemble(index, layout)
        self.layouts[index] = layout
        return rebuilt

    def _cut(self) -> None:
        """Cut every stored tensor into per-parameter pieces (a rebuild started)."""
        self.rebuilds += 1
        state = self.memory.state_dict()
        for field, value in state.items():
            if not _is_keyed(value):
                continue
            pool = self.pool.setdefault(field, {})
            for key, flat in value.items():
                layout = self.layouts.get(key)
                if layout is None or _restored(layout):
                    self.resets += 1
                    continue
                pieces = flat.reshape(-1).split([n for _, n in layout])
                pool.update({pid: t for (pid, _), t in zip(layout, pieces, strict=True) if pid})
            state[field] = {}
        self.memory.load_state_dict(state)
        self.layouts.clear()

    def _assemble(self, index: int, layout: Layout) -> None:
        """Memory of the new bucket ``index`` from the pooled per-parameter pieces."""
        state = self.memory.state_dict()
        for field, pool in self.pool.items():
            pieces = [pool.pop(pid, None) if pid is not None else None for pid, _ in layout]
            like = next((p for p in pieces if p is not None), None)
            if like is None:
                continue
            state[field][index] = torch.cat(
                [
                    p.reshape(-1) if p is not None else like.new_zeros(n)
                    for p, (_, n) in zip(pieces, layout, strict=True)
                ]
            )
        self.pool = {f: p for f, p in self.pool.items() if p}
        # earlier buckets of this step may be between compensate and update (DGC's new
        # momenta wait in ``_pending``): loading the state must not drop them
        pending = dict(getattr(self.memory, "_pending", {}))
        self.memory.load_state_dict(state)
        if pending:
            self.memory._pending.update(pending)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        """The wrapped memory's state and each bucket's parameter sizes (no parameter ids)."""
        return {
            "memory": self.memory.state_dict(),
            "layouts": {i: tuple((None, n) for _, n in lay) for i, lay in self.layouts.items()},
            "rebuilds": self.rebuilds,
            "resets": self.resets,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
        self.layouts = {int(i): tuple(lay) for i, lay in state["layouts"].items()}
        self.pool = {}
        self.rebuilds, self.resets = int(state["rebuilds"]), int(state["resets"])


def _restored(layout: Layout) -> bool:
    return all(pid is None for pid, _ in layout)


def _is_keyed(value: Any) -> bool:
    """A memory field that maps bucket keys to tensors (residuals, momenta, velocities)."""
    return isinstance(value, dict) and all(isinstance(t, torch.Tensor) for t in value.values())
