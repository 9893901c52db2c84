"""benchmarks/step_waits.py: the collectives a step waits on, counted and timed."""

import socket

import pytest

from benchmarks.step_waits import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rows(out: str) -> dict[str, list[float]]:
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


@pytest.mark.parametrize("blocking", [False, True])
def test_a_compressed_step_waits_on_its_collectives_and_the_bare_step_on_none(
    capsys: pytest.CaptureFixture[str], blocking: bool
) -> None:
    args = ["--workers", "2", "--steps", "5", "--port", str(_free_port()),
            "--methods", "plain", "onebit"] + ([] if blocking else ["ddp"])
    assert main(args + (["--blocking"] if blocking else [])) == 0
    rows = _rows(capsys.readouterr().out)
    # step, / plain, collectives waited, waiting ms, launching ms, rest ms, CPU ms (main
    # thread, other threads)
    assert rows["plain"][2:5] == [0, 0, 0]  # no gradzip: nothing launched, nothing waited on
    assert all(len(r) == 8 and r[6] > 0 and r[7] >= 0 for r in rows.values())
    if not blocking:  # torch's DDP: its allreduce runs outside gradzip's backend
        assert rows["ddp"][0] > 0 and rows["ddp"][2:5] == [0, 0, 0]
    # 1-bit on the CNN: its allgather, the small tensors' dense allreduce, the step's flags
    assert rows["onebit"][2] == 3
    assert rows["onebit"][4] > 0
    if blocking:  # each collective is done where it is launched: its wait returns at once
        assert rows["onebit"][3] < rows["onebit"][4]
    else:
        assert rows["onebit"][3] > 0
