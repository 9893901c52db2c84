"""DistributedOptimizer in one process (LocalBackend): the compression policy, argument
checks, the class it returns, and state_dict round trips. No communication needed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import gradzip
from gradzip.allreduce.auto import default_backend
from gradzip.allreduce.backend import LocalBackend
from gradzip.compress.base import CompressionError
from gradzip.hooks.policy import make_policy


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.LayerNorm(64), nn.Linear(64, 30))


def _wrap(model: nn.Module, **kw: Any) -> Any:
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    return gradzip.DistributedOptimizer(
        base, model.named_parameters(), backend=LocalBackend(), **{"dense_steps": 0, **kw}
    )


def test_policy_patterns_glob_regex_first_match_and_small_tensors() -> None:
    opt = _wrap(
        _model(),
        compression={"re:0\\.(weight|bias)": "topk:ratio=0.1", "*.weight": "fp16"},
        min_compress_numel=100,
    )
    plan = opt.compression_plan()
    assert plan["0.weight"].startswith("topk:ratio=0.1")
    assert plan["0.bias"] == "none"  # 64 elements < 100: dense whatever the rule says
    assert plan["2.weight"] == "fp16"
    assert plan["1.weight"] == "none"  # LayerNorm scale: 64 elements
    assert plan["2.bias"] == "none"  # no pattern matches


def test_policy_errors_name_the_bad_value() -> None:
    with pytest.raises(CompressionError, match="'nope' matches no parameter"):
        _wrap(_model(), compression={"nope": "fp16"})
    with pytest.raises(CompressionError, match="not a valid regular expression"):
        make_policy({"re:(": "fp16"})
    with pytest.raises(CompressionError, match="unknown compressor 'zip'"):
        make_policy("zip")
    with pytest.raises(CompressionError, match="min_compress_numel=-1"):
        make_policy("none", -1)
    with pytest.raises(CompressionError, match=r"compression\['\*'\]"):
        make_policy({"*": 3})  # type: ignore[dict-item]


def test_argument_checks() -> None:
    model = _model()
    with pytest.raises(ValueError, match="backward_passes_per_step=0"):
        _wrap(model, backward_passes_per_step=0)
    with pytest.raises(ValueError, match="op='mean'"):
        _wrap(model, op="mean")
    with pytest.raises(ValueError, match="fusion_bytes=0"):
        _wrap(model, fusion_bytes=0)
    with pytest.raises(ValueError, match="misses 1 of the optimizer's parameters"):
        gradzip.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            list(model.named_parameters())[:-1],
            backend=LocalBackend(),
            dense_steps=0,
        )
    with pytest.raises(ValueError, match="DGC applies momentum itself"):
        gradzip.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            compression="dgc",
            backend=LocalBackend(),
            dense_steps=0,
        )
    with pytest.raises(ValueError, match="already a gradzip DistributedOptimizer"):
        gradzip.DistributedOptimizer(_wrap(model), backend=LocalBackend(), dense_steps=0)


def test_no_engine_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no communication engine is initialised"):
        default_backend()


def test_subclass_of_the_users_optimizer_and_its_subclasses() -> None:
    class MyAdam(torch.optim.Adam):
        def step(self, closure: Any = None) -> Any:
            self.calls = getattr(self, "calls", 0) + 1
            return super().step(closure)

    model = _model()
    opt = gradzip.DistributedOptimizer(
        MyAdam(model.parameters(), lr=1e-2), backend=LocalBackend(), dense_steps=0
    )
    assert isinstance(opt, MyAdam) and type(opt).__name__ == "MyAdam"
    model(torch.randn(3, 40)).sum().backward()
    opt.step()
    assert opt.calls == 1


def test_state_dict_round_trip_restores_residuals_and_step() -> None:
    model = _model()
    opt = _wrap(model, compression="topk:ratio=0.05", min_compress_numel=0, seed=3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 40)).square().mean().backward()
        opt.step()
    state = opt.state_dict()
    mem = state["gradzip"]["memories"]["0.weight"]["residuals"]["0.weight"]
    assert mem.abs().sum() > 0 and state["gradzip"]["step"] == 2
    other = _wrap(_model(), compression="topk:ratio=0.05", min_compress_numel=0, seed=3)
    other.load_state_dict(state)
    again = other.state_dict()
    assert torch.equal(again["gradzip"]["memories"]["0.weight"]["residuals"]["0.weight"], mem)
    assert again["gradzip"]["step"] == 2
    assert again["state"][0]["exp_avg"].equal(state["state"][0]["exp_avg"])
    wrong = _wrap(_model(), compression="fp16")
    with pytest.raises(ValueError, match="same compression= argument"):
        wrong.load_state_dict(state)


def test_a_checkpoint_of_another_rank_world_or_compressor_is_refused_whole() -> None:
    """Nothing is loaded (the optimizer's own state neither), and the message says what to do."""
    def build(spec: str) -> tuple[torch.nn.Module, Any]:
        torch.manual_seed(0)
        model = torch.nn.Linear(40, 40)
        opt = gradzip.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            model.named_parameters(), compression=spec, backend=LocalBackend(),
            min_compress_numel=0,
            dense_steps=0,
        )  # fmt: skip
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 40)).square().mean().backward()
            opt.step()
        return model, opt

    _, saved = build("onebit")
    state = saved.state_dict()
    other_world = {**state, "gradzip": {**state["gradzip"], "world_size": 4, "rank": 2}}
    _, fresh = build("onebit")
    before = fresh.state_dict()
    with pytest.raises(ValueError, match="rank 2 of 4, this is rank 0 of 1"):
        fresh.load_state_dict(other_world)
    _, topk = build("topk")
    with pytest.raises(ValueError, match="compressors"):
        topk.load_state_dict(state)
    after = fresh.state_dict()
    for k, v in before["state"].items():  # nothing loaded: momenta and residuals as they were
        assert torch.equal(after["state"][k]["momentum_buffer"], v["momentum_buffer"])
    for name, mem in before["gradzip"]["memories"].items():
        for key, r in mem["residuals"].items():
            assert torch.equal(after["gradzip"]["memories"][name]["residuals"][key], r)
    assert after["gradzip"]["step"] == before["gradzip"]["step"]
    fresh.load_state_dict({k: v for k, v in other_world.items() if k != "gradzip"})  # allowed
