"""``gradzip.DistributedOptimizer``: Horovod's optimizer wrapper, with compressed gradients.

Wrap an optimizer exactly as with ``hvd.DistributedOptimizer`` (Sergeev & Del Balso 2018,
https://arxiv.org/abs/1802.05799)::

    opt = gradzip.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       compression="topk:ratio=0.01")

The result is an instance of a class derived from the optimizer's own class, so
``isinstance``, LR schedulers and ``state_dict`` keep working. Gradients are compressed and
sent by post-accumulate-grad hooks while backward still runs (``pipeline.py``); ``step()``
waits for them. Between backward and step, ``synchronize()`` finishes the communication so
gradients can be clipped or unscaled (AMP); then call ``step()`` inside
``skip_synchronize()``. ``state_dict()`` holds this rank's error-feedback residuals and DGC
velocities under the key ``"gradzip"``: save it on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch import nn

from gradzip.allreduce.auto import default_backend
from gradzip.allreduce.backend import Backend
from gradzip.allreduce.fusion import DEFAULT_FUSION_BYTES
from gradzip.compress.base import FLOAT_DTYPES, CompressionError, Compressor
from gradzip.compress.dgc import DGC, check_optimizer
from gradzip.compress.sfb import SFB
from gradzip.hooks.momentum import MomentumCorrection, wants_correction
from gradzip.hooks.pipeline import GradPipeline, Slot
from gradzip.hooks.policy import DEFAULT_MIN_COMPRESS_NUMEL, DENSE, CompressionArg, make_policy
from gradzip.hooks.sfb import FactorCapture, linear_weights
from gradzip.plan.auto import Decision, is_auto
from gradzip.plan.auto import resolve as resolve_auto

__all__ = ["Average", "DistributedOptimizer", "Op", "Sum"]

_instances = itertools.count()


class Op(enum.Enum):
    """How the gradients of the ranks combine."""

    AVERAGE = "average"
    SUM = "sum"


Average = Op.AVERAGE
Sum = Op.SUM


class _DistributedMixin:
    """The methods DistributedOptimizer adds to (or wraps on) the user's optimizer class."""

    _gz: GradPipeline
    _gz_momentum: MomentumCorrection | None
    _gz_auto: Decision | None
    _gz_skip: bool
    _gz_synced: bool
    _gz_hooks: list[Any]

    def synchronize(self) -> None:
        """Finish sending every gradient and write the reduced ones into ``.grad``. A no-op
        when no gradient arrived since the last synchronization."""
        if self._gz.dirty:
            self._gz.synchronize()
        self._gz_synced = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """``step()`` inside this block does not synchronize (call ``synchronize()`` first)."""
        self._gz_skip = True
        try:
            yield
        finally:
            self._gz_skip = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Synchronize (unless inside ``skip_synchronize()``), then the wrapped step."""
        if not self._gz_skip:
            if self._gz_synced and not self._gz.dirty:
                warnings.warn(
                    "optimizer.step() called after optimizer.synchronize() without "
                    "optimizer.skip_synchronize(); the gradients were already reduced and are "
                    "used as they are. Write `with optimizer.skip_synchronize(): "
                    "optimizer.step()` to make this explicit",
                    stacklevel=2,
                )
            if self._gz.dirty:
                self._gz.synchronize()
        self._gz_synced = False
        if self._gz_momentum is None:
            return super().step(closure)  # type: ignore[misc]
        with self._gz_momentum.plain_step(cast(torch.optim.Optimizer, self)):
            return super().step(closure)  # type: ignore[misc]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; an error while gradients are still being communicated."""
        if self._gz.dirty:
            raise RuntimeError(
                "optimizer.zero_grad() was called after loss.backward() but before "
                "optimizer.step() or optimizer.synchronize(): the gradients of that backward "
                "are being compressed and sent (and, with backward_passes_per_step > 1, "
                "accumulated), so clearing them now would lose them on this rank only. Call "
                "zero_grad() before backward or after step()"
            )
        super().zero_grad(set_to_none)  # type: ignore[misc]

    def set_epoch(self, epoch: float) -> None:
        """Start training epoch ``epoch`` (0-based): drives DGC's warm-up (``at_epoch``)."""
        self._gz.set_epoch(epoch)

    @property
    def backend(self) -> Backend:
        """The communication backend (its ``stats`` count the bytes sent)."""
        return self._gz.backend

    def compression_plan(self) -> dict[str, str]:
        """``{parameter name: compressor spec}`` as sent (after the small-tensor and SFB
        cost-model decisions, which are final once the first backward ran)."""
        return {s.name: s.compressor.spec() for s in self._gz.slots}

    def auto_decision(self) -> Decision | None:
        """With ``compression="auto"``: what the cost model chose and why (its ``report``);
        None otherwise."""
        return self._gz_auto

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus this rank's compression state (``"gradzip"``)."""
        state: dict[str, Any] = super().state_dict()  # type: ignore[misc]
        state["gradzip"] = self._gz.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both; without a ``"gradzip"`` entry the compression state is kept.

        The compression state is per rank: one saved by another rank, in another world size,
        or with other compressors or parameters raises a ValueError before anything is loaded
        (never a silent re-cut of residuals). To start a new world size from an old
        checkpoint, drop its ``"gradzip"`` entry: the optimizer's own state loads, and error
        feedback starts from zero."""
        state = dict(state_dict)
        mine = state.pop("gradzip", None)
        if mine is not None:
            here = (self._gz.backend.rank, self._gz.backend.size)
            if (mine["rank"], mine["world_size"]) != here:
                raise ValueError(
                    f"the checkpoint's compression state belongs to rank {mine['rank']} of "
                    f"{mine['world_size']}, this is rank {here[0]} of {here[1]}: error-feedback "
                    "residuals are per rank, so nothing was loaded. Load each rank's own "
                    "checkpoint (save state_dict() on every rank), or drop the 'gradzip' entry "
                    "to load the optimizer's state alone and restart error feedback from zero"
                )
            self._gz.check_state(mine)
        super().load_state_dict(state)  # type: ignore[misc]
        if mine is not None:
            self._gz.load_state_dict(mine)
        elif self._gz_momentum is not None:  # a plain SGD checkpoint: its momentum buffers
            opt = cast(torch.optim.Optimizer, self)
            self._gz_momentum.adopt(opt.state)  # become the velocities, not dropped

    def remove_hooks(self) -> None:
        """Detach every hook this wrapper installed (the optimizer stops communicating)."""
        for h in self._gz_hooks:
            h.remove()
        self._gz_hooks.clear()
        for s in self._gz.slots:
            if s.capture is not None:
                s.capture.remove()


def _names(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
    model: nn.Module | None,
) -> dict[torch.Tensor, str]:
    """A unique name for every parameter of ``optimizer`` (same on every rank)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if named_parameters is None and model is not None:
        named_parameters = model.named_parameters()
    if named_parameters is None:
        return {
            p: f"group{g}.param{i}"
            for g, group in enumerate(optimizer.param_groups)
            for i, p in enumerate(group["params"])
        }
    named = list(named_parameters)
    seen: dict[str, int] = {}
    for name, _ in named:
        seen[name] = seen.get(name, 0) + 1
    dupes = sorted(n for n, c in seen.items() if c > 1)
    if dupes:
        raise ValueError(f"named_parameters has repeated names: {dupes}")
    by_param = {p: n for n, p in named}
    unnamed = [i for i, p in enumerate(params) if p not in by_param]
    if unnamed:
        raise ValueError(
            f"named_parameters misses {len(unnamed)} of the optimizer's parameters (positions "
            f"{unnamed[:10]} in param_groups order); pass model.named_parameters() of the model "
            "the optimizer was built for"
        )
    return by_param


