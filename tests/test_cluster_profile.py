"""Workers of an hpcbatch cluster run without Dask's statistical profiler.

The profiler keeps a call tree per second for 1000 s on every worker, so worker memory
grew through a long run (benchmarks/load_stocks.py: median RSS +14 % over 200 chunks of
stocks, flat with the profiler off); ``hpcbatch.cluster`` turns it off.
"""

from __future__ import annotations

import time

import runtime_helpers as rh

import hpcbatch.config as hb_config
from hpcbatch.cluster import dask_memory_config, open_cluster


def _profile_state(dask_worker=None) -> dict:
    import dask.config

    return {
        "enabled": dask.config.get("distributed.worker.profile.enabled"),
        "history": len(dask_worker.profile_history),
    }


def _busy(seconds: float) -> int:
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += sum(range(1000))
    return n


def test_cluster_config_turns_the_worker_profiler_off():
    assert dask_memory_config(rh.small_plan(10, 2))["distributed.worker.profile.enabled"] is False


def test_local_workers_keep_no_profile_history():
    settings = hb_config.load()
    settings["cluster"]["dashboard-address"] = "127.0.0.1:0"
    with open_cluster(rh.small_plan(4, 1), settings, backend="local", quiet=True) as client:
        client.submit(_busy, 2.5, pure=False).result()  # > 2 profile cycles of 1 s
        states = list(client.run(_profile_state).values())
    assert states and all(s == {"enabled": False, "history": 0} for s in states)


def test_worker_profile_setting_turns_it_back_on_for_local_and_slurm_workers():
    settings = hb_config.load()
    settings["cluster"]["dashboard-address"] = "127.0.0.1:0"
    settings["cluster"]["worker-profile"] = True
    with open_cluster(rh.small_plan(4, 1), settings, backend="local", quiet=True) as client:
        client.submit(_busy, 2.5, pure=False).result()
        states = list(client.run(_profile_state).values())
    assert states and all(s["enabled"] is True and s["history"] > 0 for s in states)

    from hpcbatch.slurm import slurm_cluster_kwargs

    for on, text in ((True, "True"), (False, "False")):
        settings["cluster"]["worker-profile"] = on
        spec = slurm_cluster_kwargs(rh.small_plan(4, 1), settings)
        assert (
            f"export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED={text}"
            in spec.kwargs["job_script_prologue"]
        )
