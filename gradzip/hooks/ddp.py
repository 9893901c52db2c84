"""A DDP communication hook that compresses each gradient bucket, with error feedback.

One line turns an existing ``DistributedDataParallel`` script into a compressed one::

    model.register_comm_hook(*gradzip.ddp_comm_hook("topk:ratio=0.01"))

The hook follows ``torch.distributed.algorithms.ddp_comm_hooks``: ``hook(state, bucket)``
returns a ``Future`` of the bucket averaged over ranks. Per bucket it runs the pipeline of
``shared/DESIGN.md``: compensate (``residual[bucket index]``), compress, reduce with the strategy
of the compressor's :class:`~gradzip.compress.base.Reduction`, update the residual.

**Overlap.** DDP calls the hook once per bucket, in index order, while backward still runs.
The hook compresses the bucket and *launches* its collectives at once; the returned futures
are completed together when the last bucket (``bucket.is_last()``) arrives, so communication
overlaps the rest of backward. All collectives are issued from the hook, in bucket order, on
every rank. ``overlap=False`` completes every bucket before its hook returns.

**Bucket rebuild.** DDP regroups parameters into new buckets after the first iteration, so
bucket ``i`` may hold other parameters afterwards. The memory is a
:class:`~gradzip.hooks.bucket_memory.BucketMemory`: it notices the new layout and carries
residuals (and DGC momenta/velocities) per parameter into the new buckets, exactly. The
server-side residuals of scatter-gather (``gather="scatter_gather"``, and 1-bit's default from
32 ranks on) live on chunks of a bucket and are reset instead (counted in
``stats["resets"]``).

**Non-finite gradients** follow DDP: a bucket holding a NaN/Inf on some rank is NaN on every
rank when its future completes (the dense casts carry the non-finite sum itself; the others
send zeros and are flagged in one tiny allreduce per step, issued when the last bucket
arrives), so ``GradScaler`` skips the step everywhere, and the error-feedback state of every
bucket of that step (residuals, DGC's momenta and velocities, server residuals) stays as it
was before it: memory updates wait for the step's last bucket.
``nonfinite="raise"`` fails every future on every rank with a CompressionError instead.

**DGC** applies momentum itself; the hook cannot see the optimizer, so it takes it:
``ddp_comm_hook("dgc:ratio=0.001", optimizer=opt)`` checks that ``opt`` has no momentum of its
own (momentum would otherwise be applied twice), and DGC without ``optimizer=`` is an error.

**Checkpoints.** The state pickles without its process group and backend; after unpickling it
talks over a new group of all ranks, built at the first hook call. A bucket whose index and
parameter sizes match the pickled ones takes its memory back; any other starts from zero
(counted in ``stats["resets"]``). A run restored into a fresh process sees DDP's initial
buckets again, so it typically restarts its error feedback once.

PyTorch's comm hooks: https://pytorch.org/docs/stable/ddp_comm_hooks.html
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from gradzip.allreduce.backend import Backend, PeerLost, ReduceOp, Work, control, wire_bytes
from gradzip.allreduce.consistency import check_consistent
from gradzip.allreduce.entry import Entry, Reduced
from gradzip.allreduce.select import strategy_for
from gradzip.compress.base import CompressionError, Compressor, Reduction, compressor
from gradzip.compress.dgc import DGC, check_optimizer
from gradzip.compress.memory import NoMemory
from gradzip.hooks.bucket_memory import BucketMemory
from gradzip.hooks.pipeline import check_nonfinite, is_finite, passes_nonfinite
from gradzip.hooks.policy import DENSE, check_dense_steps
from gradzip.plan.auto import Decision, is_auto, parse_auto, resolve_buckets

__all__ = ["DDPHookState", "compressed_hook", "ddp_comm_hook"]

GATHERS = ("allgather", "scatter_gather")
SPARSES = ("allgather", "recursive")
_STATS = ("steps", "buckets", "dense_bytes", "dense_wire_bytes", "bytes_in", "bytes_sent")


class _InFlight(NamedTuple):
    """A launched bucket: its future, the strategy's work, and what completing it needs."""

    future: torch.futures.Future[torch.Tensor]
    work: Work[list[Reduced]]
    strategy: Any  # what reduced it (settles its server-side state)
    key: int
    compensated: torch.Tensor
    buffer: torch.Tensor
    dense: bool = False  # sent uncompressed (one of the first ``dense_steps``): no feedback
    bad: bool = False  # this rank's bucket held a NaN/Inf (sent as zeros unless passthrough)
    passthrough: bool = False  # NaN/Inf travel as they are (dense casts)
    momentum: bool = False  # a dense step through DGC's memory: its momentum, all of it sent


