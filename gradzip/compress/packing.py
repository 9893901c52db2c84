"""Bit packing: values of ``bits`` bits (1..8) into bytes, and base-3 (5 trits per byte).

These are the reference implementations; the GPU kernels pack into the same wire format.
Within a byte the first value takes the lowest bits (little-endian bit order).
"""

from __future__ import annotations

import torch

from gradzip.compress.base import CompressionError

__all__ = ["pack_base3", "pack_bits", "packed_size", "unpack_base3", "unpack_bits"]

_POW3 = (1, 3, 9, 27, 81)


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` values of ``bits`` bits take once packed."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise CompressionError(f"bits must be an integer in 1..8, got {bits!r}")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in ``[0, 2**bits)`` into ``packed_size(n, bits)`` bytes."""
    _check_bits(bits)
    v = values.reshape(-1).to(torch.uint8)
    n = v.numel()
    if bits == 8:
        return v.clone() if v.data_ptr() == values.data_ptr() else v
    if 8 % bits:
        # any other width: lay the bits out one by one, then pack them 8 to a byte
        shifts = torch.arange(bits, device=v.device, dtype=torch.uint8)
        stream = (v.unsqueeze(1) >> shifts).bitwise_and_(1).reshape(-1)
        return pack_bits(stream, 1)
    per = 8 // bits
    pad = (-n) % per
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    v = v.view(-1, per)
    out = v[:, 0].clone()
    for j in range(1, per):
        out.bitwise_or_(v[:, j] << (j * bits))
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` uint8 values of ``bits`` bits each."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.numel() != packed_size(n, bits):
        raise CompressionError(
            f"packed buffer has {packed.numel()} {packed.dtype} values; {n} values of {bits} "
            f"bits need {packed_size(n, bits)} uint8"
        )
    if bits == 8:
        return packed.reshape(-1)
    if 8 % bits:
        stream = unpack_bits(packed, 1, n * bits).view(n, bits)
        shifts = torch.arange(bits, device=packed.device, dtype=torch.uint8)
        return (stream << shifts).sum(dim=1, dtype=torch.uint8)
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    out = (packed.reshape(-1, 1) >> shifts).bitwise_and_(mask).reshape(-1)
    return out[:n] if out.numel() != n else out


def pack_base3(trits: torch.Tensor) -> torch.Tensor:
    """Pack values in {0, 1, 2} five to a byte (3**5 = 243 <= 256): ceil(n/5) bytes."""
    v = trits.reshape(-1).to(torch.uint8)
    pad = (-v.numel()) % 5
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    v = v.view(-1, 5)
    out = v[:, 0].clone()
    for j in range(1, 5):
        out.add_(v[:, j] * _POW3[j])
    return out


def unpack_base3(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_base3`: ``n`` values in {0, 1, 2} as uint8."""
    if packed.dtype != torch.uint8 or packed.numel() != (n + 4) // 5:
        raise CompressionError(
            f"base-3 buffer has {packed.numel()} {packed.dtype} values; {n} trits need "
            f"{(n + 4) // 5} uint8"
        )
    p = packed.reshape(-1, 1)
    pow3 = torch.tensor(_POW3, dtype=torch.uint8, device=packed.device)
    out = torch.div(p, pow3, rounding_mode="floor").remainder_(3).reshape(-1)
    return out[:n] if out.numel() != n else out
