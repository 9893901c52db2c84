"""BucketMemory: memory keyed by DDP bucket index, carried per parameter across rebuilds."""

from __future__ import annotations

import pytest
import torch

from gradzip.compress.base import CompressionError
from gradzip.compress.dgc import DGCMemory
from gradzip.compress.memory import ResidualMemory
from gradzip.hooks.bucket_memory import BucketMemory


def _params(*sizes: int) -> list[torch.Tensor]:
    return [torch.zeros(n) for n in sizes]


def test_dgc_momenta_and_velocities_follow_their_parameters() -> None:
    mem = BucketMemory(DGCMemory(momentum=0.5))
    p1, p2, p3 = _params(4, 3, 2)
    assert not mem.track(0, [p1, p2, p3], 9)
    g = torch.arange(1.0, 10.0)
    v = mem.memory.compensate(0, g)
    mem.memory.update(0, v, torch.zeros(9))  # nothing sent: u = g, v = g
    assert mem.track(0, [p3, p1], 6)  # the rebuild: new bucket 0 = p3, p1; bucket 1 = p2
    assert not mem.track(1, [p2], 3)
    u0, u1 = mem.memory.momenta[0], mem.memory.momenta[1]
    assert torch.equal(u0, torch.cat([g[7:9], g[0:4]])) and torch.equal(u1, g[4:7])
    assert torch.equal(mem.memory.velocities[0], u0)
    assert (mem.rebuilds, mem.resets) == (1, 0)
    assert not mem.track(0, [p3, p1], 6)  # a stable layout changes nothing
    assert mem.rebuilds == 1


def test_new_parameters_start_from_zero_and_sizes_must_match() -> None:
    mem = BucketMemory(ResidualMemory())
    p1, p2 = _params(3, 2)
    mem.track(0, [p1], 3)
    mem.memory.update(0, mem.memory.compensate(0, torch.ones(3)), torch.zeros(3))
    assert mem.track(0, [p2, p1], 5)
    assert torch.equal(mem.memory.residuals[0], torch.tensor([0.0, 0, 1, 1, 1]))
    with pytest.raises(CompressionError, match="bucket 3 holds 7 gradient elements"):
        mem.track(3, [p1], 7)


def test_state_dict_keeps_sizes_not_identities() -> None:
    mem = BucketMemory(ResidualMemory())
    p1, p2 = _params(3, 2)
    mem.track(0, [p1, p2], 5)
    mem.memory.update(0, mem.memory.compensate(0, torch.ones(5)), torch.zeros(5))
    state = mem.state_dict()
    assert state["layouts"] == {0: ((None, 3), (None, 2))}
    fresh = BucketMemory(ResidualMemory())
    fresh.load_state_dict(state)
    assert not fresh.track(0, _params(3, 2), 5)  # same sizes: bound, memory kept
    assert torch.equal(fresh.memory.residuals[0], torch.ones(5))
    other = BucketMemory(ResidualMemory())
    other.load_state_dict(state)
    other.track(0, _params(2, 3), 5)  # other sizes: dropped, counted
    assert other.resets == 1 and 0 not in other.memory.residuals
