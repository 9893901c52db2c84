"""Numba kernels for 1-bit SGD with error feedback on the CPU (Seide et al. 2014,
https://www.microsoft.com/en-us/research/publication/1-bit-stochastic-gradient-descent-and-application-to-data-parallel-distributed-training-of-speech-dnns/).

An optional accelerator of :meth:`gradzip.compress.onebit.OneBit.compress_with_feedback`:
importing this module imports numba, so :mod:`~gradzip.compress.onebit` imports it lazily and
falls back to its torch sweep when numba is missing. ``v = res + grad`` elementwise in fp32:

* flat buckets (:func:`flat_fused`): one pass over memory. Each bucket (8192 elements, 32 KiB
  by default) gets ``res += grad`` while its sums are taken, then, still in cache, its sign
  bits are packed and ``res -= scale`` is stored: the traffic of ``res.add_(grad)``.
* column groups (:func:`column_stats` then :func:`column_apply`): a column's mean needs every
  row first, so two passes: a read-only one for the per-column sums and a finiteness probe,
  then one that recomputes ``v`` (the same fp32 add, bit for bit), packs its sign bits
  LSB-first and stores ``res = v - scale`` (one rounding, as the torch path).

The sums are fp32 partial sums of at most :data:`_SUB` elements added in fp64 (per column:
fp64). Signs, and so the packed bytes, equal the torch path's exactly; the sums are added in
another order than torch's, so a scale may differ from the torch path's in its last bits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

__all__ = [
    "column_apply", "column_stats", "decode_sum", "flat_compress", "flat_fused", "probe", "sweep",
]

#: elements per fp32 partial sum: small enough that its rounding stays near fp32's last bit,
#: large enough for the vectorised loop to amortise the fp64 add
_SUB = 256
#: elements per sign mask of the column apply pass (stays in L1 with its slices of res, grad)
_STEP = 8192
#: ``(word * _MAGIC) >> 56`` gathers the low bits of the 8 bytes of ``word`` into one byte,
#: byte ``k`` giving bit ``k`` (each partial product lands on its own bit: no carries)
_MAGIC = np.uint64(0x0102040810204080)


def _jit(fast: bool = False, inline: bool = False) -> Callable[[Callable[..., Any]], Any]:
    """``njit(cache=True, nogil=True)``, uncached where no cache directory is writable; the
    one jit of every numba kernel module of gradzip.

    ``fast`` lets LLVM reassociate fp32 sums (partial sums, the finiteness probe
    ``sum(v - v)``) so that they vectorise; no other fast-math flag is set (NaN/Inf must
    propagate into the probe). ``inline``: numba inlines the function into its callers (a
    call per chunk costs more than the work).
    """
    flags: dict[str, Any] = {"fastmath": {"reassoc"}} if fast else {}
    if inline:
        flags["inline"] = "always"

    def wrap(fn: Callable[..., Any]) -> Any:
        try:
            return njit(cache=True, nogil=True, **flags)(fn)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            return njit(nogil=True, **flags)(fn)

    return wrap


@_jit(fast=True)
def _run_add_stats(r: np.ndarray, g: np.ndarray) -> tuple[float, float, int, float]:
    """``r += g``; fp32 (sum of r >= 0, sum of r < 0), count of r < 0 and ``sum(r - r)``."""
    pos = np.float32(0.0)
    neg = np.float32(0.0)
    cnt = np.float32(0.0)  # a float count (exact below 2**24) keeps the loop in fp32 lanes
    chk = np.float32(0.0)
    for i in range(r.size):
        v = r[i] + g[i]
        r[i] = v
        chk += v - v
        is_neg = v < 0
        pos += v if not is_neg else np.float32(0.0)
        neg += v if is_neg else np.float32(0.0)
        cnt += np.float32(1.0) if is_neg else np.float32(0.0)
    return pos, neg, int(cnt), chk


@_jit(fast=True)
def _run_add_stats_to(
    r: np.ndarray, g: np.ndarray, d: np.ndarray
) -> tuple[float, float, int, float]:
    """:func:`_run_add_stats` into ``d = r + g`` (``d`` another array; ``r`` is only read).
    A kernel of its own: one that might write its input would lose the vectorised loop."""
    pos = np.float32(0.0)
    neg = np.float32(0.0)
    cnt = np.float32(0.0)  # a float count (exact below 2**24) keeps the loop in fp32 lanes
    chk = np.float32(0.0)
    for i in range(r.size):
        v = r[i] + g[i]
        d[i] = v
        chk += v - v
        is_neg = v < 0
        pos += v if not is_neg else np.float32(0.0)
        neg += v if is_neg else np.float32(0.0)
        cnt += np.float32(1.0) if is_neg else np.float32(0.0)
    return pos, neg, int(cnt), chk


@_jit(fast=True)
def probe(x: np.ndarray) -> float:
    """``sum(x - x)``: 0.0, or NaN when some element of ``x`` is NaN or infinite."""
    chk = np.float32(0.0)
    for i in range(x.size):
        chk += x[i] - x[i]
    return float(chk)


@_jit()
def flat_fused(
    res: np.ndarray,
    grad: np.ndarray,
    out: np.ndarray,
    bucket: int,
    scales: np.ndarray,
    packed: np.ndarray,
) -> int:
    """One error-feedback step over flat buckets, one bucket at a time (one pass over memory).

    Per bucket ``k``: ``out = res + grad`` while summing (fp32 partial sums of :data:`_SUB`
    elements, added in fp64); the means go to ``scales[2k], scales[2k + 1]``; then, with the
    bucket still in cache, its sign bits go to ``packed`` and ``out -= scales[2k + bit]``.
    ``out`` may be ``res`` (in place); otherwise ``res`` is only read. Returns -1, or the
    first bucket whose compensated values hold NaN/Inf: buckets of ``out`` before it are
    already updated, that one holds ``res + grad`` and the later ones are untouched.
    """
    n = res.size
    inplace = out.ctypes.data == res.ctypes.data
    mask = np.empty(min(n, bucket), dtype=np.uint8)
    for k in range((n + bucket - 1) // bucket):
        lo = k * bucket
        hi = min(n, lo + bucket)
        pos = 0.0
        neg = 0.0
        cnt = 0
        chk = 0.0
        for a in range(lo, hi, _SUB):
            b = min(hi, a + _SUB)
            if inplace:
                p, q, c, d = _run_add_stats(res[a:b], grad[a:b])
            else:
                p, q, c, d = _run_add_stats_to(res[a:b], grad[a:b], out[a:b])
            pos += p
            neg += q
            cnt += c
            chk += d
        if chk != 0.0:
            return k
        pos_mean = np.float32(pos / max(hi - lo - cnt, 1))
        neg_mean = np.float32(neg / max(cnt, 1))
        scales[2 * k] = pos_mean
        scales[2 * k + 1] = neg_mean
        r = out[lo:hi]
        for i in range(hi - lo):
            v = r[i]
            is_neg = v < 0
            mask[i] = is_neg
            r[i] = v - (neg_mean if is_neg else pos_mean)
        _pack(mask, hi - lo, packed, lo // 8)
    return -1


@_jit(fast=True)
def _run_stats(x: np.ndarray) -> tuple[float, float, int, float]:
    """fp32 (sum of x >= 0, sum of x < 0), count of x < 0 and ``sum(x - x)``, read-only."""
    pos = np.float32(0.0)
    neg = np.float32(0.0)
    cnt = np.float32(0.0)  # a float count (exact below 2**24) keeps the loop in fp32 lanes
    chk = np.float32(0.0)
    for i in range(x.size):
        v = x[i]
        chk += v - v
        is_neg = v < 0
        pos += v if not is_neg else np.float32(0.0)
        neg += v if is_neg else np.float32(0.0)
        cnt += np.float32(1.0) if is_neg else np.float32(0.0)
    return pos, neg, int(cnt), chk


@_jit()
def flat_compress(x: np.ndarray, bucket: int, scales: np.ndarray, packed: np.ndarray) -> int:
    """:meth:`OneBit.compress` of the flat fp32 ``x`` in flat buckets, one bucket at a time
    (its sums, then, still in cache, its sign bits): one read pass, nothing written but the
    payload. The sums are taken as in :func:`flat_fused`. Returns -1, or the first bucket
    holding a NaN/Inf (the payload is then incomplete)."""
    n = x.size
    mask = np.empty(min(n, bucket), dtype=np.uint8)
    for k in range((n + bucket - 1) // bucket):
        lo = k * bucket
        hi = min(n, lo + bucket)
        pos = 0.0
        neg = 0.0
        cnt = 0
        chk = 0.0
        for a in range(lo, hi, _SUB):
            p, q, c, d = _run_stats(x[a : min(hi, a + _SUB)])
            pos += p
            neg += q
            cnt += c
            chk += d
        if chk != 0.0:
            return k
        scales[2 * k] = np.float32(pos / max(hi - lo - cnt, 1))
        scales[2 * k + 1] = np.float32(neg / max(cnt, 1))
        for i in range(hi - lo):
            mask[i] = x[lo + i] < 0
        _pack(mask, hi - lo, packed, lo // 8)
    return -1


@_jit()
def column_stats(
    res: np.ndarray, grad: np.ndarray, cols: int, sums: np.ndarray, negs: np.ndarray
) -> float:
    """Per column ``c`` of ``v = res + grad`` (element ``r * cols + c``), read-only.

    ``sums[0, c]`` / ``sums[1, c]``: fp64 sums of the non-negative / negative values;
    ``negs[c]``: how many are negative. Returns ``sum(v - v)``: 0.0, or NaN when some ``v`` is
    NaN or infinite (nothing is written, so the residual is left as it was).
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
def column_apply(
    res: np.ndarray,
    grad: np.ndarray,
    out: np.ndarray,
    cols: int,
    scales: np.ndarray,
    packed: np.ndarray,
) -> None:
    """Sign bits of ``v = res + grad`` into ``packed``; ``out = v - scales[bit, c]`` (``out``
    may be ``res``).

    ``scales`` is ``(2, cols)`` (row 0: non-negative means, row 1: negative means).

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
            o = out[row * cols : (row + 1) * cols]
            m = mask[(row - r0) * cols : (row - r0 + 1) * cols]
            for c in range(cols):
                v = r[c] + g[c]
                is_neg = v < 0
                m[c] = is_neg
                o[c] = v - (neg[c] if is_neg else pos[c])
        _pack(mask, (r1 - r0) * cols, packed, r0 * cols // 8)


def _means(sums: np.ndarray, negs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Interleaved fp32 scales ``[pos_0, neg_0, ...]`` from ``(G, 2)`` fp64 sums and counts."""
    counts = np.stack([sizes - negs, negs], axis=1).astype(np.float64)
    return (sums / np.maximum(counts, 1.0)).astype(np.float32).reshape(-1)


