"""Deep Gradient Compression (Lin et al. 2018, https://arxiv.org/abs/1712.01887).

DGC sends the largest 0.1% of an accumulated *velocity* and keeps the rest locally, with
the four techniques of the paper:

- **momentum correction** (sec. 3.2): the momentum is accumulated before sparsification,
  ``u = m*u + g; v = v + u``, and ``v`` is what gets sparsified. :class:`DGCMemory` keeps
  ``u`` and ``v``, so the wrapped optimizer must run *without* momentum
  (:func:`check_optimizer` says so when it does not).
- **local gradient clipping** (sec. 3.2): each gradient is clipped before it is added to
  ``u``, with the threshold ``clip_norm * world_size**-0.5``: the paper scales the global
  threshold by ``N^(-1/2)`` because the sum of N independent local gradients has a norm about
  ``sqrt(N)`` times larger. The memory sees one tensor at a time, so the norm is per tensor
  (per key), not over the whole model.
- **momentum factor masking** (sec. 3.3), ``masking=True``: where an entry was sent, ``u`` is
  zeroed as well as ``v`` (:meth:`DGCMemory.update`), so stale momentum does not push it
  again. It is off by default. It assumes an entry is sent rarely; an entry sent every step
  (the ``min_values`` of a small tensor, the 25-75% densities of the warm-up) then has
  ``u = g`` each step and moves with plain SGD, 1/(1-m) = 10x less than the momentum SGD it
  replaces. Measured with ``benchmarks/accuracy.py`` (4 workers, 3 seeds, 0.1%), masking on
  against off: the ``--full`` CNN -0.35 -> -0.05 pp, the ``--full`` MLP -0.52 -> -0.42 pp,
  the Shakespeare LSTM +0.25 -> +0.14 bits/char (``benchmarks/results/dgc_masking.md``).
  Without it, ``v`` is still zeroed where sent (the error feedback), and ``u`` is the plain
  momentum, as under the optimizer's momentum correction for top-k.
- **warm-up** (sec. 3.4): the sparsity rises exponentially over the first epochs, by default
  75% -> 93.75% -> 98.4% -> 99.6% -> 99.9% (:meth:`DGC.density`). The compressor is a
  frozen value; the training loop (or the optimizer wrapper) calls ``dgc.at_epoch(e)`` at the
  start of each epoch and compresses with the returned one. A loop that never calls
  ``set_epoch`` (most user scripts) still gets the warm-up: its epochs are spread over the
  first ``warmup_steps = 150`` steps (:meth:`DGC.at_step`). Measured in a one-process simulation of
  the CNN run of ``benchmarks/accuracy.py --full`` (``benchmarks/results/defaults_sim.md``,
  one seed): with this warm-up and tensors under 1024 elements sent dense (the optimizer's
  default), 0.5 pp under dense.

Every tensor sends at least ``min_values`` (256) values, all of a smaller one: at 0.1% the
layers of a small model would send a handful a step (see the field's comment).

The threshold comes from a sample of the elements, as in the paper: see
:func:`gradzip.compress.topk.sparsify_sampled` (at most k entries, the largest ones).

On the CPU, :meth:`DGC.compress_with_feedback` (the optimizer's fused step) runs the numba
kernels of :mod:`gradzip.compress._sparse_numba` unless ``GRADZIP_NUMBA=0``: clipping's norm
(when ``clip_norm`` is set) is one read of the gradient, then one pass computes ``u`` and
``v`` and collects the candidates of the sampled threshold, and the masking touches only the
sent entries. ``u``, ``v`` and the set sent equal the unfused steps' for the same seed, bit
for bit (the sampled threshold trims with the reference's own ``torch.topk``; with
``selection="exact"`` equal magnitudes at the cut go to the lowest indices, where torch.topk
keeps any); the indices come in ascending order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from gradzip.compress.base import (
    CompressionError,
    Compressor,
    Payload,
    Reduction,
    check_dtype,
    check_parts,
    register,
)
from gradzip.compress.memory import Key, Memory, check_finite
from gradzip.compress.topk import (
    SELECTIONS,
    SparseCtx,
    check_ratio,
    desparsify,
    feedback_failed,
    sample_picks,
    select,
    sparse_kernels,
    topk_count,
    unfused_step,
)

__all__ = ["DGC", "DGCMemory", "check_optimizer", "clip_scale", "warmup_density"]


def _check_momentum(momentum: float) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise ValueError(f"dgc: momentum={momentum!r}; expected a number, 0 <= momentum < 1")
    if not 0 <= momentum < 1:
        raise ValueError(
            f"dgc: momentum={momentum!r} is not allowed; expected 0 <= momentum < 1 (e.g. 0.9)"
        )


def warmup_density(epoch: float, ratio: float, warmup_epochs: int, warmup_ratio: float) -> float:
    """The fraction of elements sent in ``epoch`` (0-based) under DGC's exponential warm-up.

    During epoch ``e < warmup_epochs`` it is ``max(ratio, warmup_ratio ** (e + 1))``, after
    that ``ratio``: with the defaults (0.25, 4 epochs, 0.001) the sparsity goes 75%, 93.75%,
    98.4%, 99.6%, then 99.9%. The epoch is rounded down: it changes once per epoch.
    """
    e = math.floor(epoch)
    if e >= warmup_epochs:
        return ratio
    return max(ratio, warmup_ratio ** (e + 1))


def clip_scale(limit: float | None, grad: torch.Tensor) -> float | None:
    """The factor :meth:`DGCMemory.compensate` multiplies the fp32 gradient by, rounded to
    fp32 as torch's ``mul_`` by a Python float does; None when it does not clip."""
    if limit is None:
        return None
    norm = float(torch.linalg.vector_norm(grad.to(torch.float32)))
    return float(np.float32(limit / norm)) if norm > limit else None