class DDPHookState:
    """State of :func:`compressed_hook`; build it with :func:`ddp_comm_hook`.

    ``backend`` replaces the torch.distributed group (e.g. ``LocalBackend`` to run the hook in
    one process); see :func:`ddp_comm_hook` for the other options.

    ``stats`` counts what went to the engine: ``dense_bytes`` (the bucket bytes plain DDP would
    allreduce) against ``bytes_in`` (bytes this rank handed to collectives), and the modelled
    wire bytes of both (``dense_wire_bytes``, ``bytes_sent``); :attr:`compression_ratio` is
    ``dense_bytes / bytes_in``, measured.
    """

    def __init__(
        self,
        compression: str | Compressor,
        *,
        process_group: dist.ProcessGroup | None = None,
        backend: Backend | None = None,
        seed: int = 0,
        gather: str | None = None,
        sparse: str = "allgather",
        overlap: bool = True,
        verify: bool = False,
        dense_steps: int | None = None,
        nonfinite: str = "propagate",
        optimizer: torch.optim.Optimizer | None = None,
        timeout: float | None = None,
    ) -> None:
        if process_group is not None and backend is not None:
            raise ValueError("give process_group or backend, not both")
        if timeout is not None and (backend is not None or process_group is not None):
            raise ValueError("timeout= applies to the group gradzip builds, not to one you pass")
        if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
            raise ValueError(f"timeout={timeout!r}; expected seconds > 0, or None")
        self.timeout = timeout  # seconds a collective waits for its peers (None: 5 minutes)
        self.auto: str | None = None  # an "auto" spec: the cost model chooses after step 0
        self.auto_decision: Decision | None = None  # what it chose, and why
        self.auto_dense_steps = dense_steps  # the user's, applied once auto has chosen
        if is_auto(compression):
            assert isinstance(compression, str)
            self.auto = compression
            for spec in parse_auto(compression)[1:]:  # none first; raises, naming a bad spec
                self._check_compressor(compressor(spec), optimizer)
            compression = "none"  # step 0, which auto sees the buckets in, goes dense
        comp = compressor(compression)
        self._check_compressor(comp, optimizer)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r}; expected an int >= 0")
        if gather is not None and gather not in GATHERS:
            raise ValueError(f"gather={gather!r}; expected one of {GATHERS}, or None (by bytes)")
        if sparse not in SPARSES:
            raise ValueError(f"sparse={sparse!r}; expected one of {SPARSES}")
        for flag, value in (("overlap", overlap), ("verify", verify)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag}={value!r}; expected True or False")
        # what the user tunes
        at_step = getattr(comp, "at_step", None)
        self.compression: Compressor = comp if at_step is None else at_step(0)
        self.seed = seed  # stochastic compressors draw from derive_seed(seed, step, bucket, rank)
        self.gather = gather  # None: the one that moves fewer bytes at the world size
        self.sparse = sparse
        self.dense_steps = check_dense_steps(dense_steps, [comp])  # first steps: plain buckets
        self.epoch: float | None = None  # set_epoch's; None: warm-ups count steps
        self.nonfinite = check_nonfinite(nonfinite)  # a NaN/Inf: reach every rank, or raise
        # switches
        self.overlap = overlap  # launch per bucket, complete all at the last bucket
        self.verify = verify  # compare bucket layouts across ranks before each collective
        # internal state
        self.process_group = process_group
        self.step = 0
        self.memory = BucketMemory(comp.make_memory())
        self._backend: Backend | None = backend
        self.strategy = self._new_strategy()
        self._dense = strategy_for(DENSE, verify=verify)  # carries the first dense_steps
        self._pending: list[_InFlight] = []
        self._settle: list[tuple[_InFlight, Reduced]] = []  # done buckets of this step
        self._skipped = False  # a bucket of this step held a NaN/Inf on some rank
        # (index, numel, dtype) of the buckets compared across ranks (once each per process)
        self._checked: set[tuple[int, int, torch.dtype]] = set()
        self._counted = (0, 0)  # backend byte counters already added to the statistics
        self._layout: list[tuple[int, int, torch.dtype]] = []  # step 0's buckets, for auto
        # statistics
        self.counters: dict[str, int] = dict.fromkeys(_STATS, 0)

    @staticmethod
    def _check_compressor(comp: Compressor, optimizer: torch.optim.Optimizer | None) -> None:
        """Refuse what a DDP bucket cannot carry, and DGC without a momentum-free optimizer."""
        if comp.reduction is Reduction.FACTORS:
            raise CompressionError(
                f"compression={comp.spec()!r} sends per-sample factors of nn.Linear layers, "
                "which a DDP gradient bucket (a flat vector of finished gradients) does not "
                "hold; use gradzip.DistributedOptimizer(..., compression='sfb') instead"
            )
        if isinstance(comp, DGC):
            if optimizer is None:
                raise CompressionError(
                    f"compression={comp.spec()!r} applies momentum itself, and the hook cannot "
                    "see the optimizer to check it has none of its own (momentum would be "
                    "applied twice): pass optimizer=... to ddp_comm_hook, built with momentum=0"
                )
            check_optimizer(optimizer)

    def _new_strategy(self, gather: str | None = None) -> Any:
        """The compression's strategy: ``gather`` (a pickled state's), else the user's, else
        the GATHER strategy that moves fewer bytes at the world size, once it is known."""
        strategy = strategy_for(
            self.compression,
            gather=gather or self.gather,
            sparse=self.sparse,
            verify=self.verify,
            world_size=self._world_size(),
        )
        strategy.deferred = True  # settled per step, once every rank's flags are known
        return strategy

    def _world_size(self) -> int | None:
        """The ranks the hook reduces over, without building the backend (that takes a
        collective call); None while torch.distributed is not initialised."""
        if self._backend is not None:
            return self._backend.size
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)  # None: all ranks, as the backend
        return None

    @property
    def backend(self) -> Backend:
        """The backend over ``process_group`` (None: a new group of all ranks), built once."""
        if self._backend is None:
            import datetime

            from gradzip.allreduce.torch_dist import DEFAULT_TIMEOUT, TorchDistBackend

            timeout = getattr(self, "timeout", None)
            wait = DEFAULT_TIMEOUT if timeout is None else datetime.timedelta(seconds=timeout)
            self._backend = TorchDistBackend(self.process_group, timeout=wait)
        return self._backend

    @property
    def stats(self) -> dict[str, int]:
        """The byte and step counters, and the memory's ``rebuilds`` and ``resets``."""
        return {**self.counters, "rebuilds": self.memory.rebuilds, "resets": self.memory.resets}

    @property
    def compression_ratio(self) -> float:
        """Bucket bytes of plain DDP / bytes handed to collectives, over all steps so far."""
        return self.counters["dense_bytes"] / max(self.counters["bytes_in"], 1)

    def set_epoch(self, epoch: float) -> None:
        """Tell epoch-dependent compressors (DGC's warm-up) the current epoch."""
        at_epoch = getattr(self.compression, "at_epoch", None)
        if at_epoch is not None:
            self.epoch = float(epoch)
            self.compression = at_epoch(epoch)

    # -- the pipeline -------------------------------------------------------------------------

    def launch(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """Compensate, compress and launch one bucket; complete all at the last one."""
        buffer, index = bucket.buffer(), bucket.index()
        if self.counters["buckets"] == 0:
            self._fit_world(self.backend.size)
        try:
            if (index, buffer.numel(), buffer.dtype) not in self._checked:
                self._check_ranks_agree(index, buffer)
            if self.memory.track(index, bucket.parameters(), buffer.numel()):
                if self.strategy.state_dict().get("server"):
                    self.memory.resets += 1
                self.strategy = self._new_strategy()
            choosing = self.auto is not None and self.auto_decision is None
            if choosing:
                self._layout.append((index, buffer.numel(), buffer.dtype))
            dense = choosing or self.step < self.dense_steps
            strategy, comp = (self._dense, DENSE) if dense else (self.strategy, self.compression)
            passthrough = dense or passes_nonfinite(comp)
            bad = not is_finite(buffer)
            grad = torch.zeros_like(buffer) if bad and not passthrough else buffer
            # DGC's dense steps still apply its momentum (the whole bucket is sent)
            momentum = dense and self.compression.carries_momentum and not bad
            if passthrough and not momentum:  # warm-up or a dense cast: no error feedback
                compensated = NoMemory(check=False).compensate(index, grad)
            else:
                compensated = self.memory.memory.compensate(index, grad)
            entry = Entry(index, compensated)
            work = strategy.start(self.backend, comp, [entry], seed=self.seed, step=self.step)
        except (PeerLost, TimeoutError) as exc:
            lost = PeerLost(f"sending DDP bucket {index} at step {self.step}: {exc}")
            self._fail(lost)
            raise lost from exc
        except BaseException as exc:
            self._fail(exc)
            raise
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self._pending.append(
            _InFlight(
                future, work, strategy, index, compensated, buffer, dense, bad, passthrough,
                momentum,
            )
        )
        nbytes = buffer.numel() * buffer.element_size()
        self.counters["buckets"] += 1
        self.counters["dense_bytes"] += nbytes
        self.counters["dense_wire_bytes"] += wire_bytes("allreduce", nbytes, self.backend.size)
        if bucket.is_last() or not self.overlap:
            self._complete(last=bucket.is_last())
        return future

    def _check_ranks_agree(self, index: int, buffer: torch.Tensor) -> None:
        """Compare the hook's settings and this bucket across ranks, the first time a bucket
        of this index and size is seen (DDP's first layout, then the one it rebuilds after the
        first iteration), before it moves: ranks that disagree (other settings, another
        ``bucket_cap_mb``, another dtype) fail at once, naming both values, instead of hanging
        in or mixing up a later collective."""
        config = " ".join(
            f"{k}={v}"
            for k, v in (
                ("compression", self.compression.spec()),
                ("gather", self.gather),
                ("sparse", self.sparse),
                ("dense_steps", self.dense_steps),
                ("nonfinite", self.nonfinite),
                ("overlap", self.overlap),
                ("auto", self.auto),
            )
        )
        items = [(index, buffer.numel(), str(buffer.dtype))]
        check_consistent(self.backend, items, f"DDP-hook {config}")
        self._checked.add((index, buffer.numel(), buffer.dtype))

    def _fit_world(self, size: int) -> None:
        """Before the first bucket (and once auto has chosen): DGC scales its clipping
        threshold by the world size (fill in the default of 1); ``gather=None`` chooses by
        bytes at this world size (the state may have been built before torch.distributed was
        initialised)."""
        c = self.compression
        if isinstance(c, DGC) and c.world_size == 1 and size > 1:
            self.compression = dataclasses.replace(c, world_size=size)
            self.memory = BucketMemory(self.compression.make_memory())
        if self.gather is None and self.strategy.name != self._new_strategy().name:
            self.strategy = self._new_strategy()  # nothing reduced yet: no state to carry

    def _complete(self, *, last: bool) -> None:
        """Agree which buckets held a NaN/Inf, wait for every launched bucket, write the
        averages back, update the memory (or leave it as it was for a non-finite bucket)."""
        try:
            me = self.backend.rank + 1
            flags = control(self.backend, [me if j.bad else 0 for j in self._pending], torch.int32)
            bad = self.backend.allreduce(flags, ReduceOp.MAX).wait().tolist()
            results = [job.work.wait()[0] for job in self._pending]
            if self.nonfinite == "raise" and any(bad):
                for job in self._pending:
                    self.memory.memory.discard(job.key)
                    job.strategy.settle(job.key, keep=False)
                raise CompressionError(self._nonfinite_message(bad))
            self._skipped = self._skipped or any(bad)
            for job, result, who in zip(self._pending, results, bad, strict=True):
                self._settle.append((job, result))
                value = result.reduced
                if who and not job.passthrough:
                    value = torch.full_like(value, float("nan"))
                job.buffer.copy_(value.reshape(-1))
            if last:  # the step is complete: keep its feedback, or none of it when skipped
                self._finish_step()
            while self._pending:
                job = self._pending.pop(0)
                job.future.set_result(job.buffer)
            if last and self.auto is not None and self.auto_decision is None:
                self._choose(results[-1].reduced.device if results else torch.device("cpu"))
        except (PeerLost, TimeoutError) as exc:
            keys = [j.key for j in self._pending]
            lost = PeerLost(f"receiving DDP buckets {keys} at step {self.step}: {exc}")
            self._fail(lost)
            raise lost from exc
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self._count_bytes()
        if last:
            self.step += 1
            at_step = getattr(self.compression, "at_step", None)
            if self.epoch is None and at_step is not None:
                self.compression = at_step(self.step)
            self.counters["steps"] += 1

    def _choose(self, device: torch.device) -> None:
        """End of step 0 under ``"auto"``: cost every allowed compressor on the buckets just
        seen, take rank 0's choice (collectives, in the same place on every rank) and
        compress with it from the next step on."""
        assert self.auto is not None
        decision = resolve_buckets(self.auto, self._layout, self.backend, device)
        comp = compressor(next(iter(decision.specs.values()), "none"))
        self.compression = comp  # _complete applies a warm-up's at_step once the step counts
        self.sparse = decision.sparse
        self.dense_steps = check_dense_steps(self.auto_dense_steps, [comp])
        self.memory = BucketMemory(comp.make_memory())  # nothing was fed back yet
        self.strategy = self._new_strategy()
        self._fit_world(self.backend.size)
        self.auto_decision, self._layout = decision, []

    def _finish_step(self) -> None:
        """Update the memory with every bucket of the step, or (some bucket held a NaN/Inf on
        some rank, so every rank skips the step) leave all of it as it was."""
        for job, result in self._settle:
            job.strategy.settle(job.key, keep=not self._skipped)
            if self._skipped:
                self.memory.memory.discard(job.key)
            elif job.momentum:  # everything was sent: v back to 0, u kept
                self.memory.memory.update(job.key, job.compensated, job.compensated)
            elif result.local is not None and not job.dense:
                self.memory.memory.update(job.key, job.compensated, result.local)
        self._settle, self._skipped = [], False

    def _nonfinite_message(self, bad: list[int]) -> str:
        parts = []
        for job, who in zip(self._pending, bad, strict=True):
            if who:
                place = "this rank" if job.bad else f"rank {who - 1}"
                parts.append(f"DDP bucket {job.key} holds NaN or Inf values on {place}")
        return (
            "; ".join(parts) + " (nonfinite='raise'); its error-feedback state is as it was "
            "before this step. The default nonfinite='propagate' hands every rank a NaN bucket "
            "instead, so GradScaler skips the step"
        )

    def _count_bytes(self) -> None:
        """Add what the backend counted since the last call (it may be shared: no reset)."""
        stats = self.backend.stats
        seen_in, seen_sent = self._counted
        if stats.bytes_in < seen_in or stats.bytes_sent < seen_sent:
            seen_in = seen_sent = 0  # someone reset the backend's counters
        self.counters["bytes_in"] += stats.bytes_in - seen_in
        self.counters["bytes_sent"] += stats.bytes_sent - seen_sent
        self._counted = (stats.bytes_in, stats.bytes_sent)

    def _fail(self, exc: BaseException) -> None:
        """Fail every pending future, so no one waits on a bucket that will never finish."""
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(exc)  # type: ignore[arg-type]  # torch stub: Tensor
        for job in [*self._pending, *(j for j, _ in self._settle)]:  # the memory stays as it was
            self.memory.memory.discard(job.key)
            job.strategy.settle(job.key, keep=False)
        self._pending.clear()
        self._settle, self._skipped = [], False

    # -- pickling -----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the process group, the backend and in-flight work."""
        if self._pending:
            raise RuntimeError("cannot pickle a DDPHookState while buckets are in flight")
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        state.pop("process_group")
        state["memory"] = self.memory.state_dict()
        state["strategy"] = self.strategy.state_dict()
        state["strategy_name"] = self.strategy.name  # gather=None chose it by world size
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = {"auto": None, "auto_decision": None, "auto_dense_steps": None, **state}
        memory, strategy = state.pop("memory"), state.pop("strategy")
        name = state.pop("strategy_name", None)
        self.__dict__.update(state)
        self.process_group = None
        self.memory = BucketMemory(self.compression.make_memory())
        self.memory.load_state_dict(memory)
        self._backend = None
        self.strategy = self._new_strategy(name if name in GATHERS else None)
        self.strategy.load_state_dict(strategy)
        self._pending, self._counted, self._layout = [], (0, 0), []
        self._settle, self._skipped, self._checked = [], False, set()
        self._dense = strategy_for(DENSE, verify=self.verify)


def compressed_hook(
    state: DDPHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """The DDP comm hook: ``bucket`` compressed, averaged over ranks (see the module doc)."""
    return state.launch(bucket)


# DDP checks the hook's annotations against these objects; postponed evaluation made them strings
compressed_hook.__annotations__ = {
    "state": DDPHookState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def ddp_comm_hook(
    compression: str | Compressor,
    *,
    process_group: dist.ProcessGroup | None = None,
    seed: int = 0,
    gather: str | None = None,
    sparse: str = "allgather",
    overlap: bool = True,
    verify: bool = False,
    dense_steps: int | None = None,
    nonfinite: str = "propagate",
    optimizer: torch.optim.Optimizer | None = None,
    timeout: float | None = None,
) -> tuple[DDPHookState, Any]:
    """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook(state, hook)``.

    ``compression``: a compressor or a spec such as ``"topk:ratio=0.01"`` (any except SFB),
    or ``"auto"`` / ``"auto:allow=onebit+topk"``: the first iteration goes dense while the
    hook notes DDP's buckets; at its end the cost model (:mod:`gradzip.plan`) measures the link
    and takes the one compressor (the hook's state holds one for every bucket, unlike the
    optimizer's per-bucket choice) predicted fastest, and at least 15% faster than dense,
    rank 0's choice on every rank (``state.auto_decision.report`` says why; logger
    ``gradzip.auto``); ``dense_steps`` then counts from step 0 with the chosen one's default;
    ``process_group``: the group to reduce over (None: a new group of all ranks, with gradzip's
    timeout; every rank must call this); ``gather``/``sparse``: the strategy for GATHER and
    SPARSE payloads (:func:`~gradzip.allreduce.select.strategy_for`; ``gather=None``, the
    default: the allgather, and scatter-gather for error-feedback methods from as many ranks
    as their ratio, 32 for 1-bit; :func:`~gradzip.allreduce.select.default_gather`);
    ``verify``: check that ranks agree on every bucket before it moves (one tiny allreduce
    per bucket);
    ``dense_steps``: the first that many iterations allreduce the plain buckets (no error
    feedback), then compression starts, like torch's PowerSGD hook's ``start_powerSGD_iter``
    (default None: what the compressor asks for, 150 steps for 1-bit and top-k, 300 for TernGrad,
    0 for the others; DGC's sparsity warm-up spans its ``warmup_steps`` unless
    ``state.set_epoch`` is called);
    ``nonfinite``: ``"propagate"`` (a NaN/Inf on any rank makes the bucket NaN everywhere, as
    DDP; GradScaler then skips the step) or ``"raise"``; ``optimizer``: the optimizer the
    model trains with, required for DGC (checked to have no momentum of its own);
    ``timeout``: seconds a collective of the hook's own group waits for its peers (a dead peer
    raises a PeerLost naming the bucket; default 5 minutes).
    """
    state = DDPHookState(
        compression,
        process_group=process_group,
        seed=seed,
        gather=gather,
        sparse=sparse,
        overlap=overlap,
        verify=verify,
        dense_steps=dense_steps,
        nonfinite=nonfinite,
        optimizer=optimizer,
        timeout=timeout,
    )
    state.backend  # noqa: B018  (build it now: creating a group is collective)
    return state, compressed_hook
