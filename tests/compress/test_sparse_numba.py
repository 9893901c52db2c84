"""The numba kernels of top-k and DGC (gradzip/compress/_sparse_numba.py) against the torch
reference (GRADZIP_NUMBA=0): the selected set, the error-feedback state, NaN/Inf handling,
fresh steps and called-off steps, and the receive side."""

from __future__ import annotations

import pytest
import torch

from gradzip.compress import CompressionError, ResidualMemory
from gradzip.compress import kernels as dispatch
from gradzip.compress.base import generator
from gradzip.compress.dgc import DGC, DGCMemory
from gradzip.compress.topk import (
    TopK,
    desparsify_into,
    select,
    sparse_kernels,
    sparsify,
    sparsify_sampled,
    topk_count,
)


@pytest.fixture(autouse=True)
def _numba_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADZIP_NUMBA", "1")


def _distinct(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """``n`` values of distinct magnitudes (a permutation of 1..n with random signs)."""
    gen = torch.Generator().manual_seed(seed)
    mags = (torch.randperm(n, generator=gen) + 1).to(torch.float32) * scale
    signs = torch.randint(2, (n,), generator=gen).to(torch.float32) * 2 - 1
    return mags * signs


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().view(torch.int32)


def _check_payload(x: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> None:
    """Unique ascending int32 indices and the fp32 values found there."""
    assert idx.dtype == torch.int32 and vals.dtype == torch.float32
    if idx.numel() > 1:
        assert bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(_bits(vals), _bits(x.reshape(-1)[idx.long()]))


def _off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADZIP_NUMBA", "0")


def test_kernels_follow_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sparse_kernels() is not None
    assert TopK().fresh_feedback(torch.zeros(3)) and DGC().fresh_feedback(torch.zeros(3))
    _off(monkeypatch)
    assert sparse_kernels() is None
    # the unfused steps store new tensors: the old ones stay as they were, no copy needed
    assert TopK().fresh_feedback(torch.zeros(3)) and DGC().fresh_feedback(torch.zeros(3))


@pytest.mark.parametrize("n", [1, 2, 7, 255, 1000, 2**14 + 3, 2**16 + 1, 100003])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.3, 1.0])
def test_exact_is_the_topk_set(n: int, ratio: float) -> None:
    x = _distinct(n, seed=n)
    (idx, vals), ctx = select(x, ratio, "exact", 0.01, 0)
    _check_payload(x, idx, vals)
    ref = torch.topk(x.abs(), topk_count(ratio, n)).indices
    assert torch.equal(idx.long(), torch.sort(ref).values)
    assert ctx.numel == n


def test_exact_on_the_largest_tensor_once() -> None:
    x = torch.randn(2**22, generator=torch.Generator().manual_seed(22))
    (idx, vals), _ = select(x, 0.01, "exact", 0.01, 0)
    _check_payload(x, idx, vals)
    ref = torch.topk(x.abs(), topk_count(0.01, x.numel())).indices
    assert torch.equal(idx.long(), torch.sort(ref).values)


