"""fp16/bf16 averages divide before they sum (as DDP and torch's fp16 hook): values near the
top of fp16's range average to themselves instead of overflowing, and an Inf on any rank still
reaches every rank as an Inf. On 2 and 4 gloo ranks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import run_ranks

import gradzip
from gradzip.allreduce.backend import Backend
from gradzip.allreduce.dense import AllreduceStrategy
from gradzip.allreduce.entry import Entry


def _reduce(backend: Backend, spec: str, values: list[float]) -> torch.Tensor:
    c = gradzip.compressor(spec)
    t = torch.tensor(values, dtype=torch.float32)
    (red,) = AllreduceStrategy(average=True).start(backend, c, [Entry("g", t)]).wait()
    return red.reduced


def _cases(backend: Backend) -> dict[str, Any]:
    r, p = backend.rank, backend.size
    sign = 1.0 if r % 2 == 0 else -1.0
    out: dict[str, Any] = {}
    for spec in ("fp16", "bf16"):
        out[spec] = {
            "same": _reduce(backend, spec, [40000.0, -40000.0, 65000.0]),
            "mixed": _reduce(backend, spec, [sign * 40000.0, 16000.0 * (r + 1)]),
            "inf": _reduce(backend, spec, [float("inf") if r == p - 1 else 1.0, 2.0]),
        }
    return out


@pytest.mark.parametrize("ranks", [2, 4])
def test_half_casts_average_without_overflow_and_carry_inf(ranks: int) -> None:
    runs = run_ranks(_cases, ranks)
    for r in runs:
        for spec, rtol in (("fp16", 2e-3), ("bf16", 2e-2)):  # a few roundings of the wire dtype
            got = r[spec]
            # every rank at 40000 (or 65000): the mean is the value itself, finite
            assert torch.isfinite(got["same"]).all(), (spec, got["same"])
            torch.testing.assert_close(
                got["same"], torch.tensor([40000.0, -40000.0, 65000.0]), rtol=rtol, atol=0
            )
            # +-40000 alternating, and 16000 * (rank + 1) (sums beyond 65504 before the division)
            want = torch.tensor([0.0, 16000.0 * (ranks + 1) / 2])
            torch.testing.assert_close(got["mixed"], want, rtol=rtol, atol=0)
            # an Inf on the last rank arrives as +Inf everywhere; the other element is exact
            assert got["inf"][0].item() == float("inf") and got["inf"][1].item() == 2.0
            assert torch.equal(got["mixed"], runs[0][spec]["mixed"])  # replicas identical
