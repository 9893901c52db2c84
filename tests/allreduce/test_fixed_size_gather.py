"""A gather of payloads whose size follows from the bucket layout needs no size exchange.

Every rank packs the same layout (the optimizer compares plans, the DDP hook bucket layouts),
so for 1-bit, QSGD (fixed-width codes), TernGrad and exact top-k the allgather strategy hands
the backend ``same_size=True``: one collective per bucket instead of a blocking allgather of
the sizes and then the data. The result must be what the exchanged path gives, bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import run_ranks

import gradzip
from benchmarks.gather_sizes import Exchanging
from gradzip.allreduce.backend import Backend
from gradzip.allreduce.entry import Entry
from gradzip.allreduce.select import strategy_for

FIXED = ("onebit", "qsgd:levels=7", "terngrad", "topk:ratio=0.05,selection=exact")
VARIABLE = ("qsgd:levels=7,elias=True", "topk:ratio=0.05,selection=sampled", "dgc:ratio=0.05")


def _entries(rank: int) -> list[Entry]:
    g = torch.Generator().manual_seed(rank)
    return [Entry(f"t{i}", torch.randn(n, generator=g)) for i, n in enumerate((300, 1, 0, 77))]


def _gather(backend: Backend, spec: str, exchange: bool) -> tuple[list[torch.Tensor], int]:
    c = gradzip.compressor(spec)
    if exchange:  # the path with the size exchange, for comparison
        c = Exchanging(c)
    strategy = strategy_for(c, gather="allgather", sparse="allgather")
    backend.stats.reset()
    entries = _entries(backend.rank)
    if spec.startswith("dgc"):
        memory = c.make_memory()
        entries = [Entry(e.key, memory.compensate(e.key, e.tensor)) for e in entries]
    out = strategy.start(backend, c, entries, seed=1, step=0).wait()
    return [r.reduced for r in out], backend.stats.by_kind["allgather"].calls


def _all(backend: Backend) -> dict[str, Any]:
    out = {}
    for spec in FIXED + VARIABLE:
        fast, fast_calls = _gather(backend, spec, exchange=False)
        slow, slow_calls = _gather(backend, spec, exchange=True)
        out[spec] = {
            "same": all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True)),
            "calls": (fast_calls, slow_calls),
            "fixed": gradzip.compressor(spec).fixed_payload(),
        }
    return out


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return run_ranks(_all, 3, timeout_s=120)


@pytest.mark.parametrize("spec", FIXED + VARIABLE)
def test_fixed_payloads_skip_the_size_exchange_and_give_the_same_sums(
    runs: list[dict[str, Any]], spec: str
) -> None:
    for r in runs:
        got = r[spec]
        assert got["same"], spec
        assert got["fixed"] is (spec in FIXED)
        # gloo: the size exchange is an allgather of its own
        assert got["calls"] == ((1, 2) if spec in FIXED else (2, 2)), got["calls"]
