"""TernGrad on the GPU: clipping statistics, stochastic ternarization + packing, receive side.

Reference and wire format: :mod:`gradzip.compress.terngrad` (Wen et al. 2017,
https://arxiv.org/abs/1705.07878). Part 0 holds the trits ``t_i + 1`` in {0, 1, 2}: four per
byte in 2-bit fields (``packing="2bit"``, element ``i`` in bits ``2(i%4)``) or five per byte as
``sum_j (t_j + 1) * 3**j`` (``"base3"``); the padding of the last byte is code 0. Part 1 is
the fp32 scaler.

1. ``_stats_kernel``: per block, the partial sum of squares (for ``sigma = sqrt(mean(g**2))``
   and the clip bound ``c * sigma``) and the partial max of ``|g|`` (NaN counted as Inf);
   torch sums the partials in fp64 and takes ``scaler = min(max|g|, bound)``, which is
   ``max|clip(g)|`` exactly. A shared (MAX-reduced) scaler replaces it when given.
2. ``_ternarize_kernel``: clip, ``b_i = u_i < |g_i| / s`` with ``u_i`` from
   :mod:`.uniform` (Philox on ``(seed, i)``), and the packing, in one pass.
3. ``_unpack_sum_kernel`` (receive side): every rank's trits decoded, times the rank's scaler,
   rounded to the gradient dtype as the reference's decompress does, summed in registers.

Bit for bit with the reference: the scaler without clipping, the packing of a given trit
pattern, the payload sizes and every decompression. The clip bound depends on the sum of
squares, which the kernel adds in another order (equal when that sum is exact), and the trits
come from another generator than the reference's; both are unbiased, which the tests check.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gradzip.compress.base import CompressionError, DenseCtx, Payload, check_dtype
from gradzip.compress.kernels.dispatch import EXACT, block_size, check_launch
from gradzip.compress.kernels.rounding import ROUNDING, round_to
from gradzip.compress.kernels.uniform import uniform, uniform_quads
from gradzip.compress.terngrad import TernGrad

__all__ = [
    "compress",
    "decompress",
    "decompress_sum",
    "packed_bytes",
    "scaler",
    "shared_stat",
    "supports",
    "ternarize",
]


@triton.jit
def _pow3(j):
    """3**j for j in 0..4 (entries beyond are masked by the callers)."""
    return tl.where(j == 0, 1, tl.where(j == 1, 3, tl.where(j == 2, 9, tl.where(j == 3, 27, 81))))


@triton.jit
def _stats_kernel(
    x_ptr,  # *fp32/fp16/bf16, n elements: the gradient, flat
    part_ptr,  # *fp32 out, [2, programs]: partial sums of squares, partial max |x|
    n,  # number of elements
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(x * x, axis=0))
    tl.store(part_ptr + tl.num_programs(0) + pid, tl.max(tl.where(x != x, float("inf"), tl.abs(x))))


@triton.jit
def _ternarize_kernel(
    x_ptr,  # *fp32/fp16/bf16, n elements: the gradient, flat
    stat_ptr,  # *fp32, 2: the clip bound (unused unless CLIP) and the scaler s
    out_ptr,  # *uint8 out, ceil(n / PER): the packed trits
    n,  # number of elements
    nbytes,  # ceil(n / PER)
    seed,  # int: the random stream (element i draws u_i of uniform.py)
    CLIP: tl.constexpr,  # clip to [-bound, bound] first
    BASE3: tl.constexpr,  # five trits per byte in base 3 (else four 2-bit fields)
    BYTES: tl.constexpr,  # output bytes per program
):
    b = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    if BASE3:  # 8 lanes per byte, the first 5 used; one Philox call per lane
        j = tl.arange(0, 8)
        offs = b[:, None] * 5 + j[None, :]
        inside = (j[None, :] < 5) & (offs < n)
        u = uniform(seed, offs)
    else:  # a byte is a quad of elements: one Philox call per byte
        j = tl.arange(0, 4)
        offs = b[:, None] * 4 + j[None, :]
        inside = offs < n
        u = tl.reshape(uniform_quads(seed, b), BYTES, 4)
    g = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if CLIP:
        bound = tl.load(stat_ptr)
        g = tl.minimum(tl.maximum(g, -bound), bound)
    s = tl.load(stat_ptr + 1)
    prob = tl.where(s > 0, tl.math.div_rn(tl.abs(g), tl.where(s > 0, s, 1.0)), 0.0)
    trit = tl.where(u < prob, tl.where(g < 0, 0, 2), 1)  # t + 1
    trit = tl.where(inside, trit, 0)  # padding: code 0, as the reference
    if BASE3:
        byte = tl.sum(trit * _pow3(j)[None, :], axis=1)
    else:
        byte = tl.sum(trit << (2 * j)[None, :], axis=1)
    tl.store(out_ptr + b, byte.to(tl.uint8), mask=b < nbytes)


@triton.jit
def _unpack_sum_kernel(
    code_ptr,  # *uint8, [ranks, nbytes]: every rank's packed trits
    scaler_ptr,  # *fp32, ranks: every rank's scaler
    out_ptr,  # *fp32 out, n elements: factor * sum over ranks of the decoded values
    bad_ptr,  # *int32 out, one per program: 2-bit fields holding code 3 (not a trit)
    n,  # number of elements
    nbytes,  # bytes per rank, the row stride of code_ptr
    ranks,  # number of payloads
    factor,  # fp32: scale of the sum (1 / world size for an average)
    BASE3: tl.constexpr,  # five trits per byte in base 3 (else four 2-bit fields)
    ROUND: tl.constexpr,  # round each rank's value to fp32 (0), fp16 (1) or bf16 (2)
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    per = 5 if BASE3 else 4
    at, j = offs // per, (offs % per).to(tl.int32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for r in range(ranks):
        byte = tl.load(code_ptr + r * nbytes + at, mask=inside, other=1).to(tl.int32)
        if BASE3:
            code = (byte // _pow3(j)) % 3
        else:
            code = (byte >> (2 * j)) & 3
            bad += tl.where(inside & (code == 3), 1, 0)
        value = (code - 1).to(tl.float32) * tl.load(scaler_ptr + r)
        acc += round_to(value, ROUND)
    tl.store(out_ptr + offs, acc * factor, mask=inside)
    tl.store(bad_ptr + pid, tl.sum(bad, axis=0))


def supports(comp: object, tensor: torch.Tensor) -> bool:
    """Every TernGrad configuration (both packings, clipping on or off) has a kernel."""
    return isinstance(comp, TernGrad)


def packed_bytes(comp: TernGrad, n: int) -> int:
    """Bytes of part 0 for ``n`` elements: ``ceil(n / 4)`` (2-bit) or ``ceil(n / 5)`` (base 3)."""
    return -(-n // (5 if comp.packing == "base3" else 4))


def _stats(comp: TernGrad, flat: torch.Tensor) -> torch.Tensor:
    """fp32 ``[bound, scaler]`` of flat ``flat`` (bound = inf without clipping)."""
    check_launch("terngrad.stats", flat)
    n = flat.numel()
    if n == 0:
        return torch.tensor([math.inf, 0.0], device=flat.device)
    block = block_size(n, 4096)
    part = torch.empty(2, triton.cdiv(n, block), dtype=torch.float32, device=flat.device)
    _stats_kernel[(part.shape[1],)](flat, part, n, BLOCK=block, **EXACT)
    top = part[1].amax()
    if not comp.clip:
        return torch.stack([top.new_tensor(math.inf), top])
    norm = part[0].sum(dtype=torch.float64).sqrt_().to(torch.float32)
    bound = float(comp.clip) * (norm / math.sqrt(n))  # the reference's fp32 ops, in order
    return torch.stack([bound, torch.minimum(top, bound)])


def scaler(comp: TernGrad, tensor: torch.Tensor) -> torch.Tensor:
    """``[bound, scaler]`` (fp32) of ``tensor``, checked finite like the reference's."""
    check_dtype(tensor)
    stat = _stats(comp, tensor.detach().reshape(-1).contiguous())
    if not bool(torch.isfinite(stat[1])):
        raise CompressionError(
            f"tensor of shape {tuple(tensor.shape)} holds NaN or Inf values; TernGrad needs "
            "finite values"
        )
    return stat


