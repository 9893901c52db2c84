"""Momentum correction: SGD's momentum applied on every rank *before* compression.

With an error-feedback compressor (1-bit, top-k) and the momentum left in the optimizer, what
a step fails to send is sent a step later and then multiplied into the following updates by
the momentum: the weights drift from the dense run by the integral of those errors, and at
the learning rates of dense training the first steps can blow up (measured on the CNN of
``benchmarks/accuracy.py``: 1-bit with 512-element groups dies at step 20, loss back at
ln 10). Deep Gradient Compression (Lin et al. 2018, https://arxiv.org/abs/1712.01887, section
3.2, "momentum correction") moves the momentum to the workers: each rank keeps its own
velocity ``u = m u + (g + wd w)`` and compresses ``u`` (plus its residual); the optimizer then
steps with the averaged ``u`` and no momentum of its own. An error is then an error of one
update, sent again the next step, never amplified.

For dense gradients this is the same update as the optimizer's (the momentum is linear:
the average of the ranks' velocities is the velocity of the averaged gradient), up to the
rounding of sums taken in another order. :class:`MomentumCorrection` reads the momentum,
dampening, Nesterov flag and weight decay of each parameter's ``torch.optim.SGD`` param group
at every step (so schedules that change them still apply) and runs the wrapped step with all
four switched off for that call (``plain_step``).

A velocity is staged until the step is known to count on every rank (``commit``); a step
called off (a NaN/Inf on some rank, a parameter no rank used) leaves it as it was, as a
skipped ``optimizer.step()`` leaves SGD's momentum buffer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["CORRECTED", "MomentumCorrection", "wants_correction"]

#: the SGD hyper-parameters the correction takes over (and switches off in the wrapped step)
CORRECTED = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}


def wants_correction(optimizer: torch.optim.Optimizer) -> str | None:
    """Why momentum correction cannot run with ``optimizer`` (None: it can, and it changes
    something: some param group has momentum)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return f"it applies to torch.optim.SGD, and this optimizer is {type(optimizer).__name__}"
    if any(g.get("maximize", False) for g in optimizer.param_groups):
        return "a param group has maximize=True"
    if not any(g.get("momentum", 0) for g in optimizer.param_groups):
        return "no param group has momentum"
    return None


class MomentumCorrection:
    """Per-rank SGD velocities of the parameters ``params`` (in slot order), by name."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, names: Sequence[str], params: Sequence[Any]
    ) -> None:
        group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
        self.names = list(names)
        self.groups = [group_of[p] for p in params]
        self.params = list(params)
        self.velocities: dict[str, torch.Tensor] = {}
        self._pending: dict[int, torch.Tensor] = {}
        #: the velocity a step replaced (or the one a called-off step made): the buffer of
        #: the next step's velocity, so that large layers allocate nothing (no page faults)
        self._spare: dict[int, torch.Tensor] = {}

    def apply(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """The update of slot ``i`` this step sends in place of ``grad`` (SGD's ``d_p`` after
        weight decay and momentum, in ``grad``'s dtype; the velocity is kept in fp32)."""
        group, name = self.groups[i], self.names[i]
        momentum = float(group.get("momentum", 0.0))
        wd = float(group.get("weight_decay", 0.0))
        nesterov = bool(group.get("nesterov", False))
        # SGD's d_p: the gradient itself unless weight decay (or Nesterov) needs a new tensor
        d = grad
        if wd:
            d = grad.to(torch.float32).add(self.params[i].detach().to(torch.float32), alpha=wd)
        if not momentum:
            return d.to(grad.dtype)
        old = self.velocities.get(name)
        if old is None:
            u = d.to(torch.float32, copy=True)
        else:
            if old.shape != d.shape:
                raise ValueError(
                    f"parameter {name!r}: its velocity has shape {tuple(old.shape)} but the "
                    f"gradient {tuple(d.shape)}"
                )
            buf = self._spare.pop(i, None)
            if buf is None or buf.shape != old.shape or buf.data_ptr() == old.data_ptr():
                buf = torch.empty_like(old)
            u = torch.mul(old, momentum, out=buf)
            u.add_(d, alpha=1.0 - float(group.get("dampening", 0.0)))
        self._pending[i] = u
        out = d.to(torch.float32).add(u, alpha=momentum) if nesterov else u
        return out.to(grad.dtype)

    def commit(self, i: int) -> None:
        """Slot ``i``'s step counted: keep its new velocity."""
        u = self._pending.pop(i, None)
        if u is not None:
            old = self.velocities.get(self.names[i])
            if old is not None:
                self._spare[i] = old
            self.velocities[self.names[i]] = u

    def discard(self, i: int) -> None:
        """Slot ``i``'s step was called off: its velocity stays as it was."""
        u = self._pending.pop(i, None)
        if u is not None and u is not self.velocities.get(self.names[i]):
            self._spare[i] = u

    @contextlib.contextmanager
    def plain_step(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """The wrapped ``step()`` inside runs without momentum and weight decay (they were
        applied before the gradients were sent); the groups' values come back afterwards."""
        saved = [{k: g[k] for k in CORRECTED if k in g} for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            for k, v in CORRECTED.items():
                if k in g:
                    g[k] = v
        try:
            yield
        finally:
            for g, old in zip(optimizer.param_groups, saved, strict=True):
                g.update(old)

    def adopt(self, state: Any) -> None:
        """Take SGD's own ``momentum_buffer`` of each parameter in ``state`` (the optimizer's
        ``state``, e.g. from a checkpoint written without gradzip) as its velocity, and drop
        it from ``state`` (the wrapped step never reads it)."""
        for name, p in zip(self.names, self.params, strict=True):
            buf = state.get(p, {}).pop("momentum_buffer", None)
            if buf is not None:
                self.velocities[name] = buf.detach().to(torch.float32).clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.velocities.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(state) - set(self.names))
        if unknown:
            raise ValueError(f"the checkpoint has velocities of unknown parameters: {unknown}")
        self.velocities = {k: v.detach().to(torch.float32).clone() for k, v in state.items()}
        self._pending = {}
        self._spare = {}
