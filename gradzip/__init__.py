"""gradzip: compressed gradient communication for data-parallel PyTorch training."""

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
from gradzip.hooks.ddp import ddp_comm_hook

__version__ = "0.1.0"

__all__ = [
    "CompressionError",
    "Compressor",
    "Payload",
    "Reduction",
    "available",
    "compressor",
    "derive_seed",
    "ddp_comm_hook",
    "register",
]
