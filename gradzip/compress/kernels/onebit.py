"""1-bit SGD on the GPU: two passes over the gradient, and one receive-side kernel.

Reference and wire format: :mod:`gradzip.compress.onebit` (Seide et al. 2014). Part 0 holds
the sign bits (bit 1 = value < 0, element ``i`` = bit ``i % 8`` of byte ``i // 8``), part 1
the interleaved fp32 scales ``[pos_0, neg_0, pos_1, ...]`` of the groups (columns of the 2-D
view, or flat buckets of ``bucket_size``).

1. ``_stats_kernel``: per-group partial sums of the non-negative and negative values of
   ``v`` (the tensor, or with error feedback ``v = r + g``, computed and not stored) and the
   count of negatives, one partial per tile; the partials are summed in fp64 and the means
   rounded to fp32 as in the reference.
2. ``_pack_kernel``: the sign bytes of ``v`` (recomputing ``r + g``, the same fp32 add), and
   with error feedback ``r = v - decoded`` in place. Nothing is written before both passes
   ran: a NaN/Inf in ``v`` shows in the scales, checked between the passes (the one host sync
   of the step), and leaves the residual as it was. Same memory traffic as adding ``g`` into
   ``r`` in pass 1 (``r`` and ``g`` read twice, ``r`` written once).
3. ``_unpack_sum_kernel`` (receive side): for every element, the decoded values of all ranks'
   payloads (each rounded to the gradient dtype, as the reference's decompress does) summed
   in registers and written once, scaled; no dense tensor per rank.

The sign bytes equal the reference's bit for bit; a scale may differ in its last bit where the
fp32 partial sums are added in another order (exact when the sums are, e.g. for dyadic data).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradzip.compress.base import CompressionError, DenseCtx, Payload, check_dtype
from gradzip.compress.kernels.dispatch import EXACT, block_size, check_launch
from gradzip.compress.kernels.rounding import ROUNDING, round_to
from gradzip.compress.memory import Memory, ResidualMemory, check_finite
from gradzip.compress.onebit import OneBit

__all__ = [
    "Layout",
    "compress",
    "compress_with_feedback",
    "decompress",
    "decompress_sum",
    "layout",
    "pack",
    "scales",
    "supports",
    "unpack_sum",
]


@triton.jit
def _stats_kernel(
    x_ptr,  # *fp32/fp16/bf16, n elements: the tensor, or the fp32 residual r when EF (read)
    g_ptr,  # *fp32/fp16/bf16, n elements: gradient added to x when EF (else unused)
    part_ptr,  # *fp32 out, [3, tiles_along_group, groups]: pos sums, neg sums, neg counts
    n,  # number of elements
    rows,  # rows of the 2-D view (groups when not COLUMNS)
    width,  # width of the 2-D view (groups when COLUMNS)
    groups,  # number of groups
    tiles,  # tiles along the summed axis (the middle dim of part_ptr)
    col_tiles,  # tiles along the width: program p covers tile (p // col_tiles, p % col_tiles)
    EF: tl.constexpr,  # whether the values are x + g
    COLUMNS: tl.constexpr,  # groups are columns (sum over rows) or rows (sum over columns)
    BR: tl.constexpr,  # tile rows
    BC: tl.constexpr,  # tile columns
):
    # a 1-D grid (CUDA allows 2**31 - 1 programs along x, 65535 along y)
    pid = tl.program_id(0).to(tl.int64)
    pr, pc = pid // col_tiles, pid % col_tiles
    r = pr * BR + tl.arange(0, BR)
    c = pc * BC + tl.arange(0, BC)
    offs = r.to(tl.int64)[:, None] * width + c[None, :]
    inside = (r[:, None] < rows) & (c[None, :] < width) & (offs < n)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if EF:
        x = x + tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    neg = x < 0
    pos_part = tl.where(neg, 0.0, x)
    neg_part = tl.where(neg, x, 0.0)
    negs = tl.where(neg & inside, 1.0, 0.0)
    plane = tiles * groups
    if COLUMNS:  # one partial per column of this tile, at [:, pr, c]
        idx = pr * groups + c
        ok = c < width
        tl.store(part_ptr + idx, tl.sum(pos_part, axis=0), mask=ok)
        tl.store(part_ptr + plane + idx, tl.sum(neg_part, axis=0), mask=ok)
        tl.store(part_ptr + 2 * plane + idx, tl.sum(negs, axis=0), mask=ok)
    else:  # one partial per row of this tile, at [:, pc, r]
        idx = pc * groups + r
        ok = r < rows
        tl.store(part_ptr + idx, tl.sum(pos_part, axis=1), mask=ok)
        tl.store(part_ptr + plane + idx, tl.sum(neg_part, axis=1), mask=ok)
        tl.store(part_ptr + 2 * plane + idx, tl.sum(negs, axis=1), mask=ok)


@triton.jit
def _pack_kernel(
    x_ptr,  # *fp32/fp16/bf16, n elements: the values, or the fp32 residual r (in/out) when EF
    g_ptr,  # *fp32/fp16/bf16, n elements: gradient added to x when ADD (else unused)
    scale_ptr,  # *fp32, 2 * groups: interleaved (pos, neg) means
    out_ptr,  # *uint8 out, ceil(n / 8): the sign bytes
    n,  # number of elements
    width,  # group = i % width when COLUMNS, else i // width
    COLUMNS: tl.constexpr,  # how an element finds its group
    EF: tl.constexpr,  # whether to store v - decoded back into x_ptr (fp32 residual)
    ADD: tl.constexpr,  # whether the values are x + g (as in the stats pass)
    BYTES: tl.constexpr,  # output bytes per program (8 elements each)
):
    b = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    offs = b[:, None] * 8 + bit[None, :]
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if ADD:
        x = x + tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    neg = (x < 0).to(tl.int32)
    byte = tl.sum(neg << bit[None, :], axis=1)
    tl.store(out_ptr + b, byte.to(tl.uint8), mask=b * 8 < n)
    if EF:
        group = offs % width if COLUMNS else offs // width
        decoded = tl.load(scale_ptr + 2 * group + neg, mask=inside, other=0.0)
        tl.store(x_ptr + offs, x - decoded, mask=inside)


@triton.jit
def _unpack_sum_kernel(
    bits_ptr,  # *uint8, [ranks, ceil(n / 8)]: every rank's sign bytes
    scale_ptr,  # *fp32, [ranks, 2 * groups]: every rank's interleaved scales
    out_ptr,  # *fp32 out, n elements: factor * sum over ranks of the decoded values
    n,  # number of elements
    nbytes,  # ceil(n / 8), the row stride of bits_ptr
    nscales,  # 2 * groups, the row stride of scale_ptr
    width,  # group = i % width when COLUMNS, else i // width
    ranks,  # number of payloads
    factor,  # fp32: scale of the sum (1 / world size for an average)
    COLUMNS: tl.constexpr,  # how an element finds its group
    ROUND: tl.constexpr,  # round each rank's value to fp32 (0), fp16 (1) or bf16 (2)
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    group = offs % width if COLUMNS else offs // width
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(ranks):
        byte = tl.load(bits_ptr + r * nbytes + offs // 8, mask=inside, other=0).to(tl.int32)
        neg = (byte >> (offs % 8).to(tl.int32)) & 1
        value = tl.load(scale_ptr + r * nscales + 2 * group + neg, mask=inside, other=0.0)
        acc += round_to(value, ROUND)
    tl.store(out_ptr + offs, acc * factor, mask=inside)


class Layout:
    """Groups of a tensor: columns of an ``rows x width`` view, or flat buckets of ``width``."""

    def __init__(self, n: int, rows: int, width: int, columns: bool) -> None:
        self.n, self.rows, self.width, self.columns = n, rows, width, columns
        self.groups = width if columns else rows

    def sizes(self, device: torch.device) -> torch.Tensor:
        """Elements per group (fp64), the last bucket possibly shorter."""
        if self.columns:
            return torch.full((self.groups,), float(self.rows), dtype=torch.float64, device=device)
        sizes = torch.full((self.groups,), float(self.width), dtype=torch.float64, device=device)
        if self.groups:
            sizes[-1] = self.n - (self.groups - 1) * self.width
        return sizes


def layout(shape: torch.Size, columns: bool, min_rows: int, bucket_size: int) -> Layout:
    """The reference's grouping (see :mod:`gradzip.compress.onebit`) for a tensor of ``shape``."""
    n = shape.numel()
    if columns and len(shape) >= 2 and shape[0] >= min_rows and n:
        return Layout(n, shape[0], n // shape[0], True)
    return Layout(n, triton.cdiv(n, bucket_size), bucket_size, False)


def _tile(lay: Layout) -> tuple[int, int]:
    """(rows, columns) of a stats tile: wide along the summed axis, powers of two."""
    total = block_size(lay.n, 8192)
    if lay.columns:
        bc = min(64, triton.next_power_of_2(max(lay.width, 1)))
        return max(1, min(total // bc, triton.next_power_of_2(lay.rows))), bc
    bc = min(total, triton.next_power_of_2(min(lay.width, lay.n)))
    return max(1, total // bc), bc


def scales(x: torch.Tensor, lay: Layout, grad: torch.Tensor | None = None) -> torch.Tensor:
    """Pass 1: the interleaved fp32 scales of flat ``x``, or of ``x + grad`` (``x`` the fp32
    residual; neither is written)."""
    check_launch("onebit.stats", x, *(() if grad is None else (grad,)))
    if lay.n == 0:
        return torch.empty(0, dtype=torch.float32, device=x.device)
    br, bc = _tile(lay)
    grid = (triton.cdiv(lay.rows, br), triton.cdiv(min(lay.width, lay.n), bc))
    tiles = grid[0] if lay.columns else grid[1]
    part = torch.empty(3, tiles, lay.groups, dtype=torch.float32, device=x.device)
    _stats_kernel[(grid[0] * grid[1],)](
        x,
        x if grad is None else grad,
        part,
        lay.n,
        lay.rows,
        lay.width,
        lay.groups,
        tiles,
        grid[1],
        EF=grad is not None,
        COLUMNS=lay.columns,
        BR=br,
        BC=bc,
        **EXACT,
    )
    sums = part.sum(dim=1, dtype=torch.float64)  # [3, groups]
    counts = torch.stack([lay.sizes(x.device) - sums[2], sums[2]], dim=1).clamp_(min=1)
    return (sums[:2].T / counts).to(torch.float32).reshape(-1)


def pack(
    x: torch.Tensor,
    scale: torch.Tensor,
    lay: Layout,
    update: bool,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pass 2: the sign bytes of flat ``x`` (or of ``x + grad``); with ``update``, ``x`` becomes
    those values minus the decoded ones, in place."""
    check_launch("onebit.pack", x, scale, *(() if grad is None else (grad,)))
    out = torch.empty(triton.cdiv(lay.n, 8), dtype=torch.uint8, device=x.device)
    if lay.n:
        per = block_size(out.numel(), 1024)
        _pack_kernel[(triton.cdiv(out.numel(), per),)](
            x,
            x if grad is None else grad,
            scale,
            out,
            lay.n,
            lay.width,
            COLUMNS=lay.columns,
            EF=update,
            ADD=grad is not None,
            BYTES=per,
            **EXACT,
        )
    return out


def unpack_sum(
    bits: torch.Tensor,
    scale: torch.Tensor,
    lay: Layout,
    out: torch.Tensor,
    factor: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Receive side: ``out = factor * sum_r decode(bits[r], scale[r])``; ``bits`` is
    ``[ranks, ceil(n/8)]`` uint8, ``scale`` ``[ranks, 2 * groups]`` fp32, ``out`` flat; each
    decoded value rounded to ``dtype`` first (as the reference's decompress to that dtype)."""
    check_launch("onebit.unpack_sum", bits, scale, out)
    if lay.n:
        block = block_size(lay.n, 2048)
        _unpack_sum_kernel[(triton.cdiv(lay.n, block),)](
            bits,
            scale,
            out,
            lay.n,
            bits.shape[1],
            scale.shape[1],
            lay.width,
            bits.shape[0],
            float(factor),
            COLUMNS=lay.columns,
            ROUND=ROUNDING[dtype],
            BLOCK=block,
            **EXACT,
        )
    return out


def _layout(comp: OneBit, shape: torch.Size) -> Layout:
    return layout(shape, comp.columns, comp.min_rows, comp.bucket_size)


def _finite(scale: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(scale).all()):
        raise CompressionError(
            f"{what} holds NaN or Inf values (or values whose fp32 sum overflows); 1-bit "
            "compression needs finite values"
        )


def supports(comp: object, tensor: torch.Tensor) -> bool:
    """Every 1-bit configuration has a kernel."""
    return isinstance(comp, OneBit)


def compress(
    comp: OneBit, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
) -> tuple[Payload, DenseCtx]:
    """:meth:`OneBit.compress` in two kernels (stats, then signs)."""
    check_dtype(tensor)
    flat = tensor.detach().reshape(-1).contiguous()
    lay = _layout(comp, tensor.shape)
    scale = scales(flat, lay)
    _finite(scale, f"tensor of shape {tuple(tensor.shape)}")
    return Payload((pack(flat, scale, lay, update=False), scale)), DenseCtx(
        tensor.shape, tensor.dtype
    )


def compress_with_feedback(
    comp: OneBit, memory: Memory, key: str | int, grad: torch.Tensor, *, seed: int = 0
) -> tuple[Payload, DenseCtx]:
    """:meth:`OneBit.compress_with_feedback` in two kernels: the stats of ``r + g``, then the
    sign bytes and ``r = r + g - decoded`` in place; one host sync (the scales' finiteness)."""
    if not isinstance(memory, ResidualMemory) or not comp.error_feedback:
        return comp.compress_with_feedback(memory, key, grad, seed=seed)
    check_dtype(grad, f"gradient {key!r}")
    flat = grad.detach().reshape(-1).contiguous()
    residual = memory.residuals.get(key)
    if residual is not None and residual.shape != grad.shape:
        memory.compensate(key, grad)  # raises the reference's shape-mismatch error
    lay = _layout(comp, grad.shape)
    if residual is None:
        values, added = flat.to(torch.float32, copy=True), None
    else:
        values, added = residual.contiguous().view(-1), flat
    scale = scales(values, lay, added)  # reads only: the residual is still the old one
    if not bool(torch.isfinite(scale).all()):  # a NaN/Inf anywhere in r + g reaches a scale
        if memory.check:
            check_finite(key, flat)  # raises, naming the key; the residual is kept
        memory.residuals.pop(key, None)
        raise CompressionError(
            f"gradient {key!r}: the fp32 sum of its compensated values overflows (or holds "
            "NaN/Inf); its error-feedback residual was reset"
        )
    packed = pack(values, scale, lay, update=True, grad=added)
    memory.residuals[key] = values.view(grad.shape)
    return Payload((packed, scale)), DenseCtx(grad.shape, grad.dtype)


def _check_payload(comp: OneBit, payload: Payload, ctx: DenseCtx, lay: Layout) -> None:
    packed, scale = payload
    if packed.numel() != triton.cdiv(lay.n, 8) or scale.numel() != 2 * lay.groups:
        raise CompressionError(
            f"onebit payload has {packed.numel()} sign bytes and {scale.numel()} scales; shape "
            f"{tuple(ctx.shape)} needs {triton.cdiv(lay.n, 8)} and {2 * lay.groups}"
        )


def decompress(comp: OneBit, payload: Payload, ctx: DenseCtx) -> torch.Tensor:
    """:meth:`OneBit.decompress` in one kernel (the one-rank case of :func:`decompress_sum`)."""
    lay = _layout(comp, ctx.shape)
    _check_payload(comp, payload, ctx, lay)
    out = torch.empty(lay.n, dtype=torch.float32, device=payload[0].device)
    unpack_sum(payload[0].view(1, -1), payload[1].view(1, -1), lay, out, dtype=ctx.dtype)
    # fp16/bf16: cast by torch (round to nearest even, as the reference)
    return out.to(ctx.dtype).view(ctx.shape)


def decompress_sum(
    comp: OneBit, payloads: list[Payload], ctxs: list[DenseCtx], *, scale: float = 1.0
) -> torch.Tensor:
    """``scale * sum_r decompress(payloads[r])`` in fp32, one kernel for all ranks."""
    ctx = ctxs[0]
    lay = _layout(comp, ctx.shape)
    for p, c in zip(payloads, ctxs, strict=True):
        if c.shape != ctx.shape or c.dtype != ctx.dtype:
            raise CompressionError(f"ranks disagree on the tensor: {c} vs {ctx}")
        _check_payload(comp, p, c, lay)
    bits = torch.stack([p[0] for p in payloads])  # compressed bytes only: n/8 per rank
    scales_all = torch.stack([p[1] for p in payloads])
    out = torch.empty(lay.n, dtype=torch.float32, device=bits.device)
    return unpack_sum(bits, scales_all, lay, out, scale, ctx.dtype).view(ctx.shape)
