"""QSGD on the GPU: bucket norms, stochastic quantization + packing, receive-side sum.

Reference and wire format: :mod:`gradzip.compress.qsgd` (Alistarh et al. 2017,
https://arxiv.org/abs/1610.02132). Part 0 holds one ``b``-bit code ``(level << 1) | negative``
per element, element ``i`` in bits ``i*b .. i*b+b-1`` of the little-endian bit stream (the
layout of ``packing.pack_bits``); part 1 the fp32 norm of each bucket.

1. ``_norm_kernel``: per tile of ``buckets x columns``, the partial sum of squares (``l2``) or
   the partial max of ``|x|`` (``max``, NaN counted as Inf) of each bucket; the partials are
   reduced by torch (the sums in fp64, then one rounding to fp32).
2. ``_quantize_kernel``: per group of 8 elements (``b`` whole bytes), the levels drawn with
   ``tl.rand4x(seed, element index // 4)`` (:mod:`.uniform`), packed into one 64-bit word,
   written as ``b`` bytes.
3. ``_unpack_sum_kernel`` (receive side): every rank's codes decoded, scaled by the rank's
   bucket step, rounded to the gradient dtype as the reference's decompress does
   (:func:`round_to`), and summed in registers; one write per element, no dense tensor per
   rank.

Bit for bit with the reference: the ``max`` norms, the scales ``levels / norm`` and steps
``norm / levels`` (computed by torch on the ``G`` norms), the payload sizes and every
decompression (kernel and reference decode the same bytes to the same values). Not bit for bit:
the ``l2`` norms (another summation order) and the levels (Philox is not torch's
generator); both are unbiased, which the tests check. The Elias-gamma mode (``elias=True``)
has no kernel: :func:`supports` is False for it and the dispatch takes the torch path.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gradzip.compress.base import CompressionError, DenseCtx, Payload, check_dtype
from gradzip.compress.kernels.dispatch import EXACT, block_size, check_launch
from gradzip.compress.kernels.rounding import ROUNDING, round_to
from gradzip.compress.kernels.uniform import uniform_quads
from gradzip.compress.packing import packed_size
from gradzip.compress.qsgd import QSGD

__all__ = ["compress", "decompress", "decompress_sum", "norms", "quantize", "supports"]


@triton.jit
def _norm_kernel(
    x_ptr,  # *fp32/fp16/bf16, n elements: the tensor, flat
    part_ptr,  # *fp32 out, [tiles, buckets]: partial sums of squares or partial maxima
    n,  # number of elements
    buckets,  # number of buckets G
    bucket,  # elements per bucket (the last one may be shorter)
    tiles,  # tiles along a bucket (the first dim of part_ptr)
    MAX: tl.constexpr,  # max |x| (NaN as Inf) instead of the sum of squares
    BR: tl.constexpr,  # buckets per tile
    BC: tl.constexpr,  # elements of a bucket per tile
):
    # a 1-D grid (CUDA allows 2**31 - 1 programs along x, 65535 along y)
    pid = tl.program_id(0).to(tl.int64)
    pr, pc = pid // tiles, pid % tiles
    r = pr * BR + tl.arange(0, BR)
    c = pc * BC + tl.arange(0, BC)
    offs = r.to(tl.int64)[:, None] * bucket + c[None, :]
    inside = (r[:, None] < buckets) & (c[None, :] < bucket) & (offs < n)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if MAX:
        part = tl.max(tl.where(x != x, float("inf"), tl.abs(x)), axis=1)
    else:
        part = tl.sum(x * x, axis=1)
    tl.store(part_ptr + pc * buckets + r, part, mask=r < buckets)


@triton.jit
def _quantize_kernel(
    x_ptr,  # *fp32/fp16/bf16, n elements: the tensor, flat
    scale_ptr,  # *fp32, G: levels / norm of each bucket (0 for a zero norm)
    out_ptr,  # *uint8 out, ceil(n * BITS / 8): the packed codes
    n,  # number of elements
    nbytes,  # ceil(n * BITS / 8)
    bucket,  # elements per bucket
    levels,  # fp32: the number of levels s
    seed,  # int: the random stream; element i draws u_i of uniform.py
    BITS: tl.constexpr,  # bits per code: level bits + 1 sign bit (2..8)
    GROUPS: tl.constexpr,  # groups of 8 elements (BITS bytes) per program
):
    g = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    j = tl.arange(0, 8)
    offs = g[:, None] * 8 + j[None, :]
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs // bucket, mask=inside, other=0.0)
    a = tl.minimum(tl.abs(x) * scale, levels)
    level = tl.floor(a)
    u = tl.reshape(uniform_quads(seed, g[:, None] * 2 + tl.arange(0, 2)[None, :]), GROUPS, 8)
    level += tl.where(u < a - level, 1.0, 0.0)  # up with probability a - floor(a): E = a
    negative = (x < 0) & (level > 0)
    code = (level.to(tl.int64) << 1) | negative.to(tl.int64)
    word = tl.sum(tl.where(inside, code << (j[None, :] * BITS).to(tl.int64), 0), axis=1)
    k = tl.arange(0, 8)  # byte k of a group: bits 8k .. 8k+7 of its word
    byte = (word[:, None] >> (k[None, :] * 8).to(tl.int64)) & 0xFF
    at = g[:, None] * BITS + k[None, :]
    tl.store(out_ptr + at, byte.to(tl.uint8), mask=(k[None, :] < BITS) & (at < nbytes))


@triton.jit
def _unpack_sum_kernel(
    code_ptr,  # *uint8, [ranks, nbytes]: every rank's packed codes
    step_ptr,  # *fp32, [ranks, G]: every rank's norm / levels per bucket
    out_ptr,  # *fp32 out, n elements: factor * sum over ranks of the decoded values
    n,  # number of elements
    nbytes,  # ceil(n * BITS / 8), the row stride of code_ptr
    buckets,  # G, the row stride of step_ptr
    bucket,  # elements per bucket
    ranks,  # number of payloads
    factor,  # fp32: scale of the sum (1 / world size for an average)
    BITS: tl.constexpr,  # bits per code
    ROUND: tl.constexpr,  # round each rank's value to fp32 (0), fp16 (1) or bf16 (2)
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    first = offs * BITS
    lo, shift = first // 8, (first % 8).to(tl.int32)
    has_hi = inside & (lo + 1 < nbytes)
    b = offs // bucket
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(ranks):
        row = code_ptr + r * nbytes
        pair = tl.load(row + lo, mask=inside, other=0).to(tl.int32)
        pair |= tl.load(row + lo + 1, mask=has_hi, other=0).to(tl.int32) << 8
        code = (pair >> shift) & ((1 << BITS) - 1)
        level = (code >> 1).to(tl.float32)
        value = tl.where((code & 1) != 0, -level, level)
        value = value * tl.load(step_ptr + r * buckets + b, mask=inside, other=0.0)
        acc += round_to(value, ROUND)
    tl.store(out_ptr + offs, acc * factor, mask=inside)


def supports(comp: object, tensor: torch.Tensor) -> bool:
    """Fixed-width QSGD has a kernel; the Elias-gamma mode stays on the torch path."""
    return isinstance(comp, QSGD) and not comp.elias


def _tile(n: int, bucket: int) -> tuple[int, int]:
    """(buckets, elements) of a norm tile: powers of two, wide along the bucket."""
    total = block_size(n, 4096)
    bc = min(total, triton.next_power_of_2(max(1, min(bucket, n))))
    return max(1, total // bc), bc


def norms(flat: torch.Tensor, bucket: int, norm: str) -> torch.Tensor:
    """fp32 norm (``"l2"`` or ``"max"``) of each bucket of ``bucket`` elements of ``flat``."""
    check_launch("qsgd.norms", flat)
    n = flat.numel()
    buckets = triton.cdiv(n, bucket)
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=flat.device)
    br, bc = _tile(n, bucket)
    tiles = triton.cdiv(min(bucket, n), bc)
    part = torch.empty(tiles, buckets, dtype=torch.float32, device=flat.device)
    _norm_kernel[(triton.cdiv(buckets, br) * tiles,)](
        flat, part, n, buckets, bucket, tiles, MAX=norm == "max", BR=br, BC=bc, **EXACT
    )
    if norm == "max":
        return part.amax(dim=0)
    return part.sum(dim=0, dtype=torch.float64).sqrt_().to(torch.float32)


def quantize(flat: torch.Tensor, scale: torch.Tensor, comp: QSGD, seed: int) -> torch.Tensor:
    """The packed codes of ``flat`` (``comp.bits`` bits each) given the per-bucket ``scale``."""
    check_launch("qsgd.quantize", flat, scale)
    n, bits = flat.numel(), comp.bits
    out = torch.empty(packed_size(n, bits), dtype=torch.uint8, device=flat.device)
    if n:
        groups = block_size(n, 1024) // 8 or 1
        _quantize_kernel[(triton.cdiv(n, 8 * groups),)](
            flat, scale, out, n, out.numel(), comp.bucket_size, float(comp.levels),
            _seed(seed), BITS=bits, GROUPS=groups, **EXACT,
        )  # fmt: skip
    return out


def _seed(seed: int) -> int:
    """``seed`` as a non-negative 63-bit integer (``derive_seed`` gives those already)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CompressionError(f"qsgd seed={seed!r}: expected an integer")
    return seed % (1 << 63)


