"""Sparse allreduce on 2, 3 and 4 gloo ranks: same sum as a dense allreduce, dense when dense."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dist_utils import run_ranks

from gradzip.allreduce.backend import Backend, LocalBackend
from gradzip.allreduce.sparse import sparse_allgather, sparse_allreduce, sparse_rounds_cost
from gradzip.compress.base import CompressionError, generator

N = 4000
DENSITIES = (0.0, 0.001, 0.01, 0.2, 0.6)


def sparse_input(rank: int, density: float, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random indices and small-integer values (exact sums in fp32)."""
    gen = generator(1000 * rank + int(density * 1e4))
    k = int(density * n)
    idx = torch.randperm(n, generator=gen)[:k].to(torch.int32)
    vals = torch.randint(-50, 51, (k,), generator=gen).to(torch.float32)
    return idx, vals


def densify(idx: torch.Tensor, vals: torch.Tensor, n: int = N) -> torch.Tensor:
    return torch.zeros(n).index_add_(0, idx.long(), vals)


def battery(backend: Backend) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for density in DENSITIES:
        idx, vals = sparse_input(backend.rank, density)
        dense = backend.allreduce(densify(idx, vals)).wait()
        backend.stats.reset()
        res = sparse_allreduce(backend, idx, vals, N)
        sent = backend.stats.bytes_sent
        gathered = sparse_allgather(backend, idx, vals, N).wait()
        out[density] = (res.tensor, res.dense, dense, gathered, sent)
    # repeated indices within one rank add up too
    twice = torch.tensor([3, 3, 5], dtype=torch.int32)
    out["repeated"] = sparse_allreduce(backend, twice, torch.ones(3), 10).tensor
    return out


@pytest.fixture(scope="module")
def runs() -> dict[int, list[dict[str, Any]]]:
    return {p: run_ranks(battery, p) for p in (2, 3, 4)}


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("density", DENSITIES)
def test_sparse_equals_dense_allreduce(runs: Any, world: int, density: float) -> None:
    expect = sum(densify(*sparse_input(r, density)) for r in range(world))
    for rank in runs[world]:
        tensor, _, dense, gathered, _ = rank[density]
        assert torch.equal(dense, expect)
        assert torch.equal(tensor, expect)
        assert torch.equal(gathered, expect)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_chooses_dense_at_high_density(runs: Any, world: int) -> None:
    for rank in runs[world]:
        assert rank[0.6][1] is True  # 60%: nnz·8 > n·4, dense from the start
        assert rank[0.001][1] is False
        assert rank[0.01][1] is False


@pytest.mark.parametrize("world", [2, 4])
def test_sparse_sends_less_than_dense_when_sparse(runs: Any, world: int) -> None:
    dense_ring = 2 * (world - 1) * N * 4 // world
    sent = runs[world][0][0.01][4]
    assert sent < dense_ring / 5
    assert runs[world][0][0.6][4] >= dense_ring  # went dense: the ring allreduce's bytes


def test_repeated_indices_add(runs: Any) -> None:
    for world in (2, 3, 4):
        got = runs[world][0]["repeated"]
        assert got[3] == 2 * world and got[5] == world and got.sum() == 3 * world


def test_cost_model() -> None:
    assert sparse_rounds_cost(10, 1000, 1) == 0
    assert sparse_rounds_cost(10, 1000, 2) == 80
    assert sparse_rounds_cost(10, 1000, 4) == 80 + 160
    assert sparse_rounds_cost(600, 1000, 2) == 4000  # capped at dense
    assert sparse_rounds_cost(10, 1000, 3) == 80 + 160 + 320  # fold, 1 round, unfold


def test_bad_input_is_named() -> None:
    b = LocalBackend()
    with pytest.raises(CompressionError, match=r"\[0, 12\].*n=10"):
        sparse_allreduce(b, torch.tensor([0, 12]), torch.ones(2), 10)
    with pytest.raises(CompressionError, match="one length"):
        sparse_allreduce(b, torch.tensor([0, 1]), torch.ones(3), 10)


def _order_sensitive(device: str) -> list[Any]:
    """Four ranks' top-k payloads that all hit element 0, with values whose fp32 sum depends
    on the order of the additions (1e8 + 1 - 1e8 + 1 ...)."""
    from gradzip.compress.base import Payload

    values = [1e8, 1.0, -1e8, 1.0]
    return [
        Payload(
            (
                torch.tensor([0, 1 + r], dtype=torch.int32, device=device),
                torch.tensor([v, float(r)], dtype=torch.float32, device=device),
            )
        )
        for r, v in enumerate(values)
    ]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_sparse_sums_are_taken_in_rank_order(device: str) -> None:
    """Every rank's receive side adds the ranks' payloads one by one, in rank order (CUDA's
    atomics would otherwise choose the order of repeated indices)."""
    import gradzip
    from gradzip.allreduce.gather import combine
    from gradzip.compress.topk import SparseCtx

    payloads = _order_sensitive(device)
    ctx = SparseCtx(torch.Size([6]), torch.float32, 6)
    expect = torch.zeros(6, dtype=torch.float32)
    for p in payloads:  # ((((0 + 1e8) + 1) - 1e8) + 1) in fp32 = 1, not 2
        expect.index_add_(0, p[0].long().cpu(), p[1].cpu())
    for spec in ("topk:ratio=0.5", "dgc:ratio=0.5"):
        c = gradzip.compressor(spec)
        for _ in range(5):
            got = combine(c, payloads, ctx).cpu()
            assert torch.equal(got, expect), (spec, got)
    assert expect[0].item() == 1.0  # the order matters for this input
