"""benchmarks/step_waits.py: the collectives a step waits on, counted and timed."""

import pytest

from benchmarks.step_waits import main


def test_a_compressed_step_waits_on_its_collectives_and_the_bare_step_on_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--workers", "2", "--steps", "5", "--port", "29623",
                 "--methods", "plain", "onebit"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert float(rows["plain"][3]) == 0  # no gradzip: nothing waited on
    # 1-bit on the CNN: its allgather, the small tensors' dense allreduce, the step's flags
    assert float(rows["onebit"][3]) == 3
    assert float(rows["onebit"][4].rstrip(" |")) > 0
