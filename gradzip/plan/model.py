"""The cost of one training step under each compressor and strategy: an alpha-beta-gamma model.

A message of ``m`` bytes between two ranks costs ``alpha + m * beta`` (latency, then the
link's time per byte); summing ``m`` bytes elementwise costs ``m * gamma``. From these, the
collectives gradzip runs cost, per rank, with ``P`` ranks (the textbook bounds: Thakur,
Rabenseifner and Gropp 2005, https://doi.org/10.1177/1094342005051521; Chan et al. 2007):

* ring allreduce of ``m`` bytes (reduce-scatter, then allgather, ``P - 1`` steps each):
  ``2 (P-1) alpha + 2 (P-1)/P m beta + (P-1)/P m gamma``;
* recursive halving and doubling (Rabenseifner): ``2 log2 P alpha`` and the same bytes;
  a world size that is not a power of two pays two extra steps of ``alpha + m beta``;
* binomial tree (reduce then broadcast): ``2 ceil(log2 P) (alpha + m beta) + ceil(log2 P) m
  gamma``;
* ring allgather of ``c`` bytes per rank: ``(P-1) alpha + (P-1) c beta`` (every rank
  receives every other rank's payload);
* alltoall of ``c`` bytes per rank, ``c / P`` to each peer: ``(P-1) alpha + (P-1)/P c beta``.

The dense allreduce an engine runs is modelled as the cheapest of ring, halving-doubling and
tree (NCCL and gloo switch algorithm by size); gradzip's compressed strategies are costed as
they run (:mod:`gradzip.allreduce`): an allgather of every rank's payload, with one small
allgather of sizes first where the payload's size is not fixed by the layout; the two-phase
scatter-gather (an alltoall of chunks, the server's re-compression, an allgather of the
reduced chunks); TernGrad's ternary sum (one allreduce of int8 values); recursive doubling of
sparse vectors that turns dense (:func:`gradzip.allreduce.sparse.sparse_rounds_cost`).
Compression work comes from measured rates (:class:`Rates`): seconds per call plus seconds per
dense byte to compress, and per payload to decompress on the receive side.

A step is ``compute + sum over buckets of (compress + decompress) + max(0, comm - overlap *
backward)``: the work on the CPU or GPU serialises with the step, the collectives run beside
backward for the fraction ``overlap`` of it (0: none, the conservative default).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = [
    "Bucket",
    "Link",
    "Rates",
    "StepCost",
    "allgather",
    "alltoall",
    "dense_allreduce",
    "halving_doubling_allreduce",
    "ring_allreduce",
    "sparse_recursive",
    "step_cost",
    "strategy_cost",
    "tree_allreduce",
]


@dataclasses.dataclass(frozen=True)
class Link:
    """The network between ranks: ``alpha`` seconds per message, ``beta`` seconds per byte
    (1 / bandwidth), ``gamma`` seconds per byte of an elementwise fp32 sum. ``reduce_beta``:
    the seconds per scheduled byte the engine's allreduce achieves, where it was measured
    apart (an engine's allreduce and allgather need not reach the same rate on one link);
    None: ``beta``."""

    alpha: float
    beta: float
    gamma: float = 0.0
    reduce_beta: float | None = None

    @property
    def rbeta(self) -> float:
        """``beta`` of the allreduce formulas."""
        return self.beta if self.reduce_beta is None else self.reduce_beta

    def __post_init__(self) -> None:
        names = ["alpha", "beta", "gamma"] + ([] if self.reduce_beta is None else ["reduce_beta"])
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"Link {name}={value!r}: expected a finite number >= 0")

    @classmethod
    def of(cls, bandwidth: float, latency: float, gamma: float = 0.0) -> Link:
        """A link of ``bandwidth`` bytes per second and ``latency`` seconds per message."""
        if not (isinstance(bandwidth, int | float) and math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth={bandwidth!r}: expected bytes per second > 0")
        return cls(float(latency), 1.0 / float(bandwidth), float(gamma))


def _check_world(p: int) -> None:
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"world size {p!r}: expected an integer >= 1")


def _log2_ceil(p: int) -> int:
    return (p - 1).bit_length()


def ring_allreduce(link: Link, p: int, m: float) -> float:
    """Seconds of a ring allreduce of ``m`` bytes over ``p`` ranks (0 for one rank)."""
    _check_world(p)
    if p == 1 or m <= 0:
        return 0.0
    share = (p - 1) / p * m
    return 2 * (p - 1) * link.alpha + 2 * share * link.rbeta + share * link.gamma


def halving_doubling_allreduce(link: Link, p: int, m: float) -> float:
    """Seconds of Rabenseifner's allreduce (recursive halving reduce-scatter, recursive
    doubling allgather) of ``m`` bytes; a world size that is not a power of two first folds
    its extra ranks in and hands them the result at the end (two more ``alpha + m beta``)."""
    _check_world(p)
    if p == 1 or m <= 0:
        return 0.0
    p2 = 1 << (p.bit_length() - 1)
    share = (p2 - 1) / p2 * m
    t = 2 * (p2.bit_length() - 1) * link.alpha + 2 * share * link.rbeta + share * link.gamma
    if p2 < p:
        t += 2 * (link.alpha + m * link.rbeta) + m * link.gamma
    return t


def tree_allreduce(link: Link, p: int, m: float) -> float:
    """Seconds of a binomial-tree reduce followed by a broadcast of ``m`` bytes."""
    _check_world(p)
    if p == 1 or m <= 0:
        return 0.0
    depth = _log2_ceil(p)
    return 2 * depth * (link.alpha + m * link.rbeta) + depth * m * link.gamma


def dense_allreduce(link: Link, p: int, m: float) -> float:
    """The engine's allreduce of ``m`` bytes: the cheapest of ring, halving-doubling, tree."""
    return min(
        ring_allreduce(link, p, m),
        halving_doubling_allreduce(link, p, m),
        tree_allreduce(link, p, m),
    )