def compress(
    comp: QSGD, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
) -> tuple[Payload, DenseCtx]:
    """:meth:`QSGD.compress` (fixed width) in two kernels: bucket norms, then quantize + pack."""
    if comp.elias:
        raise CompressionError("qsgd elias=True has no kernel; use the torch path (dispatch)")
    check_dtype(tensor)
    flat = tensor.detach().reshape(-1).contiguous()
    norm = norms(flat, comp.bucket_size, comp.norm)
    if not bool(torch.isfinite(norm).all()):
        raise CompressionError(
            f"tensor of shape {tuple(tensor.shape)} holds NaN or Inf values (or its bucket "
            "norms overflow fp32); QSGD needs finite values"
        )
    scale = torch.where(norm > 0, comp.levels / norm, 0.0)  # as the reference: bit for bit
    packed = quantize(flat, scale, comp, seed)
    return Payload((packed, norm)), DenseCtx(tensor.shape, tensor.dtype)


def _check(comp: QSGD, payload: Payload, ctx: DenseCtx, shape: torch.Size) -> int:
    """The element count of a payload after checking its parts against ``shape``."""
    if len(payload) != 2 or ctx.shape != shape:
        raise CompressionError(
            f"qsgd payload of {len(payload)} parts for shape {tuple(ctx.shape)}; expected 2 "
            f"parts and, for every rank, shape {tuple(shape)}"
        )
    packed, norm = payload
    n = math.prod(ctx.shape)
    buckets = -(-n // comp.bucket_size)
    if norm.numel() != buckets or norm.dtype != torch.float32:
        raise CompressionError(
            f"qsgd payload has {norm.numel()} {norm.dtype} norms; {n} elements in buckets of "
            f"{comp.bucket_size} need {buckets} torch.float32"
        )
    if packed.numel() != packed_size(n, comp.bits) or packed.dtype != torch.uint8:
        raise CompressionError(
            f"qsgd payload has {packed.numel()} {packed.dtype} code bytes; {n} codes of "
            f"{comp.bits} bits need {packed_size(n, comp.bits)} torch.uint8"
        )
    return n


def decompress_sum(
    comp: QSGD, payloads: list[Payload], ctxs: list[DenseCtx], *, scale: float = 1.0
) -> torch.Tensor:
    """``scale * sum_r decompress(payloads[r], ctxs[r])`` in fp32, one kernel for all ranks.

    Each rank's value is rounded to its ctx dtype first, so the result equals the fp32 sum of
    the reference's decompressions, added in rank order, bit for bit.
    """
    if comp.elias:
        raise CompressionError("qsgd elias=True has no kernel; use the torch path (dispatch)")
    ctx = ctxs[0]
    if any(c.dtype != ctx.dtype for c in ctxs):
        raise CompressionError(f"ranks disagree on the dtype: {[str(c.dtype) for c in ctxs]}")
    n = 0
    for p, c in zip(payloads, ctxs, strict=True):
        n = _check(comp, p, c, ctx.shape)
    codes = torch.stack([p[0] for p in payloads])  # compressed bytes only
    steps = torch.stack([p[1] for p in payloads]) / comp.levels  # as the reference, per bucket
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    check_launch("qsgd.unpack_sum", codes, steps, out)
    if n:
        block = block_size(n, 1024)
        _unpack_sum_kernel[(triton.cdiv(n, block),)](
            codes, steps, out, n, codes.shape[1], steps.shape[1], comp.bucket_size,
            len(payloads), float(scale), BITS=comp.bits, ROUND=ROUNDING[ctx.dtype], BLOCK=block,
            **EXACT,
        )  # fmt: skip
    return out.view(ctx.shape)


def decompress(comp: QSGD, payload: Payload, ctx: DenseCtx) -> torch.Tensor:
    """:meth:`QSGD.decompress` in one kernel (the one-rank case of :func:`decompress_sum`)."""
    return decompress_sum(comp, [payload], [ctx]).to(ctx.dtype)
