"""Soak: thousands of optimizer steps per compressor on 2 gloo ranks, watching for leaks and drift.

For each compressor a fresh pair of processes trains an MLP (about 1.1M parameters) with
``gradzip.DistributedOptimizer`` for ``--steps`` steps on synthetic data, and records every
``--every`` steps: resident memory (RSS), the norm of the error-feedback state (residuals,
DGC's velocities) and the step time. Verdicts per compressor, after a warm-up of ``--warmup``
steps:

* **memory flat**: the median RSS (taken after ``malloc_trim(0)``, so it counts memory in use)
  of the last quarter within 5% of the median of the quarter after the warm-up;
* **state bounded**: the largest state norm of the last quarter at most 2x the largest of the
  quarter after the warm-up (error feedback that diverges grows without bound);
* **time stable**: the median step time of the last quarter within 1.25x of the quarter after
  the warm-up;
* **peak memory**: the process's peak RSS above its RSS before the optimizer was built
  (``peak_MB``: libraries loaded and compiled on first use, numba's JIT among them, count
  here), and the part of it beyond the ``none`` run's, as a multiple of the gradient bytes
  plus the error-feedback state bytes (what any implementation must hold); reported, not
  judged.

Writes ``soak.md`` and ``soak.csv`` under ``--out``::

    python -m benchmarks.soak --steps 2000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import multiprocessing as mp
import os
import pickle
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SPECS", "main"]

SPECS = [
    "none",
    "fp16",
    "bf16",
    "onebit",
    "onebit@scatter_gather",
    "qsgd",
    "terngrad",
    "topk:ratio=0.01",
    "topk:ratio=0.01@recursive",
    "dgc:ratio=0.001",
    "sfb",
]


def _rss(trim: bool = False) -> int:
    """Resident set size of this process, bytes; with ``trim``, after glibc has handed its
    free pages back (``malloc_trim(0)``), so that what remains is memory in use: the allocator
    otherwise keeps and returns tens of MB in bursts (seen: +15% and back within 400 steps),
    which would hide or fake a leak."""
    if trim:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the plain RSS
            pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _state_norm(opt: Any) -> tuple[float, int]:
    """The norm of every error-feedback tensor of this rank, and their bytes."""
    total, nbytes = 0.0, 0
    for s in opt._gz.slots:
        mem = s.memory
        for table in (getattr(mem, "residuals", {}), getattr(mem, "velocities", {})):
            for t in table.values():
                total += float(t.double().square().sum())
                nbytes += t.numel() * t.element_size()
    return total**0.5, nbytes


def _rank(rank: int, store: str, label: str, steps: int, every: int, queue: Any) -> None:
    import torch.distributed as dist

    import gradzip
    from gradzip.allreduce.torch_dist import TorchDistBackend

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timeout
    )
    backend = TorchDistBackend(timeout=timeout)
    spec, _, strategy = label.partition("@")
    kw = (
        {"sparse": strategy}
        if strategy == "recursive"
        else ({"gather": strategy} if strategy else {})
    )
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before = _rss()
    momentum = 0.0 if spec.startswith("dgc") else 0.9
    opt = gradzip.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum),
        model.named_parameters(), compression=spec, backend=backend, model=model,
        **{"dense_steps": 0, **kw},  # the soak measures compressed steps from the first one
    )  # fmt: skip
    teacher = torch.randn(512, 10, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(10 + rank)
    rows = []
    last = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.randn(32, 512, generator=gen)
        y = (x @ teacher).argmax(1)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        now = time.perf_counter()
        took, last = now - last, now
        if step % every == 0 or step == 1:
            norm, _ = _state_norm(opt)
            rows.append({"step": step, "rss": _rss(trim=True), "state_norm": norm, "step_s": took})
            last = time.perf_counter()  # the sample's own time is not a step's
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"rows": rows, "peak": peak, "before": before, "grad_bytes": grad_bytes}
    out["state_bytes"] = _state_norm(opt)[1]
    dist.destroy_process_group()
    queue.put(pickle.dumps((rank, out)))


def _one(label: str, steps: int, every: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_rank, args=(r, store, label, steps, every, queue)) for r in range(2)
        ]
        for p in procs:
            p.start()
        got = dict(pickle.loads(queue.get(timeout=3600)) for _ in procs)
        for p in procs:
            p.join(timeout=30)
    return got[0]


def _verdict(
    label: str, run: dict[str, Any], warmup: int, dense_peak: int | None
) -> dict[str, Any]:
    rows = [r for r in run["rows"] if r["step"] >= warmup]
    quarter = max(1, len(rows) // 4)
    early, late = rows[:quarter], rows[-quarter:]
    # medians, not single samples: glibc hands memory back and takes it again in bursts of
    # tens of MB (seen: +15% and back within 400 steps), which a leak does not do
    rss_growth = (
        statistics.median(r["rss"] for r in late) / statistics.median(r["rss"] for r in early) - 1
    )
    norm_ratio = max(r["state_norm"] for r in late) / max(
        max(r["state_norm"] for r in early), 1e-30
    )
    time_ratio = statistics.median(r["step_s"] for r in late) / statistics.median(
        r["step_s"] for r in early
    )
    held = run["grad_bytes"] + run["state_bytes"]
    peak = run["peak"] - run["before"]
    beyond = "n/a" if dense_peak is None else round((peak - dense_peak) / held, 2)
    ok = rss_growth < 0.05 and (run["state_bytes"] == 0 or norm_ratio <= 2.0) and time_ratio <= 1.25
    return {
        "compressor": label,
        "rss_growth_pct": round(100 * rss_growth, 2),
        "state_norm_late_over_early": round(norm_ratio, 3) if run["state_bytes"] else "no state",
        "step_time_late_over_early": round(time_ratio, 3),
        "peak_MB": round(peak / 2**20, 1),
        "beyond_none_over_grad_plus_state": beyond,
        "grad_MB": round(run["grad_bytes"] / 2**20, 2),
        "state_MB": round(run["state_bytes"] / 2**20, 2),
        "ok": "ok" if ok else "FAIL",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    start = time.monotonic()
    verdicts = []
    dense_peak = None
    for label in args.specs.split(","):
        run = _one(label, args.steps, args.every)
        if label == "none":
            dense_peak = run["peak"] - run["before"]
        verdicts.append(_verdict(label, run, args.warmup, dense_peak))
        print(verdicts[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "soak.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(verdicts[0]))
        writer.writeheader()
        writer.writerows(verdicts)
    cols = list(verdicts[0])
    lines = [
        f"Soak: {args.steps} optimizer steps per compressor on 2 gloo ranks (MLP 512-1024-512-10, "
        f"1.1M parameters, batch 32 per rank), sampled every {args.every} steps, warm-up "
        f"{args.warmup} steps; {time.monotonic() - start:.0f} s.",
        "",
        f"Command: `python -m benchmarks.soak --steps {args.steps}`. Machine: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, Python {platform.python_version()}.",
        "",
        "Verdicts: median RSS (after malloc_trim) of the last quarter < 1.05x the first quarter "
        "after the warm-up; "
        "state norm of the last quarter <= 2x the "
        "first quarter after the warm-up; median step time of the last quarter <= 1.25x. Peak "
        "memory is the peak RSS above the RSS before the optimizer was built; the part beyond "
        "the `none` run's is given over gradient + error-feedback state bytes (reported, not "
        "judged).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(v[c]) for c in cols) + " |" for v in verdicts]
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(v["ok"] == "ok" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
