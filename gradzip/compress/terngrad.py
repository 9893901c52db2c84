"""TernGrad: stochastic ternary gradients with a shared per-layer scaler (Wen et al. 2017,
https://arxiv.org/abs/1705.07878).

``g`` is first clipped to ``[-c*sigma, c*sigma]`` (``clip=c``, 2.5 by default; ``None`` or 0
turns it off), with ``sigma = sqrt(mean(g**2))``: the paper's standard deviation of the
(zero-mean) gradient, taken about 0 so that a constant or one-element gradient is not clipped
to 0. Then with scaler ``s = max|g|``, each element becomes ``s * sign(g_i) * b_i`` with
``b_i ~ Bernoulli(|g_i| / s)``: unbiased for the clipped gradient.

Scaler sharing: every rank calls :meth:`TernGrad.shared_stat` (its local ``s``), the allreduce
layer MAX-reduces it, and each rank compresses with ``shared=S``; all ranks then send integer
multiples of the same S, so their ternary values add up exactly. The paper shares the scaler
so that ternary values can be summed as integers; gradzip's ternary-sum strategy does that and
always shares. The allgather (the default strategy) sends each rank's scaler with its trits, so
there sharing buys nothing, costs a blocking MAX allreduce per bucket before the gather, and
adds variance (the Bernoulli variance of element ``i`` is ``s*|g_i| - g_i**2``, and the max of
the ranks' ``s`` is at least each rank's own): by default (``share=False``) every rank uses its
own scaler there; ``share=True`` shares it as the paper does.

Wire format (``n`` elements, trit ``t_i = sign(g_i) * b_i`` sent as ``t_i + 1`` in {0, 1, 2}):

* part 0, ``packing="2bit"``: ``packing.pack_bits(t + 1, 2)``, four per byte, first element
  in the lowest two bits: ``ceil(n / 4)`` bytes. ``packing="base3"``:
  ``packing.pack_base3(t + 1)``, five per byte (``sum_j (t_j + 1) * 3**j``): ``ceil(n / 5)``.
* part 1, ``float32[1]``: the scaler ``s`` (the shared one when given).

On CPU tensors the statistics (one read pass: sum of squares and max ``|g|``, so that
``max|clip(g)| = min(max|g|, c*sigma)``), the ternarization with its packing (a second pass)
and the decoding run as numba kernels (:mod:`gradzip.compress._quant_numba`) when numba is
importable, unless ``GRADZIP_NUMBA=0``; the torch code below is the reference and the fallback.
Same wire format; the trits drawn for one seed differ from the torch path's (another
generator), and ``sigma`` may differ in its last bit (another summation order). The
statistics that :meth:`TernGrad.shared_stat` takes are kept on the tensor object until the
:meth:`TernGrad.compress` that follows, which takes them instead of a second read pass when the
tensor is provably unchanged (same version counter, data pointer, shape, strides and dtype);
every other call reads the tensor again.
"""

from __future__ import annotations

import dataclasses
import math
from types import ModuleType
from typing import ClassVar, Literal, NamedTuple

import numpy as np
import torch

from gradzip.compress._numba import numba_kernels
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
from gradzip.compress.packing import (
    pack_base3,
    pack_bits,
    packed_size,
    unpack_base3,
    unpack_bits,
)

__all__ = ["TernGrad", "Ternary"]

#: the values of the codes 0, 1, 2 (3 is not a trit) before they are scaled
_TRITS = torch.tensor([-1.0, 0.0, 1.0, 0.0])
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels(*tensors: torch.Tensor) -> ModuleType | None:
    """The numba kernels when every tensor is on the CPU and numba is on, else None."""
    if any(t.device.type != "cpu" for t in tensors):
        return None
    return numba_kernels("_quant_numba")


#: the attribute under which shared_stat leaves (stamp, sum of squares, max|g|) on a tensor
_STATS = "_gradzip_terngrad_stats"


def _stamp(tensor: torch.Tensor) -> tuple[object, ...] | None:
    """What tells that ``tensor``'s values are unchanged since a previous call: its version
    counter (every in-place op bumps it), data pointer, shape, strides and dtype. None for a
    tensor without a version counter (made in inference mode): nothing is kept for it."""
    try:
        version = tensor._version
    except RuntimeError:
        return None
    return version, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype


def _not_finite(tensor: torch.Tensor) -> CompressionError:
    return CompressionError(
        f"tensor of shape {tuple(tensor.shape)} holds NaN or Inf values; TernGrad needs "
        "finite values"
    )


