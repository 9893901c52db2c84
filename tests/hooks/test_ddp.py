"""The DDP comm hook: real DDP on 2 gloo ranks, and the state's mechanics in one process.

Real runs (one forked group per test, every configuration batched into it): with
``compression="none"`` the hooked model equals plain DDP bit for bit; every lossy compressor
keeps the ranks' parameters identical after every step and trains an MLP on a Fashion-MNIST
subset below a loss threshold that plain DDP reaches; DDP's bucket rebuild is seen and
handled; the trained state pickles although its process group does not. One-process tests
drive the hook with hand-made buckets over a ``LocalBackend``.
"""

from __future__ import annotations

import pickle
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "allreduce"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dist_utils import run_ranks

import gradzip
from gradzip.allreduce.backend import LocalBackend
from gradzip.compress.base import CompressionError
from gradzip.hooks.ddp import DDPHookState, compressed_hook

# DGC applies momentum itself; plain DDP here steps with SGD without momentum, so DGC's is
# 0.5 (an effective step of lr / (1 - m) = 2 lr; at 0.9 it would be 10 lr, another optimizer)
LOSSY = ["fp16", "bf16", "topk:ratio=0.01", "dgc:ratio=0.01,warmup_epochs=0,momentum=0.5"] + [
    spec for spec in ("onebit", "qsgd", "terngrad") if spec in gradzip.available()
]
# the other strategies, as labelled runs: label -> (spec, options of ddp_comm_hook)
STRATEGIES = {
    "topk recursive": ("topk:ratio=0.01", {"sparse": "recursive"}),
    "onebit scatter_gather": ("onebit", {"gather": "scatter_gather"}),
}
STEPS, BATCH, N_TRAIN = 40, 32, 2560


class Branchy(nn.Module):
    """Gradients become ready in an order unlike the parameters': DDP rebuilds its buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(20, 300), nn.Linear(300, 10), nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + self.c(x)


def _ddp(model: nn.Module, spec: str | None, **kw: Any) -> tuple[Any, DDPHookState | None]:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, bucket_cap_mb=0.01)
    if spec is None:
        return ddp, None
    state, hook = gradzip.ddp_comm_hook(spec, **{"dense_steps": 0, **kw})
    ddp.register_comm_hook(state, hook)
    return ddp, state


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _exact_runs(backend: Any) -> dict[str, Any]:
    """Plain DDP vs hooked ``none`` (both overlap settings) on Branchy, 5 SGD steps."""
    out: dict[str, Any] = {}
    for name, spec, kw in (
        ("plain", None, {}),
        ("none", "none", {}),
        ("none_sync", "none", {"overlap": False}),
        ("onebit_sg", "onebit", {"gather": "scatter_gather"}),
    ):
        torch.manual_seed(0)
        ddp, state = _ddp(Branchy(), spec, **kw)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + backend.rank)
        for _ in range(5):
            opt.zero_grad()
            x = torch.randn(8, 20, generator=gen)
            ddp(x).square().mean().backward()
            opt.step()
        out[name] = _flat_params(ddp.module)
        if state is not None:
            out[name + "_stats"] = dict(state.stats)
            out[name + "_pickled"] = pickle.loads(pickle.dumps(state)).stats
    return out


def _train(backend: Any, data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """An MLP on this rank's half of the subset, for plain DDP and every lossy spec."""
    x, y = data
    mine = slice(backend.rank, None, backend.size)
    xs, ys = x[mine], y[mine]
    out: dict[str, Any] = {}
    runs = {"None": (None, {}), **{s: (s, {}) for s in LOSSY}, **STRATEGIES}
    for label, (spec, kw) in runs.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if spec is not None and spec.startswith("dgc"):
            kw = {**kw, "optimizer": opt}  # DGC checks the optimizer has no momentum
        ddp, state = _ddp(model, spec, **kw)
        sums = []
        for step in range(STEPS):
            lo = step * BATCH % len(xs)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(xs[lo : lo + BATCH]), ys[lo : lo + BATCH]).backward()
            opt.step()
            sums.append(_flat_params(model).double().sum().item())
        with torch.no_grad():
            loss = nn.functional.cross_entropy(model(x), y).item()
        out[label] = {"loss": loss, "sums": sums, "final": _flat_params(model)}
        if state is not None:
            restored = pickle.loads(pickle.dumps(state))
            out[label]["ratio"] = state.compression_ratio
            out[label]["memory_equal"] = _memories_equal(state, restored)
            out[label]["compression"] = state.compression
    return out