class DGCMemory:
    """DGC's local state per key: momentum ``u`` and velocity ``v`` (fp32).

    ``compensate(key, g)`` clips ``g`` and returns the new velocity ``v + (m*u + g)``;
    ``update(key, v, decompressed)`` stores it: ``v`` becomes 0 wherever ``decompressed`` is
    non-zero (what was sent), so afterwards ``v == compensated - decompressed`` exactly for an
    fp32 payload, and with ``masking`` (the paper's momentum factor masking) so does ``u``.
    Nothing is stored until ``update``: a NaN/Inf gradient raises in ``compensate`` and leaves
    ``u`` and ``v`` as they were.
    """

    def __init__(
        self,
        momentum: float = 0.9,
        clip_norm: float | None = None,
        check: bool = True,
        masking: bool = False,
    ) -> None:
        _check_momentum(momentum)
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"DGCMemory: clip_norm={clip_norm!r}; expected None or > 0")
        if not isinstance(masking, bool):
            raise ValueError(f"DGCMemory: masking={masking!r}; expected True or False")
        self.momentum = float(momentum)
        self.clip_norm = clip_norm
        self.masking = masking  # zero u, not only v, where an entry was sent
        self.check = check
        self.momenta: dict[Key, torch.Tensor] = {}
        self.velocities: dict[Key, torch.Tensor] = {}
        self._pending: dict[Key, torch.Tensor] = {}  # new u, between compensate and update
        self.spare: dict[Key, list[torch.Tensor]] = {}  # buffers for fresh fused steps

    def _state(self, key: Key, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = self.momenta.get(key), self.velocities.get(key)
        if u is None or v is None:
            zeros = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
            return zeros, zeros
        if u.shape != grad.shape:
            raise CompressionError(
                f"gradient {key!r} has shape {tuple(grad.shape)} but its DGC state has shape "
                f"{tuple(u.shape)}; a key must always name a tensor of one shape"
            )
        return u, v

    def compensate(self, key: Key, grad: torch.Tensor) -> torch.Tensor:
        """Clip ``grad``, accumulate momentum and velocity; return the new velocity (fp32)."""
        if self.check:
            check_finite(key, grad)
        u, v = self._state(key, grad)
        g = grad.to(torch.float32, copy=True)
        if self.clip_norm is not None:
            norm = float(torch.linalg.vector_norm(g))
            if norm > self.clip_norm:
                g.mul_(self.clip_norm / norm)
        u_new = torch.add(g, u, alpha=self.momentum)
        self._pending[key] = u_new
        return torch.add(v, u_new)

    def update(self, key: Key, compensated: torch.Tensor, decompressed: torch.Tensor) -> None:
        """Store ``u`` and ``v`` zeroed where ``decompressed`` is non-zero (``compensated`` is
        consumed)."""
        u_new = self._pending.pop(key, None)
        if u_new is None:
            raise CompressionError(
                f"DGCMemory.update({key!r}) without a compensate({key!r}) before it"
            )
        sent = decompressed.reshape(compensated.shape) != 0
        self.momenta[key] = u_new.masked_fill_(sent, 0.0) if self.masking else u_new
        self.velocities[key] = compensated.to(torch.float32).masked_fill_(sent, 0.0)

    def discard(self, key: Key) -> None:
        """Call off a step after ``compensate``: ``u`` and ``v`` stay as they were."""
        self._pending.pop(key, None)

    def snapshot(self, key: Key, copy: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keep ``u`` and ``v`` of ``key`` aside before a fused step updates them (in place on
        copies, with ``copy``)."""
        u, v = self.momenta.get(key), self.velocities.get(key)
        if u is None or v is None:
            return None
        if copy:
            self.momenta[key], self.velocities[key] = u.clone(), v.clone()
        return u, v

    def _keep_spare(self, key: Key, old: tuple[torch.Tensor | None, ...]) -> None:
        """Keep the CPU tensors of ``old`` that are not ``key``'s state now as its spares
        (only the CPU's fresh step uses them; elsewhere they are freed)."""
        current = (self.momenta.get(key), self.velocities.get(key))
        bufs = self.spare.setdefault(key, [])
        for t in old:
            if t is None or t.device.type != "cpu" or any(t is c for c in current):
                continue
            if len(bufs) < 2:
                bufs.append(t)

    def spare_like(self, key: Key, like: torch.Tensor) -> torch.Tensor:
        """An fp32 buffer of ``like``'s shape for ``key``'s next ``u`` or ``v``, never a
        current one: one released by the last fused step when it fits (no new allocation,
        no page faults), else a new one. Two calls give two buffers."""
        state = (self.momenta.get(key), self.velocities.get(key))
        current = {t.data_ptr() for t in state if t is not None}
        want = (like.numel(), torch.float32, like.device)
        bufs = self.spare.get(key, [])
        while bufs:
            buf = bufs.pop()
            fits = (buf.numel(), buf.dtype, buf.device) == want
            if fits and buf.data_ptr() not in current and buf.data_ptr() != like.data_ptr():
                return buf.view(like.shape)
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)

    def release(self, key: Key, snap: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """The fused step since :meth:`snapshot` counted: the old ``u`` and ``v`` (where the
        step wrote new ones) become the next step's buffers (:meth:`spare_like`)."""
        if snap is not None:
            self._keep_spare(key, snap)

    def restore(self, key: Key, snap: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Undo the fused step since :meth:`snapshot` returned ``snap`` (what it wrote becomes
        spare)."""
        self._pending.pop(key, None)
        written = (self.momenta.pop(key, None), self.velocities.pop(key, None))
        if snap is not None:
            self.momenta[key], self.velocities[key] = snap
        self._keep_spare(key, written)

    def state_dict(self) -> dict[str, Any]:
        return {
            "momentum": self.momentum,
            "clip_norm": self.clip_norm,
            "momenta": {k: t.clone() for k, t in self.momenta.items()},
            "velocities": {k: t.clone() for k, t in self.velocities.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if float(state["momentum"]) != self.momentum or state["clip_norm"] != self.clip_norm:
            raise ValueError(
                f"DGC state was saved with momentum={state['momentum']}, clip_norm="
                f"{state['clip_norm']}; this memory has momentum={self.momentum}, "
                f"clip_norm={self.clip_norm}"
            )
        self.momenta = {k: t.clone().to(torch.float32) for k, t in state["momenta"].items()}
        self.velocities = {k: t.clone().to(torch.float32) for k, t in state["velocities"].items()}
        self._pending = {}
        self.spare = {}


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise a ValueError when a param group of ``optimizer`` uses momentum.

    DGC applies momentum itself (momentum correction); a second momentum in the optimizer
    would apply it twice.
    """
    for i, group in enumerate(optimizer.param_groups):
        momentum = group.get("momentum", 0)
        if momentum:
            raise ValueError(
                f"DGC applies momentum itself (momentum correction), but param group {i} of "
                f"{type(optimizer).__name__} has momentum={momentum}; build the optimizer with "
                "momentum=0 (and nesterov=False) and pass the momentum to the DGC compressor"
            )


@register("dgc")
@dataclasses.dataclass(frozen=True)
class DGC(Compressor):
    """Deep Gradient Compression (Lin et al. 2018, https://arxiv.org/abs/1712.01887).

    Sparsifies the velocity returned by :class:`DGCMemory` (from :meth:`make_memory`);
    payload ``(int32 indices, fp32 values)`` as top-k. See the module docstring for the four
    techniques and where each lives.
    """

    reduction: ClassVar[Reduction] = Reduction.SPARSE
    error_feedback = True  # the velocity keeps what was not sent
    carries_momentum: ClassVar[bool] = True  # dense steps (dense_steps=N) keep the momentum

    # what the user tunes
    #: fraction of the elements sent after warm-up (0.001 = 99.9% sparsity)
    ratio: float = 0.001
    #: momentum of the momentum correction, 0 <= momentum < 1 (the optimizer's must be 0)
    momentum: float = 0.9
    #: momentum factor masking (sec. 3.3): zero ``u`` too where an entry was sent. Off by
    #: default: an entry sent every step (small tensors under ``min_values``, the warm-up's
    #: high densities) then steps with ``g`` alone, 1/(1-m) = 10x less than momentum SGD; see
    #: the module docstring for what it measured
    masking: bool = False
    #: global gradient-clipping threshold (None: no clipping); local = clip_norm / sqrt(N)
    clip_norm: float | None = None
    #: N, the number of ranks, for the N^(-1/2) scaling of clip_norm
    world_size: int = 1
    # warm-up
    #: epochs of warm-up (0: none); the density in epoch e is warmup_ratio ** (e + 1)
    warmup_epochs: int = 4
    #: density of the first epoch (0.25 = 75% sparsity)
    warmup_ratio: float = 0.25
    #: the current epoch (from ``at_epoch``); None: warm-up over, send ``ratio``
    epoch: float | None = None
    #: when the loop never calls ``set_epoch``, the warm-up's epochs are spread over the
    #: first ``warmup_steps`` steps (0: no warm-up then)
    warmup_steps: int = 150
    #: every tensor sends at least this many values (all of a smaller one): at 0.1% a layer
    #: of 1280 weights would send 2 a step, the 65,536 recurrent weights of the benchmark's
    #: character LSTM 65. 256 values cost 2 KB a tensor (0.16 ms at 100 Mbit/s) and leave
    #: every tensor of 256k elements or more at the paper's 0.1%. Measured with
    #: ``benchmarks/accuracy.py --task shakespeare --full`` (3000 steps, 4 workers, 3 seeds,
    #: ``results/dgc_min_values.md``): 32 values +0.069 bits/char behind dense at 66x, 256
    #: values +0.033 at 30x. The floor costs ratio on small models only: with it the
    #: 1.9M-parameter MLP ends -0.31 pp from dense at 353x (474x with 32), the small CNN
    #: +0.24 pp at 55x (148x)
    min_values: int = 256
    # threshold selection
    #: "sampled" (the paper's threshold from a sample) or "exact" (torch.topk)
    selection: Literal["exact", "sampled"] = "sampled"
    #: fraction of the elements sampled to estimate the threshold
    sample_ratio: float = 0.01

    def __post_init__(self) -> None:
        check_ratio(self.ratio, owner="dgc")
        check_ratio(self.warmup_ratio, "warmup_ratio", owner="dgc")
        check_ratio(self.sample_ratio, "sample_ratio", owner="dgc")
        _check_momentum(self.momentum)
        if not isinstance(self.masking, bool):
            raise ValueError(f"dgc: masking={self.masking!r}; expected True or False")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"dgc: clip_norm={self.clip_norm!r}; expected None or a number > 0")
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int):
            raise ValueError(f"dgc: world_size={self.world_size!r}; expected an int >= 1")
        if self.world_size < 1:
            raise ValueError(f"dgc: world_size={self.world_size!r}; expected an int >= 1")
        if not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ValueError(f"dgc: warmup_epochs={self.warmup_epochs!r}; expected an int >= 0")
        if (
            isinstance(self.min_values, bool)
            or not isinstance(self.min_values, int)
            or self.min_values < 0
        ):
            raise ValueError(f"dgc: min_values={self.min_values!r}; expected an int >= 0")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
            raise ValueError(f"dgc: warmup_steps={self.warmup_steps!r}; expected an int >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"dgc: warmup_steps={self.warmup_steps!r}; expected an int >= 0")
        if self.epoch is not None and not self.epoch >= 0:
            raise ValueError(f"dgc: epoch={self.epoch!r}; expected None or a number >= 0")
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"dgc: selection={self.selection!r} is not allowed; expected one of {SELECTIONS}"
            )

    @property
    def local_clip_norm(self) -> float | None:
        """The clipping threshold each rank applies: ``clip_norm * world_size ** -0.5``."""
        return None if self.clip_norm is None else self.clip_norm / math.sqrt(self.world_size)

    def density(self, epoch: float | None = None) -> float:
        """Fraction sent in ``epoch`` (default: this compressor's epoch); see warmup_density."""
        epoch = self.epoch if epoch is None else epoch
        if epoch is None:
            return self.ratio
        return warmup_density(epoch, self.ratio, self.warmup_epochs, self.warmup_ratio)

    def count(self, n: int) -> int:
        """How many of ``n`` values this compressor sends now: ``ceil(density * n)``, but at
        least ``min(n, min_values)``."""
        return max(topk_count(self.density(), n), min(n, self.min_values))

    def at_epoch(self, epoch: float) -> DGC:
        """This compressor in training epoch ``epoch`` (0-based): applies the warm-up."""
        return dataclasses.replace(self, epoch=float(epoch))

    def at_step(self, step: int) -> DGC:
        """This compressor at optimizer step ``step`` (0-based) of a loop that never calls
        ``set_epoch``: the warm-up's ``warmup_epochs`` epochs span the first ``warmup_steps``
        steps, then ``ratio`` is sent."""
        if step >= self.warmup_steps or not self.warmup_epochs:
            return dataclasses.replace(self, epoch=None)
        return dataclasses.replace(self, epoch=step * self.warmup_epochs / self.warmup_steps)

    def make_memory(self) -> DGCMemory:
        return DGCMemory(
            momentum=self.momentum, clip_norm=self.local_clip_norm, masking=self.masking
        )

    def compress(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> tuple[Payload, SparseCtx]:
        """Sparsify ``tensor`` (the velocity from ``DGCMemory.compensate``)."""
        k = self.count(tensor.numel())
        return select(tensor, self.density(), self.selection, self.sample_ratio, seed, k=k)

    def decompress(self, payload: Payload, ctx: SparseCtx) -> torch.Tensor:
        check_parts(payload, "dgc", [torch.int32, torch.float32])
        return desparsify(payload[0], payload[1], ctx.numel).to(ctx.dtype).view(ctx.shape)

    def fresh_feedback(self, grad: torch.Tensor) -> bool:
        """Whether :meth:`compress_with_feedback` leaves the old ``u`` and ``v`` tensors as
        they were at no extra traffic (``fresh=True``): always here. The numba step writes into
        buffers of their own; the unfused steps store new tensors anyway. (The GPU kernel's
        fused step works in place: :func:`kernels.fresh_feedback` says so before asking.)"""
        return True

    def compress_with_feedback(
        self, memory: Memory, key: Key, grad: torch.Tensor, *, seed: int = 0, fresh: bool = False
    ) -> tuple[Payload, SparseCtx]:
        """``DGCMemory.compensate`` + :meth:`compress` + ``DGCMemory.update`` in one pass.

        ``u`` and ``v`` end as after the unfused steps, bit for bit (the momentum is one fma,
        as torch's ``add(g, u, alpha=m)``); the payload selects the same set (see the module
        docstring for ties under ``selection="exact"``), with an fp32 ctx. A NaN/Inf
        gradient raises a CompressionError naming ``key`` and leaves ``u`` and ``v`` as they
        were. ``fresh``:
        the new ``u`` and ``v`` go into other buffers (``memory.spare_like``) and the old
        tensors are left untouched. Elsewhere (CUDA, numba off) the unfused steps run.
        """
        kern = sparse_kernels() if grad.device.type == "cpu" else None
        if kern is None or not isinstance(memory, DGCMemory) or not grad.numel():
            return unfused_step(self, memory, key, grad, seed)
        check_dtype(grad, f"gradient {key!r}")
        flat = grad.detach().reshape(-1).to(torch.float32).contiguous()
        has = key in memory.momenta and key in memory.velocities
        u, v = memory._state(key, grad)  # zeros on the first step; raises on a shape mismatch
        if memory.check and not fresh and kern.probe(flat.numpy()):
            check_finite(key, flat)  # raises before u and v are touched
        n = flat.numel()
        uf, vf = u.contiguous().view(-1), v.contiguous().view(-1)
        inplace = has and not fresh
        u2 = uf if inplace else memory.spare_like(key, flat)
        v2 = vf if inplace else memory.spare_like(key, flat)
        scale = clip_scale(memory.clip_norm, flat)
        m, s = np.float32(memory.momentum), np.float32(1.0 if scale is None else scale)
        g, ru, rv, ou, ov = flat.numpy(), uf.numpy(), vf.numpy(), u2.numpy(), v2.numpy()

        def sample(picks: np.ndarray) -> np.ndarray:
            got = np.empty(picks.size, dtype=np.float32)
            kern.dgc_sample(g, ru, rv, m, s, picks, got)
            return got

        k = self.count(n)
        got = kern.choose(
            n,
            k,
            ov,
            lambda thr, buf: kern.dgc_pass(g, ru, rv, ou, ov, m, s, thr, buf),
            sample,
            sample_picks(n, k, self.selection, self.sample_ratio, seed),
        )
        if got is None:
            if not inplace:
                memory.spare[key] = [u2, v2]  # the old u and v stay, untouched
            else:
                memory.momenta.pop(key, None)
            feedback_failed(memory.velocities, key, flat, memory.check, inplace)
        idx, vals = got
        kern.mask_dgc(ou if memory.masking else ov, ov, idx, vals)  # ov twice: v only
        memory.momenta[key], memory.velocities[key] = u2.view(grad.shape), v2.view(grad.shape)
        payload = Payload((torch.from_numpy(idx), torch.from_numpy(vals)))
        return payload, SparseCtx(grad.shape, torch.float32, n)
