"""DistributedOptimizer semantics on 2 real gloo ranks, against a one-process reference.

One forked group runs every scenario (``runs`` fixture); each rank also trains a reference
copy of the model that recomputes both ranks' gradients and combines them by hand. With
``compression="none"`` the results must be bit-identical: a sum of two fp32 numbers does not
depend on the order, and the mean divides by 2 exactly.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "allreduce"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import run_ranks
from opt_workers import (
    Net,
    batch,
    combine,
    flat,
    grads_of,
    loss_of,
    same_on_all_ranks,
    set_grads,
)

import gradzip
from gradzip.allreduce.backend import Backend

P, STEPS = 2, 4


def _pair(backend: Backend, op: Any = gradzip.Average, **kw: Any) -> tuple[Net, Any, Net, Any]:
    """The distributed model+optimizer and a reference model+plain optimizer, same init."""
    torch.manual_seed(0)
    model = Net()
    torch.manual_seed(0)
    ref = Net()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    kw.setdefault("momentum_correction", False)  # the reference runs SGD's own momentum
    kw.setdefault("dense_steps", 0)  # compressed from the first step
    opt = gradzip.DistributedOptimizer(
        base, model.named_parameters(), backend=backend, op=op, fusion_bytes=512, **kw
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return model, opt, ref, ref_opt


def _plain(backend: Backend, op: Any) -> dict[str, Any]:
    """compression="none" vs the hand-made average (or sum); identical after every step."""
    model, opt, ref, ref_opt = _pair(backend, op)
    same = []
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, *batch(step, backend.rank)).backward()
        opt.step()
        grads = [grads_of(ref, lambda r=r, s=step: loss_of(ref, *batch(s, r))) for r in range(P)]
        set_grads(ref, combine(grads, average=op is gradzip.Average))
        ref_opt.step()
        same.append(same_on_all_ranks(backend, model))
    return {"got": flat(model), "want": flat(ref), "same": same}


def _accumulate(backend: Backend) -> dict[str, Any]:
    """backward_passes_per_step=3: three passes summed locally, then one reduction."""
    model, opt, ref, ref_opt = _pair(backend, backward_passes_per_step=3)
    calls = []
    for step in range(STEPS):
        opt.zero_grad()
        before = backend.stats.collectives
        for micro in range(3):
            loss_of(model, *batch(step, backend.rank, extra=micro)).backward()
        calls.append(backend.stats.collectives - before)
        opt.step()
        per_rank = []
        for r in range(P):
            parts = [
                grads_of(ref, lambda r=r, m=m, s=step: loss_of(ref, *batch(s, r, extra=m)))
                for m in range(3)
            ]
            per_rank.append(combine(parts, average=False))
        set_grads(ref, combine(per_rank))
        ref_opt.step()
    return {"got": flat(model), "want": flat(ref), "calls_in_backward": calls}


def _clip_and_amp(backend: Backend, amp: bool) -> dict[str, Any]:
    """synchronize(); (AMP: unscale_;) clip; step() in skip_synchronize()."""
    model, opt, ref, ref_opt = _pair(backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if amp else None
    warned = []
    for step in range(STEPS):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_of(model, *batch(step, backend.rank))
        (scaler.scale(loss) if scaler else loss).backward()
        opt.synchronize()
        if scaler:
            scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        with opt.skip_synchronize(), warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            scaler.step(opt) if scaler else opt.step()
        warned.append(len(w))
        if scaler:
            scaler.update()

        def ref_loss(r: int, s: int = step) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                return loss_of(ref, *batch(s, r))

        set_grads(ref, combine([grads_of(ref, lambda r=r: ref_loss(r)) for r in range(P)]))
        nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
    return {"got": flat(model), "want": flat(ref), "warned": warned}


def _unused_and_frozen(backend: Backend) -> dict[str, Any]:
    """The branch is used by rank 0 only, then by no rank, then by both."""
    model, opt, ref, ref_opt = _pair(backend)
    frozen_before = model.frozen.weight.detach().clone()
    uses = [(True, False), (False, False), (True, True)]
    branch_grad_none = []
    for step, use in enumerate(uses):
        opt.zero_grad()
        loss_of(model, *batch(step, backend.rank), use_branch=use[backend.rank]).backward()
        opt.synchronize()
        branch_grad_none.append(model.branch.weight.grad is None)
        with opt.skip_synchronize():
            opt.step()
        grads = [
            grads_of(ref, lambda r=r, s=step, u=use: loss_of(ref, *batch(s, r), u[r]))
            for r in range(P)
        ]
        set_grads(ref, combine(grads))
        ref_opt.step()
    return {
        "got": flat(model),
        "want": flat(ref),
        "branch_grad_none": branch_grad_none,
        "frozen_same": torch.equal(frozen_before, model.frozen.weight),
        "frozen_grad": model.frozen.weight.grad,
        "plan": opt.compression_plan(),
    }


def _misuse(backend: Backend) -> dict[str, Any]:
    """zero_grad between two accumulated backward passes; reduced by the end of backward."""
    model, opt, _, _ = _pair(backend)
    out: dict[str, Any] = {"isinstance": isinstance(opt, torch.optim.SGD)}
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    acc_model = Net()
    acc = gradzip.DistributedOptimizer(
        torch.optim.SGD(acc_model.parameters(), lr=0.1), acc_model.named_parameters(),
        backend=backend, backward_passes_per_step=2,
        dense_steps=0,
    )  # fmt: skip
    loss_of(acc_model, *batch(0, backend.rank)).backward()  # 1 of 2: still accumulating
    try:
        acc.zero_grad()
    except RuntimeError as e:
        out["zero_grad"] = str(e)
    loss_of(acc_model, *batch(1, backend.rank)).backward()  # 2 of 2: reduced as it ends
    out["acc_dirty"] = acc._gz.dirty  # type: ignore[attr-defined]
    acc.step()
    loss_of(model, *batch(0, backend.rank)).backward()
    out["dirty_after_backward"] = opt._gz.dirty  # type: ignore[attr-defined]
    opt.step()
    sched.step()
    out["lr"] = opt.param_groups[0]["lr"]
    out["same"] = same_on_all_ranks(backend, model)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt.zero_grad()
        loss_of(model, *batch(2, backend.rank)).backward()
        opt.synchronize()
        opt.step()  # after synchronize() without skip_synchronize(): warns, no second reduce
    out["warnings"] = [str(x.message) for x in w]
    out["auto_backend"] = type(
        gradzip.DistributedOptimizer(torch.optim.SGD(Net().parameters(), lr=0.1)).backend
    ).__name__
    return out


def _onebit(backend: Backend, dense_steps: int = 0) -> dict[str, Any]:
    """onebit over allgather takes the fused error-feedback step; the result must equal the
    unfused reference: per rank compensate, compress, decompress, update; then the mean.
    With ``dense_steps`` the first steps are plain averages and feedback starts after them."""
    from gradzip.compress.memory import ResidualMemory
    from gradzip.compress.onebit import OneBit

    calls = []
    fused = OneBit.compress_with_feedback

    def counting(self: OneBit, *args: Any, **kw: Any) -> Any:
        calls.append(1)
        return fused(self, *args, **kw)

    OneBit.compress_with_feedback = counting  # type: ignore[method-assign]
    try:
        model, opt, ref, ref_opt = _pair(
            backend, compression="onebit", min_compress_numel=0, dense_steps=dense_steps
        )
        comp = OneBit()
        memories = [ResidualMemory() for _ in range(P)]
        residuals, exact, branch = [], [], []
        for step in range(STEPS):
            opt.zero_grad()
            loss_of(model, *batch(step, backend.rank)).backward()
            opt.step()
            memories_now = opt.state_dict()["gradzip"]["memories"]
            residuals.append(len(memories_now["fc1.weight"]["residuals"]))
            branch.append(len(memories_now["branch.weight"]["residuals"]))
            decoded = []
            for r in range(P):
                grads = grads_of(ref, lambda r=r, s=step: loss_of(ref, *batch(s, r)))
                if step < dense_steps:
                    decoded.append(grads)
                    continue
                out = []
                for (name, _), g in zip(ref.named_parameters(), grads, strict=True):
                    if g is None:
                        out.append(None)
                        continue
                    c = memories[r].compensate(name, g)
                    d = comp.decompress(*comp.compress(c))
                    memories[r].update(name, c, d)
                    out.append(d)
                decoded.append(out)
            set_grads(ref, combine(decoded))
            ref_opt.step()
            exact.append(torch.equal(flat(model), flat(ref)))
    finally:
        OneBit.compress_with_feedback = fused  # type: ignore[method-assign]
    return {
        "got": flat(model),
        "want": flat(ref),
        "calls": len(calls),
        "residuals": residuals,
        "branch": branch,
        "exact": exact,
    }


def _all(backend: Backend) -> dict[str, Any]:
    return {
        "onebit": _onebit(backend),
        "onebit_dense2": _onebit(backend, dense_steps=2),
        "avg": _plain(backend, gradzip.Average),
        "sum": _plain(backend, gradzip.Sum),
        "acc": _accumulate(backend),
        "clip": _clip_and_amp(backend, amp=False),
        "amp": _clip_and_amp(backend, amp=True),
        "unused": _unused_and_frozen(backend),
        "misuse": _misuse(backend),
    }


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return run_ranks(_all, P, timeout_s=120)


@pytest.mark.parametrize("case", ["avg", "sum"])
def test_none_equals_hand_reduced_reference(runs: list[dict[str, Any]], case: str) -> None:
    for r in runs:
        assert torch.equal(r[case]["got"], r[case]["want"])
        assert all(r[case]["same"])
    assert not torch.equal(runs[0]["avg"]["got"], runs[0]["sum"]["got"])


def test_onebit_fused_feedback_equals_unfused_reference(runs: list[dict[str, Any]]) -> None:
    for r in runs:
        o = r["onebit"]
        # fc1, fc2 and the unused branch (weights and biases), every step: the fused path;
        # the branch, which no rank used, has its feedback called off each time
        assert o["calls"] == STEPS * 6
        assert o["branch"] == [0] * STEPS
        torch.testing.assert_close(o["got"], o["want"], rtol=1e-6, atol=1e-7)
    assert torch.equal(runs[0]["onebit"]["got"], runs[1]["onebit"]["got"])


def test_dense_steps_send_plain_gradients_then_start_feedback(
    runs: list[dict[str, Any]],
) -> None:
    for r in runs:
        o = r["onebit_dense2"]
        assert o["calls"] == (STEPS - 2) * 6  # no 1-bit step during the two dense ones
        assert o["exact"][:2] == [True, True]  # plain averages: bit for bit the reference
        assert o["residuals"][:2] == [0, 0]  # no residual state while dense
        assert all(n > 0 for n in o["residuals"][2:])  # error feedback from step 3 on
        torch.testing.assert_close(o["got"], o["want"], rtol=1e-6, atol=1e-7)
        assert not torch.equal(o["got"], r["onebit"]["got"])  # the warm-up changed training
    assert torch.equal(runs[0]["onebit_dense2"]["got"], runs[1]["onebit_dense2"]["got"])


def test_accumulation_communicates_once_per_step(runs: list[dict[str, Any]]) -> None:
    for r in runs:
        assert torch.equal(r["acc"]["got"], r["acc"]["want"])
        assert all(c > 0 for c in r["acc"]["calls_in_backward"])  # launched during backward
    assert torch.equal(runs[0]["acc"]["got"], runs[1]["acc"]["got"])


@pytest.mark.parametrize("case", ["clip", "amp"])
def test_clipping_and_amp_between_synchronize_and_step(
    runs: list[dict[str, Any]], case: str
) -> None:
    for r in runs:
        torch.testing.assert_close(r[case]["got"], r[case]["want"], rtol=1e-6, atol=1e-7)
        assert r[case]["warned"] == [0] * STEPS
    assert torch.equal(runs[0][case]["got"], runs[1][case]["got"])


def test_unused_branch_and_frozen_params(runs: list[dict[str, Any]]) -> None:
    for r in runs:
        u = r["unused"]
        assert torch.equal(u["got"], u["want"])
        # step 0: rank 1 lacked it but rank 0 had it -> a gradient everywhere;
        # step 1: no rank used it -> stays None (the optimizer skips it)
        assert u["branch_grad_none"] == [False, True, False]
        assert u["frozen_same"] and u["frozen_grad"] is None
        assert not any(name.startswith("frozen") for name in u["plan"])


def test_misuse_fails_loudly_and_schedulers_work(runs: list[dict[str, Any]]) -> None:
    for r in runs:
        m = r["misuse"]
        assert m["isinstance"]
        assert "zero_grad() was called after loss.backward()" in m["zero_grad"]
        assert not m["acc_dirty"] and not m["dirty_after_backward"]  # reduced in backward
        assert m["lr"] == pytest.approx(0.05)
        assert m["same"]
        assert any("skip_synchronize" in w for w in m["warnings"])
        assert m["auto_backend"] == "TorchDistBackend"


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_dense_steps_is_named(bad: Any) -> None:
    from gradzip.allreduce.backend import LocalBackend

    model = Net()
    with pytest.raises(ValueError, match="dense_steps"):
        gradzip.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
            compression="onebit", backend=LocalBackend(), dense_steps=bad,
        )  # fmt: skip