def _memories_equal(a: DDPHookState, b: DDPHookState) -> bool:
    sa, sb = a.memory.state_dict(), b.memory.state_dict()
    return sa.keys() == sb.keys() and all(_equal(sa[k], sb[k]) for k in sa)


def _equal(x: Any, y: Any) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    return bool(x == y)


def _preload() -> None:
    """DDP imports torch._dynamo when first built (seconds): import it once, before forking."""
    import torch._dynamo  # noqa: F401


@pytest.fixture(scope="module")
def exact() -> list[dict[str, Any]]:
    _preload()
    return run_ranks(_exact_runs, 2)


@pytest.fixture(scope="module")
def trained() -> list[dict[str, Any]]:
    pytest.importorskip("numpy")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.data import load_fashion_mnist

    data = load_fashion_mnist("train", limit=N_TRAIN)
    _preload()
    return run_ranks(_train, 2, (data.x, data.y), timeout_s=120)


def test_none_equals_plain_ddp(exact: list[dict[str, Any]]) -> None:
    for rank in exact:
        assert torch.equal(rank["none"], rank["plain"])
        assert torch.equal(rank["none_sync"], rank["plain"])
    assert torch.equal(exact[0]["none"], exact[1]["none"])


def test_bucket_rebuild_is_detected(exact: list[dict[str, Any]]) -> None:
    stats = exact[0]["none_stats"]
    assert stats["rebuilds"] == 1 and stats["resets"] == 0
    assert stats["steps"] == 5
    # one bucket in step 1, two after the rebuild
    assert stats["buckets"] == 1 + 2 * 4
    assert exact[0]["none_pickled"] == stats
    # "none" sends the buckets as they are, plus one int32 finiteness flag per bucket and a
    # fingerprint (two int64) per bucket layout: the first bucket, then the two rebuilt ones
    assert stats["bytes_in"] == stats["dense_bytes"] + 4 * stats["buckets"] + 16 * 3
    # scatter_gather's server residuals live on chunks of the old buckets: reset, and counted
    sg = exact[0]["onebit_sg_stats"]
    assert sg["rebuilds"] == 1 and sg["resets"] == 1
    assert torch.equal(exact[0]["onebit_sg"], exact[1]["onebit_sg"])


def test_lossy_compressors_train_and_ranks_agree(trained: list[dict[str, Any]]) -> None:
    plain = trained[0]["None"]["loss"]
    assert plain < 0.9, f"plain DDP reached only {plain:.3f}; the threshold below assumes < 0.9"
    for spec in [*LOSSY, *STRATEGIES]:
        r0, r1 = trained[0][spec], trained[1][spec]
        assert r0["sums"] == r1["sums"], f"{spec}: ranks diverged"
        assert torch.equal(r0["final"], r1["final"]), f"{spec}: ranks diverged"
        assert r0["loss"] < 1.0, f"{spec}: loss {r0['loss']:.3f} (plain DDP: {plain:.3f})"
        assert r0["memory_equal"], f"{spec}: memory did not survive pickling"


def test_dgc_clipping_scales_with_the_world_size(trained: list[dict[str, Any]]) -> None:
    assert trained[0]["dgc:ratio=0.01,warmup_epochs=0,momentum=0.5"]["compression"].world_size == 2


def test_sparse_compressors_send_fewer_bytes(trained: list[dict[str, Any]]) -> None:
    assert trained[0]["fp16"]["ratio"] == pytest.approx(2.0, rel=0.01)
    assert trained[0]["topk:ratio=0.01"]["ratio"] > 20


