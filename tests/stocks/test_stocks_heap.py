"""A worker gives the heap a chunk freed back to the OS (hpcbatch/stocks/heap.py).

Without it glibc keeps freed memory in its arenas and a long run's worker RSS creeps
up chunk after chunk (benchmarks/load_stocks.py: +55 MB per worker over 200 chunks).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hpcbatch.runner import Chunk
from hpcbatch.stocks import predict as predict_mod
from hpcbatch.stocks.heap import _malloc_trim
from hpcbatch.stocks.predict import PredictOptions, prepare

pytestmark = pytest.mark.skipif(not _malloc_trim(), reason="needs glibc's malloc_trim")

FRAGMENT_THEN_TRIM = textwrap.dedent(
    """
    import psutil
    from hpcbatch.stocks.heap import release_freed_memory
    p = psutil.Process()
    blocks = [bytes(1000 + i % 7) for i in range(300_000)]  # ~300 MB of small objects
    keep = blocks[::64]  # live objects pin the arena pages between the freed ones
    del blocks
    before = p.memory_info().rss
    assert release_freed_memory() is True
    after = p.memory_info().rss
    print(before, after, len(keep))
    """
)


def test_release_freed_memory_returns_a_fragmented_heap_to_the_os():
    out = subprocess.run(
        [sys.executable, "-c", FRAGMENT_THEN_TRIM], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-1000:]
    before, after, _ = (int(x) for x in out.stdout.split())
    # Freed but not returned: glibc's own trim leaves the holes; malloc_trim(0) frees them.
    assert before - after > 150 * 1024**2, (before, after)


def test_every_chunk_releases_the_memory_it_freed(market_copy, tiny_model, monkeypatch):
    calls = []
    monkeypatch.setattr(predict_mod, "release_freed_memory", lambda: calls.append(1) or True)
    prep = prepare(market_copy, str(tiny_model), PredictOptions(lookback_days=150, use_gpu="false"))
    for i in range(2):
        chunk = Chunk(f"c{i}", 3 * i, 3 * i + 3, tuple(prep.codes[3 * i : 3 * i + 3]))
        predict_mod.predict_chunk(chunk, None, prep.task)
    assert len(calls) == 2
