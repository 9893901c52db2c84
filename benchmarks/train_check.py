"""The users' path on one device: the optimizer and the DDP hook, every compressor, AMP.

What ``scripts/gpu_check.sh`` runs first on a GPU (and the tests run on the CPU, where CUDA
stands in as the CPU and NCCL is left out). Three parts, each a few training steps of a small
MLP whose tensors live on ``--device``:

* **one-rank NCCL** (CUDA only; NCCL allows one rank per GPU): the optimizer and the DDP hook
  with every compressor over a 1-rank ``nccl`` group must give, bit for bit, what the same run
  gives over a :class:`~gradzip.allreduce.backend.LocalBackend` (a world of one) — that is, the
  control tensors and payloads reached NCCL on the right device and came back unchanged;
* **two gloo ranks** (spawned processes, tensors on ``--device``, buffers moved through the
  CPU by gloo's backend): every compressor, replicas identical after every step, finite
  parameters, the loss lower at the end;
* **fp16 AMP**: ``torch.autocast(device, float16)`` + ``GradScaler`` at its default scale on the
  two gloo ranks, an Inf injected on rank 1 at step 3: no exception, every rank skips that
  step (parameters unchanged, the same scales), the error-feedback state unchanged by it, and
  replicas identical.

Writes ``train_check.json`` and ``train_check.md`` (one row per check) under ``--out`` and exits
1 when a check fails::

    python -m benchmarks.train_check --device cuda --out /tmp/gpu
    python -m benchmarks.train_check --device cpu --out /tmp/cpu --specs none,onebit
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SPECS", "main"]

#: every compressor (and the strategies that differ), as users spell them
SPECS = [
    "none",
    "fp16",
    "bf16",
    "onebit",
    "onebit@scatter_gather",
    "qsgd",
    "terngrad",
    "topk:ratio=0.05",
    "topk:ratio=0.05@recursive",
    "dgc:ratio=0.05",  # no set_epoch(): its final ratio from the first step
    "sfb",
]
STEPS, BAD, BAD_RANK = 6, 3, 1


def _split(label: str) -> tuple[str, dict[str, str]]:
    """``"onebit@scatter_gather"`` -> ("onebit", {"gather": "scatter_gather"})."""
    spec, _, strategy = label.partition("@")
    if not strategy:
        return spec, {}
    return spec, ({"sparse": strategy} if strategy == "recursive" else {"gather": strategy})


def _model(device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    ).to(device)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()


def _copy(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_copy(v) for v in state]
    return state


def _train(
    backend: Any, label: str, device: torch.device, *, hook: bool, amp: bool
) -> dict[str, Any]:
    """A few steps of the user's loop; what each step did."""
    import gradzip
    from gradzip.hooks.ddp import DDPHookState, compressed_hook

    spec, kw = _split(label)
    model = _model(device)
    momentum = 0.0 if spec.startswith("dgc") else 0.9
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    forward: Any = model
    if hook:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=0.01
        )
        state = DDPHookState(spec, backend=backend, optimizer=base, **{"dense_steps": 0, **kw})  # type: ignore[arg-type]
        ddp.register_comm_hook(state, compressed_hook)
        opt: Any = base
        forward = ddp

        def snap() -> Any:
            return {"memory": state.memory.state_dict(), "strategy": state.strategy.state_dict()}
    else:
        opt = gradzip.DistributedOptimizer(
            base, model.named_parameters(), compression=spec, backend=backend, model=model,
            min_compress_numel=0, fusion_bytes=8192, **kw,
            dense_steps=0,
        )  # fmt: skip

        def snap() -> Any:
            s = opt.state_dict()["gradzip"]
            return {"memories": s["memories"], "strategies": s["strategies"]}

    step = [0]

    def inject(g: torch.Tensor) -> torch.Tensor:
        if amp and backend.rank == BAD_RANK and step[0] == BAD:
            g = g.clone()
            g[0, 0] = float("inf")
        return g

    model[0].weight.register_hook(inject)
    scaler = torch.amp.GradScaler(device.type) if amp else None
    gen = torch.Generator().manual_seed(10 + backend.rank)
    out: dict[str, Any] = {"params": [], "scales": [], "skipped": [], "losses": []}
    for s in range(STEPS):
        step[0] = s
        x = torch.randn(16, 32, generator=gen).to(device)
        y = torch.randint(0, 5, (16,), generator=gen).to(device)
        before, state_before = _flat(model), _copy(snap())
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = nn.functional.cross_entropy(forward(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            out["scales"].append(scaler.get_scale())
        else:
            loss.backward()
            opt.step()
        out["losses"].append(float(loss.detach()))
        out["params"].append(_flat(model))
        out["skipped"].append(torch.equal(before, _flat(model)))
        if amp and s == BAD:
            out["state_kept"] = _equal(state_before, _copy(snap()))
    return out


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_equal, a, b))
    return bool(a == b)


