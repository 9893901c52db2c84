"""The fault table: every fault the tests inject, what the surviving ranks saw, how fast.

Runs the fault scenarios of the test suite (``tests/hooks/test_dead_peer.py``,
``test_launchers_faults.py``, ``test_disagree.py``) once more, measuring each, and writes
``faults.md`` under ``--out``: the fault, where, the outcome (the exception the survivors raised
and the start of its message) and the seconds from the fault to the error (a kill: from the
victim's death; a disagreement: from the start of the job, process start-up included)::

    python -m benchmarks.faults --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "hooks"), str(ROOT / "tests" / "allreduce")]

__all__ = ["main"]


def _short(message: str, n: int = 150) -> str:
    text = " ".join(message.split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 3] + "..."


def _dead_peers() -> list[dict[str, Any]]:
    import test_dead_peer as dead
    from fault_points import WHERE

    rows = []
    for hook in (False, True):
        for where in WHERE if not hook else ("backward", "between"):
            errs = dead.survivors(where, "onebit", hook)
            worst = max(e["after"] for e in errs)
            kinds = sorted({e["kind"] or "no error" for e in errs})
            rows.append({
                "fault": f"rank 2 of 3 SIGKILLed {where}",
                "where": "DDP hook (onebit)" if hook else "optimizer (onebit)",
                "outcome": f"{'/'.join(kinds)} on both survivors: {_short(errs[0]['message'])}",
                "seconds": f"{worst:.2f}",
            })  # fmt: skip
    return rows


def _launchers() -> list[dict[str, Any]]:
    import test_launchers_faults as lf

    rows = []
    for launcher, where in (("torch", "backward"), ("torch", "collective"), ("horovod", "between")):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            rc, took = lf._launch(launcher, out, "--kill", where)
            survivor = json.loads((out / "rank0-attempt0.json").read_text())
            killed = float((out / "killed").read_text())
        rows.append({
            "fault": f"rank 1 of 2 SIGKILLed {where}",
            "where": f"{launcher}run job, optimizer (onebit)",
            "outcome": f"{survivor['kind']} on rank 0, job exit {rc} after {took:.1f} s: "
            f"{_short(survivor.get('message', ''))}",
            "seconds": f"{survivor['at'] - killed:.2f}",
        })  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        args = ("--compression", "onebit", "--checkpoint-every", "2")
        lf._launch("torch", out / "plain", *args)
        start = time.monotonic()
        rc, _ = lf._launch("torch", out / "crash", *args, "--kill", "between", restarts=1)
        took = time.monotonic() - start
        same = all(
            json.loads((out / "crash" / f"rank{r}-attempt1.json").read_text())["params"]
            == json.loads((out / "plain" / f"rank{r}-attempt0.json").read_text())["params"]
            for r in (0, 1)
        )
    rows.append({
        "fault": "rank 1 SIGKILLed between checkpoints (every 2 steps)",
        "where": "torchrun --max-restarts 1, optimizer (onebit)",
        "outcome": f"job exit {rc}; restarted from step 2; final parameters equal to an "
        f"uninterrupted run: {same}",
        "seconds": f"{took:.1f} (whole job)",
    })  # fmt: skip
    return rows


def _disagreements() -> list[dict[str, Any]]:
    import test_disagree as dis
    from dist_utils import run_ranks

    rows = []
    for where, fn, cases in (
        ("optimizer", dis._optimizer, dis.OPT_CASES),
        ("DDP hook", dis._hook, dis.HOOK_CASES),
    ):
        for case in cases:
            start = time.monotonic()
            errors = run_ranks(fn, 2, case, expect_errors=True, pg_timeout_s=20, timeout_s=60)
            took = time.monotonic() - start
            kinds = sorted({getattr(e, "kind", "no error") for e in errors})
            rows.append({
                "fault": f"rank 1 differs: {case}",
                "where": where,
                "outcome": f"{'/'.join(kinds)} on both ranks: {_short(errors[1].message, 120)}",
                "seconds": f"{took:.2f} (job)",
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.monotonic()
    rows = _dead_peers() + _launchers() + _disagreements()
    lines = [
        "Faults injected on purpose, and what gradzip did (gloo, CPU; timeouts 15-20 s). "
        f"Command: `python -m benchmarks.faults`; {time.monotonic() - start:.0f} s. Machine: "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.",
        "",
        "Seconds: from the victim's death to the survivor's error (kills), or the whole 2-rank "
        "job including process start-up (disagreements; the error comes at the first step).",
        "",
        "| fault | where | outcome | seconds |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['fault']} | {r['where']} | {r['outcome']} | {r['seconds']} |" for r in rows]
    lines += [
        "",
        "Also covered by the tests, not timed here: a checkpoint of another rank, world size, "
        "compressor or parameter set raises before anything loads "
        "(`tests/hooks/test_optimizer_local.py`); fuzzed spec strings, option values, odd and "
        "unsupported tensors and mutated payloads raise a ValueError naming what was wrong "
        "(`tests/compress/test_fuzz_bad_input.py`); a peer that never joins times out "
        "(`tests/allreduce/test_fusion.py`).",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
