"""Test-only compressors and single-process references for the allreduce tests.

``Sign`` (1 bit + scale, error feedback) and ``SharedTernary`` (a shared scaler, like
TernGrad) are GATHER compressors defined here so the strategies are tested whatever the
registered compressors are; they are not registered, so ``gradzip.available()`` is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from gradzip.compress.base import (
    Compressor,
    DenseCtx,
    Payload,
    Reduction,
    as_float32_flat,
    derive_seed,
    generator,
)
from gradzip.compress.packing import pack_base3, pack_bits, unpack_base3, unpack_bits


@dataclasses.dataclass(frozen=True)
class Sign(Compressor):
    """sign(x) * mean|x|: one bit per element plus an fp32 scale."""

    name: ClassVar[str] = "test_sign"
    reduction: ClassVar[Reduction] = Reduction.GATHER
    error_feedback: bool = True

    def compress(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> tuple[Payload, DenseCtx]:
        flat = as_float32_flat(tensor)
        scale = flat.abs().mean().reshape(1) if flat.numel() else torch.zeros(1)
        bits = pack_bits((flat >= 0).to(torch.uint8), 1)
        return Payload((bits, scale)), DenseCtx(tensor.shape, tensor.dtype)

    def decompress(self, payload: Payload, ctx: DenseCtx) -> torch.Tensor:
        n = ctx.shape.numel()
        signs = unpack_bits(payload[0], 1, n).to(torch.float32) * 2 - 1
        return (signs * payload[1]).view(ctx.shape).to(ctx.dtype)


@dataclasses.dataclass(frozen=True)
class SharedTernary(Compressor):
    """Stochastic ternary values scaled by a max|x| that all ranks share (TernGrad-like)."""

    name: ClassVar[str] = "test_ternary"
    reduction: ClassVar[Reduction] = Reduction.GATHER

    def shared_stat(self, tensor: torch.Tensor) -> torch.Tensor | None:
        flat = as_float32_flat(tensor)
        return flat.abs().max() if flat.numel() else torch.zeros(())

    def compress(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> tuple[Payload, DenseCtx]:
        flat = as_float32_flat(tensor)
        scale = shared if shared is not None else self.shared_stat(tensor)
        assert scale is not None
        scale = scale.reshape(1).to(torch.float32)
        prob = flat.abs() / scale.clamp_min(1e-30)
        keep = torch.rand(flat.numel(), generator=generator(seed)) < prob
        trits = (torch.sign(flat) * keep + 1).to(torch.uint8)
        return Payload((pack_base3(trits), scale)), DenseCtx(tensor.shape, tensor.dtype)

    def decompress(self, payload: Payload, ctx: DenseCtx) -> torch.Tensor:
        n = ctx.shape.numel()
        trits = unpack_base3(payload[0], n).to(torch.float32) - 1
        return (trits * payload[1]).view(ctx.shape).to(ctx.dtype)


def rank_grads(rank: int, shapes: dict[str, tuple[int, ...]], step: int = 0) -> dict[str, Any]:
    """Deterministic per-rank gradients (integers / 8, so sums of a few are exact in fp32)."""
    out = {}
    for i, (key, shape) in enumerate(shapes.items()):
        gen = generator(derive_seed(1234, step, key, rank))
        out[key] = torch.randint(-64, 65, shape, generator=gen).to(torch.float32) / 8 + i * 0.0
    return out


def agreed_shared(c: Compressor, tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    stats = [c.shared_stat(t) for t in tensors]
    if stats[0] is None:
        return None
    return torch.stack([s.reshape(()).float() for s in stats if s is not None]).max()


def reference_mean(
    c: Compressor, per_rank: Sequence[torch.Tensor], key: str, step: int = 0, seed: int = 0,
    share: bool | None = None,
) -> torch.Tensor:
    """Mean over ranks of decompress(compress(g_r)) with the seeds the strategies use;
    ``share``: with the MAX of the ranks' ``shared_stat`` (None: as the allgather does,
    ``c.gather_shares_stat()``; the ternary sum always shares)."""
    share = c.gather_shares_stat() if share is None else share
    shared = agreed_shared(c, per_rank) if share else None
    total = torch.zeros(per_rank[0].shape)
    for r, g in enumerate(per_rank):
        p, ctx = c.compress(g, seed=derive_seed(seed, step, key, r), shared=shared)
        total += c.decompress(p, ctx).float()
    return total / len(per_rank)


def simulate_scatter_gather(
    c: Compressor, grads: Sequence[Sequence[torch.Tensor]], key: str, seed: int = 0
) -> list[torch.Tensor]:
    """The two-phase algorithm in one process, over steps (``grads[step][rank]``), with
    worker and server error feedback; returns the averaged result of every step."""
    p = len(grads[0])
    worker = [torch.zeros(grads[0][0].numel()) for _ in range(p)]
    server = [None] * p
    results = []
    for step, per_rank in enumerate(grads):
        comp = [
            (g.reshape(-1) + worker[r]) if c.error_feedback else g.reshape(-1)
            for r, g in enumerate(per_rank)
        ]
        chunks = [list(torch.tensor_split(x, p)) for x in comp]
        sums = []
        for j in range(p):
            ck = f"{key}/chunk{j}"
            shared = (agreed_shared(c, [chunks[r][j] for r in range(p)])
                      if c.gather_shares_stat() else None)
            total = torch.zeros(chunks[0][j].numel())
            for r in range(p):
                pl, ctx = c.compress(
                    chunks[r][j], seed=derive_seed(seed, step, ck, r), shared=shared
                )
                dec = c.decompress(pl, ctx).float()
                total += dec
                chunks[r][j] = dec  # what rank r's worker residual is measured against
            sums.append(total)
        for r in range(p):
            if c.error_feedback:
                worker[r] = comp[r] - torch.cat(chunks[r])
        out = []
        for j in range(p):
            s = sums[j] if server[j] is None or not c.error_feedback else sums[j] + server[j]
            pl, ctx = c.compress(
                s, seed=derive_seed(seed, step, f"{key}/server", j), shared=c.shared_stat(s)
            )
            dec = c.decompress(pl, ctx).float()
            server[j] = s - dec
            out.append(dec)
        results.append((torch.cat(out) / p).view(per_rank[0].shape))
    return results
