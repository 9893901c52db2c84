"""Run a function on N real gloo ranks (forked processes on 127.0.0.1) and collect results.

``run_ranks(fn, 4, *args)`` forks 4 processes; each initialises a gloo process group (file
rendezvous in a fresh temporary directory, so no port can clash), builds a
:class:`TorchDistBackend` and returns ``fn(backend, *args)``. Results come back pickled by
value, in rank order. Forking (not spawning) avoids re-importing torch in every rank, which
costs seconds each; batch many checks into one call anyway.

An exception in any rank fails the call with every rank's traceback, unless
``expect_errors=True``, where the exception objects are returned instead.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable, Collection
from typing import Any

__all__ = ["RankError", "run_ranks"]


class RankError(Exception):
    """An exception raised on one rank: its type name, message and formatted traceback."""

    def __init__(self, rank: int, kind: str, message: str, trace: str) -> None:
        super().__init__(f"rank {rank}: {kind}: {message}")
        self.rank, self.kind, self.message, self.trace = rank, kind, message, trace


def _child(
    fn: Callable[..., Any],
    rank: int,
    size: int,
    store: str,
    pg_timeout_s: float,
    args: tuple[Any, ...],
    queue: Any,
) -> None:
    import torch
    import torch.distributed as dist

    from gradzip.allreduce.torch_dist import TorchDistBackend

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=pg_timeout_s)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=size, timeout=timeout
        )
        backend = TorchDistBackend(timeout=timeout)
        message = (rank, True, fn(backend, *args))
    except BaseException as exc:
        message = (rank, False, (type(exc).__name__, str(exc), traceback.format_exc()))
    try:
        queue.put(pickle.dumps(message))
    except Exception as exc:  # an unpicklable result
        queue.put(pickle.dumps((rank, False, (type(exc).__name__, str(exc), ""))))
    queue.close()
    queue.join_thread()
    if dist.is_initialized():
        dist.destroy_process_group()


def _main(*params: Any) -> None:
    try:
        _child(*params)
    finally:
        os._exit(0)  # a forked child must not run the parent's (pytest's) exit handlers


def run_ranks(
    fn: Callable[..., Any],
    size: int,
    *args: Any,
    timeout_s: float = 60.0,
    pg_timeout_s: float = 30.0,
    expect_errors: bool = False,
    dead: Collection[int] = (),
) -> list[Any]:
    """``[fn(backend_r, *args) for r in range(size)]``, each on its own gloo rank.

    ``fn`` must be a module-level function (or picklable by reference); ``pg_timeout_s`` is the
    process-group timeout of every collective; ``timeout_s`` bounds the whole run. Ranks in
    ``dead`` are expected to die (a fault test kills them): their result is None and the run
    does not wait for them.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_main, args=(fn, r, size, store, pg_timeout_s, args, queue))
            for r in range(size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = dict.fromkeys(dead)
        try:
            for _ in range(size - len(set(dead))):
                rank, ok, value = pickle.loads(queue.get(timeout=timeout_s))
                results[rank] = value if ok else RankError(rank, *value)
        except Exception as exc:
            raise TimeoutError(
                f"{size} ranks running {fn.__name__} did not all report within {timeout_s} s; "
                f"got ranks {sorted(results)}"
            ) from exc
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    ordered = [results[r] for r in range(size)]
    errors = [r for r in ordered if isinstance(r, RankError)]
    if errors and not expect_errors:
        raise AssertionError("\n".join(f"{e}\n{e.trace}" for e in errors))
    return ordered
