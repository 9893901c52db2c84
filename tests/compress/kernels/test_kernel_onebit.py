"""1-bit SGD kernels (stats + EF add, signs + residual update, receive side) vs. the reference."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from gradzip.compress import kernels
from gradzip.compress.memory import ResidualMemory
from gradzip.compress.onebit import OneBit

Load = Callable[[str], ModuleType]
# flat buckets (odd sizes, 0-d), columns of 2-D and 3-D views, short columns
SHAPES = [(), (1,), (1023,), (128, 33), (64, 3, 5), (10, 100)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dyadic(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Multiples of 1/8 in [-8, 8): every partial sum is exact in fp32, in any order, so the
    means (and hence the whole payload) must equal the reference's bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-64, 64, shape, generator=gen).float() / 8).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_payload_equals_reference(load: Load, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    comp = OneBit()
    x = _dyadic(shape, dtype, seed=len(shape))
    payload, ctx = kernels.compress(comp, x)
    ref, ref_ctx = comp.compress(x)
    assert ctx == ref_ctx
    assert torch.equal(payload[0], ref[0]) and torch.equal(payload[1], ref[1])
    # random data: sign bytes identical, scales within an fp32 rounding of the sum order
    y = torch.randn(shape).to(dtype)
    payload, _ = kernels.compress(comp, y)
    ref, _ = comp.compress(y)
    assert torch.equal(payload[0], ref[0])
    assert torch.allclose(payload[1], ref[1], rtol=1e-5, atol=0)
    # one wire format, both ways
    assert torch.equal(kernels.decompress(comp, ref, ctx), comp.decompress(ref, ctx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_payload_equals_reference(dtype: torch.dtype) -> None:
    comp = OneBit()
    for x in (_dyadic((2**20 + 7,), dtype, 1), _dyadic((1024, 1025), dtype, 2)):
        payload, _ = kernels.compress(comp, x)
        ref, _ = comp.compress(x)
        assert torch.equal(payload[0], ref[0]) and torch.equal(payload[1], ref[1])


@pytest.mark.parametrize(
    "comp, shape", [(OneBit(bucket_size=2**15), (3 * 2**15 + 5,)), (OneBit(), (4100, 200))]
)
def test_tiles_along_both_axes_of_the_grid(comp: OneBit, shape: tuple[int, ...]) -> None:
    # several tiles along the group and along the summed axis: the 1-D launch grid must map
    # each program to its own tile (CUDA's y dimension stops at 65535, so none is used)
    x = _dyadic(shape, torch.float32, 4)
    payload, _ = kernels.compress(comp, x)
    ref, _ = comp.compress(x)
    assert torch.equal(payload[0], ref[0]) and torch.equal(payload[1], ref[1])


@pytest.mark.parametrize("shape", [(1023,), (256, 20)])
def test_fused_error_feedback_equals_reference(load: Load, shape: tuple[int, ...]) -> None:
    comp = OneBit(bucket_size=128)
    ref_mem, ker_mem = ResidualMemory(), ResidualMemory()
    # dyadic residual + dyadic gradient: exact sums, so bit for bit (the means make later
    # residuals non-dyadic; then only the invariant below is exact)
    for mem in (ref_mem, ker_mem):
        mem.residuals["w"] = _dyadic(shape, torch.float32, seed=9)
    grad = _dyadic(shape, torch.float16, seed=1)
    ref, _ = comp.compress_with_feedback(ref_mem, "w", grad)
    payload, _ = load("onebit").compress_with_feedback(comp, ker_mem, "w", grad)
    assert torch.equal(payload[0], ref[0]) and torch.equal(payload[1], ref[1])
    assert torch.equal(ker_mem.residuals["w"], ref_mem.residuals["w"])
    # random data: compensated == decompressed + residual still holds after the kernel
    grad = torch.randn(shape)
    before = ker_mem.residuals["w"].clone()
    payload, ctx = load("onebit").compress_with_feedback(comp, ker_mem, "w", grad)
    restored = comp.decompress(payload, ctx) + ker_mem.residuals["w"]
    assert torch.allclose(restored, before + grad, rtol=0, atol=1e-6)


def test_fused_error_feedback_refuses_nan(load: Load) -> None:
    comp, mem = OneBit(), ResidualMemory()
    load("onebit").compress_with_feedback(comp, mem, "w", torch.ones(40))
    before = mem.residuals["w"].clone()
    with pytest.raises(ValueError, match="'w'"):
        load("onebit").compress_with_feedback(comp, mem, "w", torch.full((40,), float("inf")))
    assert torch.equal(mem.residuals["w"], before)


@pytest.mark.parametrize("check", [True, False])
def test_nan_in_the_last_group_leaves_every_group_untouched(load: Load, check: bool) -> None:
    # pass 1 only reads: the NaN is seen in the scales before pass 2 writes any group
    comp, mem = OneBit(bucket_size=1024), ResidualMemory(check=check)
    load("onebit").compress_with_feedback(comp, mem, "w", torch.randn(5000))
    before = mem.residuals["w"].clone()
    grad = torch.randn(5000)
    grad[-1] = float("nan")
    with pytest.raises(ValueError, match="'w'"):
        load("onebit").compress_with_feedback(comp, mem, "w", grad)
    if check:  # the gradient is named as the culprit and the residual is kept
        assert torch.equal(mem.residuals["w"], before)
    else:  # unchecked: reported as an overflow of the compensated values, residual reset
        assert "w" not in mem.residuals


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's
def test_overflowing_compensation_resets_the_residual(load: Load) -> None:
    comp, mem = OneBit(), ResidualMemory()
    mem.residuals["w"] = torch.full((100,), 3e38)
    with pytest.raises(ValueError, match=r"'w'.*reset"):
        load("onebit").compress_with_feedback(comp, mem, "w", torch.full((100,), 3e38))
    assert "w" not in mem.residuals


@pytest.mark.parametrize("shape", [(1023,), (96, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_receive_side_sums_all_ranks(
    load: Load, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    comp = OneBit(bucket_size=64)
    grads = [torch.randn(shape, generator=torch.Generator().manual_seed(r)) for r in range(4)]
    pairs = [comp.compress(g.to(dtype)) for g in grads]
    total = kernels.decompress_sum(comp, [p for p, _ in pairs], [c for _, c in pairs], scale=0.25)
    # each rank rounded to its dtype as by the reference, then summed in fp32 in rank order
    expect = comp.decompress(*pairs[0]).float()
    for p, c in pairs[1:]:
        expect = expect + comp.decompress(p, c).float()
    assert total.dtype == torch.float32 and total.shape == torch.Size(shape)
    assert torch.equal(total, expect * 0.25)


def test_wrong_payload_size_is_named(load: Load) -> None:
    comp = OneBit()
    payload, ctx = comp.compress(torch.randn(100))
    with pytest.raises(ValueError, match="needs 25 and 2"):
        kernels.decompress(comp, payload, ctx._replace(shape=torch.Size([200])))
