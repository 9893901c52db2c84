"""One compressor round trip on the CPU, as a multiple of ``g.clone()`` of the same tensor.

The round trip (:class:`gradzip.plan.calibrate.RoundTrip`, which the cost model times too)
is what one rank runs per tensor and step, and what the receive side runs on one payload,
through the same dispatch the optimizer uses (:mod:`gradzip.compress.kernels`):

* the send side: for an error-feedback method with a fused step (``feedback_step``), the
  optimizer's undoable form of it (``memory.snapshot``, the fused step, ``memory.release``),
  else ``memory.compensate`` -> (``shared_stat``) -> ``compress`` -> ``decompress`` ->
  ``memory.update`` (a method without error feedback stops after ``compress``);
* the receive side: the sum of the received payloads (here one) into a dense fp32 tensor:
  ``kernels.decompress_sum`` for GATHER methods, a zeroed tensor and ``desparsify_into``
  for SPARSE ones, ``decompress`` for the others.

Each is timed against ``g.clone()`` in the same run, one thread, at several sizes: the clone
and the round trip alternate call by call (:func:`paired_times`), so that both see the same
state of a shared machine (on the 2-core machine of the project a clone of 2**22 elements
took 0.7 ms on one day and 3-4 ms on another); the median ratio is the median of the
call-by-call ratios, the minimum one the ratio of the minima.

The **floor** column is the memory traffic a round trip cannot
avoid, in units of the clone's (read ``4n`` + write ``4n`` bytes): the state it must read and
write, the payload, and the dense result of the receive side. It is the ratio an ideal
implementation would reach where memory bandwidth alone sets the time.

    python -m benchmarks.ef_roundtrip [--sizes 16 22 24] [--repeats 9] [--threads 1]
        [--out benchmarks/results/ef_roundtrip.md] [--torch]

``--torch`` adds a column with the torch path (``GRADZIP_NUMBA=0``) for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

import gradzip
from benchmarks.report import Cell, machine_line, markdown_table
from gradzip.compress.base import Compressor
from gradzip.plan.calibrate import RoundTrip

__all__ = ["SPECS", "floor", "main", "paired_times", "round_trip", "run"]

ROOT = Path(__file__).resolve().parents[1]

#: the compressors of the issue's table, in their default settings (QSGD at 4 and 8 bits)
SPECS = (
    "onebit",
    "qsgd",
    "qsgd:levels=127",
    "terngrad",
    "topk:ratio=0.01",
    "dgc:ratio=0.001",
)

#: the target at 2**22 elements (issue 12): multiples of the clone
TARGETS = {"onebit": 3.0, "qsgd": 3.0, "terngrad": 3.0, "topk": 4.0, "dgc": 4.0}


def floor(comp: Compressor, n: int, payload_bytes: int) -> float:
    """The unavoidable memory traffic of one round trip over ``n`` fp32 elements, in units of
    ``g.clone()``'s ``8 n`` bytes.

    Read the gradient (``4n``); read and write each fp32 state tensor (the residual, DGC's
    momentum and velocity: ``8n`` each); write the payload and read it back on the receive
    side; write the dense fp32 result (``4n``). A method whose per-tensor statistic (TernGrad's
    scaler and clipping bound) is needed before any element can be coded reads the gradient
    twice.
    """
    states = {"dgc": 2}.get(comp.name, 1 if comp.error_feedback else 0)
    reads = 2 if comp.name == "terngrad" else 1
    traffic = 4 * n * reads + 8 * n * states + 2 * payload_bytes + 4 * n
    return traffic / (8 * n)


def round_trip(spec: str, grad: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A callable running one round trip of ``spec`` on ``grad`` (state kept across calls)."""
    return RoundTrip(gradzip.compressor(spec), grad)


