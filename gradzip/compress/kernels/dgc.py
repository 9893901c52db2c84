"""Deep Gradient Compression on the GPU: momentum correction and masking fused around top-k.

Reference: :mod:`gradzip.compress.dgc` (Lin et al. 2018, https://arxiv.org/abs/1712.01887).
One DGC step of the reference is ``DGCMemory.compensate`` (clip, ``u = m*u + g``, ``v = v + u``),
``DGC.compress`` (sampled top-k of ``v``) and ``DGCMemory.update`` (``v`` zeroed where an entry
was sent, and ``u`` too under momentum factor masking). Here :func:`step` does the same with:

1. ``_momentum_kernel``: ``u`` and ``v`` updated in place in one pass (``u = fma(m, u, s*g)``,
   one rounding, as torch's ``add(g, u, alpha=m)``; ``s`` is the clipping factor);
2. the threshold and compaction kernels of :mod:`gradzip.compress.kernels.topk`, whose
   compaction also zeroes ``v`` (and ``u`` when masking) at the sent positions when no trimming
   to ``k`` is needed; otherwise a ``k``-sized ``index_fill_`` does it.

``u``, ``v`` and the payload equal the reference's bit for bit for the same seed (the same
sample is drawn, so the same threshold; the payload's indices are in ascending order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradzip.compress.base import CompressionError, Payload, check_dtype
from gradzip.compress.dgc import DGC, DGCMemory
from gradzip.compress.kernels.dispatch import EXACT, block_size, check_launch
from gradzip.compress.kernels.topk import select_like_reference
from gradzip.compress.memory import Key, check_finite
from gradzip.compress.topk import SparseCtx

__all__ = ["compress", "decompress", "momentum_", "step", "supports"]


@triton.jit
def _momentum_kernel(
    g_ptr,  # *fp32/fp16/bf16, n elements: the gradient
    u_ptr,  # *fp32, n elements, in/out: momentum, becomes m*u + scale*g
    v_ptr,  # *fp32, n elements, in/out: velocity, becomes v + u (the new u)
    n,  # number of elements
    momentum,  # fp32: the momentum m
    scale,  # fp32: the clipping factor applied to g (1.0: no clipping)
    BLOCK: tl.constexpr,  # elements per program
    SCALED: tl.constexpr,  # whether scale != 1 (skips a multiply, keeps rounding identical)
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if SCALED:
        g = g * scale
    u = tl.fma(tl.load(u_ptr + offs, mask=inside, other=0.0), momentum, g)
    v = tl.load(v_ptr + offs, mask=inside, other=0.0) + u
    tl.store(u_ptr + offs, u, mask=inside)
    tl.store(v_ptr + offs, v, mask=inside)


def momentum_(
    grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor, momentum: float, scale: float = 1.0
) -> None:
    """In place: ``u = momentum*u + scale*grad``, then ``v = v + u`` (flat, contiguous)."""
    check_launch("dgc.momentum", grad, u, v)
    n = grad.numel()
    if not (u.numel() == v.numel() == n and u.dtype == v.dtype == torch.float32):
        raise CompressionError(
            f"DGC state must be fp32 with {n} elements, got u {u.dtype}[{u.numel()}], "
            f"v {v.dtype}[{v.numel()}]"
        )
    block = block_size(n, 1024 if n <= 1 << 16 else 16384)
    _momentum_kernel[(triton.cdiv(n, block),)](
        grad, u, v, n, float(momentum), float(scale), BLOCK=block, SCALED=scale != 1.0, **EXACT
    )


def _clip_scale(comp: DGC, grad: torch.Tensor) -> float:
    """The factor the reference multiplies the gradient by (1.0 when it does not clip)."""
    limit = comp.local_clip_norm
    if limit is None:
        return 1.0
    norm = float(torch.linalg.vector_norm(grad.to(torch.float32)))
    # the reference multiplies an fp32 tensor by a Python float: the factor is rounded to fp32
    return float(torch.tensor(limit / norm, dtype=torch.float32)) if norm > limit else 1.0


def step(
    comp: DGC, memory: DGCMemory, key: Key, grad: torch.Tensor, *, seed: int = 0
) -> tuple[Payload, SparseCtx]:
    """One DGC step for ``key``: compensate + compress + update of the reference, fused.

    ``memory`` (from ``comp.make_memory()``) holds the fp32 ``u`` and ``v`` of ``key``; they
    are updated in place (created as zeros on the first step). Returns the payload and ctx of
    ``comp.compress(velocity, seed=seed)``; ``memory.update`` must not be called after it.
    """
    check_dtype(grad, f"gradient {key!r}")
    if memory.check:
        check_finite(key, grad)
    u, v = memory.momenta.get(key), memory.velocities.get(key)
    if u is None or v is None:
        u = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
        v = torch.zeros_like(u)
    elif u.shape != grad.shape:
        raise CompressionError(
            f"gradient {key!r} has shape {tuple(grad.shape)} but its DGC state has shape "
            f"{tuple(u.shape)}; a key must always name a tensor of one shape"
        )
    flat = grad.reshape(-1).contiguous()
    uf, vf = u.view(-1), v.view(-1)
    momentum_(flat, uf, vf, memory.momentum, _clip_scale(comp, flat))
    k = comp.count(vf.numel())
    zero = (uf if memory.masking else vf, vf)  # vf twice: the sent entries of v only
    idx, vals = select_like_reference(vf, k, comp.selection, comp.sample_ratio, seed, mask=zero)
    memory.momenta[key], memory.velocities[key] = u, v
    return Payload((idx, vals)), SparseCtx(grad.shape, torch.float32, vf.numel())


def supports(comp: object, tensor: torch.Tensor) -> bool:
    """Every DGC configuration has a kernel."""
    return isinstance(comp, DGC)


def compress(
    comp: DGC, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
) -> tuple[Payload, SparseCtx]:
    """:meth:`DGC.compress` (top-k of a velocity) through the kernels; see :func:`step` for
    the fused version with the momentum."""
    check_dtype(tensor)
    flat = tensor.reshape(-1).contiguous()
    k = comp.count(flat.numel())
    idx, vals = select_like_reference(flat, k, comp.selection, comp.sample_ratio, seed)
    return Payload((idx, vals)), SparseCtx(tensor.shape, tensor.dtype, flat.numel())


def decompress(comp: DGC, payload: Payload, ctx: SparseCtx) -> torch.Tensor:
    """The reference decompression (one ``index_add_``)."""
    return comp.decompress(payload, ctx)
