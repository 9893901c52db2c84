"""Every registered compressor on the real gradients of a small CNN learning Fashion-MNIST.

``python -m benchmarks.compressors`` (run by ``make bench``) trains :class:`SmallCNN` with plain
SGD in one process and, at every step, runs each compressor's pipeline (its own memory:
compensate -> compress -> decompress -> update) on the real per-layer gradients; training
itself uses the dense gradients, so every compressor sees the same gradient stream. At a few
checkpoint steps it also measures bytes, error and speed; :mod:`benchmarks.measure` defines
each figure. It prints one table row per compressor (and per option variant that matters:
QSGD 4- and 8-bit, TernGrad 2-bit and base-3 packing, top-k 1% with and without error
feedback, DGC 0.1%), and writes the table to ``benchmarks/results/compressors.{md,csv}`` and
into README.md between ``<!-- bench:compressors -->`` markers. A compressor whose pipeline
raises gets a row of n/a and a note, the others are still measured, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.data import Dataset, DataUnavailableError, load_image_dataset
from benchmarks.measure import VARIANTS, FactorCapture, Tally, bench_specs, median_ns
from benchmarks.models import SmallCNN
from benchmarks.report import machine_line, markdown_table, update_block, write_csv
from benchmarks.training import batches, evaluate, sgd_step
from gradzip import compressor

__all__ = ["HEADERS", "BenchConfig", "BenchResult", "main", "render", "run"]

ROOT = Path(__file__).resolve().parents[1]
HEADERS = (
    "compressor",
    "reduction",
    "memory",
    "tensors",
    "ratio",
    "error",
    "drift",
    "compress/clone",
    "decompress/clone",
)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to train and measure; the defaults are what ``make bench`` runs."""

    steps: int = 500
    batch_size: int = 64
    lr: float = 0.1
    checkpoints: int = 3  # evenly spaced, the last one at the final step
    repeats: int = 7  # timing repeats per tensor (median)
    seed: int = 0
    train_limit: int | None = None  # use only the first N training images
    test_limit: int | None = None
    specs: tuple[str, ...] | None = None  # None: bench_specs()

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoints", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected an int >= 1")
        if self.checkpoints > self.steps:
            raise ValueError(f"checkpoints={self.checkpoints} must be <= steps={self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}; expected a number > 0")
        for spec in self.specs or ():
            compressor(spec)  # an unknown name or option raises a ValueError saying what is valid

    def checkpoint_steps(self) -> list[int]:
        return sorted(
            {math.ceil(self.steps * (i + 1) / self.checkpoints) for i in range(self.checkpoints)}
        )


@dataclasses.dataclass
class BenchResult:
    """The table rows (cells in HEADERS order) and what the run was."""

    rows: list[list[str | int | float]]
    accuracy: float
    dataset: str
    test_size: int
    parameters: int
    seconds: float
    config: BenchConfig
    notes: list[str]

    @property
    def failed(self) -> list[str]:
        """Labels of the compressors whose row is n/a because their pipeline raised."""
        return [
            str(row[0])
            for row in self.rows
            if any(isinstance(c, float) and math.isnan(c) for c in row[4:])
        ]


def _row(t: Tally, n_tensors: int) -> list[str | int | float]:
    tensors = f"all {n_tensors}"
    if t.factors:
        tensors = f"Linear only ({len(t.keys)} of {n_tensors}; conv: n/a)"
    head: list[str | int | float] = [t.label, t.comp.reduction.value, t.memory_name, tensors]
    if t.failure is not None or not t.clone_ns:
        return [*head, *[math.nan] * (len(HEADERS) - len(head))]
    return [
        *head,
        t.ratio,
        t.error,
        t.drift,
        t.compress_ns / t.clone_ns,
        t.decompress_ns / t.clone_ns,
    ]


