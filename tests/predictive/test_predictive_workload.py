"""The predictive workload on the Workload contract: registered by entry point, typed
settings, the same plan as ``hpcbatch plan predictive``, and a prepared job run by the
pipeline writing the same store as the in-process sampler."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from hpcbatch import config as hb_config
from hpcbatch.errors import ConfigError
from hpcbatch.pipeline import RunRequest, plan_sizes, run_job
from hpcbatch.planner import make_plan
from hpcbatch.predictive import technical
from hpcbatch.predictive.footprint import technical_footprint
from hpcbatch.predictive.sampling import ledger_path
from hpcbatch.predictive.workload import WORKLOAD, PredictiveSettings
from hpcbatch.resources import Resources
from hpcbatch.workload import Invocation, get_workload

SITES = ("alpha_y", "mu_ntc", "phi_y", "y")


def test_registered_by_its_entry_point():
    found = get_workload("predictive")
    assert isinstance(found, type(WORKLOAD))
    assert found.probe == "hpcbatch.predictive.probe:probe" and found.probe_sizes == (2, 8)
    assert found.job_command() == ("predictive", "sample")


def test_settings_are_typed_from_the_config_section():
    typed = PredictiveSettings.from_config(hb_config.load()["predictive"])
    assert typed == PredictiveSettings(1000, "auto", False, "auto")
    given = {"samples": 40, "chunk-size": "8", "with-observations": True, "cell-block": 16}
    assert PredictiveSettings.from_config(given) == PredictiveSettings(40, 8, True, 16)
    for bad, message in (
        ({**given, "chunk-size": 0}, "chunk-size must be at least 1, got 0"),
        ({**given, "cell-block": "many"}, "cell-block must be 'auto' or a whole number"),
        ({**given, "samples": -1}, "samples must be a positive whole number"),
        ({**given, "sample": 3}, "unknown setting 'sample'"),
    ):
        with pytest.raises(ConfigError, match=message):
            PredictiveSettings.from_config(bad)


@pytest.mark.parametrize("copy_input", [False, True])
@pytest.mark.parametrize("with_observations", [False, True])
def test_plan_from_sizes_is_the_technical_plan(with_observations, copy_input):
    settings = hb_config.load()
    resources = Resources(memory_bytes=16 * 10**9, memory_source="test", cpus=4, cpus_source="test")
    values = {"cells": 20_000, "features": 3_000, "groups": 3, "samples": None,
              "with_observations": with_observations or None, "copy_input": copy_input}  # fmt: skip
    sizes = WORKLOAD.sizes(WORKLOAD.settings(settings["predictive"]), values)
    assert sizes["samples"] == 1000  # the config's, not restated
    planned = plan_sizes(WORKLOAD, sizes, settings, resources, calibrate=False)
    expected = make_plan(
        technical_footprint(20_000, 3_000, 3, 1000, with_observations=with_observations,
                            shared_input_mmap=not copy_input),
        resources,
        hb_config.plan_settings(settings),
    )  # fmt: skip
    assert planned.plan.to_dict() == expected.to_dict()
    kwargs = WORKLOAD.probe_kwargs(sizes, WORKLOAD.settings(settings["predictive"]))
    assert kwargs == {"cells": 20_000, "features": 3_000, "groups": 3,
                      "with_observations": with_observations, "cell_block": None}  # fmt: skip


def test_sizes_refuse_what_cannot_be_planned():
    settings = WORKLOAD.settings(hb_config.load()["predictive"])
    with pytest.raises(ConfigError, match="--cells must be a positive whole number"):
        WORKLOAD.sizes(settings, {"cells": 0, "features": 3})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    data = tmp_path_factory.mktemp("predictive-workload") / "data"
    technical.simulate(40, 12, 2, seed=0, out=data)
    technical.fit(data, steps=20, seed=0)
    return data


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                     dashboard_address=None, memory_limit="2GiB") as cluster,
        Client(cluster) as c,
    ):  # fmt: skip
        yield c


def _values(data, out) -> dict:
    return {"data_dir": str(data), "samples": 24, "with_observations": True,
            "chunk_size": "6", "cell_block": None, "out": str(out)}  # fmt: skip


def _arrays(store) -> dict[str, np.ndarray]:
    group = zarr.open_group(store=str(store), mode="r")
    return {name: np.asarray(group[name][...]) for name in SITES}


def test_prepared_job_runs_through_the_pipeline_and_resumes(fitted, client, tmp_path):
    from hpcbatch.predictive.cli import sample_data_dir

    settings = hb_config.load(overrides={"seed": 7, "report-dir": str(tmp_path / "reports")})
    wsettings = WORKLOAD.settings(settings["predictive"])
    job = WORKLOAD.prepare(wsettings, _values(fitted, tmp_path / "w.zarr"), Invocation(seed=7))
    assert job.probe_kwargs["cells"] == 40 and job.probe_kwargs["with_observations"]
    run = run_job(job, settings, RunRequest(client=client, progress=False))
    assert run.report.status == "finished" and run.report.n_chunks == 4
    assert ledger_path(tmp_path / "w.zarr").exists()
    assert (tmp_path / "reports" / run.report.run_id / "report.json").exists()

    # the same samples as the in-process sampler of `hpcbatch predictive sample --cluster sync`
    sync = sample_data_dir(
        fitted, samples=24, with_observations=True, chunk_size=6, cell_block="auto",
        settings=settings, out=tmp_path / "s.zarr", sync=True, progress=False,
    )  # fmt: skip
    assert sync.report.status == "finished"
    expected = _arrays(tmp_path / "s.zarr")
    for name, value in _arrays(tmp_path / "w.zarr").items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)

    again = WORKLOAD.prepare(
        wsettings, _values(fitted, tmp_path / "w.zarr"), Invocation(seed=7, resume=True)
    )
    assert again.resuming and again.identity == job.identity
    resumed = run_job(again, settings, RunRequest(client=client, resume=True, progress=False))
    assert resumed.report.status == "already-finished" and resumed.report.chunks_done == 0
    with pytest.raises(ConfigError, match="already exists with a run ledger"):
        WORKLOAD.prepare(wsettings, _values(fitted, tmp_path / "w.zarr"), Invocation(seed=7))


def test_calibrate_measures_the_technical_footprint_with_its_probe(fitted, tmp_path):
    from hpcbatch.predictive.sampling import Calibrate, Execution, SampleOptions, sample_technical

    settings = hb_config.load()
    run = sample_technical(
        fitted, samples=12, with_observations=False,
        options=SampleOptions(chunk_size=6, out=tmp_path / "c.zarr", seed=3),
        execution=Execution(client="sync", settings=settings, progress=False),
        calibrate=Calibrate(True, (2, 4)),
    )  # fmt: skip
    assert run.plan.footprint.source.startswith("calibrated (probe sizes 2, 4;")
    assert run.report.status == "finished" and run.report.n_chunks == 2
    assert run.summary(tmp_path / "c.zarr").splitlines()[-1].startswith(f"  {tmp_path}/c.zarr/")
