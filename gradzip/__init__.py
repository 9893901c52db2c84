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

__version__ = "0.1.0"

__all__ = [
    "CompressionError",
    "Compressor",
    "Payload",
    "Reduction",
    "available",
    "compressor",
    "derive_seed",
    "register",
]
