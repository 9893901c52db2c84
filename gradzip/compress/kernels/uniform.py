"""Uniform random numbers for the stochastic kernels, from a seed and the element index.

Element ``i`` of a tensor draws ``u_i = tl.rand4x(seed, i // 4)[i % 4]``: one Philox call
gives the numbers of four consecutive elements, a quarter of the work of ``tl.rand(seed, i)``
per element (Philox is most of a quantization kernel's arithmetic). Every kernel that draws
for element ``i`` gets the same ``u_i``, whatever its tile shape, so the QSGD and TernGrad
kernels' choices depend only on ``(seed, i)``; they are not the draws of torch's generator
that the reference uses (Salmon et al. 2011, https://doi.org/10.1145/2063384.2063405).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["uniform", "uniform_quads"]


@triton.jit
def uniform_quads(seed, quads):
    """``[*quads.shape, 2, 2]`` fp32 in [0, 1): entry ``[..., a, b]`` is element
    ``4 * quad + 2a + b``'s number; reshape to ``[..., 4]`` for four consecutive elements."""
    r0, r1, r2, r3 = tl.rand4x(seed, quads)
    return tl.join(tl.join(r0, r2), tl.join(r1, r3))


@triton.jit
def uniform(seed, offs):
    """The number of element ``offs`` (any shape, any order): one Philox call per entry,
    for tiles whose rows do not hold whole quads."""
    r0, r1, r2, r3 = tl.rand4x(seed, offs // 4)
    q = offs % 4
    return tl.where(q == 0, r0, tl.where(q == 1, r1, tl.where(q == 2, r2, r3)))
