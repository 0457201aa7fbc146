"""open_cluster: a real local cluster shaped by the plan; clear errors instead of hangs."""

from __future__ import annotations

import io
import socket
import time

import pytest
import runtime_helpers as rh

from hpcbatch.cluster import dask_memory_config, open_cluster, tunnel_hint
from hpcbatch.config import load
from hpcbatch.errors import ClusterStartError, ConfigError

# a hang must fail the test with a traceback, not stall CI
pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_memory_config_comes_from_the_plan_thresholds():
    plan = rh.small_plan(10, 2)
    plan = type(plan)(
        **{
            **plan.__dict__,
            "thresholds": {"target": 0.5, "spill": 0.6, "pause": 0.7, "terminate": False},
        }
    )
    cfg = dask_memory_config(plan)
    assert cfg["distributed.worker.memory.target"] == 0.5
    assert cfg["distributed.worker.memory.pause"] == 0.7
    assert cfg["distributed.worker.memory.terminate"] is False
    assert cfg["distributed.scheduler.allowed-failures"] == 1


def test_tunnel_hint_only_on_a_cluster_node():
    assert tunnel_hint("http://127.0.0.1:8787/status", env={}) is None
    env = {
        "SLURM_JOB_ID": "12",
        "SLURMD_NODENAME": "node07",
        "SLURM_SUBMIT_HOST": "login1",
        "USER": "ana",
    }
    # loopback-bound dashboard: jump through the login node to the compute node
    assert tunnel_hint("http://127.0.0.1:8787/status", env=env) == (
        "ssh -N -L 8787:localhost:8787 -J ana@login1 node07"
    )
    # bound to the node's address: the classic line through the login node
    assert tunnel_hint("http://10.1.2.3:8790/status", env=env) == (
        "ssh -N -L 8790:node07:8790 ana@login1"
    )
    assert tunnel_hint(
        "http://10.1.2.3:8787/status", env={"SLURM_JOB_ID": "1", "SLURMD_NODENAME": "n1"}
    ) == ("ssh -N -L 8787:n1:8787 LOGIN")


def test_local_cluster_has_the_plans_workers_limit_and_thresholds():
    plan = rh.small_plan(10, 2, memory_limit=350_000_000)
    out = io.StringIO()
    settings = load(overrides={"cluster": {"dashboard-address": f"127.0.0.1:{_free_port()}"}})
    with open_cluster(plan, settings, out=out) as client:
        info = client.scheduler_info()["workers"]
        assert len(info) == plan.n_workers
        assert {w["memory_limit"] for w in info.values()} == {350_000_000}
        assert {w["nthreads"] for w in info.values()} == {plan.threads_per_worker}

        def worker_config():
            import dask.config

            return [
                dask.config.get(f"distributed.worker.memory.{k}")
                for k in ("target", "spill", "pause", "terminate")
            ]

        seen = set(map(tuple, client.run(worker_config).values()))
        assert seen == {
            tuple(plan.thresholds[k] for k in ("target", "spill", "pause", "terminate"))
        }
        allowed = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
        assert allowed == 1
        assert client.dashboard_link.startswith("http://127.0.0.1:")
    assert client.status == "closed"
    text = out.getvalue()
    assert "dashboard: http://127.0.0.1:" in text and "333.79 MiB per worker" in text


def test_unreachable_scheduler_is_a_clear_error_not_a_hang():
    t0 = time.time()
    with (
        pytest.raises(ClusterStartError, match="cannot reach the Dask scheduler"),
        open_cluster(
            rh.small_plan(10, 2),
            load(),
            backend="address",
            address=f"tcp://127.0.0.1:{_free_port()}",
            start_timeout=2,
            quiet=True,
        ),
    ):
        pass
    assert time.time() - t0 < 30


def test_scheduler_without_workers_times_out_with_a_clear_error():
    from distributed import LocalCluster

    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty,
        pytest.raises(ClusterStartError, match="0 of 1 workers"),
        open_cluster(
            rh.small_plan(10, 2),
            load(),
            backend="address",
            address=empty.scheduler_address,
            start_timeout=1.5,
            quiet=True,
        ),
    ):
        pass


def test_bad_backend_or_address_is_a_config_error(tmp_path):
    plan = rh.small_plan(10, 2)
    with (
        pytest.raises(ConfigError, match="unknown cluster backend"),
        open_cluster(plan, load(), backend="kubernetes"),
    ):
        pass
    with (
        pytest.raises(ConfigError, match="neither tcp://HOST:PORT nor an existing"),
        open_cluster(plan, load(), backend="address", address=str(tmp_path / "missing.json")),
    ):
        pass
    with (
        pytest.raises(ConfigError, match="needs a scheduler"),
        open_cluster(plan, load(), backend="address"),
    ):
        pass
