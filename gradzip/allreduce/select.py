"""The strategy for a compressor: by its :class:`Reduction` kind and the caller's choice."""

from __future__ import annotations

from gradzip.allreduce.dense import AllreduceStrategy
from gradzip.allreduce.gather import AllgatherStrategy
from gradzip.allreduce.scatter_gather import ScatterGatherStrategy
from gradzip.allreduce.sparse import SparseStrategy
from gradzip.allreduce.strategy import Strategy
from gradzip.allreduce.ternary import TernarySumStrategy
from gradzip.compress.base import Compressor, Reduction

__all__ = ["strategy_for"]


def strategy_for(
    compressor: Compressor,
    *,
    gather: str = "allgather",
    sparse: str = "allgather",
    average: bool = True,
    verify: bool = True,
) -> Strategy:
    """The strategy for ``compressor.reduction``; ``gather`` picks ``"allgather"``,
    ``"scatter_gather"`` or ``"ternary_sum"`` (TernGrad only) for GATHER; ``sparse`` picks
    ``"allgather"`` or ``"recursive"``."""

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
