"""One rank of tests/allreduce/test_horovod.py; run as ``horovodrun --gloo -np P python this OUT``.

Each rank builds every rank's inputs from seeded generators, so the expected result of each
collective is computed locally, without communication, and compared exactly (inputs are
small integers, so float sums have no rounding). The byte counters of a fixed sequence of
collectives are written to ``OUT/rank{r}.json`` for the test to check.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from gradzip.allreduce.backend import ReduceOp
from gradzip.allreduce.horovod import HorovodBackend


def ints(rank: int, n: int, dtype: torch.dtype, *, salt: int = 0, high: int = 50) -> torch.Tensor:
    """Rank ``rank``'s input: ``n`` small integers (exact in every dtype used) as ``dtype``."""
    g = torch.Generator().manual_seed(1000 * salt + rank)
    return torch.randint(0, high, (n,), generator=g).to(dtype)


def check_allreduce(b: HorovodBackend) -> None:
    p, r = b.size, b.rank
    for salt, dtype in enumerate(
        [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int64]
    ):
        x = ints(r, 1001, dtype, salt=salt, high=3 if dtype == torch.uint8 else 50)
        want = torch.stack(
            [
                ints(q, 1001, torch.int64, salt=salt, high=3 if dtype == torch.uint8 else 50)
                for q in range(p)
            ]
        )
        out = b.allreduce(x).wait()
        assert out.dtype == dtype, (dtype, out.dtype)
        assert torch.equal(out.to(torch.int64), want.sum(0)), f"allreduce sum {dtype}"
        assert out.data_ptr() == x.data_ptr(), f"allreduce {dtype} not written into its input"
    for dtype in [torch.int32, torch.int64, torch.float32]:
        for op, fn in [(ReduceOp.MAX, torch.amax), (ReduceOp.MIN, torch.amin)]:
            x = ints(r, 37, dtype, salt=9)
            want = fn(torch.stack([ints(q, 37, dtype, salt=9) for q in range(p)]), dim=0)
            assert torch.equal(b.allreduce(x, op).wait(), want), f"allreduce {op} {dtype}"
    # a non-contiguous input is reduced too, and the result lands in it
    base = ints(r, 24, torch.float32, salt=11).view(4, 6)
    x = base.t()
    want = sum(ints(q, 24, torch.float32, salt=11).view(4, 6).t() for q in range(p))
    out = b.allreduce(x).wait()
    assert out is x and torch.equal(x, want), "allreduce of a transposed tensor"


def check_allgather(b: HorovodBackend) -> None:
    p, r = b.size, b.rank

    def size(q: int) -> int:
        return 0 if q == 1 else 3 * q + 5  # rank 1 sends nothing

    for salt, dtype in enumerate([torch.float32, torch.uint8, torch.bfloat16, torch.bool]):
        x = ints(r, size(r), torch.int64, salt=salt, high=2).to(dtype)
        got = b.allgather(x).wait()
        assert len(got) == p, f"allgather {dtype}: {len(got)} parts for {p} ranks"
        for q, part in enumerate(got):
            want = ints(q, size(q), torch.int64, salt=salt, high=2).to(dtype)
            assert part.dtype == dtype and torch.equal(part, want), f"allgather {dtype} from {q}"
    # same_size: one collective, no size exchange; empty tensors too
    for n, dtype in ((7, torch.float32), (9, torch.uint8), (0, torch.float32)):
        calls = b.stats.by_kind["allgather"].calls
        got = b.allgather(ints(r, n, torch.int64, salt=9, high=2).to(dtype), same_size=True).wait()
        assert b.stats.by_kind["allgather"].calls == calls + 1, "same_size: one allgather"
        for q, part in enumerate(got):
            want = ints(q, n, torch.int64, salt=9, high=2).to(dtype)
            assert part.dtype == dtype and torch.equal(part, want), f"same_size {n} from {q}"


def chunk(src: int, dst: int, dtype: torch.dtype) -> torch.Tensor:
    """What rank ``src`` sends rank ``dst`` in the alltoall check (sizes differ, some are 0)."""
    n = (2 * src + 3 * dst) % 5
    return (100 * src + 10 * dst + torch.arange(n)).to(dtype)


def check_alltoall(b: HorovodBackend) -> None:
    p, r = b.size, b.rank
    for dtype in [torch.float32, torch.int16, torch.bfloat16]:
        got = b.alltoall([chunk(r, j, dtype) for j in range(p)]).wait()
        assert len(got) == p
        for i, part in enumerate(got):
            assert part.dtype == dtype and torch.equal(part, chunk(i, r, dtype)), (dtype, i)


