"""The gradient path of :class:`~gradzip.hooks.optimizer.DistributedOptimizer`: buckets that
launch as gradients become ready, error feedback per parameter, write-back at synchronize.

Buckets are fixed once, identically on every rank: parameters are taken in reverse
registration order (backward produces the last layers first, as DDP assumes), split into one
stream per compressor, and each stream is cut into buckets of about ``fusion_bytes``. The
buckets are ordered by where their last tensor sits in that order. A bucket launches when all
its gradients are ready *and* every earlier bucket has launched, so all ranks issue the same
collectives in the same order whatever order their hooks fire in.

Parameters without a gradient on a rank (an unused branch) go through the same steps with a
gradient of zeros, error feedback included, so every rank describes every bucket alike and
the result is the gradient of the global loss (as Horovod and DDP's
``find_unused_parameters``). One small MAX allreduce per step of a "has a gradient" flag per
parameter then tells which parameters no rank used: those keep their ``.grad`` as it was
(``None`` stays ``None``), as in single-process training, and their error-feedback state is
put back as it was.

Non-finite gradients follow DDP and Horovod (``nonfinite="propagate"``, the default): a
bucket that holds a NaN/Inf on this rank is sent as zeros (the dense casts send it as it is)
and flagged in the same per-step allreduce; on every rank, each flagged bucket's reduced
gradient is NaN (the casts' sum is non-finite by itself), so ``GradScaler`` or the user's own
check skips the step everywhere, and every error-feedback state of the step (residuals, DGC's
momenta and velocities, scatter-gather's server residuals; of every bucket, since the whole
step is skipped) is left exactly as before it. ``nonfinite="raise"``
raises a CompressionError on every rank instead, naming the tensor (on the rank that had it)
or the bucket and the rank (elsewhere).

Gradients are reduced by the end of the backward pass that completes a step (a callback the
autograd engine runs when backward finishes, as DDP's), so ``p.grad`` holds the reduced
gradient when ``backward()`` returns: ``GradScaler.step(optimizer)``, clipping, or any check
then sees what every rank sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from gradzip.allreduce.backend import Backend, PeerLost, ReduceOp, Work, control
from gradzip.allreduce.consistency import check_consistent
from gradzip.allreduce.entry import Entry, Reduced
from gradzip.allreduce.fusion import plan_buckets
from gradzip.allreduce.select import strategy_for
from gradzip.allreduce.strategy import Strategy
from gradzip.compress import kernels
from gradzip.compress.base import CompressionError, Compressor, Reduction, derive_seed
from gradzip.compress.memory import NoMemory
from gradzip.compress.memory import all_finite as is_finite
from gradzip.compress.sfb import SFB, sfb_pays
from gradzip.hooks.momentum import MomentumCorrection
from gradzip.hooks.policy import DENSE, check_dense_steps
from gradzip.hooks.sfb import FactorCapture

__all__ = ["NONFINITE", "GradPipeline", "Slot", "Stream", "check_nonfinite", "is_finite"]

#: what a NaN/Inf gradient does: reach the reduced gradient of every rank, or raise
NONFINITE = ("propagate", "raise")


def check_nonfinite(nonfinite: object) -> str:
    """``nonfinite`` of the optimizer and the DDP hook: one of :data:`NONFINITE`."""
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite={nonfinite!r}; expected one of {NONFINITE}")
    return str(nonfinite)


def _unchecked(memory: Any) -> Any:
    """``memory`` without its own NaN/Inf check of every gradient: the pipeline has checked
    each bucket already (:meth:`GradPipeline._nonfinite`, one fp32 sum per tensor) and sends
    zeros for a bad gradient, so a second read of every gradient would find nothing."""
    if hasattr(memory, "check"):
        memory.check = False
    return memory


def passes_nonfinite(c: Compressor) -> bool:
    """Whether ``c``'s payloads carry a NaN/Inf to the sum as they are (the dense casts,
    without feedback); every other compressor is sent zeros and flagged instead."""
    return c.reduction is Reduction.SUM and not c.error_feedback


@dataclasses.dataclass
class Slot:
    """One parameter: its name, tensor, chosen compressor and SFB capture (if any)."""

    name: str
    param: torch.Tensor
    compressor: Compressor
    capture: FactorCapture | None = None
    memory: Any = None
    stream: int = -1
    bucket: int = -1
    passes: int = 0  # backward passes whose gradient reached it since the last synchronize
    checked: bool = False  # SFB factors verified against autograd's gradient once


@dataclasses.dataclass
class Stream:
    """All parameters sent with one compressor, and the strategy that reduces them."""

    base: Compressor
    compressor: Compressor
    strategy: Strategy


@dataclasses.dataclass
class _Launched:
    slots: list[int]
    entries: list[Entry]
    work: Work[list[Reduced]]
    strategy: Strategy  # what reduced it (settles its server-side state)
    dense: bool = False  # sent uncompressed during the first ``dense_steps``: no feedback
    passthrough: bool = False  # NaN/Inf travel as they are (dense casts): no NaN fill needed


class GradPipeline:
    """Buckets, launches and reduces the gradients of ``slots`` (see the module docstring)."""

    def __init__(
        self,
        backend: Backend,
        slots: list[Slot],
        *,
        average: bool,
        fusion_bytes: int,
        seed: int,
        passes_per_step: int,
        gather: str | None = None,
        sparse: str = "allgather",
        dense_steps: int | None = None,
        nonfinite: str = "propagate",
        momentum: MomentumCorrection | None = None,
    ) -> None:
        plan_buckets([], fusion_bytes)  # validates fusion_bytes
        self.dense_steps = check_dense_steps(dense_steps, [s.compressor for s in slots])
        self.nonfinite = check_nonfinite(nonfinite)
        self.backend = backend
        self.slots = slots
        self.fusion_bytes = fusion_bytes
        self.seed = seed
        self.passes_per_step = passes_per_step
        # what every rank must agree on, besides each parameter's name, size, dtype and
        # compressor: compared once, before the first bucket moves (see plan())
        self.settings = {
            "fusion_bytes": fusion_bytes,
            "backward_passes_per_step": passes_per_step,
            "dense_steps": self.dense_steps,
            "nonfinite": nonfinite,
            "op": "average" if average else "sum",
            "gather": gather,
            "sparse": sparse,
            "momentum_correction": momentum is not None,
        }
        self.momentum = momentum  # SGD's momentum, applied before compression (or None)
        self.step = 0  # synchronizations done (part of every stochastic compressor's seed)
        self.epoch: float | None = None
        self.streams: list[Stream] = []
        for base in dict.fromkeys([s.compressor for s in slots] + [DENSE]):
            # no per-bucket check: the plan's fingerprint (plan()) covers every bucket at once
            strategy = strategy_for(
                base,
                gather=gather,
                sparse=sparse,
                average=average,
                verify=False,
                world_size=backend.size,
            )
            strategy.deferred = True  # settled per step, once every rank's flags are known
            strategy.reuse_buffers = True  # _write copies every result into .grad
            self.streams.append(Stream(base, base, strategy))
        # the DENSE stream also carries every bucket during the first dense_steps
        self.dense_stream = next(k for k, st in enumerate(self.streams) if st.base == DENSE)
        self.warmup = NoMemory(check=False)  # the dense steps' memory (no error feedback)
        for s in slots:
            s.memory = _unchecked(s.compressor.make_memory())
        self.buckets: list[list[int]] | None = None  # fixed at the first launch
        self.pending: list[int] = []
        self.launched: list[_Launched] = []
        self.dirty = False  # a gradient arrived since the last synchronize
        self.bad: dict[int, str] = {}  # bucket -> its first NaN/Inf tensor on this rank
        self.snapshots: dict[int, Any] = {}  # slot -> memory kept aside by a fused step
        self.backwards = 0  # backward passes finished since the last synchronize
        self._queued = False  # the end-of-backward callback is queued
        self._schedule()

    # ------------------------------------------------------------------ the plan
    def _sfb_decisions(self) -> dict[int, bool]:
        """Per SFB slot: do factors pay? From the rows of the first forward (all calls of the
        layer), the most over ranks (one allreduce)."""
        idx = [i for i, s in enumerate(self.slots) if s.capture is not None]
        if not idx:
            return {}
        rows = control(self.backend, [self.slots[i].capture.rows for i in idx], torch.int64)  # type: ignore[union-attr]
        rows = self.backend.allreduce(rows, ReduceOp.MAX).wait()
        out = {}
        for i, b in zip(idx, rows.tolist(), strict=True):
            layer = self.slots[i].capture.layer  # type: ignore[union-attr]
            batch = int(b) * self.passes_per_step  # factors of all passes travel together
            out[i] = sfb_pays(batch, layer.in_features, layer.out_features, self.backend.size)
        return out

    def plan(self) -> list[list[int]]:
        """Fix the buckets (once): lists of slot indices, in launch order."""
        if self.buckets is not None:
            return self.buckets
        for i, pays in self._sfb_decisions().items():
            if not pays:  # factors would cost more than the dense gradient
                slot = self.slots[i]
                assert slot.capture is not None
                slot.capture.remove()
                slot.capture, slot.compressor = None, DENSE
                slot.memory = _unchecked(DENSE.make_memory())
        index = {s.base: k for k, s in enumerate(self.streams)}
        order = list(range(len(self.slots)))[::-1]  # reverse registration order
        position = {i: p for p, i in enumerate(order)}
        placed: list[tuple[int, int, list[int]]] = []
        for k in range(len(self.streams)):
            members = [i for i in order if index[self.slots[i].compressor] == k]
            sizes = [
                self.slots[i].param.numel() * self.slots[i].param.element_size() for i in members
            ]
            for cut in plan_buckets(sizes, self.fusion_bytes):
                group = [members[j] for j in cut]
                placed.append((position[group[-1]], k, group))
        placed.sort(key=lambda t: (t[0], t[1]))
        self.buckets = [group for _, _, group in placed]
        for b, (_, k, group) in enumerate(placed):
            for i in group:
                self.slots[i].stream, self.slots[i].bucket = k, b
        self.pending = [len(b) for b in self.buckets]
        self._check_ranks_agree()
        return self.buckets

    def _check_ranks_agree(self) -> None:
        """One fingerprint of the whole plan, compared across ranks before anything moves: a
        rank with another compressor, parameter set, dtype, fusion size, backward passes per
        step, dense steps or strategy fails on every rank here, with both values, instead of
        hanging in (or mixing up) a later collective."""
        items = [
            (s.name, s.param.numel(), f"{s.param.dtype} {s.compressor.spec()}")
            for s in self.slots
        ]
        config = " ".join(f"{k}={v}" for k, v in self.settings.items())
        with self._naming("comparing the optimizer's plan across ranks"):
            check_consistent(self.backend, items, f"DistributedOptimizer {config}")

    def _schedule(self) -> None:
        """Compressors with a warm-up counted in steps (DGC's, while the loop never called
        ``set_epoch``) take this step's setting."""
        if self.epoch is not None:
            return
        for st in self.streams:
            at_step = getattr(st.base, "at_step", None)
            if at_step is not None:
                st.compressor = at_step(self.step)

    def _reset(self) -> None:
        self._schedule()
        assert self.buckets is not None
        self.pending = [len(b) for b in self.buckets]
        self.launched = []
        for s in self.slots:
            s.passes = 0
            if s.capture is not None:
                s.capture.clear()
        self.dirty = False
        self.bad = {}
        self.snapshots = {}
        self.backwards = 0

    # ------------------------------------------------------------------ during backward
    def on_grad(self, i: int) -> None:
        """Post-accumulate-grad hook of slot ``i``: launch the buckets that became ready."""
        slot = self.slots[i]
        buckets = self.plan()
        slot.passes += 1
        self.dirty = True
        if not self._queued:  # reduce what is left when this backward pass ends
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        if slot.passes > self.passes_per_step:
            raise RuntimeError(
                f"the gradient of {slot.name!r} was computed {slot.passes} times before "
                f"step()/synchronize(), but backward_passes_per_step={self.passes_per_step}; "
                "increase backward_passes_per_step to accumulate more passes locally"
            )
        if slot.passes == self.passes_per_step:
            self.pending[slot.bucket] -= 1
            while len(self.launched) < len(buckets) and self.pending[len(self.launched)] == 0:
                self._launch(len(self.launched))

    def _backward_done(self) -> None:
        """End of a backward pass: the step's gradients are complete after the
        ``passes_per_step``-th, so reduce them now (``synchronize`` is then a no-op)."""
        self._queued = False
        self.backwards += 1
        if self.backwards >= self.passes_per_step and self.dirty:
            self.synchronize()

    @property
    def dense(self) -> bool:
        """Whether this step sends every gradient uncompressed (the first ``dense_steps``)."""
        return self.step < self.dense_steps

    def _nonfinite(self, group: list[int]) -> set[int]:
        """The slots of a bucket whose gradient holds a NaN/Inf, with one host sync for the
        bucket: the fp32 sums of its gradients (see :func:`is_finite`), tensor by tensor only
        when one of them is not finite. Flags the bucket (``self.bad``)."""
        have: list[tuple[int, torch.Tensor]] = []
        for i in group:
            g = self.slots[i].param.grad
            if self.slots[i].passes > 0 and g is not None and g.numel():
                have.append((i, g))
        if not have:
            return set()
        sums = torch.stack([g.sum(dtype=torch.float32) for _, g in have])
        if bool(torch.isfinite(sums).all()):
            return set()
        found = {i for i, g in have if not is_finite(g)}
        if found:
            first = self.slots[min(found, key=group.index)]
            self.bad.setdefault(first.bucket, first.name)
        return found

    def _grad(self, i: int, bad: bool, passthrough: bool) -> torch.Tensor:
        """Slot ``i``'s gradient as this step sends it: zeros where it has none, and zeros
        where it holds a NaN/Inf (``bad``), unless ``passthrough``."""
        s = self.slots[i]
        g = s.param.grad if s.passes > 0 else None
        if g is None or (bad and not passthrough):
            g = torch.zeros_like(s.param)
        if self.momentum is not None:
            return self.momentum.apply(i, g)
        return g

    def _entry(self, i: int, bad: bool) -> Entry:
        """Slot ``i``'s entry: factors, or the compensated gradient, or a fused payload."""
        s = self.slots[i]
        stream = self.streams[s.stream]
        if self.dense:  # warm-up: the plain gradient; error feedback starts afterwards
            grad = self._grad(i, bad, True)
            if s.compressor.carries_momentum:  # DGC: its momentum, all of it sent
                return Entry(s.name, s.memory.compensate(s.name, grad))
            return Entry(s.name, self.warmup.compensate(s.name, grad))
        if s.capture is not None:
            assert isinstance(s.compressor, SFB)
            if s.passes == 0:
                payload, ctx = s.capture.empty(s.compressor)
                return Entry(s.name, payload=payload, ctx=ctx)
            payload, ctx = s.capture.payload(s.compressor)
            if not bad and not s.checked and s.param.grad is not None:
                s.capture.check(s.compressor, payload, ctx, s.param.grad)
                s.checked = True
            return Entry(s.name, payload=payload, ctx=ctx)
        grad = self._grad(i, bad, passes_nonfinite(stream.compressor))
        if stream.strategy.takes_payloads:
            # 1-bit SGD (and DGC's kernel on CUDA) fuse compensate, compress and the residual
            # update into one sweep; the strategy then gets the payload, not the tensor. The
            # memory before it is kept aside until every rank's step is known to count.
            seed = derive_seed(self.seed, self.step, s.name, self.backend.rank)
            if kernels.has_feedback_step(stream.compressor, grad):
                fresh = kernels.fresh_feedback(stream.compressor, grad)  # no copy needed
                snap = s.memory.snapshot(s.name, copy=not fresh)
                self.snapshots[i] = snap
                try:
                    fused = kernels.feedback_step(
                        stream.compressor, s.memory, s.name, grad, seed=seed, fresh=fresh
                    )
                except BaseException:
                    s.memory.restore(s.name, self.snapshots.pop(i))
                    raise
                assert fused is not None  # has_feedback_step said there is one
                return Entry(s.name, payload=fused[0], ctx=fused[1])
        if passes_nonfinite(stream.compressor):
            return Entry(s.name, grad.to(torch.float32))
        return Entry(s.name, s.memory.compensate(s.name, grad))

    def _bucket(self, b: int) -> str:
        """Bucket ``b`` in words, for messages."""
        assert self.buckets is not None
        names = [self.slots[i].name for i in self.buckets[b]]
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} tensors)" if len(names) > 4 else "")
        return f"bucket {b} of {len(self.buckets)} [{shown}] at step {self.step}"

    @contextlib.contextmanager
    def _naming(self, what: str) -> Iterator[None]:
        """A peer lost in ``what`` raises a PeerLost that says where (collective, bucket)."""
        try:
            yield
        except (PeerLost, TimeoutError) as e:
            raise PeerLost(f"{what}: {e}") from e

    def _launch(self, b: int) -> None:
        assert self.buckets is not None
        group = self.buckets[b]
        dense = self.dense
        stream = self.streams[self.dense_stream if dense else self.slots[group[0]].stream]
        bad = self._nonfinite(group)
        entries = [self._entry(i, i in bad) for i in group]
        with self._naming(f"sending {self._bucket(b)} ({stream.strategy.name})"):
            work = stream.strategy.start(
                self.backend, stream.compressor, entries, seed=self.seed, step=self.step
            )
        passthrough = dense or passes_nonfinite(stream.compressor)
        self.launched.append(_Launched(group, entries, work, stream.strategy, dense, passthrough))

    # ------------------------------------------------------------------ synchronize
    def synchronize(self) -> None:
        """Launch what is left, reduce, write the results into ``.grad``."""
        buckets = self.plan()
        for s in self.slots:
            if s.param.grad is not None and s.param.grad.is_sparse:
                raise CompressionError(f"parameter {s.name!r} has a sparse gradient; unsupported")
        while len(self.launched) < len(buckets):
            self._launch(len(self.launched))
        if not self.slots:  # every parameter frozen: nothing to agree on
            self.step += 1
            return
        n = len(self.slots)
        me = self.backend.rank + 1
        flags = [int(s.passes > 0) for s in self.slots]
        flags += [me if b in self.bad else 0 for b in range(len(buckets))]
        with self._naming(f"the flags of step {self.step} (which parameters, which NaN/Inf)"):
            flag_tensor = control(self.backend, flags, torch.int32)
            got = self.backend.allreduce(flag_tensor, ReduceOp.MAX).wait().tolist()
        used, bad = got[:n], got[n:]
        results = []
        for b, done in enumerate(self.launched):
            with self._naming(f"receiving {self._bucket(b)} ({done.strategy.name})"):
                results.append(done.work.wait())
        if self.nonfinite == "raise" and any(bad):
            for done in self.launched:
                for i in done.slots:
                    self._call_off(i, done)
            self.step += 1
            self._reset()
            raise CompressionError(self._nonfinite_message(bad))
        skipped = any(bad)  # every rank skips this step: no error-feedback state may move
        for b, (done, reduced) in enumerate(zip(self.launched, results, strict=True)):
            for i, entry, red in zip(done.slots, done.entries, reduced, strict=True):
                if not used[i]:
                    self._call_off(i, done)
                elif skipped:  # the reduced gradient is written, no feedback is kept
                    self._call_off(i, done)
                    if bad[b] and not done.passthrough:
                        red = Reduced(torch.full_like(red.reduced, float("nan")), None)
                    self._write(i, entry, red, feedback=False)
                else:
                    self._write(i, entry, red, feedback=not done.dense)
                    s = self.slots[i]
                    if done.dense and s.compressor.carries_momentum and entry.tensor is not None:
                        s.memory.update(s.name, entry.tensor, entry.tensor)  # all of it sent
                    done.strategy.settle(entry.key, keep=True)
                    if self.momentum is not None:
                        self.momentum.commit(i)
                    if i in self.snapshots:  # the fused step counted
                        s = self.slots[i]
                        s.memory.release(s.name, self.snapshots.pop(i))
        self.step += 1
        self._reset()

    def _call_off(self, i: int, done: _Launched) -> None:
        """Leave slot ``i``'s error-feedback state (and its strategy's) as before this step."""
        s = self.slots[i]
        done.strategy.settle(s.name, keep=False)
        if self.momentum is not None:
            self.momentum.discard(i)
        if i in self.snapshots:
            s.memory.restore(s.name, self.snapshots.pop(i))
        else:
            s.memory.discard(s.name)

    def _nonfinite_message(self, bad: list[int]) -> str:
        assert self.buckets is not None
        parts = []
        for b, who in enumerate(bad):
            if not who:
                continue
            if b in self.bad:
                parts.append(f"gradient {self.bad[b]!r} holds NaN or Inf values on this rank")
            else:
                names = [self.slots[i].name for i in self.buckets[b]]
                parts.append(f"the bucket of {names} holds NaN or Inf values on rank {who - 1}")
        return (
            "; ".join(parts)
            + " (nonfinite='raise'); nothing was applied and every error-feedback state is as "
            "it was before this step. The default nonfinite='propagate' hands a NaN gradient to "
            "every rank instead, so GradScaler skips the step"
        )

    def _write(self, i: int, entry: Entry, red: Reduced, feedback: bool = True) -> None:
        s = self.slots[i]
        if feedback and entry.tensor is not None and red.local is not None:
            s.memory.update(s.name, entry.tensor, red.local)
        value = red.reduced.reshape(s.param.shape)
        if s.param.grad is None:
            s.param.grad = value.to(s.param.dtype, copy=True)
        else:
            s.param.grad.copy_(value)

    # ------------------------------------------------------------------ epochs, checkpoints
    def set_epoch(self, epoch: float) -> None:
        """Tell compressors with a schedule (DGC's warm-up, ``at_epoch``) the training epoch."""
        self.epoch = float(epoch)
        for st in self.streams:
            at_epoch = getattr(st.base, "at_epoch", None)
            if at_epoch is not None:
                st.compressor = at_epoch(self.epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rank": self.backend.rank,
            "world_size": self.backend.size,
            "step": self.step,
            "epoch": self.epoch,
            "memories": {s.name: s.memory.state_dict() for s in self.slots},
            "momentum": None if self.momentum is None else self.momentum.state_dict(),
            "strategies": [
                {"spec": st.base.spec(), "state": st.strategy.state_dict()} for st in self.streams
            ],
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise a ValueError, naming what differs, unless ``state`` fits this optimizer."""
        specs = [st.base.spec() for st in self.streams]
        saved = [x["spec"] for x in state["strategies"]]
        if saved != specs:
            raise ValueError(
                f"the checkpoint was written with compressors {saved}, this optimizer uses "
                f"{specs}; build the optimizer with the same compression= argument"
            )
        if "momentum" in state and (state["momentum"] is None) != (self.momentum is None):
            on = "applies" if self.momentum is not None else "does not apply"
            raise ValueError(
                "the checkpoint was written with momentum_correction "
                f"{'off' if state['momentum'] is None else 'on'}, this optimizer {on} it; build "
                "the optimizer with the same momentum_correction= (the SGD velocities live in "
                "the 'gradzip' entry when it is on)"
            )
        names = {s.name for s in self.slots}
        if set(state["memories"]) != names:
            diff = sorted(set(state["memories"]) ^ names)
            raise ValueError(f"the checkpoint's parameters differ from this optimizer's: {diff}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        for s in self.slots:
            s.memory.load_state_dict(state["memories"][s.name])
        for st, x in zip(self.streams, state["strategies"], strict=True):
            st.strategy.load_state_dict(x["state"])
        if self.momentum is not None and state.get("momentum") is not None:
            self.momentum.load_state_dict(state["momentum"])
        self.step = int(state["step"])
        if state["epoch"] is not None:
            self.set_epoch(state["epoch"])
        self._schedule()
