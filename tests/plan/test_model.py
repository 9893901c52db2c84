"""The cost model's algebra against closed forms, and its layout against the optimizer's."""

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "allreduce"))
from dist_utils import run_ranks

import gradzip
from gradzip.allreduce.backend import Backend, wire_bytes
from gradzip.allreduce.sparse import sparse_rounds_cost
from gradzip.plan import model as M
from gradzip.plan.__main__ import main, parse_bandwidth, parse_seconds
from gradzip.plan.choose import best, predict, predict_pipeline
from gradzip.plan.layout import Tensor, buckets, from_module

A, B, G = 1e-4, 1e-8, 1e-9
LINK = M.Link(A, B, G)
m = 1 << 20


@pytest.mark.parametrize(
    "fn", [M.ring_allreduce, M.halving_doubling_allreduce, M.tree_allreduce, M.dense_allreduce]
)
def test_one_rank_costs_nothing(fn) -> None:  # type: ignore[no-untyped-def]
    assert fn(LINK, 1, m) == 0.0
    assert M.allgather(LINK, 1, m) == M.alltoall(LINK, 1, m) == 0.0
    assert M.sparse_recursive(LINK, 1, 100, m) == 0.0


def test_two_ranks_closed_forms() -> None:
    # P = 2: each algorithm is one exchange each way of its share
    assert M.ring_allreduce(LINK, 2, m) == pytest.approx(2 * A + m * B + m / 2 * G)
    assert M.halving_doubling_allreduce(LINK, 2, m) == pytest.approx(2 * A + m * B + m / 2 * G)
    assert M.tree_allreduce(LINK, 2, m) == pytest.approx(2 * (A + m * B) + m * G)
    assert M.allgather(LINK, 2, m) == pytest.approx(A + m * B)
    assert M.alltoall(LINK, 2, m) == pytest.approx(A + m / 2 * B)


@pytest.mark.parametrize("p", [4, 8, 1024])
def test_powers_of_two(p: int) -> None:
    share = (p - 1) / p * m
    log = int(math.log2(p))
    assert M.ring_allreduce(LINK, p, m) == pytest.approx(2 * (p - 1) * A + 2 * share * B
                                                         + share * G)
    assert M.halving_doubling_allreduce(LINK, p, m) == pytest.approx(2 * log * A + 2 * share * B
                                                                     + share * G)
    assert M.tree_allreduce(LINK, p, m) == pytest.approx(2 * log * (A + m * B) + log * m * G)
    # large messages: the bandwidth terms decide, and halving-doubling has fewer latencies
    assert M.dense_allreduce(LINK, p, m) == M.halving_doubling_allreduce(LINK, p, m)
    # tiny messages at many ranks: the tree's log P latencies win over the ring's 2 (P - 1)
    assert M.dense_allreduce(LINK, p, 8) <= M.ring_allreduce(LINK, p, 8)


@pytest.mark.parametrize("p", [3, 5, 6, 7, 1000])
def test_not_powers_of_two(p: int) -> None:
    p2 = 1 << (p.bit_length() - 1)
    share = (p2 - 1) / p2 * m
    want = 2 * int(math.log2(p2)) * A + 2 * share * B + share * G + 2 * (A + m * B) + m * G
    assert M.halving_doubling_allreduce(LINK, p, m) == pytest.approx(want)
    depth = math.ceil(math.log2(p))
    assert M.tree_allreduce(LINK, p, m) == pytest.approx(2 * depth * (A + m * B) + depth * m * G)