def check_broadcast(b: HorovodBackend) -> None:
    p, r = b.size, b.rank
    for root in {0, p - 1}:
        for dtype in [torch.float32, torch.bfloat16, torch.uint8]:
            x = ints(r, 50, dtype, salt=root).view(5, 10)
            out = b.broadcast(x, root).wait()
            assert out is x and torch.equal(x, ints(root, 50, dtype, salt=root).view(5, 10))


def check_bad_input(b: HorovodBackend) -> None:
    """Misuse is a ValueError naming the collective and the bad value, before any traffic."""
    p = b.size
    cases = [
        (lambda: b.allreduce(torch.zeros(2, dtype=torch.complex64)), "complex64"),
        (lambda: b.allgather(torch.zeros(2, 2)), r"shape \(2, 2\)"),
        (lambda: b.alltoall([torch.zeros(1)] * (p + 1)), f"one tensor per rank \\({p}\\)"),
        (
            lambda: b.alltoall([torch.zeros(1)] * (p - 1) + [torch.zeros(1, dtype=torch.int32)]),
            "one dtype",
        ),
        (lambda: b.broadcast(torch.zeros(1), p), f"root {p}"),
    ]
    calls = b.stats.collectives
    for fn, pattern in cases:
        try:
            fn()
        except ValueError as e:
            assert re.search(pattern, str(e)), (pattern, str(e))
        else:
            raise AssertionError(f"no ValueError for {pattern}")
    assert b.stats.collectives == calls, "a rejected call was counted"


def check_overlap(b: HorovodBackend) -> None:
    """Four collectives in flight at once, waited in reverse order."""
    p, r = b.size, b.rank
    works = [
        b.allreduce(torch.full((10,), float(r))),
        b.allgather(torch.full((r + 1,), r, dtype=torch.int32)),
        b.alltoall([chunk(r, j, torch.float32) for j in range(p)]),
        b.broadcast(torch.full((3,), float(r)), 0),
    ]
    bc, a2a, ag, ar = (w.wait() for w in reversed(works))
    assert torch.equal(ar, torch.full((10,), float(sum(range(p)))))
    assert [t.tolist() for t in ag] == [[q] * (q + 1) for q in range(p)]
    assert all(torch.equal(t, chunk(i, r, torch.float32)) for i, t in enumerate(a2a))
    assert torch.equal(bc, torch.zeros(3))


def counted_sequence(b: HorovodBackend) -> dict[str, dict[str, int]]:
    """One collective of each kind on fresh counters; the test checks the counts."""
    p, r = b.size, b.rank
    b.stats.reset()
    b.allreduce(torch.zeros(1000)).wait()  # 4000 bytes
    b.allgather(torch.zeros(100 * (r + 1), dtype=torch.uint8)).wait()
    b.alltoall([torch.zeros(j + 1, dtype=torch.float64) for j in range(p)]).wait()
    b.broadcast(torch.zeros(250, dtype=torch.int32), 0).wait()  # 1000 bytes
    return b.stats.snapshot()


def check_mismatch(b: HorovodBackend) -> str:
    """Ranks passing different sizes to one allreduce get an error, not a hang."""
    try:
        b.allreduce(torch.zeros(3 + b.rank)).wait()
    except Exception as e:  # Horovod raises HorovodInternalError
        return f"{type(e).__name__}: {e}"
    raise AssertionError("allreduce of different sizes on different ranks did not fail")


def check_timeout() -> str:
    """Rank 0 calls a collective no other rank calls: it times out instead of hanging."""
    lonely = HorovodBackend(timeout=1.0, prefix="lonely")
    try:
        lonely.allreduce(torch.zeros(4)).wait()
    except TimeoutError as e:
        return str(e)
    raise AssertionError("an allreduce that no peer joined returned")


def main(out: Path) -> None:
    b = HorovodBackend(timeout=60.0)
    check_allreduce(b)
    check_allgather(b)
    check_alltoall(b)
    check_broadcast(b)
    check_bad_input(b)
    check_overlap(b)
    result = {"rank": b.rank, "size": b.size, "stats": counted_sequence(b)}
    result["mismatch"] = check_mismatch(b)
    if b.rank == 0:
        result["timeout"] = check_timeout()
    (out / f"rank{b.rank}.json").write_text(json.dumps(result))
    # The other ranks stay alive until rank 0's lonely collective has timed out: had they
    # exited, Horovod could fail it early with a shutdown error instead.
    deadline = time.monotonic() + 30
    while not (out / "rank0.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.stdout.flush()
    # Rank 0 left a collective pending on purpose; skip Horovod's shutdown, which would wait.
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
