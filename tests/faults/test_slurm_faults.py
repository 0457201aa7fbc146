"""Faults on a real SLURM cluster: workers are SLURM jobs submitted by hpcbatch's own
``--cluster slurm`` (dask-jobqueue), and one of them is broken half way through a run.

- ``scancel`` of the worker job (a user, an admin, a preemption): every worker of the
  job dies at once.  dask-jobqueue alone never resubmits a lost job, so the run would
  wait for workers that never come; :class:`hpcbatch.cluster.WorkerJobWatch` sees the
  job end, submits a replacement job and the run finishes.  The report names the
  death ``cancelled`` with the cancelled job's id (from ``scontrol``/``sacct``, as
  ``hpcbatch slurm why`` does) and the replacement's id.
- SIGKILL of one worker process inside a running job (the kernel OOM killer): the job
  lives on, its nanny restarts the worker and the run finishes; the death is not
  blamed on the job.
- the whole job killed by SLURM for exceeding its ``--mem`` (nanny and all): the job is
  replaced, the report says ``memory`` with the job id and SLURM's line, and the chunk
  counts as a memory failure: split and retried until it fits, as with a nanny kill.

Either way the stock predictions equal an undisturbed run's (row count and checksum,
each row once), the ledger records every chunk exactly once, and the predictive zarr
store equals an undisturbed run's array for array.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import services
from faultkit import (
    BATCH,
    HPCBATCH,
    N_STOCKS,
    checksum,
    done_chunks,
    fault_env,
    fitted_data,
    fresh_db,
    ledger_chunk_ids,
    prediction_rows,
    wait_until,
)

from hpcbatch.predictive.sampling import ledger_path

pytestmark = [pytest.mark.timeout(300)]

STOCK_CHUNKS = N_STOCKS // BATCH
SITES = ("alpha_y", "mu_ntc", "phi_y", "y")
PP_CHUNKS = 12  # 48 samples in chunks of 4


# ------------------------------------------------------------------ helpers ----


def slurm_config(directory: Path, slurm: dict, extra: str = "", cluster_extra: str = "") -> Path:
    """A config file sending the workers to the test SLURM: one job of 2 workers."""
    path = directory / "slurm.yaml"
    path.write_text(
        "hpcbatch:\n"
        f"{extra}"
        "  cluster:\n"
        f"    queue: {slurm['partition']}\n"
        '    walltime: "00:10:00"\n'
        "    interface: lo\n"
        '    dashboard-address: "127.0.0.1:0"\n'
        "    start-timeout: 90\n"
        f"    local-directory: {directory / 'dask'}\n"
        f"{cluster_extra}"
    )
    return path


def start(cmd: list[str], directory: Path, slurm: dict, **faults) -> subprocess.Popen:
    """The driver, in ``directory`` (the worker jobs write slurm-<id>.out there)."""
    env = fault_env(**faults)
    env["SLURM_CONF"] = slurm["SLURM_CONF"]
    return subprocess.Popen(
        cmd, cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def running_job(slurm: dict) -> str:
    """The id of the one running worker job."""
    r = subprocess.run(
        ["squeue", "-h", "-t", "RUNNING", "-o", "%i"],
        env=slurm["env"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    jobs = r.stdout.split()
    assert len(jobs) == 1, f"expected one running worker job, squeue says {jobs}: {r.stderr}"
    return jobs[0]


def break_worker(how: str, slurm: dict) -> str:
    """``scancel`` the worker job, or SIGKILL one worker process inside it; the job id."""
    job_id = running_job(slurm)
    if how == "scancel":
        r = subprocess.run(
            ["scancel", job_id], env=slurm["env"], capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 0, r.stderr
        return job_id
    workers = []
    for pid in services.processes_with_env("SLURM_JOB_ID", job_id):
        try:
            if "spawn_main" in " ".join(psutil.Process(pid).cmdline()):
                workers.append(psutil.Process(pid))
        except psutil.Error:
            continue
    assert workers, f"no worker process found in job {job_id}"
    workers[0].send_signal(signal.SIGKILL)  # as the OOM killer does: the nanny lives on
    return job_id


def the_report(reports: Path) -> dict:
    found = list(reports.rglob("report.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def n_marks(directory: Path) -> int:
    return len(list(directory.iterdir())) if directory.exists() else 0


def check_deaths(report: dict, how: str, job_id: str, err: str) -> None:
    """What the report says about the broken worker(s)."""
    deaths = report["worker_deaths"]
    assert deaths, "the broken worker is not in the report"
    if how == "scancel":
        assert {d["reason"] for d in deaths} == {"cancelled"}, deaths
        assert {d["slurm_job_id"] for d in deaths} == {job_id}, deaths
        assert all(f"SLURM job {job_id} CANCELLED" in d["detail"] for d in deaths), deaths
        replaced = {d.get("replacement_job_id") for d in deaths}
        assert len(replaced) == 1 and None not in replaced and job_id not in replaced, deaths
        assert f"SLURM worker job {job_id} ended (CANCELLED" in err, err
    else:  # the job lived on: the death is the worker process's own (exit -9)
        assert all("slurm_job_id" not in d for d in deaths), deaths
        assert any(d["reason"] == "memory" and "SIGKILL" in d["detail"] for d in deaths), deaths
        assert "ended (" not in err, err


# ------------------------------------------------------------------- stocks ----


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("how", ["scancel", "SIGKILL"])
def test_stocks_worker_job_broken_half_way_loses_and_duplicates_nothing(
    slurm_cluster_env, stock_inputs, stocks_baseline, tmp_path, how
) -> None:
    url = fresh_db(stock_inputs, tmp_path)
    marks = tmp_path / "marks"
    cmd = [HPCBATCH, "stocks", "predict", "--cluster", "slurm", "--db", url,
           "--model", str(stock_inputs["model"]), "--batch-size", "2", "--lookback-days", "180",
           "--predict-days", "5", "--use-gpu", "false", "--mem-gb", "3", "--cpus", "2",
           "--report-dir", str(tmp_path / "reports"),
           "--config", str(slurm_config(tmp_path, slurm_cluster_env))]  # fmt: skip
    proc = start(cmd, tmp_path, slurm_cluster_env, delay_s=0.7, mark_dir=marks)
    wait_until(lambda: done_chunks(url) >= 3, proc, timeout=150, what="3 chunks done")
    assert done_chunks(url) < STOCK_CHUNKS
    job_id = break_worker(how, slurm_cluster_env)
    t_broken = time.monotonic()
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 0, err
    print(f"{how}: finished {time.monotonic() - t_broken:.1f} s after the fault")

    report = the_report(tmp_path / "reports")
    assert report["status"] == "finished"
    assert report["chunks_done"] == STOCK_CHUNKS and report["chunks_failed"] == 0
    check_deaths(report, how, job_id, err)
    print("worker deaths:", json.dumps(report["worker_deaths"], indent=1))

    rows = prediction_rows(url)
    keys = [r[:3] for r in rows]
    assert len(keys) == len(set(keys))  # each prediction once
    assert len(rows) == len(stocks_baseline["rows"])
    assert checksum(rows) == stocks_baseline["checksum"]
    recorded = ledger_chunk_ids(url)
    assert sorted(recorded) == [f"c{i:06d}" for i in range(STOCK_CHUNKS)]  # each chunk once
    assert n_marks(marks) > STOCK_CHUNKS  # a chunk in flight was lost and ran again


@pytest.mark.slurm
@pytest.mark.slow
def test_stocks_worker_job_killed_by_slurm_for_memory_is_split_and_finishes(
    slurm_cluster_env, stock_inputs, stocks_baseline, tmp_path
) -> None:
    """The job's --mem (1200M) is below what its workers' limits add up to, and Dask's
    terminate threshold is off: the chunk holding 000005.SZ allocates 900 MB and SLURM
    (not the nanny) kills the whole job.  The job is replaced, the chunk counts as a
    memory failure (split, not merely retried) and its halves fit."""
    url = fresh_db(stock_inputs, tmp_path)
    config = slurm_config(
        tmp_path,
        slurm_cluster_env,
        extra="  thresholds:\n    terminate: false\n",
        cluster_extra='    job-extra-directives: ["--mem=1200M"]\n',
    )
    cmd = [HPCBATCH, "stocks", "predict", "--cluster", "slurm", "--db", url,
           "--model", str(stock_inputs["model"]), "--batch-size", "2", "--lookback-days", "180",
           "--predict-days", "5", "--use-gpu", "false", "--mem-gb", "3", "--cpus", "2",
           "--report-dir", str(tmp_path / "reports"), "--config", str(config)]  # fmt: skip
    proc = start(cmd, tmp_path, slurm_cluster_env, hog_mb=900, hog_above=1, hog_item="000005.SZ")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert "exceeded memory limit" in err and "submitting a replacement job" in err, err
    assert "split into 1 + 1" in err, err

    report = the_report(tmp_path / "reports")
    assert report["status"] == "finished" and report["chunks_split"] >= 1
    killed = [d for d in report["worker_deaths"] if "slurm_job_id" in d]
    assert killed and {d["reason"] for d in killed} == {"memory"}, report["worker_deaths"]
    assert all("exceeded memory limit" in d["detail"] for d in killed), killed
    assert any("c000002" in d["tasks"] for d in killed), killed

    rows = prediction_rows(url)
    assert len(rows) == len(stocks_baseline["rows"])
    assert checksum(rows) == stocks_baseline["checksum"]
    recorded = ledger_chunk_ids(url)
    assert len(recorded) == len(set(recorded))
    expected = {f"c{i:06d}" for i in range(STOCK_CHUNKS)} - {"c000002"}
    assert set(recorded) == expected | {"c000002.0", "c000002.1"}


# --------------------------------------------------------------- predictive ----


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    return fitted_data(tmp_path_factory.mktemp("slurm-predictive"), 60, 20)


def sample_cmd(data: Path, out: Path, reports: Path, *extra: str) -> list[str]:
    return [HPCBATCH, "predictive", "sample", str(data), "--samples", "48", "--with-observations",
            "--chunk-size", "4", "--cpus", "2", "--mem", "3GB", "--seed", "7", "--out", str(out),
            "--report-dir", str(reports), *extra]  # fmt: skip


def arrays(store: Path) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(store=str(store), mode="r")
    return {name: np.asarray(group[name][...]) for name in SITES}


@pytest.fixture(scope="module")
def undisturbed(fitted, tmp_path_factory) -> dict[str, np.ndarray]:
    """The same sampling in one process (``--cluster sync``, no Dask), nothing broken:
    chunk seeds depend only on the run seed and the chunk id, so any cluster must match."""
    base = tmp_path_factory.mktemp("slurm-predictive-undisturbed")
    r = subprocess.run(
        sample_cmd(fitted, base / "u.zarr", base / "reports", "--cluster", "sync"),
        env=fault_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return arrays(base / "u.zarr")


def pp_done(store: Path) -> list[str]:
    """Every chunk id the run's ledger holds, duplicates kept (none before it exists)."""
    try:
        return ledger_chunk_ids(f"sqlite:///{ledger_path(store)}")
    except sqlite3.Error:  # no ledger file, or its tables not created yet
        return []


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("how", ["scancel", "SIGKILL"])
def test_predictive_worker_job_broken_half_way_gives_the_same_samples(
    slurm_cluster_env, fitted, undisturbed, tmp_path, how
) -> None:
    store = tmp_path / "s.zarr"
    marks = tmp_path / "marks"
    cmd = sample_cmd(fitted, store, tmp_path / "reports", "--cluster", "slurm",
                     "--config", str(slurm_config(tmp_path, slurm_cluster_env)))  # fmt: skip
    proc = start(cmd, tmp_path, slurm_cluster_env, delay_s=0.7, mark_dir=marks)
    wait_until(lambda: len(pp_done(store)) >= 3, proc, timeout=150, what="3 chunks done")
    assert len(pp_done(store)) < PP_CHUNKS
    job_id = break_worker(how, slurm_cluster_env)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 0, err

    report = the_report(tmp_path / "reports")
    assert report["status"] == "finished" and report["chunks_done"] == PP_CHUNKS
    check_deaths(report, how, job_id, err)
    got = arrays(store)
    for name in SITES:
        np.testing.assert_array_equal(got[name], undisturbed[name], err_msg=name)
    assert sorted(pp_done(store)) == [f"c{i:06d}" for i in range(PP_CHUNKS)]
    assert n_marks(marks) > PP_CHUNKS


