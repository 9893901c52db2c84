"""``compression="auto"``: the compressor of each bucket, and the strategies, that the cost model
predicts fastest on this link, world size and device; decided once, the same on every rank.

``"auto"`` chooses among ``none``, ``fp16``, ``onebit``, ``qsgd``, ``terngrad`` and ``topk``
(each with its defaults); ``"auto:allow=onebit+topk:ratio=0.001"`` among the ones named
(``+`` between specs; ``none`` is always a candidate, so the choice is never predicted slower
than dense, and a compressor is taken for a bucket only where it is predicted at least
:data:`MARGIN` (15%) faster than dense). DGC needs an optimizer without momentum and SFB
the batch size, so they are chosen only when allowed by name (SFB never: the model does not
cost it).

How: the link is measured on the backend (:func:`~gradzip.plan.calibrate.measure_link`, a
few allgathers: every rank calls the optimizer's constructor at the same point, so this is a
collective like the others), each candidate's work on the parameters' device comes from the
per-machine cache (:func:`~gradzip.plan.calibrate.cached_rates`, measured on first use). The
gradients are laid out in dense buckets as the optimizer would send them; for each sparse
strategy (allgather or recursive doubling) each bucket takes its cheapest candidate, and the
sparse strategy with the cheapest step wins; the GATHER methods take the library's strategy
(:func:`~gradzip.allreduce.select.default_gather`: the allgather, and the two-phase scatter-gather
for error-feedback methods from as many ranks as their ratio on), costed as such. Rank 0's decision
is broadcast, so ranks whose measurements differ still agree. The decision is logged
(logger ``gradzip.auto``, INFO) and kept as :attr:`Decision.report`.

The DDP hook (``ddp_comm_hook("auto")``) sees no model, only DDP's flat buckets, and its state
holds one compressor: it sends its first iteration dense, noting the buckets, then
:func:`resolve_buckets` costs each candidate over all of them (each bucket compressed whole,
as the hook does) and takes one for every bucket (``decide(..., uniform=True)``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence

import torch

from gradzip.allreduce.backend import Backend, control
from gradzip.allreduce.fusion import DEFAULT_FUSION_BYTES, plan_buckets
from gradzip.allreduce.select import default_gather
from gradzip.compress.base import Compressor, Reduction, compressor
from gradzip.hooks.policy import DEFAULT_MIN_COMPRESS_NUMEL
from gradzip.plan.calibrate import cached_rates, measure_link
from gradzip.plan.layout import Tensor, buckets
from gradzip.plan.model import Link, Rates, step_cost

__all__ = [
    "DEFAULT_ALLOW", "Decision", "agree", "decide", "is_auto", "parse_auto", "resolve",
    "resolve_buckets",
]

log = logging.getLogger("gradzip.auto")

#: how much faster than dense a compressor must be predicted for a bucket before auto takes
#: it: the model's median error against measured steps (15.5%,
#: ``benchmarks/results/network_validation.md``), where it under-predicted the compression
#: work of CPU-contended workers; below that the gain is within the model's error
MARGIN = 0.15

#: the candidates of a plain ``"auto"``
DEFAULT_ALLOW = ("none", "fp16", "onebit", "qsgd", "terngrad", "topk")
SPARSE = ("allgather", "recursive")
_MODEL_NAME = {"allgather": "sparse_allgather", "recursive": "recursive"}


def is_auto(compression: object) -> bool:
    """Whether ``compression`` is an ``"auto"`` spec string."""
    return isinstance(compression, str) and compression.strip().split(":", 1)[0] == "auto"


def parse_auto(spec: str) -> tuple[str, ...]:
    """The candidate specs of an ``auto`` spec (``none`` first, always)."""
    name, _, rest = spec.strip().partition(":")
    if name != "auto":
        raise ValueError(f"{spec!r} is not an auto spec")
    allow: tuple[str, ...] = DEFAULT_ALLOW
    if rest.strip():
        key, eq, value = rest.strip().partition("=")
        if key.strip() != "allow" or not eq or not value.strip():
            raise ValueError(
                f"compression={spec!r}: auto takes one option, allow=SPEC+SPEC+... (e.g. "
                "auto:allow=onebit+topk:ratio=0.001)"
            )
        allow = tuple(s.strip() for s in value.split("+"))
        if any(not s for s in allow):
            raise ValueError(f"compression={spec!r}: an empty spec between '+' signs")
    out: list[str] = ["none"]
    for s in allow:
        comp = compressor(s)  # raises, naming a bad spec
        if comp.reduction is Reduction.FACTORS:
            raise ValueError(
                f"compression={spec!r}: {s!r} sends factors whose size depends on the batch; "
                "auto cannot cost it (give sfb by name instead)"
            )
        if comp.spec() not in (compressor(o).spec() for o in out):
            out.append(s)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What auto chose: ``{parameter name: spec}`` and the two strategies (rank 0's choice,
    the same on every rank), and why (``report``: this rank's predictions)."""

    specs: dict[str, str]
    gather: str | None  # None: the library's rule (``select.default_gather``)
    sparse: str
    predicted: float
    dense: float
    report: str

    def policy(self) -> dict[str, str]:
        """The choice as a ``compression=`` mapping (exact-name patterns)."""
        return {f"re:{re.escape(name)}": spec for name, spec in self.specs.items()}


