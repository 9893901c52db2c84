"""Kernels against the torch reference on one device: issue 5's correctness checks, for a GPU.

The kernel tests (``tests/compress/kernels``) run under Triton's interpreter on CPU tensors.
This script makes the same kinds of checks on any device, so that on a GPU they run on the
compiled kernels: for each dtype (fp32, fp16, bf16) and size (1, 1023 and 2**20 + 7 by
default), and each compressor, the kernel path (``GRADZIP_KERNELS=auto`` on CUDA, ``interpret``
elsewhere) against the torch path (``off``) on the same tensors:

* onebit: payload equal bit for bit on dyadic data (exact sums), sign bytes on random data;
  the fused error-feedback step gives the reference's payload and residual over 3 steps;
* qsgd, terngrad: one wire format (each path decodes the other's payload identically), the
  receive-side sum equal to the reference's, and the mean of 32 draws unbiased within 6
  standard errors (the standard error taken from the draws themselves);
* topk (exact): the reference's indices and values; dgc: payload, u and v over 3 steps;
* the receive-side sums of every method equal to the sum of the reference's decodes.

Prints one line per check and exits 1 when one fails::

    python -m benchmarks.kernels_check --device cuda
    TRITON_INTERPRET=1 python -m benchmarks.kernels_check --device cpu --sizes 1,1023
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.kernels import _kernel_mode
from gradzip.compress import kernels
from gradzip.compress.base import Compressor, DenseCtx
from gradzip.compress.dgc import DGC
from gradzip.compress.memory import ResidualMemory
from gradzip.compress.onebit import OneBit
from gradzip.compress.qsgd import QSGD
from gradzip.compress.terngrad import TernGrad
from gradzip.compress.topk import TopK

__all__ = ["main"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Check = Callable[[torch.device, torch.dtype, int], None]


class _Paths:
    """Runs a call on the kernel path or on the torch path (the reference: the torch code,
    with the CPU's numba kernels off too)."""

    def __init__(self, device: torch.device) -> None:
        self.kernel_mode = "auto" if device.type == "cuda" else "interpret"

    def kernel(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with _kernel_mode(self.kernel_mode):
            return fn(*args, **kwargs)

    def require(self, comp: Compressor, x: torch.Tensor) -> None:
        """Fail unless ``x`` compressed by ``comp`` really takes a kernel on the kernel path."""
        used = self.kernel(kernels.use_kernel, comp, x)
        assert used, f"{comp.spec()} on {x.device} takes the torch path, not a kernel"

    def ref(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with _kernel_mode("off", numba=False):  # the torch code, not the CPU kernels
            return fn(*args, **kwargs)


def _data(
    n: int, dtype: torch.dtype, device: torch.device, seed: int, dyadic: bool = False
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dyadic:  # multiples of 1/8 in [-8, 8): every partial sum is exact in fp32
        x = torch.randint(-64, 64, (n,), generator=gen).float() / 8
    else:
        x = torch.randn(n, generator=gen)
    return x.to(dtype).to(device)


def _equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    same = a.shape == b.shape and a.dtype == b.dtype
    assert same, f"{what}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    assert torch.equal(a, b), f"{what}: {int((a != b).sum())} of {a.numel()} differ"


def _receive_sums(paths: _Paths, comp: Compressor, pairs: list) -> None:
    payloads, ctxs = [p for p, _ in pairs], [c for _, c in pairs]
    got = paths.kernel(kernels.decompress_sum, comp, payloads, ctxs, scale=0.5)
    expect = comp.decompress(payloads[0], ctxs[0]).float()
    for p, c in pairs[1:]:
        expect = expect + comp.decompress(p, c).float()
    _equal(got, expect * 0.5, "receive-side sum")


def check_onebit(device: torch.device, dtype: torch.dtype, n: int) -> None:
    paths, comp = _Paths(device), OneBit()
    x = _data(n, dtype, device, 1, dyadic=True)
    paths.require(comp, x)
    got, _ = paths.kernel(kernels.compress, comp, x)
    ref, _ = paths.ref(comp.compress, x)
    _equal(got[0], ref[0], "sign bytes (dyadic)")
    _equal(got[1], ref[1], "scales (dyadic)")
    y = _data(n, dtype, device, 2)
    got, _ = paths.kernel(kernels.compress, comp, y)
    ref, _ = paths.ref(comp.compress, y)
    _equal(got[0], ref[0], "sign bytes (random)")
    assert torch.allclose(got[1], ref[1], rtol=1e-5, atol=0), "scales beyond fp32 rounding"
    pairs = [paths.kernel(kernels.compress, comp, _data(n, dtype, device, s)) for s in range(3)]
    _receive_sums(paths, comp, pairs)


def check_onebit_step(device: torch.device, dtype: torch.dtype, n: int) -> None:
    paths, comp = _Paths(device), OneBit(bucket_size=128)
    mems = {"kernel": ResidualMemory(), "ref": ResidualMemory()}
    for mem in mems.values():
        mem.residuals["w"] = _data(n, torch.float32, device, 9, dyadic=True)
    grad = _data(n, dtype, device, 10, dyadic=True)
    paths.require(comp, grad)
    got = paths.kernel(kernels.feedback_step, comp, mems["kernel"], "w", grad)
    compensated = mems["ref"].compensate("w", grad)
    ref, ctx = comp.compress(compensated)
    mems["ref"].update("w", compensated, comp.decompress(ref, ctx))
    assert got is not None, "onebit has no fused step on this path"
    _equal(got[0][0], ref[0], "EF step sign bytes")
    _equal(got[0][1], ref[1], "EF step scales")
    _equal(mems["kernel"].residuals["w"], mems["ref"].residuals["w"], "EF step residual")
    for step in range(2):  # later residuals are not dyadic: the exact invariant still holds
        mem, g = mems["kernel"], _data(n, dtype, device, 20 + step)
        compensated = mem.residuals["w"] + g.float()
        payload, ctx = paths.kernel(kernels.feedback_step, comp, mem, "w", g)
        decoded = comp.decompress(payload, DenseCtx(ctx.shape, torch.float32))
        _equal(mem.residuals["w"], compensated - decoded, f"step {step + 2} residual invariant")


def _stochastic(comp: Compressor, device: torch.device, dtype: torch.dtype, n: int) -> None:
    paths = _Paths(device)
    x = _data(n, dtype, device, 3)
    paths.require(comp, x)
    shared = paths.kernel(kernels.shared_stat, comp, x)
    payload, ctx = paths.kernel(kernels.compress, comp, x, seed=5, shared=shared)
    ref, _ = paths.ref(comp.compress, x, seed=5, shared=shared)
    assert payload.layout() == ref.layout(), "payload layouts differ"
    for name, p in (("kernel", payload), ("reference", ref)):
        a = paths.kernel(kernels.decompress, comp, p, ctx)
        b = paths.ref(comp.decompress, p, ctx)
        _equal(a, b, f"{name} payload decoded by both paths")
    # unbiased: 32 draws decoded in fp32 (a half-precision decode rounds every level)
    fp32 = DenseCtx(ctx.shape, torch.float32)

    def draw(seed: int) -> torch.Tensor:
        p, _ = kernels.compress(comp, x, seed=seed, shared=shared)
        return kernels.decompress(comp, p, fp32).double()

    draws = torch.stack([paths.kernel(draw, s) for s in range(32)])
    target = x.double()
    if isinstance(comp, TernGrad):  # TernGrad is unbiased for the clipped gradient
        scaler = float(payload[1].max())
        target = target.clamp(-scaler, scaler)
    err, var = draws.mean(0) - target, draws.var(0) / 32
    scale = float(var.sum()) ** 0.5
    for name, total in (("bias", err.sum()), ("magnitude bias", (err * target.sign()).sum())):
        z = abs(float(total)) / scale if scale else abs(float(total)) * float("inf")
        assert z < 6 or float(total) == 0, f"{name}: {z:.1f} standard errors"
    pairs = [
        paths.kernel(kernels.compress, comp, _data(n, dtype, device, s), seed=s) for s in range(3)
    ]
    _receive_sums(paths, comp, pairs)


def check_qsgd(device: torch.device, dtype: torch.dtype, n: int) -> None:
    for comp in (QSGD(), QSGD(levels=1, bucket_size=7, norm="max"), QSGD(levels=127)):
        _stochastic(comp, device, dtype, n)


def check_terngrad(device: torch.device, dtype: torch.dtype, n: int) -> None:
    for comp in (TernGrad(), TernGrad(packing="base3"), TernGrad(clip=None)):
        _stochastic(comp, device, dtype, n)


def check_topk(device: torch.device, dtype: torch.dtype, n: int) -> None:
    paths, comp = _Paths(device), TopK(ratio=0.01)
    x = _data(n, torch.float32, device, 4).to(dtype)
    if dtype != torch.float32 and n > 2**12:
        return  # half types repeat magnitudes: ties at the cut make exact top-k ambiguous
    paths.require(comp, x)
    (idx, vals), _ = paths.kernel(kernels.compress, comp, x)
    (ref_idx, ref_vals), _ = paths.ref(comp.compress, x)
    order = torch.sort(ref_idx).indices
    assert bool((idx[1:] > idx[:-1]).all()), "kernel indices not ascending"
    _equal(idx, ref_idx[order], "top-k indices")
    _equal(vals, ref_vals[order], "top-k values")


def check_dgc(device: torch.device, dtype: torch.dtype, n: int) -> None:
    comp = DGC(ratio=0.01, clip_norm=50.0, epoch=1.0)
    paths, ref_mem, ker_mem = _Paths(device), comp.make_memory(), comp.make_memory()
    for step in range(3):
        grad = _data(n, dtype, device, 30 + step)
        paths.require(comp, grad)
        velocity = ref_mem.compensate("w", grad)
        ref, ctx = comp.compress(velocity, seed=step)
        ref_mem.update("w", velocity, comp.decompress(ref, ctx))
        got = paths.kernel(kernels.feedback_step, comp, ker_mem, "w", grad, seed=step)
        assert got is not None, "dgc has no fused step on this path"
        order = torch.sort(ref[0]).indices
        _equal(got[0][0], ref[0][order], f"step {step} indices")
        _equal(got[0][1], ref[1][order], f"step {step} values")
        _equal(ker_mem.momenta["w"], ref_mem.momenta["w"], f"step {step} u")
        _equal(ker_mem.velocities["w"], ref_mem.velocities["w"], f"step {step} v")


CHECKS: dict[str, Check] = {
    "onebit": check_onebit,
    "onebit EF step": check_onebit_step,
    "qsgd": check_qsgd,
    "terngrad": check_terngrad,
    "topk": check_topk,
    "dgc step": check_dgc,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=f"1,1023,{2**20 + 7}", help="comma-separated")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16", help="of fp32, fp16, bf16")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("off CUDA the kernels run under Triton's interpreter: set TRITON_INTERPRET=1")
    sizes = [int(s) for s in args.sizes.split(",")]
    failed = 0
    for name in args.checks.split(","):
        for dtype_name in args.dtypes.split(","):
            for n in sizes:
                label = f"{name:<15} {dtype_name:<5} n={n:<8}"
                try:
                    CHECKS[name](device, DTYPES[dtype_name], n)
                    print(f"ok      {label}", flush=True)
                except Exception as exc:  # every check reports; the exit code sums them up
                    failed += 1
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    print(f"FAILED  {label} {type(exc).__name__}: {exc} (line {where.lineno})")
    total = len(args.checks.split(",")) * len(args.dtypes.split(",")) * len(sizes)
    print(f"{total - failed} of {total} checks passed on {device}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
