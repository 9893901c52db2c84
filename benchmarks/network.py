"""Step time, speedup and time-to-accuracy of each compressor on a slow, capped network.

``python -m benchmarks.network`` (root; iproute2) builds a private network of Linux network
namespaces (:mod:`benchmarks.netns`): one namespace per worker, each joined to a bridge by a
veth link capped at ``--rate`` (tc tbf, default 100 Mbit/s both ways). It starts ``--workers``
real processes, one per namespace (``ip netns exec NS python -m benchmarks.network --worker``),
which meet through a TCP store on the first worker's address and train the small CNN on
Fashion-MNIST over gloo, once per method (:mod:`benchmarks.network_worker`). The network is
removed at the end, on Ctrl-C and on errors.

Per method, the table shows: the median step time; the speedup over ``none`` (one dense flat
allreduce per step); the measured compression ratio (dense gradient bytes / bytes handed to
collectives per step); the ideal speedup ``(compute + comm) / (compute + comm / ratio)`` with
``compute`` (a step without communication) and ``comm`` (one dense allreduce of all
gradients) measured in the same run; efficiency = speedup / ideal; the final test accuracy;
and the training time until the test accuracy first reached the final accuracy of ``none``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["ALIASES", "DEFAULT_METHODS", "main", "render", "rows"]

ROOT = Path(__file__).resolve().parents[1]
#: short names for the settings of the issue; any other gradzip spec string works as well
ALIASES = {
    "qsgd4": "qsgd:levels=7",
    "topk": "topk:ratio=0.01",
    "topk-noef": "topk:ratio=0.01,error_feedback=False",
    "dgc": "dgc:ratio=0.001",
}
DEFAULT_METHODS = (
    "none", "fp16", "onebit", "qsgd4", "terngrad", "topk", "dgc", "ddp-fp16", "ddp-powersgd",
)  # fmt: skip
HEADERS = (
    "method",
    "step ms",
    "speedup",
    "ratio",
    "ideal",
    "efficiency",
    "MB/step",
    "accuracy %",
    "time to target s",
    "predicted ms",
    "model error %",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.network",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Needs root and iproute2 (ip, tc). Methods: none (dense allreduce baseline), "
        "ddp, ddp-fp16, ddp-powersgd (torch DDP hooks), the aliases "
        + ", ".join(f"{k}={v}" for k, v in ALIASES.items())
        + ", or any gradzip spec string (e.g. 'qsgd:levels=127').",
    )
    p.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--steps", type=int, default=150, help="training steps per method")
    p.add_argument("--rate", default="100mbit",
                   help="link rate, tc syntax (100mbit, 1gbit), or none (uncapped veths)")
    p.add_argument("--delay", default=None, help="one-way delay per link via netem, e.g. 1ms")
    p.add_argument("--compressors", nargs="+", default=list(DEFAULT_METHODS), metavar="M",
                   help="methods to run, in order (default: %(default)s)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="samples per worker and step")
    p.add_argument("--eval-every", type=int, default=15, help="steps between evaluations")
    p.add_argument("--test-limit", type=int, default=1000, help="test images evaluated")
    p.add_argument(
        "--model",
        choices=("cnn", "mlp", "mlp-wide"),
        default="cnn",
        help="cnn: the small CNN (default); mlp: 784-1024-1024-10, 1.9 M parameters; "
        "mlp-wide: 784-2048-2048-10, 5.8 M parameters",
    )
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder for network.md and network.csv")  # fmt: skip
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the whole run")
    # the worker side, started by the script itself inside a namespace
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--rank", "--world", "--port"):
        p.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)
    for name in ("--master", "--config", "--result"):
        p.add_argument(name, default="", help=argparse.SUPPRESS)
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("workers", "steps", "batch_size", "eval_every", "test_limit"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}; expected >= 1")
    if args.workers < 2:
        raise ValueError(f"--workers={args.workers}; a network needs at least 2 workers")
    if args.steps <= 10:
        raise ValueError(f"--steps={args.steps}; expected > 10 (5 warm-up steps are not timed)")
    if not args.lr > 0:
        raise ValueError(f"--lr={args.lr}; expected > 0")
    if args.compressors[0] != "none":
        raise ValueError("the first method must be 'none': it is the baseline of every row")


class _Interrupted(Exception):
    """SIGTERM/SIGHUP arrived: unwind so that the network is removed."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(f"signal {signal.Signals(signum).name}")


