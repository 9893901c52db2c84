"""One rank of tests/allreduce/test_strategies_horovod.py.

Run as ``horovodrun --gloo -np P python this OUT``. The rank runs the batteries of the gloo
tests (``test_strategies.battery``, ``test_sparse.battery``, ``test_fusion.fusion_battery``
and its SFB factor path, ranks that disagree on a bucket) on a
:class:`~gradzip.allreduce.horovod.HorovodBackend` instead of gloo, and saves what they
return to ``OUT/rank{r}.pt``; the test compares that with the single-process references,
exactly as the gloo tests do.

Each section gets its own backend (its own collective-name prefix) and starts with a
barrier, so a section that fails on one rank costs the others one timeout (30 s) and leaves
the later sections unaffected.
A failure is recorded with its traceback under ``errors`` instead of ending the job, so the
test names the section that broke.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import test_fusion
import test_sparse
import test_strategies
import torch

from gradzip.allreduce.backend import Backend
from gradzip.allreduce.horovod import HorovodBackend

__all__ = ["SECTIONS", "main"]

TIMEOUT_S = 30.0


def disagreeing(backend: Backend, what: str) -> dict[str, Any]:
    """``test_fusion.mismatch`` must raise on every rank, soon: its error type, message, time."""
    start = time.monotonic()
    try:
        test_fusion.mismatch(backend, what)
    except Exception as e:
        return {"kind": type(e).__name__, "message": str(e), "seconds": time.monotonic() - start}
    raise AssertionError(f"ranks disagreeing on the {what} of 'fc.weight' did not fail")


def fusion(backend: Backend) -> dict[str, Any]:
    """The 200-tensor fusion battery; its references are written for 4 ranks only."""
    return test_fusion.fusion_battery(backend) if backend.size == 4 else {}


SECTIONS: dict[str, Callable[[Backend], Any]] = {
    "strategies": test_strategies.battery,
    "sparse": test_sparse.battery,
    "fusion": fusion,
    "sfb": test_fusion._sfb,
    "mismatch_size": lambda b: disagreeing(b, "size"),
    "mismatch_compressor": lambda b: disagreeing(b, "compressor"),
}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    rank = size = -1
    for name, section in SECTIONS.items():
        backend = HorovodBackend(timeout=TIMEOUT_S, prefix=name)
        rank, size = backend.rank, backend.size
        # All ranks start the section together: one that is still waiting out a failed
        # collective of the last section must not make this one time out on the others.
        barrier = HorovodBackend(timeout=2 * TIMEOUT_S + 10, prefix=f"{name}.start")
        barrier.allreduce(torch.zeros(1)).wait()
        start = time.monotonic()
        try:
            results[name] = section(backend)
        except Exception:
            errors[name] = traceback.format_exc()
        seconds[name] = round(time.monotonic() - start, 3)
    record = {"rank": rank, "size": size, "results": results, "errors": errors}
    record["seconds"] = seconds
    torch.save(record, out / f"rank{rank}.tmp")
    os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.pt")  # whole file, or none
    # Every rank has written its file before any leaves (a failed section may have left a
    # collective pending, which Horovod's shutdown would wait for: skip it).
    HorovodBackend(timeout=TIMEOUT_S, prefix="done").allreduce(torch.zeros(1)).wait()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
