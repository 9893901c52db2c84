"""Fusion (few collectives for many tensors), wire format, consistency checks, timeouts, SFB."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import torch
from dist_utils import RankError, run_ranks
from helpers import Sign, rank_grads

import gradzip
from gradzip.allreduce.backend import Backend, LocalBackend, wire_bytes
from gradzip.allreduce.entry import Entry, Reduced
from gradzip.allreduce.fusion import Reducer, plan_buckets
from gradzip.allreduce.select import strategy_for
from gradzip.allreduce.wire import pack, unpack
from gradzip.compress.base import CompressionError, Payload

MODEL = {f"layer{i}.{'weight' if i % 2 else 'bias'}": (3 + i % 17, 4) for i in range(200)}


def _reduce(
    backend: Backend, c: Any, how: str = "allgather", **kw: Any
) -> tuple[dict[str, Reduced], int]:
    grads = rank_grads(backend.rank, MODEL)
    strategy = strategy_for(c, gather=how, sparse=how) if how != "allreduce" else strategy_for(c)
    backend.stats.reset()
    out = Reducer(backend, c, strategy, **kw).start([Entry(k, g) for k, g in grads.items()]).wait()
    return out, backend.stats.collectives


def fusion_battery(backend: Backend) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, c, how in [
        ("none", gradzip.compressor("none"), "allreduce"),
        ("fp16", gradzip.compressor("fp16"), "allreduce"),
        ("sign", Sign(), "allgather"),
        ("topk", gradzip.compressor("topk", ratio=0.1), "allgather"),
        ("topk_rd", gradzip.compressor("topk", ratio=0.1), "recursive"),
    ]:
        result, count = _reduce(backend, c, how)
        out[name] = ({k: r.reduced for k, r in result.items()}, count)
    _, out["unfused"] = _reduce(backend, gradzip.compressor("none"), "allreduce", fusion_bytes=1)
    out["sfb"] = _sfb(backend)
    return out


def _sfb(backend: Backend) -> torch.Tensor:
    """Factors of a Linear layer, batch size differing per rank, allgathered and rebuilt."""
    sfb = gradzip.compressor("sfb")
    gen = torch.Generator().manual_seed(backend.rank)
    x = torch.randint(-3, 4, (2 + backend.rank, 6), generator=gen).float()
    dy = torch.randint(-3, 4, (2 + backend.rank, 5), generator=gen).float()
    payload, ctx = sfb.compress_factors(x, dy)
    out = Reducer(backend, sfb).start([Entry("fc.weight", payload=payload, ctx=ctx)]).wait()
    return out["fc.weight"].reduced


@pytest.fixture(scope="module")
def fused() -> list[dict[str, Any]]:
    return run_ranks(fusion_battery, 4)


def test_200_tensors_take_a_handful_of_collectives(fused: Any) -> None:
    """Each bucket: one fingerprint allreduce + its data collective(s); 200 tensors fit one."""
    for rank in fused:
        assert rank["none"][1] <= 3 and rank["fp16"][1] <= 3
        assert rank["sign"][1] <= 4  # fingerprint + size exchange + data
        assert rank["topk"][1] <= 4
        assert rank["unfused"] >= 400  # what it costs without fusion


def test_fused_results_equal_per_tensor_reference(fused: Any) -> None:
    grads = [rank_grads(r, MODEL) for r in range(4)]
    for key in MODEL:
        mean = sum(g[key] for g in grads) / 4
        assert torch.equal(fused[0]["none"][0][key], mean)
        assert torch.equal(fused[3]["none"][0][key], mean)
        torch.testing.assert_close(fused[0]["fp16"][0][key], mean, rtol=1e-2, atol=1e-2)
        assert torch.equal(fused[0]["topk"][0][key], fused[0]["topk_rd"][0][key])
        assert torch.equal(fused[1]["sign"][0][key], fused[2]["sign"][0][key])


def test_sfb_factors_rebuild_the_summed_gradient(fused: Any) -> None:
    expect = torch.zeros(5, 6)
    for r in range(4):
        gen = torch.Generator().manual_seed(r)
        x = torch.randint(-3, 4, (2 + r, 6), generator=gen).float()
        dy = torch.randint(-3, 4, (2 + r, 5), generator=gen).float()
        expect += dy.t() @ x
    for rank in fused:
        assert torch.equal(rank["sfb"], expect / 4)


def mismatch(backend: Backend, what: str) -> None:
    r = backend.rank
    if what == "size":
        grads = {"fc.weight": torch.ones(10 + (r == 1) * 2), "fc.bias": torch.ones(3)}
        c: Any = Sign()
    else:
        grads = {"fc.weight": torch.ones(10)}
        c = Sign() if r == 0 else gradzip.compressor("fp16")
    # the allgather named: the message shows each rank's strategy and compressor
    strategy = strategy_for(c, gather="allgather")
    Reducer(backend, c, strategy).start([Entry(k, g) for k, g in grads.items()]).wait()


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("size", r"'fc\.weight' with numel=10 .*'fc\.weight' with numel=12"),
        ("compressor", r"fc\.weight.*allgather test_sign.*allreduce fp16"),
    ],
)
def test_disagreeing_ranks_fail_naming_key_and_values(what: str, pattern: str) -> None:
    start = time.monotonic()
    errors = run_ranks(mismatch, 3, what, expect_errors=True, pg_timeout_s=20)
    assert time.monotonic() - start < 15  # an error, not a wait for the timeout
    for e in errors:
        assert isinstance(e, RankError) and e.kind == "CompressionError", e
    assert any(re.search(pattern, e.message) for e in errors), [e.message for e in errors]


def missing_peer(backend: Backend) -> float:
    if backend.rank == 1:
        time.sleep(4)  # alive, but never joins the collective
        return 0.0
    start = time.monotonic()
    backend.allreduce(torch.ones(3)).wait()
    return time.monotonic() - start


def test_a_missing_peer_times_out_instead_of_hanging() -> None:
    start = time.monotonic()
    got = run_ranks(missing_peer, 2, pg_timeout_s=2, expect_errors=True, timeout_s=30)
    assert isinstance(got[0], RankError), got
    assert time.monotonic() - start < 25


def test_pack_unpack_round_trip_with_odd_sizes() -> None:
    payloads = [
        Payload((torch.arange(3, dtype=torch.uint8), torch.tensor([1.5]))),  # misaligned fp32
        Payload((torch.empty(0, dtype=torch.int32), torch.empty(0))),
        Payload((torch.arange(5, dtype=torch.int32), torch.arange(5, dtype=torch.float16))),
    ]
    buf = pack(payloads)
    assert buf.dtype == torch.uint8 and buf.numel() == 4 * 7 + sum(p.nbytes for p in payloads)
    back = unpack(buf, payloads)
    for a, b in zip(payloads, back, strict=True):
        assert a.layout() == b.layout()
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(
        CompressionError, match="6 payload parts for a bucket whose payloads have 2"
    ):
        unpack(buf, payloads[:1], source="rank 3")
    with pytest.raises(CompressionError, match="describes"):
        unpack(torch.cat([buf, torch.zeros(1, dtype=torch.uint8)]), payloads)


def test_plan_buckets() -> None:
    assert plan_buckets([4, 4, 4, 10, 1], 8) == [[0, 1], [2], [3], [4]]
    assert plan_buckets([], 8) == []
    with pytest.raises(ValueError, match="fusion_bytes=0"):
        plan_buckets([1], 0)


def test_local_backend_reduces_to_decompress() -> None:
    b = LocalBackend()
    g = torch.randn(40)
    out = Reducer(b, Sign()).start([Entry("g", g)]).wait()["g"]
    p, ctx = Sign().compress(g, seed=gradzip.derive_seed(0, 0, "g", 0))
    assert torch.equal(out.reduced, Sign().decompress(p, ctx))
    assert out.local is not None and torch.equal(out.local, out.reduced)
    with pytest.raises(ValueError, match="repeated"):
        Reducer(b, Sign()).start([Entry("g", g), Entry("g", g)])
    with pytest.raises(CompressionError, match="strategy 'allreduce' reduces SUM"):
        strategy_for(gradzip.compressor("none")).start(b, Sign(), [Entry("g", g)])


def test_wire_bytes_model() -> None:
    assert wire_bytes("allreduce", 400, 4) == 600
    assert wire_bytes("allgather", 100, 4) == 300
    assert wire_bytes("broadcast", 100, 4, root=False) == 0
    with pytest.raises(ValueError, match="unknown collective kind 'gather'"):
        wire_bytes("gather", 1, 2)


def test_strategy_choice_and_state() -> None:
    """strategy_for names the bad choice; scatter_gather's server residuals round-trip."""
    from gradzip.allreduce.scatter_gather import ScatterGatherStrategy

    with pytest.raises(ValueError, match=r"gather='ring' is not a strategy.*scatter_gather"):
        strategy_for(Sign(), gather="ring")
    with pytest.raises(ValueError, match=r"sparse='x'.*recursive"):
        strategy_for(gradzip.compressor("topk"), sparse="x")
    sg = strategy_for(Sign(), gather="scatter_gather")
    assert isinstance(sg, ScatterGatherStrategy)
    g = torch.randn(50)
    sg.start(LocalBackend(), Sign(), [Entry("g", g)]).wait()
    state = sg.state_dict()
    assert set(state["server"]["residuals"]) == {"g"}
    state["server"]["residuals"]["g"] = torch.randn(50)  # as if a 4-rank run left a residual
    results = []
    for strategy in (ScatterGatherStrategy(), ScatterGatherStrategy(), ScatterGatherStrategy()):
        if len(results) < 2:
            strategy.load_state_dict(state)
        results.append(strategy.start(LocalBackend(), Sign(), [Entry("g", g)]).wait()[0].reduced)
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


@pytest.mark.parametrize(
    ("spec", "how"), [("onebit", "scatter_gather"), ("terngrad", "ternary_sum")]
)
def test_strategies_that_need_the_gradient_name_themselves(spec: str, how: str) -> None:
    """A precompressed entry reaching a strategy that re-encodes the gradient is refused with
    that strategy's name (not another's) and the entry's key."""
    c = gradzip.compressor(spec)
    payload, ctx = c.compress(torch.randn(16))
    entry = Entry("w", payload=payload, ctx=ctx)
    with pytest.raises(CompressionError, match=rf"entry 'w': {how} needs the gradient"):
        strategy_for(c, gather=how).start(LocalBackend(), c, [entry]).wait()
