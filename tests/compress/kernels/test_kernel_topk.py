"""Top-k and DGC kernels (threshold + compaction, fused momentum and masking) vs. the reference."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch

import gradzip
from gradzip.compress import kernels
from gradzip.compress.dgc import DGC
from gradzip.compress.topk import TopK

Load = Callable[[str], ModuleType]
SIZES = [1, 1023, 2**20 + 7]


def _distinct(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """n values with distinct magnitudes in ``dtype`` (no ties at any cut), random signs."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        return torch.randn(n, generator=gen)
    # consecutive representable magnitudes above 1.0, shuffled, with random signs
    bits = torch.tensor(1.0, dtype=dtype).view(torch.int16) + torch.randperm(n, generator=gen)
    mags = bits.to(torch.int16).view(dtype)
    signs = torch.randint(0, 2, (n,), generator=gen).to(dtype) * 2 - 1
    return mags * signs


def _sorted(idx: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.sort(idx).indices
    return idx[order], vals[order]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("selection", ["exact", "sampled"])
def test_topk_payload_equals_reference(n: int, dtype: torch.dtype, selection: str) -> None:
    comp = TopK(ratio=0.01, selection=selection)  # type: ignore[arg-type]
    # half dtypes have < 2**15 magnitudes: ties at the cut are certain for large n, and exact
    # selection may then keep other equal-magnitude entries than torch.topk (checked below)
    ties = dtype != torch.float32 and n > 2**12
    x = torch.randn(n).to(dtype) if ties else _distinct(n, dtype, seed=n)
    x = x.reshape(-1, 1)
    payload, ctx = kernels.compress(comp, x, seed=7)
    ref, ref_ctx = comp.compress(x, seed=7)
    assert ctx == ref_ctx
    idx, vals = payload
    assert torch.all(idx[1:] > idx[:-1]), "kernel indices are not in ascending order"
    ref_idx, ref_vals = _sorted(*ref)
    if ties and selection == "exact":
        assert torch.equal(vals.abs().sort().values, ref_vals.abs().sort().values)
        assert torch.equal(vals, x.reshape(-1)[idx.long()].float())
        return
    assert _same_bits(idx, ref_idx) and _same_bits(vals, ref_vals)
    # one wire format: each side decompresses the other's payload
    assert torch.equal(comp.decompress(payload, ctx), kernels.decompress(comp, ref, ref_ctx))


def test_topk_exact_with_ties_keeps_the_k_largest() -> None:
    x = torch.randint(-3, 4, (5000,)).to(torch.bfloat16)
    comp = TopK(ratio=0.1)
    (idx, vals), _ = kernels.compress(comp, x)
    assert idx.numel() == 500 and idx.unique().numel() == 500
    rest = torch.ones(5000, dtype=torch.bool)
    rest[idx.long()] = False
    assert vals.abs().min() >= x[rest].float().abs().max()
    assert torch.equal(vals, x[idx.long()].float())


@pytest.mark.parametrize("masking", [False, True])
@pytest.mark.parametrize(("n", "clip_norm"), [(1023, None), (1023, 2.0), (2**20 + 7, 50.0)])
def test_dgc_step_equals_reference(
    load: Load, n: int, clip_norm: float | None, masking: bool
) -> None:
    comp = DGC(ratio=0.01, clip_norm=clip_norm, epoch=None if n > 2**16 else 1.0, masking=masking)
    ref_mem, ker_mem = comp.make_memory(), comp.make_memory()
    gen = torch.Generator().manual_seed(n)
    for step in range(1 if n > 2**16 else 4):
        grad = torch.randn(n, generator=gen).to(torch.float16)
        velocity = ref_mem.compensate("w", grad)
        ref, ctx = comp.compress(velocity, seed=step)
        ref_mem.update("w", velocity, comp.decompress(ref, ctx))
        payload, ker_ctx = load("dgc").step(comp, ker_mem, "w", grad, seed=step)
        assert ker_ctx == ctx
        ref_idx, ref_vals = _sorted(*ref)
        assert _same_bits(payload[0], ref_idx) and _same_bits(payload[1], ref_vals)
        # momentum correction and momentum factor masking, bit for bit
        assert _same_bits(ker_mem.momenta["w"], ref_mem.momenta["w"])
        assert _same_bits(ker_mem.velocities["w"], ref_mem.velocities["w"])
    assert int((ker_mem.velocities["w"] == 0).sum()) >= payload[0].numel()


def test_dgc_step_refuses_nan_and_keeps_state(load: Load) -> None:
    comp = DGC(ratio=0.1)
    mem = comp.make_memory()
    load("dgc").step(comp, mem, "w", torch.ones(64))
    before = mem.velocities["w"].clone()
    with pytest.raises(gradzip.CompressionError, match="'w'"):
        load("dgc").step(comp, mem, "w", torch.full((64,), float("nan")))
    assert torch.equal(mem.velocities["w"], before)


def test_sparse_receive_side_sums_all_ranks() -> None:
    comp = TopK(ratio=0.05)
    grads = [torch.randn(3000, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    pairs = [kernels.compress(comp, g) for g in grads]
    total = kernels.decompress_sum(comp, [p for p, _ in pairs], [c for _, c in pairs], scale=0.5)
    expect = sum(comp.decompress(p, c) for p, c in pairs) * 0.5
    assert torch.allclose(total, expect, rtol=0, atol=1e-6)


def test_launcher_refuses_cpu_tensors_without_interpreter(
    load: Load, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(gradzip.CompressionError, match="CUDA tensors"):
        load("topk").count_above(torch.ones(4), torch.ones(1))


def test_bad_mode_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADZIP_KERNELS", "gpu")
    with pytest.raises(ValueError, match=r"GRADZIP_KERNELS='gpu'.*auto, off, interpret"):
        kernels.compress(TopK(), torch.ones(4))


def test_off_and_auto_take_the_torch_path_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("off", "auto"):
        monkeypatch.setenv("GRADZIP_KERNELS", value)
        assert not kernels.use_kernel(TopK(), torch.ones(4))
