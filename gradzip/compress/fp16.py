"""Half-precision casts (fp16, bf16): 2x smaller payloads that still add elementwise.

fp16 overflows past 65504: a value beyond becomes Inf in the cast. To keep in-range values in
range, an average divides by the world size before the sum (``AllreduceStrategy``, as DDP and
torch's fp16 hook do), so ranks at 40000 average to 40000, not Inf. An Inf or NaN, from the
cast or in the gradient, is carried to every rank as it is (the sum of an Inf is an Inf), so
GradScaler skips the step everywhere. bf16 keeps fp32's range with 8 bits of mantissa.
"""

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
    as_float32_flat,
    check_dtype,
    check_parts,
    register,
)

__all__ = ["BF16", "FP16"]


@dataclasses.dataclass(frozen=True)
class _Cast(Compressor):
    reduction: ClassVar[Reduction] = Reduction.SUM
    wire_dtype: ClassVar[torch.dtype]

    def compress(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> tuple[Payload, DenseCtx]:
        check_dtype(tensor)
        flat = tensor.reshape(-1)
        if flat.dtype != self.wire_dtype:
            flat = as_float32_flat(flat).to(self.wire_dtype)
        return Payload((flat.contiguous(),)), DenseCtx(tensor.shape, tensor.dtype)

    def decompress(self, payload: Payload, ctx: DenseCtx) -> torch.Tensor:
        check_parts(payload, self.name, [self.wire_dtype], [math.prod(ctx.shape)])
        return payload[0].to(ctx.dtype).view(ctx.shape)


@register("fp16")
@dataclasses.dataclass(frozen=True)
class FP16(_Cast):
    """Cast to IEEE half precision (sum-reducible; beware of overflow past 65504)."""

    wire_dtype: ClassVar[torch.dtype] = torch.float16


@register("bf16")
@dataclasses.dataclass(frozen=True)
class BF16(_Cast):
    """Cast to bfloat16 (fp32's exponent range, 8 bits of mantissa)."""

    wire_dtype: ClassVar[torch.dtype] = torch.bfloat16
