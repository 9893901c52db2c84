"""Numba kernels for 1-bit SGD with error feedback on the CPU (Seide et al. 2014,
https://www.microsoft.com/en-us/research/publication/1-bit-stochastic-gradient-descent-and-application-to-data-parallel-distributed-training-of-speech-dnns/).

An optional accelerator of :meth:`gradzip.compress.onebit.OneBit.compress_with_feedback`:
importing this module imports numba, so :mod:`~gradzip.compress.onebit` imports it lazily and
falls back to its torch sweep when numba is missing. Two passes over memory, ``v = res + grad``
elementwise in fp32:

* :func:`flat_stats` / :func:`column_stats` read ``v`` without writing anything and return
  per group the sum of the non-negative and of the negative values (fp32 partial sums of at
  most :data:`_SUB` elements, added in fp64; per column: fp64) and the count of negative ones,
  plus a finiteness probe (``sum(v - v)``: NaN iff some ``v`` is NaN or infinite). Nothing is
  written, so a NaN/Inf leaves the residual as it was.
* :func:`flat_apply` / :func:`column_apply` recompute ``v`` (the same fp32 add, bit for bit),
  pack its sign bits LSB-first and store ``res = v - scale`` (one rounding, as the torch path).

Signs, and so the packed bytes, equal the torch path's exactly; the sums are added in another
order than torch's, so a scale may differ from the torch path's in its last bits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

__all__ = ["column_apply", "column_stats", "flat_apply", "flat_stats", "sweep"]

#: elements per fp32 partial sum: small enough that its rounding stays near fp32's last bit,
#: large enough for the vectorised loop to amortise the fp64 add
_SUB = 256
#: elements per sign mask of the apply pass (stays in L1 with its slices of res and grad)
_STEP = 8192
#: ``(word * _MAGIC) >> 56`` gathers the low bits of the 8 bytes of ``word`` into one byte,
#: byte ``k`` giving bit ``k`` (each partial product lands on its own bit: no carries)
_MAGIC = np.uint64(0x0102040810204080)


def _jit(fast: bool = False) -> Callable[[Callable[..., Any]], Any]:
    """``njit(cache=True, nogil=True)``, uncached where no cache directory is writable.

    ``fast`` lets LLVM reassociate the fp32 partial sums so that they vectorise; no other
    fast-math flag is set (NaN/Inf must propagate into the probe).
    """
    flags = {"fastmath": {"reassoc"}} if fast else {}

    def wrap(fn: Callable[..., Any]) -> Any:
        try:
            return njit(cache=True, nogil=True, **flags)(fn)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            return njit(nogil=True, **flags)(fn)

    return wrap


@_jit(fast=True)
def _run_stats(r: np.ndarray, g: np.ndarray) -> tuple[float, float, int, float]:
    """fp32 (sum of v >= 0, sum of v < 0), count of v < 0 and ``sum(v - v)``, ``v = r + g``."""
    pos = np.float32(0.0)
    neg = np.float32(0.0)
    cnt = 0
    chk = np.float32(0.0)
    for i in range(r.size):
        v = r[i] + g[i]
        chk += v - v
        is_neg = v < 0
        pos += v if not is_neg else np.float32(0.0)
        neg += v if is_neg else np.float32(0.0)
        cnt += is_neg
    return pos, neg, cnt, chk


@_jit()
def flat_stats(
    res: np.ndarray, grad: np.ndarray, bucket: int, sums: np.ndarray, negs: np.ndarray
) -> float:
    """Per bucket ``k``: ``sums[k] = (sum v >= 0, sum v < 0)`` (fp64), ``negs[k] = #(v < 0)``.

    Returns the finiteness probe: 0.0, or NaN when some ``v`` is NaN or infinite.
    """
    n = res.size
    probe = 0.0
    for k in range((n + bucket - 1) // bucket):
        hi = min(n, (k + 1) * bucket)
        pos = 0.0
        neg = 0.0
        cnt = 0
        for a in range(k * bucket, hi, _SUB):
            b = min(hi, a + _SUB)
            p, q, c, chk = _run_stats(res[a:b], grad[a:b])
            pos += p
            neg += q
            cnt += c
            probe += chk
        sums[k, 0] = pos
        sums[k, 1] = neg
        negs[k] = cnt
    return probe


@_jit()
def column_stats(
    res: np.ndarray, grad: np.ndarray, cols: int, sums: np.ndarray, negs: np.ndarray
) -> float:
    """:func:`flat_stats` for column groups: element ``r * cols + c`` belongs to group ``c``.

    ``sums`` is ``(2, cols)`` here (row 0: non-negative sums, row 1: negative sums).
    """
    probe = np.float32(0.0)
    pos = sums[0]
    neg = sums[1]
    for row in range(res.size // cols):
        r = res[row * cols : (row + 1) * cols]
        g = grad[row * cols : (row + 1) * cols]
        for c in range(cols):
            v = r[c] + g[c]
            probe += v - v
            is_neg = v < 0
            pos[c] += np.float64(v) if not is_neg else 0.0
            neg[c] += np.float64(v) if is_neg else 0.0
            negs[c] += is_neg
    return float(probe)


@_jit()
def _pack(mask: np.ndarray, count: int, packed: np.ndarray, at: int) -> None:
    """Pack the 0/1 bytes ``mask[:count]`` LSB-first into ``packed[at:]`` (pad bits 0)."""
    full = count // 8
    words = mask[: full * 8].view(np.uint64)
    for j in range(full):
        packed[at + j] = (words[j] * _MAGIC) >> np.uint64(56)
    if count > full * 8:
        byte = 0
        for k in range(count - full * 8):
            byte |= mask[full * 8 + k] << k
        packed[at + full] = byte


@_jit()
def _apply_run(
    r: np.ndarray, g: np.ndarray, pos: float, neg: float, mask: np.ndarray
) -> None:
    """``v = r + g``; ``mask = v < 0``; ``r = v - (neg if v < 0 else pos)``."""
    for i in range(r.size):
        v = r[i] + g[i]
        is_neg = v < 0
        mask[i] = is_neg
        r[i] = v - (neg if is_neg else pos)


@_jit()
def flat_apply(
    res: np.ndarray, grad: np.ndarray, bucket: int, scales: np.ndarray, packed: np.ndarray
) -> None:
    """Sign bits of ``v`` into ``packed``; ``res = v - scales[2k + bit]`` for bucket ``k``.

    ``bucket`` is a multiple of 8 (and so is ``_STEP``): every run starts on a byte.
    """
    n = res.size
    mask = np.empty(_STEP, dtype=np.uint8)
    for k in range((n + bucket - 1) // bucket):
        end = min(n, (k + 1) * bucket)
        for lo in range(k * bucket, end, _STEP):
            hi = min(end, lo + _STEP)
            _apply_run(res[lo:hi], grad[lo:hi], scales[2 * k], scales[2 * k + 1], mask)
            _pack(mask, hi - lo, packed, lo // 8)


@_jit()
def column_apply(
    res: np.ndarray, grad: np.ndarray, cols: int, scales: np.ndarray, packed: np.ndarray
) -> None:
    """:func:`flat_apply` for column groups; ``scales`` is ``(2, cols)`` (pos row, neg row).

    Runs of whole rows whose first element is a multiple of 8 keep every run on a byte.
    """
    rows = res.size // cols
    align = 8 // np.gcd(cols, 8)
    step = max(align, (_STEP // cols) // align * align)
    mask = np.empty(step * cols, dtype=np.uint8)
    pos = scales[0]
    neg = scales[1]
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        for row in range(r0, r1):
            r = res[row * cols : (row + 1) * cols]
            g = grad[row * cols : (row + 1) * cols]
            m = mask[(row - r0) * cols : (row - r0 + 1) * cols]
            for c in range(cols):
                v = r[c] + g[c]
                is_neg = v < 0
                m[c] = is_neg
                r[c] = v - (neg[c] if is_neg else pos[c])
        _pack(mask, (r1 - r0) * cols, packed, r0 * cols // 8)


def _means(sums: np.ndarray, negs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Interleaved fp32 scales ``[pos_0, neg_0, ...]`` from ``(G, 2)`` fp64 sums and counts."""
    counts = np.stack([sizes - negs, negs], axis=1).astype(np.float64)
    return (sums / np.maximum(counts, 1.0)).astype(np.float32).reshape(-1)


