"""The cost model extrapolated: which compressor and strategy win from 2 to 1024 ranks, per link.

``python -m benchmarks.plan_extrapolate`` costs every compressor and strategy of
:func:`gradzip.plan.predict` on the models of the benchmarks (the small CNN, the MLP and the
wide MLP) for links of 100 Mbit/s to 100 Gbit/s and world sizes 2 to 1024, with each
compressor's work measured on this machine (one thread, cached: :mod:`gradzip.plan.calibrate`),
and writes ``benchmarks/results/plan_extrapolation.md``.

The assumptions, stated in the result too: every rank has a link of the same bandwidth and
latency to a non-blocking switch (no contention in the network's core, no congestion); the
engine runs the cheapest of ring, halving-doubling and tree for a dense allreduce; the work of
compression and decompression runs at this CPU's measured rate on every rank and does not
overlap communication; compute is left out (the table compares communication plus
compression, the part the choice changes); payload sizes are measured on the models' real
layouts (small tensors dense, buckets of 4 MiB).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.models import MLP, SmallCNN
from benchmarks.report import machine_line
from gradzip.plan import Link, Rates, best, from_module, predict
from gradzip.plan.calibrate import cached_rates

__all__ = ["LINKS", "MODELS", "main", "render"]

ROOT = Path(__file__).resolve().parents[1]
LINKS = {"100 Mbit/s": 12.5e6, "1 Gbit/s": 1.25e8, "10 Gbit/s": 1.25e9, "100 Gbit/s": 1.25e10}
WORLDS = (2, 4, 16, 64, 256, 1024)
METHODS = ("none", "fp16", "onebit", "qsgd", "terngrad", "topk", "dgc")
LATENCY = 50e-6


def MODELS() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "small CNN (105k)": SmallCNN((1, 28, 28), 10),
        "MLP (1.9M)": MLP(784, hidden=(1024, 1024), num_classes=10),
        "wide MLP (5.8M)": MLP(784, hidden=(2048, 2048), num_classes=10),
    }


def render(worlds: Sequence[int], methods: Sequence[str], latency: float) -> str:
    rates = {m: cached_rates(m) for m in methods}

    def rate(spec: str) -> Rates:
        return rates[spec] if spec in rates else cached_rates(spec)

    lines = [
        "# The cost model extrapolated to 1024 ranks",
        "",
        "Command: `python -m benchmarks.plan_extrapolate`. Compression work measured on: "
        f"{machine_line()}, one thread (`gradzip.plan.calibrate.cached_rates`).",
        "",
        "Assumptions: every rank has a link of the bandwidth given and "
        f"{latency * 1e6:.0f} us latency to a non-blocking switch (no contention in the core); "
        "a dense allreduce runs the cheapest of ring, halving-doubling and tree; "
        "compression and decompression run at the measured CPU rate on every rank, not "
        "overlapped with communication; compute is left out (each figure is communication "
        "plus compression per step, the part the choice changes); payloads measured on each "
        "model's layout (tensors under 1024 elements dense, 4 MiB buckets). Each cell: the "
        "fastest choice, its predicted milliseconds, and its speedup over a dense allreduce "
        "(`none`); `dense` where nothing beats it.",
        "",
    ]
    for model_name, model in MODELS().items():
        tensors = from_module(model)
        lines += [f"## {model_name}", "",
                  "| link | " + " | ".join(f"P = {p}" for p in worlds) + " |",
                  "|---|" + "---|" * len(worlds)]
        for link_name, bandwidth in LINKS.items():
            link = Link.of(bandwidth, latency)
            cells = []
            for p in worlds:
                options = predict(tensors, link, p, methods=methods, rates=rate)
                top = best(options)
                if top.spec == "none":
                    cells.append(f"dense {top.cost.step * 1e3:.3g} ms")
                else:
                    cells.append(f"{top.spec} ({top.strategy}) {top.cost.step * 1e3:.3g} ms, "
                                 f"{top.speedup:.2g}x")
            lines.append(f"| {link_name} | " + " | ".join(cells) + " |")
        lines.append("")
        # where the allgather's P-fold growth loses to the two-phase strategy (1-bit)
        link = Link.of(LINKS["1 Gbit/s"], latency)
        row = []
        for p in worlds:
            opts = {o.strategy: o for o in predict(tensors, link, p, methods=["onebit"],
                                                   rates=rate)}
            row.append(f"{opts['allgather'].cost.step * 1e3:.3g} / "
                       f"{opts['scatter_gather'].cost.step * 1e3:.3g}")
        lines += ["1-bit at 1 Gbit/s, ms per step, allgather / scatter-gather: "
                  + ", ".join(f"P={p}: {c}" for p, c in zip(worlds, row, strict=True)), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "plan_extrapolation.md")
    parser.add_argument("--latency", type=float, default=LATENCY, help="seconds per message")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text = render(WORLDS, METHODS, args.latency)
    print(text)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
