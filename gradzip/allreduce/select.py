"""The strategy for a compressor: by its :class:`Reduction` kind and the caller's choice.

GATHER payloads (1-bit, QSGD, TernGrad) do not add up, so they are either gathered whole
(:class:`~gradzip.allreduce.gather.AllgatherStrategy`) or reduced in two phases
(:class:`~gradzip.allreduce.scatter_gather.ScatterGatherStrategy`). For a bucket whose
payloads pack into ``m`` bytes, one rank sends (:func:`gather_bytes`, as ``CommStats``
counts them):

* allgather: ``(P-1)·m`` — every other rank's payload passes through it once;
* scatter-gather: ``(P-1)·m/P`` (the alltoall of chunks) plus ``(P-1)·m/P`` (the allgather
  of the re-compressed reduced chunks, each the size of a chunk) = ``2(P-1)/P·m``.

Both send ``m`` at two ranks; from three on the scatter-gather sends less (2/3 of the
allgather's bytes at P=3, 1/2 at 4, 1/4 at 8). Each chunk carries its own pack header and
scales, a few bytes per chunk, which the model leaves out (measured for a 1-bit bucket of
2**20 elements: 28 bytes more than the allgather at P=2, 0.2% of ``m`` at P=8). The default
(:func:`default_gather`) keeps the allgather, whose accuracy the scatter-gather's second
quantization does not reach, until the allgather's bytes pass half the dense allreduce's
(``P >= r``, the compressor's ratio), and takes the scatter-gather from there for compressors
with error feedback.
"""

from __future__ import annotations

import functools

import torch

from gradzip.allreduce.backend import wire_bytes
from gradzip.allreduce.dense import AllreduceStrategy
from gradzip.allreduce.gather import AllgatherStrategy
from gradzip.allreduce.scatter_gather import ScatterGatherStrategy
from gradzip.allreduce.sparse import SparseStrategy
from gradzip.allreduce.strategy import Strategy
from gradzip.allreduce.ternary import TernarySumStrategy
from gradzip.compress.base import Compressor, Reduction

__all__ = ["default_gather", "gather_bytes", "strategy_for"]

GATHERS = ("allgather", "scatter_gather")