@pytest.mark.parametrize("p", [2, 3, 4, 7, 16])
def test_bytes_agree_with_the_backends_wire_schedule(p: int) -> None:
    bytes_only = M.Link(0.0, 1.0)
    assert M.ring_allreduce(bytes_only, p, m) == pytest.approx(wire_bytes("allreduce", m, p))
    assert M.allgather(bytes_only, p, m) == pytest.approx(wire_bytes("allgather", m, p))
    # alltoall: wire_bytes takes the bytes bound for the other ranks
    assert M.alltoall(bytes_only, p, m) == pytest.approx(wire_bytes("alltoall", m - m // p, p),
                                                         rel=1e-5)


@pytest.mark.parametrize("p", [2, 4, 5, 8])
def test_sparse_rounds_are_the_strategys_byte_count(p: int) -> None:
    n, nnz = 1 << 20, 1000
    bytes_only = M.Link(0.0, 1.0)
    agree = M.dense_allreduce(bytes_only, p, 8)
    got = M.sparse_recursive(bytes_only, p, nnz, n) - agree
    assert got == pytest.approx(sparse_rounds_cost(nnz, n, p))
    # so dense that the rounds cost more than a ring allreduce: densify at once
    dense = M.sparse_recursive(bytes_only, p, n // 2, n) - agree
    assert dense == pytest.approx(M.dense_allreduce(bytes_only, p, 4 * n))


def test_scatter_gather_beats_allgather_from_three_ranks() -> None:
    bucket = M.Bucket(dense=4 * m, numel=m, payload=m // 32 + 1024)
    link = M.Link(0.0, B)
    for p, wins in [(2, False), (3, True), (4, True), (64, True)]:
        _, gather = M.strategy_cost("allgather", link, p, bucket)
        _, sg = M.strategy_cost("scatter_gather", link, p, bucket)
        assert (sg < gather) is wins, p
    # at P = 2 they move the same bytes: (P-1) c = 2 (P-1)/P c
    _, gather = M.strategy_cost("allgather", link, 2, bucket)
    _, sg = M.strategy_cost("scatter_gather", link, 2, bucket)
    assert sg == pytest.approx(gather)


def test_a_size_exchange_only_where_the_payload_is_not_fixed() -> None:
    fixed = M.Bucket(dense=4096, numel=1024, payload=256, fixed=True)
    varying = M.Bucket(dense=4096, numel=1024, payload=256, fixed=False)
    _, a = M.strategy_cost("allgather", LINK, 4, fixed)
    _, b = M.strategy_cost("allgather", LINK, 4, varying)
    assert b - a == pytest.approx(M.allgather(LINK, 4, 8))


def test_step_overlap_and_work() -> None:
    rates = M.Rates(compress_call=1e-5, compress_byte=1e-9, decompress_call=1e-5,
                    decompress_byte=2e-9)
    bucket = M.Bucket(dense=4 * m, numel=m, payload=m // 8)
    work, comm = M.strategy_cost("allgather", LINK, 4, bucket, rates)
    assert work == pytest.approx(rates.compress(4 * m) + rates.decompress(4 * m, 4))
    plain = M.step_cost([("allgather", bucket, rates)], LINK, 4, compute=0.05, backward=0.03)
    assert plain.step == pytest.approx(0.05 + work + comm)
    hidden = M.step_cost(
        [("allgather", bucket, rates)], LINK, 4, compute=0.05, backward=0.03, overlap=1.0
    )
    assert hidden.step == pytest.approx(0.05 + work + max(0.0, comm - 0.03))
    with pytest.raises(ValueError, match="overlap"):
        M.step_cost([], LINK, 4, overlap=1.5)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True])
def test_bad_links_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="Link"):
        M.Link(bad, 1e-9)
    with pytest.raises(ValueError, match="world size"):
        M.ring_allreduce(LINK, 0, m)
    with pytest.raises(ValueError, match="strategy"):
        M.strategy_cost("broadcast", LINK, 2, M.Bucket(1, 1))


def test_units() -> None:
    assert parse_bandwidth("100mbit") == pytest.approx(12.5e6)
    assert parse_bandwidth("10gbit") == pytest.approx(1.25e9)
    assert parse_bandwidth("125MB/s") == pytest.approx(125e6)
    assert parse_seconds("50us") == pytest.approx(5e-5)
    assert parse_seconds("1.5ms") == pytest.approx(1.5e-3)
    for bad in ("fast", "-3mbit", "0mbit", "10 parsecs"):
        with pytest.raises(ValueError):
            parse_bandwidth(bad)
    with pytest.raises(ValueError):
        parse_seconds("soon")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(300, 200), torch.nn.ReLU(), torch.nn.Linear(200, 100),
        torch.nn.ReLU(), torch.nn.Linear(100, 10),
    )


# DGC after its warm-up (what the plan costs: the compressed steps)
SPECS = ["none", "fp16", "onebit", "qsgd", "terngrad", "topk", "dgc:warmup_epochs=0"]


