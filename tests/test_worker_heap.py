"""Job.worker_heap: workers keep freed memory for the next chunk instead of mapping it anew.

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes
glibc's mmap threshold at 128 KiB: each large buffer a chunk allocates is mapped and
faulted in afresh, page by page.  A job that sets ``worker_heap`` gets its workers'
heap tuned by the pipeline before their chunks run.  Real LocalCluster workers; the
page faults a chunk takes (``getrusage``) show whether its buffers came from the heap.
"""

from __future__ import annotations

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


def reuse_buffers(chunk, ctx) -> dict:
    """Allocate, fill and free an 8 MiB buffer once per item; the page faults it took."""
    import numpy as np

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(chunk.size):
        buf = np.ones(BUFFER // 8)
        del buf
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"faults": faults, "buffers": chunk.size}


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
    return meta["faults"] / meta["buffers"]


def test_a_job_with_worker_heap_reuses_freed_buffers_on_dask_workers():
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="1GiB",
                     host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        # the reason for the mechanism: Dask's workers start with glibc's trimming set
        env = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert set(env.values()) == {"65536"}
        untuned = _faults_per_buffer(client, None)
        tuned = _faults_per_buffer(client, TUNED)
    # Dask's setting: every buffer mapped and faulted in afresh (hundreds of faults each;
    # fewer than its 4 KiB pages where numpy asks for huge pages)
    assert untuned > 100
    # tuned by the pipeline before the chunks ran: the heap's pages are reused
    assert tuned * 10 < untuned


def test_heap_tuning_is_counted_in_a_footprint_and_pickles():
    import pickle

    from hpcbatch.workload import HeapTunedTask

    assert TUNED.kept_bytes == 64 * 1024**2  # unmeasured: the whole trim threshold
    assert HeapTuning(1, 2, peak_bytes=5).kept_bytes == 5
    wrapped = pickle.loads(pickle.dumps(HeapTunedTask(reuse_buffers, TUNED)))
    assert wrapped.__name__ == "reuse_buffers"  # the runner names its task group after it
