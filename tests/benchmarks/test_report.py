"""Result tables: markdown cells, CSV, and replacing only the generated block of a README."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.report import markdown_table, replace_block, update_block, write_csv


def test_markdown_table_formats_cells() -> None:
    text = markdown_table(["a", "b"], [["x|y", 1234.5], ["z", math.nan], ["w", 0.000123]])
    lines = text.splitlines()
    assert lines[0] == "| a | b |" and lines[1] == "|---|---|"
    assert lines[2] == "| x\\|y | 1234 |" and lines[3] == "| z | n/a |"
    assert lines[4] == "| w | 1.23e-04 |"
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        markdown_table(["a", "b"], [["only"]])


def test_csv_keeps_full_precision(tmp_path: Path) -> None:
    write_csv(tmp_path / "sub" / "t.csv", ["a"], [[1 / 3]])
    assert (tmp_path / "sub" / "t.csv").read_text().splitlines() == ["a", repr(1 / 3)]


def test_replace_block_touches_only_the_block(tmp_path: Path) -> None:
    text = "intro\n<!-- bench:t -->\nold\n<!-- /bench:t -->\noutro\n"
    new = replace_block(text, "t", "NEW TABLE\n")
    assert new == "intro\n<!-- bench:t -->\nNEW TABLE\n<!-- /bench:t -->\noutro\n"
    assert replace_block(new, "t", "NEW TABLE") == new  # idempotent
    with pytest.raises(ValueError, match="once each"):
        replace_block(text + "<!-- bench:t -->", "t", "x")
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert update_block(readme, "t", "x") is False and readme.read_text() == "no markers\n"
    readme.write_text(text)
    assert update_block(readme, "t", "body") is True and "body" in readme.read_text()
    readme.write_text("<!-- /bench:t --> <!-- bench:t -->")
    with pytest.raises(ValueError, match="in that order"):
        update_block(readme, "t", "x")
