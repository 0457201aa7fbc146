"""Where ``hpcbatch.predictive.sample`` runs: ``cluster="auto"`` (the default) keeps a
job that fits one chunk and whose drawing is estimated shorter than a cluster start (or
that has one CPU) in this process, and starts a cluster for larger or longer ones; and
``as_tensors=True`` returns torch tensors as Predictive does."""

from __future__ import annotations

import logging

import numpy as np
import pyro
import pytest
import torch
import zarr
from predictive_models import technical_setup
from pyro.infer import Predictive

from hpcbatch.errors import ConfigError
from hpcbatch.predictive import sample
from hpcbatch.predictive import technical as tech
from hpcbatch.predictive.footprint import FORKSERVER_SAVING_BYTES
from hpcbatch.predictive.sampling import pyro_seed, run_sampling
from hpcbatch.runner import chunk_seed

SITES = ["alpha_y", "mu_ntc", "phi_y", "y"]


@pytest.fixture(scope="module")
def tech_fit(tmp_path_factory):
    return technical_setup(tmp_path_factory.mktemp("where"))


def _common(tech_fit, **extra):
    data, guide, args, kwargs = tech_fit
    return dict(guide=guide, num_samples=16, model_args=args, model_kwargs=kwargs,
                return_sites=SITES, seed=5, progress=False, **extra)  # fmt: skip


def _reference(tech_fit) -> dict:
    data, guide, args, kwargs = tech_fit
    pyro.set_rng_seed(pyro_seed(chunk_seed(5, "c000000")))
    predictive = Predictive(tech.technical_model, guide=guide, num_samples=16,
                            return_sites=SITES, parallel=True)  # fmt: skip
    return predictive(*args, **kwargs)


def test_default_call_of_a_small_job_runs_in_process_and_says_so(tech_fit, caplog):
    caplog.set_level(logging.INFO, logger="hpcbatch.predictive.sampling")
    run = run_sampling(tech.technical_model, **_common(tech_fit))
    assert run.report.results_meta["execution"] == "in-process"
    assert "in-process (cluster='auto')" in run.execution
    assert "no cluster started" in run.report.message
    # it names its estimate: a fraction of a second against the cluster start's seconds
    assert "of drawing" in run.execution and "shorter than a cluster start (~4 s)" in run.execution
    assert "in-process (cluster='auto')" in run.summary()
    assert any("no cluster started" in r.getMessage() for r in caplog.records)
    assert run.plan.n_workers == 1 and run.plan.chunk_size == 16
    # the plan says where the footprint's constants came from, not "uncalibrated"
    source = run.plan.footprint.source
    assert "measured 2026-11-23" in source and "--calibrate measures them here" in source
    assert any(source in reason for reason in run.plan.reasons)
    ref = _reference(tech_fit)
    for name in SITES:  # one chunk: bit-identical to Predictive(parallel=True)
        np.testing.assert_array_equal(run.samples[name], ref[name].numpy())


def test_as_tensors_returns_torch_tensors_like_predictive(tech_fit):
    got = sample(tech.technical_model, as_tensors=True, **_common(tech_fit))
    ref = _reference(tech_fit)
    assert set(got) == set(ref)
    for name in SITES:
        assert isinstance(got[name], torch.Tensor)
        assert got[name].dtype == ref[name].dtype
        assert torch.equal(got[name], ref[name])


def test_as_tensors_with_out_is_refused(tech_fit, tmp_path):
    with pytest.raises(ConfigError, match="drop out="):
        sample(tech.technical_model, as_tensors=True, out=tmp_path / "s.zarr",
               **_common(tech_fit))  # fmt: skip


def test_an_unknown_cluster_choice_is_refused(tech_fit):
    with pytest.raises(ConfigError, match="cluster must be one of auto, cluster, inprocess"):
        sample(tech.technical_model, cluster="local-ish", **_common(tech_fit))


def test_inprocess_with_out_writes_the_zarr_store(tech_fit, tmp_path):
    out = tmp_path / "s.zarr"
    run = run_sampling(tech.technical_model, cluster="inprocess", out=out, chunk_size=4,
                       **_common(tech_fit))  # fmt: skip
    assert run.report.n_chunks == 4 and "asked for" in run.execution
    group = zarr.open_group(str(out), mode="r")
    in_memory = sample(tech.technical_model, cluster="inprocess", chunk_size=4,
                       **_common(tech_fit))  # fmt: skip
    for name in SITES:
        np.testing.assert_array_equal(group[name][...], in_memory[name])


