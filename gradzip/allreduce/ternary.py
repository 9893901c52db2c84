"""TernGrad's ternary values as a SUM: one allreduce of small integers."""

from __future__ import annotations

import torch

from gradzip.allreduce.backend import Backend, MappedWork, Work, to_backend
from gradzip.allreduce.entry import Entry, Reduced
from gradzip.allreduce.strategy import (
    Strategy,
    agree_shared,
    flat_gradient,
    gradient_dtype,
    gradient_shape,
)
from gradzip.compress.base import CompressionError, Compressor, Reduction, derive_seed

__all__ = ["TernarySumStrategy"]


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
        tensors = [flat_gradient(e, self.name) for e in entries]
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
                total = (piece.to(torch.float32) * scaler).view(gradient_shape(e))
                loc = (
                    (values.to(torch.float32) * scaler).view(gradient_shape(e))
                    if c.error_feedback
                    else None
                )
                out.append(Reduced(self._finish(total, backend.size, gradient_dtype(e)), loc))
            return out

        return MappedWork(work, finish)
