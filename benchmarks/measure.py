"""Measure one compressor on a stream of real gradients, as the training pipeline runs it.

Per step and tensor: ``x = memory.compensate(key, g)``; ``payload, ctx = compress(x)``;
``d = decompress(payload, ctx)``; ``memory.update(key, x, d)`` (error feedback, or DGC's
momentum and velocity, from the compressor's own ``make_memory()``). SFB instead compresses the
factors ``(X, dY)`` of each Linear layer, captured by :class:`FactorCapture`.

What is recorded (see :class:`Tally`):

* bytes: dense bytes of the tensors and ``payload.nbytes``, at the checkpoint steps;
* error: ``||x - d|| / ||x||`` over all tensors of a checkpoint step, ``x`` the compressor's
  input (the compensated gradient where the method has a memory), averaged over checkpoints;
* drift: ``||sum_t r_t - sum_t d_t|| / ||sum_t r_t||`` over every step of the run, ``r_t`` the
  dense update (the gradient; for a compressor with a ``momentum`` option, which then applies
  momentum itself, the heavy-ball velocity ``u_t = m u_{t-1} + g_t``): how far the updates
  that would be applied have strayed from the dense ones;
* times: median over repeats of compress (with ``shared_stat``) and of decompress, summed over
  the tensors of the checkpoint steps, and the same for ``g.clone()``.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from benchmarks.models import linear_layers
from gradzip import Compressor, Payload, Reduction, available, compressor, derive_seed

__all__ = ["ORDER", "VARIANTS", "FactorCapture", "Tally", "bench_specs", "median_ns"]

#: option variants measured next to each compressor's defaults (skipped when not registered)
VARIANTS = (
    "qsgd:levels=7",
    "qsgd:levels=127",
    "terngrad:packing=2bit",
    "terngrad:packing=base3",
    "topk:ratio=0.01",
    "topk:ratio=0.01,error_feedback=False",
    "dgc:ratio=0.001",
)
#: row order of the known compressors (others follow, alphabetically)
ORDER = ("none", "fp16", "bf16", "onebit", "qsgd", "terngrad", "topk", "dgc", "sfb")


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def median_ns(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` in nanoseconds over ``repeats`` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return float(statistics.median(times))


class FactorCapture:
    """Forward hooks on every ``nn.Linear`` that keep its input ``X`` and, through a tensor
    hook on its output, the output gradient ``dY`` of the last backward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = linear_layers(model)
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]

    def _hook(self, name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def forward_hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if not output.requires_grad:  # evaluation under no_grad
                return
            self.inputs[name] = args[0].detach()

            def keep(grad: torch.Tensor) -> None:
                self.grads[name] = grad.detach()

            output.register_hook(keep)

        return forward_hook

    def factors(self) -> Factors:
        """``{layer name: (X, dY)}`` of the last forward/backward pass."""
        missing = sorted(set(self.layers) - set(self.grads))
        if missing:
            raise RuntimeError(f"no output gradient captured for Linear layers {missing}")
        return {n: (self.inputs[n], self.grads[n]) for n in self.layers}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class _Unit(NamedTuple):
    """What one payload covers: its tensors, their pipeline inputs, and the steps around it."""

    keys: list[str]
    inputs: list[torch.Tensor]  # what the compressor is given (compensated), per key
    compress: Callable[[], tuple[Payload, Any]]
    decompress: Callable[[Payload, Any], list[torch.Tensor]]
    finish: Callable[[list[torch.Tensor]], None]  # the memory update


class Tally:
    """One compressor's pipeline state (its memory) and its running measurements."""

    def __init__(self, label: str, comp: Compressor, seed: int = 0) -> None:
        self.label, self.comp, self.seed = label, comp, seed
        self.factors = comp.reduction is Reduction.FACTORS and hasattr(comp, "compress_factors")
        self.memory = None if self.factors else comp.make_memory()
        momentum = getattr(comp, "momentum", 0.0)
        self.momentum = float(momentum) if isinstance(momentum, (int, float)) else 0.0
        self.keys: list[str] = []
        #: why the pipeline stopped for this compressor (the run goes on without it), or None
        self.failure: str | None = None
        self.dense_bytes = self.payload_bytes = 0
        self.errors: list[float] = []
        self.compress_ns = self.decompress_ns = self.clone_ns = 0.0
        self._velocity: dict[str, torch.Tensor] = {}
        self._ref_sum: dict[str, torch.Tensor] = {}
        self._sent_sum: dict[str, torch.Tensor] = {}

    @property
    def memory_name(self) -> str:
        return "none (exact)" if self.memory is None else type(self.memory).__name__

    def step(
        self,
        step: int,
        grads: dict[str, torch.Tensor],
        factors: Factors | None = None,
        clone_ns: dict[str, float] | None = None,
        repeats: int = 5,
    ) -> None:
        """Run one training step's gradients through the pipeline; ``clone_ns`` given (a
        checkpoint step): also record bytes, error and times."""
        units = (
            self._factor_units(factors, grads) if self.factors else self._dense_units(step, grads)
        )
        err_sq = ref_sq = 0.0
        for unit in units:
            payload, ctx = unit.compress()
            outs = unit.decompress(payload, ctx)
            for key, x, d in zip(unit.keys, unit.inputs, outs, strict=True):
                self._accumulate(key, grads[key], d)
                if clone_ns is not None:
                    err_sq += float(torch.sum((x.float() - d.float()) ** 2))
                    ref_sq += float(torch.sum(x.float() ** 2))
                    self.dense_bytes += grads[key].numel() * grads[key].element_size()
                    self.clone_ns += clone_ns[key]
            if clone_ns is not None:
                self.payload_bytes += payload.nbytes
                self.compress_ns += median_ns(unit.compress, repeats)
                self.decompress_ns += median_ns(
                    functools.partial(unit.decompress, payload, ctx), repeats
                )
            unit.finish(outs)
        if clone_ns is not None:
            self.errors.append(math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0)

    def _dense_units(self, step: int, grads: dict[str, torch.Tensor]) -> list[_Unit]:
        comp, memory = self.comp, self.memory
        assert memory is not None
        if not self.keys:
            self.keys = list(grads)
        units = []
        for key, g in grads.items():
            x = memory.compensate(key, g)
            seed = derive_seed(self.seed, step, key)

            def compress(x: torch.Tensor = x, seed: int = seed) -> tuple[Payload, Any]:
                return comp.compress(x, seed=seed, shared=comp.shared_stat(x))

            def decompress(payload: Payload, ctx: Any) -> list[torch.Tensor]:
                return [comp.decompress(payload, ctx)]

            def finish(outs: list[torch.Tensor], key: str = key, x: torch.Tensor = x) -> None:
                memory.update(key, x, outs[0])  # consumes x

            units.append(_Unit([key], [x], compress, decompress, finish))
        return units

    def _factor_units(self, factors: Factors | None, grads: dict[str, torch.Tensor]) -> list[_Unit]:
        if factors is None:
            raise ValueError(f"{self.label} compresses Linear-layer factors; none were captured")
        comp: Any = self.comp
        units = []
        for layer, (x, dy) in factors.items():
            keys = [k for k in (f"{layer}.weight", f"{layer}.bias") if k in grads]
            self.keys += [k for k in keys if k not in self.keys]

            def compress(x: torch.Tensor = x, dy: torch.Tensor = dy) -> tuple[Payload, Any]:
                return comp.compress_factors(x, dy)

            def decompress(payload: Payload, ctx: Any, n: int = len(keys)) -> list[torch.Tensor]:
                outs = [comp.decompress(payload, ctx)]
                return [*outs, comp.decompress_bias(payload, ctx)] if n == 2 else outs

            inputs = [grads[k] for k in keys]
            units.append(_Unit(keys, inputs, compress, decompress, lambda outs: None))
        return units

    def _accumulate(self, key: str, grad: torch.Tensor, sent: torch.Tensor) -> None:
        g = grad.detach().float()
        if self.momentum:
            u = self._velocity.get(key)
            g = g.clone() if u is None else torch.add(g, u, alpha=self.momentum)
            self._velocity[key] = g
        if key not in self._ref_sum:
            self._ref_sum[key] = torch.zeros_like(g)
            self._sent_sum[key] = torch.zeros_like(g)
        self._ref_sum[key] += g
        self._sent_sum[key] += sent.detach().float().reshape(g.shape)

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.payload_bytes if self.payload_bytes else math.inf

    @property
    def error(self) -> float:
        return statistics.fmean(self.errors) if self.errors else math.nan

    @property
    def drift(self) -> float:
        num = sum(
            float(torch.sum((self._ref_sum[k] - self._sent_sum[k]) ** 2)) for k in self._ref_sum
        )
        den = sum(float(torch.sum(self._ref_sum[k] ** 2)) for k in self._ref_sum)
        return math.sqrt(num / den) if den > 0 else math.nan


def bench_specs(variants: Sequence[str] = VARIANTS) -> tuple[list[str], list[str]]:
    """(specs to measure, notes): each registered compressor with its defaults, then the
    variants of registered ones. A variant equal to a default replaces its label; one whose
    options do not parse is left out with a note."""
    specs, built, notes = [], [], []
    names = available()
    names = [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]
    for name in names:
        specs.append(name)
        built.append(compressor(name))
    for spec in variants:
        name = spec.partition(":")[0]
        if name not in names:
            continue
        try:
            comp = compressor(spec)
        except ValueError as err:
            notes.append(f"variant {spec!r} left out: {err}")
            continue
        if comp in built:
            i = built.index(comp)
            specs[i] = spec if specs[i] == name else specs[i]
        else:  # after the last row of the same compressor
            i = max(j for j, s in enumerate(specs) if s.partition(":")[0] == name)
            specs.insert(i + 1, spec)
            built.insert(i + 1, comp)
    return specs, notes