def gather_bytes(strategy: str, payload_bytes: int, world_size: int) -> int:
    """Bytes one rank sends to reduce a bucket of GATHER payloads packing into
    ``payload_bytes``, by ``strategy`` ("allgather" or "scatter_gather") over ``world_size``
    ranks; see the module docstring (pack headers and per-chunk scales left out)."""
    p, m = world_size, payload_bytes
    if strategy == "allgather":
        return wire_bytes("allgather", m, p)
    if strategy == "scatter_gather":
        chunk = -(-m // p)  # the chunk each rank reduces, and sends re-compressed
        return wire_bytes("alltoall", (p - 1) * chunk, p) + wire_bytes("allgather", chunk, p)
    raise ValueError(f"strategy={strategy!r}; expected one of {GATHERS}")


#: elements of the flat fp32 tensor whose payload measures a compressor's ratio for
#: :func:`default_gather` (large enough that per-group scales cost what they cost in a layer)
_PROBE_NUMEL = 1 << 20


def _ratio(compressor: Compressor) -> float:
    """Dense bytes over payload bytes of ``compressor`` on a probe tensor of 2**20 zeros
    (measured once per compressor; again each time for one that cannot be hashed)."""
    try:
        return _cached_ratio(compressor)
    except TypeError:  # an unhashable compressor (a user's, with a list field)
        return _measure_ratio(compressor)


def _measure_ratio(compressor: Compressor) -> float:
    payload, _ = compressor.compress(torch.zeros(_PROBE_NUMEL), seed=0)
    return 4 * _PROBE_NUMEL / max(1, payload.nbytes)


_cached_ratio = functools.cache(_measure_ratio)


def default_gather(compressor: Compressor, world_size: int | None) -> str:
    """The GATHER strategy ``strategy_for`` takes when none is asked for: the allgather,
    until the world size reaches the compressor's ratio ``r`` (32 ranks for 1-bit, r = 31.5);
    from there on "scatter_gather" for compressors with error feedback.

    Scatter-gather sends fewer bytes from three ranks on (``2(P-1)/P·m`` against the
    allgather's ``(P-1)·m``, :func:`gather_bytes`), but it quantizes twice: each rank's
    chunk, then the chunk's sum over ranks. Each rank then receives one 1-bit code per element
    where the allgather gives it P, and the server's residual has to carry the rest into
    later steps. Measured on the Fashion-MNIST CNN (1-bit with its defaults, 3 seeds;
    ``benchmarks/results/onebit_gather_default.md``), that costs about 1 pp of test accuracy
    at 4 and at 8 ranks (the allgather: 0.3-0.4 pp under dense), and the defaults keep dense
    accuracy first. The allgather's bytes grow with P, though: they
    pass half of the dense ring allreduce's ``2(P-1)/P·n·4`` bytes exactly when
    ``P >= r`` (``(P-1)·n·4/r >= (P-1)/P·n·4``). From there compression by allgather saves
    less than 2x on the wire and scatter-gather's ``r``-fold saving is worth its accuracy.

    Without error feedback (QSGD, TernGrad: unbiased, no residuals) the second quantization's
    error is added anew every step: summed over 8 steps of a simulated 4-rank run
    (``tests/allreduce/test_select.py``) the reduced gradients lose 3 dB of SNR against the
    allgather's for 1-bit, 7 dB for QSGD and 6 dB for TernGrad; those two keep the allgather
    at every size unless ``gather="scatter_gather"`` asks for it. "allgather" also when the
    world size is not known (None).
    """
    if world_size is None or world_size < 3 or not compressor.error_feedback:
        return "allgather"
    return "scatter_gather" if world_size >= _ratio(compressor) else "allgather"


def strategy_for(
    compressor: Compressor,
    *,
    gather: str | None = None,
    sparse: str = "allgather",
    average: bool = True,
    verify: bool = True,
    world_size: int | None = None,
) -> Strategy:
    """The strategy for ``compressor.reduction``.

    ``gather`` picks ``"allgather"``, ``"scatter_gather"`` or ``"ternary_sum"`` (TernGrad only) for
    GATHER payloads; None (the default) takes :func:`default_gather` for ``world_size`` ranks: the
    allgather, and for compressors with error feedback the scatter-gather from ``r`` ranks on (the
    compressor's ratio: 32 for 1-bit). ``sparse`` picks ``"allgather"`` or ``"recursive"`` for
    SPARSE payloads."""
    if gather is None and compressor.reduction is Reduction.GATHER:
        gather = default_gather(compressor, world_size)
    kind = compressor.reduction
    option, value = {
        Reduction.SUM: ("sum", "allreduce"),
        Reduction.GATHER: ("gather", gather),
        Reduction.SPARSE: ("sparse", sparse),
        Reduction.FACTORS: ("factors", "allgather"),
    }[kind]
    tables: dict[Reduction, dict[str, type[Strategy]]] = {
        Reduction.SUM: {"allreduce": AllreduceStrategy},
        Reduction.GATHER: {
            "allgather": AllgatherStrategy,
            "scatter_gather": ScatterGatherStrategy,
            "ternary_sum": TernarySumStrategy,
        },
        Reduction.SPARSE: {"allgather": AllgatherStrategy, "recursive": SparseStrategy},
        Reduction.FACTORS: {"allgather": AllgatherStrategy},
    }
    table = tables[kind]
    if value not in table:
        raise ValueError(
            f"{option}={value!r} is not a strategy for {compressor.spec()!r}; "
            f"expected one of {sorted(table)}"
        )
    return table[value](average=average, verify=verify)
