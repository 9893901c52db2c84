"""Speed of compress + decompress per compressor: Triton kernel vs. torch path vs. a plain copy.

For each size ``n`` (2**16 .. 2**26 fp32 elements by default) and each compressor, three times
are measured for the torch path (``GRADZIP_KERNELS=off``) and, on a CUDA device with Triton
installed, for the kernel path: ``compress`` alone, ``compress`` + ``decompress``, and the
receive side, ``decompress_sum`` of ``--ranks`` payloads (one kernel on the kernel path). The
first two are printed as ratios to the time of a plain device copy of the same ``4 n`` bytes
measured in the same run, and the round trip as GB/s (``4 n`` bytes of gradient per second).
On a machine without CUDA only the torch path runs. A configuration without a kernel (QSGD's
``elias=True``) is shown as path ``torch*`` in the kernel rows: it is not a kernel time.

Examples::

    python -m benchmarks.kernels --help
    python -m benchmarks.kernels --max-log2 20 --compressors onebit,topk
    python -m benchmarks.kernels --out benchmarks/results/kernels_h100   # .md and .csv
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import gradzip
from gradzip.compress import kernels

__all__ = ["main"]

DEFAULT_COMPRESSORS = "onebit,qsgd,terngrad,topk:ratio=0.01,dgc:ratio=0.001"


@contextlib.contextmanager
def _kernel_mode(value: str) -> Iterator[None]:
    """Set GRADZIP_KERNELS for the duration of a measurement."""
    old = os.environ.get(kernels.ENV)
    os.environ[kernels.ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(kernels.ENV, None)
        else:
            os.environ[kernels.ENV] = old


def _time(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Calls:
    """The three timed calls for one compressor and tensor, through the dispatch (the mode is
    set by the caller before this is built: TernGrad's scaler comes from the same path)."""

    def __init__(self, comp: gradzip.Compressor, x: torch.Tensor, ranks: int) -> None:
        self.comp, self.x = comp, x
        self.shared = kernels.shared_stat(comp, x)
        self.received = [
            kernels.compress(comp, x, seed=r, shared=self.shared) for r in range(ranks)
        ]

    def compress(self) -> object:
        return kernels.compress(self.comp, self.x, seed=1, shared=self.shared)

    def round_trip(self) -> object:
        payload, ctx = kernels.compress(self.comp, self.x, seed=1, shared=self.shared)
        return kernels.decompress(self.comp, payload, ctx)

    def receive(self) -> object:
        payloads, ctxs = zip(*self.received, strict=True)
        return kernels.decompress_sum(self.comp, list(payloads), list(ctxs))


def _paths(device: torch.device) -> list[str]:
    if device.type == "cuda" and kernels.triton_available():
        return ["kernel", "torch"]
    return ["torch"]


def _row(
    n: int, spec: str, path: str, copy_s: float, times: tuple[float, float, float]
) -> dict[str, object]:
    comp_s, trip_s, sum_s = times
    return {
        "n": n,
        "compressor": spec,
        "path": path,
        "compress_ms": comp_s * 1e3,
        "ms": trip_s * 1e3,
        "sum_ms": sum_s * 1e3,
        "copy_ms": copy_s * 1e3,
        "compress_x_copy": comp_s / copy_s,
        "x_copy": trip_s / copy_s,
        "GB/s": 4 * n / trip_s / 1e9,
    }


def measure(
    specs: list[str], sizes: list[int], device: torch.device, repeat: int, ranks: int = 4
) -> list[dict[str, object]]:
    """One row per (size, compressor, path): seconds, ratios to a copy, GB/s."""
    rows: list[dict[str, object]] = []
    for n in sizes:
        x = torch.randn(n, device=device)
        dst = torch.empty_like(x)
        copy_s = _time(lambda: dst.copy_(x), device, repeat)  # noqa: B023
        for spec in specs:
            comp = gradzip.compressor(spec)
            for path in _paths(device):
                with _kernel_mode("auto" if path == "kernel" else "off"):
                    if path == "kernel" and not kernels.use_kernel(comp, x):
                        path = "torch*"  # no kernel for this configuration
                    calls = _Calls(comp, x, ranks)
                    times = (
                        _time(calls.compress, device, repeat),
                        _time(calls.round_trip, device, repeat),
                        _time(calls.receive, device, repeat),
                    )
                rows.append(_row(n, spec, path, copy_s, times))
                print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict[str, object]) -> str:
    n = int(row["n"])  # type: ignore[call-overload]
    return (
        f"| 2**{n.bit_length() - 1:<2} | {row['compressor']:<22} | {row['path']:<6} "
        f"| {row['compress_ms']:11.3f} | {row['compress_x_copy']:8.1f} "
        f"| {row['ms']:9.3f} | {row['x_copy']:7.1f} | {row['GB/s']:7.2f} "
        f"| {row['sum_ms']:9.3f} | {row['copy_ms']:8.3f} |"
    )


HEADER = (
    "| n     | compressor             | path   | compress ms | c x copy | ms (c+d)  | x copy  "
    "| GB/s    | sum ms    | copy ms  |\n"
    "|-------|------------------------|--------|-------------|----------|-----------|---------"
    "|---------|-----------|----------|"
)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, measure, print a markdown table (and write it with --out)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--min-log2", type=int, default=16, help="smallest size 2**k (16)")
    parser.add_argument("--max-log2", type=int, default=26, help="largest size 2**k (26)")
    parser.add_argument(
        "--compressors",
        default=DEFAULT_COMPRESSORS,
        help=f"comma-separated specs; 'a:x=1' options use ':' (default {DEFAULT_COMPRESSORS})",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per cell (median)")
    parser.add_argument(
        "--ranks", type=int, default=4, help="payloads summed by the receive side (4)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: stable numbers on a shared machine; 0: torch's default)",
    )
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.csv")
    args = parser.parse_args(argv)
    if not 0 <= args.min_log2 <= args.max_log2 <= 31:
        parser.error(
            f"need 0 <= --min-log2 <= --max-log2 <= 31, got {args.min_log2}, {args.max_log2}"
        )
    if args.ranks < 1:
        parser.error(f"--ranks must be >= 1, got {args.ranks}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    specs = [s for s in args.compressors.split(",") if s]
    for spec in specs:  # register compressors whose module the package does not import yet
        with contextlib.suppress(ImportError):
            importlib.import_module(f"gradzip.compress.{spec.partition(':')[0]}")
    available = set(gradzip.available())
    missing = [s for s in specs if s.partition(":")[0] not in available]
    if missing:
        print(f"skipping unregistered compressors: {', '.join(missing)}")
    specs = [s for s in specs if s not in missing]
    device = torch.device(args.device)
    print(
        f"device {device}; paths: {', '.join(_paths(device))}; repeat {args.repeat}; "
        f"receive side sums {args.ranks} payloads\n{HEADER}"
    )
    sizes = [1 << k for k in range(args.min_log2, args.max_log2 + 1)]
    rows = measure(specs, sizes, device, args.repeat, args.ranks)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        body = "\n".join(_line(r) for r in rows)
        args.out.with_suffix(".md").write_text(f"device: {name}\n\n{HEADER}\n{body}\n")
        with args.out.with_suffix(".csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
