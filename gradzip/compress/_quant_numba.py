"""Numba kernels for QSGD (Alistarh et al. 2017, https://arxiv.org/abs/1610.02132) and TernGrad
(Wen et al. 2017, https://arxiv.org/abs/1705.07878) on the CPU.

Optional accelerators of :mod:`gradzip.compress.qsgd` and :mod:`gradzip.compress.terngrad`,
which import this module lazily (it imports numba) and keep their torch code as the reference
and the fallback. The wire formats are the reference's, byte for byte; inputs are flat fp32.

* :func:`qsgd_compress`: one pass over memory. Per bucket, its norm (l2: fp64 sum of squares;
  max: max ``|x|`` on the fp32 bits), then, with the bucket still in cache, the stochastic
  levels and their codes ``(level << 1) | negative``, packed LSB-first in ``bits``-bit fields
  as ``packing.pack_bits`` does (widths that do not divide 8 included).
* :func:`tern_stats` (one read pass: sum of squares, max ``|g|``, finiteness) and
  :func:`tern_compress` (a second: clip, ternarize, pack two bits or five trits per byte).
* :func:`qsgd_sum` / :func:`tern_sum`: the receive side, every rank's payload decoded, rounded
  to the gradient dtype as the reference's per-rank ``decompress(...).to(dtype)`` does, and
  added in rank order in fp32, chunk by chunk: one pass over the output.

Randomness: counter-based, so that a draw is a function of (seed, element index) alone and
no generator state is kept: one seed gives one payload, whatever the code width. Elements
``i`` and ``i + 2000`` of each chunk of 4000 (chunks start at multiples of 4000) share the
64-bit splitmix64 finalizer of ``key + p * 0x9E3779B97F4A7C15`` (Steele et al. 2014,
https://doi.org/10.1145/2714064.2660195; ``p`` the pair's index, ``key`` the finalizer of the
seed); the first takes its top 24 bits, the second its low 24 bits, as a multiple of 2**-24 in
[0, 1) (the 24 bits ``torch.rand`` draws for fp32). This stream differs from the torch path's
``torch.rand`` and from the GPU kernels' Philox: every path is unbiased, but the levels
(trits) drawn for one seed differ by path.
"""

from __future__ import annotations

import numpy as np

from gradzip.compress._onebit_numba import _jit

__all__ = [
    "norm32", "qsgd_compress", "qsgd_sum", "seed_key", "tern_compress", "tern_stats", "tern_sum",
]

