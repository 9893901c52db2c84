"""The contracts of the compression layer: Payload, ctx, Compressor, Reduction, the registry.

A compressor is a pure transform ``tensor -> (Payload, ctx)`` and back. The Payload is what
crosses the network and nothing else; the ctx is what stays local. See ``shared/DESIGN.md``.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import hashlib
import types
import typing
from typing import Any, ClassVar, NamedTuple, TypeVar, Union

import torch

__all__ = [
    "CompressionError",
    "Compressor",
    "DenseCtx",
    "Payload",
    "Reduction",
    "as_float32_flat",
    "available",
    "check_dtype",
    "check_parts",
    "compressor",
    "derive_seed",
    "generator",
    "register",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CompressionError(ValueError):
    """Bad input or configuration; the message names the tensor/option and what was expected."""


class Reduction(enum.Enum):
    """How payloads of different ranks combine; selects the allreduce strategy."""

    SUM = "sum"  # payloads add elementwise (casts)
    GATHER = "gather"  # not addable: gather, decompress each, sum (1-bit, QSGD, TernGrad)
    SPARSE = "sparse"  # (int32 indices, values): top-k, DGC
    FACTORS = "factors"  # per-sample factors of a Linear layer (SFB)


@dataclasses.dataclass(frozen=True)
class Payload:
    """What crosses the network: a tuple of flat, contiguous tensors.

    ``nbytes`` is the exact number of bytes handed to a collective.
    """

    tensors: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        for i, t in enumerate(self.tensors):
            if t.dim() != 1 or not t.is_contiguous():
                raise CompressionError(
                    f"payload part {i} must be flat and contiguous, got shape {tuple(t.shape)}"
                )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tensors[i]

    def __iter__(self) -> typing.Iterator[torch.Tensor]:
        return iter(self.tensors)

    def layout(self) -> tuple[tuple[torch.dtype, int], ...]:
        """(dtype, numel) of each part: enough to cut a flat byte buffer back into parts."""
        return tuple((t.dtype, t.numel()) for t in self.tensors)

    def to_bytes(self) -> torch.Tensor:
        """All parts as one flat uint8 tensor (the unit a fused collective sends)."""
        if not self.tensors:
            return torch.empty(0, dtype=torch.uint8)
        return torch.cat([t.view(torch.uint8) for t in self.tensors])

    @staticmethod
    def from_bytes(buf: torch.Tensor, layout: tuple[tuple[torch.dtype, int], ...]) -> Payload:
        """Inverse of :meth:`to_bytes` for a known layout (views into ``buf``; a part that is
        not aligned to its element size is copied)."""
        expected = sum(n * torch.empty(0, dtype=d).element_size() for d, n in layout)
        if buf.dtype != torch.uint8 or buf.numel() != expected:
            raise CompressionError(
                f"payload buffer has {buf.numel()} bytes of {buf.dtype}, layout needs "
                f"{expected} bytes of torch.uint8"
            )
        parts, offset = [], 0
        for dtype, numel in layout:
            size = numel * torch.empty(0, dtype=dtype).element_size()
            chunk = buf[offset : offset + size]
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if chunk.storage_offset() % itemsize:
                chunk = chunk.clone()  # a view needs the part aligned to its element size
            empty = torch.empty(0, dtype=dtype, device=buf.device)
            parts.append(chunk.view(dtype) if size else empty)
            offset += size
        return Payload(tuple(parts))


class DenseCtx(NamedTuple):
    """The local context every compressor needs at least: how to rebuild the tensor."""

    shape: torch.Size
    dtype: torch.dtype


def derive_seed(seed: int, step: int = 0, key: str | int = 0, rank: int = 0) -> int:
    """A 63-bit seed from (seed, step, key, rank), stable across processes and runs.

    Python's ``hash`` of a str changes per process, so a digest is used instead.
    """
    text = f"{seed}/{step}/{key}/{rank}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator for stochastic rounding: never the global RNG."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def check_parts(
    payload: Payload,
    what: str,
    dtypes: typing.Sequence[torch.dtype],
    numels: typing.Sequence[int | None] | None = None,
) -> None:
    """Raise a CompressionError unless ``payload`` has one part per entry of ``dtypes``, of
    that dtype (and of ``numels[i]`` elements where that is not None): a payload that does not
    fit its ctx is refused, never decoded into a wrong tensor."""
    if not isinstance(payload, Payload):
        raise CompressionError(f"{what}: expected a Payload, got {type(payload).__name__}")
    if len(payload) != len(dtypes):
        raise CompressionError(
            f"{what} payload has {len(payload)} parts; expected {len(dtypes)} "
            f"({', '.join(str(d).split('.')[-1] for d in dtypes)})"
        )
    for i, (part, dtype) in enumerate(zip(payload.tensors, dtypes, strict=True)):
        if part.dtype != dtype:
            raise CompressionError(
                f"{what} payload part {i} has dtype {part.dtype}; expected {dtype}"
            )
        want = None if numels is None else numels[i]
        if want is not None and part.numel() != want:
            raise CompressionError(
                f"{what} payload part {i} has {part.numel()} elements; its ctx needs {want}"
            )


def check_dtype(tensor: torch.Tensor, name: str = "tensor") -> None:
    """Raise a CompressionError unless ``tensor`` is a dense fp32, fp16 or bf16 tensor with
    values (not sparse, not on the meta device)."""
    if tensor.layout is not torch.strided:
        raise CompressionError(
            f"{name} has layout {tensor.layout}; compressors take dense tensors (call "
            ".to_dense() first, or keep sparse gradients out of the compressed parameters)"
        )
    if tensor.device.type == "meta":
        raise CompressionError(f"{name} is on the meta device: it has a shape but no values")
    if tensor.dtype not in FLOAT_DTYPES:
        raise CompressionError(
            f"{name} has dtype {tensor.dtype}; expected one of float32, float16, bfloat16"
        )


def as_float32_flat(tensor: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """Validate dtype and return a flat fp32 view/copy (copies only when it must)."""
    check_dtype(tensor, name)
    return tensor.reshape(-1).to(torch.float32)


class Compressor(abc.ABC):
    """A pure tensor -> payload transform. Subclasses are frozen dataclasses of their options.

    ``compress(tensor, *, seed)`` returns ``(Payload, ctx)``; ``decompress(payload, ctx)``
    returns a tensor of the input's shape and dtype. No hidden state, no global RNG.
    """

    name: ClassVar[str] = ""
    reduction: ClassVar[Reduction]
    #: error feedback (residual memory) is used with this compressor
    error_feedback: bool = False
    #: the steps sent dense before this method starts when the user leaves ``dense_steps``
    #: to its default (``None``); see each method's docstring for why it asks for them
    default_dense_steps: ClassVar[int] = 0
    #: the memory holds the momentum the optimizer runs without (DGC): dense steps must still
    #: go through it (``compensate``, the whole result sent, ``update`` with all of it), or
    #: they would train without momentum
    carries_momentum: ClassVar[bool] = False

    @abc.abstractmethod
    def compress(
        self, tensor: torch.Tensor, *, seed: int = 0, shared: torch.Tensor | None = None
    ) -> tuple[Payload, Any]:
        """Compress ``tensor``; ``shared`` is a value all ranks agreed on (see ``shared_stat``)."""

    @abc.abstractmethod
    def decompress(self, payload: Payload, ctx: Any) -> torch.Tensor:
        """Rebuild a tensor of the original shape and dtype from ``payload``."""

    def shared_stat(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """A scalar that ranks must MAX-reduce before ``compress`` (TernGrad's scaler); or None."""
        return None

    def gather_shares_stat(self) -> bool:
        """Whether a gather (every rank's payload travels as it is, its own scaler with it)
        MAX-reduces ``shared_stat`` first all the same; strategies that add the payloads up
        (TernGrad's ternary sum) always do."""
        return True

    def fixed_payload(self) -> bool:
        """Whether the payload's layout follows from the tensor's shape and dtype alone (then
        every rank's payload of one bucket has the same size, and a gather needs no size
        exchange first). False unless a method says otherwise."""
        return False

    def make_memory(self) -> Any:
        """The memory this method needs: residuals for error feedback, or none."""
        from gradzip.compress.memory import NoMemory, ResidualMemory

        return ResidualMemory() if self.error_feedback else NoMemory()

    def spec(self) -> str:
        """The string form that :func:`compressor` parses back into an equal object."""
        if not dataclasses.is_dataclass(self):
            return self.name
        opts = ",".join(
            f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if f.init
        )
        return f"{self.name}:{opts}" if opts else self.name


_C = TypeVar("_C", bound=type[Compressor])
_REGISTRY: dict[str, type[Compressor]] = {}


def register(name: str) -> typing.Callable[[_C], _C]:
    """Class decorator: make a compressor buildable as ``compressor(name, **options)``."""

    def deco(cls: _C) -> _C:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"compressor name {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Names of all registered compressors."""
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    import gradzip.compress  # noqa: F401  (importing the package registers the built-ins)


def _convert(value: str, annotation: Any, option: str, name: str) -> Any:
    """Convert a string option from a spec to the field's annotated type."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() == "none":
            return None
        annotation = args[0]
    if origin is typing.Literal:
        return value
    try:
        if annotation is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int:
            return int(value)
        if annotation is float:
            return float(value)
    except ValueError:
        raise ValueError(
            f"option {option}={value!r} of compressor {name!r} is not a valid "
            f"{getattr(annotation, '__name__', annotation)}"
        ) from None
    return value


def compressor(spec: str | Compressor, **options: Any) -> Compressor:
    """Build a compressor: ``compressor("topk", ratio=0.01)`` == ``compressor("topk:ratio=0.01")``.

    An unknown name or option raises ValueError listing the valid ones.
    """
    if isinstance(spec, Compressor):
        if options:
            raise ValueError("options can only be given with a compressor name, not an object")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"compression must be a name, a spec string or a Compressor, got {spec!r}")
    _load_builtin()
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; valid names: {', '.join(available())}")
    cls = _REGISTRY[name]
    fields: dict[str, dataclasses.Field[Any]] = {}
    if dataclasses.is_dataclass(cls):
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls) if fields else {}
    parsed: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"option {item!r} in spec {spec!r} must be written key=value")
        if key not in fields:
            raise ValueError(
                f"unknown option {key!r} for compressor {name!r}; valid options: "
                f"{', '.join(fields) or '(none)'}"
            )
        parsed[key] = _convert(value.strip(), hints[key], key, name)
    for key in options:
        if key not in fields:
            raise ValueError(
                f"unknown option {key!r} for compressor {name!r}; valid options: "
                f"{', '.join(fields) or '(none)'}"
            )
    parsed.update(options)
    return cls(**parsed)
