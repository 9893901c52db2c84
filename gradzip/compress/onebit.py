"""1-bit SGD with error feedback (Seide et al. 2014,
https://www.microsoft.com/en-us/research/publication/1-bit-stochastic-gradient-descent-and-application-to-data-parallel-distributed-training-of-speech-dnns/).

Each element is sent as one sign bit; the receiver rebuilds it as the mean of the non-negative
or of the negative entries of its group. The quantization error is kept locally and added to
the next gradient (error feedback, on by default), which is what makes 1 bit enough.

Wire format (the GPU kernels must produce the same bytes; ``n`` = numel, ``G`` = groups):

* part 0, ``uint8[ceil(n / 8)]``: the sign bits of the n elements in row-major (C) order of
  the tensor, exactly ``packing.pack_bits(bits, 1)``: element ``i`` is bit ``i % 8`` (bit 0 =
  least significant) of byte ``i // 8``; padding bits of the last byte are 0. Bit 1 means the
  (compensated) value is ``< 0`` in fp32; ``+0.0`` and ``-0.0`` both give bit 0.
* part 1, ``float32[2 * G]``: per group ``k``, ``scales[2k]`` = mean of the entries with bit 0
  (the non-negative ones) and ``scales[2k + 1]`` = mean of the entries with bit 1 (negative),
  0.0 for an empty side. Element ``i`` decodes to ``scales[2 * group(i) + bit(i)]``.
* groups: when the tensor has >= 2 dims, ``columns`` is on and ``shape[0] >= min_rows``, the
  2-D view is ``(R, M) = (shape[0], n // shape[0])`` and element ``i = r * M + c`` belongs to
  column group ``c`` (``G = M``; the paper's per-column quantization). Otherwise (0-d and 1-d
  tensors, short columns, ``columns=False``) groups are flat buckets: ``group(i) = i //
  bucket_size``, ``G = ceil(n / bucket_size)``, the last bucket may be shorter.
* the means are fp32 partial sums accumulated in fp64, divided, then rounded to fp32; another
  summation order may differ in the last bit of a scale, never in a sign byte.

Defaults: ``bucket_size = 8192`` is the smallest power of two whose two fp32 scales (64 bits)
cost under 1% of its sign bits (8192 bits): a 2**20-element fp32 gradient takes 131072 + 1024
bytes (31.8x). ``min_rows = 4096``: a column's two fp32 scales cost 64 bits, so a column of R
rows sends ``R + 64`` bits for ``32 R``; below 4096 rows that overhead passes 1.6% and the
ratio drops under 31.5x (a Linear layer of 128 outputs would reach only 21x), so such tensors
use flat buckets instead. ``min_rows=1`` gives the paper's per-column layout everywhere.

Warm-up and momentum (what keeps dense accuracy): 1-bit sends about 60% of a gradient's
energy each step and the rest a step later; in the first steps, when the weights move
fastest, that delay with the optimizer's momentum on top can blow a network up (measured on
the CNN of ``benchmarks/accuracy.py``, 4 ranks, SGD lr 0.05, momentum 0.9: with 512-element
groups the loss jumps to 5.5 at step 20 and the ReLUs die; finer groups do not help). Two
defaults of :func:`gradzip.DistributedOptimizer` address it, as the peers do with dense
warm-ups (torch's PowerSGD ``start_powerSGD_iter``, DeepSpeed's 1-bit Adam ``freeze_step``):
the first ``default_dense_steps = 150`` steps are sent dense, and SGD's momentum is applied
before compression (``momentum_correction``, :mod:`gradzip.hooks.momentum`). In a one-process
simulation of that run (1500 steps, ``benchmarks/results/defaults_sim.md``) the defaults end
0.4 pp under dense (3 seeds); 150 dense steps without the correction 1.6 pp, the correction
without warm-up 2.8 pp (one seed each). The distributed tables measure the defaults
(``benchmarks/results/accuracy_*_defaults.md``).

On the CPU, :meth:`OneBit.compress_with_feedback` runs the numba kernels of
:mod:`gradzip.compress._onebit_numba` when numba is importable (one pass over memory for flat
buckets, two for columns; fp16/bf16 gradients are converted to fp32 first) unless
``GRADZIP_NUMBA=0``; otherwise the
chunked torch sweep below. Same sign bytes and exact residual; scales may differ in last bits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from types import ModuleType
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from gradzip.compress._numba import numba_enabled
from gradzip.compress.base import (
    CompressionError,
    Compressor,
    DenseCtx,
    Payload,
    Reduction,
    check_dtype,
    check_parts,
    register,
)
from gradzip.compress.memory import Memory, ResidualMemory, check_finite
from gradzip.compress.packing import pack_bits, packed_size, unpack_bits

__all__ = ["OneBit"]

#: elements per step of the chunked sweep: small enough that a chunk and its masks stay in
#: cache between the few torch ops applied to it, large enough that op overhead is amortised
_CHUNK = 1 << 18


class _Block(NamedTuple):
    """A contiguous ``rows x width`` piece of the flat tensor, starting at ``start``.

    ``axis == 1``: one group per row (flat buckets); ``axis == 0``: one group per column.
    """

    start: int
    rows: int
    width: int
    axis: int

    @property
    def groups(self) -> int:
        return self.rows if self.axis == 1 else self.width


@functools.cache
def _import_numba_kernels() -> ModuleType | None:
    try:
        from gradzip.compress import _onebit_numba
    except ImportError:
        return None
    return _onebit_numba


def _numba_kernels() -> ModuleType | None:
    """The numba kernels, or None when numba is missing or the env sets ``GRADZIP_NUMBA=0``."""
    if not numba_enabled():
        return None
    return _import_numba_kernels()


def _blocks(shape: torch.Size, columns: bool, min_rows: int, bucket: int) -> list[_Block]:
    """How the elements of a tensor of ``shape`` fall into groups (see the module docstring)."""
    n = math.prod(shape)
    if n == 0:
        return []
    if columns and len(shape) >= 2 and shape[0] >= min_rows:
        return [_Block(0, shape[0], n // shape[0], 0)]
    full, rest = divmod(n, bucket)
    blocks = [_Block(0, full, bucket, 1)] if full else []
    if rest:
        blocks.append(_Block(full * bucket, 1, rest, 1))
    return blocks


def _row_chunks(block: _Block, size: int) -> list[tuple[int, int]]:
    """Row ranges of about ``size`` elements that start on a byte boundary of the bit stream."""
    align = 8 // math.gcd(block.width, 8)  # block.start is a multiple of 8 (bucket % 8 == 0)
    step = max(align, (size // block.width) // align * align)
    return [(r, min(r + step, block.rows)) for r in range(0, block.rows, step)]


class _Scratch:
    """Per-call chunk buffers, reused by every chunk so no large temporary is ever allocated."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.x = torch.empty(size, device=device)  # fp32 copy of a chunk of fp16/bf16 input
        self.neg = torch.empty(size, device=device)  # 1.0 where x < 0
        self.tmp = torch.empty(size, device=device)  # clamped values / non-negative mask
        self.bits = np.empty(size if device.type == "cpu" else 0, dtype=np.bool_)