def shared_stat(comp: TernGrad, tensor: torch.Tensor) -> torch.Tensor:
    """:meth:`TernGrad.shared_stat` (this rank's ``max|clip(g)|``, 0-d fp32) in one kernel."""
    return scaler(comp, tensor)[1].clone()


def ternarize(comp: TernGrad, flat: torch.Tensor, stat: torch.Tensor, seed: int) -> torch.Tensor:
    """The packed trits of flat ``flat`` for ``stat = [bound, scaler]``."""
    check_launch("terngrad.ternarize", flat, stat)
    n = flat.numel()
    out = torch.empty(packed_bytes(comp, n), dtype=torch.uint8, device=flat.device)
    if n:
        per = block_size(n, 1024) // 4 or 1
        _ternarize_kernel[(triton.cdiv(out.numel(), per),)](
            flat, stat, out, n, out.numel(), seed % (1 << 63), CLIP=bool(comp.clip),
            BASE3=comp.packing == "base3", BYTES=per, **EXACT,
        )  # fmt: skip
    return out


def compress(
    comp: TernGrad, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
) -> tuple[Payload, DenseCtx]:
    """:meth:`TernGrad.compress` in two kernels (statistics, then ternarize + pack)."""
    stat = scaler(comp, tensor)
    if shared is not None:
        agreed = torch.as_tensor(shared, dtype=torch.float32, device=stat.device).reshape(())
        if not bool(torch.isfinite(agreed)) or bool(agreed < stat[1]):
            raise CompressionError(
                f"shared scaler {float(agreed)} is below this rank's scaler {float(stat[1])} "
                "(or not finite); it must be the MAX of shared_stat() over the ranks"
            )
        stat = torch.stack([stat[0], agreed])
    packed = ternarize(comp, tensor.detach().reshape(-1).contiguous(), stat, seed)
    return Payload((packed, stat[1:].clone())), DenseCtx(tensor.shape, tensor.dtype)


