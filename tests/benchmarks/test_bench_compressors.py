"""Smoke test of ``benchmarks/compressors.py`` on a tiny run: every registered compressor gets
a row with a real compression ratio and finite error figures; the CLI writes its files."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import gradzip
from benchmarks import compressors as bench
from benchmarks.compressors import HEADERS, BenchConfig, BenchResult, run
from benchmarks.measure import bench_specs

TINY = BenchConfig(
    steps=6, batch_size=16, checkpoints=2, repeats=1, train_limit=256, test_limit=200
)
TINY_ARGS = ["--steps", "4", "--batch-size", "16", "--checkpoints", "1", "--repeats", "1",
             "--train-limit", "128", "--test-limit", "100"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny() -> BenchResult:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI does; tiny ops only lose from threading
    try:
        return run(TINY)
    finally:
        torch.set_num_threads(threads)


def test_every_registered_compressor_has_a_row(tiny: BenchResult) -> None:
    labels = [str(row[0]) for row in tiny.rows]
    assert {label.partition(":")[0] for label in labels} == set(gradzip.available())
    assert len(labels) == len(set(labels))
    assert all(len(row) == len(HEADERS) for row in tiny.rows)


def test_ratios_errors_and_times(tiny: BenchResult) -> None:
    col = {h: i for i, h in enumerate(HEADERS)}
    for row in tiny.rows:
        name = str(row[0]).partition(":")[0]
        ratio, error, drift = (float(row[col[h]]) for h in ("ratio", "error", "drift"))
        assert (ratio == 1.0) if name == "none" else (ratio > 1.0), row
        assert math.isfinite(error) and error >= 0, row
        assert math.isfinite(drift) and drift >= 0, row
        for h in ("compress/clone", "decompress/clone"):
            assert math.isfinite(float(row[col[h]])) and float(row[col[h]]) > 0, row
        if name in ("none", "sfb"):  # exact methods
            assert error < 1e-5 and drift < 1e-5, row
        if name == "fp16":
            assert error < 1e-2, row
    assert 0.0 <= tiny.accuracy <= 1.0 and tiny.test_size == 200


def test_render_shows_table_and_accuracy(tiny: BenchResult) -> None:
    text = bench.render(tiny, "python -m benchmarks.compressors --tiny")
    assert "| " + " | ".join(HEADERS) + " |" in text
    assert f"{100 * tiny.accuracy:.2f}%" in text
    assert all(f"| {row[0]} |" in text for row in tiny.rows)


def test_variants_sit_after_their_compressor() -> None:
    specs, _ = bench_specs(("topk:ratio=0.01,error_feedback=False", "nosuch:x=1"))
    names = [s.partition(":")[0] for s in specs]
    assert names == sorted(names, key=names.index)  # rows of one compressor are adjacent
    assert "nosuch" not in names and names[0] == "none"
    if "topk" in gradzip.available():
        _, notes = bench_specs(("topk:ratio=5",))
        assert notes and "ratio" in notes[0]


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="steps"):
        BenchConfig(steps=0)
    with pytest.raises(ValueError, match="checkpoints"):
        BenchConfig(steps=2, checkpoints=3)
    assert BenchConfig(steps=300, checkpoints=3).checkpoint_steps() == [100, 200, 300]


def test_cli_writes_markdown_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*TINY_ARGS, "--compressors", "none;fp16", "--out", str(tmp_path), "--no-readme"]
    assert bench.main(args) == 0
    with (tmp_path / "compressors.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(HEADERS) and [r[0] for r in rows[1:]] == ["none", "fp16"]
    assert float(rows[2][HEADERS.index("ratio")]) == 2.0
    assert "| fp16 |" in (tmp_path / "compressors.md").read_text()
    assert "test accuracy" in capsys.readouterr().out


def test_cli_help_and_bad_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--steps" in out and "--seed" in out and "--readme" in out
    with pytest.raises(SystemExit, match="steps"):
        bench.main(["--steps", "0"])


def test_cli_replaces_the_readme_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench:compressors -->\nold\n<!-- /bench:compressors -->\nend\n")
    args = [
        *TINY_ARGS,
        "--compressors",
        "fp16",
        "--out",
        str(tmp_path),
        "--readme-file",
        str(readme),
    ]
    assert bench.main(args) == 0
    text = readme.read_text()
    assert (
        "old" not in text
        and "| fp16 |" in text
        and text.endswith("<!-- /bench:compressors -->\nend\n")
    )
    assert "compressors.md" in text  # the brief form links the column notes


def test_cli_rejects_unknown_compressor() -> None:
    with pytest.raises(SystemExit, match="unknown compressor 'nosuch'"):
        bench.main([*TINY_ARGS, "--compressors", "nosuch"])


def test_a_failing_compressor_gets_an_na_row_and_exit_code_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradzip.compress.fp16 import FP16

    def broken(self: object, tensor: torch.Tensor, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(FP16, "compress", broken)
    args = [*TINY_ARGS, "--compressors", "none;fp16", "--out", str(tmp_path), "--no-readme"]
    assert bench.main(args) == 1
    text = (tmp_path / "compressors.md").read_text()
    assert "| none | sum | NoMemory | all 8 | 1 |" in text
    assert "| fp16 | sum | NoMemory | all 8 | n/a |" in text
    assert "failed at step 1: RuntimeError: boom" in text