def allgather(link: Link, p: int, c: float) -> float:
    """Seconds of a ring allgather of ``c`` bytes from every rank."""
    _check_world(p)
    if p == 1:
        return 0.0
    return (p - 1) * (link.alpha + c * link.beta)


def alltoall(link: Link, p: int, c: float) -> float:
    """Seconds of an alltoall in which every rank sends ``c / p`` bytes to every other."""
    _check_world(p)
    if p == 1:
        return 0.0
    return (p - 1) * (link.alpha + c / p * link.beta)


def sparse_recursive(link: Link, p: int, nnz: float, n: int) -> float:
    """Seconds of recursive doubling of sparse vectors of ``nnz`` (int32 index, fp32 value)
    pairs out of ``n`` (worst case: no index shared), each message capped at the dense
    ``4 n`` bytes; the ranks go dense at once (one agreement allreduce, then a dense
    allreduce) when that is cheaper in bytes, as :func:`~gradzip.allreduce.sparse.
    sparse_allreduce` decides."""
    _check_world(p)
    if p == 1:
        return 0.0
    agree = dense_allreduce(link, p, 8)
    p2 = 1 << (p.bit_length() - 1)
    rounds = (p2.bit_length() - 1) + (2 if p2 < p else 0)
    sent, count, t = 0.0, float(nnz), 0.0
    for _ in range(rounds):
        size = min(8 * count, 4 * n)
        sent += size
        t += link.alpha + size * link.beta
        count = min(2 * count, n)
    if sent >= 2 * (p - 1) * n * 4 // p:
        return agree + dense_allreduce(link, p, 4 * n)
    return agree + t


