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
(:func:`default_gather`) takes the scatter-gather where it sends fewer bytes and the
compressor's error feedback makes up for its second quantization.
"""

from __future__ import annotations

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


def default_gather(compressor: Compressor, world_size: int | None) -> str:
    """The GATHER strategy ``strategy_for`` takes when none is asked for: "scatter_gather"
    where it moves fewer bytes (from three ranks on: ``2(P-1)/P·m < (P-1)·m`` exactly when
    ``P > 2``, by :func:`gather_bytes`, whatever the bucket's size) and the compressor keeps
    error feedback; "allgather" otherwise, and when the world size is not known (None).

    Scatter-gather quantizes twice: each rank's chunk, then the reduced chunk. With error
    feedback (1-bit SGD) the server's residual carries the second quantization's error into
    the next step, as the worker's carries the first; without (QSGD, TernGrad: unbiased, no
    residuals) it is added anew every step, and does not shrink as ranks are added. Summed
    over 8 steps of a simulated 4-rank run (``tests/allreduce/test_select.py``), the reduced
    gradients lose 3 dB of SNR against the allgather's for 1-bit, 7 dB for QSGD and 6 dB for
    TernGrad; those two keep the allgather unless ``gather="scatter_gather"`` asks for it.
    """
    if world_size is None or world_size < 2 or not compressor.error_feedback:
        return "allgather"
    m = world_size * 1024  # any size gives the same answer; this one cuts into whole chunks
    fewer = gather_bytes("scatter_gather", m, world_size) < gather_bytes("allgather", m, world_size)
    return "scatter_gather" if fewer else "allgather"


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

    ``gather`` picks ``"allgather"``, ``"scatter_gather"`` or ``"ternary_sum"`` (TernGrad
    only) for GATHER payloads; None (the default) takes :func:`default_gather` for
    ``world_size`` ranks: the one that moves fewer bytes (scatter-gather from three ranks on)
    for compressors with error feedback, else, and when ``world_size`` is not given, the
    allgather. ``sparse`` picks ``"allgather"`` or ``"recursive"`` for SPARSE payloads."""
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
