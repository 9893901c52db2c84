"""QSGD: stochastic quantization to a few levels per bucket (Alistarh et al. 2017,
https://arxiv.org/abs/1610.02132).

Per bucket ``v`` of ``bucket_size`` elements: ``a_i = levels * |v_i| / ||v||`` is rounded
down or up to an integer level at random, up with probability ``a_i - floor(a_i)``, so that
``E[level_i] = a_i`` and the rebuilt ``||v|| * sign(v_i) * level_i / levels`` is unbiased.
``norm="l2"`` is the paper's choice; ``norm="max"`` (max |v_i|) gives lower variance.

Wire format (``n`` elements, ``G = ceil(n / bucket_size)`` buckets, last one may be shorter):

* part 0, fixed width (``elias=False``): one code per element, ``code = (level << 1) | s``
  with ``s = 1`` for a negative element of non-zero level (0 otherwise), packed with
  ``packing.pack_bits(codes, b)``, ``b = ceil(log2(levels + 1)) + 1`` bits, first element in
  the lowest bits; ``ceil(n * b / 8)`` bytes.
* part 0, ``elias=True``: a bit stream packed with ``pack_bits(stream, 1)``: per element the
  Elias-gamma code of ``level + 1`` (``k = floor(log2(level + 1))`` zeros, then ``level + 1``
  in ``k + 1`` bits, most significant first), followed by the sign bit when ``level > 0``.
  Small levels are the common ones, so this takes about 2 bits per element instead of ``b``.
  The coder is a vectorized CPU reference (the decoder follows the chain of codes by pointer
  jumping, O(bits * log n)): several times slower than the fixed-width path.
* part 1, ``float32[G]``: the norm of each bucket.

On CPU tensors the quantization, the fixed-width packing and the decoding run as numba kernels
(:mod:`gradzip.compress._quant_numba`: one pass over memory each way) when numba is importable,
unless ``GRADZIP_NUMBA=0``; the torch code below is the reference and the fallback. Same wire
format; the levels drawn for one seed differ from the torch path's (another generator), and
the ``l2`` norms may differ in their last bit (another summation order).
"""

from __future__ import annotations

import dataclasses
import math
from types import ModuleType
from typing import ClassVar, Literal

import numpy as np
import torch

from gradzip.compress._numba import numba_kernels
from gradzip.compress.base import (
    CompressionError,
    Compressor,
    DenseCtx,
    Payload,
    Reduction,
    as_float32_flat,
    check_parts,
    generator,
    register,
)
from gradzip.compress.packing import pack_bits, packed_size, unpack_bits

__all__ = ["QSGD", "elias_decode", "elias_encode"]

#: the rounding code of each gradient dtype in the numba receive kernels
_ROUNDING = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _kernels(*tensors: torch.Tensor) -> ModuleType | None:
    """The numba kernels when every tensor is on the CPU and numba is on, else None."""
    if any(t.device.type != "cpu" for t in tensors):
        return None
    return numba_kernels("_quant_numba")


def _not_finite(tensor: torch.Tensor) -> CompressionError:
    return CompressionError(
        f"tensor of shape {tuple(tensor.shape)} holds NaN or Inf values (or its bucket norms "
        "overflow fp32); QSGD needs finite values"
    )


def _buckets(flat: torch.Tensor, size: int) -> torch.Tensor:
    """``flat`` zero-padded to whole buckets, as a ``(G, size)`` matrix."""
    pad = (-flat.numel()) % size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, size)


