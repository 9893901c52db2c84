"""Dispatch between the Triton kernels and the torch reference of each compressor.

Rule: a CUDA tensor, with Triton importable, goes to the kernel; anything else takes the torch
code in ``gradzip/compress/<method>.py``, which is the reference the kernels are tested against.
Both produce one wire format, so a kernel payload decompresses with the reference and back.

The environment variable ``GRADZIP_KERNELS`` overrides the rule, read at every call:

* ``auto`` (default): the rule above;
* ``off``: always the torch path (e.g. to compare, or to rule the kernels out when debugging);
* ``interpret``: always the kernel, CPU tensors included, run by Triton's interpreter. This is
  how CI tests the kernels without a GPU. Triton decides at *import* time whether it
  interprets, so ``TRITON_INTERPRET=1`` must be in the environment before ``triton`` is first
  imported; this module sets it when it imports Triton itself, and raises when Triton was
  already imported in compiled mode.

The kernel modules (and Triton) are imported lazily, on the first call that needs them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

import torch

from gradzip.compress.base import CompressionError, Compressor, Payload

__all__ = [
    "ENV",
    "EXACT",
    "MODES",
    "block_size",
    "check_launch",
    "compress",
    "decompress",
    "decompress_sum",
    "feedback_step",
    "fresh_feedback",
    "has_feedback_step",
    "kernel_compress",
    "kernel_decompress",
    "kernel_module",
    "mode",
    "shared_stat",
    "triton_available",
    "use_kernel",
]

ENV = "GRADZIP_KERNELS"
MODES = ("auto", "off", "interpret")

#: launch options of every kernel: no contraction of ``a * b + c`` into one fused multiply-add.
#: Where the torch reference rounds a product and a sum separately (and so does the interpreter
#: the tests run), an FMA would change last bits: the scaled receive-side sums, which level a
#: QSGD/TernGrad value rounds to. A kernel that must match a torch op that is itself one
#: rounding says so with an explicit ``tl.fma`` (DGC's ``u = m * u + g``, as torch's
#: ``add(g, u, alpha=m)``). The kernels are memory-bound: separate roundings cost nothing
#: measurable there and keep one arithmetic for both paths.
EXACT: dict[str, Any] = {"enable_fp_fusion": False}

# compressor name -> module holding its kernels; each module offers supports(), compress(),
# decompress() and optionally decompress_sum() (see the modules for the signatures)
_MODULES = {
    "onebit": "gradzip.compress.kernels.onebit",
    "qsgd": "gradzip.compress.kernels.qsgd",
    "terngrad": "gradzip.compress.kernels.terngrad",
    "topk": "gradzip.compress.kernels.topk",
    "dgc": "gradzip.compress.kernels.dgc",
}


def mode() -> str:
    """The current ``GRADZIP_KERNELS`` mode: one of :data:`MODES`."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r} is not a valid mode; use one of {', '.join(MODES)}")
    return value


def triton_available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return "triton" in sys.modules or importlib.util.find_spec("triton") is not None


def _ensure_triton(interpret: bool) -> None:
    """Import Triton, in interpreter mode when ``interpret``; fail clearly when that is too late."""
    if interpret and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl

    if interpret and type(tl.rand).__name__ != "InterpretedFunction":
        raise RuntimeError(
            f"{ENV}=interpret needs Triton's interpreter, but triton was imported before "
            "TRITON_INTERPRET=1 was set; set TRITON_INTERPRET=1 in the environment before "
            "anything imports triton"
        )


def kernel_module(name: str) -> ModuleType | None:
    """The kernel module of compressor ``name`` (imported now), or None when it has none."""
    path = _MODULES.get(name)
    if path is None:
        return None
    _ensure_triton(mode() == "interpret")
    return importlib.import_module(path)


