"""No compression: the dense fp32 baseline every other method is measured against."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from gradzip.compress.base import (
    Compressor,
    DenseCtx,
    Payload,
    Reduction,
    check_dtype,
    check_parts,
    register,
)

__all__ = ["NoCompression"]


@register("none")
@dataclasses.dataclass(frozen=True)
class NoCompression(Compressor):
    """Sends the gradient as it is (in its own dtype)."""

    reduction: ClassVar[Reduction] = Reduction.SUM

    def compress(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> tuple[Payload, DenseCtx]:
        check_dtype(tensor)
        return Payload((tensor.reshape(-1).contiguous(),)), DenseCtx(tensor.shape, tensor.dtype)

    def decompress(self, payload: Payload, ctx: DenseCtx) -> torch.Tensor:
        check_parts(payload, "none", [ctx.dtype], [math.prod(ctx.shape)])
        return payload[0].view(ctx.shape).to(ctx.dtype)
