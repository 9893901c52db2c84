"""Top-k selection on the GPU: a threshold, then a compaction kernel (no full sort).

Reference: :mod:`gradzip.compress.topk` (Aji & Heafield 2017, https://arxiv.org/abs/1704.05021);
the payload is the same ``(int32 indices, fp32 values)`` pair, so either side decompresses it.

The kernels:

1. ``_count_kernel``: per block of ``BLOCK`` elements, how many have ``|x| >= threshold``.
2. an exclusive prefix sum of the counts (``torch.cumsum`` over ``n / BLOCK`` numbers) gives
   each block its first output slot;
3. ``_compact_kernel``: each block writes its selected indices and values at its slots, in
   ascending index order (a prefix sum inside the block; no atomics, so the output is
   deterministic). It can also zero two state tensors at the selected positions (DGC's
   momentum factor masking, :mod:`gradzip.compress.kernels.dgc`).

The threshold comes from a sample exactly as in the reference (same generator draws, same
threshold ladder), so ``selection="sampled"`` selects the same set as the reference, and
``selection="exact"`` selects the set of ``torch.topk`` (the ``k`` largest magnitudes; which of
several equal magnitudes at the cut is kept may differ). When more than ``k`` entries pass the
threshold, an exact top-k over those few candidates keeps ``k``. Output order: ascending index.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gradzip.compress.base import CompressionError, Payload, check_dtype, generator
from gradzip.compress.kernels.dispatch import EXACT, block_size, check_launch
from gradzip.compress.topk import MIN_SAMPLE, SparseCtx, TopK, topk_count

F32 = torch.float32

__all__ = [
    "compact",
    "compress",
    "count_above",
    "decompress",
    "select",
    "select_like_reference",
    "supports",
]


@triton.jit
def _count_kernel(
    x_ptr,  # *fp32/fp16/bf16, n elements: the values to select from
    thr_ptr,  # *fp32, 1 element: the magnitude threshold (kept when |x| >= threshold)
    counts_ptr,  # *int32, one per program: how many of its elements pass
    n,  # number of elements
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    keep = (tl.abs(x) >= tl.load(thr_ptr)) & inside
    tl.store(counts_ptr + pid, tl.sum(keep.to(tl.int32), axis=0))


@triton.jit
def _compact_kernel(
    x_ptr,  # *fp32/fp16/bf16, n elements: the values to select from
    thr_ptr,  # *fp32, 1 element: the magnitude threshold
    starts_ptr,  # *int64, one per program: its first output slot (exclusive prefix sum)
    idx_ptr,  # *int32 out: the selected indices, ascending
    val_ptr,  # *fp32 out: the selected values
    u_ptr,  # *fp32, n elements: zeroed where selected and x != 0, when MASK (else unused)
    v_ptr,  # *fp32, n elements: zeroed like u_ptr, when MASK (else unused)
    n,  # number of elements
    BLOCK: tl.constexpr,  # elements per program (must equal the one of _count_kernel)
    MASK: tl.constexpr,  # whether to zero u and v at the selected positions
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    keep = (tl.abs(x) >= tl.load(thr_ptr)) & inside
    slot = tl.load(starts_ptr + pid) + tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + slot, offs.to(tl.int32), mask=keep)
    tl.store(val_ptr + slot, x, mask=keep)
    if MASK:
        sent = keep & (x != 0.0)
        tl.store(u_ptr + offs, tl.zeros_like(x), mask=sent)
        tl.store(v_ptr + offs, tl.zeros_like(x), mask=sent)


def _block(n: int) -> int:
    """Elements per program: large blocks keep the per-block count array (and the interpreter's
    per-program overhead) small."""
    return block_size(n, 1024 if n <= 1 << 16 else 16384)


def count_above(x: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """Per-block counts of ``|x| >= thr`` (int32, one per block of :func:`_block` elements)."""
    check_launch("topk.count", x, thr)
    n = x.numel()
    block = _block(n)
    counts = torch.empty(triton.cdiv(n, block), dtype=torch.int32, device=x.device)
    _count_kernel[(counts.numel(),)](x, thr, counts, n, BLOCK=block, **EXACT)
    return counts


def compact(
    x: torch.Tensor,
    thr: torch.Tensor,
    counts: torch.Tensor,
    mask: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int32 indices, fp32 values)`` of the entries with ``|x| >= thr``, ascending index.

    ``counts`` comes from :func:`count_above` with the same ``x`` and ``thr``. With ``mask``
    ``(u, v)``, both are zeroed in place where an entry is selected and non-zero.
    """
    n = x.numel()
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    total = int(ends[-1]) if ends.numel() else 0
    idx = torch.empty(total, dtype=torch.int32, device=x.device)
    vals = torch.empty(total, dtype=torch.float32, device=x.device)
    u, v = mask if mask is not None else (x, x)
    check_launch("topk.compact", x, thr, idx, vals, u, v)
    if mask is not None and not (u.numel() == v.numel() == n and u.dtype == v.dtype == F32):
        raise CompressionError(f"mask tensors must be fp32 with {n} elements each")
    grid = (counts.numel(),)
    _compact_kernel[grid](
        x, thr, ends - counts, idx, vals, u, v, n, BLOCK=_block(n), MASK=mask is not None, **EXACT
    )
    return idx, vals


