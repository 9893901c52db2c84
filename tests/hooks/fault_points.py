"""Where a fault test kills a rank: shared by the forked tests and the launcher workers.

``arm(model, backend, where, step, victim)`` makes rank ``victim`` SIGKILL itself at step
``step``: ``"backward"`` in the middle of its backward pass (from a gradient hook, after some
buckets were sent), ``"collective"`` inside the step's flags allreduce (issued, not waited
for), ``"between"`` after its ``optimizer.step()``, before the next step. Before dying it writes
the time to ``stamp`` so survivors can tell how long they took to raise.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

WHERE = ("backward", "collective", "between")


def die(stamp: str | None) -> None:
    if stamp:
        Path(stamp).write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def arm(
    model: torch.nn.Module, backend: Any, where: str, step: list[int], at: int, stamp: str | None
) -> None:
    """Install the fault for ``where`` (see the module docstring); ``step[0]`` is the loop's
    current step, ``at`` the step of the fault."""
    if where == "backward":
        first = next(iter(model.parameters()))  # the last gradient backward produces

        def hook(g: torch.Tensor) -> torch.Tensor:
            if step[0] == at:
                die(stamp)
            return g

        first.register_hook(hook)
    elif where == "collective":
        inner = backend.allreduce

        def allreduce(tensor: torch.Tensor, op: Any = None) -> Any:
            work = inner(tensor) if op is None else inner(tensor, op)
            if step[0] == at and tensor.dtype == torch.int32:  # the step's flags
                die(stamp)
            return work

        backend.allreduce = allreduce
    elif where != "between":
        raise ValueError(f"where={where!r}; expected one of {WHERE}")


def between(where: str, step: int, at: int, stamp: str | None) -> None:
    """Call after ``optimizer.step()``."""
    if where == "between" and step == at:
        die(stamp)
