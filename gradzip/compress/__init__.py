"""WHAT is sent: pure tensor -> payload transforms, one algorithm per module."""

from gradzip.compress import (  # noqa: F401  (registers the built-ins)
    dgc,
    fp16,
    none,
    onebit,
    qsgd,
    sfb,
    terngrad,
    topk,
)
from gradzip.compress.base import (
    CompressionError,
    Compressor,
    Payload,
    Reduction,
    available,
    compressor,
    derive_seed,
    register,
)
from gradzip.compress.memory import NoMemory, ResidualMemory

__all__ = [
    "CompressionError",
    "Compressor",
    "NoMemory",
    "Payload",
    "Reduction",
    "ResidualMemory",
    "available",
    "compressor",
    "derive_seed",
    "register",
]
