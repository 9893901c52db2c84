"""Numba kernels for top-k sparsification (Aji & Heafield 2017,
https://arxiv.org/abs/1704.05021) and DGC (Lin et al. 2018, https://arxiv.org/abs/1712.01887)
on the CPU.

An optional accelerator of :mod:`gradzip.compress.topk` and :mod:`gradzip.compress.dgc`:
importing this module imports numba, so those modules import it lazily and keep their torch
code as the reference and the fallback. The payload is the reference's ``(int32 indices, fp32
values)`` with the indices in **ascending order** (unique, as every sparse payload).

Selection without a sort, in one pass over memory. A threshold is known *before* the pass,
from a sample of the values computed at the sampled positions from the old state with the
pass's own arithmetic, so the pass that computes the new values (``res + grad``, or DGC's
momentum and velocity) also collects every position with ``|v| >= threshold`` and its value
(chunks of :data:`_CHUNK` elements: one vectorised loop writes a flag byte per element, then
the set bits of the flags read as 64-bit words give the positions). Between candidates,
magnitudes are compared through their float bits: ``bits(|x|)``, the fp32 pattern with the
sign cleared, is monotonic in ``|x|``.

* ``exact`` (:func:`choose` without picks): an evenly spread sample, a threshold aimed a
  little low so that the candidates usually number a little over ``k``; the exact top-k
  among them by a radix select on their bits (:func:`cut`). Fewer than ``k`` candidates: a
  radix select over all values instead (about four more passes, rare); more than the buffer
  holds: a read-only rescan. The set is always the exact top-k by magnitude; among equal
  magnitudes at the cut the lowest indices are kept (torch.topk keeps any of them).
* ``sampled`` (picks given): the reference's ladder of thresholds from the same random picks
  (:func:`gradzip.compress.topk.sparsify_sampled`); the candidates at or above the lowest
  threshold give the count at every rung, so the same threshold is chosen, and when it
  selects more than ``k`` the reference's own trim (``torch.topk`` of those few, in index
  order) keeps ``k``: the same set as the reference, ties included.

A NaN/Inf value makes the pass's probe ``sum(v - v)`` NaN, so :func:`choose` returns None
(after the pass: the caller decides what becomes of what it wrote).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from gradzip.compress._onebit_numba import _jit

__all__ = [
    "choose",
    "cut",
    "dgc_pass",
    "dgc_sample",
    "mask_dgc",
    "mask_residual",
    "pick",
    "probe",
    "scan",
    "scatter_add",
    "sum_sample",
    "topk_pass",
]

_ABS = np.uint32(0x7FFFFFFF)  # clears the sign bit: bits(|x|)
_INF = np.uint32(0x7F800000)  # bits(inf); NaN patterns are above it
#: elements of the evenly spread sample that aims the exact selection's threshold
_SAMPLE = 16384


@intrinsic
def _fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """``a * b + c`` in fp32 with one rounding (LLVM's ``fma``), as torch's ``add(c, b,
    alpha=a)`` computes DGC's momentum on the CPU."""
    if not a == b == c == types.float32:
        return None
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32"
        )
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _cttz(typingctx: Any, word: Any) -> Any:
    """The number of trailing zero bits of a non-zero uint64 (LLVM's ``cttz``: one
    instruction)."""
    if word != types.uint64:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]), "llvm.cttz.i64"
        )
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return types.uint64(types.uint64), codegen


# ---------------------------------------------------------------------- the fused passes
#: elements per chunk of a pass: a chunk's values are computed in one vectorised loop that
#: also writes one flag byte per element (``|v| >= thr``) into an L1-resident scratch, which
#: :func:`_collect` then turns into candidates
_CHUNK = 256