def _signs(x: torch.Tensor, scratch: _Scratch, packed: torch.Tensor, lo: int) -> None:
    """Pack the sign bits of the flat chunk ``x`` (elements ``lo..``) into ``packed``."""
    if x.device.type != "cpu":
        out = pack_bits(torch.lt(x, 0), 1)
        packed[lo // 8 : lo // 8 + out.numel()].copy_(out)
        return
    # numpy's compare-to-bool and packbits are several times faster than torch's on the CPU
    mask = np.less(x.numpy(), 0, out=scratch.bits[: x.numel()])
    bits = np.packbits(mask, bitorder="little")
    packed[lo // 8 : lo // 8 + bits.size].copy_(torch.from_numpy(bits))


def _stats(x: torch.Tensor, axis: int, scratch: _Scratch) -> tuple[torch.Tensor, ...]:
    """Per-group (sum of x >= 0, sum of x < 0, count of x < 0) of the 2-D chunk ``x``."""
    n = x.numel()
    neg = torch.lt(x, 0, out=scratch.neg[:n].view_as(x))
    tmp = scratch.tmp[:n].view_as(x)
    pos_sum = torch.clamp(x, min=0, out=tmp).sum(axis)
    neg_sum = torch.clamp(x, max=0, out=tmp).sum(axis)
    return pos_sum, neg_sum, neg.sum(axis)


def _subtract(
    x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scratch: _Scratch, fresh: bool
) -> None:
    """``x -= where(x < 0, neg, pos)`` in place, with one rounding per element.

    Only one of the two products is non-zero, so ``x - m*neg - (1-m)*pos`` is exactly
    ``x - decompressed`` (``torch.where`` is several times slower on the CPU). ``fresh``: the
    mask ``scratch.neg`` already holds ``x < 0`` (left there by :func:`_stats`).
    """
    n = x.numel()
    is_neg = scratch.neg[:n].view_as(x)
    if not fresh:
        torch.lt(x, 0, out=is_neg)
    not_neg = torch.ge(x, 0, out=scratch.tmp[:n].view_as(x))
    x.addcmul_(is_neg, neg.neg()).addcmul_(not_neg, pos.neg())


def _means(sums: torch.Tensor, negs: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Interleaved fp32 scales ``[pos_0, neg_0, pos_1, ...]`` from fp64 sums and counts."""
    counts = torch.stack([sizes - negs, negs], dim=1).clamp_(min=1)
    return (sums / counts).to(torch.float32).reshape(-1)


def _group_view(v: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-group values broadcast along the rows (axis 0) or columns (axis 1) of a chunk."""
    return v.view(1, -1) if axis == 0 else v.view(-1, 1)


def _load(
    values: torch.Tensor, grad: torch.Tensor | None, lo: int, hi: int, scratch: _Scratch
) -> torch.Tensor:
    """The fp32 values of elements ``lo:hi``: ``values += grad`` in place when a grad is given."""
    if grad is not None:
        return values[lo:hi].add_(grad[lo:hi])
    chunk = values[lo:hi]
    return chunk if chunk.dtype == torch.float32 else scratch.x[: hi - lo].copy_(chunk)


def _sweep(
    blocks: list[_Block],
    values: torch.Tensor,
    grad: torch.Tensor | None,
    packed: torch.Tensor,
    update: bool,
) -> torch.Tensor:
    """Fill ``packed`` with the sign bits of ``values (+ grad)`` and return the scales.

    With ``update`` the fp32 ``values`` (a residual) become ``values + grad - decompressed``:
    groups complete within a chunk are updated while the chunk is in cache (one pass over
    memory); column groups that span chunks get a second pass.
    """
    size = _CHUNK if values.device.type == "cpu" else values.numel()
    plan = [(block, _row_chunks(block, size)) for block in blocks]
    largest = max(((r1 - r0) * b.width for b, cs in plan for r0, r1 in cs), default=0)
    scratch = _Scratch(largest, values.device)
    scales = []
    for block, chunks in plan:
        sums = torch.zeros(block.groups, 2, dtype=torch.float64, device=values.device)
        negs = torch.zeros(block.groups, dtype=torch.float64, device=values.device)
        group_size = float(block.width if block.axis == 1 else block.rows)
        sizes = torch.full_like(negs, group_size)
        at_once = block.axis == 1 or len(chunks) == 1
        for r0, r1 in chunks:
            lo, hi = block.start + r0 * block.width, block.start + r1 * block.width
            x = _load(values, grad, lo, hi, scratch)
            _signs(x, scratch, packed, lo)
            x2 = x.view(r1 - r0, block.width)
            pos_sum, neg_sum, neg_count = _stats(x2, block.axis, scratch)
            rows = slice(r0, r1) if block.axis == 1 else slice(None)
            sums[rows, 0] += pos_sum
            sums[rows, 1] += neg_sum
            negs[rows] += neg_count
            if update and at_once:
                s = _means(sums[rows], negs[rows], sizes[rows]).view(-1, 2)
                pos, neg = _group_view(s[:, 0], block.axis), _group_view(s[:, 1], block.axis)
                _subtract(x2, pos, neg, scratch, fresh=True)
        block_scales = _means(sums, negs, sizes)
        if update and not at_once:
            pos = _group_view(block_scales[0::2], block.axis)
            neg = _group_view(block_scales[1::2], block.axis)
            for r0, r1 in chunks:
                lo, hi = block.start + r0 * block.width, block.start + r1 * block.width
                x2 = values[lo:hi].view(r1 - r0, block.width)
                _subtract(x2, pos, neg, scratch, fresh=False)
        scales.append(block_scales)
    if not scales:
        return torch.empty(0, dtype=torch.float32, device=values.device)
    return torch.cat(scales)


@register("onebit")
@dataclasses.dataclass(frozen=True)
class OneBit(Compressor):
    """1-bit SGD (Seide et al. 2014): sign bits + two means per group, with error feedback.

    ``bucket_size`` is the flat group length (a positive multiple of 8) for 0-d/1-d tensors,
    for tensors with fewer than ``min_rows`` rows, and for all tensors when ``columns`` is off.
    Use :meth:`compress_with_feedback` for the fused error-feedback step.
    """

    reduction: ClassVar[Reduction] = Reduction.GATHER
    #: 1-bit starts after 150 dense steps unless ``dense_steps`` says otherwise (see the
    #: module docstring, "Warm-up")
    default_dense_steps: ClassVar[int] = 150

    # what the user tunes
    bucket_size: int = 8192
    min_rows: int = 4096
    # switches
    columns: bool = True
    error_feedback: bool = True

    def __post_init__(self) -> None:
        if (
            not isinstance(self.bucket_size, int)
            or not 8 <= self.bucket_size <= 2**62
            or self.bucket_size % 8
        ):
            raise ValueError(
                f"onebit bucket_size={self.bucket_size!r}: expected a positive multiple of 8 "
                "(so that every bucket starts on a byte of the sign-bit stream), at most 2**62"
            )
        if not isinstance(self.min_rows, int) or self.min_rows < 1:
            raise ValueError(f"onebit min_rows={self.min_rows!r}: expected an integer >= 1")
        for flag in ("columns", "error_feedback"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"onebit {flag}={getattr(self, flag)!r}: expected True or False")

    def _blocks(self, shape: torch.Size) -> list[_Block]:
        return _blocks(shape, self.columns, self.min_rows, self.bucket_size)

    def compress(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> tuple[Payload, DenseCtx]:
        """Sign bits and per-group means of ``tensor`` (deterministic: ``seed`` is unused).

        Flat buckets of a CPU tensor go through numba (:func:`_onebit_numba.flat_compress`,
        one read pass: the same sign bytes, scales equal up to their last bits)."""
        check_dtype(tensor)
        flat = tensor.detach().reshape(-1)
        blocks = self._blocks(tensor.shape)
        kernels = _numba_kernels() if flat.device.type == "cpu" else None
        if kernels is not None and blocks and blocks[0].axis == 1:
            x = flat.to(torch.float32).contiguous()
            packed = torch.empty(packed_size(x.numel(), 1), dtype=torch.uint8)  # all written
            scales = torch.empty(2 * sum(b.groups for b in blocks), dtype=torch.float32)
            bad = kernels.flat_compress(x.numpy(), self.bucket_size, scales.numpy(),
                                        packed.numpy())
            if bad >= 0 or not bool(torch.isfinite(scales).all()):
                raise CompressionError(
                    f"tensor of shape {tuple(tensor.shape)} holds NaN or Inf values (or values "
                    "whose fp32 sum overflows); 1-bit compression needs finite values"
                )
            return Payload((packed, scales)), DenseCtx(tensor.shape, tensor.dtype)
        packed = torch.zeros(packed_size(flat.numel(), 1), dtype=torch.uint8, device=flat.device)
        scales = _sweep(blocks, flat, None, packed, update=False)
        if not bool(torch.isfinite(scales).all()):
            raise CompressionError(
                f"tensor of shape {tuple(tensor.shape)} holds NaN or Inf values (or values whose "
                "fp32 sum overflows); 1-bit compression needs finite values"
            )
        return Payload((packed, scales)), DenseCtx(tensor.shape, tensor.dtype)

    def _checked(self, payload: Payload, ctx: DenseCtx) -> list[_Block]:
        """The groups of ``ctx``'s shape, after checking that ``payload`` fits them (a
        CompressionError names the part that does not)."""
        check_parts(payload, "onebit", [torch.uint8, torch.float32])
        packed, scales = payload
        n = math.prod(ctx.shape)
        if packed.numel() != packed_size(n, 1):
            raise CompressionError(
                f"onebit payload has {packed.numel()} sign bytes; {n} elements need "
                f"{packed_size(n, 1)}"
            )
        blocks = self._blocks(ctx.shape)
        groups = sum(b.groups for b in blocks)
        if scales.numel() != 2 * groups:
            raise CompressionError(
                f"onebit payload has {scales.numel()} scales; shape {tuple(ctx.shape)} needs "
                f"{2 * groups}"
            )
        return blocks

    def decompress(self, payload: Payload, ctx: DenseCtx) -> torch.Tensor:
        """Each element becomes the mean of its group's side: ``scales[2*group + bit]``."""
        fast = self.decompress_sum([payload], [ctx])
        if fast is not None:
            return fast.to(ctx.dtype)
        blocks = self._checked(payload, ctx)
        packed, scales = payload
        n = math.prod(ctx.shape)
        neg = unpack_bits(packed, 1, n).to(torch.float32)
        out = torch.empty(n, dtype=torch.float32, device=packed.device)
        offset = 0
        for block in blocks:
            lo, hi = block.start, block.start + block.rows * block.width
            s = scales[2 * offset : 2 * (offset + block.groups)]
            offset += block.groups
            m = neg[lo:hi].view(block.rows, block.width)
            o = out[lo:hi].view_as(m)
            # exactly scales[2g + bit]: one of the two products is zero
            torch.mul(m, _group_view(s[1::2], block.axis), out=o)
            o.addcmul_(m.neg_().add_(1), _group_view(s[0::2], block.axis))
        return out.to(ctx.dtype).view(ctx.shape)

    def decompress_sum(
        self, payloads: list[Payload], ctxs: list[DenseCtx], *, scale: float = 1.0
    ) -> torch.Tensor | None:
        """Receive side on the CPU: ``scale * sum_r decompress(payloads[r], ctxs[r])`` in fp32,
        one numba pass over the output (:func:`_onebit_numba.decode_sum`), bit for bit the
        sum of the per-rank decompressions in rank order. None where that path does not run
        (numba off or missing, payloads not on the CPU, ranks of different shapes): the
        caller then decompresses rank by rank."""
        kernels = _numba_kernels()
        if kernels is None or not payloads or len(payloads) != len(ctxs):
            return None
        ctx = ctxs[0]
        if any(c.shape != ctx.shape or c.dtype != ctx.dtype for c in ctxs) or any(
            part.device.type != "cpu" for p in payloads for part in p.tensors
        ):
            return None
        for p, c in zip(payloads, ctxs, strict=True):  # every rank's payload must fit
            blocks = self._checked(p, c)
        n = math.prod(ctx.shape)
        out = torch.empty(n, dtype=torch.float32)
        if n:
            packed = torch.stack([p[0] for p in payloads])
            scales = torch.stack([p[1] for p in payloads]).to(ctx.dtype).to(torch.float32)
            columns = blocks[0].width if blocks[0].axis == 0 else 0
            kernels.decode_sum(
                packed.numpy(), scales.numpy(), columns, self.bucket_size, float(scale),
                out.numpy(),
            )
        return out.view(ctx.shape)

    def fixed_payload(self) -> bool:
        """Sign bytes and scales follow from the shape: ``ceil(n / 8)`` + ``2 G`` floats."""
        return True

    def fresh_feedback(self, grad: torch.Tensor) -> bool:
        """Whether :meth:`compress_with_feedback` can write the new residual into a buffer of
        its own at no extra memory traffic (``fresh=True``), so the old one stays as it was
        (the numba path on CPU tensors)."""
        return grad.device.type == "cpu" and _numba_kernels() is not None

    def compress_with_feedback(
        self,
        memory: Memory,
        key: str | int,
        grad: torch.Tensor,
        *,
        seed: int = 0,
        fresh: bool = False,
    ) -> tuple[Payload, DenseCtx]:
        """``memory.compensate`` + :meth:`compress` + ``memory.update`` in one sweep.

        With a :class:`ResidualMemory` the residual is updated in place, chunk by chunk
        (about two passes over memory instead of ten); afterwards ``residual == (old residual
        + grad) - decompress(payload)`` holds exactly, as with the unfused steps. A NaN/Inf
        gradient raises a CompressionError naming ``key`` and leaves the residual unchanged.
        For fp16/bf16 gradients ``decompress`` returns the gradient's dtype; the residual is
        taken against the fp32 decoded values, as in the unfused steps. ``fresh``: the new
        residual goes into another buffer (``memory.spare_like``) and the old tensor is left
        as it was, so a caller holding it can put it back (a step called off on every rank).
        """
        if not isinstance(memory, ResidualMemory) or not self.error_feedback:
            compensated = memory.compensate(key, grad)
            payload, ctx = self.compress(compensated, seed=seed)
            memory.update(key, compensated, self.decompress(payload, ctx))
            return payload, ctx
        check_dtype(grad, f"gradient {key!r}")
        kernels = _numba_kernels() if grad.device.type == "cpu" else None
        if kernels is not None:
            return self._feedback_numba(kernels, memory, key, grad, fresh)
        flat = grad.detach().reshape(-1)
        if memory.check and not bool(torch.isfinite(flat.sum())):
            check_finite(key, flat)  # raises unless the sum merely overflowed
        residual = memory.residuals.get(key)
        if residual is not None and residual.shape != grad.shape:
            memory.compensate(key, grad)  # raises the shape-mismatch error
        if residual is None:
            values, added = flat.to(torch.float32, copy=True), None
        else:
            values, added = residual.contiguous().view(-1), flat
            if fresh:  # the sweep works in place: on a copy, the old residual stays
                values = values.clone()
        packed = torch.zeros(packed_size(flat.numel(), 1), dtype=torch.uint8, device=flat.device)
        scales = _sweep(self._blocks(grad.shape), values, added, packed, update=True)
        if not bool(torch.isfinite(scales).all()):
            memory.residuals.pop(key, None)
            raise CompressionError(
                f"gradient {key!r}: the fp32 sum of its compensated values overflows; its "
                "error-feedback residual was reset"
            )
        memory.residuals[key] = values.view(grad.shape)
        return Payload((packed, scales)), DenseCtx(grad.shape, grad.dtype)

    def _feedback_numba(
        self,
        kernels: ModuleType,
        memory: ResidualMemory,
        key: str | int,
        grad: torch.Tensor,
        fresh: bool = False,
    ) -> tuple[Payload, DenseCtx]:
        """:meth:`compress_with_feedback` through the numba kernels (CPU tensors)."""
        flat = grad.detach().reshape(-1).to(torch.float32)
        residual = memory.residuals.get(key)
        if residual is not None and residual.shape != grad.shape:
            memory.compensate(key, grad)  # raises the shape-mismatch error
        # the sweep writes the new residual into another tensor when it has one (``fresh``,
        # or no residual yet), so a NaN/Inf it meets leaves the old one as it was: the
        # gradient is probed only after a failed sweep. In place it is probed first.
        apart = fresh or residual is None
        if memory.check and not apart and kernels.probe(flat.numpy()) != 0.0:
            check_finite(key, flat)  # raises, naming the key; the residual is left as it was
        if residual is None:
            values = torch.full_like(flat, -0.0)  # -0.0 + g == g bit for bit, even for g = -0.0
            target = values
        else:
            values = residual.to(torch.float32).contiguous().view(-1)
            target = memory.spare_like(key, values) if fresh else values
        packed = torch.empty(packed_size(flat.numel(), 1), dtype=torch.uint8)  # all written
        blocks = self._blocks(grad.shape)
        columns = blocks[0].width if blocks and blocks[0].axis == 0 else 0
        scales = torch.empty(0, dtype=torch.float32)
        if blocks:
            out = kernels.sweep(
                columns,
                self.bucket_size,
                values.numpy(),
                flat.numpy(),
                packed.numpy(),
                target.numpy(),
            )
            if out is None:
                if apart and target is not values:
                    memory.spare[key] = target  # nothing of it is kept
                if memory.check and apart:
                    check_finite(key, flat)  # a NaN/Inf gradient: the residual is unchanged
                # residual + grad overflows (or the check is off): reset
                memory.residuals.pop(key, None)
                raise CompressionError(
                    f"gradient {key!r}: its compensated values (residual + gradient) hold NaN "
                    "or Inf; its error-feedback residual was reset"
                )
            scales = torch.from_numpy(out)
        memory.residuals[key] = target.view(grad.shape)
        return Payload((packed, scales)), DenseCtx(grad.shape, grad.dtype)