@dataclasses.dataclass(frozen=True)
class Rates:
    """Measured compression work of one method on one device: seconds per call plus seconds
    per byte, to compress (per dense input byte) and to decompress (per dense output byte,
    per received payload). All zero: free (what a plan without measurements assumes)."""

    compress_call: float = 0.0
    compress_byte: float = 0.0
    decompress_call: float = 0.0
    decompress_byte: float = 0.0

    def compress(self, dense_bytes: float) -> float:
        return self.compress_call + dense_bytes * self.compress_byte

    def decompress(self, dense_bytes: float, payloads: int = 1) -> float:
        return payloads * (self.decompress_call + dense_bytes * self.decompress_byte)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One bucket as the model sees it: its dense bytes, elements and tensors, and the bytes
    one rank's payloads of it take on the wire (``payload``), whether that size is fixed by the
    layout (no size exchange needed) and, for sparse methods, the values sent per rank."""

    dense: int
    numel: int
    tensors: int = 1
    payload: int = 0
    fixed: bool = True
    nnz: int = 0
    feedback: bool = False  # the method keeps error feedback (residuals on worker and server)


def strategy_cost(
    strategy: str, link: Link, p: int, bucket: Bucket, rates: Rates = Rates()
) -> tuple[float, float]:
    """(seconds of work on the device, seconds of communication) of one bucket under
    ``strategy``: ``dense`` (the engine's allreduce of the payload, e.g. fp16 casts),
    ``allgather``, ``scatter_gather``, ``ternary_sum``, ``sparse_allgather`` or ``recursive``.
    """
    _check_world(p)
    b = bucket
    calls = b.tensors
    work = rates.compress(b.dense) + (calls - 1) * rates.compress_call
    if strategy == "dense":
        return work, dense_allreduce(link, p, b.payload)
    exchange = 0.0 if b.fixed else allgather(link, p, 4 * (1 + b.tensors))
    recv = p * (calls * rates.decompress_call + b.dense * rates.decompress_byte)
    if strategy in ("allgather", "sparse_allgather"):
        return work + recv, exchange + allgather(link, p, b.payload)
    if strategy == "scatter_gather":
        # chunks: each rank compresses its whole bucket in P pieces (and, with feedback,
        # decompresses them for its residual), serves one chunk (P payloads in, one
        # re-compression, and its decompression for the server's residual), then
        # decompresses the P reduced chunks
        chunk = calls * rates.decompress_call + b.dense / p * rates.decompress_byte
        work = p * calls * rates.compress_call + b.dense * rates.compress_byte
        if b.feedback:
            work += p * chunk
        serve = p * chunk + calls * rates.compress_call + b.dense / p * rates.compress_byte
        if b.feedback:
            serve += chunk
        back = p * chunk
        comm = alltoall(link, p, b.payload) + allgather(link, p, b.payload / p)
        return work + serve + back, exchange + comm
    if strategy == "ternary_sum":
        wire = 1 if p <= 127 else 2
        return work + calls * rates.decompress_call, dense_allreduce(link, p, wire * b.numel)
    if strategy == "recursive":
        return work + recv, sparse_recursive(link, p, b.nnz, b.numel)
    raise ValueError(
        f"strategy {strategy!r}: expected dense, allgather, scatter_gather, ternary_sum, "
        "sparse_allgather or recursive"
    )


@dataclasses.dataclass(frozen=True)
class StepCost:
    """A predicted step: its parts in seconds, and the payload bytes of one rank (what its
    compressors produce; the bytes a strategy moves follow from them and ``P``)."""

    compute: float
    work: float
    comm: float
    step: float
    payload_bytes: float


def step_cost(
    buckets: Sequence[tuple[str, Bucket, Rates]],
    link: Link,
    p: int,
    *,
    compute: float = 0.0,
    backward: float = 0.0,
    overlap: float = 0.0,
    control: float = 0.0,
) -> StepCost:
    """One step: ``compute`` (forward + backward, seconds) plus every bucket's work, plus the
    communication not hidden behind ``overlap`` of the ``backward`` seconds (see the module
    docstring). ``buckets``: (strategy, bucket, rates) each; ``control``: seconds of the
    step's own small collectives (gradzip's flags allreduce), never hidden."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap={overlap!r}: expected a fraction in [0, 1]")
    work = payload = 0.0
    comm = control
    for strategy, bucket, rates in buckets:
        w, c = strategy_cost(strategy, link, p, bucket, rates)
        work += w
        comm += c
        payload += bucket.payload
    hidden = min(comm - control, overlap * backward)
    return StepCost(compute, work, comm, compute + work + comm - hidden, payload)
