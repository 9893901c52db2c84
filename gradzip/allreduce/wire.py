"""The wire format of a fused bucket: many payloads as one flat byte buffer.

Wire format of a gathered bucket (:func:`pack` / :func:`unpack`): an int32 header
``[parts, numel_0, ..., numel_{parts-1}]`` followed by the raw bytes of every payload part, in
order, without padding. The header makes payloads of varying size (sampled top-k, DGC, SFB
batch factors) self-describing; the dtypes and the number of parts of each payload come from
the receiver's own payloads of the same bucket, which the consistency check has shown to be
built by the same compressor for the same keys. The header costs ``4 * (1 + parts)`` bytes
and is counted like everything else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradzip.compress.base import CompressionError, Payload

__all__ = ["pack", "unpack"]


def pack(payloads: Sequence[Payload]) -> torch.Tensor:
    """Payloads as one flat uint8 buffer: int32 header of part sizes, then the parts' bytes."""
    parts = [t for p in payloads for t in p.tensors]
    device = parts[0].device if parts else torch.device("cpu")
    header = torch.tensor([len(parts)] + [t.numel() for t in parts], dtype=torch.int32)
    chunks = [header.to(device).view(torch.uint8)]
    chunks += [t.contiguous().view(torch.uint8) for t in parts if t.numel()]
    return torch.cat(chunks)


def _typed(chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View a uint8 slice as ``dtype``; copies when the slice is not aligned for it."""
    size = torch.empty(0, dtype=dtype).element_size()
    if chunk.storage_offset() % size:
        chunk = chunk.clone()
    return chunk.view(dtype)


def unpack(
    buf: torch.Tensor, template: Sequence[Payload], *, source: str = "peer"
) -> list[Payload]:
    """Inverse of :func:`pack`; dtypes and part counts come from ``template`` (own payloads)."""
    dtypes = [[t.dtype for t in p.tensors] for p in template]
    n_parts = sum(len(d) for d in dtypes)
    if buf.numel() < 4:
        raise CompressionError(f"{source} sent a fused buffer of {buf.numel()} bytes; no header")
    count = int(_typed(buf[:4], torch.int32)[0])
    if count != n_parts:
        raise CompressionError(
            f"{source} sent {count} payload parts for a bucket whose payloads have {n_parts}"
        )
    head = 4 * (1 + count)
    numels = _typed(buf[4:head], torch.int32).tolist()
    offset, k, out = head, 0, []
    for part_dtypes in dtypes:
        parts = []
        for dtype in part_dtypes:
            size = numels[k] * torch.empty(0, dtype=dtype).element_size()
            parts.append(_typed(buf[offset : offset + size], dtype))
            offset, k = offset + size, k + 1
        out.append(Payload(tuple(parts)))
    if offset != buf.numel():
        raise CompressionError(
            f"{source} sent a fused buffer of {buf.numel()} bytes; its header describes {offset}"
        )
    return out