def _sfb_notes(capture: FactorCapture, batch: int, world_size: int = 4) -> list[str]:
    """Where factors beat a dense allreduce with ``world_size`` ranks (``sfb_pays``)."""
    from gradzip.compress.sfb import sfb_pays

    verdicts = [
        f"{name} ({m.in_features}x{m.out_features}): "
        f"{'pays' if sfb_pays(batch, m.in_features, m.out_features, world_size) else 'dense'}"
        for name, m in capture.layers.items()
    ]
    return [
        f"sfb cost model (`sfb_pays`, batch {batch}, {world_size} ranks): "
        + "; ".join(verdicts)
        + ". The pipeline sends a layer dense where factors do not pay; the sfb row above "
        "measures the factors of every Linear layer."
    ]


def _train(
    model: torch.nn.Module,
    train: Dataset,
    tallies: list[Tally],
    capture: FactorCapture | None,
    config: BenchConfig,
    progress: bool,
) -> None:
    """Plain SGD on the dense gradients; every step also feeds each compressor's pipeline."""
    start = time.perf_counter()
    order = batches(len(train.y), config.batch_size, torch.Generator().manual_seed(config.seed))
    checkpoints = set(config.checkpoint_steps())
    for step in range(1, config.steps + 1):
        idx = next(order)
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        clone_ns = None
        if step in checkpoints:
            clone_ns = {k: median_ns(g.clone, config.repeats) for k, g in grads.items()}
        factors = capture.factors() if capture else None
        for t in (t for t in tallies if t.failure is None):
            try:
                t.step(step, grads, factors, clone_ns, config.repeats)
            except Exception as err:  # one broken compressor must not lose the whole table
                t.failure = f"failed at step {step}: {type(err).__name__}: {err}"
        sgd_step(model, config.lr)
        if progress and (step in checkpoints or step % 50 == 0):
            elapsed = time.perf_counter() - start
            print(
                f"step {step}/{config.steps}  loss {loss.item():.3f}  {elapsed:.0f}s",
                file=sys.stderr,
            )


def run(config: BenchConfig = BenchConfig(), progress: bool = False) -> BenchResult:
    """Train, run every compressor's pipeline on the gradients, return the table."""
    start = time.perf_counter()
    train = load_image_dataset("train", config.train_limit)
    test = load_image_dataset("test", config.test_limit)
    if len(train.y) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} > {len(train.y)} training images")
    specs, notes = (list(config.specs), []) if config.specs else bench_specs()
    tallies = [Tally(spec, compressor(spec), config.seed) for spec in specs]
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = SmallCNN(tuple(train.x.shape[1:]), train.num_classes)
    capture = FactorCapture(model) if any(t.factors for t in tallies) else None
    try:
        _train(model, train, tallies, capture, config, progress)
    finally:
        if capture:
            capture.close()
    if capture:
        notes += _sfb_notes(capture, config.batch_size)
    notes += [f"**{t.label}** {t.failure}" for t in tallies if t.failure]
    accuracy = evaluate(model, test)
    n_tensors = len(list(model.parameters()))
    rows = [_row(t, n_tensors) for t in tallies]
    parameters = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - start
    return BenchResult(rows, accuracy, train.name, len(test.y), parameters, seconds, config, notes)


