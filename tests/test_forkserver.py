"""A job's ``worker_preload``: local workers forked from one server that imported it."""

from __future__ import annotations

import os
import sys

from distributed import Client, LocalCluster

from hpcbatch.cluster import forkserver_workers

PRELOAD = "xml.dom.minidom"  # imported by nothing else a worker runs


def _worker_state() -> dict:
    return {"preloaded": PRELOAD in sys.modules, "ppid": os.getppid(), "pid": os.getpid()}


def test_local_workers_fork_from_a_server_that_imported_the_preload() -> None:
    with forkserver_workers([PRELOAD]), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, Client(cluster) as client:
        states = list(client.run(_worker_state).values())
    assert len(states) == 2
    assert all(s["preloaded"] for s in states), states
    # forked by the forkserver, not spawned by this process's nannies
    assert all(s["ppid"] != os.getpid() for s in states), states
    assert len({s["ppid"] for s in states}) == 1, states


def test_outside_the_block_workers_start_as_dask_starts_them() -> None:
    import dask

    with forkserver_workers([PRELOAD]):
        assert dask.config.get("distributed.worker.multiprocessing-method") == "forkserver"
    assert dask.config.get("distributed.worker.multiprocessing-method") == "spawn"
