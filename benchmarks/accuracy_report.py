"""Rows, targets, tables and plots of :mod:`benchmarks.accuracy`.

Each method's record (from :mod:`benchmarks.accuracy_worker`) becomes one row: the final test
metric, its gap to ``none``, the measured compression ratio (dense gradient bytes / bytes handed
to the collectives, both over the steps after the warm-up window), bytes per step, training wall
time, and the target of the issue for that method with whether it was met.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import markdown_table, write_csv

__all__ = ["HEADERS", "LABELS", "TARGETS", "Target", "build_rows", "plot", "write_tables"]

HEADERS = (
    "method",
    "metric",
    "min-max",
    "gap to none",
    "ratio",
    "ratio, whole run",
    "bytes/step",
    "wall s",
    "target",
    "met",
)

#: display names of the methods
LABELS = {
    "none": "none (gradzip dense allreduce)",
    "qsgd:levels=7": "qsgd 4-bit (levels=7)",
    "qsgd:levels=127": "qsgd 8-bit (levels=127)",
    "topk:ratio=0.01": "topk 1% + EF",
    "topk:ratio=0.01,error_feedback=False": "topk 1%, no EF",
    "dgc:ratio=0.001": "dgc 0.1% (warm-up)",
    "onebit:columns=False": "onebit (flat buckets)",
    "ddp-fp16": "torch DDP fp16_compress_hook",
    "ddp-powersgd": "torch DDP powerSGD_hook",
    "hvd-fp16": "Horovod Compression.fp16",
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal of the issue: ``kind`` is "within" (gap >= -limit, i.e. at most ``limit``
    worse than none), "worse" (more than ``limit`` worse), "equal" (|gap| <= limit) or
    "ratio" (measured ratio >= limit)."""

    kind: str
    limit: float

    def text(self, unit: str) -> str:
        if self.kind == "ratio":
            return f"ratio >= {self.limit:g}x"
        if self.kind == "within":
            return f"within {self.limit:g} {unit} of none"
        if self.kind == "worse":
            return f"worse than none by > {self.limit:g} {unit}"
        return f"equal to none (|gap| <= {self.limit:g} {unit})"

    def met(self, worse_by: float, ratio: float) -> bool:
        """``worse_by``: how much worse than none (positive = worse), in the task's unit."""
        if self.kind == "ratio":
            return ratio >= self.limit
        if self.kind == "within":
            return worse_by <= self.limit
        if self.kind == "worse":
            return worse_by > self.limit
        return abs(worse_by) <= self.limit


_WITHIN = Target("within", 0.5)
_IMAGE = {
    "onebit": (_WITHIN, Target("ratio", 28)),
    "onebit:columns=False": (_WITHIN, Target("ratio", 28)),
    "qsgd:levels=7": (_WITHIN,),
    "terngrad": (_WITHIN,),
    "topk:ratio=0.01": (_WITHIN,),
    "topk:ratio=0.01,error_feedback=False": (Target("worse", 0.5),),
    "dgc:ratio=0.001": (_WITHIN,),
    "sfb": (Target("equal", 0.1),),
}
#: the targets of issue 11 per task and method (gaps in percentage points, or bits per char;
#: ratios over the compressed steps), on the mean over seeds
TARGETS: dict[str, dict[str, tuple[Target, ...]]] = {
    "cnn": _IMAGE,
    "mlp": {
        "sfb": (Target("equal", 0.1),),
        "dgc:ratio=0.001": (_WITHIN, Target("ratio", 300)),
    },
    "mlp-large": {"dgc:ratio=0.001": (_WITHIN, Target("ratio", 300))},
    "shakespeare": {"dgc:ratio=0.001": (Target("within", 0.05),)},
}


def _ratio(record: dict[str, Any], skip: int | None = None) -> tuple[float, float]:
    """(ratio, bytes per step) over the steps after ``skip`` (default: the record's own
    warm-up; all steps if none are left)."""
    skip = record.get("warmup", 0) if skip is None else skip
    sent = record["step_bytes"][skip:] or record["step_bytes"]
    total = sum(sent)
    per_step = total / len(sent)
    return (record["dense_bytes"] * len(sent) / total if total else math.inf), per_step


