"""Compile every Triton kernel of gradzip for a CUDA GPU, on a machine without one.

The kernel tests run under Triton's interpreter, which never compiles a kernel: a kernel can
pass them and still fail to lower to PTX (an op the backend does not support, a type clash the
interpreter tolerates, a block too large for the register file). Triton's wheel carries the
whole CUDA lowering, ``ptxas`` included, so a kernel can be compiled to a cubin for a given
architecture with no GPU and no driver. This check does that for every launch gradzip makes:

1. *record* (a subprocess with ``TRITON_INTERPRET=1``): every compressor runs its kernel entry
   points (compress, decompress, receive-side sum, fused error-feedback step, shared scaler)
   over fp32/fp16/bf16 inputs and each layout, with the block sizes a GPU gets, and every
   launch is recorded: the kernel, the types of its arguments, its constexprs and options;
2. *compile* (a subprocess without the interpreter): each distinct launch is compiled by
   ``triton.compile`` for ``GPUTarget("cuda", ARCH, 32)`` down to a cubin, and ``cuobjdump``
   reads its registers per thread, local-memory spill bytes and static shared memory.

It proves the kernels lower to machine code for that GPU and shows their resource use; it does
not run them, so it says nothing about their speed (that is ``benchmarks/kernels.py`` on a GPU).

    python -m benchmarks.kernels_compile [--arch 90 --arch 80] [--out benchmarks/results/NAME]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

_TENSOR_TYPES = {
    "torch.float32": "fp32",
    "torch.float16": "fp16",
    "torch.bfloat16": "bf16",
    "torch.uint8": "u8",
    "torch.int8": "i8",
    "torch.int16": "i16",
    "torch.int32": "i32",
    "torch.int64": "i64",
    "torch.bool": "i1",
}
_KERNEL_MODULES = ("onebit", "qsgd", "terngrad", "topk", "dgc")


def _arg_type(value: Any) -> str:
    """Triton's signature type of one runtime argument (as its JIT would specialise it)."""
    if hasattr(value, "dtype") and hasattr(value, "data_ptr"):
        return "*" + _TENSOR_TYPES[str(value.dtype)]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return "i32"
        return "i64" if value < 2**63 else "u64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


# ---------------------------------------------------------------------------------------------
# phase 1: record the launches (interpreter)


