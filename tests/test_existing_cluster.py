"""Runs on an existing Dask cluster (issue 14): the plan is made for its workers.

A real cluster of small workers (a ``LocalCluster`` with ``memory_limit``) stands in for
one started by hand or by a driver job elsewhere.
"""

from __future__ import annotations

import pytest
from distributed import Client, LocalCluster

from hpcbatch.cluster import cluster_resources, workers_resources
from hpcbatch.errors import ConfigError
from hpcbatch.planner import Footprint, PlanSettings, make_plan
from hpcbatch.resources import Resources

MiB = 1024**2
GiB = 1024**3


@pytest.fixture(scope="module")
def small_cluster():
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit="450MiB",
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2, timeout=60)
        yield client


def test_the_plan_for_an_existing_cluster_is_made_for_its_workers(small_cluster) -> None:
    res = cluster_resources(small_cluster)
    address = small_cluster.scheduler.address
    assert res.memory_bytes == 2 * 450 * MiB and res.cpus == 2
    assert [w.memory_limit_bytes for w in res.workers] == [450 * MiB, 450 * MiB]
    assert f"the cluster's 2 workers (scheduler {address})" in res.memory_source
    assert "threads of the cluster's 2 workers" in res.cpus_source
    footprint = Footprint("w", "item", 3000, per_item_bytes=100_000, baseline_bytes=150 * MiB)
    plan = make_plan(footprint, res, PlanSettings())
    assert plan.memory_limit_bytes == 450 * MiB  # not this machine's memory
    assert plan.n_workers == 2 and plan.threads_per_worker == 1
    assert "workers: 2, planned for the existing cluster's 2 workers of 450.00 MiB each" in (
        plan.reasons
    )


def _info(**workers: dict) -> dict:
    return {"address": "tcp://10.0.0.1:8786", "workers": workers}


def test_workers_resources_reads_each_workers_limit_threads_and_gpu() -> None:
    gpu = {"memory-total": 16 * GiB, "name": "Tesla T4"}
    info = _info(
        **{
            "tcp://10.0.0.2:1": {"name": None, "memory_limit": 2 * GiB, "nthreads": 2},
            "tcp://10.0.0.3:1": {
                "name": "gpu-0",
                "memory_limit": 4 * GiB,
                "nthreads": 2,
                "gpu": gpu,
                "metrics": {"gpu": {"memory-used": GiB, "utilization": 0}},
            },
        }
    )
    res = workers_resources(info)
    assert res.memory_bytes == 6 * GiB and res.cpus == 4
    assert [w.name for w in res.workers] == ["tcp://10.0.0.2:1", "gpu-0"]  # no name: address
    assert "2.00 GiB to 4.00 GiB each" in res.memory_source
    assert len(res.gpus) == 1 and res.gpus[0].name == "Tesla T4"
    assert (res.gpus[0].free_bytes, res.gpus[0].total_bytes) == (15 * GiB, 16 * GiB)
    assert "reported by 1 of the cluster's 2 workers" in res.gpus_source
    plan = make_plan(Footprint("w", "item", 100, per_item_bytes=MiB, baseline_bytes=MiB), res)
    assert plan.memory_limit_bytes == 2 * GiB and plan.n_workers == 2


def test_workers_without_a_limit_take_the_detected_memory_and_say_so() -> None:
    mine = Resources(memory_bytes=8 * GiB, memory_source="psutil (test)", cpus=4, cpus_source="t")
    info = _info(**{"tcp://10.0.0.2:1": {"name": 0, "memory_limit": 0, "nthreads": 1}})
    res = workers_resources(info, detect=lambda: mine)
    assert res.memory_bytes == 8 * GiB and res.memory_source.startswith("psutil (test)")
    assert "1 of the cluster's 1 worker (scheduler tcp://10.0.0.1:8786) have no memory limit" in (
        res.memory_source
    )
    assert res.workers[0].name == "0"


def test_a_cluster_without_workers_is_refused() -> None:
    with pytest.raises(ConfigError, match="no workers to plan for .*scheduler tcp://10.0.0.1"):
        workers_resources(_info())
