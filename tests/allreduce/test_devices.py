"""Device discipline: every tensor that reaches a collective lives on the backend's device.

The gradients live on the CPU; the backend is a :class:`~device_double.DeviceBackend` that
declares the lazy device and refuses any other, as an NCCL group refuses CPU tensors. The
optimizer (every compressor and strategy, dense steps, SFB, an unused branch), the DDP hook,
and both broadcasts run through it on 2 and 3 gloo ranks, and must give bit for bit what the
same runs give over the plain gloo backend. One run with a control tensor made on the CPU
(``control`` patched to ignore the device) shows the double would catch it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_double import WrongDevice, wrap
from dist_utils import run_ranks

import gradzip
from gradzip.allreduce.backend import Backend, LocalBackend, control

# label -> (compression, options of DistributedOptimizer)
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "onebit": ("onebit", {"gather": "allgather"}),  # the default at 2 ranks only
    "onebit scatter_gather": ("onebit", {"gather": "scatter_gather"}),
    "qsgd": ("qsgd", {}),
    "qsgd scatter_gather": ("qsgd", {"gather": "scatter_gather"}),
    "terngrad": ("terngrad", {}),
    "terngrad ternary_sum": ("terngrad", {"gather": "ternary_sum"}),
    "topk": ("topk:ratio=0.05", {}),
    "topk recursive": ("topk:ratio=0.05", {"sparse": "recursive"}),
    "dgc": ("dgc:ratio=0.05,warmup_epochs=0", {}),
    "sfb": ("sfb", {}),
    "onebit dense_steps": ("onebit", {"dense_steps": 1}),
}
HOOKS = ["none", "fp16", "onebit", "topk:ratio=0.05", "dgc:ratio=0.05,warmup_epochs=0"]
STEPS = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 48)
        self.branch = nn.Linear(48, 48)
        self.fc2 = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor, branch: bool) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h + self.branch(h) if branch else h)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(backend: Backend, spec: str, kw: dict[str, Any]) -> torch.Tensor:
    torch.manual_seed(0)
    model = Net()
    momentum = 0.0 if spec.startswith("dgc") else 0.9
    opt = gradzip.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum),
        model.named_parameters(), compression=spec, backend=backend, model=model,
        min_compress_numel=0, fusion_bytes=4096, **{"dense_steps": 0, **kw},
    )  # fmt: skip
    gradzip.broadcast_parameters(model.state_dict(), backend=backend)
    gradzip.broadcast_optimizer_state(opt, backend=backend)
    gen = torch.Generator().manual_seed(backend.rank)
    for step in range(STEPS):
        opt.zero_grad()
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        branch = (step + backend.rank) % 2 == 0  # used on some ranks only
        (model(x, branch) - y).square().mean().backward()
        opt.step()
    return _flat(model)


def _ddp(backend: Backend, spec: str) -> torch.Tensor:
    from torch.nn.parallel import DistributedDataParallel

    from gradzip.hooks.ddp import DDPHookState, compressed_hook

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.004)
    state = DDPHookState(spec, backend=backend, optimizer=opt, dense_steps=0)
    ddp.register_comm_hook(state, compressed_hook)
    gen = torch.Generator().manual_seed(backend.rank)
    for _ in range(STEPS):
        opt.zero_grad()
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        (ddp(x) - y).square().mean().backward()
        opt.step()
    return _flat(model)


def _everything(backend: Backend) -> dict[str, Any]:
    double = wrap(backend)
    out: dict[str, Any] = {"opt": {}, "ddp": {}}
    for label, (spec, kw) in RUNS.items():
        if "ternary_sum" in label and backend.size > 2:
            continue
        out["opt"][label] = (_train(backend, spec, kw), _train(double, spec, kw))
    for spec in HOOKS:
        out["ddp"][spec] = (_ddp(backend, spec), _ddp(double, spec))
    out["seen"] = dict(double.seen)
    try:
        double.allreduce(torch.zeros(2))
    except WrongDevice as e:
        out["refused"] = str(e)
    return out


@pytest.fixture(scope="module", params=[2, 3])
def runs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return run_ranks(_everything, request.param, timeout_s=300)


def test_every_path_hands_collectives_only_tensors_on_the_backend_device(
    runs: list[dict[str, Any]],
) -> None:
    for r in runs:
        for kind in ("allreduce", "allgather", "alltoall", "broadcast"):
            assert r["seen"].get(kind, 0) > 0, kind  # each kind went through the double
        assert "a tensor on cpu" in r["refused"]
        for where in ("opt", "ddp"):
            for label, (plain, moved) in r[where].items():
                assert torch.equal(plain, moved), (where, label)  # the device changes nothing
    for where in ("opt", "ddp"):
        for label in runs[0][where]:  # replicas identical
            assert all(torch.equal(r[where][label][1], runs[0][where][label][1]) for r in runs)


def _stray_control(backend: Backend) -> str:
    """The pipeline's flags made on the CPU, as ``torch.tensor(...)`` would make them."""
    import gradzip.hooks.pipeline as pipeline

    pipeline.control = lambda b, values, dtype: torch.tensor(list(values), dtype=dtype)  # type: ignore[assignment]
    try:
        _train(wrap(backend), "none", {})
    except WrongDevice as e:
        return str(e)
    finally:
        pipeline.control = control  # type: ignore[attr-defined]
    return "not caught"


def test_a_cpu_control_tensor_is_caught() -> None:
    for message in run_ranks(_stray_control, 2, expect_errors=True):
        assert "allreduce: a tensor on cpu" in str(message)


def test_local_backend_declares_its_device() -> None:
    assert LocalBackend().device == torch.device("cpu")
    flags = control(LocalBackend("meta"), [1, 0], torch.int32)
    assert flags.device.type == "meta" and flags.dtype == torch.int32
