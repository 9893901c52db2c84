"""TernGrad: stochastic ternary gradients with a shared per-layer scaler (Wen et al. 2017,
https://arxiv.org/abs/1705.07878).

``g`` is first clipped to ``[-c*sigma, c*sigma]`` (``clip=c``, 2.5 by default; ``None`` or 0
turns it off), with ``sigma = sqrt(mean(g**2))``: the paper's standard deviation of the
(zero-mean) gradient, taken about 0 so that a constant or one-element gradient is not clipped
to 0. Then with scaler ``s = max|g|``, each element becomes ``s * sign(g_i) * b_i`` with
``b_i ~ Bernoulli(|g_i| / s)``: unbiased for the clipped gradient.

Scaler sharing: every rank calls :meth:`TernGrad.shared_stat` (its local ``s``), the allreduce
layer MAX-reduces it, and each rank compresses with ``shared=S``; all ranks then send integer
multiples of the same S, so their ternary values add up exactly.

Wire format (``n`` elements, trit ``t_i = sign(g_i) * b_i`` sent as ``t_i + 1`` in {0, 1, 2}):

* part 0, ``packing="2bit"``: ``packing.pack_bits(t + 1, 2)``, four per byte, first element
  in the lowest two bits: ``ceil(n / 4)`` bytes. ``packing="base3"``:
  ``packing.pack_base3(t + 1)``, five per byte (``sum_j (t_j + 1) * 3**j``): ``ceil(n / 5)``.
* part 1, ``float32[1]``: the scaler ``s`` (the shared one when given).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal, NamedTuple

import torch

from gradzip.compress.base import (
    CompressionError,
    Compressor,
    DenseCtx,
    Payload,
    Reduction,
    as_float32_flat,
    check_parts,
    generator,
    register,
)
from gradzip.compress.packing import pack_base3, pack_bits, unpack_base3, unpack_bits

__all__ = ["TernGrad", "Ternary"]


class Ternary(NamedTuple):
    """Raw ternary values (int8 in {-1, 0, 1}, flat) and their fp32 scaler (0-d)."""

    values: torch.Tensor
    scaler: torch.Tensor


@register("terngrad")
@dataclasses.dataclass(frozen=True)
class TernGrad(Compressor):
    """TernGrad (Wen et al. 2017): unbiased {-1, 0, +1} * s, clipping, scaler sharing."""

    reduction: ClassVar[Reduction] = Reduction.GATHER
    #: TernGrad starts after 150 dense steps unless ``dense_steps`` says otherwise: its
    #: variance does the most harm while the weights move fastest. In the one-process
    #: simulation of the ``--full`` CNN run (``benchmarks/results/defaults_sim.md``, one seed)
    #: it ends 1.9 pp under dense from the first step and 0.6 pp after 150 dense steps
    default_dense_steps: ClassVar[int] = 150

    # what the user tunes
    clip: float | None = 2.5
    packing: Literal["2bit", "base3"] = "2bit"

    def __post_init__(self) -> None:
        clip = self.clip
        if clip is not None and (
            isinstance(clip, bool) or not isinstance(clip, int | float) or not clip >= 0
            or not math.isfinite(clip)
        ):
            raise ValueError(
                f"terngrad clip={clip!r}: expected a finite number >= 0 (c in c*sigma), or "
                "None/0 to turn clipping off"
            )
        if self.packing not in ("2bit", "base3"):
            raise ValueError(f"terngrad packing={self.packing!r}: expected '2bit' or 'base3'")

    def _clipped(self, tensor: torch.Tensor) -> torch.Tensor:
        """fp32 flat copy of ``tensor``, clipped at ``clip * sigma`` when clipping is on."""
        g = as_float32_flat(tensor.detach())
        if not self.clip or g.numel() == 0:
            return g
        sigma = torch.linalg.vector_norm(g) / math.sqrt(g.numel())
        bound = self.clip * sigma
        return torch.clamp(g, min=-bound, max=bound)

    def shared_stat(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's scaler ``max|clip(g)|`` as a 0-d fp32 tensor; ranks MAX-reduce it."""
        return self._scaler(self._clipped(tensor), tensor)

    @staticmethod
    def _scaler(g: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        scaler = g.abs().amax() if g.numel() else g.new_zeros(())
        if not bool(torch.isfinite(scaler)):
            raise CompressionError(
                f"tensor of shape {tuple(tensor.shape)} holds NaN or Inf values; TernGrad needs "
                "finite values"
            )
        return scaler

    def ternarize(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> Ternary:
        """The raw int8 ternary values and the scaler (``shared`` if given), before packing.

        ``values * scaler`` is an unbiased estimate of the clipped gradient.
        """
        g = self._clipped(tensor)
        scaler = local = self._scaler(g, tensor)
        if shared is not None:
            scaler = torch.as_tensor(shared, dtype=torch.float32, device=g.device).reshape(())
            if not bool(torch.isfinite(scaler)) or bool(scaler < local):
                raise CompressionError(
                    f"shared scaler {float(scaler)} is below this rank's scaler {float(local)} "
                    "(or not finite); it must be the MAX of shared_stat() over the ranks"
                )
        u = torch.rand(g.numel(), generator=generator(seed, g.device), device=g.device)
        # |g| / s <= 1; g may be a view of the caller's tensor, so nothing here is in place
        prob = g.abs() / scaler if bool(scaler > 0) else torch.zeros_like(g)
        keep = (u < prob).to(torch.int8)
        return Ternary(torch.where(g < 0, -keep, keep), scaler)

    def compress(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> tuple[Payload, DenseCtx]:
        """Ternarize (with the shared MAX scaler when given) and pack the trits."""
        values, scaler = self.ternarize(tensor, seed=seed, shared=shared)
        trits = (values + 1).to(torch.uint8)
        packed = pack_bits(trits, 2) if self.packing == "2bit" else pack_base3(trits)
        return Payload((packed, scaler.reshape(1))), DenseCtx(tensor.shape, tensor.dtype)

    def fixed_payload(self) -> bool:
        """Packed trits and one scaler: their sizes follow from the element count."""
        return True

    def unpack(self, payload: Payload, numel: int) -> Ternary:
        """The int8 ternary values and the scaler of a payload."""
        packed, scaler = payload
        if scaler.numel() != 1:
            raise CompressionError(f"terngrad payload has {scaler.numel()} scalers, expected 1")
        if self.packing == "2bit":
            trits = unpack_bits(packed, 2, numel)
        else:
            trits = unpack_base3(packed, numel)
        if numel and int(trits.max()) > 2:
            raise CompressionError("terngrad payload holds a code outside {0, 1, 2}")
        return Ternary(trits.to(torch.int8) - 1, scaler.reshape(()))

    def decompress(self, payload: Payload, ctx: DenseCtx) -> torch.Tensor:
        check_parts(payload, "terngrad", [torch.uint8, torch.float32], [None, 1])
        values, scaler = self.unpack(payload, math.prod(ctx.shape))
        return (values.to(torch.float32) * scaler).to(ctx.dtype).view(ctx.shape)