class Ternary(NamedTuple):
    """Raw ternary values (int8 in {-1, 0, 1}, flat) and their fp32 scaler (0-d)."""

    values: torch.Tensor
    scaler: torch.Tensor


@register("terngrad")
@dataclasses.dataclass(frozen=True)
class TernGrad(Compressor):
    """TernGrad (Wen et al. 2017): unbiased {-1, 0, +1} * s, clipping, scaler sharing."""

    reduction: ClassVar[Reduction] = Reduction.GATHER
    #: TernGrad starts after 300 dense steps unless ``dense_steps`` says otherwise: its
    #: variance (as large as the gradient's own energy at clip=2.5) does the most harm while
    #: the weights move fastest. In the one-process simulation of the ``--full`` CNN run
    #: (``benchmarks/results/defaults_sim.md``, one seed) it ends 1.9 pp under dense from the
    #: first step; in the distributed run (4 workers, 3 seeds,
    #: ``benchmarks/results/terngrad_defaults.md``) -0.67 pp after 150 dense steps and -0.44 pp
    #: after 300. In a run of tens of thousands of steps they cost little of the ratio
    default_dense_steps: ClassVar[int] = 300

    # what the user tunes
    clip: float | None = 2.5
    packing: Literal["2bit", "base3"] = "2bit"
    share: bool = False  # MAX-share the scaler on the allgather too (the ternary sum always does)

    def __post_init__(self) -> None:
        if not isinstance(self.share, bool):
            raise ValueError(f"terngrad share={self.share!r}: expected True or False")
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
        bound = float(self.clip) * sigma
        return torch.clamp(g, min=-bound, max=bound)

    def gather_shares_stat(self) -> bool:
        """``share``: whether the allgather MAX-reduces the scaler first (see the module doc)."""
        return self.share

    def shared_stat(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's scaler ``max|clip(g)|`` as a 0-d fp32 tensor; ranks MAX-reduce it."""
        nb = _kernels(tensor)
        if nb is not None:
            return self._stats_numba(nb, tensor, keep=True)[1]
        return self._scaler(self._clipped(tensor), tensor)

    @staticmethod
    def _scaler(g: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        scaler = g.abs().amax() if g.numel() else g.new_zeros(())
        if not bool(torch.isfinite(scaler)):
            raise _not_finite(tensor)
        return scaler

    def _stats_numba(
        self, nb: ModuleType, tensor: torch.Tensor, *, keep: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(flat fp32 ``g``, the scaler ``max|clip(g)|``, the clip bound or Inf) in one read
        pass, or none when the previous call (``keep``: shared_stat) left them on this very
        tensor and it is unchanged; the bound follows the reference's arithmetic from the
        norm."""
        g = as_float32_flat(tensor.detach()).contiguous()
        n = g.numel()
        if n == 0:
            return g, g.new_zeros(()), math.inf
        stamp = _stamp(tensor)
        kept = tensor.__dict__.pop(_STATS, None)  # used once at most
        if kept is not None and stamp is not None and kept[0] == stamp:
            sumsq, top = kept[1], kept[2]
        else:
            x = g.numpy()
            sumsq, top = nb.tern_stats(x, x.view(np.uint32))
            if not math.isfinite(top):
                raise _not_finite(tensor)
        if keep and stamp is not None:
            setattr(tensor, _STATS, (stamp, sumsq, top))
        bound = math.inf
        if self.clip:
            sigma = torch.tensor(nb.norm32(sumsq)) / math.sqrt(n)
            bound = float(float(self.clip) * sigma)  # the fp32 product, as the torch path
        return g, torch.tensor(min(top, bound), dtype=torch.float32), bound

    @staticmethod
    def _agree(local: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """The scaler to send: ``shared`` (checked against this rank's), else the local one."""
        if shared is None:
            return local
        scaler = torch.as_tensor(shared, dtype=torch.float32, device=local.device).reshape(())
        if not bool(torch.isfinite(scaler)) or bool(scaler < local):
            raise CompressionError(
                f"shared scaler {float(scaler)} is below this rank's scaler {float(local)} "
                "(or not finite); it must be the MAX of shared_stat() over the ranks"
            )
        return scaler

    def _compress_numba(
        self, nb: ModuleType, tensor: torch.Tensor, seed: int, shared: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed trits, 0-d scaler) of ``tensor`` by the numba kernels."""
        g, local, bound = self._stats_numba(nb, tensor)
        scaler = self._agree(local, shared)
        packed = torch.empty(self._packed_bytes(g.numel()), dtype=torch.uint8)
        nb.tern_compress(
            g.numpy(), bound, float(scaler), self.packing == "base3", nb.seed_key(seed),
            packed.numpy(),
        )  # fmt: skip
        return packed, scaler

    def _packed_bytes(self, n: int) -> int:
        return packed_size(n, 2) if self.packing == "2bit" else (n + 4) // 5

    def ternarize(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> Ternary:
        """The raw int8 ternary values and the scaler (``shared`` if given), before packing.

        ``values * scaler`` is an unbiased estimate of the clipped gradient.
        """
        nb = _kernels(tensor)
        if nb is not None:  # the trits of the numba payload
            packed, scaler = self._compress_numba(nb, tensor, seed, shared)
            payload = Payload((packed, scaler.reshape(1)))
            return Ternary(self.unpack(payload, tensor.numel()).values, scaler)
        g = self._clipped(tensor)
        scaler = self._agree(self._scaler(g, tensor), shared)
        u = torch.rand(g.numel(), generator=generator(seed, g.device), device=g.device)
        # |g| / s <= 1; g may be a view of the caller's tensor, so nothing here is in place
        prob = g.abs() / scaler if bool(scaler > 0) else torch.zeros_like(g)
        keep = (u < prob).to(torch.int8)
        return Ternary(torch.where(g < 0, -keep, keep), scaler)

    def compress(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> tuple[Payload, DenseCtx]:
        """Ternarize (with the shared MAX scaler when given) and pack the trits."""
        nb = _kernels(tensor)
        if nb is not None:
            packed, scaler = self._compress_numba(nb, tensor, seed, shared)
            return Payload((packed, scaler.reshape(1))), DenseCtx(tensor.shape, tensor.dtype)
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
        summed = self.decompress_sum([payload], [ctx])
        if summed is not None:  # the numba path; its values are rounded to ctx.dtype already
            return summed.to(ctx.dtype)
        values, scaler = self.unpack(payload, math.prod(ctx.shape))
        return (values.to(torch.float32) * scaler).to(ctx.dtype).view(ctx.shape)

    def decompress_sum(
        self, payloads: list[Payload], ctxs: list[DenseCtx], *, scale: float = 1.0
    ) -> torch.Tensor | None:
        """``scale * sum_r decompress(payloads[r], ctxs[r])`` in fp32 by the numba kernel, in
        one pass over the output: each rank's values rounded to its ctx dtype, then added in
        rank order, as the torch path of ``kernels.decompress_sum`` does. None where there is
        no such path (not CPU, numba off, ranks of different dtypes)."""
        if not payloads or len(payloads) != len(ctxs):
            return None
        nb = _kernels(*(t for p in payloads for t in p))
        ctx = ctxs[0]
        if nb is None or ctx.dtype not in _DTYPES or any(c.dtype != ctx.dtype for c in ctxs):
            return None
        n = math.prod(ctx.shape)
        for p, c in zip(payloads, ctxs, strict=True):
            check_parts(p, "terngrad", [torch.uint8, torch.float32], [None, 1])
            if c.shape != ctx.shape:
                raise CompressionError(
                    f"terngrad ranks disagree on the shape: {tuple(c.shape)} vs "
                    f"{tuple(ctx.shape)}"
                )
            if p[0].numel() != self._packed_bytes(n):
                raise CompressionError(
                    f"terngrad payload has {p[0].numel()} trit bytes; {n} trits "
                    f"({self.packing}) need {self._packed_bytes(n)}"
                )
        if len(payloads) == 1:
            codes, scalers = payloads[0][0].view(1, -1), payloads[0][1].view(1, 1)
        else:  # a copy of the compressed bytes only
            codes = torch.stack([p[0] for p in payloads])
            scalers = torch.stack([p[1] for p in payloads])
        # each rank's -s, 0, s as the reference's decompress rounds them
        table = (_TRITS * scalers).to(ctx.dtype).to(torch.float32)
        out = torch.empty(n, dtype=torch.float32)
        if nb.tern_sum(codes.numpy(), table.numpy(), self.packing == "base3", float(scale),
                       out.numpy()):
            raise CompressionError("terngrad payload holds a code outside {0, 1, 2}")
        return out.view(ctx.shape)