def elias_encode(levels: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Elias-gamma code of ``levels + 1`` (levels in 0..127), each followed by its sign bit
    when the level is non-zero, as a 0/1 uint8 stream (see the module docstring)."""
    x = levels.reshape(-1).to(torch.int64) + 1
    k = torch.floor(torch.log2(x.to(torch.float64))).to(torch.int64)
    length = 2 * k + 1 + (k > 0).to(torch.int64)
    j = torch.arange(16, dtype=torch.int64, device=x.device).view(1, -1)
    k2 = k.view(-1, 1)
    value_bits = (x.view(-1, 1) >> (2 * k2 - j).clamp(min=0)) & 1
    bits = torch.where(j < k2, 0, value_bits)
    bits = torch.where(j == 2 * k2 + 1, negative.reshape(-1, 1).to(torch.int64), bits)
    return bits[j < length.view(-1, 1)].to(torch.uint8)


def elias_decode(stream: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`elias_encode`: the first ``n`` (levels, negative) of a 0/1 stream."""
    total = stream.numel()
    dev = stream.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.bool)
    pos = torch.arange(total + 1, dtype=torch.int64, device=dev)
    ones = torch.where(stream.to(torch.bool), pos[:-1], total)
    next_one = torch.cat([ones.flip(0).cummin(0).values.flip(0), pos.new_tensor([total])])
    k = next_one - pos  # zeros before the next 1: the code length if a code starts here
    jump = (pos + torch.where(k == 0, 1, 2 * k + 2)).clamp_(max=total)
    # pointer jumping: start of code i = jump^i(0), built from the binary digits of i
    index = torch.arange(n, dtype=torch.int64, device=dev)
    start = torch.zeros(n, dtype=torch.int64, device=dev)
    for t in range(max(1, math.ceil(math.log2(n)) + 1)):
        take = ((index >> t) & 1).to(torch.bool)
        start = torch.where(take, jump[start], start)
        jump = jump[jump]
    k = k[start]
    last = start + 2 * k + (k > 0).to(torch.int64)  # the last bit of each code
    if bool((last >= total).any()) or bool((k > 7).any()):
        raise CompressionError(f"Elias-gamma stream of {total} bits does not hold {n} codes")
    offs = torch.arange(8, device=dev).view(1, -1)
    at = (start + k).view(-1, 1) + offs
    window = stream[at.clamp(max=total - 1)].to(torch.int64)
    weights = torch.where(offs <= k.view(-1, 1), 1 << (k.view(-1, 1) - offs).clamp(min=0), 0)
    levels = (window * weights).sum(1) - 1
    sign_at = (start + 2 * k + 1).clamp(max=total - 1)
    negative = (k > 0) & stream[sign_at].to(torch.bool)
    return levels, negative