# -------------------------------------------------- the report's death reasons ----


def test_a_worker_whose_slurm_job_ended_takes_slurms_reason_and_job_id() -> None:
    from hpcbatch.report import add_slurm_job_reasons

    ended = {
        "tcp://a:1": {"job_id": "7", "state": "CANCELLED", "reason": "cancelled",
                      "detail": "*** JOB 7 CANCELLED AT ...", "replacement_job_id": "8",
                      "replacement_wait_s": 6.1},
        "tcp://b:1": {"job_id": "9", "state": "FAILED", "reason": "memory",
                      "detail": "Exceeded job memory limit"},
        "tcp://c:1": {"job_id": "10", "state": "COMPLETED", "reason": "completed",
                      "detail": "finished with exit code 0"},
    }  # fmt: skip
    deaths = [
        {"worker": "tcp://a:1", "reason": "connection", "detail": "lost connection"},
        {"worker": "tcp://b:1", "reason": "connection", "detail": "lost connection"},
        {"worker": "tcp://c:1", "reason": "walltime", "detail": "retired gracefully"},
        {"worker": "tcp://d:1", "reason": "memory", "detail": "the nanny killed the worker"},
    ]
    got = add_slurm_job_reasons(deaths, ended.get)
    assert [d["reason"] for d in got] == ["cancelled", "memory", "walltime", "memory"]
    assert got[0]["detail"] == "SLURM job 7 CANCELLED: *** JOB 7 CANCELLED AT ..."
    assert (got[0]["slurm_job_id"], got[0]["replacement_job_id"]) == ("7", "8")
    assert got[1]["slurm_job_id"] == "9" and "Exceeded job memory" in got[1]["detail"]
    assert got[2]["slurm_state"] == "COMPLETED" and got[2]["detail"] == "retired gracefully"
    assert got[3] == deaths[3]  # a worker of a job still running: Dask's own reason
    assert add_slurm_job_reasons(deaths, None) is deaths  # not a SLURM cluster
