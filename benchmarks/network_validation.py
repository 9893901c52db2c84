"""The cost model against measured steps: one table from several runs of ``benchmarks.network``.

``python -m benchmarks.network_validation DIR [DIR ...] --out FILE.md`` reads the
``network*.csv`` and ``network*.md`` each run wrote into its ``--out`` folder (one run per
world size, link and model) and lays out, per run and method, the measured step, the step
``gradzip.plan.predict_pipeline`` predicted in the same run, and the error; then, per run,
whether ``compression="auto"`` came within 10% of the best fixed gradzip choice of the run and
was not slower than dense. Nothing is measured here: every figure comes from the runs' files.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

__all__ = ["load", "main", "render"]


def load(folder: Path) -> dict[str, object]:
    """One run: its command (model, workers, rate) and its rows by method."""
    md = next(folder.glob("network*.md"))
    text = md.read_text()
    command = re.search(r"Command: `([^`]*)`", text)
    rows = list(csv.DictReader(next(folder.glob("network*.csv")).open()))
    return {"name": folder.name, "command": command.group(1) if command else "?",
            "rows": {r["method"]: r for r in rows}}


def _num(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def render(runs: list[dict[str, object]]) -> str:
    lines = [
        "# The cost model against measured steps",
        "",
        "Each run: `python -m benchmarks.network` with the command shown (4 CPU-bound workers "
        "or fewer on a 2-core machine, gloo in network namespaces behind `tc tbf`). "
        "predicted: `gradzip.plan.predict_pipeline` of the method's own optimizer from the "
        "link, compute and compressor work measured in the same run. Compiled by "
        "`python -m benchmarks.network_validation` from the runs' files.",
        "",
        "| run | method | measured ms | predicted ms | error % |",
        "|---|---|---|---|---|",
    ]
    summary = ["", "| run | best fixed gradzip choice | its ms | auto ms | auto / best | "
               "auto / none | auto within 10%, not slower than dense |",
               "|---|---|---|---|---|---|---|"]
    errors: list[float] = []
    for run in runs:
        rows = run["rows"]
        assert isinstance(rows, dict)
        cmd = re.sub(r" --out \S+", "", str(run["command"]))
        label = f"{run['name']} (`{cmd.replace('python -m benchmarks.network ', '')}`)"
        for method, r in rows.items():
            err = _num(r.get("model error %", ""))
            pred = _num(r.get("predicted ms", ""))
            if err is not None:
                errors.append(abs(err))
            lines.append(f"| {label} | {method} | {float(r['step ms']):.1f} | "
                         f"{'n/a' if pred is None else f'{pred:.1f}'} | "
                         f"{'n/a' if err is None else f'{err:+.1f}'} |")
        fixed = {m: float(r["step ms"]) for m, r in rows.items()
                 if m != "auto" and not m.startswith("ddp")}  # gradzip's own fixed choices
        if "auto" in rows and fixed:
            best = min(fixed, key=lambda m: fixed[m])
            auto = float(rows["auto"]["step ms"])
            ok = auto <= 1.1 * fixed[best] and auto <= fixed.get("none", float("inf"))
            summary.append(
                f"| {run['name']} | {best} | {fixed[best]:.1f} | {auto:.1f} | "
                f"{auto / fixed[best]:.2f} | {auto / fixed.get('none', float('nan')):.2f} | "
                f"{'yes' if ok else 'no'} |"
            )
    within = sum(e <= 15 for e in errors)
    lines += ["", f"{within} of {len(errors)} predictions within 15% of the measured step "
              f"(median error {sorted(errors)[len(errors) // 2]:.1f}%)." if errors else ""]
    return "\n".join(lines + summary) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="folders of network runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    text = render([load(d) for d in args.runs])
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
