"""Task functions for tests/test_runs.py (workers import them from here)."""

from __future__ import annotations

import time

from hpcbatch.runner import QUARANTINED, Chunk, TaskContext


def busy(chunk: Chunk, ctx: TaskContext, delay: float = 0.05) -> dict:
    """Takes ``delay`` s; chunk c000000 runs out of memory above 2 items (it is split);
    item 5 is bad (quarantined)."""
    if chunk.chunk_id.startswith("c000000") and chunk.size > 2:
        raise MemoryError(f"cannot allocate {chunk.size} items")
    time.sleep(delay)
    meta: dict = {"items": chunk.size}
    if chunk.start <= 5 < chunk.stop:
        meta[QUARANTINED] = [{"item": 5, "reason": "item 5 is bad"}]
    return meta


def slow_square(x: int) -> int:
    """One item, 0.15 s (hpcbatch.map per_item=True)."""
    time.sleep(0.15)
    return x * x


def slow_chunk(chunk: Chunk, ctx: TaskContext) -> dict:
    """0.3 s per chunk (the SIGKILL test's run)."""
    time.sleep(0.3)
    return {"items": chunk.size}
