"""The allreduce strategies on the kernel path: compress, shared statistics and the
receive-side sum go through the kernels, with the torch path's results."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch

from gradzip.allreduce.backend import LocalBackend
from gradzip.allreduce.entry import Entry
from gradzip.allreduce.gather import combine
from gradzip.allreduce.select import strategy_for
from gradzip.compress import kernels
from gradzip.compress.base import Compressor
from gradzip.compress.onebit import OneBit
from gradzip.compress.qsgd import QSGD
from gradzip.compress.terngrad import TernGrad

Load = Callable[[str], ModuleType]
COMPRESSORS = [OneBit(bucket_size=64), QSGD(bucket_size=64), TernGrad()]


def _spy(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str) -> list[Any]:
    """Count the calls of ``module.name`` (still calling it)."""
    calls: list[Any] = []
    real = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("comp", COMPRESSORS, ids=lambda c: c.name)
def test_combine_sums_on_the_kernel_like_the_torch_path(
    load: Load, monkeypatch: pytest.MonkeyPatch, comp: Compressor
) -> None:
    grads = [torch.randn(300, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    pairs = [comp.compress(g, seed=r) for r, g in enumerate(grads)]
    payloads, ctx = [p for p, _ in pairs], pairs[0][1]
    calls = _spy(monkeypatch, load(comp.name), "decompress_sum")
    on_kernel = combine(comp, payloads, ctx)
    assert len(calls) == 1
    monkeypatch.setenv("GRADZIP_KERNELS", "off")
    assert torch.equal(on_kernel, combine(comp, payloads, ctx))
    assert len(calls) == 1


@pytest.mark.parametrize(("gather", "share"), [
    ("allgather", False), ("allgather", True), ("scatter_gather", False)])
def test_gather_strategies_compress_on_the_kernel(
    load: Load, monkeypatch: pytest.MonkeyPatch, gather: str, share: bool
) -> None:
    comp = TernGrad(share=share)
    stats = _spy(monkeypatch, load("terngrad"), "shared_stat")
    compressed = _spy(monkeypatch, load("terngrad"), "compress")
    grad = torch.randn(40, 7, generator=torch.Generator().manual_seed(1))
    strategy = strategy_for(comp, gather=gather)
    (out,) = strategy.start(LocalBackend(), comp, [Entry("w", grad)], seed=3).wait()
    # the allgather shares the scaler (a statistic before compressing) only with share=True;
    # scatter-gather's server side takes the statistic of its own sum
    assert (len(stats) >= 1) == (share or gather == "scatter_gather") and len(compressed) >= 1
    assert out.reduced.shape == grad.shape and out.reduced.dtype == grad.dtype
    # one rank: the reduced gradient is the decompressed kernel payload, s * {-1, 0, 1}
    s = float(kernels.shared_stat(comp, grad.reshape(-1)))  # type: ignore[arg-type]
    assert set(out.reduced.unique().tolist()) <= {-s, 0.0, s}
    assert float(out.reduced.abs().max()) == pytest.approx(s, rel=1e-6)


def test_ternary_sum_uses_the_torch_statistic(load: Load, monkeypatch: pytest.MonkeyPatch) -> None:
    comp = TernGrad()
    stats = _spy(monkeypatch, load("terngrad"), "shared_stat")
    grad = torch.randn(500, generator=torch.Generator().manual_seed(2))
    strategy = strategy_for(comp, gather="ternary_sum")
    (out,) = strategy.start(LocalBackend(), comp, [Entry("w", grad)], seed=1).wait()
    assert not stats  # the torch ternarize checks the shared scaler against its own
    s = float(comp.shared_stat(grad))
    assert set(out.reduced.unique().tolist()) <= {-s, 0.0, s}


def test_error_feedback_local_result_is_the_kernel_decompression(load: Load) -> None:
    comp = OneBit(bucket_size=32)
    # multiples of 1/8: the kernel's means are exact, so its payload is the reference's
    grad = torch.randint(-64, 64, (96,), generator=torch.Generator().manual_seed(5)) / 8
    (out,) = strategy_for(comp).start(LocalBackend(), comp, [Entry("w", grad)]).wait()
    payload, ctx = comp.compress(grad)
    assert out.local is not None
    assert torch.equal(out.local, comp.decompress(payload, ctx))
    assert torch.equal(out.reduced, comp.decompress(payload, ctx))
