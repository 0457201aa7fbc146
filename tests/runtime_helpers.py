"""Task functions for the runtime tests (workers import them from here)."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np

from hpcbatch.runner import Chunk, TaskContext, make_chunks, run


def tiny(chunk: Chunk, ctx: TaskContext) -> dict:
    """Almost nothing: for the many-chunks test."""
    return {"items": chunk.size}


def seeded(chunk: Chunk, ctx: TaskContext) -> dict:
    """Return the chunk's seed and a number drawn from it."""
    rng = np.random.default_rng(ctx.seed)
    return {"items": chunk.size, "draw": int(rng.integers(0, 2**31))}


def log_call(chunk: Chunk, ctx: TaskContext, base: str) -> dict:
    """Touch a file per executed chunk in ``base``; fail past the item in ``base/stop``."""
    base = Path(base)
    (base / "calls").mkdir(exist_ok=True)
    (base / "calls" / f"{chunk.chunk_id}-{time.time_ns()}").touch()
    if (base / "stop").exists() and chunk.start >= int((base / "stop").read_text()):
        raise RuntimeError(f"simulated crash at item {chunk.start}")
    return {"items": chunk.size}


def flaky(chunk: Chunk, ctx: TaskContext) -> dict:
    """Fails on attempt 0, succeeds on the retry."""
    if ctx.attempt == 0:
        raise ValueError(f"transient failure of {chunk.chunk_id}")
    return {"items": chunk.size, "attempt": ctx.attempt}


def always_fails(chunk: Chunk, ctx: TaskContext) -> dict:
    if chunk.chunk_id == "c000002":
        raise ValueError("bad row in the input")
    return {"items": chunk.size}


def hog(chunk: Chunk, ctx: TaskContext) -> dict:
    """Allocate (and touch) the megabytes named by the chunk's items, hold them briefly."""
    mb = int(sum(chunk.items))
    block = np.ones(mb * 1024 * 1024 // 8, dtype=np.float64)
    time.sleep(1.0 if mb > 20 else 0.05)
    return {"items": chunk.size, "mb": mb, "checksum": float(block[::4096].sum() > 0)}


def raise_memory_error(chunk: Chunk, ctx: TaskContext) -> dict:
    if chunk.size > 2:
        raise MemoryError(f"cannot allocate {chunk.size} items")
    return {"items": chunk.size}


def slow_logged(chunk: Chunk, ctx: TaskContext, base: str) -> dict:
    """Log the call like :func:`log_call`, then take a little while."""
    base = Path(base)
    (base / "calls").mkdir(exist_ok=True)
    (base / "calls" / f"{chunk.chunk_id}-{time.time_ns()}").touch()
    time.sleep(0.15)
    return {"items": chunk.size}


def small_plan(n_items: int, chunk_size: int, *, memory_limit: int = 400_000_000, workers: int = 2):
    """A real plan for a tiny workload, with the memory limit the tests want."""
    import dataclasses

    from hpcbatch.planner import Footprint, PlanSettings, make_plan
    from hpcbatch.resources import detect_resources

    footprint = Footprint(
        workload="test",
        item_name="item",
        n_items=n_items,
        per_item_bytes=1000,
        baseline_bytes=80_000_000,
    )
    resources = detect_resources(memory_bytes=workers * memory_limit + 300_000_000, cpus=workers)
    plan = make_plan(footprint, resources, PlanSettings(chunk_size=chunk_size, n_workers=workers))
    return dataclasses.replace(plan, memory_limit_bytes=memory_limit)


def slow_run_setup(base: Path):
    """Plan, settings and ledger (in ``base``) for :func:`run_slow`."""
    from hpcbatch.config import load
    from hpcbatch.ledger import Ledger

    plan = small_plan(200, 2)
    settings = load(overrides={"cluster": {"dashboard-address": "127.0.0.1:0"}})
    ledger = Ledger(f"sqlite:///{base}/l.db")
    return plan, settings, ledger


def run_slow(cluster, ledger, base: Path, run_id: str, **kwargs):
    """Run 200 items of :func:`slow_logged` in chunks of 2, giving up 3 s after the last worker."""
    return run(
        make_chunks(200, 2),
        functools.partial(slow_logged, base=str(base)),
        cluster,
        run_id=run_id,
        ledger=ledger,
        progress=False,
        report_dir=base,
        no_worker_timeout_s=3,
        **kwargs,
    )


def wait_done(ledger, run_id: str, n: int, timeout: float = 60) -> float:
    """Wait until ``n`` chunks of ``run_id`` are done in ``ledger`` or ``timeout`` s passed.

    Returns the deadline (a ``time.monotonic()`` value) for any further waiting.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(ledger.done_ids(run_id)) < n:
        time.sleep(0.05)
    return deadline


def calls(base: Path) -> list[str]:
    """Chunk ids executed so far (one entry per execution)."""
    return sorted(p.name.rsplit("-", 1)[0] for p in (base / "calls").glob("*"))


def oom_killed(chunk: Chunk, ctx: TaskContext) -> dict:
    """Chunks of more than 2 items die like the kernel OOM killer does it: SIGKILL."""
    import os
    import signal

    if chunk.size > 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"items": chunk.size}
