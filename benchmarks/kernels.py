"""Speed of compress + decompress per compressor: Triton kernel vs. torch path vs. a plain copy.

For each size ``n`` (2**16 .. 2**26 fp32 elements by default) and each compressor, three times
are measured for the torch path (``GRADZIP_KERNELS=off``) and, on a CUDA device with Triton
installed, for the kernel path: ``compress`` alone, ``compress`` + ``decompress``, and the
receive side, ``decompress_sum`` of ``--ranks`` payloads (one kernel on the kernel path). The
first two are printed as ratios to the time of a plain device copy of the same ``4 n`` bytes
measured in the same run, and the round trip as GB/s (``4 n`` bytes of gradient per second).
On a machine without CUDA only the torch path runs. A configuration without a kernel (QSGD's
``elias=True``) is shown as path ``torch*`` in the kernel rows: it is not a kernel time.

``c x traffic`` compares compress with the least memory traffic it needs: reading the ``4 n``
input bytes and writing the payload (for the error-feedback steps, also reading and writing the
fp32 state: the residual, DGC's u and v), at the speed of the copy (which reads and writes
``4 n`` bytes each). 1.0 is a kernel at copy speed; issue 5's target on an H100 is <= 2 for
every compress kernel and, at 2**24 elements, a kernel at least 5x faster than the torch path
on the same GPU; both are checked at the end of the run when both paths ran.

``onebit EF step`` and ``dgc EF step`` time what the optimizer runs for those methods: the
fused error-feedback step (``kernels.feedback_step``: compensate, compress, update the state).

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
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import gradzip
from gradzip.compress import kernels

__all__ = ["main"]

DEFAULT_COMPRESSORS = "onebit,qsgd,terngrad,topk:ratio=0.01,dgc:ratio=0.001"


@contextlib.contextmanager
def _kernel_mode(value: str, numba: bool = True) -> Iterator[None]:
    """Set GRADZIP_KERNELS for the duration of a measurement (and, with ``numba=False``,
    ``GRADZIP_NUMBA=0``: the torch code itself, not the CPU kernels)."""
    names = {kernels.ENV: value, **({} if numba else {"GRADZIP_NUMBA": "0"})}
    old = {k: os.environ.get(k) for k in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def _tensor_bytes(state: object) -> int:
    """Bytes of every tensor in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    return 0


class _Calls:
    """The three timed calls for one compressor and tensor, through the dispatch (the mode is
    set by the caller before this is built: TernGrad's scaler comes from the same path)."""

    def __init__(self, comp: gradzip.Compressor, x: torch.Tensor, ranks: int) -> None:
        self.comp, self.x = comp, x
        self.shared = kernels.shared_stat(comp, x)
        self.received = [
            kernels.compress(comp, x, seed=r, shared=self.shared) for r in range(ranks)
        ]
        self.payload_bytes = self.received[0][0].nbytes
        self.state_bytes = 0  # fp32 state read and written besides the input (none here)

    def compress(self) -> object:
        return kernels.compress(self.comp, self.x, seed=1, shared=self.shared)

    def round_trip(self) -> object:
        payload, ctx = self.compress()  # type: ignore[misc]
        return kernels.decompress(self.comp, payload, ctx)

    def receive(self) -> object:
        payloads, ctxs = zip(*self.received, strict=True)
        return kernels.decompress_sum(self.comp, list(payloads), list(ctxs))


class _Step(_Calls):
    """The error-feedback step the optimizer runs (fused where the path has a fused step: onebit
    everywhere, DGC on the kernel path) in place of ``compress``; its state (the residual, or
    DGC's u and v) is read and written on every call."""

    def __init__(self, comp: gradzip.Compressor, x: torch.Tensor, ranks: int) -> None:
        super().__init__(comp, x, ranks)
        self.memory = comp.make_memory()
        self.compress()  # the first step creates the state
        self.state_bytes = 2 * _tensor_bytes(self.memory.state_dict())

    def compress(self) -> object:
        out = kernels.feedback_step(self.comp, self.memory, "g", self.x, seed=1)
        if out is None:  # no fused step on this path: the three steps the optimizer runs then
            compensated = self.memory.compensate("g", self.x)
            out = kernels.compress(self.comp, compensated, seed=1)
            self.memory.update("g", compensated, kernels.decompress(self.comp, *out))
        return out


#: the compressors whose fused error-feedback step gets its own rows
_STEPS = ("onebit", "dgc")


def _paths(device: torch.device) -> list[str]:
    if device.type == "cuda" and kernels.triton_available():
        return ["kernel", "torch"]
    return ["torch"]


