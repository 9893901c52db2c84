import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradzip
from gradzip.compress import CompressionError
from gradzip.compress.dgc import DGC, DGCMemory, check_optimizer, warmup_density
from gradzip.compress.topk import topk_count


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _step(comp: DGC, mem: DGCMemory, key: str, grad: torch.Tensor, seed: int) -> torch.Tensor:
    """One pipeline step: compensate, compress, update; returns what was sent (dense)."""
    v = mem.compensate(key, grad)
    payload, ctx = comp.compress(v, seed=seed)
    out = comp.decompress(payload, ctx)
    mem.update(key, v, out)
    return out


def _reference(
    grads: list[torch.Tensor], m: float, k: int, clip: float | None, masking: bool = True
) -> list:
    """The paper's Algorithm (momentum correction, clipping, masking when asked) with a sort
    for top-k."""
    u = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    sent_all = []
    for g in grads:
        if clip is not None and g.norm() > clip:
            g = g * (clip / g.norm())
        u = m * u + g
        v = v + u
        order = torch.sort(v.abs().reshape(-1), descending=True).indices[:k]
        mask = torch.zeros(v.numel(), dtype=torch.bool)
        mask[order] = True
        mask = mask.view(v.shape)
        sent_all.append(torch.where(mask, v, torch.zeros_like(v)))
        v = torch.where(mask, torch.zeros_like(v), v)
        if masking:
            u = torch.where(mask, torch.zeros_like(u), u)
    return [sent_all, u, v]


@pytest.mark.parametrize("masking", [False, True])
@pytest.mark.parametrize("selection", ["exact", "sampled"])
@pytest.mark.parametrize("clip", [None, 3.0])
def test_momentum_correction_matches_reference(
    selection: str, clip: float | None, masking: bool
) -> None:
    comp = DGC(ratio=0.01, momentum=0.9, clip_norm=clip, world_size=4, selection=selection, min_values=0, masking=masking)  # type: ignore[arg-type]  # noqa: E501
    mem = comp.make_memory()
    grads = [_rand(30, 40, seed=s) for s in range(5)]
    local = None if clip is None else clip / math.sqrt(4)
    sent_ref, u_ref, v_ref = _reference(grads, 0.9, topk_count(0.01, 1200), local, masking)
    for step, g in enumerate(grads):
        out = _step(comp, mem, "w", g, seed=step)
        torch.testing.assert_close(out, sent_ref[step], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mem.momenta["w"], u_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mem.velocities["w"], v_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("masking", [False, True])
def test_masking_zeroes_u_and_v_where_sent(masking: bool) -> None:
    comp = DGC(ratio=0.05, warmup_epochs=0, masking=masking)
    mem = comp.make_memory()
    for step in range(3):
        v = mem.compensate(0, _rand(500, seed=step))
        before = v.clone()
        payload, ctx = comp.compress(v, seed=step)
        out = comp.decompress(payload, ctx)
        mem.update(0, v, out)
        sent = payload[0].long()
        assert sent.numel() > 0
        assert torch.all(mem.velocities[0][sent] == 0)
        # u: zeroed where sent under masking; the plain momentum (non-zero) without it
        assert bool(torch.all(mem.momenta[0][sent] == 0)) is masking
        # the velocity is the error-feedback residual: exactly compensated - decompressed
        assert torch.equal(mem.velocities[0], before - out)
        unsent = out == 0
        assert torch.all(mem.momenta[0][unsent] != 0)


def test_clipping_uses_n_to_the_minus_half() -> None:
    comp = DGC(clip_norm=2.0, world_size=16)
    assert comp.local_clip_norm == pytest.approx(0.5)
    mem = comp.make_memory()
    v = mem.compensate("w", torch.full((100,), 10.0))
    # the first velocity is the clipped gradient itself
    assert float(v.norm()) == pytest.approx(0.5, rel=1e-6)
    small = comp.make_memory().compensate("w", torch.full((100,), 0.01))
    assert torch.equal(small, torch.full((100,), 0.01))  # under the threshold: untouched


def test_warmup_schedule_values() -> None:
    comp = DGC(ratio=0.001, warmup_epochs=4, warmup_ratio=0.25)
    sparsity = [1 - comp.density(e) for e in range(6)]
    assert sparsity == pytest.approx([0.75, 0.9375, 0.984375, 0.99609375, 0.999, 0.999])
    assert comp.density(1.7) == comp.density(1)  # changes once per epoch
    assert comp.density() == 0.001  # no epoch given: warm-up over
    assert warmup_density(0, 0.1, 4, 0.25) == 0.25
    assert warmup_density(1, 0.1, 4, 0.25) == 0.1  # never below the final ratio
    assert DGC(warmup_epochs=0).at_epoch(0).density() == 0.001
    n = 10_000
    for e in range(5):
        payload, _ = comp.at_epoch(e).compress(_rand(n, seed=e), seed=e)
        want = max(topk_count(comp.density(e), n), 256)  # at least min_values=256 values
        assert payload[0].numel() <= want
        assert payload[0].numel() >= 0.9 * want


def test_state_dict_round_trip_resumes_identically() -> None:
    comp = DGC(ratio=0.02, clip_norm=5.0)
    a = comp.make_memory()
    grads = [_rand(64, 9, seed=s) for s in range(6)]
    for s in range(3):
        _step(comp, a, "w", grads[s], seed=s)
    b = comp.make_memory()
    b.load_state_dict(a.state_dict())
    for s in range(3, 6):
        assert torch.equal(_step(comp, a, "w", grads[s], s), _step(comp, b, "w", grads[s], s))
    assert torch.equal(a.momenta["w"], b.momenta["w"])
    assert torch.equal(a.velocities["w"], b.velocities["w"])
    with pytest.raises(ValueError, match=r"momentum=0\.9"):
        DGCMemory(momentum=0.5).load_state_dict(a.state_dict())


def test_nan_leaves_state_untouched_and_update_needs_compensate() -> None:
    comp = DGC(ratio=0.1)
    mem = comp.make_memory()
    _step(comp, mem, "fc.weight", _rand(50), seed=0)
    u, v = mem.momenta["fc.weight"].clone(), mem.velocities["fc.weight"].clone()
    with pytest.raises(CompressionError, match=r"'fc\.weight' has 1 NaN"):
        mem.compensate("fc.weight", torch.tensor([float("nan")] + [0.0] * 49))
    assert torch.equal(mem.momenta["fc.weight"], u) and torch.equal(mem.velocities["fc.weight"], v)
    with pytest.raises(CompressionError, match="without a compensate"):
        mem.update("fc.weight", torch.zeros(50), torch.zeros(50))
    with pytest.raises(CompressionError, match="shape"):
        mem.compensate("fc.weight", torch.zeros(49))


def test_check_optimizer() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3))
    check_optimizer(torch.optim.SGD([w, b], lr=0.1))
    groups: list[dict] = [{"params": [w]}, {"params": [b], "momentum": 0.9}]
    opt = torch.optim.SGD(groups, lr=0.1)
    with pytest.raises(ValueError, match=r"param group 1 of SGD has momentum=0.9.*momentum=0"):
        check_optimizer(opt)