def _workloads() -> None:
    """Run every kernel entry point once per configuration (dtypes, layouts, options)."""
    import torch

    import gradzip
    from gradzip.compress import kernels
    from gradzip.compress.dgc import DGC
    from gradzip.compress.memory import ResidualMemory
    from gradzip.compress.onebit import OneBit
    from gradzip.compress.qsgd import QSGD
    from gradzip.compress.terngrad import TernGrad
    from gradzip.compress.topk import TopK

    gen = torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def data(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(dtype)

    def round_trip(comp: gradzip.Compressor, x: torch.Tensor, **kw: Any) -> None:
        pairs = [kernels.compress(comp, x, seed=s, **kw) for s in range(2)]
        kernels.decompress(comp, *pairs[0])
        kernels.decompress_sum(comp, [p for p, _ in pairs], [c for _, c in pairs], scale=0.5)

    for dtype in dtypes:
        for comp, shape in ((OneBit(), (3000,)), (OneBit(min_rows=1), (40, 33))):
            round_trip(comp, data(shape, dtype))
            mem = ResidualMemory()
            for _ in range(2):  # the first step has no residual, the second adds into it
                kernels.feedback_step(comp, mem, "w", data(shape, dtype))
        for comp in (QSGD(), QSGD(levels=1, bucket_size=7, norm="max"), QSGD(levels=127)):
            round_trip(comp, data((3000,), dtype))
        for comp in (TernGrad(), TernGrad(clip=None), TernGrad(packing="base3")):
            x = data((3000,), dtype)
            shared = kernels.shared_stat(comp, x)
            round_trip(comp, x, shared=shared)
            round_trip(comp, x)
        for comp in (TopK(ratio=0.01), TopK(ratio=0.01, selection="sampled")):
            round_trip(comp, data((3000,), dtype))
        for comp in (DGC(ratio=0.01), DGC(ratio=0.01, clip_norm=2.0, epoch=1.0)):
            mem = comp.make_memory()
            for _ in range(2):
                kernels.feedback_step(comp, mem, "w", data((3000,), dtype))


def _record(path: Path) -> None:
    """Run :func:`_workloads` with every launch recorded into ``path`` (JSON)."""
    import inspect

    from triton.runtime import interpreter

    from gradzip.compress.kernels import dispatch

    for name in _KERNEL_MODULES:  # the GPU's block sizes, not the interpreter's larger ones
        module = importlib.import_module(f"gradzip.compress.kernels.{name}")
        module.block_size = lambda n, block: block  # type: ignore[attr-defined]
    launches: dict[str, dict[str, Any]] = {}
    original = interpreter.InterpretedFunction.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        fn = self.fn
        params = list(inspect.signature(fn).parameters)
        bound = dict(zip(params, args, strict=False))
        options = {k: v for k, v in kwargs.items() if k not in params and k not in ("grid",)}
        bound.update({k: v for k, v in kwargs.items() if k in params})
        constexprs = {k: bound[k] for k in params if _is_constexpr(fn, k)}
        signature = {k: "constexpr" if k in constexprs else _arg_type(bound[k]) for k in params}
        entry = {
            "module": fn.__module__,
            "kernel": fn.__name__,
            "signature": signature,
            "constexprs": constexprs,
            "options": options,
        }
        launches[json.dumps(entry, sort_keys=True)] = entry
        return original(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run  # type: ignore[method-assign]
    os.environ[dispatch.ENV] = "interpret"
    _workloads()
    path.write_text(json.dumps(sorted(launches.values(), key=_key), indent=1))


def _is_constexpr(fn: Any, name: str) -> bool:
    annotation = fn.__annotations__.get(name)
    return annotation is not None and "constexpr" in str(annotation)


def _key(entry: dict[str, Any]) -> str:
    return f"{entry['module']}.{entry['kernel']} {json.dumps(entry['constexprs'], sort_keys=True)}"


# ---------------------------------------------------------------------------------------------
# phase 2: compile the recorded launches (no interpreter)


def _resources(cubin: bytes, cuobjdump: Path) -> dict[str, int]:
    """Registers, spill/stack bytes and shared memory of a cubin, from ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in fields.items()}


def _compile(path: Path, archs: list[int]) -> list[dict[str, Any]]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for entry in json.loads(path.read_text()):
        fn = getattr(importlib.import_module(entry["module"]), entry["kernel"])
        for arch in archs:
            row: dict[str, Any] = {
                "arch": f"sm_{arch}",
                "kernel": f"{entry['module'].rsplit('.', 1)[-1]}.{entry['kernel']}",
                "constexprs": entry["constexprs"],
                "types": ",".join(t for t in entry["signature"].values() if t.startswith("*")),
            }
            start = time.perf_counter()
            try:
                source = ASTSource(fn, entry["signature"], constexprs=entry["constexprs"])
                compiled = triton.compile(
                    source, target=GPUTarget("cuda", arch, 32), options=entry["options"]
                )
                row.update(_resources(compiled.asm["cubin"], cuobjdump))
                row["cubin_bytes"] = len(compiled.asm["cubin"])
                row["warps"] = compiled.metadata.num_warps
                row["error"] = ""
            except Exception as exc:  # reported per launch; the run fails at the end
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                row["error"] = f"{type(exc).__name__}: {' / '.join(lines)[:300]}"
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# report


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| arch | kernel | constexprs | pointer types | regs/thread | spill (local) bytes "
        "| shared bytes | warps | cubin bytes | compiled |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        status = "ok" if not r["error"] else f"**FAILED**: {r['error']}"
        lines.append(
            f"| {r['arch']} | {r['kernel']} | {consts} | {r['types']} | {r.get('reg', '-')} "
            f"| {r.get('local', '-')} | {r.get('shared', '-')} | {r.get('warps', '-')} "
            f"| {r.get('cubin_bytes', '-')} | {status} |"
        )
    return "\n".join(lines)


def _child(args: list[str], interpret: bool) -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # silences a warning; launches set it
    subprocess.run([sys.executable, "-m", "benchmarks.kernels_compile", *args], env=env,
                   check=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--arch", type=int, action="append",
        help="compute capability x10 (90: H100/H200; 80: A100); repeatable",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compile", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    archs = args.arch or [90]
    if args.record:
        _record(args.record)
        return 0
    if args.compile:
        rows = _compile(args.compile, archs)
        args.compile.with_suffix(".rows.json").write_text(json.dumps(rows))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        launches = Path(tmp) / "launches.json"
        _child(["--record", str(launches)], interpret=True)
        arch_flags = [f"--arch={a}" for a in archs]
        _child(["--compile", str(launches), *arch_flags], interpret=False)
        rows = json.loads(launches.with_suffix(".rows.json").read_text())
    import triton

    failed = [r for r in rows if r["error"]]
    spilled = [r for r in rows if r.get("local", 0)]
    summary = (
        f"{len(rows)} kernel launches compiled for {', '.join(f'sm_{a}' for a in archs)} "
        f"with Triton {triton.__version__}: {len(rows) - len(failed)} ok, {len(failed)} "
        f"failed; {len(spilled)} of them spill registers to local memory; most registers per "
        f"thread: {max((r.get('reg', 0) for r in rows), default=0)}"
    )
    table = _table(rows)
    print(table)
    print(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m benchmarks.kernels_compile " + " ".join(f"--arch {a}" for a in archs)
        args.out.with_suffix(".md").write_text(
            f"# Triton kernels compiled for CUDA without a GPU\n\n`{command}`\n\n{summary}\n\n"
            f"{table}\n"
        )
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
