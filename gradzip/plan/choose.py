"""Every compressor and strategy costed on one layout, link and world size; the fastest one.

:func:`predict` gives one :class:`Option` per (compressor, strategy) pair the user allows:
the step the model predicts (:func:`~gradzip.plan.model.step_cost`), its parts, the payload
bytes of one rank and the speedup over sending everything dense. :func:`best` picks the
fastest; ties go to the earlier option, so every rank given the same inputs picks the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from gradzip.compress.base import Reduction, compressor
from gradzip.plan.layout import Tensor, buckets, payload_size, strategies_for
from gradzip.plan.model import Bucket, Link, Rates, StepCost, dense_allreduce, step_cost

__all__ = ["DEFAULT_METHODS", "Option", "best", "predict", "predict_pipeline"]

#: what the plan compares unless told otherwise: dense, the casts, and each method's default
DEFAULT_METHODS = ("none", "fp16", "onebit", "qsgd", "terngrad", "topk", "dgc")


@dataclasses.dataclass(frozen=True)
class Option:
    """One (compressor, strategy) pair as predicted: ``spec`` as the user wrote it, ``cost``
    of the step, ``speedup`` over ``none`` (dense allreduce) on the same inputs, ``ratio`` of
    dense to payload bytes (tensors kept dense included)."""

    spec: str
    strategy: str
    cost: StepCost
    speedup: float
    ratio: float


def predict(
    tensors: Sequence[Tensor],
    link: Link,
    world_size: int,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    rates: Callable[[str], Rates] | None = None,
    compute: float = 0.0,
    backward: float = 0.0,
    overlap: float = 0.0,
    min_compress_numel: int | None = None,
) -> list[Option]:
    """One option per method and strategy, in the order of ``methods``. ``rates(spec)``
    gives a compressor's measured work (None: free); tensors below ``min_compress_numel``
    stay dense as in the optimizer, and cost as dense buckets."""
    get = rates or (lambda spec: Rates())
    kw = {} if min_compress_numel is None else {"min_compress_numel": min_compress_numel}
    options: list[Option] = []
    dense_bytes = sum(t.nbytes for t in tensors)
    base = step_cost(
        [("dense", b, get(c.spec())) for c, b in buckets(tensors, "none", **kw)],
        link, world_size, compute=compute, backward=backward, overlap=overlap,
    )
    for spec in methods:
        comp = compressor(spec)
        laid = buckets(tensors, comp.spec(), **kw)
        for strategy in strategies_for(comp):
            parts = [
                (strategy if c.spec() == comp.spec() else strategies_for(c)[0], b, get(c.spec()))
                for c, b in laid
            ]
            cost = step_cost(
                parts, link, world_size, compute=compute, backward=backward, overlap=overlap
            )
            speedup = base.step / cost.step if cost.step > 0 else 1.0
            ratio = dense_bytes / cost.payload_bytes if cost.payload_bytes else float("inf")
            options.append(Option(spec, strategy, cost, speedup, ratio))
    return options


def best(options: Sequence[Option]) -> Option:
    """The option with the shortest predicted step (the first among equals)."""
    if not options:
        raise ValueError("no options to choose from")
    return min(options, key=lambda o: o.cost.step)


#: the model's name of each strategy of :mod:`gradzip.allreduce`, by (strategy, reduction)
_STRATEGY = {
    ("allreduce", Reduction.SUM): "dense",
    ("allgather", Reduction.GATHER): "allgather",
    ("allgather", Reduction.SPARSE): "sparse_allgather",
    ("scatter_gather", Reduction.GATHER): "scatter_gather",
    ("ternary_sum", Reduction.GATHER): "ternary_sum",
    ("sparse", Reduction.SPARSE): "recursive",
}


def predict_pipeline(
    pipeline: Any,
    link: Link,
    *,
    rates: Callable[[str], Rates] | None = None,
    compute: float = 0.0,
    backward: float = 0.0,
    overlap: float = 0.0,
) -> StepCost:
    """The predicted step of a built optimizer's pipeline (``opt._gz`` after its first
    backward): its own buckets, compressors and strategies, each tensor's payload measured
    as in :func:`~gradzip.plan.layout.payload_size`, and the step's flags allreduce."""
    get = rates or (lambda spec: Rates())
    if pipeline.buckets is None:
        raise ValueError("the pipeline has no buckets yet: predict after the first backward")
    parts = []
    for group in pipeline.buckets:
        slots = [pipeline.slots[i] for i in group]
        comp = slots[0].compressor
        strategy = pipeline.streams[slots[0].stream].strategy.name
        name = _STRATEGY.get((strategy, comp.reduction))
        if name is None:
            raise ValueError(f"the model does not cost strategy {strategy!r} of {comp.spec()!r}")
        sizes = [payload_size(comp.spec(), tuple(s.param.shape), s.param.dtype) for s in slots]
        bucket = Bucket(
            dense=sum(s.param.numel() * s.param.element_size() for s in slots),
            numel=sum(s.param.numel() for s in slots),
            tensors=len(slots),
            payload=sum(b for b, _ in sizes),
            fixed=comp.fixed_payload() or comp.reduction is Reduction.SUM,
            nnz=sum(n for _, n in sizes),
            feedback=comp.error_feedback,
        )
        parts.append((name, bucket, get(comp.spec())))
    # the step's flags (which parameters were used, which buckets held a NaN/Inf): one small
    # blocking allreduce of int32s every step
    p = pipeline.backend.size
    flags = dense_allreduce(link, p, 4 * (len(pipeline.slots) + len(pipeline.buckets)))
    return step_cost(parts, link, p, compute=compute, backward=backward, overlap=overlap,
                     control=flags)