def _slots(
    optimizer: torch.optim.Optimizer,
    names: dict[torch.Tensor, str],
    compression: CompressionArg,
    min_compress_numel: int,
    model: nn.Module | None,
    world_size: int,
) -> list[Slot]:
    policy = make_policy(compression, min_compress_numel)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    policy.check_patterns([names[p] for p in params])
    linears = linear_weights(model) if model is not None else {}
    slots = []
    for p in params:  # frozen parameters get no hook and no bucket
        if not p.requires_grad:
            continue
        name = names[p]
        if p.dtype not in FLOAT_DTYPES or p.layout is not torch.strided:
            raise CompressionError(
                f"parameter {name!r} is a {p.layout} {p.dtype} tensor; gradzip reduces the "
                "gradients of dense float32, float16 and bfloat16 parameters (leave this one "
                "out of the optimizer, or convert it)"
            )
        c = _adapt(policy.choose(name, p.numel()), world_size)
        capture = None
        if isinstance(c, SFB):
            if model is None:
                raise CompressionError(
                    f"sfb was chosen for {name!r}: SFB hooks the model's nn.Linear layers, so "
                    "pass model=... to DistributedOptimizer"
                )
            layer = linears.get(name)
            if layer is None or layer.weight is not p:
                c = DENSE  # not the weight of a Linear layer: dense path
            else:
                capture = FactorCapture(name, layer)
        slots.append(Slot(name, p, c, capture))
    return slots


