"""One rank of :mod:`benchmarks.accuracy`: trains every method in turn, from the same weights.

``python -m benchmarks.accuracy_worker CONFIG.json RANK`` (launched by ``accuracy.py``, one
process per rank, gloo over a file rendezvous), or under ``horovodrun`` without ``RANK``: the
gradzip methods then talk through Horovod, and torch.distributed (for the DDP peers and the
evaluation sums) is set up beside it with the same ranks.

Per method every rank starts from the same initial weights (``seed``) and draws the same global
batches (a generator seeded with ``seed``); rank ``r`` takes the ``r``-th share of each.
Per step it records the bytes this rank handed to collectives:

* gradzip methods: ``optimizer.backend.stats.bytes_in`` (every collective of the step, the
  small "which parameters have gradients" flag allreduce included);
* torch DDP peers: ``torch.distributed.all_reduce`` is wrapped while they train, and the hook's
  tensors are counted (their hooks call nothing else);
* Horovod's ``Compression.fp16``: its ``compress()`` is wrapped, and the tensors handed on to
  ``allreduce_async_`` are counted.

Rank 0 appends one line per step to ``progress`` and, per method, one JSON line to ``results``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.accuracy_tasks import Task, load_task
from benchmarks.training import batches

__all__ = ["PEERS", "WorkerConfig", "main", "train_method"]

#: methods that are not gradzip specs
PEERS = ("ddp-fp16", "ddp-powersgd", "hvd-fp16")


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """What every rank runs; travels to the ranks as JSON."""

    task: str
    methods: tuple[str, ...]
    out_dir: str
    size: int = 4
    steps: int = 300
    batch_size: int = 16  # per rank
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    curve_test_limit: int | None = 2000
    evals: int = 8  # evaluation points of the training curve (the last at the final step)
    warmup_steps: int = 30  # DGC's warm-up epochs span these steps; PowerSGD starts after them
    min_compress_numel: int | None = None  # None: gradzip's default (small tensors dense)
    dense_steps: int | None = None  # gradzip methods: the first steps dense (None: default)
    set_epoch: bool = False  # drive DGC's warm-up by epochs over warmup_steps (else: its own)
    powersgd_rank: int = 1
    seq_len: int = 64
    launcher: str = "torch"
    store: str = ""  # file of the gloo rendezvous (a fresh one per launch)
    timeout_s: float = 300.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        raw = json.loads(text)
        raw["methods"] = tuple(raw["methods"])
        return cls(**raw)

    def eval_steps(self) -> list[int]:
        """Steps (1-based) after which the test metric is measured; the last is ``steps``."""
        return sorted({max(1, round(self.steps * (i + 1) / self.evals)) for i in range(self.evals)})


class _AllreduceCounter:
    """Counts the bytes of every ``torch.distributed.all_reduce`` while ``active``."""

    def __init__(self) -> None:
        self.bytes = 0
        self.active = False
        self._inner = dist.all_reduce

    def __call__(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.active:
            self.bytes += tensor.numel() * tensor.element_size()
        return self._inner(tensor, *args, **kwargs)


class _CountingCompression:
    """Horovod compression wrapper that counts the bytes of the tensors it hands on."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.bytes = inner, 0

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        out, ctx = self.inner.compress(tensor)
        self.bytes += out.numel() * out.element_size()
        return out, ctx

    def decompress(self, tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.inner.decompress(tensor, ctx)


@dataclasses.dataclass
class _Wrapped:
    """A model ready to train: its forward module, optimizer, and the step byte counter."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    take_bytes: Callable[[], int]  # bytes handed to collectives since the last call
    set_epoch: Callable[[float], None] | None = None
    warmup: int = 0  # steps before the method sends what it sends for good (dense, warm-up)


def _wrap(cfg: WorkerConfig, method: str, model: nn.Module, counter: _AllreduceCounter) -> _Wrapped:
    dgc = method.startswith("dgc")
    momentum = 0.0 if dgc else cfg.momentum  # DGC applies the momentum itself
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=momentum)
    if method in ("ddp-fp16", "ddp-powersgd"):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        if method == "ddp-fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        else:
            state = powerSGD_hook.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=cfg.powersgd_rank,
                start_powerSGD_iter=max(2, cfg.warmup_steps),
                random_seed=cfg.seed,
            )
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)

        def take() -> int:
            value, counter.bytes = counter.bytes, 0
            return value

        warm = max(2, cfg.warmup_steps) if method == "ddp-powersgd" else 0
        return _Wrapped(ddp, opt, take, None, warm)
    if method == "hvd-fp16":
        import horovod.torch as hvd

        counting = _CountingCompression(hvd.Compression.fp16)
        hopt = hvd.DistributedOptimizer(opt, model.named_parameters(), compression=counting)

        def take_hvd() -> int:
            value, counting.bytes = counting.bytes, 0
            return value

        return _Wrapped(model, hopt, take_hvd)
    import gradzip

    comp: Any = gradzip.compressor(method)
    if dgc and "momentum" not in method:  # the same momentum as the other methods
        comp = dataclasses.replace(comp, momentum=cfg.momentum)
    extra = {} if cfg.min_compress_numel is None else {"min_compress_numel": cfg.min_compress_numel}
    gopt: Any = gradzip.DistributedOptimizer(
        opt,
        model.named_parameters(),
        compression=comp,
        model=model,
        seed=cfg.seed,
        dense_steps=cfg.dense_steps,
        **extra,
    )

    def take_gz() -> int:
        stats = gopt.backend.stats
        value = stats.bytes_in
        stats.reset()
        return int(value)

    warm = gopt._gz.dense_steps
    if dgc and not cfg.set_epoch:
        warm = max(warm, comp.warmup_steps)
    return _Wrapped(model, gopt, take_gz, gopt.set_epoch if dgc and cfg.set_epoch else None, warm)


def _metric(task: Task, model: nn.Module, rank: int, size: int, limit: int | None) -> float:
    total, count = task.metric(model, rank, size, limit)
    sums = torch.tensor([total, float(count)], dtype=torch.float64)
    dist.all_reduce(sums)  # control traffic: never counted (the counter is off here)
    return float(sums[0] / sums[1])


def _global_batches(task: Task, cfg: WorkerConfig) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed)
    return batches(task.examples, cfg.batch_size * cfg.size, gen)


def train_method(
    cfg: WorkerConfig,
    task: Task,
    method: str,
    rank: int,
    counter: _AllreduceCounter,
    progress: Callable[[int], None],
) -> dict[str, Any]:
    """Train ``method`` for ``cfg.steps`` steps; returns its record (metric curve, bytes)."""
    torch.manual_seed(cfg.seed)
    model = task.make_model()
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    w = _wrap(cfg, method, model, counter)
    stream, lo = _global_batches(task, cfg), rank * cfg.batch_size
    evals, curve, step_bytes, losses = set(cfg.eval_steps()), [], [], []
    dgc_epoch, train_s = -1, 0.0
    warm_epochs = 4
    for step in range(cfg.steps):
        start = time.perf_counter()
        if w.set_epoch is not None:
            epoch = (
                min(warm_epochs, step * warm_epochs // cfg.warmup_steps)
                if cfg.warmup_steps
                else warm_epochs
            )
            if epoch != dgc_epoch:  # a new epoch of DGC's warm-up schedule
                w.set_epoch(epoch)
                dgc_epoch = epoch
        for group in w.optimizer.param_groups:  # cosine decay to 0 over the run
            group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))
        idx = next(stream)[lo : lo + cfg.batch_size]
        counter.active = method.startswith("ddp")
        w.optimizer.zero_grad()
        loss = task.loss(w.module, idx)
        loss.backward()
        w.optimizer.step()
        counter.active = False
        step_bytes.append(w.take_bytes())
        train_s += time.perf_counter() - start
        losses.append(loss.item())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method}: the loss became {float(loss)} at step {step + 1}")
        if step + 1 in evals:
            last = step + 1 == cfg.steps
            limit = cfg.test_limit if last else cfg.curve_test_limit
            curve.append((step + 1, _metric(task, model, rank, cfg.size, limit), train_s))
        progress(step + 1)
    return {
        "method": method,
        "dense_bytes": dense,
        "step_bytes": step_bytes,
        "curve": curve,
        "losses": losses,
        "train_s": train_s,
        "final": curve[-1][1],
        "warmup": w.warmup,
        "seed": cfg.seed,
    }


def _init(cfg: WorkerConfig, rank: int | None) -> int:
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    store = f"file://{Path(cfg.store).resolve()}"
    if cfg.launcher == "horovod":
        import horovod.torch as hvd

        hvd.init()
        rank = hvd.rank()
        if hvd.size() != cfg.size:
            raise RuntimeError(f"horovodrun started {hvd.size()} ranks, the config says {cfg.size}")
    assert rank is not None
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=cfg.size, timeout=timeout
    )
    return rank


def main(argv: list[str] | None = None) -> None:
    """Entry point of one rank: ``CONFIG.json [RANK]``."""
    args = sys.argv[1:] if argv is None else argv
    cfg = WorkerConfig.from_json(Path(args[0]).read_text())
    torch.set_num_threads(1)
    rank = _init(cfg, int(args[1]) if len(args) > 1 else None)
    task = load_task(
        cfg.task, train_limit=cfg.train_limit, test_limit=cfg.test_limit, seq_len=cfg.seq_len
    )
    counter = _AllreduceCounter()
    dist.all_reduce = counter  # the DDP hooks call dist.all_reduce
    out = Path(cfg.out_dir)
    with (out / "progress").open("a") as prog, (out / "results.jsonl").open("a") as res:
        for method in cfg.methods:

            def progress(step: int, method: str = method) -> None:
                if rank == 0:
                    prog.write(f"{method} {step}\n")
                    prog.flush()

            record = train_method(cfg, task, method, rank, counter, progress)
            record["rank"], record["pid"] = rank, os.getpid()
            if rank == 0:
                res.write(json.dumps(record) + "\n")
                res.flush()
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
