"""The stocks footprint follows how the workers start: spawned (SLURM, an existing
cluster) with the analytic baseline as the workload gives it; forked from the local
forkserver with the measured saving taken off, and the plan says why."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hpcbatch import config as hb_config
from hpcbatch.pipeline import plan_job, plan_sizes, worker_footprint, workload_settings
from hpcbatch.resources import detect_resources
from hpcbatch.stocks.footprint import (
    BASELINE_BYTES,
    FORKSERVER_BASELINE_BYTES,
    FORKSERVER_SAVING_BYTES,
    SOURCE,
    stocks_footprint,
)
from hpcbatch.stocks.predict import PredictOptions, predict
from hpcbatch.workload import get_workload

OPTS = PredictOptions(lookback_days=120, predict_days=5, use_gpu="false")
FORKED_NOTE = "local workers forked from a forkserver that preloaded the workload's modules"


def _settings() -> dict:
    return hb_config.load(overrides={"report-dir": None})


def _resources():
    return detect_resources(memory_bytes=6 * 10**9, cpus=2)


@pytest.fixture
def job(market_copy, tiny_model):
    return get_workload("stocks").prepare_options(market_copy, str(tiny_model), OPTS)


def test_the_analytic_baseline_is_in_spawned_worker_terms():
    assert FORKSERVER_SAVING_BYTES > 0
    assert BASELINE_BYTES == FORKSERVER_BASELINE_BYTES + FORKSERVER_SAVING_BYTES
    fp = stocks_footprint(100)
    assert "spawned" in fp.constants and "forkserver" in fp.constants
    assert FORKED_NOTE not in fp.constants


def test_a_slurm_plan_uses_the_spawned_baseline():
    # what `hpcbatch plan stocks` and `slurm render stocks` plan with: SLURM's workers
    # are spawned, fresh processes
    stocks, settings = get_workload("stocks"), _settings()
    values = {"n_stocks": 2000, "lookback_days": 400, "predict_days": 10}
    sizes = stocks.sizes(workload_settings(stocks, settings), values)
    planned = plan_sizes(stocks, sizes, settings, _resources(), calibrate=False)
    assert planned.plan.footprint == stocks_footprint(2000, 400, 10)
    assert FORKED_NOTE not in " ".join(planned.plan.reasons)


def test_forked_workers_get_the_saving_off_the_analytic_footprint_only(job):
    spawned = worker_footprint(job, forked=False)
    assert spawned is job.footprint and spawned.source == SOURCE
    forked = worker_footprint(job, forked=True)
    assert forked.baseline_bytes == spawned.baseline_bytes - FORKSERVER_SAVING_BYTES
    assert forked.per_item_bytes == spawned.per_item_bytes
    saving = f"baseline {FORKSERVER_SAVING_BYTES // 2**20} MiB under the spawned workers'"
    assert FORKED_NOTE in forked.constants and saving in forked.constants
    assert forked.constants.startswith(spawned.constants)
    # a caller's own footprint and one a probe measured are left as they are
    for source in ("a caller's own", "calibrated (probe sizes 32, 96)"):
        job.footprint = replace(spawned, source=source)
        assert worker_footprint(job, forked=True) is job.footprint
        plan = plan_job(job, _settings(), _resources(), calibrate=False, forked=True).plan
        assert plan.footprint == job.footprint


def test_a_run_on_an_existing_cluster_is_planned_for_spawned_workers(job, market_copy,
                                                                      tiny_model):  # fmt: skip
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:  # fmt: skip
        report = predict(market_copy, str(tiny_model), settings=_settings(), options=OPTS,
                         client=client, progress=False, quiet=True, calibrate=False)  # fmt: skip
    assert report.status == "finished"
    assert report.plan["footprint"]["baseline_bytes"] == job.footprint.baseline_bytes
    assert FORKED_NOTE not in report.plan["footprint_constants"]


def test_a_local_run_forks_its_workers_and_plans_them_with_the_saving(job, market_copy,
                                                                       tiny_model):  # fmt: skip
    report = predict(market_copy, str(tiny_model), settings=_settings(), options=OPTS,
                     resources=_resources(), backend="local", progress=False, quiet=True,
                     calibrate=False)  # fmt: skip
    assert report.status == "finished"
    expected = job.footprint.baseline_bytes - FORKSERVER_SAVING_BYTES
    assert report.plan["footprint"]["baseline_bytes"] == expected
    # the plan's reasons say why: the constants name the forked workers' saving
    assert FORKED_NOTE in report.plan["footprint_constants"]
    assert any(FORKED_NOTE in reason for reason in report.plan["reasons"])