@register("qsgd")
@dataclasses.dataclass(frozen=True)
class QSGD(Compressor):
    """QSGD (Alistarh et al. 2017): unbiased stochastic rounding to ``levels`` levels per bucket.

    Defaults: ``levels=7`` puts sign + level in 4 bits (two per byte) and ``bucket_size=512``
    adds one fp32 norm per 512 elements (0.0625 bit each), the paper's 4-bit setting: 7.9x.
    """

    reduction: ClassVar[Reduction] = Reduction.GATHER

    # what the user tunes
    levels: int = 7
    bucket_size: int = 512
    norm: Literal["l2", "max"] = "l2"
    # switches
    elias: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or not (
            1 <= self.levels <= 127
        ):
            raise ValueError(
                f"qsgd levels={self.levels!r}: expected an integer in 1..127 (sign + level must "
                "fit in 8 bits)"
            )
        if isinstance(self.bucket_size, bool) or not isinstance(self.bucket_size, int) or not (
            1 <= self.bucket_size <= 2**62
        ):
            raise ValueError(
                f"qsgd bucket_size={self.bucket_size!r}: expected an integer in 1..2**62"
            )
        if self.norm not in ("l2", "max"):
            raise ValueError(f"qsgd norm={self.norm!r}: expected 'l2' or 'max'")
        if not isinstance(self.elias, bool):
            raise ValueError(f"qsgd elias={self.elias!r}: expected True or False")

    @property
    def bits(self) -> int:
        """Bits per element of the fixed-width code: level bits + 1 sign bit."""
        return math.ceil(math.log2(self.levels + 1)) + 1

    def quantize(
        self, tensor: torch.Tensor, *, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(levels as uint8, negative as bool, fp32 bucket norms) of ``tensor``, flat."""
        nb = _kernels(tensor)
        if nb is not None:  # 8-bit codes: the levels of the fixed-width path, for any width
            codes, norms = self._codes_numba(nb, tensor, seed, 8)
            return codes >> 1, (codes & 1).to(torch.bool), norms
        flat = as_float32_flat(tensor.detach())
        n = flat.numel()
        v = _buckets(flat, self.bucket_size)
        if self.norm == "l2":
            norms = torch.linalg.vector_norm(v, dim=1)
        else:
            norms = v.abs().amax(dim=1) if n else v.new_zeros(0)
        if not bool(torch.isfinite(norms).all()):
            raise _not_finite(tensor)
        scale = torch.where(norms > 0, self.levels / norms, 0.0).view(-1, 1)
        a = (v.abs() * scale).reshape(-1)[:n].clamp_(max=self.levels)
        level = a.floor()
        u = torch.rand(n, generator=generator(seed, flat.device), device=flat.device)
        level += u < (a - level)  # up with probability a - floor(a): E[level] = a
        negative = (flat < 0) & (level > 0)
        return level.to(torch.uint8), negative, norms

    def _codes_numba(
        self, nb: ModuleType, tensor: torch.Tensor, seed: int, bits: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes packed at ``bits`` bits, fp32 norms) of ``tensor`` by the numba kernel."""
        flat = as_float32_flat(tensor.detach()).contiguous()
        n = flat.numel()
        norms = torch.empty(-(-n // self.bucket_size), dtype=torch.float32)
        packed = torch.empty(packed_size(n, bits), dtype=torch.uint8)
        x = flat.numpy()
        bad = nb.qsgd_compress(
            x, x.view(np.uint32), self.bucket_size, self.levels, bits, self.norm == "max",
            nb.seed_key(seed), norms.numpy(), packed.numpy(),
        )  # fmt: skip
        if bad >= 0:
            raise _not_finite(tensor)
        return packed, norms

    def fixed_payload(self) -> bool:
        """Fixed-width codes and one norm per bucket follow from the element count (the
        Elias-coded stream does not)."""
        return not self.elias

    def compress(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> tuple[Payload, DenseCtx]:
        nb = None if self.elias else _kernels(tensor)
        if nb is not None:
            packed, norms = self._codes_numba(nb, tensor, seed, self.bits)
            return Payload((packed, norms)), DenseCtx(tensor.shape, tensor.dtype)
        level, negative, norms = self.quantize(tensor, seed=seed)
        if self.elias:
            packed = pack_bits(elias_encode(level, negative), 1)
        else:
            packed = pack_bits((level << 1) | negative.to(torch.uint8), self.bits)
        return Payload((packed, norms)), DenseCtx(tensor.shape, tensor.dtype)

    def _check(self, payload: Payload, ctx: DenseCtx) -> int:
        """The element count of ``payload`` after checking its parts against ``ctx``."""
        check_parts(payload, "qsgd", [torch.uint8, torch.float32])
        packed, norms = payload
        n = math.prod(ctx.shape)
        if norms.numel() != -(-n // self.bucket_size):
            raise CompressionError(
                f"qsgd payload has {norms.numel()} norms; {n} elements in buckets of "
                f"{self.bucket_size} need {-(-n // self.bucket_size)}"
            )
        if not self.elias and packed.numel() != packed_size(n, self.bits):
            raise CompressionError(
                f"qsgd payload has {packed.numel()} code bytes; {n} codes of {self.bits} "
                f"bits need {packed_size(n, self.bits)}"
            )
        return n

    def decompress(self, payload: Payload, ctx: DenseCtx) -> torch.Tensor:
        n = self._check(payload, ctx)
        packed, norms = payload
        summed = self.decompress_sum([payload], [ctx])
        if summed is not None:  # the numba path; its values are rounded to ctx.dtype already
            return summed.to(ctx.dtype)
        if self.elias:
            level, negative = elias_decode(unpack_bits(packed, 1, packed.numel() * 8), n)
        else:
            codes = unpack_bits(packed, self.bits, n)
            level, negative = codes >> 1, (codes & 1).to(torch.bool)
        signed = torch.where(negative, -level.to(torch.float32), level.to(torch.float32))
        step = (norms / self.levels).view(-1, 1)
        out = (_buckets(signed, self.bucket_size) * step).reshape(-1)[:n]
        return out.to(ctx.dtype).view(ctx.shape)

    def decompress_sum(
        self, payloads: list[Payload], ctxs: list[DenseCtx], *, scale: float = 1.0
    ) -> torch.Tensor | None:
        """``scale * sum_r decompress(payloads[r], ctxs[r])`` in fp32 by the numba kernel, in
        one pass over the output: each rank's values rounded to its ctx dtype, then added in
        rank order, as the torch path of ``kernels.decompress_sum`` does. None where there is
        no such path (not CPU, ``elias=True``, numba off, ranks of different dtypes)."""
        if self.elias or not payloads or len(payloads) != len(ctxs):
            return None
        nb = _kernels(*(t for p in payloads for t in p))
        ctx = ctxs[0]
        if nb is None or ctx.dtype not in _ROUNDING or any(c.dtype != ctx.dtype for c in ctxs):
            return None
        n = 0
        for p, c in zip(payloads, ctxs, strict=True):
            n = self._check(p, c)
            if c.shape != ctx.shape:
                raise CompressionError(
                    f"qsgd ranks disagree on the shape: {tuple(c.shape)} vs {tuple(ctx.shape)}"
                )
        if len(payloads) == 1:
            codes, norms = payloads[0][0].view(1, -1), payloads[0][1].view(1, -1)
        else:  # a copy of the compressed bytes only
            codes = torch.stack([p[0] for p in payloads])
            norms = torch.stack([p[1] for p in payloads])
        out = torch.empty(n, dtype=torch.float32)
        nb.qsgd_sum(
            codes.numpy(), norms.numpy(), self.bucket_size, self.levels, self.bits,
            _ROUNDING[ctx.dtype], float(scale), out.numpy(),
        )  # fmt: skip
        return out.view(ctx.shape)
