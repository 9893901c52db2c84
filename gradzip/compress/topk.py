"""Top-k sparsification (Aji & Heafield 2017, https://arxiv.org/abs/1704.05021).

Only the ``k = ceil(ratio * n)`` entries of largest magnitude are sent, as a pair
``(int32 indices, fp32 values)``: ``k * 8`` bytes on the wire. Error feedback (on by default)
keeps the unsent part and adds it to the next gradient, so nothing is lost, only delayed.

The pure functions :func:`sparsify`, :func:`sparsify_sampled` and :func:`desparsify` are shared
with the sparse allreduce and with DGC; they are the torch reference.

On the CPU, with numba importable and unless ``GRADZIP_NUMBA=0``, :func:`select` (so
:meth:`TopK.compress` and :meth:`DGC.compress`), :func:`desparsify_into` and the fused step
:meth:`TopK.compress_with_feedback` run the kernels of :mod:`gradzip.compress._sparse_numba`:
one pass over memory instead of about a dozen, no sort. Same selection: the exact top-k set
(among equal magnitudes at the cut the lowest indices are kept, where torch.topk keeps any),
or the reference's sampled set from the same draws, ties included. The indices come in
ascending order; the torch path sends them in no particular order. Either is a valid payload
(unique indices, in any order).
"""

from __future__ import annotations

import dataclasses
import decimal
import math
from types import ModuleType
from typing import Any, ClassVar, Literal, NamedTuple, NoReturn

import numpy as np
import torch

from gradzip.compress._numba import numba_kernels
from gradzip.compress.base import (
    CompressionError,
    Compressor,
    Payload,
    Reduction,
    as_float32_flat,
    check_dtype,
    check_parts,
    generator,
    register,
)
from gradzip.compress.memory import Key, Memory, ResidualMemory, check_finite

__all__ = [
    "SparseCtx",
    "TopK",
    "check_ratio",
    "desparsify",
    "desparsify_into",
    "feedback_failed",
    "sample_picks",
    "select",
    "sparse_kernels",
    "sparsify",
    "sparsify_sampled",
    "topk_count",
    "unfused_step",
]

INDEX_LIMIT = 2**31 - 1  # indices travel as int32
SELECTIONS = ("exact", "sampled")
MIN_SAMPLE = 256  # a smaller sample gives too noisy a threshold to be worth it


class SparseCtx(NamedTuple):
    """What stays local for a sparse payload: how to rebuild the dense tensor."""

    shape: torch.Size
    dtype: torch.dtype
    numel: int


def sparse_kernels() -> ModuleType | None:
    """The numba kernels of :mod:`gradzip.compress._sparse_numba`, or None when numba is
    missing or the env sets ``GRADZIP_NUMBA=0``."""
    return numba_kernels("_sparse_numba")


def sample_picks(
    n: int, k: int, selection: str, sample_ratio: float, seed: int
) -> np.ndarray | None:
    """The positions :func:`sparsify_sampled` samples for ``select(..., seed)`` on the CPU
    (the same draws from the same generator), or None where the reference selects exactly."""
    sample_size = max(MIN_SAMPLE, math.ceil(sample_ratio * n))
    if selection == "exact" or k == 0 or k == n or sample_size >= n:
        return None
    picks = torch.randint(n, (sample_size,), generator=generator(seed, "cpu"))
    return picks.numpy()


def check_ratio(value: float, option: str = "ratio", owner: str = "topk") -> None:
    """Raise a ValueError unless ``0 < value <= 1`` (a density, not a sparsity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(
            f"{owner}: {option}={value!r} is not allowed; expected a fraction of the elements "
            "to send, 0 < ratio <= 1 (e.g. 0.01 sends 1%)"
        )


def topk_count(ratio: float, n: int) -> int:
    """``ceil(ratio * n)``, at least 1 when ``n >= 1`` and 0 for an empty tensor.

    The product is taken in decimal, so ``topk_count(0.07, 100)`` is 7, not 8.
    """
    if n <= 0:
        return 0
    k = math.ceil(decimal.Decimal(repr(float(ratio))) * n)
    return min(n, max(1, k))


def _check_flat(flat: torch.Tensor, k: int) -> None:
    if flat.dim() != 1:
        raise CompressionError(f"expected a flat tensor, got shape {tuple(flat.shape)}")
    if not 0 <= k <= flat.numel():
        raise CompressionError(f"k={k} is not allowed for {flat.numel()} elements: 0 <= k <= n")
    if flat.numel() > INDEX_LIMIT:
        raise CompressionError(
            f"tensor has {flat.numel()} elements; int32 indices allow at most {INDEX_LIMIT}"
        )


def sparsify(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` entries of largest magnitude of a flat tensor: ``(int32 indices, fp32 values)``.

    Exact (``torch.topk``). Among equal magnitudes at the cut, which ones are kept is up to
    ``torch.topk``; the indices are unique, in no particular order.
    """
    _check_flat(flat, k)
    flat = flat.to(torch.float32)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    return idx.to(torch.int32), flat[idx]


