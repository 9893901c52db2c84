"""The numba path of OneBit.compress_with_feedback against the torch path (GRADZIP_NUMBA=0)."""

import importlib.util

import pytest
import torch

from gradzip.compress import CompressionError, ResidualMemory
from gradzip.compress import onebit as onebit_module
from gradzip.compress.base import DenseCtx
from gradzip.compress.onebit import OneBit

HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def _step(comp: OneBit, mem: ResidualMemory, grad: torch.Tensor, numba: bool,
          monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, torch.Tensor]:
    monkeypatch.setenv("GRADZIP_NUMBA", "1" if numba else "0")
    compensated = mem.compensate("w", grad)  # what the step must encode (residual + grad)
    payload, ctx = comp.compress_with_feedback(mem, "w", grad)
    packed, scales = payload
    # fp32 decoded values (decompress returns the grad's dtype; the residual is kept in fp32)
    decompressed = comp.decompress(payload, DenseCtx(ctx.shape, torch.float32))
    # the residual is exactly compensated - decompressed (== treats -0.0 as +0.0)
    assert torch.equal(mem.residuals["w"], compensated - decompressed)
    return packed, scales


def test_numba_is_used_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADZIP_NUMBA", "1")
    assert (onebit_module._numba_kernels() is not None) == HAVE_NUMBA
    monkeypatch.setenv("GRADZIP_NUMBA", "0")
    assert onebit_module._numba_kernels() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, options",
    [((1,), {}), ((1023,), {"bucket_size": 64}), ((2**14 + 7,), {}), ((70, 9), {"min_rows": 1}),
     ((37, 3, 5), {"min_rows": 8}), ((300, 33), {"min_rows": 8}), ((5, 40), {}), ((0,), {}),
     ((), {}), ((4100, 3), {})],
)
def test_numba_matches_torch_over_three_steps(
    shape: tuple[int, ...], options: dict[str, int], dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    comp = OneBit(**options)
    mems = {True: ResidualMemory(), False: ResidualMemory()}
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    for step in range(3):
        grad = torch.randn(shape, generator=gen).to(dtype)
        if step == 1 and grad.numel() > 4:
            grad.view(-1)[:4] = torch.tensor([0.0, -0.0, 0.0, -0.0])  # signed zeros: bit 0
        packed_n, scales_n = _step(comp, mems[True], grad, True, monkeypatch)
        packed_t, scales_t = _step(comp, mems[False], grad, False, monkeypatch)
        assert torch.equal(packed_n, packed_t)  # sign bytes: bit for bit
        top = float(scales_t.abs().max()) if scales_t.numel() else 0.0
        tol = 4 * torch.finfo(torch.float32).eps * top
        torch.testing.assert_close(scales_n, scales_t, rtol=1e-6, atol=tol)
        # the residuals differ only through the last bits of the scales
        torch.testing.assert_close(mems[True].residuals["w"], mems[False].residuals["w"],
                                   rtol=1e-5, atol=4 * tol)
        # keep both paths on the same residual so the next step compares like with like
        mems[True].residuals["w"] = mems[False].residuals["w"].clone()


@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_names_the_key_and_keeps_the_residual(
    numba: bool, bad: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADZIP_NUMBA", "1" if numba else "0")
    comp, mem = OneBit(), ResidualMemory()
    comp.compress_with_feedback(mem, "layer.w", torch.randn(20000))
    before = mem.residuals["layer.w"].clone()
    grad = torch.randn(20000)
    grad[12345] = bad
    with pytest.raises(CompressionError, match=r"layer\.w"):
        comp.compress_with_feedback(mem, "layer.w", grad)
    assert torch.equal(mem.residuals["layer.w"], before)


def test_overflowing_compensation_resets_the_residual(monkeypatch: pytest.MonkeyPatch) -> None:
    comp, mem = OneBit(), ResidualMemory()
    mem.residuals["w"] = torch.full((100,), 3e38)
    with pytest.raises(CompressionError, match=r"'w'.*reset"):
        comp.compress_with_feedback(mem, "w", torch.full((100,), 3e38))
    assert "w" not in mem.residuals


@pytest.mark.parametrize("numba", [True, False])
def test_unchecked_nan_in_a_late_bucket_resets_the_residual(
    numba: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # with the finiteness check off, the one-pass sweep has already updated the buckets before
    # the NaN when it finds it: the step must still fail and drop the half-updated residual
    monkeypatch.setenv("GRADZIP_NUMBA", "1" if numba else "0")
    comp, mem = OneBit(bucket_size=64), ResidualMemory(check=False)
    comp.compress_with_feedback(mem, "w", torch.randn(1000))
    grad = torch.randn(1000)
    grad[900] = float("nan")
    with pytest.raises(CompressionError, match=r"'w'.*reset"):
        comp.compress_with_feedback(mem, "w", grad)
    assert "w" not in mem.residuals
    # the next step starts afresh: the residual is exactly grad - decompressed
    grad = torch.randn(1000)
    payload, ctx = comp.compress_with_feedback(mem, "w", grad)
    assert torch.equal(mem.residuals["w"], grad - comp.decompress(payload, ctx))


@pytest.mark.parametrize("numba", [True, False])
@pytest.mark.parametrize("shape, options", [((2**14 + 7,), {}), ((300, 33), {"min_rows": 8})])
def test_fresh_step_leaves_the_old_residual_and_reuses_the_released_one(
    numba: bool, shape: tuple[int, ...], options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fresh=True`` (what the optimizer runs, so that a step every rank skips can be undone)
    gives the in-place step's payload and residual, writes them elsewhere (the numba path, at
    no extra traffic: into the buffer released the step before), and leaves the old tensor."""
    monkeypatch.setenv("GRADZIP_NUMBA", "1" if numba else "0")
    comp = OneBit(**options)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(shape, generator=gen) for _ in range(4)]
    inplace, fresh = ResidualMemory(), ResidualMemory()
    released = -1
    for step, g in enumerate(grads):
        want, _ = comp.compress_with_feedback(inplace, "w", g)
        old = fresh.snapshot("w", copy=not comp.fresh_feedback(g))
        kept = None if old is None else old.clone()
        got, _ = comp.compress_with_feedback(fresh, "w", g, fresh=comp.fresh_feedback(g))
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        assert torch.equal(inplace.residuals["w"], fresh.residuals["w"])
        if old is not None:
            assert torch.equal(old, kept)  # untouched
            assert old.data_ptr() != fresh.residuals["w"].data_ptr()
            if numba and step >= 2:  # the buffer released one step before is reused
                assert fresh.residuals["w"].data_ptr() == released
        if old is not None:
            released = old.data_ptr()
        fresh.release("w", old)
    assert comp.fresh_feedback(grads[0]) is numba


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_fresh_step_with_a_bad_gradient_keeps_the_residual(
    bad: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the fresh step probes the gradient only after a failed sweep: the error must still
    # name the key, and the residual must be the old tensor with its old values
    monkeypatch.setenv("GRADZIP_NUMBA", "1")
    comp, mem = OneBit(bucket_size=64), ResidualMemory()
    comp.compress_with_feedback(mem, "w", torch.randn(1000), fresh=True)
    old = mem.residuals["w"]
    before = old.clone()
    grad = torch.randn(1000)
    grad[900] = bad
    with pytest.raises(CompressionError, match=r"gradient 'w' has"):
        comp.compress_with_feedback(mem, "w", grad, fresh=True)
    assert mem.residuals["w"] is old and torch.equal(old, before)
    # the next fresh step still works and is exact
    grad = torch.randn(1000)
    payload, ctx = comp.compress_with_feedback(mem, "w", grad, fresh=True)
    assert torch.equal(mem.residuals["w"], before + grad - comp.decompress(payload, ctx))


def _payloads(comp: OneBit, shape: tuple[int, ...], ranks: int, dtype: torch.dtype) -> list:
    gen = torch.Generator().manual_seed(ranks + len(shape))
    return [comp.compress(torch.randn(shape, generator=gen).to(dtype)) for _ in range(ranks)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize(
    "shape, options",
    [((1,), {}), ((1023,), {"bucket_size": 64}), ((2**14 + 7,), {}), ((70, 9), {"min_rows": 1}),
     ((300, 33), {"min_rows": 8}), ((0,), {}), ((), {}), ((20000,), {"bucket_size": 8})],
)
def test_numba_decompress_sum_equals_the_rank_by_rank_sum(
    shape: tuple[int, ...], options: dict[str, int], ranks: int, dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gradzip.compress import kernels

    comp = OneBit(**options)
    got = _payloads(comp, shape, ranks, dtype)
    payloads, ctxs = [p for p, _ in got], [c for _, c in got]
    for scale in (1.0, 1 / 3):
        monkeypatch.setenv("GRADZIP_NUMBA", "0")
        ref = kernels.decompress_sum(comp, payloads, ctxs, scale=scale)
        single = [comp.decompress(p, c) for p, c in got]
        monkeypatch.setenv("GRADZIP_NUMBA", "1")
        fast = comp.decompress_sum(payloads, ctxs, scale=scale)
        assert fast is not None and fast.dtype == torch.float32 and fast.shape == ref.shape
        assert torch.equal(fast, ref)
        assert torch.equal(kernels.decompress_sum(comp, payloads, ctxs, scale=scale), ref)
        for (p, c), want in zip(got, single, strict=True):
            one = comp.decompress(p, c)
            assert one.dtype == dtype and torch.equal(one, want)


def test_numba_decompress_sum_refuses_a_payload_that_does_not_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GRADZIP_NUMBA", "1")
    comp = OneBit()
    (p, ctx), (q, _) = _payloads(comp, (1000,), 2, torch.float32)
    short = type(q)((q[0][:-1], q[1]))
    with pytest.raises(CompressionError, match="sign bytes"):
        comp.decompress_sum([p, short], [ctx, ctx])
    wide = type(q)((q[0], q[1].double()))
    with pytest.raises(CompressionError, match="dtype"):
        comp.decompress_sum([p, wide], [ctx, ctx])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, options",
    [((1,), {}), ((1023,), {"bucket_size": 64}), ((2**14 + 7,), {}), ((5, 40), {}), ((0,), {}),
     ((), {}), ((300, 33), {"min_rows": 8})],  # the last: column groups, the torch path
)
def test_numba_compress_matches_torch(
    shape: tuple[int, ...], options: dict[str, int], dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    comp = OneBit(**options)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    if x.numel() > 4:
        x.view(-1)[:2] = torch.tensor([0.0, -0.0])  # signed zeros: bit 0
    monkeypatch.setenv("GRADZIP_NUMBA", "1")
    (packed_n, scales_n), ctx = comp.compress(x)
    monkeypatch.setenv("GRADZIP_NUMBA", "0")
    (packed_t, scales_t), _ = comp.compress(x)
    assert torch.equal(packed_n, packed_t)  # sign bytes: bit for bit
    top = float(scales_t.abs().max()) if scales_t.numel() else 0.0
    torch.testing.assert_close(scales_n, scales_t, rtol=1e-6,
                               atol=4 * torch.finfo(torch.float32).eps * top)
    assert ctx.shape == x.shape and ctx.dtype == dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_numba_compress_refuses_nan_and_inf(bad: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADZIP_NUMBA", "1")
    x = torch.randn(20000)
    x[17000] = bad
    with pytest.raises(CompressionError, match="NaN or Inf"):
        OneBit().compress(x)