#: elements per chunk: a multiple of 8 (a whole number of bytes at every code width) and of 5
#: (base-3 bytes); its codes and fp32 values stay in L1
_CHUNK = 4000
#: elements per fp64 partial sum of squares in :func:`tern_stats`
_SUB = 2000
_FMAX = np.float64(np.finfo(np.float32).max)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TOP24 = np.float32(2.0**-24)
_ABS = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_INF_INT = np.int32(0x7F800000)
#: the 5 trits ``(b // 3**q) % 3`` of each byte ``b``, as ``unpack_base3`` reads any byte
_TRITS_OF = (np.arange(256).reshape(-1, 1) // 3 ** np.arange(5) % 3).astype(np.uint8)


@_jit()
def _mix(z: np.uint64) -> np.uint64:
    """The splitmix64 finalizer: a bijection of 64-bit words that spreads every input bit."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def seed_key(seed: int) -> np.uint64:
    """The stream key of ``seed`` (any integer, taken mod 2**64)."""
    return np.uint64(_mix(np.uint64(int(seed) % (1 << 64))))


@_jit()
def _uniforms(key: np.uint64, c0: int, u: np.ndarray) -> None:
    """``u_i`` for the ``_CHUNK`` elements ``i = c0 + j`` of the chunk starting at ``c0`` (a
    multiple of ``_CHUNK``): elements ``j`` and ``j + _CHUNK / 2`` share the draw of pair ``p =
    c0 / 2 + j``, its top and its low 24 bits; each is a multiple of 2**-24 in [0, 1)."""
    half = _CHUNK // 2
    lo = u[:half]
    hi = u[half:]
    z = key + np.uint64(c0 // 2) * _GAMMA
    for j in range(half):
        h = _mix(z)
        z += _GAMMA  # an induction variable: one add instead of a multiply per pair
        lo[j] = np.float32(np.int64(h >> np.uint64(40))) * _TOP24
        hi[j] = np.float32(np.int64(h & np.uint64(0xFFFFFF))) * _TOP24


@_jit(fast=True)
def _sumsq(x: np.ndarray, lo: int, hi: int) -> float:
    """fp64 sum of ``x[lo:hi] ** 2`` (squares in fp64: reassociated so that it vectorises)."""
    xs = x[lo:hi]
    s = 0.0
    for i in range(hi - lo):
        v = np.float64(xs[i])
        s += v * v
    return s


@_jit()
def _maxbits(xbits: np.ndarray, lo: int, hi: int) -> np.int32:
    """Max of ``|x|``'s fp32 bits over ``[lo, hi)`` as int32: for non-negative floats the
    integer order is the float order, and a NaN or Inf gives bits ``>= 0x7F800000``."""
    xs = xbits[lo:hi]
    m = np.int32(0)
    for i in range(hi - lo):
        m = max(m, np.int32(xs[i] & _ABS))  # a signed max: it vectorises
    return m


@_jit()
def norm32(sumsq: float) -> np.float32:
    """fp32 ``sqrt(sumsq)``; Inf once ``sumsq`` overflows fp32, where the reference's fp32
    accumulation (``torch.linalg.vector_norm``) overflows too."""
    return np.float32(np.inf) if not sumsq <= _FMAX else np.float32(np.sqrt(sumsq))


@_jit()
def _bits_float(m: np.int32, one: np.ndarray) -> np.float32:
    """The fp32 value whose bits are ``m``, through the one-element uint32 array ``one``."""
    one[0] = np.uint32(m)
    return one.view(np.float32)[0]


@_jit()
def _qsgd_codes(x, i0, i1, c0, scale, lv, u, codes) -> None:
    """Codes of elements ``[i0, i1)`` into ``codes[i - c0]``, as ``QSGD.quantize``: ``a =
    min(|x| * scale, levels)``, ``level = floor(a) + (u < a - floor(a))``; ``u`` holds the
    draws of the chunk at ``c0``. In fp32 throughout (exact: levels are below 2**8)."""
    xs = x[i0:i1]  # views indexed from 0: no negative-index fix-up in the loop
    us = u[i0 - c0 : i1 - c0]
    cs = codes[i0 - c0 : i1 - c0]
    for j in range(i1 - i0):
        v = xs[j]
        a = abs(v) * scale
        a = a if a < lv else lv
        f = np.float32(np.int32(a))  # floor: a >= 0
        level = f + np.float32(us[j] < a - f)
        two = level + level
        code = two + np.float32(1.0) if (v < 0) & (level > 0) else two  # a select
        cs[j] = np.uint8(np.int32(code))


@_jit()
def _pack(codes, count, bits, packed, at) -> None:
    """Pack ``codes[:count]`` (``bits``-bit fields, LSB-first) into ``packed[at:]``.

    Groups of 8 codes fill ``bits`` whole bytes; a last partial group is zero-padded and only
    its ``ceil(rest * bits / 8)`` bytes are written.
    """
    groups = count // 8
    dst = packed[at:]  # a view indexed from 0
    if bits == 8:
        for j in range(groups * 8):
            dst[j] = codes[j]
    elif bits == 4:
        for j in range(groups * 4):
            dst[j] = codes[2 * j] | (codes[2 * j + 1] << 4)
    elif bits == 2:
        for j in range(groups * 2):
            dst[j] = (
                codes[4 * j] | (codes[4 * j + 1] << 2) | (codes[4 * j + 2] << 4)
                | (codes[4 * j + 3] << 6)
            )
    else:
        for g in range(groups):
            w = np.uint64(0)
            for j in range(8):
                w |= np.uint64(codes[8 * g + j]) << np.uint64(j * bits)
            for b in range(bits):
                dst[g * bits + b] = np.uint8((w >> np.uint64(8 * b)) & np.uint64(255))
    rest = count - groups * 8
    if rest:
        w = np.uint64(0)
        for j in range(rest):
            w |= np.uint64(codes[groups * 8 + j]) << np.uint64(j * bits)
        for b in range((rest * bits + 7) // 8):
            dst[groups * bits + b] = np.uint8((w >> np.uint64(8 * b)) & np.uint64(255))


@_jit()
def _unpack(packed, at, count, bits, codes) -> None:
    """Inverse of :func:`_pack`: ``count`` codes from ``packed[at:]`` into ``codes``."""
    groups = count // 8
    mask = np.uint8((1 << bits) - 1)
    src = packed[at:]
    if bits == 8:
        for j in range(groups * 8):
            codes[j] = src[j]
    elif bits == 4:
        for j in range(groups * 4):
            b = src[j]
            codes[2 * j] = b & mask
            codes[2 * j + 1] = b >> 4
    elif bits == 2:
        for j in range(groups * 2):
            b = src[j]
            codes[4 * j] = b & mask
            codes[4 * j + 1] = (b >> 2) & mask
            codes[4 * j + 2] = (b >> 4) & mask
            codes[4 * j + 3] = b >> 6
    else:
        for g in range(groups):
            w = np.uint64(0)
            for b in range(bits):
                w |= np.uint64(src[g * bits + b]) << np.uint64(8 * b)
            for j in range(8):
                codes[8 * g + j] = np.uint8(w >> np.uint64(j * bits)) & mask
    rest = count - groups * 8
    if rest:
        w = np.uint64(0)
        for b in range((rest * bits + 7) // 8):
            w |= np.uint64(src[groups * bits + b]) << np.uint64(8 * b)
        for j in range(rest):
            codes[groups * 8 + j] = np.uint8(w >> np.uint64(j * bits)) & mask


@_jit()
def qsgd_compress(x, xbits, bucket, levels, bits, use_max, key, norms, packed) -> int:
    """QSGD of the flat fp32 ``x`` (``xbits``: its uint32 view) into ``norms`` (``float32[G]``)
    and ``packed`` (``packed_size(n, bits)`` bytes), one bucket at a time.

    Returns -1, or the first bucket whose norm is NaN or Inf (the outputs are then partial).
    """
    n = x.size
    lv = np.float32(levels)
    codes = np.zeros(_CHUNK, dtype=np.uint8)
    u = np.empty(_CHUNK, dtype=np.float32)
    one = np.empty(1, dtype=np.uint32)
    c0 = 0  # first element of the chunk in ``codes``
    _uniforms(key, c0, u)
    for k in range((n + bucket - 1) // bucket):
        lo = k * bucket
        hi = min(n, lo + bucket)
        if use_max:
            m = _maxbits(xbits, lo, hi)
            if m >= _INF_INT:
                return k
            norm = _bits_float(m, one)
        else:
            norm = norm32(_sumsq(x, lo, hi))
            if not norm < np.inf:
                return k
        norms[k] = norm
        scale = lv / norm if norm > 0 else np.float32(0.0)
        i = lo
        while i < hi:
            end = min(hi, c0 + _CHUNK)
            _qsgd_codes(x, i, end, c0, scale, lv, u, codes)
            if end == c0 + _CHUNK:
                _pack(codes, _CHUNK, bits, packed, c0 * bits // 8)
                c0 += _CHUNK
                if c0 < n:
                    _uniforms(key, c0, u)
            i = end
    if c0 < n:
        _pack(codes, n - c0, bits, packed, c0 * bits // 8)
    return -1


@_jit()
def _round_to(vals, vbits, count, rnd) -> None:
    """Round fp32 ``vals[:count]`` (``vbits``: the same memory as uint32) to fp16 (``rnd ==
    1``) or bf16 (2), to nearest even as torch's ``.to(dtype)``, and back to fp32, in place."""
    if rnd == 1:
        for j in range(count):
            b = vbits[j]
            a = b & _ABS
            if a < np.uint32(0x38800000):  # below 2**-14: fp16 subnormals, steps of 2**-24
                y = abs(vals[j]) * np.float32(2.0**24)
                r = ((y + np.float32(2.0**23)) - np.float32(2.0**23)) * np.float32(2.0**-24)
                vals[j] = -r if b != a else r
            elif a < np.uint32(0x477FF000):  # below 65520: 10 mantissa bits, ties to even
                r = (a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1)))
                vbits[j] = (b ^ a) | (r & np.uint32(0xFFFFE000))
            elif a < _INF_BITS:
                vbits[j] = (b ^ a) | _INF_BITS
    elif rnd == 2:
        for j in range(count):
            b = vbits[j]
            if b & _ABS < _INF_BITS:  # NaN stays NaN
                r = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
                vbits[j] = r & np.uint32(0xFFFF0000)


