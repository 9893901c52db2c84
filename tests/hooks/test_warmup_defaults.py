"""The warm-ups a user gets without asking: dense steps from the compressors, DGC's sparsity
warm-up counted in steps when the loop never calls ``set_epoch``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import gradzip
from gradzip.allreduce.backend import LocalBackend
from gradzip.compress.dgc import DGC
from gradzip.hooks.ddp import DDPHookState
from gradzip.hooks.policy import check_dense_steps


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _wrap(compression: Any, momentum: float = 0.9, **kw: Any) -> Any:
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    return model, gradzip.DistributedOptimizer(
        base, model.named_parameters(), compression=compression, backend=LocalBackend(), **kw
    )


@pytest.mark.parametrize(
    ("compression", "steps"),
    [
        ("none", 0),
        ("fp16", 0),
        ("qsgd", 0),
        ("terngrad", 300),
        ("onebit", 150),
        ("topk:ratio=0.1", 150),
        ({"0.weight": "onebit", "2.weight": "qsgd"}, 150),  # the most any of them asks for
        ({"0.weight": "terngrad", "2.weight": "onebit"}, 300),  # 2.weight: small, dense
    ],
)
def test_dense_steps_default_comes_from_the_compressors(compression: Any, steps: int) -> None:
    _, opt = _wrap(compression)
    assert opt._gz.dense_steps == steps
    _, explicit = _wrap(compression, dense_steps=7)
    assert explicit._gz.dense_steps == 7
    assert DDPHookState(
        compression if isinstance(compression, str) else "terngrad", backend=LocalBackend()
    ).dense_steps == (steps if isinstance(compression, str) else 300)


def test_dense_steps_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"dense_steps=-1; expected None or an int >= 0"):
        check_dense_steps(-1)
    with pytest.raises(ValueError, match="dense_steps=True"):
        check_dense_steps(True)


def _bytes_per_step(model: nn.Module, opt: Any, steps: int) -> list[int]:
    """Train ``steps`` steps; the bytes handed to collectives in each."""
    sent = []
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        sent.append(opt.backend.stats.bytes_in)
        opt.backend.stats.reset()
    return sent


def test_onebit_sends_dense_for_its_first_150_steps_then_compresses() -> None:
    model, opt = _wrap("onebit", min_compress_numel=0)
    sent = _bytes_per_step(model, opt, 152)
    assert len(set(sent[1:150])) == 1  # every dense step sends the same bytes (the first: and
    assert sent[0] > sent[1]  # the plan fingerprint)
    assert sent[150] * 20 < sent[149]  # 1-bit from step 151 on


def test_dgc_warm_up_counts_steps_without_set_epoch() -> None:
    dgc = DGC(ratio=0.001)
    assert dgc.warmup_steps == 150
    densities = [dgc.at_step(s).density() for s in (0, 37, 38, 75, 113, 149, 150, 10_000)]
    assert densities == [0.25, 0.25, 0.0625, 0.015625, 0.00390625, 0.00390625, 0.001, 0.001]
    assert DGC(ratio=0.001, warmup_steps=0).at_step(0).density() == 0.001
    with pytest.raises(ValueError, match="warmup_steps=-3"):
        DGC(warmup_steps=-3)

    # no floor of values per tensor: this model's tensors are small enough for it to hide
    # the later epochs (the floor has its own test)
    model, opt = _wrap("dgc:ratio=0.01,min_values=0", momentum=0.0, min_compress_numel=0,
                       dense_steps=0)
    counts = _bytes_per_step(model, opt, 160)
    assert counts[0] > counts[40] > counts[80] > counts[155]  # sparser epoch by epoch
    # set_epoch takes over from the step count
    opt.set_epoch(0)
    assert _bytes_per_step(model, opt, 1)[0] == pytest.approx(counts[0], rel=0.05)


def test_the_ddp_hook_counts_dgc_steps_too() -> None:
    state = DDPHookState(
        "dgc:ratio=0.001",
        backend=LocalBackend(),
        optimizer=torch.optim.SGD(_model().parameters(), lr=0.1),
    )
    assert isinstance(state.compression, DGC) and state.compression.density() == 0.25


def test_dgc_dense_steps_keep_its_momentum() -> None:
    # DGC runs with an optimizer without momentum and applies it in its memory: dense steps
    # (dense_steps=N) still go through it, so they are momentum SGD, not plain SGD
    torch.manual_seed(0)
    ref = _model()
    plain = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    model, opt = _wrap("dgc", momentum=0.0, dense_steps=4, min_compress_numel=0)
    x, y = torch.randn(16, 64), torch.randint(0, 4, (16,))
    for _ in range(4):
        for m, o in ((ref, plain), (model, opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_ddp_hooks_dgc_dense_steps_keep_its_momentum() -> None:
    # the same bucket three times: momentum SGD's buffer, g (1 + m + ...), comes back
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    state = DDPHookState("dgc:momentum=0.5", backend=LocalBackend(), dense_steps=3,
                         optimizer=opt)
    p = torch.zeros(40, requires_grad=True)
    p.grad = torch.randn(40, generator=torch.Generator().manual_seed(1))
    got = []
    for _ in range(3):
        bucket = _Bucket(p)
        got.append(state.launch(bucket).wait().clone())  # type: ignore[arg-type]
    for k, out in enumerate(got):
        torch.testing.assert_close(out, p.grad * sum(0.5**j for j in range(k + 1)))
    assert not bool(state.memory.memory.velocities[0].any())  # everything was sent


class _Bucket:
    def __init__(self, p: torch.Tensor) -> None:
        self.p, self._buffer = p, p.grad.clone()  # type: ignore[union-attr]

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True

    def parameters(self) -> list[torch.Tensor]:
        return [self.p]
