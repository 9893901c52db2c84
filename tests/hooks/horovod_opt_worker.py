"""One rank of tests/hooks/test_optimizer_horovod.py (``horovodrun --gloo -np 2 python this
OUT``): gradzip.DistributedOptimizer(compression="none") against hvd.DistributedOptimizer on
the same model, data and optimizer; results go to ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from opt_workers import Net, batch, flat, loss_of

import gradzip

STEPS = 5


def digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.numpy().tobytes(), digest_size=8).hexdigest()


def train(wrap: str) -> tuple[torch.Tensor, list[str], str]:
    torch.manual_seed(0)
    model = Net()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if wrap == "horovod":
        opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())
    else:
        opt = gradzip.DistributedOptimizer(
            base, model.named_parameters(), compression=wrap, fusion_bytes=512, dense_steps=0
        )
    digests = []
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, *batch(step, hvd.rank()), use_branch=step % 2 == hvd.rank()).backward()
        opt.step()
        digests.append(digest(flat(model)))
    backend = type(getattr(opt, "backend", None)).__name__
    return flat(model), digests, backend


def main() -> None:
    hvd.init()
    torch.set_num_threads(1)
    ref, _, _ = train("horovod")
    got, _, backend = train("none")
    _, topk_digests, _ = train("topk:ratio=0.1")
    out = {
        "rank": hvd.rank(),
        "size": hvd.size(),
        "backend": backend,
        "equal": bool(torch.equal(got, ref)),
        "max_diff": float((got - ref).abs().max()),
        "topk_digests": topk_digests,
    }
    Path(sys.argv[1], f"rank{hvd.rank()}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
