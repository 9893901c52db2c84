"""HOW it is sent: compressed collectives over an existing engine (torch.distributed, Horovod).

Horovod is imported only when its backend is built (``gradzip.allreduce.horovod``).
"""

from gradzip.allreduce.backend import Backend, CommStats, LocalBackend, ReduceOp, Work
from gradzip.allreduce.fusion import DEFAULT_FUSION_BYTES, Entry, Reduced, Reducer
from gradzip.allreduce.sparse import SparseStrategy, sparse_allgather, sparse_allreduce
from gradzip.allreduce.strategies import (
    AllgatherStrategy,
    AllreduceStrategy,
    ScatterGatherStrategy,
    Strategy,
    TernarySumStrategy,
    strategy_for,
)
from gradzip.allreduce.torch_dist import TorchDistBackend

__all__ = [
    "DEFAULT_FUSION_BYTES",
    "AllgatherStrategy",
    "AllreduceStrategy",
    "Backend",
    "CommStats",
    "Entry",
    "LocalBackend",
    "ReduceOp",
    "Reduced",
    "Reducer",
    "ScatterGatherStrategy",
    "SparseStrategy",
    "Strategy",
    "TernarySumStrategy",
    "TorchDistBackend",
    "Work",
    "sparse_allgather",
    "sparse_allreduce",
    "strategy_for",
]