@settings(deadline=None, max_examples=25)
@given(
    shape=st.sampled_from([(), (1,), (0,), (1023,), (7, 5, 3)]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**40),
)
def test_any_shape_and_dtype(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> None:
    comp = DGC(ratio=0.05)
    x = _rand(*shape, seed=seed % 997, dtype=dtype)
    state = torch.get_rng_state()
    payload, ctx = comp.compress(x, seed=seed)
    again, _ = comp.compress(x, seed=seed)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(payload, again, strict=True))
    out = comp.decompress(payload, ctx)
    assert out.shape == x.shape and out.dtype == dtype
    assert payload[0].numel() <= comp.count(x.numel())
    floor = min(comp.min_values, x.numel())
    assert comp.count(x.numel()) == max(topk_count(0.05, x.numel()), floor)
    assert payload.nbytes == payload[0].numel() * 8
    mem = comp.make_memory()
    v = mem.compensate("k", x)
    mem.update("k", v, comp.decompress(*comp.compress(v, seed=seed)))


def test_large_tensor_sampled_close_to_k() -> None:
    n = 2**20 + 7
    payload, _ = DGC(ratio=0.001).compress(_rand(n), seed=5)
    k = topk_count(0.001, n)
    assert 0.9 * k <= payload[0].numel() <= k


@pytest.mark.parametrize(
    "option",
    [
        "ratio=0",
        "ratio=2",
        "momentum=1",
        "momentum=-0.1",
        "warmup_ratio=1.5",
        "clip_norm=0",
        "world_size=0",
        "warmup_epochs=-1",
        "selection=fast",
    ],
)
def test_bad_options_say_what_is_allowed(option: str) -> None:
    with pytest.raises(ValueError, match=r"expected|allowed"):
        gradzip.compressor(f"dgc:{option}")


def test_bad_momentum_message() -> None:
    allowed = r"momentum=1\.5 is not allowed; expected 0 <= momentum < 1"
    with pytest.raises(ValueError, match=allowed):
        DGC(momentum=1.5)


def test_spec_round_trip_and_registry() -> None:
    comp = DGC(ratio=0.01, clip_norm=1.5, world_size=8).at_epoch(2)
    assert gradzip.compressor(comp.spec()) == comp
    assert gradzip.compressor("dgc") == DGC()
    assert DGC.reduction is gradzip.Reduction.SPARSE


def test_every_tensor_sends_at_least_min_values() -> None:
    """0.1% of 1280 is 2 values; DGC sends 256 (all of a tensor with fewer)."""
    comp = DGC(ratio=0.001, selection="exact")
    for n, want in ((1280, 256), (100_000, 256), (1_000_000, 1000), (10, 10), (0, 0)):
        assert comp.count(n) == want
        if n:
            payload, _ = comp.compress(_rand(n, seed=n), seed=0)
            assert payload[0].numel() == want
    assert DGC(ratio=0.001, min_values=0).count(1280) == 2
    with pytest.raises(ValueError, match="min_values=-1"):
        DGC(min_values=-1)
