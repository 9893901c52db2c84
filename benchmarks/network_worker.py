"""One rank of the network benchmark (run inside its namespace by :mod:`benchmarks.network`).

Every rank trains :class:`~benchmarks.models.SmallCNN` on its shard of each global batch of
Fashion-MNIST, one model per method from the same initial weights. The methods take turns
(round robin): each step runs every method once on the same batch, then a step without any
communication (``compute``) and one dense allreduce of all gradients as one flat fp32 buffer
(``comm``, started after a barrier). On a shared machine whose background load changes over
minutes, every figure thus meets the same load. Per method it records the time of each step
(forward, backward, communication, update), the bytes handed to collectives each step, and the
test accuracy (rank 0, on a fixed test subset) at evaluation points, with the training time
spent until then (evaluation time excluded).

Methods: ``none`` (dense allreduce of one flat buffer through gradzip's
:class:`~gradzip.allreduce.torch_dist.TorchDistBackend`; the baseline), ``ddp``,
``ddp-fp16``, ``ddp-powersgd`` (torch's DDP with its comm hooks), and any gradzip compressor
spec, run through ``gradzip.DistributedOptimizer``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from benchmarks.data import Dataset, load_image_dataset
from benchmarks.models import MLP, SmallCNN
from benchmarks.network_peers import PEERS, ddp_step
from gradzip.allreduce.torch_dist import TorchDistBackend

__all__ = ["WorkerConfig", "load_datasets", "loss_backward", "save_datasets", "worker_main"]


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """What every rank runs; travels to the workers as JSON."""

    methods: tuple[str, ...]
    steps: int = 150
    batch_size: int = 32  # per rank
    lr: float = 0.01
    momentum: float = 0.9
    eval_every: int = 15
    test_limit: int = 1000
    seed: int = 0
    warmup: int = 5  # steps left out of the step-time median
    reps: int = 15  # repetitions of the compute and comm measurements
    powersgd_rank: int = 1
    model: str = "cnn"  # "cnn" (SmallCNN), "mlp" (hidden 1024, 1024) or "mlp-wide" (2048, 2048)
    warmup_steps: int = 60  # DGC's warm-up epochs squeezed into these first steps
    timeout_s: float = 300.0
    data_file: str = ""  # written by save_datasets(); empty: every rank loads the data itself

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        raw = json.loads(text)
        raw["methods"] = tuple(raw["methods"])
        return cls(**raw)


def save_datasets(path: str, test_limit: int) -> None:
    """Load the training set and the test subset once and save them for the workers, which
    map the file instead of each decompressing the data again."""
    train = load_image_dataset("train")
    test = load_image_dataset("test", limit=test_limit)
    torch.save({"train": tuple(train), "test": tuple(test)}, path)


def load_datasets(cfg: WorkerConfig) -> tuple[Dataset, Dataset]:
    """(train, test subset): from ``cfg.data_file`` (memory-mapped) or from the packages."""
    if not cfg.data_file:
        return load_image_dataset("train"), load_image_dataset("test", limit=cfg.test_limit)
    saved = torch.load(cfg.data_file, mmap=True)
    return Dataset(*saved["train"]), Dataset(*saved["test"])


class Step:
    """One rank's training state for a method: ``run(x, y)`` does one full step;
    ``at_step(i)`` is called before step ``i`` (DGC's warm-up)."""

    def __init__(self, model: nn.Module, run: Callable[[torch.Tensor, torch.Tensor], None],
                 bytes_now: Callable[[], int],
                 at_step: Callable[[int], None] | None = None) -> None:  # fmt: skip
        self.model, self.run, self.bytes_now = model, run, bytes_now
        self.at_step = at_step or (lambda i: None)
        #: what the cost model predicts of this step, given the measured link and compute
        #: (None: the model does not cover it, e.g. the DDP hooks)
        self.predict: Callable[[Any, float], float] | None = None


def _batches(data: Dataset, cfg: WorkerConfig, rank: int, world: int) -> Iterator[Any]:
    """This rank's share of each global batch; the same global order for every method."""
    gen = torch.Generator().manual_seed(cfg.seed)
    per_step = cfg.batch_size * world
    while True:
        order = torch.randperm(len(data.y), generator=gen)
        for i in range(0, len(order) - per_step + 1, per_step):
            idx = order[i + rank * cfg.batch_size : i + (rank + 1) * cfg.batch_size]
            yield data.x[idx], data.y[idx]


def _new_model(cfg: WorkerConfig, data: Dataset) -> nn.Module:
    torch.manual_seed(cfg.seed)
    if cfg.model in ("mlp", "mlp-wide"):
        hidden = (2048, 2048) if cfg.model == "mlp-wide" else (1024, 1024)
        return MLP(data.x[0].numel(), hidden=hidden, num_classes=data.num_classes)
    return SmallCNN(tuple(data.x.shape[1:]), data.num_classes)


def loss_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()


def _dense_step(model: nn.Module, opt: torch.optim.Optimizer, backend: TorchDistBackend,
                x: torch.Tensor, y: torch.Tensor) -> None:  # fmt: skip
    """The baseline: one flat fp32 allreduce of all gradients, averaged, then the update."""
    opt.zero_grad(set_to_none=False)
    loss_backward(model, x, y)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = backend.allreduce(torch.cat([g.reshape(-1) for g in grads])).wait()
    flat /= backend.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    opt.step()


def _gradzip_step(spec: str, model: nn.Module, cfg: WorkerConfig,
                  backend: TorchDistBackend) -> tuple[Step, Callable[[], None]]:  # fmt: skip
    import gradzip

    factory = getattr(gradzip, "DistributedOptimizer", None)
    if factory is None:
        raise LookupError("gradzip.DistributedOptimizer is not available yet")
    from gradzip.plan.auto import is_auto

    comp: Any = spec if is_auto(spec) else gradzip.compressor(spec)
    # a compressor that applies momentum itself (DGC's momentum correction) needs plain SGD
    momentum = 0.0 if float(getattr(comp, "momentum", 0.0) or 0.0) > 0 else cfg.momentum
    base = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=momentum)
    # dense_steps=0: the benchmark times compressed steps (gradzip's default warm-up would
    # send the first 150 steps dense)
    opt = factory(base, named_parameters=model.named_parameters(), compression=comp,
                  backend=backend, dense_steps=0)  # fmt: skip

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        loss_backward(model, x, y)
        opt.step()

    at_step = None
    epochs = getattr(comp, "warmup_epochs", 0)
    if hasattr(comp, "at_epoch") and epochs and cfg.warmup_steps:
        # DGC counts its warm-up in epochs; this run is shorter than one, so each warm-up
        # "epoch" lasts warmup_steps / warmup_epochs steps
        length = max(1, cfg.warmup_steps // epochs)

        def at_step(i: int) -> None:
            if i % length == 0 and i // length <= epochs:
                opt.set_epoch(i // length)

    step = Step(model, run, lambda: backend.stats.bytes_in, at_step)

    def predict(link: Any, compute: float) -> float:
        from gradzip.plan.calibrate import measure_rates
        from gradzip.plan.choose import predict_pipeline

        rates: dict[str, Any] = {}

        def rate(s: str) -> Any:
            if s not in rates:
                rates[s] = measure_rates(gradzip.compressor(s))
            return rates[s]

        return float(predict_pipeline(opt._gz, link, rates=rate, compute=compute).step)

    step.predict = predict
    return step, lambda: None


def _build(method: str, cfg: WorkerConfig, data: Dataset,
           backend: TorchDistBackend) -> tuple[Step, Callable[[], None]]:  # fmt: skip
    model = _new_model(cfg, data)
    if method in PEERS:
        return ddp_step(method, model, cfg)
    if method == "none":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        run = functools.partial(_dense_step, model, opt, backend)
        step = Step(model, run, lambda: backend.stats.bytes_in)

        def predict(link: Any, compute: float) -> float:
            from gradzip.plan.model import dense_allreduce

            dense = sum(p.numel() * p.element_size() for p in model.parameters())
            return compute + dense_allreduce(link, backend.size, dense)

        step.predict = predict
        return step, lambda: None
    return _gradzip_step(method, model, cfg, backend)


def _accuracy(model: nn.Module, test: Dataset) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(test.x[i : i + 500]).argmax(1) == test.y[i : i + 500]).sum())
            for i in range(0, len(test.y), 500)
        )
    model.train()
    return correct / len(test.y)


