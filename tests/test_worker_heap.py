"""Job.worker_heap: workers keep freed memory for the next chunk instead of mapping it anew.

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes
glibc's mmap threshold at 128 KiB: each large buffer a chunk allocates is mapped and
faulted in afresh, page by page.  A job that sets ``worker_heap`` gets its workers'
heap tuned by the pipeline before their chunks run.  Real LocalCluster workers; the
page faults a chunk takes (``getrusage``) show whether its buffers came from the heap.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

import pytest
from distributed import Client, LocalCluster

from hpcbatch.api import given_footprint
from hpcbatch.pipeline import RunRequest, load_settings, run_job
from hpcbatch.workload import HeapTuning, Job, RunIdentity, Sink, Workload

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

BUFFER = 8 * 1024**2  # over Dask's fixed 128 KiB mmap threshold, under the tuned 32 MiB
TUNED = HeapTuning(32 * 1024**2, 64 * 1024**2)
try:  # "always": the kernel backs large mappings with huge pages, few faults either way
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as _thp:
        _THP_ALWAYS = "[always]" in _thp.read()
except OSError:
    _THP_ALWAYS = False


def _is_mmapped(address: int) -> bool:
    """Whether glibc's malloc mapped the block at ``address`` on its own: the IS_MMAPPED
    bit (0x2) of the block's chunk header, the word just before it.  Per block, so
    another thread's allocations at the same moment cannot blur it (a process-wide
    count, ``mallinfo2().hblkhd``, read 39 of 40 once in a fresh-clone CI run)."""
    word = ctypes.c_size_t.from_address(address - ctypes.sizeof(ctypes.c_size_t))
    return bool(word.value & 0x2)


def reuse_buffers(chunk, ctx) -> dict:
    """Allocate, fill and free an 8 MiB buffer once per item: the page faults it took,
    and the buffers malloc mapped on their own instead of taking from its heap."""
    import numpy as np
    from numpy._core.multiarray import _set_madvise_hugepage

    # numpy asks for huge pages for large arrays: where the kernel has some free, an
    # 8 MiB buffer takes ~4 faults however it was allocated (seen in CI, 2026-12-07)
    huge = _set_madvise_hugepage(False)
    try:
        before, mapped = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, 0
        for _ in range(chunk.size):
            buf = np.ones(BUFFER // 8)  # numpy's data: the block malloc returned
            mapped += _is_mmapped(buf.ctypes.data)
            del buf
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        _set_madvise_hugepage(huge)
    return {"faults": faults, "buffers": chunk.size, "mapped": mapped}


class FaultsWorkload(Workload):
    name = "heap-test"
    item_name = "buffer"


class FaultsJob(Job):
    def __init__(self, n: int, heap: HeapTuning | None):
        self.workload = FaultsWorkload()
        self.footprint = given_footprint({"per_item_bytes": BUFFER, "fixed_bytes": 0}, n)
        self.sink = Sink()
        self.identity = RunIdentity(f"heap-{heap is not None}-{os.getpid()}")
        self.worker_heap = heap

    def plan_overrides(self) -> dict:
        return {"chunk_size": 10}

    def task(self, plan, run):
        return reuse_buffers


def _faults_per_buffer(client, heap: HeapTuning | None) -> float:
    settings = load_settings(overrides={"retries": 0, "report-dir": None})
    report = run_job(FaultsJob(40, heap), settings,
                     RunRequest(client=client, progress=False, quiet=True))  # fmt: skip
    assert report.status == "finished"
    meta = report.results_meta
    assert meta["buffers"] == 40
    return meta["faults"] / meta["buffers"], meta["mapped"]


def test_a_job_with_worker_heap_reuses_freed_buffers_on_dask_workers():
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="1GiB",
                     host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        # the reason for the mechanism: Dask's workers start with glibc's trimming set
        env = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert set(env.values()) == {"65536"}
        untuned, untuned_mapped = _faults_per_buffer(client, None)
        tuned, tuned_mapped = _faults_per_buffer(client, TUNED)
    # Dask's setting: every buffer mapped on its own and faulted in afresh (hundreds of
    # faults each, where the kernel does not back every mapping with huge pages)
    assert untuned_mapped == 40
    # tuned by the pipeline before the chunks ran: from the heap, whose pages are reused
    assert tuned_mapped == 0
    if _THP_ALWAYS:
        return
    assert untuned > 100
    assert tuned * 10 < untuned


def test_heap_tuning_is_counted_in_a_footprint_and_pickles():
    import pickle

    from hpcbatch.workload import HeapTunedTask

    assert TUNED.kept_bytes == 64 * 1024**2  # unmeasured: the whole trim threshold
    assert HeapTuning(1, 2, peak_bytes=5).kept_bytes == 5
    wrapped = pickle.loads(pickle.dumps(HeapTunedTask(reuse_buffers, TUNED)))
    assert wrapped.__name__ == "reuse_buffers"  # the runner names its task group after it