def test_a_job_larger_than_one_chunk_keeps_the_cluster(tech_fit, caplog):
    caplog.set_level(logging.INFO, logger="hpcbatch.predictive.sampling")
    from hpcbatch.resources import Resources

    resources = Resources(4 * 1024**3, "test", 2, "test")
    run = run_sampling(tech.technical_model, chunk_size=8, resources=resources,
                       **_common(tech_fit))  # fmt: skip
    assert "execution" not in run.report.results_meta
    assert run.execution.startswith("cluster (cluster='auto'): 16 samples need 2 chunks")
    assert run.report.n_chunks == 2 and run.report.measured_peak_per_worker
    assert not any("this process" in key for key in run.report.measured_peak_per_worker)
    assert any("starting the cluster" in r.getMessage() for r in caplog.records)
    in_process = sample(tech.technical_model, client="sync", chunk_size=8, **_common(tech_fit))
    for name in SITES:
        np.testing.assert_array_equal(run.samples[name], in_process[name])


def test_multi_thread_workers_are_warned_and_take_turns(tech_fit, caplog):
    from distributed import Client, LocalCluster

    caplog.set_level(logging.WARNING, logger="hpcbatch.predictive.task")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:  # fmt: skip
        got = sample(tech.technical_model, client=client, chunk_size=4, **_common(tech_fit))
    assert any("not thread-safe" in r.getMessage() and "--nthreads 1" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    alone = sample(tech.technical_model, client="sync", chunk_size=4, **_common(tech_fit))
    for name in SITES:  # the lock keeps the two threads' chunks apart: same numbers
        np.testing.assert_array_equal(got[name], alone[name])


def test_an_unknown_worker_start_is_refused(tech_fit):
    with pytest.raises(ConfigError, match="worker_start must be one of spawn, forkserver"):
        sample(tech.technical_model, worker_start="fork", **_common(tech_fit))


def test_spawned_and_forkserver_workers_draw_the_same_samples(tech_fit):
    from hpcbatch.resources import Resources

    resources = Resources(4 * 1024**3, "test", 2, "test")
    runs = {start: run_sampling(tech.technical_model, chunk_size=8, resources=resources,
                                cluster="cluster", worker_start=start, **_common(tech_fit))
            for start in ("spawn", "forkserver")}  # fmt: skip
    for name in SITES:
        np.testing.assert_array_equal(runs["spawn"].samples[name], runs["forkserver"].samples[name])
    # the pipeline takes the forked workers' measured saving off the analytic footprint
    # (spawned workers keep it as the workload gives it), and the plan says why
    spawned, forked = runs["spawn"].plan.footprint, runs["forkserver"].plan.footprint
    assert spawned.baseline_bytes - forked.baseline_bytes == FORKSERVER_SAVING_BYTES == 80 * 2**20
    assert "forkserver" not in spawned.constants
    assert "baseline 80 MiB under the spawned workers'" in forked.constants
    assert "measured 221-269 MiB per worker against 336 MiB spawned" in forked.constants


def test_a_callers_footprint_is_not_reduced_for_forkserver_workers(tech_fit):
    from hpcbatch.planner import Footprint
    from hpcbatch.resources import Resources

    mine = Footprint("predictive", "sample", 16, per_item_bytes=2**20,
                     baseline_bytes=300 * 2**20, source="mine")  # fmt: skip
    run = run_sampling(tech.technical_model, chunk_size=8, cluster="cluster",
                       resources=Resources(4 * 1024**3, "test", 2, "test"), footprint=mine,
                       worker_start="forkserver", **_common(tech_fit))  # fmt: skip
    assert run.plan.footprint == mine


def test_a_job_estimated_longer_than_a_cluster_start_takes_the_cluster(tech_fit, caplog):
    caplog.set_level(logging.INFO, logger="hpcbatch.predictive.sampling")
    from hpcbatch.resources import Resources

    resources = Resources(4 * 1024**3, "test", 2, "test")
    # the same one-chunk job as above, with a cluster start taken to cost nothing
    run = run_sampling(tech.technical_model, resources=resources, cluster_start_s=0,
                       **_common(tech_fit))  # fmt: skip
    assert run.execution.startswith("cluster (cluster='auto'): all 16 samples fit one chunk")
    assert "longer than a cluster start (~0 s), and 2 CPUs to draw at once" in run.execution
    assert "of drawing" in run.execution
    assert any("starting the cluster" in r.getMessage() for r in caplog.records)
    assert "execution" not in run.report.results_meta
    assert not any("this process" in key for key in run.report.measured_peak_per_worker)
    in_process = sample(tech.technical_model, client="sync", chunk_size=run.plan.chunk_size,
                        **_common(tech_fit))  # fmt: skip
    for name in SITES:
        np.testing.assert_array_equal(run.samples[name], in_process[name])


def test_one_cpu_keeps_even_a_long_job_in_process(tech_fit):
    from hpcbatch.resources import Resources

    resources = Resources(4 * 1024**3, "test", 1, "test")
    run = run_sampling(tech.technical_model, resources=resources, cluster_start_s=0,
                       **_common(tech_fit))  # fmt: skip
    assert run.report.results_meta["execution"] == "in-process"
    assert "there is one CPU to use (a cluster would add no cores)" in run.execution
    ref = _reference(tech_fit)
    for name in SITES:
        np.testing.assert_array_equal(run.samples[name], ref[name].numpy())


def test_a_negative_cluster_start_is_refused(tech_fit):
    with pytest.raises(ConfigError, match="cluster_start_s must be a number of seconds >= 0"):
        sample(tech.technical_model, cluster_start_s=-1, **_common(tech_fit))


def slow_model(x, delay):
    """Sleeps ``delay`` seconds in every run: drawing it costs at least that."""
    import time

    import pyro.distributions as dist

    time.sleep(delay)
    with pyro.plate("rows", x.shape[0]):
        pyro.sample("y", dist.Normal(x, 1.0))


def test_the_estimate_weighs_the_model_s_own_cost_and_keeps_the_random_state():
    from hpcbatch.predictive.sampling import SampleOptions, SampleRequest, estimate_draw
    from hpcbatch.predictive.task import prepare_job
    from hpcbatch.predictive.workload import WORKLOAD

    x = torch.zeros(50)

    def estimate(delay: float):
        request = SampleRequest(slow_model, 200, model_args=(x, delay))
        job = prepare_job(WORKLOAD, request, SampleOptions(), in_process=True)
        try:
            return estimate_draw(job.prep.sampling)
        finally:
            job.discard()

    pyro.set_rng_seed(11)
    quick = estimate(0.0)
    after = torch.rand(3)
    pyro.set_rng_seed(11)
    assert torch.equal(torch.rand(3), after)  # the test draws left the RNG where it was
    slow = estimate(0.03)
    # every model run sleeps 30 ms, and the job's one-block draw is Predictive's call,
    # which runs the model three times: the estimate counts those three runs' worth
    # although each test draw (a vectorised run alone) ran it once
    assert slow.seconds >= 3 * 0.03
    assert slow.values == quick.values == 200 * 50 and slow.runs == 1
    assert len(slow.probe_samples) <= 3 and slow.probe_s < 1.0  # the budget stops the draws


def test_the_test_draws_stop_once_they_cannot_change_the_decision():
    from hpcbatch.predictive.sampling import SampleOptions, SampleRequest, estimate_draw
    from hpcbatch.predictive.task import prepare_job
    from hpcbatch.predictive.workload import WORKLOAD

    x = torch.zeros(50)
    request = SampleRequest(slow_model, 4000, model_args=(x, 0.002))
    job = prepare_job(WORKLOAD, request, SampleOptions(), in_process=True)
    try:
        full = estimate_draw(job.prep.sampling)  # no decision to make: drawn to the goal
        quick = estimate_draw(job.prep.sampling, enough=1000.0)  # far under a start
    finally:
        job.discard()
    # every run sleeps 2 ms: 1, 4, 16... samples until a draw takes 30 ms or holds
    # every sample (the time hardly grows with the samples)
    assert len(full.probe_samples) > 2
    # one more draw after the first settles it: the upper bound is far under the start
    assert quick.probe_samples[:1] == (1,) and len(quick.probe_samples) == 2
    assert quick.seconds < 1000.0 / 2 and quick.describe().startswith(
        "at most " if quick.upper_bound else "an estimated "
    )
