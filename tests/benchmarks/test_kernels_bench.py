"""benchmarks/kernels.py: the table it writes, and how it checks issue 5's GPU targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import kernels as bench


def test_cpu_run_writes_every_compressor_and_ef_step(tmp_path: Path) -> None:
    out = tmp_path / "k"
    specs = "onebit,topk:ratio=0.01,dgc:ratio=0.01"
    bench.main(["--min-log2", "10", "--max-log2", "11", "--repeat", "1", "--compressors", specs,
                "--out", str(out)])  # fmt: skip
    text = out.with_suffix(".md").read_text()
    for label in ("onebit", "onebit EF step", "topk:ratio=0.01", "dgc:ratio=0.01 EF step"):
        assert text.count(f"| {label:<24} | torch  |") == 2, label  # one row per size
    assert "the GPU targets are not checked" in text  # no kernel rows on a CPU
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 5
    # payload bytes are the real ones: onebit at 2**10 = 128 sign bytes + 2 fp32 scales
    assert "| 2**10 | onebit                   | torch  |" in text
    assert any(r.startswith("1024,onebit,torch,") and r.endswith(",136") for r in rows)


def _row(n: int, spec: str, path: str, compress_ms: float, traffic: float) -> dict[str, object]:
    return {"n": n, "compressor": spec, "path": path, "compress_ms": compress_ms,
            "compress_x_traffic": traffic}  # fmt: skip


@pytest.mark.parametrize(
    "kernel_ms, traffic, expect",
    [(0.1, 1.5, ["met", "met"]), (0.5, 1.5, ["met", "MISSED"]), (0.1, 2.5, ["MISSED", "met"])],
)
def test_targets(kernel_ms: float, traffic: float, expect: list[str]) -> None:
    n = 1 << 24
    rows = [_row(n, "onebit", "torch", 1.0, 40.0), _row(n, "onebit", "kernel", kernel_ms, traffic)]
    (line,) = bench.targets(rows)
    assert line.startswith("2**24 onebit:")
    found = [part.rsplit("(", 1)[1].rstrip(")") for part in line.split(";")]
    assert found == expect