def _strategy(comp: Compressor, sparse: str, world_size: int) -> str:
    if comp.reduction is Reduction.GATHER:
        return default_gather(comp, world_size)
    if comp.reduction is Reduction.SPARSE:
        return _MODEL_NAME[sparse]
    return "dense"


def decide(
    tensors: Sequence[Tensor],
    candidates: Sequence[str],
    link: Link,
    world_size: int,
    rates: dict[str, Rates],
    *,
    min_compress_numel: int = DEFAULT_MIN_COMPRESS_NUMEL,
    fusion_bytes: int = DEFAULT_FUSION_BYTES,
    uniform: bool = False,
) -> Decision:
    """The model's choice (pure: the same inputs give the same choice on every rank).

    ``rates`` maps each candidate spec to its measured work. Ties go to the earlier
    candidate and strategy, so ``none`` wins a tie with any compressor; ``none`` is always
    a candidate. ``uniform``: one compressor for every bucket (the DDP hook's state holds
    one), the one of least summed cost, again only where it is predicted at least
    :data:`MARGIN` faster than dense."""
    if "none" not in candidates:
        candidates = ("none", *candidates)
    dense_buckets = [
        [t for t in tensors if t.name in group]
        for group in _groups(tensors, fusion_bytes)
    ]
    kw = {"min_compress_numel": min_compress_numel, "fusion_bytes": fusion_bytes}
    costs: dict[tuple[int, str, str], float] = {}
    for b, members in enumerate(dense_buckets):
        for spec in candidates:
            laid = buckets(members, spec, **kw)
            for s in SPARSE:
                parts = [(_strategy(c, s, world_size), bk, rates.get(c.spec(), Rates()))
                         for c, bk in laid]
                costs[(b, spec, s)] = step_cost(parts, link, world_size).step
    best: tuple[float, str, list[str]] | None = None
    n = len(dense_buckets)
    for s in SPARSE:
        if uniform:
            summed = {c: sum(costs[(b, c, s)] for b in range(n)) for c in candidates}
            picks = [_cheapest(summed)] * n
        else:
            picks = [_cheapest({c: costs[(b, c, s)] for c in candidates}) for b in range(n)]
        total = sum(costs[(b, spec, s)] for b, spec in enumerate(picks))
        if best is None or total < best[0]:
            best = (total, s, picks)
    assert best is not None
    total, s, picks = best
    dense = sum(costs[(b, "none", SPARSE[0])] for b in range(n))
    specs = {t.name: spec for members, spec in zip(dense_buckets, picks, strict=True)
             for t in members}
    lines = [
        f"gradzip auto: {world_size} ranks, link alpha {link.alpha * 1e6:.1f} us, "
        f"{(1 / link.beta if link.beta else float('inf')) * 8 / 1e6:.0f} Mbit/s; predicted "
        f"communication + compression {total * 1e3:.2f} ms per step against "
        f"{dense * 1e3:.2f} ms dense; sparse={s}, gather by the library's rule (scatter-"
        "gather for error-feedback methods from as many ranks as their ratio on)"
        + ("; one compressor for every bucket" if uniform else ""),
    ]
    for b, (members, spec) in enumerate(zip(dense_buckets, picks, strict=True)):
        ranked = sorted(candidates, key=lambda c: costs[(b, c, s)])
        alts = ", ".join(f"{c} {costs[(b, c, s)] * 1e3:.2f}" for c in ranked[:3])
        names = ", ".join(t.name for t in members[:3]) + (" ..." if len(members) > 3 else "")
        lines.append(f"  bucket {b} [{names}]: {spec} (ms: {alts})")
    return Decision(specs, None, s, total, dense, "\n".join(lines))


