"""P data-parallel ranks simulated in one process, to explore compressor settings quickly.

``python -m benchmarks.ef_sim --method onebit --dense 150 --localmom 1 --seed 0`` trains the
task of :mod:`benchmarks.accuracy_tasks` (default: the Fashion-MNIST CNN, 1500 steps, batch 32
per rank, SGD lr 0.05 with cosine decay, momentum 0.9, the same batches as ``--full``) with P
simulated ranks: each computes the gradient of its share of the global batch and keeps its own
error-feedback memory; the compressed gradients are decompressed and averaged (the allgather
strategy's arithmetic). ``--dense N``: the first N steps dense; ``--minnumel``: tensors under
that many elements dense; ``--localmom 1``: momentum correction (each rank compresses its own
SGD velocity, the optimizer has none); ``--dgcwarm N``: DGC's 4 warm-up epochs over N steps.
Prints one JSON line: the final test metric and the ratio over the whole run. No
communication is measured; the distributed benchmarks (:mod:`benchmarks.accuracy`) are the
real thing. Results of the runs behind the defaults: ``benchmarks/results/defaults_sim.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

import gradzip
from benchmarks.accuracy_tasks import load_task
from benchmarks.training import batches
from gradzip.compress.memory import ResidualMemory


def _scatter_gather(
    c: Any, server: Any, mems: list[list[Any]], server_mem: ResidualMemory, name: str,
    grads: list[list[torch.Tensor]], i: int,
) -> tuple[torch.Tensor, int]:
    """The scatter-gather strategy's arithmetic for parameter ``i``: each rank splits its
    compensated gradient into P chunks and compresses each (its residual: what the chunks
    lost); chunk j's sum over ranks gets server j's residual, is compressed by ``server`` and
    decompressed by all. Returns the averaged gradient and rank 0's bytes (both phases'
    payloads, as the backend counters count what is handed to the collectives)."""
    p = len(grads)
    shape = grads[0][i].shape
    total = torch.zeros(grads[0][i].numel())
    nbytes = 0
    for r in range(p):
        m = mems[r][i]
        compensated = m.compensate(name, grads[r][i]).reshape(-1)
        outs = []
        for j, chunk in enumerate(torch.tensor_split(compensated, p)):
            payload, ctx = c.compress(chunk.contiguous(), seed=r * 1000 + j)
            outs.append(c.decompress(payload, ctx).reshape(-1))
            nbytes += payload.nbytes if r == 0 else 0
        got = torch.cat(outs)
        m.update(name, compensated.view(shape), got.view(shape))
        total += got
    parts = []
    for j, chunk in enumerate(torch.tensor_split(total, p)):
        key = f"{name}/{j}"
        comp = server_mem.compensate(key, chunk.contiguous())
        payload, ctx = server.compress(comp, seed=j)
        out = server.decompress(payload, ctx).reshape(-1)
        server_mem.update(key, comp, out)
        parts.append(out)
        nbytes += payload.nbytes if j == 0 else 0
    return (torch.cat(parts) / p).view(shape), nbytes


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ef_sim", description=__doc__)
    p.add_argument("--task", default="cnn")
    p.add_argument("--method", default="none")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--P", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--mom", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", type=int, default=0)
    p.add_argument("--minnumel", type=int, default=0)
    p.add_argument("--localmom", type=int, default=0)
    p.add_argument("--dgcwarm", type=int, default=0)
    p.add_argument("--sg", default="", help="scatter-gather; the server's compressor spec")
    a = p.parse_args()
    torch.set_num_threads(1)
    task = load_task(a.task)
    torch.manual_seed(a.seed)
    model = task.make_model()
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    comp: Any = gradzip.compressor(a.method)
    dgc = a.method.startswith("dgc")
    own_momentum = dgc or bool(a.localmom)
    opt = torch.optim.SGD(params, lr=a.lr, momentum=0.0 if own_momentum else a.mom)
    mems = [[comp.make_memory() for _ in params] for _ in range(a.P)]
    server: Any = gradzip.compressor(a.sg) if a.sg else None
    server_mem = ResidualMemory()
    velocity: list[list[torch.Tensor | None]] = [[None] * len(params) for _ in range(a.P)]
    stream = batches(task.examples, a.bs * a.P, torch.Generator().manual_seed(a.seed))
    sent = dense_bytes = 0
    start = time.time()
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        c = comp
        if dgc and a.dgcwarm and step < a.dgcwarm:
            c = comp.at_epoch(step * 4 / a.dgcwarm)
        idx = next(stream)
        grads: list[list[Any]] = []
        for r in range(a.P):
            model.zero_grad()
            task.loss(model, idx[r * a.bs : (r + 1) * a.bs]).backward()
            grads.append([q.grad.clone() for q in params])  # type: ignore[union-attr]
        for i, q in enumerate(params):
            dense_bytes += q.numel() * 4
            if a.localmom:
                for r in range(a.P):
                    u = velocity[r][i]
                    u = grads[r][i].clone() if u is None else u.mul_(a.mom).add_(grads[r][i])
                    velocity[r][i] = grads[r][i] = u
            if step < a.dense or q.numel() < a.minnumel or a.method == "none":
                q.grad = sum(g[i] for g in grads) / a.P
                sent += q.numel() * 4
                continue
            if server is not None:
                q.grad, nbytes = _scatter_gather(c, server, mems, server_mem, names[i], grads, i)
                sent += nbytes
                continue
            acc = torch.zeros_like(q)
            for r in range(a.P):
                m = mems[r][i]
                if hasattr(c, "compress_with_feedback") and c.error_feedback:
                    payload, ctx = c.compress_with_feedback(m, names[i], grads[r][i])
                else:
                    compensated = m.compensate(names[i], grads[r][i])
                    payload, ctx = c.compress(compensated, seed=step * 1000 + r)
                    m.update(names[i], compensated, c.decompress(payload, ctx))
                acc += c.decompress(payload, ctx)
                if r == 0:
                    sent += payload.nbytes
            q.grad = acc / a.P
        opt.step()
    total, count = task.metric(model, 0, 1, None)
    print(json.dumps({
        "method": a.method, "seed": a.seed, "dense": a.dense, "minnumel": a.minnumel,
        "localmom": a.localmom, "dgcwarm": a.dgcwarm, "metric": total / count,
        "ratio_whole_run": dense_bytes / sent, "s": round(time.time() - start),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