def _adapt(c: Compressor, world_size: int) -> Compressor:
    """DGC's local clipping scales by the world size: fill in the default of 1."""
    if isinstance(c, DGC) and c.world_size == 1 and world_size > 1:
        return dataclasses.replace(c, world_size=world_size)
    return c


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    compression: CompressionArg = "none",
    backend: Backend | None = None,
    backward_passes_per_step: int = 1,
    op: Op = Average,
    fusion_bytes: int = DEFAULT_FUSION_BYTES,
    seed: int = 0,
    *,
    model: nn.Module | None = None,
    min_compress_numel: int = DEFAULT_MIN_COMPRESS_NUMEL,
    gather: str | None = None,
    sparse: str = "allgather",
    dense_steps: int | None = None,
    nonfinite: str = "propagate",
    timeout: float | None = None,
    momentum_correction: bool | None = None,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` uses gradients averaged (``op=Average``) or
    summed (``op=Sum``) over all ranks, sent compressed as ``compression`` says.

    ``compression``: a compressor, a spec string, or ``{name pattern: compressor}`` (see
    :mod:`gradzip.hooks.policy`); tensors below ``min_compress_numel`` elements go dense.
    ``"sfb"`` needs ``model`` (its ``nn.Linear`` layers are hooked; factors are sent where the
    cost model says they are cheaper). ``backend``: default Horovod if ``hvd.init()`` ran,
    else torch.distributed. ``backward_passes_per_step``: passes summed locally (as Horovod,
    not averaged) before one communication. ``seed``: stochastic compressors draw from
    (seed, step, name, rank). ``gather``/``sparse``: the strategies of
    :func:`gradzip.allreduce.select.strategy_for`; the default ``gather=None`` takes the
    allgather, and scatter-gather for error-feedback methods from as many ranks as their
    ratio (32 for 1-bit; :func:`gradzip.allreduce.select.default_gather` says why). Parameters with
    ``requires_grad=False`` when wrapping are never communicated. ``dense_steps``: the first
    that many steps send every gradient uncompressed (a dense allreduce, no error feedback);
    compression and error feedback start after them, like torch's PowerSGD hook's
    ``start_powerSGD_iter``. The default (None) takes what the compressors ask for
    (``Compressor.default_dense_steps``): 150 for 1-bit and top-k (which hold back most of the
    gradient) and 300 for TernGrad (the noisiest), which are at their least stable in the
    first steps, 0 for the others (DGC has its own sparsity warm-up).
    ``momentum_correction``: for ``torch.optim.SGD`` with momentum and an error-feedback
    compressor (1-bit, top-k), the default (None) applies SGD's weight decay and momentum on
    each rank *before* compression and steps the wrapped SGD without them (the momentum
    correction of Lin et al. 2018, :mod:`gradzip.hooks.momentum`): for dense gradients the
    same update, for compressed ones an error is no longer amplified by the momentum.
    ``p.grad`` then holds the averaged momentum-corrected update, not the averaged gradient
    (so clipping it clips the update); ``False`` leaves the momentum in the optimizer,
    ``True`` insists (an error where it cannot apply).

    Gradients are reduced by the time the step's (last) ``backward()`` returns, so
    ``GradScaler.step(opt)``, clipping and checks see the reduced gradient. ``nonfinite``:
    with ``"propagate"`` (default, as DDP and Horovod) a NaN/Inf gradient on any rank makes
    that step's reduced gradient NaN on every rank (the dense casts: the non-finite sum itself)
    and leaves every error-feedback state as it was, so ``GradScaler`` skips the step on all
    ranks; ``"raise"`` raises a CompressionError on every rank instead, naming the tensor.
    ``timeout``: seconds a collective waits for its peers; a peer that died or never joins
    makes every other rank raise a :class:`~gradzip.allreduce.backend.PeerLost` naming the
    collective and the bucket (default 5 minutes; a crashed peer is usually seen at once).

    DGC: the wrapped optimizer must have no momentum (DGC applies it itself); its warm-up
    follows ``opt.set_epoch(epoch)`` when the loop calls it at the start of every epoch, and
    otherwise spans the compressor's first ``warmup_steps`` (150) steps. Checkpoints:
    ``state_dict()`` holds this rank's residuals (and SGD velocities under momentum
    correction); save and load it on every rank.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, _DistributedMixin):
        raise ValueError("this optimizer is already a gradzip DistributedOptimizer")
    if isinstance(op, bool) or op not in (Average, Sum):
        raise ValueError(f"op={op!r}; expected gradzip.Average or gradzip.Sum")
    bpps = backward_passes_per_step
    if isinstance(bpps, bool) or not isinstance(bpps, int) or bpps < 1:
        raise ValueError(f"backward_passes_per_step={bpps!r}; expected an int >= 1")
    if backend is None:
        backend = default_backend(prefix=f"gradzip.opt{next(_instances)}", timeout=timeout)
    elif timeout is not None:
        raise ValueError("timeout= applies to the backend gradzip builds; give it to backend=...")
    names = _names(optimizer, named_parameters, model)
    decision = None
    if is_auto(compression):  # the cost model's choice, the same on every rank
        assert isinstance(compression, str)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        decision = resolve_auto(
            compression, [(names[p], p) for p in params], backend,
            min_compress_numel=min_compress_numel, fusion_bytes=fusion_bytes,
        )
        compression, gather, sparse = decision.policy(), decision.gather, decision.sparse
    slots = _slots(optimizer, names, compression, min_compress_numel, model, backend.size)
    if any(isinstance(s.compressor, DGC) for s in slots):
        check_optimizer(optimizer)
    momentum = _momentum(optimizer, slots, momentum_correction)
    pipeline = GradPipeline(
        backend,
        slots,
        average=op is Average,
        fusion_bytes=fusion_bytes,
        seed=seed,
        passes_per_step=bpps,
        gather=gather,
        sparse=sparse,
        dense_steps=dense_steps,
        nonfinite=nonfinite,
        momentum=momentum,
    )
    base = type(optimizer)
    cls: Any = type(base.__name__, (_DistributedMixin, base), {"__module__": base.__module__})
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)  # shares param_groups and state
    wrapped._gz, wrapped._gz_skip, wrapped._gz_synced = pipeline, False, False
    wrapped._gz_momentum = momentum
    wrapped._gz_auto = decision
    wrapped._gz_hooks = [
        s.param.register_post_accumulate_grad_hook(_hook(pipeline, i)) for i, s in enumerate(slots)
    ]
    return cast(torch.optim.Optimizer, wrapped)


def _momentum(
    optimizer: torch.optim.Optimizer, slots: list[Slot], correction: bool | None
) -> MomentumCorrection | None:
    """The momentum correction of ``momentum_correction=correction`` (None: automatic)."""
    if correction is not None and not isinstance(correction, bool):
        raise ValueError(f"momentum_correction={correction!r}; expected None, True or False")
    if correction is False:
        return None
    why = wants_correction(optimizer)
    sfb = [s.name for s in slots if isinstance(s.compressor, SFB)]
    if why is None and sfb:
        why = f"SFB sends factors, not gradients, for {sfb[:3]}"
    if correction is None:
        feedback = any(s.compressor.error_feedback for s in slots)
        if why is not None or not feedback:
            return None
    elif why is not None:
        raise ValueError(f"momentum_correction=True cannot be applied: {why}")
    return MomentumCorrection(optimizer, [s.name for s in slots], [s.param for s in slots])


def _hook(pipeline: GradPipeline, i: int) -> Callable[[torch.Tensor], None]:
    def hook(_: torch.Tensor) -> None:
        pipeline.on_grad(i)

    return hook
