"""Triton kernels for CUDA tensors, with the torch code of each compressor as the reference.

Use :func:`compress`, :func:`decompress` and :func:`decompress_sum` (receive side: all ranks'
payloads accumulated in one kernel); they pick the kernel for CUDA tensors when Triton is
installed and the torch path otherwise. ``GRADZIP_KERNELS=off|auto|interpret`` overrides the
choice (``interpret`` runs the kernels on CPU tensors through Triton's interpreter, with
``TRITON_INTERPRET=1``; that is how the tests run without a GPU). See :mod:`.dispatch`.

Nothing here imports Triton until a kernel is actually needed.
"""

from gradzip.compress.kernels.dispatch import (
    ENV,
    MODES,
    compress,
    decompress,
    decompress_sum,
    feedback_step,
    fresh_feedback,
    has_feedback_step,
    kernel_compress,
    kernel_decompress,
    kernel_module,
    mode,
    shared_stat,
    triton_available,
    use_kernel,
)

__all__ = [
    "ENV",
    "MODES",
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