def paired_times(
    fn: Callable[[], object], base: Callable[[], object], repeats: int, warmup: int = 2
) -> tuple[list[float], list[float]]:
    """Seconds of ``base`` and of ``fn``, called alternately ``repeats`` times each (``base``
    first) after ``warmup`` calls of each: ``(base times, fn times)``, in call order."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: expected at least 1")
    for _ in range(warmup):
        base()
        fn()
    base_t, fn_t = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        base()
        mid = time.perf_counter()
        fn()
        base_t.append(mid - start)
        fn_t.append(time.perf_counter() - mid)
    return base_t, fn_t


@contextlib.contextmanager
def _numba(on: bool) -> Iterator[None]:
    saved = os.environ.get("GRADZIP_NUMBA")
    os.environ["GRADZIP_NUMBA"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("GRADZIP_NUMBA")
        else:
            os.environ["GRADZIP_NUMBA"] = saved


def run(
    sizes: Sequence[int], specs: Sequence[str], repeats: int, torch_path: bool = False
) -> list[list[Cell]]:
    """One row per (size, spec): clone ms, round trip ms (medians of the paired calls), ratios
    (of the minima; median of the call-by-call ratios), floor,
    target and whether it is met (at ``2**22``), and the torch path's median ratio."""
    rows: list[list[Cell]] = []
    for log2 in sizes:
        n = 1 << log2
        gen = torch.Generator().manual_seed(log2)
        grad = torch.randn(n, generator=gen)
        for spec in specs:
            case = RoundTrip(gradzip.compressor(spec), grad)
            clone_t, trip_t = paired_times(case, grad.clone, repeats)
            clone_med, t_med = statistics.median(clone_t), statistics.median(trip_t)
            ratio = statistics.median(t / c for t, c in zip(trip_t, clone_t, strict=True))
            payload, _ = case.send()
            lo = floor(case.comp, n, payload.nbytes)
            base = spec.split(":")[0]
            target = TARGETS.get(base) if log2 == 22 else None
            met = "" if target is None else ("yes" if ratio <= target else "no")
            row: list[Cell] = [
                f"2**{log2}", spec, round(clone_med * 1e3, 3), round(t_med * 1e3, 3),
                round(min(trip_t) / min(clone_t), 2), round(ratio, 2), round(lo, 2),
                "" if target is None else target, met,
            ]
            if torch_path:
                with _numba(False):
                    slow = RoundTrip(gradzip.compressor(spec), grad)
                    c_t, s_t = paired_times(slow, grad.clone, max(3, repeats // 3))
                row.append(round(statistics.median(s_t) / statistics.median(c_t), 1))
            rows.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
    return rows


HEADERS = [
    "elements", "compressor", "clone ms", "round trip ms", "ratio (min)", "ratio (median)",
    "floor", "target", "met",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 22, 24],
                        help="log2 of the element counts")
    parser.add_argument("--specs", nargs="+", default=list(SPECS))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--torch", action="store_true", help="add the torch path's ratio")
    parser.add_argument("--out", type=Path, default=None, help="write the table here (.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.sizes, args.specs, args.repeats, args.torch)
    headers = HEADERS + (["torch path (median)"] if args.torch else [])
    table = markdown_table(headers, rows)
    print(table)
    if args.out is not None:
        cmd = "python -m benchmarks.ef_roundtrip " + " ".join(
            sys.argv[1:] if argv is None else argv)
        text = (
            "# One compressor round trip on the CPU, as a multiple of `g.clone()`\n\n"
            f"Command: `{cmd.strip()}`. Machine: {machine_line()}; "
            f"{torch.get_num_threads()} thread(s).\n\n"
            "The round trip: the send side as the optimizer runs it (error feedback "
            "included) and the receive side's dense sum of one payload. **floor**: the "
            "memory traffic no implementation avoids, in units of the clone's (see "
            "`benchmarks/ef_roundtrip.py`). Ratios are measured against `g.clone()` of the "
            "same tensor in the same run; the target applies at 2**22 elements.\n\n"
            + table + "\n"
        )
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