@_jit(inline=True)
def _collect(flags, words, x, lo, size, at, got, c):
    """Append the flagged positions ``lo + j`` (``flags[j]`` is 1, ``j < size``) to ``at``
    and their values ``x[j]`` to ``got`` from slot ``c`` (room for ``size`` more is
    checked by the caller); returns the new count.

    ``words`` is ``flags`` read as 64-bit words; each set bit of a word (bit 0 of a flag
    byte) gives one position through a count of trailing zeros, so the work is one test per
    8 elements plus one step per candidate.
    """
    one = np.uint64(1)
    for w in range(size // 8):
        word = words[w]
        while word:
            j = 8 * w + (_cttz(word) >> np.uint64(3))
            at[c] = lo + j
            got[c] = x[j]
            c += 1
            word &= word - one
    for j in range(size - size % 8, size):
        at[c] = lo + j
        got[c] = x[j]
        c += flags[j]
    return c


@_jit(inline=True)
def _count(flags, size):
    """How many of ``flags[:size]`` are set (once the candidate buffer is full)."""
    c = 0
    for j in range(size):
        c += flags[j]
    return c


@_jit(fast=True)
def topk_pass(res, grad, out, has_res, thr, buf):
    """``out = res + grad`` (``grad`` alone when not ``has_res``: a copy, ``-0.0`` kept),
    appending the position of every ``|out| >= thr`` to ``buf[0]`` (ascending) and its value
    to ``buf[1]`` (read as fp32).

    Each collected candidate's ``out`` becomes ``v - (0 + v)`` at once, while its chunk is in
    L1 (what the reference's residual is where ``v`` is sent): most candidates are sent, and
    :func:`choose` puts back the few that are not (``zeroed``).

    Returns ``(count, full, stored)``: ``full`` when ``buf`` was too small (then only
    counted; ``stored`` candidates were collected, and zeroed); the count is -1 when some
    ``out`` is NaN or infinite (the pass is complete all the same). ``out`` may be ``res``
    (in place).
    """
    n = out.size
    c = 0
    stored = 0
    full = False
    chk = np.float32(0.0)
    zero = np.float32(0.0)
    flags = np.zeros(_CHUNK, dtype=np.uint8)
    words = flags.view(np.uint64)
    at = buf[0]
    got = buf[1].view(np.float32)
    for lo in range(0, n, _CHUNK):
        size = min(_CHUNK, n - lo)
        r = res[lo : lo + size]
        g = grad[lo : lo + size]
        o = out[lo : lo + size]
        if has_res:
            for j in range(size):
                v = r[j] + g[j]
                o[j] = v
                flags[j] = np.uint8(abs(v) >= thr)
                chk += v - v
        else:
            for j in range(size):
                v = g[j]
                o[j] = v
                flags[j] = np.uint8(abs(v) >= thr)
                chk += v - v
        if full or c + size > at.size:
            stored = c if not full else stored
            full = True
            c += _count(flags, size)
        else:
            start = c
            c = _collect(flags, words, o, lo, size, at, got, c)
            for q in range(start, c):  # sent unless unselected: the residual there is 0
                o[at[q] - lo] = got[q] - (zero + got[q])
    return (c if chk == 0 else -1), full, (stored if full else c)


@_jit(fast=True)
def dgc_pass(grad, u, v, u2, v2, m, s, thr, buf):
    """DGC's momentum correction: ``u2 = fma(m, u, s*grad)``, ``v2 = v + u2`` (``s = 1`` is
    exact), with the candidates of :func:`topk_pass` on ``v2``. ``u2``/``v2`` may be
    ``u``/``v`` (in place). Per chunk ``u2`` first, then ``v2`` from it while it is in L1:
    two loops of fewer streams each vectorise better than one."""
    n = grad.size
    c = 0
    full = False
    chk = np.float32(0.0)
    flags = np.zeros(_CHUNK, dtype=np.uint8)
    words = flags.view(np.uint64)
    at = buf[0]
    got = buf[1].view(np.float32)
    for lo in range(0, n, _CHUNK):
        size = min(_CHUNK, n - lo)
        g = grad[lo : lo + size]
        ui = u[lo : lo + size]
        vi = v[lo : lo + size]
        uo = u2[lo : lo + size]
        vo = v2[lo : lo + size]
        for j in range(size):
            uo[j] = _fma(m, ui[j], g[j] * s)
        for j in range(size):
            vv = vi[j] + uo[j]
            vo[j] = vv
            flags[j] = np.uint8(abs(vv) >= thr)
            chk += vv - vv
        if full or c + size > at.size:
            full = True
            c += _count(flags, size)
        else:
            c = _collect(flags, words, vo, lo, size, at, got, c)
    return (c if chk == 0 else -1), full, 0


@_jit(fast=True)
def scan(vals, thr, buf):
    """The candidates of :func:`topk_pass` over ``vals``, read-only."""
    n = vals.size
    c = 0
    full = False
    chk = np.float32(0.0)
    flags = np.zeros(_CHUNK, dtype=np.uint8)
    words = flags.view(np.uint64)
    at = buf[0]
    got = buf[1].view(np.float32)
    for lo in range(0, n, _CHUNK):
        size = min(_CHUNK, n - lo)
        x = vals[lo : lo + size]
        for j in range(size):
            flags[j] = np.uint8(abs(x[j]) >= thr)
            chk += x[j] - x[j]
        if full or c + size > at.size:
            full = True
            c += _count(flags, size)
        else:
            c = _collect(flags, words, x, lo, size, at, got, c)
    return (c if chk == 0 else -1), full, 0


@_jit()
def sum_sample(res, grad, has_res, picks, out):
    """``out[j]`` = what :func:`topk_pass` will compute at position ``picks[j]``."""
    for j in range(picks.size):
        p = picks[j]
        out[j] = res[p] + grad[p] if has_res else grad[p]


@_jit()
def dgc_sample(grad, u, v, m, s, picks, out):
    """``out[j]`` = the ``v2`` of :func:`dgc_pass` at position ``picks[j]``."""
    for j in range(picks.size):
        p = picks[j]
        out[j] = v[p] + _fma(m, u[p], grad[p] * s)


# ------------------------------------------------------------------------- selection
@_jit()
def _digit(keys, shift, width, rem):
    """The digit ``(key >> shift) & (2**width - 1)`` of the ``rem``-th largest of ``keys``,
    and the rank ``rem`` becomes within that digit's entries."""
    digits = (1 << width) - 1
    hist = np.zeros(1 << width, dtype=np.int64)
    for i in range(keys.size):
        hist[(keys[i] >> shift) & digits] += 1
    d = digits
    while hist[d] < rem:
        rem -= hist[d]
        d -= 1
    return d, rem, hist[d]


@_jit()
def _narrow(keys, shift, d, size):
    """The ``size`` keys whose bits from ``shift`` up equal ``d`` (a radix step)."""
    out = np.empty(size, dtype=np.uint32)
    j = 0
    for i in range(keys.size):
        if (keys[i] >> shift) == d:
            out[j] = keys[i]
            j += 1
    return out


@_jit()
def cut(bits, k):
    """The bits ``T`` of the ``k``-th largest magnitude among the fp32 patterns ``bits``
    (``1 <= k <= bits.size``), and how many of the entries equal to ``T`` are among the
    top ``k``: a radix select on 12, 12 and then 7 bits of ``bits(|x|)``, each level over
    only the entries that share the digits fixed so far."""
    keys = np.empty(bits.size, dtype=np.uint32)
    for i in range(bits.size):
        keys[i] = bits[i] & _ABS
    d1, rem, size = _digit(keys, 19, 12, k)
    keys = _narrow(keys, 19, d1, size)
    d2, rem, size = _digit(keys, 7, 12, rem)
    keys = _narrow(keys, 7, (d1 << 12) | d2, size)
    d3, rem, size = _digit(keys, 0, 7, rem)
    return (np.int64(d1) << 19) | (np.int64(d2) << 7) | np.int64(d3), rem


@_jit()
def ranked(vals, ranks):
    """bits(|x|) of the ``r``-th largest magnitude of ``vals`` for each ``r`` of the
    ascending ``ranks`` (1-based, at most ``vals.size``): a radix select of the last, then a
    sort of the few entries at or above it."""
    t, _ = cut(vals.view(np.uint32), ranks[-1])
    bits = vals.view(np.uint32)
    top = np.empty(vals.size, dtype=np.uint32)
    m = 0
    for i in range(vals.size):
        key = bits[i] & _ABS
        if key >= t:
            top[m] = key
            m += 1
    top = np.sort(top[:m])
    out = np.empty(ranks.size, dtype=np.int64)
    for j in range(ranks.size):
        out[j] = top[m - ranks[j]]
    return out


@_jit()
def _emit(at, got, count, t, take, n_out):
    """Of the candidates (positions ``at[:count]`` ascending, values ``got``), those whose
    magnitude bits exceed ``t`` and the first ``take`` of those equal to ``t``."""
    bits = got.view(np.uint32)
    idx = np.empty(n_out, dtype=np.int32)
    out = np.empty(n_out, dtype=np.float32)
    j = 0
    for c in range(count):
        key = np.int64(bits[c] & _ABS)
        if key > t or (key == t and take > 0):
            if key == t:
                take -= 1
            idx[j] = at[c]
            out[j] = got[c]
            j += 1
    return idx, out


@_jit()
def pick(at, got, count, floor, k):
    """Among the candidates (positions ``at[:count]`` ascending, values ``got``) whose
    bits(|v|) are ``>= floor``, the ``k`` of largest magnitude (all of them when they are no
    more than ``k``); ties at the cut go to the lowest indices. Returns ``(int32 indices
    ascending, fp32 values)``."""
    bits = got.view(np.uint32)
    keys = np.empty(count, dtype=np.uint32)
    m = 0
    for c in range(count):
        key = bits[c] & _ABS
        if key >= floor:
            keys[m] = key
            m += 1
    if m <= k:
        return _emit(at, got, count, np.int64(floor), m, m)
    t, take = cut(keys[:m], k)
    return _emit(at, got, count, t, take, k)


@_jit(fast=True)
def probe(vals):
    """Whether some element of ``vals`` is NaN or infinite (``sum(v - v)`` is not 0)."""
    chk = np.float32(0.0)
    for i in range(vals.size):
        chk += vals[i] - vals[i]
    return chk != 0


@_jit()
def _counts(got, count, floors):
    """How many of the values ``got[:count]`` have bits(|v|) ``>= floors[j]``, for each j."""
    bits = got.view(np.uint32)
    out = np.zeros(floors.size, dtype=np.int64)
    for c in range(count):
        key = bits[c] & _ABS
        for j in range(floors.size):
            out[j] += key >= floors[j]
    return out


@_jit()
def _restore(out, at, got, count):
    """``out[at[c]] = got[c]`` for ``c < count``: undo the zeroing of :func:`topk_pass`."""
    for c in range(count):
        out[at[c]] = got[c]


@_jit()
def _unmask(out, at, got, count, idx):
    """:func:`_restore` for the candidates not in ``idx`` (both ascending: one merge)."""
    j = 0
    for c in range(count):
        if j < idx.size and at[c] == idx[j]:
            j += 1
        else:
            out[at[c]] = got[c]


def _candidates(
    run: Callable[[np.float32, np.ndarray], tuple[int, bool, int]], tb: int, expect: float, n: int
) -> tuple[np.ndarray, np.ndarray, int, bool, int]:
    """Run the pass with the threshold of bits ``tb`` and a buffer sized for ``expect``
    candidates: ``(positions, values, count, full, stored)``, count -1 for a NaN/Inf
    value."""
    cap = int(min(n, 2 * expect + 4096)) + _CHUNK
    buf = np.empty((2, cap), dtype=np.int32)
    count, full, stored = run(np.uint32(min(tb, int(_INF))).view(np.float32), buf)
    return buf[0], buf[1].view(np.float32), int(count), bool(full), int(stored)


def _everything(
    n: int, vals: np.ndarray, run: Callable[[np.float32, np.ndarray], tuple[int, bool, int]]
) -> tuple[np.ndarray, np.ndarray] | None:
    """All ``n`` values (``k == n``): one pass with threshold 0 collects every position."""
    buf = np.empty((2, n + _CHUNK), dtype=np.int32)
    count, _, _ = run(np.float32(0.0), buf)
    if count < 0:
        return None
    return buf[0, :n].copy(), buf[1, :n].view(np.float32).copy()


def _rescan(vals: np.ndarray, tb: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` positions and values with bits(|v|) ``>= tb``: a read-only pass."""
    buf = np.empty((2, count + _CHUNK), dtype=np.int32)
    scan(vals, np.uint32(tb).view(np.float32), buf)
    return buf[0], buf[1].view(np.float32)


def choose(
    n: int,
    k: int,
    vals: np.ndarray,
    run: Callable[[np.float32, np.ndarray], tuple[int, bool, int]],
    sample: Callable[[np.ndarray], np.ndarray],
    picks: np.ndarray | None = None,
    rounds: int = 3,
    zeroed: bool = False,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The selection of the module docstring around one fused pass.

    ``run(thr, buf)`` makes the pass: it fills ``vals`` (n fp32 values) and appends the
    positions with ``|v| >= thr`` to ``buf[0]``, their values to ``buf[1]``, returning
    ``(count, full)`` as :func:`topk_pass`. ``sample(picks)`` gives the values the pass will
    compute at ``picks``. Without ``picks`` the exact top-``k`` (``0 < k <= n``); with them
    the reference's sampled threshold ladder of ``rounds`` rungs (at most ``k``). Returns
    ``(int32 ascending indices, fp32 values)``, or None when some value is NaN or infinite
    (``vals`` has been written all the same). ``zeroed``: the pass zeroes its candidates in
    ``vals`` (:func:`topk_pass`); afterwards exactly the selected ones are ``v - (0 + v)``.
    """
    exact = picks is None
    if picks is None:
        if k == n:  # everything: every value is a candidate of threshold 0
            return _everything(n, vals, run)
        s = min(n, _SAMPLE)
        picks = (np.arange(s, dtype=np.int64) * n + n // 2) // s  # evenly spread
        rank = math.ceil(k * s / n)  # aimed low, so that one pass usually finds >= k
        ranks = [min(s, math.ceil(1.25 * rank) + 8) if s < n else rank]
    else:
        s = picks.size
        ranks = [math.ceil(k * s / n)]
        while len(ranks) < max(1, rounds) and ranks[-1] != s:
            ranks.append(min(s, 2 * ranks[-1]))
    got = sample(np.sort(picks))  # ascending positions: a gather the prefetchers follow
    floors = [int(f) for f in ranked(got, np.array(ranks, dtype=np.int64))]
    if (got.view(np.uint32) & _ABS).max() >= _INF:
        floors = [int(_INF)] * len(floors)  # the pass still runs and finds its NaN/Inf
    at, cv, count, over, stored = _candidates(run, floors[-1], ranks[-1] * n / s, n)
    if count < 0:
        return None
    refill = over or (exact and count < k)  # candidates lost or too few: from vals again
    if refill and zeroed:
        _restore(vals, at, cv, stored)
    if exact and count < k:  # the guess was too high: a radix select over everything
        idx, out = _select_all(vals, k)
    elif exact:
        if over:  # too low: collect again, into a buffer of the right size
            at, cv = _rescan(vals, floors[0], count)
        idx, out = pick(at, cv, count, np.uint32(floors[0]), k)
    else:
        tbs = np.array(floors, dtype=np.uint32)
        counts = _counts(vals, n, tbs) if over else _counts(cv, count, tbs)
        j = next((i for i, c in enumerate(counts) if c >= k), len(floors) - 1)
        if over:  # collect again, at the chosen rung, into a buffer of the right size
            at, cv = _rescan(vals, floors[j], int(counts[j]))
        idx, out = pick(at, cv, int(counts[j]) if over else count, np.uint32(floors[j]), n)
        if idx.size > k:  # the reference keeps torch.topk's k of these (in this order)
            keep = torch.topk(torch.from_numpy(out).abs(), k, sorted=False).indices
            keep = keep.sort().values.numpy()
            idx, out = idx[keep], out[keep]
    if zeroed and refill:
        mask_residual(vals, idx, out)  # everything was put back: zero what is sent
    elif zeroed:
        _unmask(vals, at, cv, count, idx)
    return idx, out


def _select_all(vals: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k of all of ``vals``: a radix select, a count and a rescan."""
    t, take = cut(vals.view(np.uint32), k)
    count = int(_counts(vals, vals.size, np.array([t], dtype=np.uint32))[0])
    at, cv = _rescan(vals, t, count)
    return _emit(at, cv, count, t, take, k)


# ------------------------------------------------------------------ state after the step
@_jit()
def mask_residual(out, idx, vals):
    """``out[i] = v - (0 + v)`` at the sent positions (``v = vals[j]``, the value there):
    exactly ``compensated - decompressed`` of the reference (+0.0 for a finite v; -0.0
    stays -0.0)."""
    zero = np.float32(0.0)
    for j in range(idx.size):
        out[idx[j]] = vals[j] - (zero + vals[j])


@_jit()
def mask_dgc(u, v, idx, vals):
    """Momentum factor masking: ``u = v = 0`` where a non-zero value was sent (the
    reference masks where ``decompressed != 0``)."""
    for j in range(idx.size):
        if vals[j] != 0:
            u[idx[j]] = 0.0
            v[idx[j]] = 0.0


# ----------------------------------------------------------------------- receive side
@_jit()
def scatter_add(out, idx, vals):
    """``out[idx] += vals`` in payload order after checking every index fits ``out``;
    returns ``(lo, hi)``, the index range (nothing written unless ``0 <= lo, hi < n``)."""
    if idx.size == 0:
        return 0, 0
    lo = np.int64(idx[0])
    hi = lo
    for j in range(idx.size):
        lo = min(lo, np.int64(idx[j]))
        hi = max(hi, np.int64(idx[j]))
    if lo < 0 or hi >= out.size:
        return lo, hi
    for j in range(idx.size):
        out[idx[j]] += vals[j]
    return lo, hi