def _handed(backend: Backend) -> dict[str, Any]:
    """Per spec: the bytes this rank handed to allreduce + allgather on a compressed step,
    and the bucket count of its optimizer."""
    out = {}
    for spec in SPECS:
        net = _net()
        opt = gradzip.DistributedOptimizer(
            torch.optim.SGD(net.parameters(), lr=0.01), net.named_parameters(),
            compression=spec, backend=backend, dense_steps=0, fusion_bytes=64 * 1024,
        )
        for step in range(2):
            if step == 1:  # count one step after the first (plan checks, DGC's first step)
                backend.stats.reset()
            opt.zero_grad()
            torch.manual_seed(step * 2 + backend.rank)
            net(torch.randn(8, 300)).square().mean().backward()  # buckets go out here
            opt.step()
        kinds = backend.stats.by_kind
        cost = predict_pipeline(opt._gz, M.Link(0.0, 1.0))  # type: ignore[attr-defined]
        out[spec] = {
            "handed": kinds["allreduce"].bytes_in + kinds["allgather"].bytes_in,
            "sent": backend.stats.bytes_sent,
            "predicted_payload": cost.payload_bytes,
            "predicted_sent": cost.comm,  # one second per byte: the bytes on the wire
        }
    return out


def test_layout_payloads_are_what_the_optimizer_hands_the_backend() -> None:
    handed = run_ranks(_handed, 2, timeout_s=120)[0]
    for spec in SPECS:
        laid = buckets(from_module(_net()), spec, fusion_bytes=64 * 1024)
        predicted = sum(b.payload for _, b in laid)
        # the backend also gets each bucket's part-size header (4 bytes a part and one) and
        # the step's flags; top-k and DGC's sparse payloads have their measured size
        slack = sum(4 * (1 + 2 * b.tensors) for _, b in laid) + 64
        got = handed[spec]
        assert predicted <= got["handed"] <= predicted + slack, (spec, predicted, got)
        # the built optimizer's own buckets give the same payload, and the bytes its rank
        # put on the wire (the backend's schedule count) are the model's comm at one s/byte
        assert got["predicted_payload"] == predicted
        assert got["predicted_sent"] == pytest.approx(got["sent"], abs=slack), (spec, got)


def test_predict_ranks_and_best_is_deterministic() -> None:
    tensors = [Tensor("w", (2048, 2048)), Tensor("b", (2048,))]
    slow = M.Link.of(12.5e6, 5e-5)
    opts = predict(tensors, slow, 4, methods=["none", "onebit", "topk"])
    assert [(o.spec, o.strategy) for o in opts][:1] == [("none", "dense")]
    assert best(opts).spec != "none"  # 100 Mbit/s, compression free: any of them beats dense
    assert best(opts) == best(list(opts))
    fast = M.Link.of(1e12, 1e-6)
    expensive = M.Rates(compress_call=1e-3, compress_byte=1e-8, decompress_call=1e-3,
                        decompress_byte=1e-8)
    opts = predict(tensors, fast, 4, methods=["none", "onebit"], rates=lambda s: (
        M.Rates() if s == "none" else expensive))
    assert best(opts).spec == "none"  # a fast link and costly compression: dense wins


def test_the_cli_prints_a_table_per_world_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--mlp", "784,256,10", "--world-size", "2", "1024", "--bandwidth", "100mbit",
                 "--methods", "none", "onebit"]) == 0
    out = capsys.readouterr().out
    assert "world size 2" in out and "world size 1024" in out and "(fastest)" in out
    assert main(["--mlp", "784", "--world-size", "2"]) == 2


def test_a_separately_measured_allreduce_rate_applies_to_allreduces_only() -> None:
    link = M.Link(A, B, G, reduce_beta=B / 4)
    assert M.ring_allreduce(link, 4, m) == pytest.approx(
        6 * A + 2 * 0.75 * m * B / 4 + 0.75 * m * G)
    assert M.allgather(link, 4, m) == M.allgather(LINK, 4, m)
    assert M.alltoall(link, 4, m) == M.alltoall(LINK, 4, m)
    with pytest.raises(ValueError, match="reduce_beta"):
        M.Link(A, B, reduce_beta=-1.0)
