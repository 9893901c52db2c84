"""The peers of the network benchmark: torch's DDP with its own comm hooks.

``ddp`` (the plain allreduce hook, equal to DDP's built-in allreduce), ``ddp-fp16``
(``fp16_compress_hook``) and ``ddp-powersgd`` (``powerSGD_hook``, rank ``powersgd_rank``, dense
for the first 10% of the steps as torch's documentation suggests; Vogels et al. 2019,
https://arxiv.org/abs/1905.13727). Their bytes are counted by wrapping
``torch.distributed.all_reduce``, which the hooks call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from benchmarks.network_worker import Step, WorkerConfig

__all__ = ["PEERS", "ddp_step"]

#: the torch DDP methods
PEERS = ("ddp", "ddp-fp16", "ddp-powersgd")


class _Counter:
    """Bytes of the tensors handed to ``torch.distributed.all_reduce`` (for the DDP hooks)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._orig = dist.all_reduce

        @functools.wraps(self._orig)
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.bytes += tensor.numel() * tensor.element_size()
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counted

    def close(self) -> None:
        dist.all_reduce = self._orig


def ddp_step(method: str, model: nn.Module, cfg: WorkerConfig) -> tuple[Step, Callable[[], None]]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    if method == "ddp-powersgd":
        # one bucket: with several, torch's PowerSGD hook launches collectives from future
        # callbacks whose order differs between ranks, and gloo aborts on the mismatch
        ddp = DDP(model, bucket_cap_mb=1024)
    else:
        ddp = DDP(model)
    if method == "ddp-fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif method == "ddp-powersgd":
        # the settings torch's documentation suggests: rank 1 and a dense start of 10% of steps
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=cfg.powersgd_rank,
            start_powerSGD_iter=max(2, cfg.steps // 10),
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    else:  # plain DDP, through the hook that equals its built-in allreduce (to count bytes)
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    from benchmarks.network_worker import Step, loss_backward

    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    counter = _Counter()

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=False)
        loss_backward(ddp, x, y)
        opt.step()

    return Step(model, run, lambda: counter.bytes), counter.close
