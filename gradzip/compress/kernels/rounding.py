"""Rounding of fp32 values to the gradient dtype inside the receive-side kernels.

The reference decompresses each rank's payload to the gradient's dtype (``.to(dtype)``: round
to nearest even) before the ranks are summed in fp32; the kernels round the same way, so
``decompress_sum`` equals the sum of the reference's decompressions bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["ROUNDING", "round_to"]

#: the ``ROUND`` code of each gradient dtype, for :func:`round_to`
ROUNDING = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def round_to(value, ROUND: tl.constexpr):
    """fp32 ``value`` rounded to fp16 (``ROUND == 1``) or bf16 (2), to nearest even as torch's
    ``.to(dtype)``, and back to fp32; bf16 by bit arithmetic (finite values), which gives the
    same result compiled and in the interpreter (whose own bf16 cast truncates)."""
    if ROUND == 1:
        value = value.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
    elif ROUND == 2:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    return value