@pytest.mark.parametrize(
    "name",
    ["all_equal", "many_zeros", "signed_zeros", "denormals", "sample_too_high", "sample_too_low"],
)
def test_exact_on_adversarial_inputs(name: str) -> None:
    n = 2**17
    k = topk_count(0.01, n)
    step = n // 16384  # the strided sample of the exact selection (see choose)
    if name == "all_equal":
        x = torch.full((n,), -0.5)
    elif name == "many_zeros":
        x = torch.zeros(n)
        x[torch.arange(0, n, 997)] = _distinct(len(range(0, n, 997)), seed=1)
    elif name == "signed_zeros":
        x = torch.zeros(n)
        x[1::2] = -0.0
        x[::4001] = _distinct(len(range(0, n, 4001)), seed=2)
    elif name == "denormals":
        x = _distinct(n, seed=3, scale=1e-45)  # multiples of the smallest denormal
        assert bool((x.abs() < torch.finfo(torch.float32).tiny).all())
    elif name == "sample_too_high":  # huge values exactly where the sample looks
        x = _distinct(n, seed=4)
        x[step // 2 :: step] *= 1e6
    else:  # the sample sees only tiny values: every other value is a candidate
        x = _distinct(n, seed=5)
        x[step // 2 :: step] *= 1e-6
    (idx, vals), _ = select(x, 0.01, "exact", 0.01, 0)
    _check_payload(x, idx, vals)
    assert idx.numel() == k
    mag = x.abs()
    kept = torch.zeros(n, dtype=torch.bool)
    kept[idx.long()] = True
    assert mag[kept].min() >= mag[~kept].max()
    # ties at the cut go to the lowest indices
    cut = mag[kept].min()
    tied = torch.nonzero(mag == cut).squeeze(1)
    taken = int((mag[kept] == cut).sum())
    assert torch.equal(torch.sort(idx.long()[mag[idx.long()] == cut]).values, tied[:taken])
    if name != "all_equal":
        distinct = mag[mag > cut]
        assert bool(kept[mag > cut].all()) and distinct.numel() <= k


@pytest.mark.parametrize("n", [300, 5000, 2**16 + 5, 300000])
@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("k", [1, 30, 999])
def test_sampled_is_the_reference_set(n: int, seed: int, k: int) -> None:
    k = min(k, n // 2)
    x = _distinct(n, seed=seed + n)
    (idx, vals), _ = select(x, 0.5, "sampled", 0.01, seed, k=k)
    _check_payload(x, idx, vals)
    ref, _ = sparsify_sampled(x, k, sample_ratio=0.01, gen=generator(seed))
    assert torch.equal(idx.long(), torch.sort(ref.long()).values)


def test_sampled_with_ties_everywhere() -> None:
    n, k = 2**16, 100
    x = torch.ones(n)
    x[:5] = 3.0
    (idx, _vals), _ = select(x, 0.5, "sampled", 0.01, 1, k=k)
    ref, _ = sparsify_sampled(x, k, sample_ratio=0.01, gen=generator(1))
    assert idx.numel() == ref.numel() == k
    assert bool((idx[:5] == torch.arange(5)).all())  # the 3.0s
    # the ties at the cut are trimmed as the reference trims them: the same set
    assert torch.equal(idx.long(), torch.sort(ref.long()).values)


def test_empty_and_nonfinite_plain_compress() -> None:
    (idx, vals), ctx = TopK().compress(torch.empty(0))
    assert idx.numel() == vals.numel() == 0 and ctx.numel == 0
    x = _distinct(1000)
    x[17] = float("nan")
    (idx, vals), _ = TopK(ratio=0.01).compress(x)  # the torch reference decides: NaN first
    ref_idx, _ = sparsify(x, 10)
    assert torch.equal(torch.sort(idx.long()).values, torch.sort(ref_idx.long()).values)


def _topk_ref(comp: TopK, mem: ResidualMemory, grad: torch.Tensor, seed: int,
              monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, torch.Tensor]:
    _off(monkeypatch)
    compensated = mem.compensate("w", grad)
    payload, ctx = comp.compress(compensated, seed=seed)
    kept = compensated.clone()  # update consumes it
    mem.update("w", compensated, comp.decompress(payload, ctx))
    monkeypatch.setenv("GRADZIP_NUMBA", "1")
    return payload[0], kept


@pytest.mark.parametrize("shape", [(1,), (1000,), (37, 29), (2**14 + 3,), (0,), ()])
@pytest.mark.parametrize("options", [{}, {"ratio": 0.3}, {"selection": "sampled"}])
def test_topk_fused_step_equals_the_unfused_steps(
    shape: tuple[int, ...], options: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    comp = TopK(**options)  # type: ignore[arg-type]
    fused, ref = ResidualMemory(), ResidualMemory()
    n = int(torch.tensor(shape).prod()) if shape else 1
    for step in range(4):
        # continuous values: sums of residual and gradient do not tie at the cut
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        if step == 2 and n > 4:
            grad.view(-1)[:3] = torch.tensor([0.0, -0.0, -0.0])
        fresh = step % 2 == 0
        old = fused.residuals.get("w")
        before = None if old is None else old.clone()
        snap = fused.snapshot("w", copy=not fresh)
        payload, ctx = comp.compress_with_feedback(fused, "w", grad, seed=step, fresh=fresh)
        fused.release("w", snap)
        ref_idx, compensated = _topk_ref(comp, ref, grad, step, monkeypatch)
        _check_payload(compensated, payload[0], payload[1])
        assert torch.equal(payload[0].long(), torch.sort(ref_idx.long()).values)
        # residual == (old residual + grad) - decompress(payload), bit for bit
        expect = compensated - comp.decompress(payload, ctx)
        assert torch.equal(_bits(fused.residuals["w"]), _bits(expect))
        assert torch.equal(_bits(fused.residuals["w"]), _bits(ref.residuals["w"]))
        if fresh and old is not None:
            assert fused.residuals["w"] is not old
            assert torch.equal(_bits(old), _bits(before))  # the old tensor is untouched


def test_fresh_steps_reuse_the_spare_buffer() -> None:
    comp, mem = TopK(), ResidualMemory()
    ptrs = []
    for step in range(4):
        snap = mem.snapshot("w", copy=False)
        comp.compress_with_feedback(mem, "w", _distinct(5000, seed=step), fresh=True)
        mem.release("w", snap)
        ptrs.append(mem.residuals["w"].data_ptr())
    assert ptrs[2] == ptrs[0] and ptrs[3] == ptrs[1] and ptrs[0] != ptrs[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    comp, fused, ref = TopK(ratio=0.05), ResidualMemory(), ResidualMemory()
    for step in range(3):
        grad = (_distinct(250, seed=step) / 64).to(dtype)  # exact in fp16 and bf16
        payload, ctx = comp.compress_with_feedback(fused, "w", grad, fresh=True)
        ref_idx, _ = _topk_ref(comp, ref, grad, 0, monkeypatch)
        assert ctx.dtype == torch.float32
        assert torch.equal(payload[0].long(), torch.sort(ref_idx.long()).values)
        assert torch.equal(_bits(fused.residuals["w"]), _bits(ref.residuals["w"]))


@pytest.mark.parametrize("comp", [TopK(), DGC(epoch=None), DGC(selection="exact")])
@pytest.mark.parametrize("fresh", [True, False])
def test_called_off_steps_leave_memory_as_before(comp: object, fresh: bool) -> None:
    mem = comp.make_memory()  # type: ignore[attr-defined]
    states = (lambda: [mem.residuals]) if isinstance(mem, ResidualMemory) else (
        lambda: [mem.momenta, mem.velocities])
    for step in range(3):
        before = [{k: _bits(t).clone() for k, t in d.items()} for d in states()]
        snap = mem.snapshot("w", copy=not fresh)
        comp.compress_with_feedback(mem, "w", _distinct(3000, seed=step), fresh=fresh)  # type: ignore[attr-defined]
        mem.restore("w", snap)
        after = [{k: _bits(t) for k, t in d.items()} for d in states()]
        assert [sorted(d) for d in before] == [sorted(d) for d in after]
        for b, a in zip(before, after, strict=True):
            assert all(torch.equal(b[k], a[k]) for k in b)
        snap = mem.snapshot("w", copy=not fresh)  # now one that counts
        comp.compress_with_feedback(mem, "w", _distinct(3000, seed=step), fresh=fresh)  # type: ignore[attr-defined]
        mem.release("w", snap)


def _state(mem: object, key: str) -> list[torch.Tensor]:
    """The error-feedback tensors of ``key``: the residual, or DGC's u and v."""
    if isinstance(mem, ResidualMemory):
        return [mem.residuals[key]]
    assert isinstance(mem, DGCMemory)
    return [mem.momenta[key], mem.velocities[key]]


@pytest.mark.parametrize("comp", [TopK(), TopK(selection="sampled"), DGC(epoch=None),
                                  DGC(clip_norm=1.0)])
@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_raises_and_keeps_memory(comp: object, fresh: bool, bad: float) -> None:
    mem = comp.make_memory()  # type: ignore[attr-defined]
    grad = _distinct(5000)
    comp.compress_with_feedback(mem, "layer.w", grad, fresh=True)  # type: ignore[attr-defined]
    held = _state(mem, "layer.w")
    before = [_bits(t).clone() for t in held]
    grad = grad.clone()
    grad[4321] = bad
    with pytest.raises(CompressionError, match=r"layer\.w"):
        comp.compress_with_feedback(mem, "layer.w", grad, fresh=fresh)  # type: ignore[attr-defined]
    assert all(a is b for a, b in zip(_state(mem, "layer.w"), held, strict=True))
    assert all(torch.equal(_bits(t), b) for t, b in zip(held, before, strict=True))
    fresh_mem = comp.make_memory()  # type: ignore[attr-defined]
    with pytest.raises(CompressionError, match=r"layer\.w"):  # no state yet: none is stored
        comp.compress_with_feedback(fresh_mem, "layer.w", grad, fresh=fresh)  # type: ignore[attr-defined]
    state = fresh_mem.state_dict()
    assert not state.get("residuals") and not state.get("momenta")


@pytest.mark.parametrize("fresh", [True, False])
def test_overflowing_residual(fresh: bool) -> None:
    comp, mem = TopK(ratio=0.001), ResidualMemory()
    mem.residuals["w"] = torch.full((1000,), 3e38)
    held = mem.residuals["w"]
    grad = torch.full((1000,), 3e38)
    with pytest.raises(CompressionError, match=r"'w'.*NaN or Inf"):
        comp.compress_with_feedback(mem, "w", grad, fresh=fresh)
    if fresh:
        assert mem.residuals["w"] is held and bool((held == 3e38).all())
    else:
        assert "w" not in mem.residuals  # written over in place: reset


def _dgc_ref(comp: DGC, mem: DGCMemory, grad: torch.Tensor, seed: int,
             monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    _off(monkeypatch)
    v = mem.compensate("w", grad)
    payload, ctx = comp.compress(v, seed=seed)
    mem.update("w", v, comp.decompress(payload, ctx))
    monkeypatch.setenv("GRADZIP_NUMBA", "1")
    return payload[0]


@pytest.mark.parametrize(
    "options",
    [{"epoch": None}, {}, {"selection": "exact"}, {"clip_norm": 50.0, "world_size": 4},
     {"momentum": 0.0}, {"min_values": 0, "ratio": 0.01}, {"epoch": 1.0},
     {"sample_ratio": 0.1, "epoch": None}, {"masking": True}, {"masking": True, "epoch": 1.0}],
)
@pytest.mark.parametrize("n", [5, 300, 5000, 100003])
def test_dgc_fused_step_equals_the_unfused_steps(
    options: dict[str, object], n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = DGC(**options)  # type: ignore[arg-type]
    fused, ref = base.make_memory(), base.make_memory()
    for step in range(4):
        comp = base.at_step(step * 40) if "epoch" not in options else base
        grad = _distinct(n, seed=step, scale=0.01)
        if step == 2 and n > 4:
            grad[:3] = torch.tensor([0.0, -0.0, -0.0])
        fresh = step % 2 == 0
        snap = fused.snapshot("w", copy=not fresh)
        payload, ctx = comp.compress_with_feedback(fused, "w", grad, seed=step, fresh=fresh)
        fused.release("w", snap)
        ref_idx = _dgc_ref(comp, ref, grad, step, monkeypatch)
        assert ctx.dtype == torch.float32 and payload[0].numel() <= comp.count(n)
        assert torch.equal(payload[0].long(), torch.sort(ref_idx.long()).values)
        assert torch.equal(_bits(fused.momenta["w"]), _bits(ref.momenta["w"]))
        assert torch.equal(_bits(fused.velocities["w"]), _bits(ref.velocities["w"]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dgc_half_gradients(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    comp = DGC(epoch=None, min_values=8)
    fused, ref = comp.make_memory(), comp.make_memory()
    for step in range(3):
        grad = (_distinct(250, seed=step) / 64).to(dtype)
        payload, _ = comp.compress_with_feedback(fused, "w", grad, seed=step, fresh=True)
        ref_idx = _dgc_ref(comp, ref, grad, step, monkeypatch)
        assert torch.equal(payload[0].long(), torch.sort(ref_idx.long()).values)
        assert torch.equal(_bits(fused.velocities["w"]), _bits(ref.velocities["w"]))


def test_dgc_fresh_leaves_old_state_and_reuses_buffers() -> None:
    comp = DGC(epoch=None)
    mem = comp.make_memory()
    ptrs = []
    for step in range(4):
        old = (mem.momenta.get("w"), mem.velocities.get("w"))
        before = [None if t is None else t.clone() for t in old]
        snap = mem.snapshot("w", copy=False)
        comp.compress_with_feedback(mem, "w", _distinct(4000, seed=step), fresh=True)
        for t, b in zip(old, before, strict=True):
            assert t is None or torch.equal(_bits(t), _bits(b))
        mem.release("w", snap)
        ptrs.append({mem.momenta["w"].data_ptr(), mem.velocities["w"].data_ptr()})
    assert ptrs[2] == ptrs[0] and ptrs[3] == ptrs[1] and not ptrs[0] & ptrs[1]


def test_fallbacks_when_numba_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    _off(monkeypatch)
    for comp in (TopK(), DGC(epoch=None)):
        mem = comp.make_memory()
        grad = _distinct(3000)
        assert dispatch.has_feedback_step(comp, grad)
        assert dispatch.fresh_feedback(comp, grad)
        payload, ctx = dispatch.feedback_step(comp, mem, "w", grad)  # type: ignore[misc]
        state = mem.residuals["w"] if isinstance(mem, ResidualMemory) else mem.velocities["w"]
        assert torch.equal(state.reshape(-1) + comp.decompress(payload, ctx), grad)
        # what the optimizer relies on when it takes no copy: a fresh step, then called off,
        # gives back the old state exactly
        before = state.clone()
        snap = mem.snapshot("w", copy=False)
        dispatch.feedback_step(comp, mem, "w", _distinct(3000, seed=1), fresh=True)
        mem.restore("w", snap)
        again = mem.residuals["w"] if isinstance(mem, ResidualMemory) else mem.velocities["w"]
        assert again is state and torch.equal(again, before)
    comp_ef_off, none = TopK(error_feedback=False), TopK(error_feedback=False).make_memory()
    payload, _ = comp_ef_off.compress_with_feedback(none, "w", _distinct(100))
    assert payload[0].numel() == 1


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_desparsify_into_matches_index_add(index_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(1000, generator=gen)
    idx = torch.randint(1000, (300,), generator=gen).to(index_dtype)  # repeats add up
    vals = torch.randn(300, generator=gen)
    ref = out.clone().index_add_(0, idx.long(), vals)
    desparsify_into(out, idx, vals)
    assert torch.equal(_bits(out), _bits(ref))
    desparsify_into(out, idx[:0], vals[:0])
    assert torch.equal(_bits(out), _bits(ref))


@pytest.mark.parametrize("bad", [-1, 1000, 2**31 - 1])
def test_desparsify_into_rejects_out_of_range(bad: int) -> None:
    out = torch.zeros(1000)
    idx = torch.tensor([3, bad, 5], dtype=torch.int32 if bad < 2**31 else torch.int64)
    with pytest.raises(CompressionError, match=rf"\[.*{bad}.*\] does not fit a tensor of 1000"):
        desparsify_into(out, idx, torch.ones(3))
    assert not bool(out.any())  # nothing written


@pytest.mark.parametrize("name", ["sample_too_high", "sample_too_low", "all_equal", "plain"])
@pytest.mark.parametrize("selection", ["exact", "sampled"])
@pytest.mark.parametrize("fresh", [True, False])
def test_topk_fused_fallbacks_keep_the_residual_exact(
    name: str, selection: str, fresh: bool
) -> None:
    """The fused pass zeroes its candidates at once and puts back the unselected ones; the
    slow paths (too few candidates, too many for the buffer, ties) must end the same way."""
    n = 2**17
    step = n // 16384  # the evenly spread sample of the exact selection
    comp, mem = TopK(selection=selection), ResidualMemory()  # type: ignore[arg-type]
    mem.residuals["w"] = torch.randn(n, generator=torch.Generator().manual_seed(1)) * 1e-3
    grad = torch.randn(n, generator=torch.Generator().manual_seed(2))
    if name == "sample_too_high":
        grad[step // 2 :: step] *= 1e6
    elif name == "sample_too_low":
        grad[step // 2 :: step] *= 1e-6
    elif name == "all_equal":
        mem.residuals["w"].zero_()
        grad.fill_(0.25)
    compensated = mem.residuals["w"] + grad
    payload, ctx = comp.compress_with_feedback(mem, "w", grad, fresh=fresh)
    _check_payload(compensated, payload[0], payload[1])
    expect = compensated - comp.decompress(payload, ctx)
    assert torch.equal(_bits(mem.residuals["w"]), _bits(expect))
    kept = torch.zeros(n, dtype=torch.bool)
    kept[payload[0].long()] = True
    assert compensated.abs()[kept].min() >= compensated.abs()[~kept].max()
    if selection == "exact":
        assert payload[0].numel() == topk_count(comp.ratio, n)