def _sampled_indices(
    mag: torch.Tensor, k: int, sample_size: int, gen: torch.Generator, rounds: int
) -> torch.Tensor:
    """Indices of entries above a threshold estimated from a sample (int64, at most k)."""
    n = mag.numel()
    picks = torch.randint(n, (sample_size,), generator=gen, device=mag.device)
    ordered = torch.sort(mag[picks], descending=True).values
    rank = math.ceil(k * sample_size / n)
    mask = mag >= ordered[rank - 1]
    for _ in range(rounds - 1):
        if rank == sample_size or int(mask.sum()) >= k:
            break
        rank = min(sample_size, 2 * rank)  # the sample over-estimated: lower the threshold
        mask = mag >= ordered[rank - 1]
    idx = torch.nonzero(mask).squeeze(1)
    if idx.numel() > k:  # too many: the exact top-k of the (few) selected ones
        idx = idx[torch.topk(mag[idx], k, sorted=False).indices]
    return idx


def sparsify_sampled(
    flat: torch.Tensor,
    k: int,
    *,
    sample_ratio: float = 0.01,
    gen: torch.Generator | None = None,
    rounds: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k through a threshold estimated from a random sample (Lin et al. 2018, sec. 3).

    A sample of ``max(256, ceil(sample_ratio * n))`` magnitudes (drawn with replacement from
    ``gen``) gives a threshold: its ``ceil(k * s / n)``-th largest. Every entry at or above it
    is selected; if that is more than ``k``, an exact top-k over the selected ones keeps ``k``.
    If it is fewer, the threshold is lowered (twice the sample rank) up to ``rounds`` times.

    Result: **at most k** entries, and always the largest ones (every selected magnitude is
    >= every unselected one). Whenever the count reaches ``k`` the set is that of
    :func:`sparsify`; fewer than ``k`` happens only when ``rounds`` threshold guesses all
    fall short, which is rare. Tensors no larger than the sample use :func:`sparsify`.
    """
    _check_flat(flat, k)
    n = flat.numel()
    sample_size = max(MIN_SAMPLE, math.ceil(sample_ratio * n))
    if k == 0 or k == n or sample_size >= n:
        return sparsify(flat, k)
    flat = flat.to(torch.float32)
    if gen is None:
        gen = generator(0, flat.device)
    idx = _sampled_indices(flat.abs(), k, sample_size, gen, max(1, rounds))
    return idx.to(torch.int32), flat[idx]


def desparsify(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """A dense fp32 tensor of ``n`` zeros with ``values`` added at ``indices``.

    Repeated indices add up (in an order the device chooses on CUDA); to sum several ranks'
    payloads in rank order, add them one by one with :func:`desparsify_into`.
    """
    out = torch.zeros(n, dtype=torch.float32, device=values.device)
    return desparsify_into(out, indices, values)


def desparsify_into(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[indices] += values`` (flat fp32 ``out``), after checking the payload fits it."""
    if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
        raise CompressionError(
            f"sparse payload needs flat indices and values of one length, got "
            f"{tuple(indices.shape)} and {tuple(values.shape)}"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise CompressionError(f"sparse indices have dtype {indices.dtype}; expected torch.int32")
    n = out.numel()
    kern = sparse_kernels() if out.device.type == "cpu" else None
    if kern is not None and out.dtype == torch.float32 and out.is_contiguous():
        vals = values.detach().to(torch.float32).contiguous().numpy()
        lo, hi = kern.scatter_add(out.view(-1).numpy(), indices.contiguous().numpy(), vals)
        if indices.numel() and (lo < 0 or hi >= n):
            raise CompressionError(
                f"sparse index range [{lo}, {hi}] does not fit a tensor of {n} elements"
            )
        return out
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n:
            raise CompressionError(
                f"sparse index range [{lo}, {hi}] does not fit a tensor of {n} elements"
            )
        out.index_add_(0, indices.long(), values.to(torch.float32))
    return out


def select(
    tensor: torch.Tensor,
    density: float,
    selection: str,
    sample_ratio: float,
    seed: int,
    k: int | None = None,
) -> tuple[Payload, SparseCtx]:
    """The (indices, values) payload of the ``ceil(density * n)`` (or ``k``) largest
    magnitudes of ``tensor``: exact (``torch.topk``) or from a sampled threshold drawn with
    ``seed``."""
    flat = as_float32_flat(tensor)
    if k is None:
        k = topk_count(density, flat.numel())
    kern = sparse_kernels() if flat.device.type == "cpu" else None
    if kern is not None and 0 < k <= flat.numel() <= INDEX_LIMIT:
        arr = flat.detach().contiguous().numpy()
        got = kern.choose(
            arr.size,
            k,
            arr,
            lambda thr, buf: kern.scan(arr, thr, buf),
            lambda p: arr[p],
            sample_picks(arr.size, k, selection, sample_ratio, seed),
        )
        if got is not None:  # NaN/Inf values: the reference decides what they become
            payload = Payload((torch.from_numpy(got[0]), torch.from_numpy(got[1])))
            return payload, SparseCtx(tensor.shape, tensor.dtype, flat.numel())
    if selection == "exact":
        idx, vals = sparsify(flat, k)
    else:
        gen = generator(seed, flat.device)
        idx, vals = sparsify_sampled(flat, k, sample_ratio=sample_ratio, gen=gen)
    return Payload((idx, vals)), SparseCtx(tensor.shape, tensor.dtype, flat.numel())


@register("topk")
@dataclasses.dataclass(frozen=True)
class TopK(Compressor):
    """Top-k sparsification (Aji & Heafield 2017, https://arxiv.org/abs/1704.05021).

    Sends the ``ceil(ratio * n)`` largest magnitudes as ``(int32 indices, fp32 values)``.
    ``selection="exact"`` uses ``torch.topk``; ``"sampled"`` estimates a threshold from a
    random sample first (see :func:`sparsify_sampled`: at most k entries, the largest ones).
    """

    reduction: ClassVar[Reduction] = Reduction.SPARSE
    #: top-k starts after 150 dense steps unless ``dense_steps`` says otherwise: in a
    #: 400-step user-style run (2 ranks, SGD momentum 0.9; ``results/defaults_sim.md``) 1% from
    #: the first step ends 1.75 pp under DDP, after 150 dense steps 0.2 pp (one seed)
    default_dense_steps: ClassVar[int] = 150

    #: fraction of the elements sent, 0 < ratio <= 1
    ratio: float = 0.01
    #: "exact" (torch.topk) or "sampled" (threshold from a sample, then refined)
    selection: Literal["exact", "sampled"] = "exact"
    #: fraction of the elements sampled to estimate the threshold (selection="sampled")
    sample_ratio: float = 0.01
    #: keep the unsent part as a residual and add it to the next gradient
    error_feedback: bool = True

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_ratio(self.sample_ratio, "sample_ratio")
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"topk: selection={self.selection!r} is not allowed; expected one of {SELECTIONS}"
            )
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"topk: error_feedback={self.error_feedback!r}; expected a bool")

    def fixed_payload(self) -> bool:
        """``selection="exact"`` sends exactly ``ceil(ratio * n)`` entries; the sampled
        threshold sends at most that many, so its size varies."""
        return self.selection == "exact"

    def compress(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> tuple[Payload, SparseCtx]:
        return select(tensor, self.ratio, self.selection, self.sample_ratio, seed)

    def decompress(self, payload: Payload, ctx: SparseCtx) -> torch.Tensor:
        check_parts(payload, "topk", [torch.int32, torch.float32])
        return desparsify(payload[0], payload[1], ctx.numel).to(ctx.dtype).view(ctx.shape)

    def fresh_feedback(self, grad: torch.Tensor) -> bool:
        """Whether :meth:`compress_with_feedback` leaves the old residual tensor as it was at no
        extra traffic (``fresh=True``): always. The numba step writes the new one into a
        buffer of its own; the unfused steps elsewhere store a new tensor anyway."""
        return True

    def compress_with_feedback(
        self, memory: Memory, key: Key, grad: torch.Tensor, *, seed: int = 0, fresh: bool = False
    ) -> tuple[Payload, SparseCtx]:
        """``memory.compensate`` + :meth:`compress` + ``memory.update`` in one pass.

        Afterwards ``residual == (old residual + grad) - decompress(payload)`` exactly, as
        with the unfused steps (the payload: :func:`select` of ``residual + grad``, fp32
        ctx). A NaN/Inf gradient raises a CompressionError naming ``key`` and leaves the
        residual as it was. ``fresh``: the new residual goes into another buffer
        (``memory.spare_like``) and the old tensor is left untouched, so a caller holding it
        can put it back. Elsewhere (CUDA, numba off, no residual memory) the three steps run
        one after the other, through the kernel dispatch.
        """
        kern = sparse_kernels() if grad.device.type == "cpu" else None
        if kern is None or not isinstance(memory, ResidualMemory) or not grad.numel():
            return unfused_step(self, memory, key, grad, seed)
        check_dtype(grad, f"gradient {key!r}")
        flat = grad.detach().reshape(-1).to(torch.float32).contiguous()
        residual = memory.residuals.get(key)
        if residual is not None and residual.shape != grad.shape:
            memory.compensate(key, grad)  # raises the shape-mismatch error
        if memory.check and not fresh and kern.probe(flat.numpy()):
            check_finite(key, flat)  # raises before the residual is touched
        n = flat.numel()
        res = flat if residual is None else residual.contiguous().view(-1)
        inplace = residual is not None and not fresh
        target = res if inplace else memory.spare_like(key, res)
        r, g, out = res.numpy(), flat.numpy(), target.numpy()
        has = residual is not None

        def sample(picks: np.ndarray) -> np.ndarray:
            got = np.empty(picks.size, dtype=np.float32)
            kern.sum_sample(r, g, has, picks, got)
            return got

        k = topk_count(self.ratio, n)
        got = kern.choose(
            n,
            k,
            out,
            lambda thr, buf: kern.topk_pass(r, g, out, has, thr, buf),
            sample,
            sample_picks(n, k, self.selection, self.sample_ratio, seed),
            zeroed=True,
        )
        if got is None:
            if not inplace:
                memory.spare[key] = target  # the old residual stays, untouched
            feedback_failed(memory.residuals, key, flat, memory.check, inplace)
        idx, vals = got
        memory.residuals[key] = target.view(grad.shape)
        payload = Payload((torch.from_numpy(idx), torch.from_numpy(vals)))
        return payload, SparseCtx(grad.shape, torch.float32, n)


def unfused_step(
    comp: Compressor, memory: Any, key: Key, grad: torch.Tensor, seed: int
) -> tuple[Payload, SparseCtx]:
    """Compensate, compress and update one after the other (kernels where they apply)."""
    from gradzip.compress import kernels

    compensated = memory.compensate(key, grad)
    payload, ctx = kernels.compress(comp, compensated, seed=seed)
    memory.update(key, compensated, kernels.decompress(comp, payload, ctx))
    return payload, ctx


def feedback_failed(
    state: dict[Key, torch.Tensor], key: Key, grad: torch.Tensor, check: bool, inplace: bool
) -> NoReturn:
    """Raise for a fused step whose compensated values hold NaN/Inf: the gradient's own
    check (naming ``key``) when it is the culprit and ``check`` is on; otherwise the state
    (of ``state``) overflowed, and where the step wrote over it in place it is reset."""
    if check:
        check_finite(key, grad)
    if inplace:
        state.pop(key, None)
    raise CompressionError(
        f"gradient {key!r}: its compensated values hold NaN or Inf; its error-feedback state "
        + ("was reset" if inplace else "is unchanged")
    )