def _launch(args: argparse.Namespace, methods: list[str], tmp: Path) -> dict[str, Any]:
    from benchmarks.netns import VirtualNetwork
    from benchmarks.network_worker import WorkerConfig, save_datasets

    data_file = str(tmp / "data.pt")
    save_datasets(data_file, args.test_limit)
    cfg = WorkerConfig(tuple(methods), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       eval_every=args.eval_every, test_limit=args.test_limit,
                       seed=args.seed, data_file=data_file,
                       warmup_steps=args.steps // 5, model=args.model)  # fmt: skip
    result = tmp / "result.json"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    with VirtualNetwork(args.workers, rate=args.rate, delay=args.delay) as net:
        try:
            for i in range(args.workers):
                cmd = [*net.exec_prefix(i), sys.executable, "-m", "benchmarks.network",
                       "--worker", "--rank", str(i), "--world", str(args.workers),
                       "--master", net.addresses[0], "--port", "29400",
                       "--config", cfg.to_json(), "--result", str(result)]  # fmt: skip
                log = None if i == 0 else (tmp / f"rank{i}.log").open("wb")
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
            _wait(procs, args.timeout, tmp)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    return dict(json.loads(result.read_text()))


def _wait(procs: Sequence[subprocess.Popen[bytes]], timeout: float, tmp: Path) -> None:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            i = failed[0]
            log = tmp / f"rank{i}.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(see above)"
            raise RuntimeError(f"worker {i} exited with status {procs[i].returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the workers did not finish within --timeout={timeout:.0f} s")
        time.sleep(0.5)
    if procs[0].returncode != 0:
        raise RuntimeError(f"worker 0 exited with status {procs[0].returncode}")


def rows(result: dict[str, Any]) -> tuple[list[list[Any]], float]:
    """Table rows (HEADERS order) and the target accuracy, from the workers' JSON."""
    compute, comm = result["compute_s"], result["comm_s"]
    measured = [m for m in result["methods"] if "skipped" not in m]
    base = next(m for m in measured if m["method"] == "none")
    target = base["curve"][-1][2]
    out: list[list[Any]] = []
    for m in result["methods"]:
        if "skipped" in m:
            out.append([m["method"], *["n/a"] * (len(HEADERS) - 4), "skipped", "n/a", "n/a"])
            continue
        speedup = base["step_s"] / m["step_s"]
        ideal = (compute + comm) / (compute + comm / m["ratio"])
        reached = [t for _, t, acc in m["curve"] if acc >= target]
        predicted = m.get("predicted_s")
        out.append([
            m["method"], 1e3 * m["step_s"], speedup, m["ratio"], ideal, speedup / ideal,
            m["bytes_per_step"] / 1e6, 100 * m["curve"][-1][2],
            reached[0] if reached else "not reached",
            "n/a" if predicted is None else 1e3 * predicted,
            "n/a" if predicted is None else 100 * (predicted - m["step_s"]) / m["step_s"],
        ])  # fmt: skip
    return out, target


def _link_words(link: dict[str, float] | None) -> str:
    """The measured link in words: its latency and bandwidth."""
    if not link:
        return "not measured"
    rate = 8e-6 / link["beta"] if link["beta"] else float("inf")
    return f"alpha {1e6 * link['alpha']:.0f} us, {rate:.0f} Mbit/s"


def render(result: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    """The markdown report: setup, table, and how each figure was measured."""
    from benchmarks.report import machine_line, markdown_table

    table, target = rows(result)
    spec = {k: v for k, v in ALIASES.items() if k in args.compressors}
    delay = f", netem delay {args.delay} per direction" if args.delay else ""
    lines = [
        "# Network benchmark: compressed allreduce on a capped link",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: `nproc` = {os.cpu_count()}, `uname -m` = {platform.machine()}; "
        f"{machine_line()}.",
        "",
        f"{args.workers} worker processes, each in its own network namespace, veth links to a "
        + (f"bridge capped at {args.rate} each way (tc tbf){delay}; "
           if args.rate != "none" else "bridge, uncapped (no tc qdisc); ")
        + "gloo over TCP. "
        f"{result['dataset']} with the {'small CNN' if args.model == 'cnn' else 'MLP'} "
        f"({result['params']} parameters), "
        f"{args.batch_size} samples per worker and step, {args.steps} steps per method, SGD "
        f"lr {args.lr} momentum 0.9 (0 with DGC, which applies momentum itself; its "
        f"warm-up runs over the first {args.steps // 5} steps), seed "
        f"{args.seed}. Test subset: {result['test']} images, evaluated every "
        f"{args.eval_every} steps.",
        "",
        f"Measured in this run: compute (a step without communication) "
        f"**{1e3 * result['compute_s']:.1f} ms** (the slowest rank's, median over steps: "
        f"{1e3 * result.get('compute_max_s', float('nan')):.1f} ms), dense comm (one "
        "allreduce of all gradients) "
        f"**{1e3 * result['comm_s']:.1f} ms**. Target accuracy = final accuracy of `none`: "
        f"**{100 * target:.2f}%**. Aliases: "
        + (", ".join(f"`{k}` = `{v}`" for k, v in spec.items()) or "none")
        + ".",
        "",
        markdown_table(HEADERS, table),
        "step ms: median over the steps after 5 warm-up steps (rank 0). speedup: step time of "
        "`none` / step time. ratio: dense gradient bytes / bytes handed to the collectives per "
        "step, over the second half of the run (after DGC's warm-up and PowerSGD's dense "
        "start), counted by the backend (`backend.stats.bytes_in`) or, for the DDP hooks, by "
        "wrapping `torch.distributed.all_reduce`. ideal: (compute + comm) / (compute + comm / "
        "ratio). efficiency: speedup / ideal. time to target: training time (evaluation "
        "excluded) until the first evaluation at or above the target; evaluated every "
        f"{args.eval_every} steps, so it is known to that granularity. predicted: the cost "
        "model's step (`gradzip.plan.predict_pipeline` of the method's own optimizer: its "
        "buckets, compressors and strategies) from the link measured at the end of the run "
        f"({_link_words(result.get('link'))}), "
        "the compute measured in the run, and each compressor's work measured on every rank "
        "at once (so under the run's contention); model error: (predicted - measured) / "
        "measured.",
    ]
    if (os.cpu_count() or 1) < args.workers:
        lines += [
            "",
            f"Note: {args.workers} workers share {os.cpu_count()} CPU cores here, so compute is "
            "slowed by contention (measured that way, in the same run), and compression work "
            "competes with the other workers' computation; on one core per worker both the "
            "compute time and the compression overhead would be smaller.",
        ]
    return "\n".join(lines) + "\n"


def _report(result: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    from benchmarks.report import write_csv

    table, _ = rows(result)
    text = render(result, args, command)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "network" if args.model == "cnn" else f"network-{args.model}"
    (args.out / f"{stem}.md").write_text(text)
    write_csv(args.out / f"{stem}.csv", HEADERS, table)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        from benchmarks.network_worker import worker_main

        return worker_main(args.rank, args.world, args.master, args.port, args.config,
                           args.result)  # fmt: skip
    from benchmarks.netns import NetnsError, check_tools

    try:
        _check(args)
        check_tools()
    except (ValueError, NetnsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    methods = [ALIASES.get(m, m) for m in args.compressors]
    command = "python -m benchmarks.network " + shlex.join(sys.argv[1:] if argv is None else argv)
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with tempfile.TemporaryDirectory(prefix="gradzip-net-") as tmp:
            result = _launch(args, methods, Path(tmp))
    except (NetnsError, RuntimeError, TimeoutError, _Interrupted, KeyboardInterrupt) as err:
        print(f"error: {err or type(err).__name__}; the network was removed", file=sys.stderr)
        return 1
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    for m, alias in zip(result["methods"], args.compressors, strict=True):
        m["method"] = alias if alias == m["method"] else f"{alias} ({m['method']})"
    print(_report(result, args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
