"""Why TernGrad has no error feedback: its residual does not stay bounded.

``python -m benchmarks.terngrad_feedback`` prints two measurements (one process, CPU):

* the norm of TernGrad's error-feedback residual over steps, relative to the gradient's, when
  it is fed independent Gaussian gradients (10,000 elements): at ``clip=2.5`` the error
  ``E|Q(x)-x|^2 = s|x|_1 - |x|^2`` is about ``|x|^2`` itself, so the compressor is not a
  contraction and the residual grows;
* the SNR of the sum of 8 steps of reduced gradients in the simulated 4-rank run of
  ``tests/allreduce/test_select.py``, for the allgather and scatter-gather, with and without
  feedback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import gradzip
from gradzip.compress.base import Compressor
from gradzip.compress.terngrad import TernGrad

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "allreduce"))
from helpers import reference_mean, simulate_scatter_gather


def residual_growth(c: Compressor, steps: tuple[int, ...] = (1, 10, 100, 1000)) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    r = torch.zeros(10_000)
    out = []
    for t in range(1, max(steps) + 1):
        g = torch.randn(10_000, generator=gen)
        x = g + r
        payload, ctx = c.compress(x, seed=t)
        r = x - c.decompress(payload, ctx)
        if t in steps:
            out.append(float(r.norm() / g.norm()))
    return out


def _snr_db(truth: torch.Tensor, got: torch.Tensor) -> float:
    return float(20 * torch.log10(truth.norm() / (truth - got).norm()))


def snr(c: Compressor) -> tuple[float, float]:
    """(allgather, scatter-gather) SNR in dB of the sum of 8 steps' reduced gradients."""
    world, steps, n = 4, 8, 1 << 14
    gen = torch.Generator().manual_seed(0)
    signal = torch.randn(n, generator=gen)
    grads = [[signal + 0.5 * torch.randn(n, generator=gen) for _ in range(world)]] * steps
    truth = steps * sum(grads[0]) / world
    residual = [torch.zeros(n) for _ in range(world)]
    ag = torch.zeros(n)
    for step, per_rank in enumerate(grads):
        comp = [g + residual[r] if c.error_feedback else g for r, g in enumerate(per_rank)]
        ag += reference_mean(c, comp, "g", step)
        if c.error_feedback:
            for r, x in enumerate(comp):
                p, ctx = c.compress(x, seed=gradzip.derive_seed(0, step, "g", r))
                residual[r] = x - c.decompress(p, ctx)
    sg = torch.stack([g.reshape(-1) for g in simulate_scatter_gather(c, grads, "g")]).sum(0)
    return _snr_db(truth, ag), _snr_db(truth, sg)


class _WithFeedback(TernGrad):
    """TernGrad with a residual (not an option of the library: see the module docstring)."""

    error_feedback = True


def main() -> None:
    torch.set_num_threads(1)
    print("residual norm / gradient norm after 1, 10, 100, 1000 steps:")
    for label, c in (("terngrad + feedback", _WithFeedback()),
                     ("terngrad:clip=0 + feedback", _WithFeedback(clip=0))):
        print(f"  {label}: " + ", ".join(f"{v:.1f}" for v in residual_growth(c)))
    print("SNR (dB) of the sum of 8 steps, 4 simulated ranks: allgather, scatter-gather")
    cases: list[tuple[str, Compressor]] = [
        ("onebit", gradzip.compressor("onebit")), ("terngrad", gradzip.compressor("terngrad")),
        ("terngrad + feedback", _WithFeedback()),
    ]
    for label, comp in cases:
        ag, sg = snr(comp)
        print(f"  {label}: {ag:.1f}, {sg:.1f}")


if __name__ == "__main__":
    main()
