"""The switch for gradzip's optional numba kernels on CPU tensors.

The numba modules (:mod:`~gradzip.compress._onebit_numba`, :mod:`~gradzip.compress._quant_numba`,
:mod:`~gradzip.compress._sparse_numba`)
accelerate the torch reference code of their methods on the CPU. They are imported lazily, the
first time a CPU tensor needs them, so gradzip runs without numba installed. ``GRADZIP_NUMBA=0``
in the environment, read at every call, turns all of them off (the torch path runs instead):
to compare the two, or to rule the kernels out when debugging.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

__all__ = ["ENV", "numba_enabled", "numba_kernels"]

ENV = "GRADZIP_NUMBA"


def numba_enabled() -> bool:
    """False when the environment sets ``GRADZIP_NUMBA=0``; numba may still be missing."""
    return os.environ.get(ENV, "1") != "0"


@functools.cache
def _import(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"gradzip.compress.{module}")
    except ImportError:  # numba is not installed
        return None


def numba_kernels(module: str) -> ModuleType | None:
    """``gradzip.compress.<module>`` (a numba kernel module), or None when numba is missing or
    switched off by ``GRADZIP_NUMBA=0``."""
    return _import(module) if numba_enabled() else None