def _cheapest(cost: dict[str, float]) -> str:
    """The candidate of least ``cost`` (the first among equals, in candidate order); a
    compressor only where it is predicted at least :data:`MARGIN` faster than ``none``."""
    top = min(cost, key=cost.__getitem__)
    dense = cost.get("none")
    if top != "none" and dense is not None and cost[top] > (1 - MARGIN) * dense:
        return "none"
    return top


def _groups(tensors: Sequence[Tensor], fusion_bytes: int) -> list[set[str]]:
    """The names in each dense bucket, in launch order (reverse registration order)."""
    order = list(tensors)[::-1]
    return [{order[j].name for j in cut} for cut in plan_buckets([t.nbytes for t in order],
                                                                  fusion_bytes)]


def resolve(
    compression: str,
    named: Sequence[tuple[str, torch.Tensor]],
    backend: Backend,
    *,
    min_compress_numel: int = DEFAULT_MIN_COMPRESS_NUMEL,
    fusion_bytes: int = DEFAULT_FUSION_BYTES,
) -> Decision:
    """Measure, decide on rank 0, broadcast: the :class:`Decision` every rank follows."""
    tensors = [Tensor(n, tuple(p.shape), p.dtype) for n, p in named if p.requires_grad]
    device = next((p.device for _, p in named), torch.device("cpu"))
    return agree(compression, tensors, backend, device,
                 min_compress_numel=min_compress_numel, fusion_bytes=fusion_bytes)


def resolve_buckets(
    compression: str, layout: Sequence[tuple[int, int, torch.dtype]], backend: Backend,
    device: torch.device,
) -> Decision:
    """The DDP hook's choice: one compressor for all of DDP's flat buckets (``(index, numel,
    dtype)`` each, as the hook saw them), each bucket compressed whole; measured, decided on
    rank 0 and broadcast like :func:`resolve`. ``specs`` is keyed ``"bucket <index>"``."""
    tensors = [Tensor(f"bucket {i}", (n,), dtype) for i, n, dtype in layout]
    return agree(compression, tensors, backend, device, min_compress_numel=0, fusion_bytes=1,
                 uniform=True)


def agree(
    compression: str,
    tensors: Sequence[Tensor],
    backend: Backend,
    device: torch.device,
    *,
    min_compress_numel: int = DEFAULT_MIN_COMPRESS_NUMEL,
    fusion_bytes: int = DEFAULT_FUSION_BYTES,
    uniform: bool = False,
) -> Decision:
    """Measure the link and the candidates' work, decide (:func:`decide`) and take rank 0's
    decision on every rank (a collective: every rank calls it at the same point)."""
    candidates = parse_auto(compression)
    link = measure_link(backend)
    rates = {compressor(c).spec(): cached_rates(c, device) for c in candidates}
    mine = decide(tensors, candidates, link, backend.size, rates, uniform=uniform,
                  min_compress_numel=min_compress_numel, fusion_bytes=fusion_bytes)
    # rank 0's choice for everyone: candidates by index, strategies by index
    order = [t.name for t in tensors]
    code = [SPARSE.index(mine.sparse)] + [candidates.index(mine.specs[n]) for n in order]
    agreed = backend.broadcast(control(backend, code, torch.int64), root=0).wait()
    got = [int(v) for v in agreed.cpu()]
    decision = dataclasses.replace(
        mine,
        sparse=SPARSE[got[0]],
        specs={n: candidates[k] for n, k in zip(order, got[1:], strict=True)},
    )
    if backend.rank == 0:
        log.info("%s", decision.report)
    return decision
