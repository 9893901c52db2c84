"""Result tables of the benchmarks: markdown, CSV, and the generated blocks of README.md.

A generated block in a markdown file lies between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; :func:`update_block` replaces what is between them and nothing else.
"""

from __future__ import annotations

import csv
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["machine_line", "markdown_table", "replace_block", "update_block", "write_csv"]

Cell = str | int | float


def _cell(value: Cell) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 0.01:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """A GitHub markdown table; floats get 3 significant digits, NaN prints as ``n/a``."""
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, the table has {len(headers)} columns")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
    """Write the rows with full precision (``repr`` of floats); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(rows)


def _markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"block name {name!r} may hold only letters, digits, '_', '.', '-'")
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the part between the markers of block ``name`` replaced by ``body``.

    Raises ValueError when the markers are missing, repeated or out of order.
    """
    start, end = _markers(name)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0:
        raise ValueError(f"markers {start} ... {end} not found")
    if text.count(start) != 1 or text.count(end) != 1 or j < i:
        raise ValueError(f"markers {start} ... {end} must appear once each, in that order")
    return text[: i + len(start)] + "\n" + body.rstrip("\n") + "\n" + text[j:]


def update_block(path: str | Path, name: str, body: str) -> bool:
    """Replace block ``name`` in the file at ``path``; False (file untouched) without markers."""
    path = Path(path)
    text = path.read_text()
    try:
        new = replace_block(text, name, body)
    except ValueError:
        if _markers(name)[0] in text or _markers(name)[1] in text:
            raise
        return False
    if new != text:
        path.write_text(new)
    return True


def machine_line() -> str:
    """Where a result was measured: CPU, cores, torch version and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