def decompress_sum(
    comp: TernGrad, payloads: list[Payload], ctxs: list[DenseCtx], *, scale: float = 1.0
) -> torch.Tensor:
    """``scale * sum_r decompress(payloads[r], ctxs[r])`` in fp32, one kernel for all ranks;
    each rank's value is rounded to its ctx dtype first, as the reference's decompress does."""
    ctx = ctxs[0]
    n = math.prod(ctx.shape)
    for p, c in zip(payloads, ctxs, strict=True):
        if c.shape != ctx.shape or c.dtype != ctx.dtype:
            raise CompressionError(f"ranks disagree on the tensor: {c} vs {ctx}")
        if len(p) != 2 or p[1].numel() != 1 or p[1].dtype != torch.float32:
            raise CompressionError("terngrad payload needs 2 parts, the second one fp32 scaler")
        if p[0].numel() != packed_bytes(comp, n) or p[0].dtype != torch.uint8:
            raise CompressionError(
                f"terngrad payload has {p[0].numel()} {p[0].dtype} trit bytes; {n} trits "
                f"({comp.packing}) need {packed_bytes(comp, n)} torch.uint8"
            )
    codes = torch.stack([p[0] for p in payloads])
    scalers = torch.cat([p[1] for p in payloads])
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    check_launch("terngrad.unpack_sum", codes, scalers, out)
    if n:
        block = block_size(n, 1024)
        bad = torch.empty(triton.cdiv(n, block), dtype=torch.int32, device=out.device)
        _unpack_sum_kernel[(bad.numel(),)](
            codes, scalers, out, bad, n, codes.shape[1], len(payloads), float(scale),
            BASE3=comp.packing == "base3", ROUND=ROUNDING[ctx.dtype], BLOCK=block, **EXACT,
        )  # fmt: skip
        if comp.packing == "2bit" and bool(bad.any()):
            raise CompressionError("terngrad payload holds a code outside {0, 1, 2}")
    return out.view(ctx.shape)


def decompress(comp: TernGrad, payload: Payload, ctx: DenseCtx) -> torch.Tensor:
    """:meth:`TernGrad.decompress` in one kernel (the one-rank case of :func:`decompress_sum`)."""
    return decompress_sum(comp, [payload], [ctx]).to(ctx.dtype)
