"""Which compressor each parameter gets: the ``compression=`` argument of DistributedOptimizer.

``compression`` is one of

* a :class:`~gradzip.compress.base.Compressor` object, or a spec string (``"dgc:ratio=0.001"``)
  used for every parameter;
* a mapping ``{pattern: compressor or spec}``. A pattern is a glob matched against the whole
  parameter name with :func:`fnmatch.fnmatchcase` (``"*.weight"``, ``"layer?.fc*"``), or a
  regular expression when it starts with ``re:`` (``"re:encoder\\.\\d+\\.attn.*"``, matched
  with :func:`re.fullmatch`). The first pattern that matches, in the mapping's order, wins;
  a parameter no pattern matches is sent dense (``"none"``). A pattern that matches no
  parameter at all is an error (it is almost always a typo).

Whatever was chosen, a tensor with fewer than ``min_compress_numel`` elements (biases, norm
scales) is sent dense: compressing it saves a few bytes and costs a kernel launch and, for
the sparse methods, accuracy (as in Lin et al. 2018, https://arxiv.org/abs/1712.01887).
``"sfb"`` applies to the weights of ``nn.Linear`` layers only; the optimizer sends every other
parameter it was chosen for dense.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Union

from gradzip.compress.base import CompressionError, Compressor, compressor

__all__ = [
    "DEFAULT_MIN_COMPRESS_NUMEL",
    "CompressionArg",
    "Policy",
    "check_dense_steps",
    "make_policy",
]

#: tensors with fewer elements than this are sent dense by default
DEFAULT_MIN_COMPRESS_NUMEL = 1024

CompressionArg = Union[Compressor, str, Mapping[str, Compressor | str]]  # noqa: UP007

DENSE: Compressor = compressor("none")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One ``pattern -> compressor`` entry of a mapping."""

    pattern: str
    compressor: Compressor
    regex: re.Pattern[str] | None

    def matches(self, name: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


def check_dense_steps(dense_steps: object, compressors: Sequence[Compressor] = ()) -> int:
    """``dense_steps`` of the optimizer and the DDP hook: the first steps sent with DENSE.
    ``None`` (the default) takes the most any of ``compressors`` asks for
    (``Compressor.default_dense_steps``: 150 for 1-bit and top-k, 300 for TernGrad, 0 for the
    others)."""
    if dense_steps is None:
        return max((c.default_dense_steps for c in compressors), default=0)
    if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 0:
        raise ValueError(f"dense_steps={dense_steps!r}; expected None or an int >= 0")
    return dense_steps


def _build(value: Compressor | str, where: str) -> Compressor:
    if not isinstance(value, (Compressor, str)):
        raise CompressionError(
            f"{where}: expected a Compressor or a spec string such as 'topk:ratio=0.01', "
            f"got {value!r}"
        )
    try:
        return compressor(value)
    except ValueError as e:
        raise CompressionError(f"{where}: {e}") from None


def _rule(pattern: object, value: Compressor | str) -> Rule:
    if not isinstance(pattern, str) or not pattern:
        raise CompressionError(
            f"compression pattern {pattern!r} must be a non-empty string (a glob, or 're:' "
            "followed by a regular expression)"
        )
    regex = None
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as e:
            raise CompressionError(
                f"compression pattern {pattern!r} is not a valid regular expression: {e}"
            ) from None
    return Rule(pattern, _build(value, f"compression[{pattern!r}]"), regex)


@dataclasses.dataclass(frozen=True)
class Policy:
    """The resolved ``compression=`` argument: rules (or one compressor for all) and the
    small-tensor threshold."""

    rules: tuple[Rule, ...]
    default: Compressor
    min_compress_numel: int

    def choose(self, name: str, numel: int) -> Compressor:
        """The compressor for parameter ``name`` with ``numel`` elements."""
        if numel < self.min_compress_numel:
            return DENSE
        for rule in self.rules:
            if rule.matches(name):
                return rule.compressor
        return self.default

    def check_patterns(self, names: Sequence[str]) -> None:
        """Raise when a pattern matches none of ``names`` (a typo would silently send dense)."""
        for rule in self.rules:
            if not any(rule.matches(n) for n in names):
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise CompressionError(
                    f"compression pattern {rule.pattern!r} matches no parameter; the "
                    f"parameters are named: {shown}"
                )


def make_policy(
    compression: CompressionArg, min_compress_numel: int = DEFAULT_MIN_COMPRESS_NUMEL
) -> Policy:
    """Validate and resolve a ``compression=`` argument (see the module docstring)."""
    if isinstance(min_compress_numel, bool) or not isinstance(min_compress_numel, int):
        raise CompressionError(
            f"min_compress_numel={min_compress_numel!r}; expected an int >= 0 (0 compresses "
            "every tensor)"
        )
    if min_compress_numel < 0:
        raise CompressionError(f"min_compress_numel={min_compress_numel}; expected an int >= 0")
    if isinstance(compression, Mapping):
        rules = tuple(_rule(p, v) for p, v in compression.items())
        return Policy(rules, DENSE, min_compress_numel)
    return Policy((), _build(compression, "compression"), min_compress_numel)
