"""Sufficient factors of a Linear layer (Xie et al. 2016, https://arxiv.org/abs/1512.09295).

For ``y = x W^T + b`` the weight gradient of a batch is ``dW = dY^T X`` (M x N): a matrix
of rank at most B, the batch size. Sending the factors ``X`` (B x N) and ``dY`` (B x M)
costs ``B * (N + M)`` numbers instead of ``N * M``, and the reconstruction is exact. With
several ranks the factors are allgathered and every rank rebuilds
``sum_p dY_p^T X_p = cat(dY)^T cat(X)`` with one matmul (:func:`concat_factors`).

Wire dtype: both factors travel in their common dtype (fp32, fp16 or bf16), or in fp32 when
they differ (e.g. fp32 inputs and fp16 output gradients under autocast). The product is
computed in fp32 and returned in that same dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch

from gradzip.compress.base import (
    CompressionError,
    Compressor,
    Payload,
    Reduction,
    check_dtype,
    register,
)

__all__ = ["SFB", "SFBCtx", "concat_factors", "sfb_pays"]


class SFBCtx(NamedTuple):
    """What stays local: the layer's sizes and the dtype of the rebuilt gradient."""

    in_features: int
    out_features: int
    dtype: torch.dtype


def _flatten(t: torch.Tensor, name: str) -> torch.Tensor:
    check_dtype(t, name)
    if t.dim() < 1 or t.shape[-1] == 0:
        raise CompressionError(
            f"{name} must have a non-empty feature dimension (last dim), got shape {tuple(t.shape)}"
        )
    return t.reshape(-1, t.shape[-1])


def _split(payload: Payload, ctx: SFBCtx) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors ``X`` (B x N) and ``dY`` (B x M) of a payload, in fp32."""
    if len(payload) != 2:
        raise CompressionError(f"an SFB payload has 2 parts (X, dY), got {len(payload)}")
    x, dy = payload[0], payload[1]
    n, m = ctx.in_features, ctx.out_features
    if x.numel() % n or dy.numel() % m or x.numel() // n != dy.numel() // m:
        raise CompressionError(
            f"SFB payload parts of {x.numel()} and {dy.numel()} elements are not B x {n} "
            f"inputs and B x {m} output gradients for one batch size B"
        )
    return x.view(-1, n).to(torch.float32), dy.view(-1, m).to(torch.float32)


def concat_factors(payloads: Sequence[Payload]) -> Payload:
    """The payloads of several ranks as one: ``decompress`` of it is the sum of their
    gradients (batch sizes may differ from rank to rank)."""
    if not payloads:
        raise CompressionError("concat_factors needs at least one payload")
    xs = [p[0] for p in payloads]
    dys = [p[1] for p in payloads]
    return Payload((torch.cat(xs), torch.cat(dys)))


def sfb_pays(batch: int, in_features: int, out_features: int, world_size: int) -> bool:
    """Whether allgathering factors moves fewer bytes per rank than a dense allreduce.

    The cost model counts the bytes each rank receives, both sides in the same dtype:

    - factors, ring allgather: ``(P - 1) * B * (N + M)`` elements;
    - dense gradient, ring allreduce (reduce-scatter + allgather): ``2 * (P - 1) / P * N * M``.

    Dividing by ``P - 1`` gives the rule: SFB pays when ``P * B * (N + M) < 2 * N * M``. So
    small batches and wide layers favour factors; the advantage shrinks as ranks are added,
    because every rank must receive every other rank's factors. With one rank nothing is
    sent either way, and the answer is False. Compute (a B x N x M matmul on each rank) is
    not counted.
    """
    for name, value, low in (
        ("batch", batch, 0),
        ("in_features", in_features, 1),
        ("out_features", out_features, 1),
        ("world_size", world_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"sfb_pays: {name}={value!r}; expected an int >= {low}")
    if world_size == 1:
        return False
    return world_size * batch * (in_features + out_features) < 2 * in_features * out_features


@register("sfb")
@dataclasses.dataclass(frozen=True)
class SFB(Compressor):
    """Sufficient factor broadcasting (Xie et al. 2016, https://arxiv.org/abs/1512.09295).

    ``compress_factors(inputs, grad_outputs)`` turns the inputs ``X`` of a Linear layer and the
    gradients ``dY`` of its outputs into a payload ``(X, dY)``, leading dims flattened into the
    batch; ``decompress`` gives the weight gradient ``dY^T X`` and ``decompress_bias`` the bias
    gradient ``dY.sum(0)``. Both are exact.
    """

    reduction: ClassVar[Reduction] = Reduction.FACTORS

    def compress(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> tuple[Payload, Any]:
        """Not possible: a weight gradient alone does not hold its factors."""
        raise CompressionError(
            f"sfb cannot compress a finished weight gradient (shape {tuple(tensor.shape)}): it "
            "sends the factors of a Linear layer. Call compress_factors(inputs, grad_outputs) "
            "with the layer's inputs X and output gradients dY (captured by the SFB hooks)"
        )

    def compress_factors(
        self, inputs: torch.Tensor, grad_outputs: torch.Tensor
    ) -> tuple[Payload, SFBCtx]:
        """Payload ``(X, dY)`` flattened to B x N and B x M; B = product of the leading dims."""
        x = _flatten(inputs, "inputs")
        dy = _flatten(grad_outputs, "grad_outputs")
        if inputs.shape[:-1] != grad_outputs.shape[:-1]:
            raise CompressionError(
                f"inputs of shape {tuple(inputs.shape)} and grad_outputs of shape "
                f"{tuple(grad_outputs.shape)} must have the same leading (batch) dims"
            )
        dtype = x.dtype if x.dtype == dy.dtype else torch.float32
        payload = Payload(
            (x.to(dtype).reshape(-1).contiguous(), dy.to(dtype).reshape(-1).contiguous())
        )
        return payload, SFBCtx(x.shape[1], dy.shape[1], dtype)

    def decompress(self, payload: Payload, ctx: SFBCtx) -> torch.Tensor:
        """The weight gradient ``dY^T X`` of shape (out_features, in_features)."""
        x, dy = _split(payload, ctx)
        return (dy.t() @ x).to(ctx.dtype)

    def decompress_bias(self, payload: Payload, ctx: SFBCtx) -> torch.Tensor:
        """The bias gradient ``dY.sum(0)`` of shape (out_features,)."""
        _, dy = _split(payload, ctx)
        return dy.sum(0).to(ctx.dtype)
