"""Momentum correction (``gradzip.hooks.momentum``): SGD's weight decay and momentum applied on
each rank before compression, the wrapped SGD stepping without them.

For dense gradients on one rank it must be torch's SGD bit for bit (same operations, same
order); on 2 gloo ranks the average of the ranks' velocities must be the velocity of the
averaged gradient. With 1-bit the velocity is what gets compressed. A step called off leaves
the velocities alone; a checkpoint carries them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "allreduce"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import run_ranks
from opt_workers import Net, batch, combine, flat, grads_of, loss_of, set_grads

import gradzip
from gradzip.allreduce.backend import Backend, LocalBackend
from gradzip.compress.memory import ResidualMemory
from gradzip.compress.onebit import OneBit

SGD_CASES = {
    "plain": {"momentum": 0.9},
    "weight_decay": {"momentum": 0.9, "weight_decay": 1e-2},
    "nesterov": {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-3},
    "dampening": {"momentum": 0.9, "dampening": 0.5},
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    x, y = _data(step)
    return nn.functional.cross_entropy(model(x), y)


def _wrap(model: nn.Module, base: torch.optim.Optimizer, **kw: Any) -> Any:
    return gradzip.DistributedOptimizer(
        base, model.named_parameters(), backend=LocalBackend(), **kw
    )


def _train(model: nn.Module, opt: Any, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_dense_correction_is_torch_sgd_bit_for_bit_on_one_rank(case: str) -> None:
    kw = SGD_CASES[case]
    model, ref = _model(), _model()
    opt = _wrap(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, **kw),
        compression="none",
        momentum_correction=True,
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, **kw)
    assert opt._gz_momentum is not None
    for step in range(5):
        _train(model, opt, range(step, step + 1))
        _train(ref, ref_opt, range(step, step + 1))
        assert torch.equal(flat(model), flat(ref)), f"{case}: step {step} differs"
    # the groups keep the user's values; the wrapped SGD kept no momentum buffer of its own
    assert opt.param_groups[0]["momentum"] == kw["momentum"]
    assert opt.param_groups[0]["weight_decay"] == kw.get("weight_decay", 0)
    assert opt.param_groups[0]["nesterov"] == kw.get("nesterov", False)
    assert not any("momentum_buffer" in s for s in opt.state.values())


def test_a_schedule_that_changes_the_momentum_applies() -> None:
    model, ref = _model(), _model()
    opt = _wrap(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        compression="none",
        momentum_correction=True,
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        for o in (opt, ref_opt):
            o.param_groups[0]["momentum"] = 0.9 - 0.2 * step
            o.param_groups[0]["lr"] = 0.1 / (step + 1)
        _train(model, opt, range(step, step + 1))
        _train(ref, ref_opt, range(step, step + 1))
    assert torch.equal(flat(model), flat(ref))


def test_on_by_default_for_sgd_momentum_with_error_feedback_only() -> None:
    def wrapped(base_cls: Any, compression: str, **kw: Any) -> Any:
        model = _model()
        return _wrap(model, base_cls(model.parameters(), lr=0.1, **kw), compression=compression)

    assert wrapped(torch.optim.SGD, "onebit", momentum=0.9)._gz_momentum is not None
    assert wrapped(torch.optim.SGD, "topk:ratio=0.1", momentum=0.9)._gz_momentum is not None
    # no error feedback, no momentum, not SGD: left as it was (the optimizer's own momentum)
    assert wrapped(torch.optim.SGD, "none", momentum=0.9)._gz_momentum is None
    assert wrapped(torch.optim.SGD, "qsgd", momentum=0.9)._gz_momentum is None
    assert wrapped(torch.optim.SGD, "topk:ratio=0.1,error_feedback=False", momentum=0.9)._gz_momentum is None  # noqa: E501
    assert wrapped(torch.optim.SGD, "onebit")._gz_momentum is None
    assert wrapped(torch.optim.Adam, "onebit")._gz_momentum is None
    model = _model()
    off = _wrap(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        compression="onebit",
        momentum_correction=False,
    )
    assert off._gz_momentum is None


def test_forcing_it_where_it_cannot_apply_names_why() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"torch\.optim\.SGD, and this optimizer is Adam"):
        _wrap(model, torch.optim.Adam(model.parameters()), momentum_correction=True)
    with pytest.raises(ValueError, match="maximize=True"):
        _wrap(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, maximize=True),
            momentum_correction=True,
        )
    with pytest.raises(ValueError, match="momentum_correction='yes'"):
        _wrap(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            momentum_correction="yes",
        )


def test_onebit_compresses_the_velocity() -> None:
    """One rank, no warm-up: the gradient sent is 1-bit of (velocity + residual), and the
    wrapped SGD steps with it as it is."""
    model = _model()
    opt = _wrap(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        compression="onebit",
        dense_steps=0,
        min_compress_numel=0,
    )
    ref = _model()
    comp, memory = OneBit(), ResidualMemory()
    velocity: dict[str, torch.Tensor] = {}
    for step in range(4):
        _train(model, opt, range(step, step + 1))
        ref.zero_grad()
        _loss(ref, step).backward()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                u = velocity.get(name)
                u = p.grad.clone() if u is None else u.mul(0.9).add_(p.grad)
                velocity[name] = u
                c = memory.compensate(name, u)
                d = comp.decompress(*comp.compress(c))
                memory.update(name, c, d)
                p.add_(d, alpha=-0.1)
        torch.testing.assert_close(flat(model), flat(ref), rtol=1e-5, atol=1e-6)


def test_an_inf_step_leaves_the_velocities_and_a_checkpoint_carries_them() -> None:
    model = _model()
    opt = _wrap(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        compression="onebit",
        dense_steps=1,
    )
    _train(model, opt, range(3))
    before = {k: v.clone() for k, v in opt._gz_momentum.velocities.items()}
    opt.zero_grad()
    (_loss(model, 3) * float("inf")).backward()  # every gradient non-finite: step skipped
    assert all(not torch.isfinite(p.grad).all() for p in model.parameters())
    after = opt._gz_momentum.velocities
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    saved = opt.state_dict()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(saved["gradzip"]["momentum"]) == set(before)
    _train(model, opt, range(4, 7))

    resumed = _model(seed=5)  # another init, then the checkpoint
    resumed.load_state_dict(weights)
    opt2 = _wrap(
        resumed,
        torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9),
        compression="onebit",
        dense_steps=1,
    )
    opt2.load_state_dict(saved)
    _train(resumed, opt2, range(4, 7))
    assert torch.equal(flat(resumed), flat(model))

    plain = _model()
    off = _wrap(
        plain,
        torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9),
        compression="onebit",
        momentum_correction=False,
    )
    with pytest.raises(ValueError, match="momentum_correction on"):
        off.load_state_dict(saved)


# -- 2 gloo ranks -------------------------------------------------------------------------------


def _two_ranks(backend: Backend) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net()
    torch.manual_seed(0)
    ref = Net()
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    opt = gradzip.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), **kw),
        model.named_parameters(),
        backend=backend,
        momentum_correction=True,
    )
    ref_opt = torch.optim.SGD(ref.parameters(), **kw)
    for step in range(4):
        opt.zero_grad()
        loss_of(model, *batch(step, backend.rank)).backward()
        opt.step()
        grads = [grads_of(ref, lambda r=r, s=step: loss_of(ref, *batch(s, r))) for r in range(2)]
        set_grads(ref, combine(grads))
        ref_opt.step()
    return {"got": flat(model), "want": flat(ref)}


def test_two_ranks_average_of_velocities_is_the_velocity_of_the_average() -> None:
    runs = run_ranks(_two_ranks, 2, timeout_s=120)
    for r in runs:
        torch.testing.assert_close(r["got"], r["want"], rtol=1e-6, atol=1e-7)
    assert torch.equal(runs[0]["got"], runs[1]["got"])


def test_a_plain_sgd_checkpoint_s_momentum_becomes_the_velocities() -> None:
    """Resuming a run saved without gradzip: SGD's momentum buffers carry on, not dropped."""
    model, ref = _model(), _model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    _train(model, plain, range(3))
    _train(ref, ref_opt, range(3))
    saved = plain.state_dict()
    opt = _wrap(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        compression="none",
        momentum_correction=True,
    )
    opt.load_state_dict(saved)
    assert set(opt._gz_momentum.velocities) == {n for n, _ in model.named_parameters()}
    _train(model, opt, range(3, 6))
    _train(ref, ref_opt, range(3, 6))
    assert torch.equal(flat(model), flat(ref))
