"""The validation table is compiled from the network runs' files, figures unchanged."""

from pathlib import Path

from benchmarks import network_validation

HEAD = "method,step ms,predicted ms,model error %\n"


def _run(folder: Path, rows: str, command: str) -> Path:
    folder.mkdir()
    (folder / "network.md").write_text(f"# x\n\nCommand: `{command}`\n")
    (folder / "network.csv").write_text(HEAD + rows)
    return folder


def test_errors_and_the_auto_verdict(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", "none,100,110,10\nonebit,50,40,-20\nauto,52,41,-21\n"
             "ddp-fp16,60,n/a,n/a\n", "python -m benchmarks.network --workers 2 --out /tmp/x")
    # a peer faster than every gradzip choice is not "the best fixed gradzip choice"
    b = _run(tmp_path / "b", "none,100,101,1\ntopk,40,42,5\nauto,70,45,-35.7\n"
             "ddp-powersgd,30,n/a,n/a\n", "python -m benchmarks.network --workers 3")
    text = network_validation.render([network_validation.load(a), network_validation.load(b)])
    assert "| a (`--workers 2`) | onebit | 50.0 | 40.0 | -20.0 |" in text
    assert "| a (`--workers 2`) | ddp-fp16 | 60.0 | n/a | n/a |" in text
    assert "3 of 6 predictions within 15%" in text
    # run a: auto 52 against the best fixed 50 (within 10%); run b: 70 against 40 (not)
    assert "| a | onebit | 50.0 | 52.0 | 1.04 | 0.52 | yes |" in text
    assert "| b | topk | 40.0 | 70.0 | 1.75 | 0.70 | no |" in text
