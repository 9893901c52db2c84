"""What skipping the size exchange saves: one allgather bucket of 1-bit payloads, on P gloo ranks.

``python -m benchmarks.gather_sizes`` starts P worker processes (gloo over loopback) and times
the allgather strategy on one bucket of 1-bit-compressed gradients, as the optimizer runs it
(``same_size=True``, one collective), against the same strategy forced to exchange the sizes
first (two collectives, the first blocking), interleaved rep by rep in the same run. Prints the
median time of each and their ratio per bucket size; writes ``results/gather_sizes.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


class Exchanging:
    """A compressor whose ``fixed_payload()`` says False: the strategy exchanges sizes."""

    def __init__(self, c: Any) -> None:
        self._c = c

    def fixed_payload(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._c, name)


def _worker(rank: int, size: int, store: str, sizes: list[int], reps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    import gradzip
    from gradzip.allreduce.entry import Entry
    from gradzip.allreduce.select import strategy_for
    from gradzip.allreduce.torch_dist import TorchDistBackend

    backend = TorchDistBackend()
    comp = gradzip.compressor("onebit")
    strategy = strategy_for(comp, gather="allgather")
    rows = []
    for n in sizes:
        g = torch.randn(n, generator=torch.Generator().manual_seed(rank))
        entries = [Entry("w", g)]
        times: dict[str, list[float]] = {"same_size": [], "exchange": []}
        for rep in range(reps + 3):
            for label, c in (("same_size", comp), ("exchange", Exchanging(comp))):
                dist.barrier()
                start = time.perf_counter()
                strategy.start(backend, c, entries, seed=0, step=rep).wait()
                if rep >= 3:  # the first reps warm up
                    times[label].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((n, med["same_size"], med["exchange"]))
    if rank == 0:
        lines = [
            f"{size} gloo ranks on loopback, 1-bit payloads of one bucket, {reps} reps each "
            "(median), interleaved; nproc "
            f"{len(os.sched_getaffinity(0))}, torch {torch.__version__}",
            "",
            "| elements | same_size: ms | size exchange first: ms | same_size / exchange |",
            "|---|---|---|---|",
        ]
        lines += [f"| {n} | {a * 1e3:.3f} | {b * 1e3:.3f} | {a / b:.2f} |" for n, a, b in rows]
        Path(out).write_text("\n".join(lines) + "\n")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gather_sizes", description=__doc__)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--sizes", type=int, nargs="+", default=[1 << 12, 1 << 16, 1 << 20])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gather_sizes.md")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(
            _worker,
            args=(a.ranks, store, a.sizes, a.reps, str(a.out)),
            nprocs=a.ranks,
            start_method="fork",
        )
    text = a.out.read_text()
    args = argv if argv is not None else sys.argv[1:]
    cmd = "python -m benchmarks.gather_sizes " + " ".join(args)
    a.out.write_text(f"`{cmd.strip()}`\n\n{text}")
    print(a.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