# -- one process: hand-made buckets over a LocalBackend ------------------------------------------


class FakeBucket:
    """What the hook uses of ``torch.distributed.GradBucket``."""

    def __init__(self, index: int, params: list[torch.Tensor], last: bool) -> None:
        self._index, self._params, self._last = index, params, last
        self._buffer = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last

    def parameters(self) -> list[torch.Tensor]:
        return self._params


def _params(seed: int, *sizes: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.zeros(n, requires_grad=True) for n in sizes]
    for p in params:
        p.grad = torch.randn(n := p.numel(), generator=gen) * torch.arange(1, n + 1)
    return params


def test_rebuild_carries_residuals_per_parameter() -> None:
    state = DDPHookState("topk:ratio=0.1", backend=LocalBackend(), dense_steps=0)
    p1, p2, p3 = _params(0, 30, 20, 10)
    compressed_hook(state, FakeBucket(0, [p1, p2, p3], last=True)).wait()  # type: ignore[arg-type]
    r1, r2, r3 = state.memory.memory.residuals[0].split([30, 20, 10])
    for p in (p1, p2, p3):
        p.grad = torch.zeros_like(p)  # now compensated == residual
    a, b = FakeBucket(0, [p3, p2], last=False), FakeBucket(1, [p1], last=True)
    fa, fb = compressed_hook(state, a), compressed_hook(state, b)  # type: ignore[arg-type]
    out_a, out_b = fa.wait(), fb.wait()
    assert state.stats["rebuilds"] == 1 and state.stats["resets"] == 0
    assert torch.equal(out_a + state.memory.memory.residuals[0], torch.cat([r3, r2]))
    assert torch.equal(out_b + state.memory.memory.residuals[1], r1)


def test_futures_complete_at_the_last_bucket() -> None:
    for overlap in (True, False):
        state = DDPHookState("none", backend=LocalBackend(), overlap=overlap, dense_steps=0)
        p1, p2 = _params(1, 5, 7)
        first = compressed_hook(state, FakeBucket(0, [p1], last=False))  # type: ignore[arg-type]
        assert first.done() is (not overlap)
        second = compressed_hook(state, FakeBucket(1, [p2], last=True))  # type: ignore[arg-type]
        assert first.done() and second.done()
        assert torch.equal(first.wait(), p1.grad) and state.step == 1


def test_dense_steps_send_plain_buckets_then_start_feedback() -> None:
    state = DDPHookState("topk:ratio=0.1", backend=LocalBackend(), dense_steps=2)
    for step in range(3):
        params = _params(10 + step, 30, 20)
        out = compressed_hook(state, FakeBucket(0, params, last=True)).wait()  # type: ignore[arg-type]
        plain = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        if step < 2:  # the plain gradient (a world of one), and no residual yet
            assert torch.equal(out, plain) and not state.memory.memory.residuals
        else:  # top-k with error feedback: 5 of 50 values sent, the rest kept
            assert int((out != 0).sum()) == 5
            assert torch.equal(out + state.memory.memory.residuals[0], plain)
    assert state.step == 3 and state.compression_ratio < 1.0 / 0.6  # two dense steps counted


def test_state_pickles_without_its_process_group() -> None:
    state = DDPHookState("topk:ratio=0.2", process_group=threading.Lock(), dense_steps=0)  # type: ignore[arg-type]
    state._backend = LocalBackend()
    p1, p2 = _params(2, 40, 8)
    compressed_hook(state, FakeBucket(0, [p1, p2], last=True))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pickle.dumps(state.process_group)
    restored = pickle.loads(pickle.dumps(state))
    assert restored.process_group is None and restored.step == state.step == 1
    assert restored.compression == state.compression and restored.stats == state.stats
    assert _memories_equal(state, restored)
    restored._backend = LocalBackend()
    # same sizes: the memory is taken back; other sizes: it restarts from zero, counted
    q1, q2 = _params(3, 40, 8)
    compressed_hook(restored, FakeBucket(0, [q1, q2], last=True))  # type: ignore[arg-type]
    assert restored.stats["resets"] == 0
    again = pickle.loads(pickle.dumps(state))
    again._backend = LocalBackend()
    compressed_hook(again, FakeBucket(0, _params(4, 48), last=True))  # type: ignore[arg-type]
    assert again.stats["resets"] == 1


