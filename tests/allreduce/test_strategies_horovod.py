"""The strategy, sparse and fusion tests of the gloo suite, on Horovod (``horovodrun --gloo``).

One ``horovodrun`` job per world size (2 and 4 ranks) runs, on a
:class:`~gradzip.allreduce.horovod.HorovodBackend`, the same batteries the gloo tests fork
(tests/allreduce/horovod_strategies_worker.py): every compressor x strategy over three steps
with error feedback, the sparse allreduce at five densities, 200 tensors through fusion, SFB
factors, and ranks that disagree on a bucket. Each rank saves what they returned; the checks
here are the gloo tests' own functions (``test_strategies``, ``test_sparse``,
``test_fusion``), called on the Horovod results, so both engines are held to the same
single-process references, with nothing copied.

Horovod is built by ``make horovod``: when it is missing these tests fail, they do not skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import test_fusion
import test_sparse
import test_strategies
import torch
from test_horovod import VENV_BIN, require_horovod

import gradzip

pytestmark = [pytest.mark.horovod, pytest.mark.slow]

WORKER = Path(__file__).with_name("horovod_strategies_worker.py")
WORLDS = (2, 4)


def launch(np: int, out: Path) -> subprocess.Popen[str]:
    """Start ``horovodrun --gloo -np np`` on the worker, writing into ``out``."""
    horovodrun = require_horovod()
    env = dict(
        os.environ,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    cmd = [str(horovodrun), "--gloo", "-np", str(np), "-H", f"localhost:{np}"]
    cmd += ["--gloo-timeout-seconds", "60", sys.executable, str(WORKER), str(out)]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def collect(np: int, proc: subprocess.Popen[str], out: Path) -> list[dict[str, Any]]:
    """Wait for the job; every rank's record, in rank order."""
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"horovodrun -np {np} ran past 240 s\n{output[-6000:]}")
    assert proc.returncode == 0, (
        f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n"  # type: ignore[arg-type]
        f"--- output tail ---\n{output[-6000:]}"
    )
    records = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(np)]
    assert [(rec["rank"], rec["size"]) for rec in records] == [(r, np) for r in range(np)]
    return records


@pytest.fixture(scope="module")
def jobs() -> dict[int, list[dict[str, Any]]]:
    """Both jobs, one after the other: run together, their 6 ranks and Horovod's background
    threads contend for the cores and the pair takes longer (74 s against 58 s here)."""
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for np in WORLDS:
            out = Path(tmp, f"np{np}")
            out.mkdir()
            records[np] = collect(np, launch(np, out), out)
    return records


def section(jobs: dict[int, list[dict[str, Any]]], world: int, name: str) -> list[Any]:
    """What section ``name`` returned on each rank; a failure with the traceback if it raised."""
    failed = [
        (r, rec["errors"][name]) for r, rec in enumerate(jobs[world]) if name in rec["errors"]
    ]
    if failed:
        pytest.fail(
            f"section {name!r} raised under horovodrun -np {world}:\n"
            + "\n".join(f"--- rank {r} ---\n{trace}" for r, trace in failed)
        )
    return [rec["results"][name] for rec in jobs[world]]


def sections(jobs: dict[int, list[dict[str, Any]]], name: str) -> dict[int, list[Any]]:
    return {world: section(jobs, world, name) for world in WORLDS}


def test_registered_compressors_are_all_covered() -> None:
    """Every registered compressor is run: by a strategy, or by its factor path (SFB)."""
    covered = set(test_strategies.compressors()) | {"sfb"}
    assert set(gradzip.available()) <= covered
    assert gradzip.compressor("sfb").reduction is gradzip.Reduction.FACTORS


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(("name", "how"), test_strategies.CASES)
def test_matches_single_process_reference(jobs: Any, world: int, name: str, how: str) -> None:
    """Ranks agree bit for bit and match the reference (scatter_gather: the two-phase
    simulation with worker + server error feedback), as under gloo."""
    runs = {world: section(jobs, world, "strategies")}
    test_strategies.test_matches_single_process_reference(runs, world, name, how)


def test_none_is_exact(jobs: Any) -> None:
    test_strategies.test_none_is_exact(sections(jobs, "strategies"))


def test_scatter_gather_bytes_do_not_grow_with_world_size(jobs: Any) -> None:
    """Horovod's counters (its allgather is two collectives: sizes, then data) still show
    allgather growing with the world and scatter_gather staying under 2·n/ratio."""
    test_strategies.test_scatter_gather_bytes_do_not_grow_with_world_size(
        sections(jobs, "strategies")
    )


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("density", test_sparse.DENSITIES)
def test_sparse_equals_dense_allreduce(jobs: Any, world: int, density: float) -> None:
    runs = {world: section(jobs, world, "sparse")}
    test_sparse.test_sparse_equals_dense_allreduce(runs, world, density)


@pytest.mark.parametrize("world", WORLDS)
def test_sparse_goes_dense_when_dense_is_cheaper(jobs: Any, world: int) -> None:
    runs = {world: section(jobs, world, "sparse")}
    test_sparse.test_chooses_dense_at_high_density(runs, world)
    test_sparse.test_sparse_sends_less_than_dense_when_sparse(runs, world)


def test_sparse_repeated_indices_add(jobs: Any) -> None:
    for world, ranks in sections(jobs, "sparse").items():
        for got in (rank["repeated"] for rank in ranks):
            assert got[3] == 2 * world and got[5] == world and got.sum() == 3 * world


def test_fusion_makes_a_handful_of_collectives(jobs: Any) -> None:
    """200 tensors, 4 ranks: few collectives per step, results equal the per-tensor ones."""
    fused = section(jobs, 4, "fusion")
    test_fusion.test_200_tensors_take_a_handful_of_collectives(fused)
    test_fusion.test_fused_results_equal_per_tensor_reference(fused)
    test_fusion.test_sfb_factors_rebuild_the_summed_gradient(fused)


@pytest.mark.parametrize("world", WORLDS)
def test_sfb_factors_rebuild_the_summed_gradient(jobs: Any, world: int) -> None:
    """``test_fusion._sfb`` on every rank: the mean of ``dY_r^T X_r`` over ranks, exactly."""
    expect = torch.zeros(5, 6)
    for r in range(world):
        gen = torch.Generator().manual_seed(r)  # the draws of test_fusion._sfb on rank r
        x = torch.randint(-3, 4, (2 + r, 6), generator=gen).float()
        dy = torch.randint(-3, 4, (2 + r, 5), generator=gen).float()
        expect += dy.t() @ x
    for got in section(jobs, world, "sfb"):
        assert torch.equal(got, expect / world)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("size", r"'fc\.weight' with numel=(10|12) .*'fc\.weight' with numel=(12|10)"),
        (
            "compressor",
            r"fc\.weight.*(allgather test_sign.*allreduce fp16|allreduce fp16.*"
            r"allgather test_sign)",
        ),
    ],
)
def test_disagreeing_ranks_fail_naming_key_and_values(
    jobs: Any, world: int, what: str, pattern: str
) -> None:
    """Every rank raises CompressionError naming the key and both values, within seconds
    (not the 30 s collective timeout)."""
    for got in section(jobs, world, f"mismatch_{what}"):
        assert got["kind"] == "CompressionError", got
        assert re.search(pattern, got["message"]), got["message"]
        assert got["seconds"] < 10, got