def render(result: BenchResult, command: str, brief: bool = False) -> str:
    """The markdown report: what ran, the table, what each column means (``brief``: a link to
    the results file instead of the column notes, for README.md)."""
    c = result.config
    lines = [
        f"Compressors on the real gradients of a small CNN ({result.parameters:,} parameters) "
        f"trained on {result.dataset} for {c.steps} steps of plain SGD (batch {c.batch_size}, "
        f"lr {c.lr}, seed {c.seed}); test accuracy **{100 * result.accuracy:.2f}%** on "
        f"{result.test_size:,} test images. Measured at steps "
        f"{', '.join(map(str, c.checkpoint_steps()))}; run took {result.seconds:.0f} s.",
        "",
        f"Command: `{command}`. Machine: {machine_line()}.",
        "",
        markdown_table(HEADERS, result.rows),
    ]
    if brief:
        lines.append(
            "What each column means, and how it was measured: "
            "[benchmarks/results/compressors.md](benchmarks/results/compressors.md)."
        )
        return "\n".join(lines) + "\n"
    lines += [
        "- **ratio**: dense bytes / `payload.nbytes`, summed over the tensors of the checkpoint "
        "steps (measured, not computed from the method).",
        "- **error**: `||x - D(C(x))|| / ||x||` over all tensors of a step, averaged over the "
        "checkpoints; `x` is what the compressor is given in the pipeline: the gradient plus "
        "the error-feedback residual (ResidualMemory), DGC's velocity (DGCMemory), or the "
        "gradient itself (NoMemory). The memory ran from step 1 (compensate -> compress -> "
        "update), on the gradients of the dense run.",
        "- **drift**: `||sum_t r_t - sum_t D(C(x_t))|| / ||sum_t r_t||` over all steps: how far "
        "the sum of the updates a compressor would apply has strayed from the dense ones "
        "(`r_t` = the gradient; for DGC the momentum-SGD velocity with its momentum). Error "
        "feedback keeps it small even where the per-step error is large.",
        "- **compress/clone**, **decompress/clone**: median time of compress (with "
        "`shared_stat`) and of decompress, summed over tensors, divided by that of "
        "`g.clone()` on the same tensors in the same run (one thread, CPU).",
        "- **sfb** sends the factors (X, dY) of the Linear layers only (weight and bias); conv "
        "layers have no such factors, so its ratio, error and times cover the Linear layers.",
        "- **dgc** is measured after its warm-up (density = ratio); the warm-up spans epochs, "
        "longer than this run.",
    ]
    lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compressors",
        description="Compression ratio, error and speed of every registered gradzip compressor "
        "on the real gradients of a small CNN trained on Fashion-MNIST.",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="SGD steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of init, batches, compressors")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--checkpoints",
        type=int,
        default=d.checkpoints,
        help="measuring steps, evenly spaced (default %(default)s)",
    )
    p.add_argument("--repeats", type=int, default=d.repeats, help="timing repeats (median)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N train images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    p.add_argument(
        "--compressors",
        default=None,
        help="';'-separated specs, e.g. 'none;topk:ratio=0.01' (default: every "
        "registered compressor and the variants " + ", ".join(VARIANTS) + ")",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="folder for compressors.md and compressors.csv",
    )
    p.add_argument(
        "--readme",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replace the block between <!-- bench:compressors --> markers in "
        "README.md (default on; skipped with a note when the markers are missing)",
    )
    p.add_argument("--readme-file", type=Path, default=ROOT / "README.md", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: run, print the table, write md/csv (and the README block)."""
    args = _parser().parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads={args.threads}; expected an int >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    specs = (
        tuple(s.strip() for s in args.compressors.split(";") if s.strip())
        if args.compressors
        else None
    )
    try:
        names = [f.name for f in dataclasses.fields(BenchConfig) if f.name != "specs"]
        config = BenchConfig(**{n: getattr(args, n) for n in names}, specs=specs)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        result = run(config, progress=True)
    except DataUnavailableError as err:
        raise SystemExit(f"error: {err}") from None
    command = "python -m benchmarks.compressors " + " ".join(sys.argv[1:] if argv is None else argv)
    report = render(result, command.strip())
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compressors.md").write_text(report)
    write_csv(args.out / "compressors.csv", HEADERS, result.rows)
    print(f"wrote {args.out / 'compressors.md'} and {args.out / 'compressors.csv'}")
    if args.readme:
        readme = args.readme_file
        if update_block(readme, "compressors", render(result, command.strip(), brief=True)):
            print(f"updated the compressors block of {readme}")
        else:
            print(f"note: {readme} has no <!-- bench:compressors --> markers; left unchanged")
    if result.failed:
        print(f"error: compressors failed: {', '.join(result.failed)} (see the notes)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