@_jit()
def _add(out, vals, count) -> None:
    """``out[:count] += vals`` in fp32 (the next rank)."""
    for j in range(count):
        out[j] += vals[j]


@_jit()
def _scale(out, count, scale) -> None:
    s = np.float32(scale)
    for j in range(count):
        out[j] *= s


@_jit()
def qsgd_sum(codes, norms, bucket, levels, bits, rnd, scale, out) -> None:
    """``out = scale * sum_r round(decompress(rank r))``, fp32, chunk by chunk.

    ``codes``: ``(R, packed_size(n, bits))`` uint8; ``norms``: ``(R, G)`` fp32; ``out``: fp32[n].
    Each value is ``±level * (norm / levels)`` in fp32, as the reference.
    """
    n = out.size
    lv = np.float32(levels)
    cbuf = np.empty(_CHUNK, dtype=np.uint8)
    scratch = np.empty(_CHUNK, dtype=np.float32)
    for c0 in range(0, n, _CHUNK):
        c1 = min(n, c0 + _CHUNK)
        dst = out[c0:c1]
        for r in range(codes.shape[0]):
            vals = dst if r == 0 else scratch  # the first rank is written in place
            _unpack(codes[r], c0 * bits // 8, c1 - c0, bits, cbuf)
            i = c0
            while i < c1:
                k = i // bucket
                end = min(c1, (k + 1) * bucket)
                step = norms[r, k] / lv
                cs = cbuf[i - c0 : end - c0]
                vs = vals[i - c0 : end - c0]
                for j in range(end - i):
                    c = cs[j]
                    sign = np.float32(1.0) - np.float32(2.0) * np.float32(c & 1)
                    vs[j] = (np.float32(c >> 1) * sign) * step  # -level exactly, then * step
                i = end
            _round_to(vals, vals.view(np.uint32), c1 - c0, rnd)
            if r:
                _add(dst, scratch, c1 - c0)
        if scale != 1.0:
            _scale(dst, c1 - c0, scale)


@_jit()
def tern_stats(x, xbits) -> tuple[float, float]:
    """One read pass: (fp64 sum of squares, max ``|x|``) of the flat fp32 ``x``; the max is
    Inf when some element is NaN or infinite."""
    s = 0.0
    m = np.int32(0)
    for a in range(0, x.size, _SUB):
        b = min(x.size, a + _SUB)
        s += _sumsq(x, a, b)
        m = max(m, _maxbits(xbits, a, b))
    top = np.inf if m >= _INF_INT else float(_bits_float(m, np.empty(1, dtype=np.uint32)))
    return s, top


@_jit()
def tern_compress(x, bound, scaler, base3, key, packed) -> None:
    """Trits ``t_i + 1`` of the flat fp32 ``x`` into ``packed``, as ``TernGrad.ternarize``:
    ``|g_i| = min(|x_i|, bound)`` (``bound = inf``: no clipping), kept with probability
    ``|g_i| / scaler`` (never when ``scaler`` is 0), with the sign of ``x_i``."""
    n = x.size
    s = np.float32(scaler)
    c = np.float32(bound)
    trits = np.empty(_CHUNK, dtype=np.uint8)
    u = np.empty(_CHUNK, dtype=np.float32)
    for c0 in range(0, n, _CHUNK):
        c1 = min(n, c0 + _CHUNK)
        m = c1 - c0
        if s > 0:
            _uniforms(key, c0, u)
            xs = x[c0:c1]
            for j in range(m):
                v = xs[j]
                a = abs(v)
                keep = np.float32(u[j] < (a if a < c else c) / s)
                # t + 1: 1 - keep for a negative value, else 1 + keep (fp32: vectorises)
                trit = np.float32(1.0) + keep - (keep + keep) * np.float32(v < 0)
                trits[j] = np.uint8(np.int32(trit))
        else:
            for j in range(m):
                trits[j] = 1
        if base3:
            dst = packed[c0 // 5 :]
            full = m // 5
            for j in range(full):
                dst[j] = (
                    trits[5 * j] + 3 * trits[5 * j + 1] + 9 * trits[5 * j + 2]
                    + 27 * trits[5 * j + 3] + 81 * trits[5 * j + 4]
                )
            if m > full * 5:
                byte = 0
                for q in range(m - full * 5):
                    byte += trits[full * 5 + q] * 3**q
                dst[full] = byte
        else:
            _pack(trits, m, 2, packed, c0 // 4)


@_jit()
def tern_sum(codes, table, base3, scale, out) -> bool:
    """``out = scale * sum_r table[r, code_r]``, fp32, chunk by chunk; ``table[r]`` holds rank
    ``r``'s values of the codes 0, 1, 2 (``-s, 0, s`` rounded as the reference's decompress),
    ``codes`` is ``(R, bytes)``. Returns True when some 2-bit code is 3 (not a trit; ``out`` is
    then junk)."""
    n = out.size
    trits = _TRITS_OF
    cbuf = np.empty(_CHUNK, dtype=np.uint8)
    scratch = np.empty(_CHUNK, dtype=np.float32)
    bad = np.uint8(0)
    for c0 in range(0, n, _CHUNK):
        c1 = min(n, c0 + _CHUNK)
        m = c1 - c0
        dst = out[c0:c1]
        for r in range(codes.shape[0]):
            vals = dst if r == 0 else scratch  # the first rank is written in place
            if base3:
                src = codes[r, c0 // 5 :]
                full = m // 5
                for j in range(full):
                    b = src[j]
                    for q in range(5):
                        cbuf[5 * j + q] = trits[b, q]
                for q in range(m - 5 * full):
                    cbuf[5 * full + q] = trits[src[full], q]
            else:
                _unpack(codes[r], c0 // 4, m, 2, cbuf)
            t0, t1, t2 = table[r, 0], table[r, 1], table[r, 2]
            for j in range(m):
                c = cbuf[j]
                bad |= c & (c >> np.uint8(1))  # 3 is the only code with both bits set
                vals[j] = t2 if c == 2 else (t1 if c == 1 else t0)
            if r:
                _add(dst, scratch, m)
        if scale != 1.0:
            _scale(dst, m, scale)
    return bad != 0