class _Record:
    """One method's measurements while it trains."""

    def __init__(self, step: Step) -> None:
        self.step = step
        self.times: list[float] = []
        self.sent: list[int] = []
        self.curve: list[tuple[int, float, float]] = []

    def run(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.step.at_step(len(self.times))
        before = self.step.bytes_now()
        start = time.perf_counter()
        self.step.run(x, y)
        self.times.append(time.perf_counter() - start)
        self.sent.append(self.step.bytes_now() - before)

    def summary(self, warmup: int) -> dict[str, Any]:
        dense = sum(p.numel() * p.element_size() for p in self.step.model.parameters())
        tail = self.sent[len(self.sent) // 2 :]
        return {
            "step_s": statistics.median(self.times[warmup:] or self.times),
            "bytes_per_step": statistics.fmean(tail),
            "ratio": dense * len(tail) / sum(tail) if sum(tail) else float("inf"),
            "dense_bytes": dense,
            "train_s": sum(self.times),
            "curve": self.curve,
        }


def _compute_step(cfg: WorkerConfig, data: Dataset) -> Step:
    """A training step with no communication at all (the ``compute`` of the ideal speedup)."""
    model = _new_model(cfg, data)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=False)
        loss_backward(model, x, y)
        opt.step()

    return Step(model, run, lambda: 0)


def _comm_time(buf: torch.Tensor, backend: TorchDistBackend) -> float:
    """One dense allreduce of all gradients, started together (the ``comm`` of the ideal)."""
    dist.barrier()
    start = time.perf_counter()
    backend.allreduce(buf).wait()
    return time.perf_counter() - start


def _train_all(records: dict[str, _Record], cfg: WorkerConfig, data: Dataset, test: Dataset,
               backend: TorchDistBackend) -> dict[str, Any]:  # fmt: skip
    """Round robin: each step runs every method once on the same batch, then a step without
    communication and one dense allreduce; so all of them meet the same background load."""
    rank, world = backend.rank, backend.size
    compute = _Record(_compute_step(cfg, data))
    buf = torch.zeros(sum(p.numel() for p in compute.step.model.parameters()))
    comm: list[float] = []
    batches = _batches(data, cfg, rank, world)
    began = time.perf_counter()
    for i in range(cfg.steps):
        x, y = next(batches)
        for rec in records.values():
            rec.run(x, y)
        compute.run(x, y)
        comm.append(_comm_time(buf, backend))
        if (i + 1) % cfg.eval_every == 0 or i + 1 == cfg.steps:
            dist.barrier()  # evaluation time is not training time
            if rank == 0:
                for rec in records.values():
                    rec.curve.append((i + 1, sum(rec.times), _accuracy(rec.step.model, test)))
                accs = " ".join(f"{m} {100 * r.curve[-1][2]:.1f}" for m, r in records.items())
                _say(rank, f"[{time.perf_counter() - began:6.0f} s] step {i + 1}/{cfg.steps} "
                           f"accuracy %: {accs}")  # fmt: skip
            dist.barrier()
    # a synchronous step waits for its slowest rank: the median over steps of the slowest
    # rank's compute (a compute step runs at the same point of every rank's round)
    slowest = torch.tensor(compute.times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return {
        "compute_s": statistics.median(compute.times[cfg.warmup :]),
        "compute_max_s": statistics.median(slowest.tolist()[cfg.warmup :]),
        "comm_s": statistics.median(comm[cfg.warmup :]),
        "methods": {m: rec.summary(cfg.warmup) for m, rec in records.items()},
    }


def worker_main(rank: int, world: int, master: str, port: int, config: str, out: str) -> int:
    """Join the process group at ``master:port``, run every method, and (rank 0) write the
    results as JSON to ``out``. Returns the exit status."""
    import datetime

    cfg = WorkerConfig.from_json(config)
    _say(rank, f"worker 0 started, torch imported ({_since_start():.0f} s)")
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank,
                            world_size=world, timeout=timeout)  # fmt: skip
    closers: list[Callable[[], None]] = []
    try:
        backend = TorchDistBackend(timeout=timeout)
        _say(rank, f"{world} workers joined the process group ({_since_start():.0f} s)")
        data, test = load_datasets(cfg)
        records, skipped = {}, {}
        for method in cfg.methods:
            try:
                step, close = _build(method, cfg, data, backend)
            except (LookupError, ValueError) as err:  # the same on every rank: skip everywhere
                _say(rank, f"{method}: skipped ({err})")
                skipped[method] = str(err)
                continue
            records[method] = _Record(step)
            closers.append(close)
        _say(rank, f"data loaded, {len(records)} methods built ({_since_start():.0f} s)")
        measured = _train_all(records, cfg, data, test, backend)
        # the cost model's prediction of each step from the link measured here and the
        # compute of the same run; every rank measures its compressors' work at the same
        # time, so the contention of the run is in the rates too
        from gradzip.plan.calibrate import measure_link

        link = measure_link(backend)
        dist.barrier()
        for m, rec in records.items():
            if rec.step.predict is not None:
                predicted = rec.step.predict(link, measured["compute_s"])
                measured["methods"][m]["predicted_s"] = predicted
        measured["link"] = {"alpha": link.alpha, "beta": link.beta}
        rows = [
            {"method": m, "skipped": skipped[m]} if m in skipped
            else {"method": m, **measured["methods"][m]}
            for m in cfg.methods
        ]  # fmt: skip
        params = sum(p.numel() for p in _new_model(cfg, data).parameters())
        result = {"params": params, "dataset": data.name, "test": len(test.y),
                  "compute_s": measured["compute_s"],
                  "compute_max_s": measured["compute_max_s"], "comm_s": measured["comm_s"],
                  "link": measured["link"], "methods": rows}  # fmt: skip
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        for close in closers:
            close()
        dist.destroy_process_group()
    return 0


def _since_start() -> float:
    """Seconds since this process started (its /proc entry's start time)."""
    import os

    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)