def test_sfb_and_bad_options_fail_clearly() -> None:
    with pytest.raises(CompressionError, match="DistributedOptimizer"):
        gradzip.ddp_comm_hook("sfb", dense_steps=0)
    for kw, word in (
        ({"gather": "ring"}, "gather='ring'"),
        ({"sparse": "dense"}, "sparse='dense'"),
        ({"seed": -1}, "seed=-1"),
        ({"overlap": 1}, "overlap=1"),
        ({"dense_steps": -2}, "dense_steps=-2"),
    ):
        with pytest.raises(ValueError, match=word):
            DDPHookState("topk", backend=LocalBackend(), **kw)
    with pytest.raises(ValueError, match="unknown compressor"):
        DDPHookState("zip", backend=LocalBackend(), dense_steps=0)


def test_nan_bucket_reaches_the_result_and_leaves_the_memory() -> None:
    """Default: no exception; the NaN bucket completes as NaN, the other as usual, and no
    bucket's memory moves in that step (every rank skips it). With nonfinite='raise' every
    pending future fails."""
    state = DDPHookState("topk:ratio=0.5", backend=LocalBackend(), overlap=False, dense_steps=0)
    p1, p2 = _params(5, 6, 6)
    first = compressed_hook(state, FakeBucket(0, [p1], last=False))  # type: ignore[arg-type]
    p2.grad[3] = float("inf")  # type: ignore[index]
    second = compressed_hook(state, FakeBucket(1, [p2], last=True))  # type: ignore[arg-type]
    assert torch.isnan(second.wait()).all() and torch.isfinite(first.wait()).all()
    assert not state.memory.memory.residuals  # the whole step called off, bucket 0 included
    p2.grad[3] = 1.0  # type: ignore[index]
    compressed_hook(state, FakeBucket(0, [p1], last=False))  # type: ignore[arg-type]
    compressed_hook(state, FakeBucket(1, [p2], last=True)).wait()  # type: ignore[arg-type]
    before = {k: v.clone() for k, v in state.memory.memory.residuals.items()}
    assert sorted(before) == [0, 1]
    p1.grad[0] = float("nan")  # type: ignore[index]
    compressed_hook(state, FakeBucket(0, [p1], last=False))  # type: ignore[arg-type]
    compressed_hook(state, FakeBucket(1, [p2], last=True)).wait()  # type: ignore[arg-type]
    after = state.memory.memory.residuals
    assert all(torch.equal(after[k], before[k]) for k in before)  # as they were

    strict = DDPHookState(
        "topk:ratio=0.5", backend=LocalBackend(), nonfinite="raise", dense_steps=0
    )
    q1, q2 = _params(5, 6, 6)
    first = compressed_hook(strict, FakeBucket(0, [q1], last=False))  # type: ignore[arg-type]
    q2.grad[3] = float("nan")  # type: ignore[index]
    with pytest.raises(CompressionError, match="bucket 1 holds NaN or Inf"):
        compressed_hook(strict, FakeBucket(1, [q2], last=True))  # type: ignore[arg-type]
    with pytest.raises(CompressionError, match="NaN"):
        first.wait()
    assert not strict.memory.memory.residuals
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        DDPHookState("none", backend=LocalBackend(), nonfinite="skip", dense_steps=0)


def test_dgc_needs_the_optimizer_to_check_its_momentum() -> None:
    model = nn.Linear(4, 4)
    with pytest.raises(CompressionError, match="optimizer="):
        DDPHookState("dgc", backend=LocalBackend(), dense_steps=0)
    with pytest.raises(ValueError, match="momentum"):
        DDPHookState(
            "dgc", backend=LocalBackend(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            dense_steps=0,
        )  # fmt: skip
    DDPHookState(
        "dgc",
        backend=LocalBackend(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dense_steps=0,
    )
