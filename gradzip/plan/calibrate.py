"""Measure what the cost model needs: the link (alpha, beta) on a live backend, and each
compressor's work on this device; cached per machine.

* :func:`measure_link` times allgathers of a few sizes on the backend (a collective: every
  rank calls it at the same point), takes the slowest rank's time of each (one MAX allreduce,
  so that every rank fits the same numbers) and reads ``t = (P-1) (alpha + c beta)`` off
  them: ``beta`` from the two largest, ``alpha`` from the smallest; then allreduces of the
  two largest sizes give the allreduce's own rate (``reduce_beta``: gloo's allreduce and
  allgather do not reach the same rate on one link).
* :func:`measure_rates` times the send side (the fused error-feedback step where the method
  has one, else compensate and compress) and the receive side (the dense sum of one payload)
  of a compressor at two sizes, through the dispatch the optimizer uses, and fits seconds
  per call and per byte.
* :func:`cached_rates` keeps the rates in ``~/.cache/gradzip/plan-rates.json`` (or
  ``$GRADZIP_CACHE``), keyed by host, device, torch version, a digest of the compression
  code (:func:`code_digest`) and compressor spec.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gradzip.allreduce.backend import Backend, ReduceOp
from gradzip.compress import kernels
from gradzip.compress.base import Compressor, Reduction, compressor
from gradzip.compress.topk import desparsify_into
from gradzip.plan.model import Link, Rates

__all__ = [
    "RoundTrip", "cache_path", "cached_rates", "call_times", "fit_line", "measure_link",
    "measure_rates",
]


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` (intercept and slope clipped at 0: a cost is never
    negative)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("fit_line needs at least two points, as many x as y")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    slope = max(slope, 0.0)
    return max(my - slope * mx, 0.0), slope


def call_times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Minimum and median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    return call_times(fn, repeats)[1]


def measure_link(
    backend: Backend, sizes: Sequence[int] = (64, 1 << 20, 1 << 22), repeats: int = 5,
    latency_repeats: int = 25,
) -> Link:
    """The link's ``alpha`` and ``beta`` from allgathers of ``sizes`` bytes per rank (the
    slowest rank's median time of each, so identical on every rank): ``alpha`` from the
    smallest message, timed ``latency_repeats`` times (it costs next to nothing, and in eight
    calibrations in a row on a shared 2-core machine the median of 5 spread 0.23-2.2 ms at 2
    ranks, that of 25 0.14-0.33 ms: ``benchmarks/results/step_waits.md``), ``beta`` from the slope
    between the two largest, ``repeats`` times each (a rate limiter's burst lets small
    messages through at line rate, so a line fitted through all of them would mistake the
    burst for latency). One rank: a link of zero cost."""
    if len(sizes) < 3 or sorted(sizes) != list(sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes={sizes!r}: expected at least three increasing sizes")
    p = backend.size
    if p == 1:
        return Link(0.0, 0.0)
    times = []
    for k, size in enumerate(sizes):
        buf = torch.zeros(size, dtype=torch.uint8, device=backend.device)

        def gather(b: torch.Tensor = buf) -> object:
            return backend.allgather(b, same_size=True).wait()

        times.append(_median_time(gather, latency_repeats if k == 0 else repeats))
    slowest = backend.allreduce(
        torch.tensor(times, dtype=torch.float64, device=backend.device), ReduceOp.MAX
    ).wait()
    per_step = [float(t) / (p - 1) for t in slowest.cpu()]
    _, beta = fit_line([float(s) for s in sizes[-2:]], per_step[-2:])
    alpha = max(per_step[0] - sizes[0] * beta, 0.0)
    # the allreduce's own rate: a ring schedules 2 (P-1)/P m bytes per rank
    reduce_times = []
    for size in sizes[-2:]:
        buf = torch.zeros(size // 4, dtype=torch.float32, device=backend.device)

        def reduce(b: torch.Tensor = buf) -> object:
            return backend.allreduce(b.clone()).wait()

        reduce_times.append(_median_time(reduce, repeats))
    slowest = backend.allreduce(
        torch.tensor(reduce_times, dtype=torch.float64, device=backend.device), ReduceOp.MAX
    ).wait()
    _, slope = fit_line([float(s // 4 * 4) for s in sizes[-2:]], [float(t) for t in slowest.cpu()])
    return Link(alpha, beta, reduce_beta=slope * p / (2 * (p - 1)))


class RoundTrip:
    """One compressor on one tensor, as one rank of the optimizer runs it each step (its
    memory carried from call to call): :meth:`send` is the error-feedback step (the fused one,
    undoable as the optimizer keeps it, where the method has one; else compensate, the shared
    statistic, compress, and the residual update), :meth:`receive` the dense fp32 sum of
    received payloads (here the one sent)."""

    def __init__(self, comp: Compressor, grad: torch.Tensor) -> None:
        self.comp, self.grad = comp, grad
        self.memory = comp.make_memory()
        self.step = 0

    def send(self) -> tuple[Any, Any]:
        comp, mem, g = self.comp, self.memory, self.grad
        self.step += 1
        if comp.error_feedback and kernels.has_feedback_step(comp, g):
            fresh = kernels.fresh_feedback(comp, g)
            snap = mem.snapshot("g", copy=not fresh)
            out = kernels.feedback_step(comp, mem, "g", g, seed=self.step, fresh=fresh)
            assert out is not None
            mem.release("g", snap)
            return out
        c = mem.compensate("g", g)
        shared = kernels.shared_stat(comp, c)
        payload, ctx = kernels.compress(comp, c, seed=self.step, shared=shared)
        if comp.error_feedback:
            mem.update("g", c, kernels.decompress(comp, payload, ctx))
        return payload, ctx

    def receive(self, payload: Any, ctx: Any) -> torch.Tensor:
        comp = self.comp
        if comp.reduction is Reduction.SPARSE:
            total = torch.zeros(self.grad.numel(), dtype=torch.float32, device=self.grad.device)
            desparsify_into(total, payload[0], payload[1])
            return total
        if comp.reduction is Reduction.GATHER:
            return kernels.decompress_sum(comp, [payload], [ctx])
        return kernels.decompress(comp, payload, ctx)

    def __call__(self) -> torch.Tensor:
        return self.receive(*self.send())


def measure_rates(
    comp: Compressor, numels: Sequence[int] = (1 << 14, 1 << 20), repeats: int = 5,
    device: torch.device | str = "cpu",
) -> Rates:
    """Seconds per call and per dense byte of ``comp``'s send and receive sides on
    ``device`` (fp32 tensors, :class:`RoundTrip`), fitted from ``numels``."""
    send_t, recv_t, sizes = [], [], []
    for n in numels:
        gen = torch.Generator().manual_seed(n)
        trip = RoundTrip(comp, torch.randn(n, generator=gen).to(device))
        payload, ctx = trip.send()
        send_t.append(_median_time(trip.send, repeats))

        def recv(t: RoundTrip = trip, p: Any = payload, x: Any = ctx) -> object:
            return t.receive(p, x)

        recv_t.append(_median_time(recv, repeats))
        sizes.append(4.0 * n)
    c_call, c_byte = fit_line(sizes, send_t)
    d_call, d_byte = fit_line(sizes, recv_t)
    return Rates(c_call, c_byte, d_call, d_byte)


def cache_path() -> Path:
    """Where measured rates are kept: ``$GRADZIP_CACHE`` or ``~/.cache/gradzip``."""
    root = os.environ.get("GRADZIP_CACHE") or str(Path.home() / ".cache" / "gradzip")
    return Path(root) / "plan-rates.json"


@functools.cache
def code_digest() -> str:
    """A digest of the compression code's sources: rates measured by other code (an older
    checkout, kernels changed since) are measured again, never reused."""
    root = Path(__file__).resolve().parents[1] / "compress"
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _key(spec: str, device: torch.device | str) -> str:
    return (f"{platform.node()}|{torch.device(device)}|torch {torch.__version__}|"
            f"code {code_digest()}|{spec}")


def cached_rates(
    spec: str | Compressor, device: torch.device | str = "cpu", *, refresh: bool = False
) -> Rates:
    """:func:`measure_rates` of ``spec`` on ``device``, measured once per machine and kept
    in :func:`cache_path` (``refresh`` measures again)."""
    comp = compressor(spec)
    path = cache_path()
    try:
        table: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    key = _key(comp.spec(), device)
    if not refresh and key in table:
        return Rates(**table[key])
    rates = measure_rates(comp, device=device)
    table[key] = {
        "compress_call": rates.compress_call,
        "compress_byte": rates.compress_byte,
        "decompress_call": rates.decompress_call,
        "decompress_byte": rates.decompress_byte,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: measured again next time
    return rates
