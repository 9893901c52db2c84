"""HOW it is sent: compressed collectives over an existing engine (torch.distributed, Horovod).

Horovod is imported only when its backend is built (``gradzip.allreduce.horovod``).
"""

from gradzip.allreduce.backend import Backend, CommStats, LocalBackend, ReduceOp, Work
from gradzip.allreduce.dense import AllreduceStrategy
from gradzip.allreduce.entry import Entry, Reduced
from gradzip.allreduce.fusion import DEFAULT_FUSION_BYTES, Reducer
from gradzip.allreduce.gather import AllgatherStrategy
from gradzip.allreduce.scatter_gather import ScatterGatherStrategy
from gradzip.allreduce.select import strategy_for
from gradzip.allreduce.sparse import SparseStrategy, sparse_allgather, sparse_allreduce
from gradzip.allreduce.strategy import Strategy
from gradzip.allreduce.ternary import TernarySumStrategy
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