def sweep(
    columns: int,
    bucket: int,
    res: np.ndarray,
    grad: np.ndarray,
    packed: np.ndarray,
    out: np.ndarray | None = None,
) -> np.ndarray | None:
    """One error-feedback step on the flat fp32 ``res`` and ``grad``: the new residual goes to
    ``out`` (default: ``res``, in place; another array leaves ``res`` as it was, at the same
    memory traffic).

    ``columns > 0``: column groups of that width, else flat buckets of ``bucket`` elements.
    Fills ``packed`` and returns the interleaved scales, or ``None`` when some ``res + grad``
    is NaN or infinite: ``out`` is then untouched for column groups, partly updated for flat
    buckets (check ``grad`` with :func:`probe` first to keep it for a NaN/Inf gradient).
    """
    out = res if out is None else out
    n = res.size
    if columns:
        sums = np.zeros((2, columns))
        negs = np.zeros(columns, dtype=np.int64)
        if column_stats(res, grad, columns, sums, negs) != 0.0:
            return None
        scales = _means(sums.T, negs, np.full(columns, n // columns))
        column_apply(
            res, grad, out, columns, np.ascontiguousarray(scales.reshape(-1, 2).T), packed
        )
        return scales
    scales = np.empty(2 * -(-n // bucket), dtype=np.float32)
    if flat_fused(res, grad, out, bucket, scales, packed) >= 0:
        return None
    return scales



@_jit()
def _decode_run(
    bits: np.ndarray, s: np.ndarray, g0: int, cols: int, lo: int, hi: int, first: bool,
    out: np.ndarray, nibbles: np.ndarray,
) -> None:
    """Elements ``lo:hi`` of one rank: group ``g0`` for all (``cols == 0``, a flat bucket)
    or ``g0 + (i - lo) % cols`` (a whole number of column-group rows starting at ``lo``).

    A flat bucket decodes through ``nibbles`` (16 x 4 fp32): row ``b`` holds the four values
    that the four sign bits of ``b`` stand for, so each byte is two copies of four values (a
    select per element does not vectorise and ran 5x slower). Column groups read
    ``s[2 * c + bit]`` element by element."""
    if cols == 0:
        pos = s[2 * g0]
        neg = s[2 * g0 + 1]
        for b in range(16):
            for k in range(4):
                nibbles[b, k] = neg if (b >> k) & 1 else pos
        whole = lo + (hi - lo) // 8 * 8  # lo is a multiple of 8 (bucket_size is)
        for j in range(lo >> 3, whole >> 3):
            byte = bits[j]
            at = j << 3
            low = nibbles[byte & 15]
            high = nibbles[byte >> 4]
            if first:
                for k in range(4):
                    out[at + k] = low[k]
                for k in range(4):
                    out[at + 4 + k] = high[k]
            else:
                for k in range(4):
                    out[at + k] += low[k]
                for k in range(4):
                    out[at + 4 + k] += high[k]
        for i in range(whole, hi):
            v = neg if (bits[i >> 3] >> (i & 7)) & 1 else pos
            out[i] = v if first else out[i] + v
        return
    for a in range(lo, hi, cols):
        for c in range(cols):
            i = a + c
            v = s[2 * c + ((bits[i >> 3] >> (i & 7)) & 1)]
            out[i] = v if first else out[i] + v


@_jit()
def decode_sum(
    packed: np.ndarray, scales: np.ndarray, columns: int, bucket: int, scale: float,
    out: np.ndarray,
) -> None:
    """Receive side: ``out = scale * sum_r decode(packed[r], scales[r])`` in fp32, rank order.

    ``packed`` is ``(P, ceil(n / 8))`` sign bytes, ``scales`` ``(P, 2 G)`` interleaved means
    (already rounded to the gradient's dtype: every decoded element is one of them, so that
    is the reference's per-rank cast). ``columns > 0``: column groups of that width, else
    flat buckets of ``bucket`` elements. The output is taken about :data:`_STEP` elements at
    a time (whole buckets or whole rows), every rank added while it is in cache: one pass
    over ``out``; the products by ``scale`` come last, as ``total * scale`` does.
    """
    n = out.size
    ranks = packed.shape[0]
    if columns:
        step = max(1, _STEP // columns) * columns
    else:
        step = max(1, _STEP // bucket) * bucket
    f_scale = np.float32(scale)
    nibbles = np.empty((16, 4), dtype=np.float32)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        for r in range(ranks):
            if columns:
                _decode_run(packed[r], scales[r], 0, columns, lo, hi, r == 0, out, nibbles)
            else:
                for a in range(lo, hi, bucket):
                    b = min(hi, a + bucket)
                    _decode_run(
                        packed[r], scales[r], a // bucket, 0, a, b, r == 0, out, nibbles
                    )
        if scale != 1.0:
            for i in range(lo, hi):
                out[i] = out[i] * f_scale