def build_rows(
    task: str,
    records: dict[str, list[dict[str, Any]]],
    methods: Sequence[str],
    failures: dict[str, str],
    accuracy: bool,
) -> list[list[Any]]:
    """One row per method in ``methods`` order (n/a cells where it did not run). ``records``:
    per method, one record per seed; the metric is their mean, with min-max beside it; the
    gap is that of the means; "ratio" counts the steps after the method's warm-up (dense
    steps, DGC's or PowerSGD's warm-up), "ratio, whole run" every step."""
    base = records.get("none")
    unit = "pp" if accuracy else "bits/char"
    scale = 100.0 if accuracy else 1.0
    base_mean = (
        sum(r["final"] for r in base) / len(base) * scale if base else math.nan
    )
    rows: list[list[Any]] = []
    for m in methods:
        targets = TARGETS.get(task, {}).get(m, ())
        goal = "; ".join(t.text(unit) for t in targets) or "-"
        recs = records.get(m)
        label = LABELS.get(m, m)
        if not recs:
            nan = math.nan
            why = failures.get(m, "not run")
            rows.append([label, nan, "-", nan, nan, nan, nan, nan, goal, why])
            continue
        finals = [r["final"] * scale for r in recs]
        metric = sum(finals) / len(finals)
        spread = f"{min(finals):.3g}-{max(finals):.3g}" if len(finals) > 1 else "one seed"
        gap = metric - base_mean
        ratio = sum(_ratio(r)[0] for r in recs) / len(recs)
        whole = sum(_ratio(r, 0)[0] for r in recs) / len(recs)
        per_step = sum(_ratio(r)[1] for r in recs) / len(recs)
        wall = sum(r["train_s"] for r in recs) / len(recs)
        worse_by = -gap if accuracy else gap
        met = "-"
        if targets and not math.isnan(gap):
            ok = [t.met(worse_by, ratio) for t in targets]
            met = "yes" if all(ok) else "NO"
        rows.append([label, metric, spread, gap, ratio, whole, per_step, wall, goal, met])
    return rows


def write_tables(
    out_dir: Path, stem: str, metric_name: str, rows: list[list[Any]], notes: Sequence[str]
) -> str:
    """Write ``accuracy_<stem>.md`` and ``.csv``; returns the markdown."""
    headers = list(HEADERS)
    headers[1] = "accuracy %" if metric_name == "accuracy" else "bits/char"
    headers[3] = "gap to none (pp)" if metric_name == "accuracy" else "gap to none (bits/char)"
    text = markdown_table(headers, rows)
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"accuracy_{stem}.md").write_text(text)
    write_csv(out_dir / f"accuracy_{stem}.csv", headers, rows)
    return text


def plot(
    out_dir: Path,
    task: str,
    metric_name: str,
    records: dict[str, list[dict[str, Any]]],
    rows: list[list[Any]],
) -> list[Path]:
    """``accuracy_<task>_ratio.png`` (metric vs. ratio, log x) and ``accuracy_<task>_curves.png``
    (test metric and training loss per step, one line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tab20 = plt.get_cmap("tab20")
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=[tab20(i) for i in range(20)])
    scale = 100.0 if metric_name == "accuracy" else 1.0
    ylabel = "test accuracy (%)" if metric_name == "accuracy" else "test bits per character"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if math.isnan(row[1]) or not math.isfinite(row[4]):
            continue
        ax.scatter(row[4], row[1])
        ax.annotate(row[0], (row[4], row[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("measured compression ratio (dense bytes / bytes sent), log scale")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{task}: final {metric_name} vs. compression ratio")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    ratio_png = out_dir / f"accuracy_{task}_ratio.png"
    fig.savefig(ratio_png, dpi=110)
    plt.close(fig)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for m, recs in records.items():
        rec = recs[0]  # the first seed's curve
        label = LABELS.get(m, m)
        steps = [c[0] for c in rec["curve"]]
        top.plot(steps, [c[1] * scale for c in rec["curve"]], marker=".", label=label)
        losses, width = rec["losses"], max(1, len(rec["losses"]) // 50)
        smooth = [
            sum(losses[i : i + width]) / len(losses[i : i + width])
            for i in range(0, len(losses), width)
        ]
        bottom.plot([i + width for i in range(0, len(losses), width)], smooth, label=label)
    top.set_ylabel(ylabel)
    top.set_title(f"{task}: training curves (test metric on the curve subset; last point: full)")
    bottom.set_ylabel("training loss (rank 0, smoothed)")
    bottom.set_xlabel("step")
    bottom.set_yscale("log")
    top.legend(fontsize=7)
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    curves_png = out_dir / f"accuracy_{task}_curves.png"
    fig.savefig(curves_png, dpi=110)
    plt.close(fig)
    return [ratio_png, curves_png]