def _row(
    n: int,
    spec: str,
    path: str,
    copy_s: float,
    times: tuple[float, float, float],
    calls: _Calls,
) -> dict[str, object]:
    comp_s, trip_s, sum_s = times
    traffic = 4 * n + calls.payload_bytes + calls.state_bytes  # least bytes compress moves
    return {
        "n": n,
        "compressor": spec,
        "path": path,
        "compress_ms": comp_s * 1e3,
        "ms": trip_s * 1e3,
        "sum_ms": sum_s * 1e3,
        "copy_ms": copy_s * 1e3,
        "compress_x_copy": comp_s / copy_s,
        "compress_x_traffic": comp_s / (copy_s * traffic / (8 * n)),
        "x_copy": trip_s / copy_s,
        "GB/s": 4 * n / trip_s / 1e9,
        "payload_bytes": calls.payload_bytes,
    }


def measure(
    specs: list[str],
    sizes: list[int],
    device: torch.device,
    repeat: int,
    ranks: int = 4,
    steps: bool = True,
) -> list[dict[str, object]]:
    """One row per (size, compressor, path): seconds, ratios to a copy, GB/s."""
    rows: list[dict[str, object]] = []
    for n in sizes:
        x = torch.randn(n, device=device)
        dst = torch.empty_like(x)
        copy_s = _time(lambda: dst.copy_(x), device, repeat)  # noqa: B023
        for spec in specs:
            comp = gradzip.compressor(spec)
            kinds: list[tuple[str, type[_Calls]]] = [(spec, _Calls)]
            if steps and comp.name in _STEPS:
                kinds.append((f"{spec} EF step", _Step))
            for label, make in kinds:
                for path in _paths(device):
                    with _kernel_mode("auto" if path == "kernel" else "off"):
                        if path == "kernel" and not kernels.use_kernel(comp, x):
                            path = "torch*"  # no kernel for this configuration
                        calls = make(comp, x, ranks)
                        times = (
                            _time(calls.compress, device, repeat),
                            _time(calls.round_trip, device, repeat),
                            _time(calls.receive, device, repeat),
                        )
                    rows.append(_row(n, label, path, copy_s, times, calls))
                    print(_line(rows[-1]), flush=True)
    return rows


def targets(rows: list[dict[str, object]], n: int = 1 << 24) -> list[str]:
    """Issue 5's GPU targets, checked on the kernel rows: compress within 2x of its least
    traffic at copy speed (every size), and at ``n`` elements >= 5x faster than the torch path.
    """
    lines = []
    torch_ms = {(r["n"], r["compressor"]): r["compress_ms"] for r in rows if r["path"] == "torch"}
    for r in rows:
        if r["path"] != "kernel":
            continue
        traffic = float(r["compress_x_traffic"])  # type: ignore[arg-type]
        ok = "met" if traffic <= 2 else "MISSED"
        line = f"2**{int(r['n']).bit_length() - 1} {r['compressor']}: {traffic:.2f}x traffic ({ok})"  # type: ignore[call-overload]
        if r["n"] == n and (n, r["compressor"]) in torch_ms:
            speedup = float(torch_ms[(n, r["compressor"])]) / float(r["compress_ms"])  # type: ignore[arg-type]
            line += f"; {speedup:.1f}x faster than torch ({'met' if speedup >= 5 else 'MISSED'})"
        lines.append(line)
    return lines


def _line(row: dict[str, object]) -> str:
    n = int(row["n"])  # type: ignore[call-overload]
    return (
        f"| 2**{n.bit_length() - 1:<2} | {row['compressor']:<24} | {row['path']:<6} "
        f"| {row['compress_ms']:11.3f} | {row['compress_x_copy']:8.1f} "
        f"| {row['ms']:9.3f} | {row['x_copy']:7.1f} | {row['GB/s']:7.2f} "
        f"| {row['sum_ms']:9.3f} | {row['copy_ms']:8.3f} | {row['compress_x_traffic']:9.2f} "
        f"| {row['payload_bytes']:>10} |"
    )


HEADER = (
    "| n     | compressor               | path   | compress ms | c x copy | ms (c+d)  | x copy  "
    "| GB/s    | sum ms    | copy ms  | c x traffic | payload B |\n"
    "|-------|--------------------------|--------|-------------|----------|-----------|---------"
    "|---------|-----------|----------|-------------|-----------|"
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
    parser.add_argument("--no-steps", action="store_true", help="no EF-step rows")
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
    rows = measure(specs, sizes, device, args.repeat, args.ranks, steps=not args.no_steps)
    checked = targets(rows)
    summary = "\n".join(f"- {line}" for line in checked) or (
        "- no kernel rows (no CUDA device, or Triton missing): the GPU targets are not checked"
    )
    print(f"\ntargets (kernel rows):\n{summary}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        body = "\n".join(_line(r) for r in rows)
        command = " ".join(["python -m benchmarks.kernels", *(argv or sys.argv[1:])])
        args.out.with_suffix(".md").write_text(
            f"device: {name}; torch {torch.__version__}\n\n`{command}`\n\n{HEADER}\n{body}\n\n"
            f"targets (kernel rows):\n\n{summary}\n"
        )
        with args.out.with_suffix(".csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