def sweep(
    columns: int, bucket: int, res: np.ndarray, grad: np.ndarray, packed: np.ndarray
) -> np.ndarray | None:
    """One error-feedback step on the flat fp32 ``res`` (in place) and ``grad``.

    ``columns > 0``: column groups of that width, else flat buckets of ``bucket`` elements.
    Fills ``packed`` and returns the interleaved scales, or ``None`` (``res`` untouched) when
    some ``res + grad`` is NaN or infinite.
    """
    n = res.size
    if columns:
        sums = np.zeros((2, columns))
        negs = np.zeros(columns, dtype=np.int64)
        if column_stats(res, grad, columns, sums, negs) != 0.0:
            return None
        scales = _means(sums.T, negs, np.full(columns, n // columns))
        column_apply(res, grad, columns, np.ascontiguousarray(scales.reshape(-1, 2).T), packed)
        return scales
    groups = -(-n // bucket)
    sums = np.zeros((groups, 2))
    negs = np.zeros(groups, dtype=np.int64)
    if flat_stats(res, grad, bucket, sums, negs) != 0.0:
        return None
    sizes = np.full(groups, bucket)
    sizes[-1] = n - (groups - 1) * bucket
    scales = _means(sums, negs, sizes)
    flat_apply(res, grad, bucket, scales, packed)
    return scales
