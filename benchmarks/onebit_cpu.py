"""Time of 1-bit SGD with error feedback on the CPU, as a ratio to ``residual.add_(grad)``.

The target (issue 5): the CPU path of onebit with error feedback costs at most 3x the plain
in-place add of the gradient into the residual, on a 2**24-element fp32 gradient. Two rows show
it: the numba path (what runs by default; one pass over memory for flat buckets, after a
read-only finiteness probe of the gradient) and the chunked torch sweep it falls back to
without numba (``GRADZIP_NUMBA=0``).

    python benchmarks/onebit_cpu.py [--numel 16777216] [--repeats 15] [--threads N] [--cpu-clock]

On a shared, loaded machine wall-clock ratios are noise (and multi-threaded torch ops stall on
preempted threads); ``--threads 1 --cpu-clock`` measures the process's CPU time instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import gradzip
from gradzip.compress import onebit as onebit_module
from gradzip.compress.memory import ResidualMemory
from gradzip.compress.onebit import OneBit

__all__ = ["main"]


_CLOCK: list[Callable[[], float]] = [time.perf_counter]


def _best(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Minimum and median seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    clock = _CLOCK[0]
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times), statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 24, help="gradient size (elements)")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--cpu-clock", action="store_true", help="time CPU, not wall clock")
    args = parser.parse_args(argv)
    if args.cpu_clock:
        _CLOCK[0] = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(args.numel, generator=gen)
    residual = torch.randn(args.numel, generator=gen)
    comp = gradzip.compressor("onebit")
    assert isinstance(comp, OneBit)

    fused_mem = ResidualMemory()
    fused_mem.residuals["g"] = residual.clone()
    unfused_mem = ResidualMemory()
    unfused_mem.residuals["g"] = residual.clone()

    def unfused() -> None:
        g = unfused_mem.compensate("g", grad)
        payload, ctx = comp.compress(g)
        unfused_mem.update("g", g, comp.decompress(payload, ctx))

    def fused(numba: str) -> Callable[[], object]:
        def run() -> object:
            saved = os.environ.get("GRADZIP_NUMBA")
            os.environ["GRADZIP_NUMBA"] = numba
            try:
                return comp.compress_with_feedback(fused_mem, "g", grad)
            finally:
                if saved is None:
                    os.environ.pop("GRADZIP_NUMBA")
                else:
                    os.environ["GRADZIP_NUMBA"] = saved

        return run

    kept_mem = ResidualMemory()
    kept_mem.residuals["g"] = residual.clone()

    def kept(copy: bool) -> Callable[[], object]:
        """What the optimizer runs: the step undoable until every rank's flags are in (the
        old residual kept aside, by a copy or by writing the new one into the spare)."""

        def run() -> object:
            snap = kept_mem.snapshot("g", copy=copy)
            out = comp.compress_with_feedback(kept_mem, "g", grad, fresh=not copy)
            kept_mem.release("g", snap)
            return out

        return run

    numba_rows = []
    if onebit_module._numba_kernels() is not None:
        numba_rows = [
            ("onebit fused, numba path", _best(fused("1"), args.repeats)),
            ("onebit fused, numba, fresh buffer (optimizer)", _best(kept(False), args.repeats)),
            ("onebit fused, numba, copy then in place", _best(kept(True), args.repeats)),
        ]
    rows = [
        ("residual.add_(grad)", _best(lambda: residual.add_(grad), args.repeats)),
        ("onebit fused, torch path (GRADZIP_NUMBA=0)", _best(fused("0"), args.repeats)),
        *numba_rows,
        ("onebit compress only", _best(lambda: comp.compress(grad), args.repeats)),
        ("onebit unfused (compensate+compress+decompress+update)", _best(unfused, args.repeats)),
    ]
    base_min, base_med = rows[0][1]
    clock = "cpu" if args.cpu_clock else "wall"
    print(f"numel={args.numel} threads={torch.get_num_threads()} repeats={args.repeats} "
          f"clock={clock}")
    print(f"{'step':58s} {'min ms':>8s} {'median ms':>10s} {'ratio(min)':>10s} {'ratio(med)':>10s}")
    for name, (tmin, tmed) in rows:
        print(
            f"{name:58s} {tmin * 1e3:8.2f} {tmed * 1e3:10.2f} {tmin / base_min:10.2f} "
            f"{tmed / base_med:10.2f}"
        )


if __name__ == "__main__":
    main()
