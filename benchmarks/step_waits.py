"""Where a compressed step's time goes at a few ranks: the step against the bare SGD step, and
the seconds spent launching and waiting on collectives, beside what the cost model's alpha
gives for them.

``python -m benchmarks.step_waits --workers 2``: gloo ranks on loopback (no rate limit) train
the network benchmark's CNN on random data, one method after the other; per method, rank 0's
median step (zero_grad + forward + backward + step), the collectives per step, the median
seconds per step spent in their ``wait()`` and in launching them, and what is left of the step
over the bare one; beside them the latency the model charges a collective (alpha from
:func:`gradzip.plan.calibrate.measure_link` on the same ranks, each collective at its
algorithm's count of messages). ``--blocking`` waits on each collective where it is launched,
so that nothing overlaps backward. Per step, also the CPU seconds of rank 0's main thread and
of its other threads (gloo's, torch's), from ``time.thread_time`` and ``time.process_time``.
``--methods`` takes ``plain`` (the bare SGD step), ``ddp`` (torch's DistributedDataParallel)
and gradzip specs. Results: ``results/step_waits.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

METHODS = ("plain", "none", "onebit", "topk:ratio=0.01")


def _rank(rank: int, world: int, port: int, methods: list[str], steps: int, blocking: bool,
          link_calls: int, queue: Any) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import gradzip
    from benchmarks.models import SmallCNN
    from gradzip.allreduce import torch_dist
    from gradzip.allreduce.torch_dist import TorchDistBackend
    from gradzip.plan.calibrate import measure_link
    from gradzip.plan.model import allgather, dense_allreduce

    waited = [0.0, 0, 0.0]  # seconds in wait(), collectives waited on, seconds launching
    inner = torch_dist._TorchWork.wait
    launch = TorchDistBackend._call

    def timed_call(self: Any, what: str, fn: Any, *a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            work = launch(self, what, fn, *a, **kw)
            if blocking and kw.get("async_op"):
                work.wait()  # nothing overlaps: each collective done where it is launched
            return work
        finally:
            waited[2] += time.perf_counter() - start

    def timed_wait(self: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(self)
        finally:
            waited[0] += time.perf_counter() - start
            waited[1] += 1

    torch_dist._TorchWork.wait = timed_wait  # type: ignore[method-assign]
    TorchDistBackend._call = timed_call  # type: ignore[method-assign]
    backend = TorchDistBackend()
    # alpha of back-to-back calibrations: the smallest message timed 5 times, then 25
    alphas = {r: [measure_link(backend, latency_repeats=r).alpha for _ in range(link_calls)]
              for r in (5, 25)}
    link = measure_link(backend)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    rows = []
    for spec in methods:
        torch.manual_seed(0)
        model = SmallCNN((1, 28, 28), 10)
        opt: Any = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if spec == "ddp":  # torch's own data parallelism, for comparison
            model = torch.nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        elif spec != "plain":
            opt = gradzip.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                               compression=spec, backend=backend, dense_steps=0)
        times, waits, calls, launches, cpu_main, cpu_all = [], [], [], [], [], []
        for _ in range(steps):
            dist.barrier()
            waited[0], waited[1], waited[2] = 0.0, 0, 0.0
            t_main, t_all = time.thread_time(), time.process_time()
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - start)
            cpu_main.append(time.thread_time() - t_main)
            cpu_all.append(time.process_time() - t_all)
            waits.append(waited[0])
            calls.append(waited[1])
            launches.append(waited[2])
        skip = steps // 5
        rows.append((spec, statistics.median(times[skip:]), statistics.median(waits[skip:]),
                     statistics.median(calls[skip:]), statistics.median(launches[skip:]),
                     statistics.median(cpu_main[skip:]), statistics.median(cpu_all[skip:])))
    if rank == 0:
        queue.put((link.alpha, rows,
                   allgather(link, world, 0), dense_allreduce(link, world, 64), alphas))
    dist.barrier()  # no rank leaves while another still talks to it (gloo aborts then)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--port", type=int, default=29611)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--link-calls", type=int, default=0,
                    help="first, this many back-to-back link calibrations with the latency "
                         "message timed 5 and 25 times: the alpha of each")
    ap.add_argument("--blocking", action="store_true",
                    help="wait on every collective where it is launched (no overlap with "
                         "backward; its time then counts as launching)")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_rank, args=(args.workers, args.port, args.methods, args.steps,
                                     args.blocking, args.link_calls, queue),
                       nprocs=args.workers, start_method="spawn")
    alpha, rows, ag_latency, ar_latency, alphas = queue.get()
    for r, values in alphas.items():
        if values:
            shown = ", ".join(f"{1e6 * a:.0f}" for a in values)
            print(f"alpha of {len(values)} calibrations in a row, the latency message timed "
                  f"{r} times (us): {shown}")
    print(f"{args.workers} gloo ranks on loopback, the benchmark CNN, {args.steps} steps per "
          f"method (medians after the first {args.steps // 5})"
          f"{', every collective waited on where launched' if args.blocking else ''}; "
          f"alpha {alpha * 1e6:.0f} us: "
          f"an allgather's latency {ag_latency * 1e3:.2f} ms, a small allreduce's "
          f"{ar_latency * 1e3:.2f} ms in the model")
    print()
    print("| method | step ms | / plain | collectives waited per step | waiting ms per step "
          "| launching ms per step | rest over plain, ms | CPU ms, main thread | CPU ms, "
          "other threads |")
    print("|---|---|---|---|---|---|---|---|---|")
    plain = next((r[1] for r in rows if r[0] == "plain"), None)
    for spec, step, wait, calls, launched, main_cpu, all_cpu in rows:
        ratio = f"{step / plain:.2f}" if plain else "-"
        rest = f"{(step - plain - wait - launched) * 1e3:.2f}" if plain else "-"
        print(f"| {spec} | {step * 1e3:.2f} | {ratio} | {calls:.0f} | {wait * 1e3:.2f} "
              f"| {launched * 1e3:.2f} | {rest} | {main_cpu * 1e3:.2f} "
              f"| {(all_cpu - main_cpu) * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