def _threshold_ladder(
    x: torch.Tensor, k: int, sample_ratio: float, gen: torch.Generator | None, rounds: int
) -> torch.Tensor:
    """Thresholds to try, in order (fp32 on ``x``'s device): the reference's sample ladder, or
    for exact selection a sample-based guess with margin and 0 (everything) as the last."""
    n = x.numel()
    sample_size = max(MIN_SAMPLE, math.ceil(sample_ratio * n))
    if gen is None:  # exact: any sample works; a strided one needs no generator
        picks = torch.arange(0, n, max(1, n // sample_size), device=x.device)[:sample_size]
        sample_size = picks.numel()
    else:
        picks = torch.randint(n, (sample_size,), generator=gen, device=x.device)
    ordered = torch.sort(x[picks].float().abs(), descending=True).values
    rank = math.ceil(k * sample_size / n)
    if gen is None:  # exact: aim a little low so that one count usually reaches k
        rank = min(sample_size, math.ceil(1.25 * rank) + 8)
    ranks = []
    for _ in range(rounds):
        ranks.append(rank)
        if rank == sample_size:
            break
        rank = min(sample_size, 2 * rank)
    thr = ordered[torch.tensor(ranks, device=x.device) - 1]
    if gen is None:
        thr = torch.cat([thr, thr.new_zeros(1)])  # 0 selects everything: always >= k
    return thr


def select(
    x: torch.Tensor,
    k: int,
    *,
    sample_ratio: float = 0.01,
    gen: torch.Generator | None = None,
    rounds: int = 3,
    mask: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of flat ``x`` by threshold + compaction: ``(int32 indices, fp32 values)``.

    ``gen`` given: the reference's sampled selection (same draws, at most ``k``); None: exact
    (exactly ``k``). ``mask=(u, v)`` zeroes both where selected (see :func:`compact`).
    """
    n = x.numel()
    if k == 0:
        empty = torch.empty(0, dtype=torch.int32, device=x.device)
        return empty, empty.float()
    ladder = _threshold_ladder(x, k, sample_ratio, gen, max(1, rounds) if gen else 3)
    for i in range(ladder.numel()):
        thr = ladder[i : i + 1].contiguous()
        counts = count_above(x, thr)
        if int(counts.sum()) >= k:
            break
    trimmed = int(counts.sum()) > k
    idx, vals = compact(x, thr, counts, None if trimmed else mask)
    if trimmed:  # exact top-k of the few candidates, back in ascending index order
        keep = torch.topk(vals.abs(), k, sorted=False).indices.sort().values
        idx, vals = idx[keep], vals[keep]
        if mask is not None:
            sent = idx[vals != 0].long()
            mask[0].index_fill_(0, sent, 0.0)
            mask[1].index_fill_(0, sent, 0.0)
    if n and idx.numel() > n:
        raise CompressionError(f"selected {idx.numel()} of {n} elements")  # cannot happen
    return idx, vals


def select_like_reference(
    flat: torch.Tensor,
    k: int,
    selection: str,
    sample_ratio: float,
    seed: int,
    mask: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select` with the reference's choice between exact and sampled selection
    (``sparsify_sampled`` falls back to exact when ``k`` is 0 or ``n`` or the sample is ``n``)."""
    n = flat.numel()
    small = k in (0, n) or max(MIN_SAMPLE, math.ceil(sample_ratio * n)) >= n
    gen = None if selection == "exact" or small else generator(seed, flat.device)
    return select(flat, k, sample_ratio=sample_ratio, gen=gen, mask=mask)


def supports(comp: object, tensor: torch.Tensor) -> bool:
    """Every top-k configuration and dtype has a kernel."""
    return isinstance(comp, TopK)


def compress(
    comp: TopK, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
) -> tuple[Payload, SparseCtx]:
    """:meth:`TopK.compress` through the kernels (same wire format, ascending indices)."""
    check_dtype(tensor)
    flat = tensor.reshape(-1).contiguous()  # loaded in its own dtype, fp32 inside the kernel
    idx, vals = select_like_reference(
        flat, topk_count(comp.ratio, flat.numel()), comp.selection, comp.sample_ratio, seed
    )
    return Payload((idx, vals)), SparseCtx(tensor.shape, tensor.dtype, flat.numel())


def decompress(comp: TopK, payload: Payload, ctx: SparseCtx) -> torch.Tensor:
    """The reference decompression (one ``index_add_``; nothing to fuse)."""
    return comp.decompress(payload, ctx)
