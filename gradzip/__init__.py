"""gradzip: compressed gradient communication for data-parallel PyTorch training."""

from gradzip.allreduce.backend import PeerLost
from gradzip.compress import (
    CompressionError,
    Compressor,
    Payload,
    Reduction,
    available,
    compressor,
    derive_seed,
    register,
)
from gradzip.hooks.broadcast import broadcast_optimizer_state, broadcast_parameters
from gradzip.hooks.ddp import ddp_comm_hook
from gradzip.hooks.optimizer import Average, DistributedOptimizer, Op, Sum

__version__ = "0.1.0"

__all__ = [
    "Average",
    "CompressionError",
    "Compressor",
    "DistributedOptimizer",
    "Op",
    "Payload",
    "PeerLost",
    "Reduction",
    "Sum",
    "available",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "compressor",
    "ddp_comm_hook",
    "derive_seed",
    "register",
]
