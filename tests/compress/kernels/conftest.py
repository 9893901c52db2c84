"""Kernel tests run on CPU tensors through Triton's interpreter.

Triton decides at import time whether it interprets, so ``TRITON_INTERPRET=1`` is set here,
before anything imports triton; each test then opts into the kernel path with
``GRADZIP_KERNELS=interpret`` (scoped to the test, so other tests keep the torch path).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("GRADZIP_KERNELS", "interpret")
    yield


@pytest.fixture
def load() -> Callable[[str], ModuleType]:
    """``load(name)``: the kernel module of compressor ``name``, imported in interpreter mode."""
    from gradzip.compress.kernels import dispatch

    def _load(name: str) -> ModuleType:
        module = dispatch.kernel_module(name)
        assert module is not None
        return module

    return _load
