"""A training script for ``torchrun`` and ``horovodrun`` fault tests (one process per rank).

``launcher_worker.py OUT --launcher torch|horovod [--kill WHERE] [--steps N]
[--checkpoint-every K] [--compression SPEC]``

Trains a small MLP with ``gradzip.DistributedOptimizer`` on data fixed by (step, rank).
``--kill WHERE`` (see ``fault_points.WHERE``) makes rank 1 SIGKILL itself at step 2 (only in
the first attempt under ``torchrun --max-restarts``: the restarted one runs through). With
``--checkpoint-every K`` every rank saves model + optimizer state (residuals, DGC state, step
counters) each K steps into OUT and, when it starts, resumes from the newest complete
checkpoint. Each survivor writes ``OUT/rank{r}.json``: the error it raised (type, message,
seconds after the victim's death) or the final parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_points import arm, between

import gradzip


def _setup(launcher: str, out: Path, attempt: int) -> Any:
    if launcher == "horovod":
        from gradzip.allreduce.horovod import HorovodBackend

        return HorovodBackend(timeout=20.0)
    import datetime

    import torch.distributed as dist

    from gradzip.allreduce.torch_dist import TorchDistBackend

    # A rendezvous file per attempt instead of torchrun's store: after a restart, gloo's
    # reconnection through that store fails now and then on this machine (1 of 3 restarts of a
    # 10-line script with torch alone, no gradzip), which would make the test flaky.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / f'rendezvous-{attempt}'}",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=20),
    )
    return TorchDistBackend(timeout=datetime.timedelta(seconds=20))


def _latest(out: Path, size: int) -> int:
    """The newest step every rank has a checkpoint of (-1: none)."""
    steps = None
    for r in range(size):
        mine = {int(p.stem.split("-")[1]) for p in out.glob(f"ckpt-*-rank{r}.pt")}
        steps = mine if steps is None else steps & mine
    return max(steps) if steps else -1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--launcher", choices=["torch", "horovod"], default="torch")
    parser.add_argument("--kill", default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--compression", default="onebit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    backend = _setup(args.launcher, args.out, attempt)
    rank, size = backend.rank, backend.size
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )
    momentum = 0.0 if args.compression.startswith("dgc") else 0.9
    opt = gradzip.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum),
        model.named_parameters(), compression=args.compression, backend=backend,
        min_compress_numel=0, fusion_bytes=4096,
        dense_steps=0,
    )  # fmt: skip
    start = 0
    if args.checkpoint_every:
        done = _latest(args.out, size)
        if done >= 0:
            state = torch.load(args.out / f"ckpt-{done}-rank{rank}.pt", weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = done + 1
    step = [start]
    stamp = str(args.out / "killed")
    if args.kill and rank == 1 and attempt == 0:
        arm(model, backend, args.kill, step, 2, stamp)
    result: dict[str, Any] = {"rank": rank, "attempt": attempt, "start": start}
    try:
        for s in range(start, args.steps):
            step[0] = s
            gen = torch.Generator().manual_seed(1000 * s + rank)
            x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
            if args.checkpoint_every and (s + 1) % args.checkpoint_every == 0:
                path = args.out / f"ckpt-{s}-rank{rank}.pt"
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
            if args.kill and rank == 1 and attempt == 0:
                between(args.kill, s, 2, stamp)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        result.update(kind=None, params=flat.tolist())
    except Exception as e:
        result.update(kind=type(e).__name__, message=str(e), at=time.time())
    (args.out / f"rank{rank}-attempt{attempt}.json").write_text(json.dumps(result))
    if result["kind"] is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