def _rank(rank: int, size: int, store: str, device_type: str, specs: list[str], queue: Any) -> None:
    """One spawned gloo rank: every spec, optimizer and hook, plain and AMP."""
    import torch.distributed as dist

    from gradzip.allreduce.torch_dist import TorchDistBackend

    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    try:
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        timeout = datetime.timedelta(seconds=60)
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=size, timeout=timeout
        )
        backend = TorchDistBackend(timeout=timeout)
        for label in specs:
            for hook in (False, True):
                if hook and label.startswith("sfb"):
                    continue  # SFB needs the optimizer's layer hooks
                for amp in (False, True):
                    key = f"{'hook' if hook else 'opt'}|{label}|{'amp' if amp else 'fp32'}"
                    try:
                        results[key] = _train(backend, label, device, hook=hook, amp=amp)
                    except Exception:
                        results[key] = {"error": traceback.format_exc(limit=4)}
        dist.destroy_process_group()
    except Exception:
        results["setup"] = {"error": traceback.format_exc(limit=4)}
    queue.put(pickle.dumps((rank, results)))  # bytes: tensors must outlive this process


def _gloo(device: torch.device, specs: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every spec on two spawned gloo ranks; ``{key: [rank 0 result, rank 1 result]}``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_rank, args=(r, 2, store, device.type, specs, queue))
            for r in range(2)
        ]
        for p in procs:
            p.start()
        got = dict(pickle.loads(queue.get(timeout=900)) for _ in procs)
        for p in procs:
            p.join(timeout=30)
    return {k: [got[0][k], got[1].get(k, {"error": "missing on rank 1"})] for k in got[0]}


def _nccl(specs: list[str]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Every spec over a 1-rank NCCL group and over a LocalBackend on the same GPU."""
    import torch.distributed as dist

    from gradzip.allreduce.backend import LocalBackend
    from gradzip.allreduce.torch_dist import TorchDistBackend

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        nccl = TorchDistBackend()
        for label in specs:
            for hook in (False, True):
                if hook and label.startswith("sfb"):
                    continue
                key = f"{'hook' if hook else 'opt'}|{label}|fp32"
                try:
                    out[key] = (
                        _train(nccl, label, device, hook=hook, amp=False),
                        _train(LocalBackend(device), label, device, hook=hook, amp=False),
                    )
                except Exception:
                    out[key] = ({"error": traceback.format_exc(limit=4)}, {})
        dist.destroy_process_group()
    return out


def _verdicts(gloo: dict[str, Any], nccl: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for key, (a, b) in nccl.items():
        where, label, _ = key.split("|")
        if "error" in a:
            rows.append(
                {
                    "part": "nccl 1 rank",
                    "path": where,
                    "spec": label,
                    "ok": "FAIL",
                    "detail": a["error"],
                }
            )
            continue
        same = all(map(torch.equal, a["params"], b["params"]))
        finite = bool(torch.isfinite(a["params"][-1]).all())
        detail = f"equal to LocalBackend: {same}; finite: {finite}"
        verdict = "ok" if same and finite else "FAIL"
        rows.append(
            {"part": "nccl 1 rank", "path": where, "spec": label, "ok": verdict, "detail": detail}
        )
    for key, (r0, r1) in gloo.items():
        where, label, mode = key.split("|")
        part = "gloo 2 ranks" + (", fp16 AMP" if mode == "amp" else "")
        err = r0.get("error") or r1.get("error")
        if err:
            rows.append({"part": part, "path": where, "spec": label, "ok": "FAIL", "detail": err})
            continue
        same = all(map(torch.equal, r0["params"], r1["params"]))
        checks = {
            "replicas identical": same,
            "finite": bool(torch.isfinite(r0["params"][-1]).all()),
        }
        if mode == "amp":
            checks["step 3 skipped on both"] = r0["skipped"][BAD] and r1["skipped"][BAD]
            checks["same scales"] = r0["scales"] == r1["scales"]
            checks["feedback state kept"] = bool(r0.get("state_kept") and r1.get("state_kept"))
            checks["trained"] = not all(r0["skipped"])
        else:
            checks["loss fell"] = r0["losses"][-1] < r0["losses"][0]
        ok = all(checks.values())
        detail = "; ".join(f"{k}: {v}" for k, v in checks.items())
        rows.append(
            {
                "part": part,
                "path": where,
                "spec": label,
                "ok": "ok" if ok else "FAIL",
                "detail": detail,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"]
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/gradzip-train-check"))
    parser.add_argument(
        "--specs", default=",".join(SPECS), help="comma-separated labels (spec[@strategy])"
    )
    args = parser.parse_args(argv)
    specs = [s for s in args.specs.split(",") if s]
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    start = time.monotonic()
    gloo = _gloo(device, specs)  # spawned first: the parent has not touched CUDA yet
    nccl = _nccl(specs) if device.type == "cuda" else {}
    rows = _verdicts(gloo, nccl)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_check.json").write_text(json.dumps(rows, indent=1))
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    lines = [
        f"Training checks on {name} (torch {torch.__version__}), `python -m "
        f"benchmarks.train_check --device {args.device}`, {time.monotonic() - start:.0f} s.",
        "",
        "| part | path | compressor | result | what was checked |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        detail = r["detail"].strip().replace("\n", " ").replace("|", "/")[-300:]
        lines.append(f"| {r['part']} | {r['path']} | `{r['spec']}` | {r['ok']} | {detail} |")
    failed = [r for r in rows if r["ok"] != "ok"]
    lines += ["", f"{len(rows) - len(failed)} of {len(rows)} checks passed."]
    (args.out / "train_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