def use_kernel(comp: Compressor, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` compressed by ``comp`` takes the kernel path (see the module doc)."""
    current = mode()
    if current == "off" or comp.name not in _MODULES:
        return False
    if current == "auto" and not (tensor.is_cuda and triton_available()):
        return False
    module = kernel_module(comp.name)
    return module is not None and bool(module.supports(comp, tensor))


def check_launch(name: str, *tensors: torch.Tensor) -> None:
    """What every launcher checks: flat, contiguous tensors on one device that Triton can use.

    A CPU tensor is only valid under the interpreter (``TRITON_INTERPRET=1``).
    """
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        names = sorted(map(str, devices))
        raise CompressionError(f"kernel {name}: tensors on different devices {names}")
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise CompressionError(f"kernel {name}: argument {i} is not contiguous")
    device = next(iter(devices), torch.device("cpu"))
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true"):
        raise CompressionError(
            f"kernel {name}: tensors are on {device}; Triton kernels need CUDA tensors, or "
            f"TRITON_INTERPRET=1 (with {ENV}=interpret) to run on the CPU"
        )


def block_size(n: int, block: int) -> int:
    """Elements per program for ``n`` elements: ``block`` on a GPU; under the interpreter,
    which pays per program rather than per element, up to 2**16 (a power of two, >= ``block``
    only when ``n`` needs it)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true"):
        return block
    return max(16, min(1 << 16, 1 << max(0, n - 1).bit_length()))


def kernel_compress(
    comp: Compressor, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
) -> tuple[Payload, Any] | None:
    """The kernel's ``(payload, ctx)``, or None when the torch path applies (for compressors)."""
    if not use_kernel(comp, tensor):
        return None
    module = kernel_module(comp.name)
    assert module is not None
    result: tuple[Payload, Any] = module.compress(comp, tensor, seed=seed, shared=shared)
    return result


def kernel_decompress(comp: Compressor, payload: Payload, ctx: Any) -> torch.Tensor | None:
    """The kernel's decompressed tensor, or None when the torch path applies."""
    probe = payload[0] if len(payload) else torch.empty(0)
    if not use_kernel(comp, probe):
        return None
    module = kernel_module(comp.name)
    assert module is not None
    out: torch.Tensor = module.decompress(comp, payload, ctx)
    return out


def compress(
    comp: Compressor, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
) -> tuple[Payload, Any]:
    """``comp.compress`` through the kernel when :func:`use_kernel` says so."""
    result = kernel_compress(comp, tensor, seed=seed, shared=shared)
    return result if result is not None else comp.compress(tensor, seed=seed, shared=shared)


def decompress(comp: Compressor, payload: Payload, ctx: Any) -> torch.Tensor:
    """``comp.decompress`` through the kernel when :func:`use_kernel` says so."""
    out = kernel_decompress(comp, payload, ctx)
    return out if out is not None else comp.decompress(payload, ctx)


def shared_stat(comp: Compressor, tensor: torch.Tensor) -> torch.Tensor | None:
    """``comp.shared_stat`` (TernGrad's local scaler) through the kernel when there is one."""
    if use_kernel(comp, tensor):
        module = kernel_module(comp.name)
        if module is not None and hasattr(module, "shared_stat"):
            stat: torch.Tensor = module.shared_stat(comp, tensor)
            return stat
    return comp.shared_stat(tensor)


def decompress_sum(
    comp: Compressor, payloads: list[Payload], ctxs: list[Any], *, scale: float = 1.0
) -> torch.Tensor:
    """Receive side: ``scale * sum_r decompress(payloads[r], ctxs[r])`` in fp32, one kernel.

    The kernel path unpacks every rank's payload and accumulates into one output, with no dense
    temporary per rank. Elsewhere a compressor's own ``decompress_sum(payloads, ctxs,
    scale=...)`` runs when it has one and does not return None (a numba pass on CPU
    tensors); else the torch path decompresses rank by rank. Returns a tensor of the first
    ctx's shape, in fp32 (the caller casts once at the end).
    """
    if not payloads or len(payloads) != len(ctxs):
        raise CompressionError(
            f"decompress_sum needs one ctx per payload and at least one payload, got "
            f"{len(payloads)} payloads and {len(ctxs)} ctxs"
        )
    probe = payloads[0][0] if len(payloads[0]) else torch.empty(0)
    if use_kernel(comp, probe):
        module = kernel_module(comp.name)
        if module is not None and hasattr(module, "decompress_sum"):
            out: torch.Tensor = module.decompress_sum(comp, payloads, ctxs, scale=scale)
            return out
    own = getattr(comp, "decompress_sum", None)  # a CPU fast path of the method's own
    if own is not None:
        summed: torch.Tensor | None = own(payloads, ctxs, scale=scale)
        if summed is not None:
            return summed
    # rank order, the first sum out of place: a decompressed tensor may alias its payload
    total = comp.decompress(payloads[0], ctxs[0]).to(torch.float32)
    for i, (payload, ctx) in enumerate(zip(payloads[1:], ctxs[1:], strict=True)):
        part = comp.decompress(payload, ctx).to(torch.float32)
        total = total + part if i == 0 else total.add_(part)
    return total * scale if scale != 1.0 else total


def has_feedback_step(comp: Compressor, grad: torch.Tensor) -> bool:
    """Whether :func:`feedback_step` has a fused step for ``comp`` on ``grad``'s device."""
    if use_kernel(comp, grad):
        module = kernel_module(comp.name)
        if getattr(module, "compress_with_feedback", None) or getattr(module, "step", None):
            return True
    return getattr(comp, "compress_with_feedback", None) is not None


def fresh_feedback(comp: Compressor, grad: torch.Tensor) -> bool:
    """Whether :func:`feedback_step` with ``fresh=True`` writes new state tensors and leaves
    the old ones as they were at no extra traffic (the numba paths; top-k's and DGC's unfused
    steps); elsewhere (a GPU kernel's fused step, in place) a caller that must be able to
    undo the step copies the state first (``memory.snapshot``)."""
    if use_kernel(comp, grad):
        module = kernel_module(comp.name)
        if getattr(module, "compress_with_feedback", None) or getattr(module, "step", None):
            return False
    method = getattr(comp, "fresh_feedback", None)
    return bool(method is not None and method(grad))


def feedback_step(
    comp: Compressor,
    memory: Any,
    key: str | int,
    grad: torch.Tensor,
    *,
    seed: int = 0,
    fresh: bool = False,
) -> tuple[Payload, Any] | None:
    """``memory.compensate`` + compress + ``memory.update`` as one fused step, where the method
    has one: 1-bit SGD (kernel on CUDA, numba or a chunked torch sweep elsewhere) and DGC
    (kernel on CUDA). Returns None when there is none; the caller then runs the three steps
    itself. ``fresh`` (only where :func:`fresh_feedback` says so): the new residual goes into a
    buffer of its own."""
    if fresh:
        if not fresh_feedback(comp, grad):
            raise CompressionError(f"{comp.spec()}: no fresh fused step for this tensor")
        result: tuple[Payload, Any] = comp.compress_with_feedback(  # type: ignore[attr-defined]
            memory, key, grad, seed=seed, fresh=True
        )
        return result
    if use_kernel(comp, grad):
        module = kernel_module(comp.name)
        fused = getattr(module, "compress_with_feedback", None) or getattr(module, "step", None)
        if fused is not None:
            out: tuple[Payload, Any] = fused(comp, memory, key, grad, seed=seed)
            return out
    method = getattr(comp, "compress_with_feedback", None)
    return None if method is None else method(memory, key, grad, seed=seed)
