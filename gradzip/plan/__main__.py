"""``python -m gradzip.plan``: the predicted step of every compressor and strategy, as a table.

    python -m gradzip.plan --mlp 784,1024,1024,10 --world-size 4 --bandwidth 100mbit \\
        --latency 50us [--compute 40ms] [--rates measured] [--methods onebit topk ...]
    python -m gradzip.plan --module torchvision.models:resnet18 --world-size 8 64 1024 ...
    python -m gradzip.plan --layout layers.json ...   # [["name", [shape...]], ...]

Several world sizes give one table each (an extrapolation: the link and rates stay as
given). ``--rates measured`` times each compressor on this machine once (cached, see
:mod:`gradzip.plan.calibrate`); without it compression is taken as free, which flatters the
compressed rows on fast links.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from gradzip.plan.calibrate import cached_rates
from gradzip.plan.choose import DEFAULT_METHODS, Option, best, predict
from gradzip.plan.layout import Tensor, from_module
from gradzip.plan.model import Link, Rates

__all__ = ["main", "parse_bandwidth", "parse_seconds", "table"]

_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_BYTES = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1 << 20, "gib": 1 << 30}
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def parse_bandwidth(text: str) -> float:
    """Bytes per second from ``100mbit``, ``1gbit`` (bits, as ``tc`` writes them) or
    ``125MB`` / ``12.5mb/s`` (bytes); a bare number is bytes per second."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([a-z]*)(?:/s|ps)?\s*", text.lower())
    if m is None:
        raise ValueError(f"bandwidth {text!r}: expected e.g. 100mbit, 10gbit or 125MB/s")
    value, unit = float(m.group(1)), m.group(2)
    if unit in _BITS:
        value = value * _BITS[unit] / 8
    elif unit in _BYTES:
        value *= _BYTES[unit]
    elif unit:
        raise ValueError(f"bandwidth {text!r}: unknown unit {unit!r}")
    if not value > 0:
        raise ValueError(f"bandwidth {text!r}: must be > 0")
    return value


def parse_seconds(text: str) -> float:
    """Seconds from ``50us``, ``1.5ms``, ``2s`` (a bare number is seconds)."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([a-z]*)\s*", text.lower())
    if m is None or (m.group(2) and m.group(2) not in _SECONDS):
        raise ValueError(f"time {text!r}: expected e.g. 50us, 1.5ms or 2s")
    return float(m.group(1)) * _SECONDS.get(m.group(2) or "s", 1.0)


def _mlp(widths: str) -> list[Tensor]:
    sizes = [int(w) for w in widths.split(",")]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"--mlp {widths!r}: expected at least two widths >= 1, e.g. 784,1024,10")
    out = []
    for k, (a, b) in enumerate(itertools.pairwise(sizes)):
        out += [Tensor(f"layer{k}.weight", (b, a)), Tensor(f"layer{k}.bias", (b,))]
    return out


def _layout(args: argparse.Namespace) -> list[Tensor]:
    if args.mlp:
        return _mlp(args.mlp)
    if args.layout:
        rows = json.loads(Path(args.layout).read_text())
        return [Tensor(str(name), tuple(int(d) for d in shape)) for name, shape in rows]
    module_name, _, attr = args.module.partition(":")
    factory = getattr(importlib.import_module(module_name), attr or "model")
    model = factory() if callable(factory) else factory
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--module {args.module!r} did not give a torch.nn.Module")
    return from_module(model)


def table(options: Sequence[Option], world_size: int) -> str:
    """The options as a markdown table, the fastest marked."""
    top = best(options)
    lines = [
        f"world size {world_size}",
        "",
        "| compressor | strategy | step ms | comm ms | work ms | payload KB/rank | ratio "
        "| speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in options:
        mark = " **(fastest)**" if o is top else ""
        lines.append(
            f"| {o.spec}{mark} | {o.strategy} | {o.cost.step * 1e3:.2f} | "
            f"{o.cost.comm * 1e3:.2f} | {o.cost.work * 1e3:.2f} | "
            f"{o.cost.payload_bytes / 1e3:.1f} | {o.ratio:.1f} | {o.speedup:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradzip.plan", description=__doc__)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--mlp", help="widths of an MLP, e.g. 784,1024,1024,10")
    src.add_argument("--layout", help="JSON file of [name, shape] pairs")
    src.add_argument("--module", help="module:factory returning an nn.Module")
    parser.add_argument("--world-size", type=int, nargs="+", default=[4])
    parser.add_argument("--bandwidth", default="10gbit", help="link rate (100mbit, 10gbit)")
    parser.add_argument("--latency", default="50us", help="per message (50us, 1ms)")
    parser.add_argument("--compute", default="0", help="forward + backward per step (40ms)")
    parser.add_argument("--backward", default="0", help="backward part of --compute")
    parser.add_argument("--overlap", type=float, default=0.0,
                        help="fraction of backward that communication hides behind (0-1)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--rates", choices=("none", "measured"), default="none",
                        help="compression work: free (none) or measured here, cached")
    parser.add_argument("--device", default="cpu", help="where --rates measured runs")
    args = parser.parse_args(argv)
    try:
        tensors = _layout(args)
        link = Link.of(parse_bandwidth(args.bandwidth), parse_seconds(args.latency))
        compute, backward = parse_seconds(args.compute), parse_seconds(args.backward)
    except (ValueError, OSError, ImportError, AttributeError) as err:
        print(f"gradzip.plan: {err}", file=sys.stderr)
        return 2
    cache: dict[str, Rates] = {}

    def rates(spec: str) -> Rates:
        if args.rates == "none":
            return Rates()
        if spec not in cache:
            cache[spec] = cached_rates(spec, args.device)
        return cache[spec]

    params = sum(t.numel for t in tensors)
    print(
        f"{len(tensors)} tensors, {params:,} parameters; link {args.bandwidth}, latency "
        f"{args.latency}; compute {args.compute}, overlap {args.overlap}; compression work: "
        f"{'measured on ' + args.device if args.rates == 'measured' else 'free'}\n"
    )
    for p in args.world_size:
        options = predict(
            tensors, link, p, methods=args.methods, rates=rates, compute=compute,
            backward=backward, overlap=args.overlap,
        )
        print(table(options, p) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
