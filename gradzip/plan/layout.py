"""A model's gradients as the optimizer would send them: tensors, buckets and payload sizes.

:func:`buckets` lays a list of ``(name, shape)`` out as :class:`~gradzip.DistributedOptimizer`
does for one compression setting: the policy picks each tensor's compressor (tensors under
``min_compress_numel`` elements stay dense), tensors of one compressor are fused in reverse
registration order into buckets of ``fusion_bytes`` (``plan_buckets``), and each tensor's
payload size is measured by compressing a seeded random tensor of its shape (the bytes the
collective would get, not a formula), once per (compressor, shape).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch

from gradzip.allreduce.fusion import DEFAULT_FUSION_BYTES, plan_buckets
from gradzip.compress.base import Compressor, Reduction, compressor
from gradzip.hooks.policy import DEFAULT_MIN_COMPRESS_NUMEL, make_policy
from gradzip.plan.model import Bucket

__all__ = ["Tensor", "buckets", "from_module", "payload_size", "strategies_for"]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One gradient: its parameter's name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty(0, dtype=self.dtype).element_size()


def from_module(module: torch.nn.Module) -> list[Tensor]:
    """The trainable parameters of ``module``, in registration order."""
    return [
        Tensor(name, tuple(p.shape), p.dtype)
        for name, p in module.named_parameters()
        if p.requires_grad
    ]


@functools.lru_cache(maxsize=4096)
def payload_size(spec: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, int]:
    """(payload bytes, values sent) of one tensor of ``shape`` under compressor ``spec``: a
    seeded random tensor of that shape compressed on the CPU. Values sent is the count of
    (index, value) pairs for sparse methods, else 0."""
    comp = compressor(spec)
    if comp.reduction is Reduction.FACTORS:
        raise ValueError(
            f"{spec!r}: sufficient factors depend on the batch size, not the layout; the plan "
            "does not cost them"
        )
    gen = torch.Generator().manual_seed(math.prod(shape) + len(shape))
    sample = torch.randn(shape, generator=gen).to(dtype)
    shared = comp.shared_stat(sample)
    payload, _ = comp.compress(sample, seed=0, shared=shared)
    nnz = payload[0].numel() if comp.reduction is Reduction.SPARSE else 0
    return payload.nbytes, nnz


def buckets(
    tensors: Sequence[Tensor],
    compression: str | Compressor | dict[str, str | Compressor],
    *,
    min_compress_numel: int = DEFAULT_MIN_COMPRESS_NUMEL,
    fusion_bytes: int = DEFAULT_FUSION_BYTES,
) -> list[tuple[Compressor, Bucket]]:
    """The buckets of ``tensors`` under ``compression`` (as the optimizer takes it), each with
    its compressor, in launch order (the bucket whose last tensor comes first in backward
    first)."""
    policy = make_policy(compression, min_compress_numel)
    chosen = [policy.choose(t.name, t.numel) for t in tensors]
    order = list(range(len(tensors)))[::-1]
    position = {i: k for k, i in enumerate(order)}
    streams: dict[str, list[int]] = {}
    for i in order:
        streams.setdefault(chosen[i].spec(), []).append(i)
    placed: list[tuple[int, int, Compressor, list[int]]] = []
    for k, members in enumerate(streams.values()):
        for cut in plan_buckets([tensors[i].nbytes for i in members], fusion_bytes):
            group = [members[j] for j in cut]
            placed.append((position[group[-1]], k, chosen[group[0]], group))
    placed.sort(key=lambda t: (t[0], t[1]))
    out = []
    for _, _, comp, group in placed:
        sizes = [payload_size(comp.spec(), tensors[i].shape, tensors[i].dtype) for i in group]
        out.append(
            (
                comp,
                Bucket(
                    dense=sum(tensors[i].nbytes for i in group),
                    numel=sum(tensors[i].numel for i in group),
                    tensors=len(group),
                    payload=sum(s for s, _ in sizes),
                    fixed=comp.fixed_payload() or comp.reduction is Reduction.SUM,
                    nnz=sum(n for _, n in sizes),
                    feedback=comp.error_feedback,
                ),
            )
        )
    return out


def strategies_for(comp: Compressor) -> tuple[str, ...]:
    """The strategies gradzip can run for ``comp`` (names of :func:`~gradzip.plan.model.
    strategy_cost`)."""
    if comp.reduction is Reduction.SUM:
        return ("dense",)
    if comp.reduction is Reduction.GATHER:
        extra = ("ternary_sum",) if hasattr(comp, "ternarize") else ()
        return ("allgather", "scatter_gather", *extra)
    if comp.reduction is Reduction.SPARSE:
        return ("sparse_allgather", "recursive")
    return ()
