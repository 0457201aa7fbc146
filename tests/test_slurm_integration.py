"""hpcbatch against a real single-node SLURM (started by the `slurm_cluster_env` fixture).

- a rendered sbatch script runs as a job and hpcbatch inside it sees the job's
  ``--mem`` (SLURM_MEM_PER_NODE) and plans the same workers as the rendered plan;
- ``open_cluster(backend="slurm")`` builds its ``SLURMCluster`` with
  :func:`hpcbatch.slurm.slurm_cluster`, scales to 2 worker jobs, runs chunks through
  :func:`hpcbatch.runner.run`, and every worker has exactly the plan's memory_limit;
- a job that exceeds its ``--mem`` is killed by SLURM and :func:`explain_job` (and
  ``hpcbatch slurm why``) say it was memory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcbatch import config as hb_config
from hpcbatch import slurm
from hpcbatch.cli import main
from hpcbatch.planner import Footprint, make_plan
from hpcbatch.resources import detect_resources

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]

MiB = 2**20


def _job_output(tmp_path: Path, job_id: str) -> str:
    files = list(tmp_path.glob(f"*{job_id}*.out"))
    assert files, f"no output file for job {job_id} in {tmp_path}"
    return files[0].read_text(errors="replace")


def test_rendered_script_runs_and_the_job_sees_its_mem(slurm_env: dict, tmp_path: Path) -> None:
    argv = [
        "slurm",
        "render",
        "stocks",
        "--mem",
        "1908M",
        "--cpus",
        "2",
        "--stocks",
        "60",
        "--time",
        "00:05:00",
        "--partition",
        slurm_env["partition"],
        "--python",
        sys.executable,
        "--job-name",
        "render-test",
    ]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    script = result.stdout
    mem = re.search(r"^#SBATCH --mem=(\d+)M$", script, re.M).group(1)
    cpus = re.search(r"^#SBATCH --cpus-per-task=(\d+)$", script, re.M).group(1)
    # Run the rendered script as it is, except the workload line: the job plans the same
    # workload from its own allocation instead (the workload itself runs in other tests).
    head, _, workload_line = script.rstrip("\n").rpartition("\n")
    assert workload_line.startswith('exec "$PYTHON" -m hpcbatch.cli stocks predict')
    job = tmp_path / "job.sbatch"
    job.write_text(head + '\nexec "$PYTHON" -m hpcbatch.cli plan stocks --stocks 60 --json\n')

    job_id = slurm.submit(job, sbatch_args=["--chdir", str(tmp_path)])
    info = slurm.wait_for_job(job_id, timeout=120)
    out = _job_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED", out
    assert info["TRES"].startswith(f"cpu={cpus},mem={mem}M")
    # `hpcbatch resources` at the top of the script: memory and CPUs come from SLURM
    mem_row = next(line for line in out.splitlines() if line.startswith("memory "))
    assert f"SLURM_MEM_PER_NODE ({mem} MB)" in mem_row, out
    cpu_row = next(line for line in out.splitlines() if line.startswith("cpus "))
    assert "SLURM_CPUS_PER_TASK" in cpu_row and f" {cpus} " in cpu_row
    # the plan made inside the job: same workers, memory from the job, no smaller limit
    plan_in_job = json.loads(out[out.index("{") :])
    rendered = re.search(r"#   (\d+) worker\(s\) x (\d+) thread", script)
    assert plan_in_job["n_workers"] == int(rendered.group(1))
    assert plan_in_job["resources"]["memory_bytes"] == int(mem) * MiB
    assert plan_in_job["resources"]["memory_source"].startswith("SLURM_MEM_PER_NODE")
    outside = CliRunner().invoke(
        main, ["plan", "stocks", "--stocks", "60", "--mem", "1908M", "--cpus", "2", "--json"]
    )
    assert plan_in_job["memory_limit_bytes"] >= json.loads(outside.stdout)["memory_limit_bytes"]


def _tiny_plan(settings: dict):
    """A plan of one worker per 1-CPU job with a 600 MB allocation."""
    footprint = Footprint(
        workload="slurmtest",
        item_name="item",
        n_items=40,
        per_item_bytes=1 * MiB,
        baseline_bytes=150 * MiB,
    )
    res = detect_resources(memory_bytes=600 * 10**6, cpus=1, plan_ahead=True)
    return make_plan(footprint, res, hb_config.plan_settings(settings, chunk_size=4))


def test_slurm_cluster_two_worker_jobs_run_chunks_with_the_plans_limit(
    slurm_env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpcbatch.cluster import open_cluster
    from hpcbatch.runner import make_chunks, run

    monkeypatch.chdir(tmp_path)  # worker jobs write slurm-<id>.out into the submit directory
    settings = hb_config.load()
    settings["cluster"].update(
        {
            "backend": "slurm",
            "queue": slurm_env["partition"],
            "walltime": "00:10:00",
            "interface": "lo",
            "dashboard-address": ":0",
            "jobs": 2,
            "start-timeout": 90,
            "local-directory": str(tmp_path / "dask"),
        }
    )
    plan = _tiny_plan(settings)
    assert plan.n_workers == 1
    spec = slurm.slurm_cluster_kwargs(plan, settings)
    job_mem = spec.kwargs["job_mem"]

    def task(chunk, ctx):  # a closure, so it is pickled by value for the worker jobs
        import os

        return {"items": chunk.size, "jobs": {os.environ.get("SLURM_JOB_ID", "none"): 1}}

    with open_cluster(plan, settings, backend="slurm", quiet=True) as client:
        client.wait_for_workers(2, timeout=90)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert len(workers) == 2
        assert {w["memory_limit"] for w in workers.values()} == {plan.memory_limit_bytes}
        jobs = client.run(lambda: __import__("os").environ.get("SLURM_MEM_PER_NODE"))
        assert set(jobs.values()) == {job_mem.rstrip("M")}
        report = run(
            make_chunks(40, plan.chunk_size),
            task,
            client,
            run_id="slurm-it",
            plan=plan,
            report_dir=tmp_path / "reports",
            progress=False,
        )
    assert report.status == "finished"
    assert report.items_done == 40 and report.chunks_done == plan.n_chunks == 10


def test_job_over_its_mem_is_killed_and_explained_as_memory(
    slurm_env: dict, tmp_path: Path
) -> None:
    job = tmp_path / "hog.sbatch"
    job.write_text(
        "#!/bin/bash\n#SBATCH --mem=200M\n#SBATCH --output=hog-%j.out\n"
        f'{sys.executable} -c "import time; b = bytearray(600 * 2**20); time.sleep(20)"\n'
        "echo survived\n"
    )
    job_id = slurm.submit(job, sbatch_args=["--chdir", str(tmp_path)])
    slurm.wait_for_job(job_id, timeout=60)
    death = slurm.explain_job(job_id, jobcomp=slurm_env["jobcomp"])
    assert death.reason == "memory", death
    assert "exceeded memory limit" in death.detail and "> 209715200" in death.detail
    assert "survived" not in _job_output(tmp_path, job_id)
    # the CLI says the same, in a fresh process that only has SLURM_CONF
    r = subprocess.run(
        [sys.executable, "-m", "hpcbatch.cli", "slurm", "why", job_id, "--json"],
        capture_output=True,
        text=True,
        env=slurm_env["env"],
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["reason"] == "memory"


@pytest.fixture(scope="module")
def tiny_market(tmp_path_factory) -> dict:
    """A 12-stock SQLite market and a tiny trained model (about 20 s)."""
    d = tmp_path_factory.mktemp("market")
    db = f"sqlite:///{d / 'stocks.db'}"
    hb = [sys.executable, "-m", "hpcbatch.cli", "stocks"]
    for cmd in (
        ["generate", "--db", db, "--stocks", "12", "--days", "150"],
        ["train", "--db", db, "--out", str(d / "model"), "--epochs", "1", "--max-stocks", "12",
         "--max-windows", "200", "--model-size", "tiny", "--lookback-days", "150"],
    ):  # fmt: skip
        r = subprocess.run(hb + cmd, capture_output=True, text=True, timeout=300, cwd=d)
        assert r.returncode == 0, r.stderr
    return {"db": db, "model": str(d / "model"), "path": d / "stocks.db"}


def test_rendered_stocks_job_predicts_and_a_resubmission_resumes(
    slurm_env: dict, tiny_market: dict, tmp_path: Path
) -> None:
    import sqlite3

    argv = ["slurm", "render", "stocks", "--mem-gb", "2", "--cpus", "2", "--stocks", "12",
            "--lookback-days", "150", "--walltime", "00:10:00", "--partition",
            slurm_env["partition"], "--python", sys.executable, "-o", str(tmp_path / "job.sbatch"),
            "--", "--db", tiny_market["db"], "--model", tiny_market["model"],
            "--lookback-days", "150", "--report-dir", str(tmp_path / "reports")]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    script = tmp_path / "job.sbatch"
    assert (
        script.read_text()
        .rstrip()
        .endswith("--report-dir " + str(tmp_path / "reports") + " --resume")
    )

    first = slurm.submit(script, sbatch_args=["--chdir", str(tmp_path)])
    info = slurm.wait_for_job(first, timeout=200)
    out = _job_output(tmp_path, first)
    assert info["JobState"] == "COMPLETED", out
    assert re.search(r"run '(stocks-\w+)' finished: \d+ chunks \(12 items", out), out
    run_id = re.search(r"run '(stocks-\w+)' finished", out).group(1)
    with sqlite3.connect(tiny_market["path"]) as conn:
        rows = conn.execute("select count(*) from stock_predictions").fetchone()[0]
    assert rows > 0
    assert (tmp_path / "reports" / run_id / "report.json").exists()

    # Submitting the same script again resumes the same run: nothing left to do.
    second = slurm.submit(script, sbatch_args=["--chdir", str(tmp_path)])
    assert slurm.wait_for_job(second, timeout=200)["JobState"] == "COMPLETED"
    out2 = _job_output(tmp_path, second)
    assert f"run '{run_id}' already finished" in out2, out2
    assert not re.search(r"\b[1-9]\d* rows upserted", out2), out2  # nothing written again
    assert slurm.explain_job(second).reason == "completed"


def _rows_of_run(db_path: Path, run_id: str) -> tuple[int, int, int]:
    """(rows, distinct (stock, day, model) keys, distinct stocks) the run wrote."""
    import sqlite3

    with sqlite3.connect(db_path) as conn:
        return conn.execute(
            "select count(*), count(distinct ts_code || trade_date || model_version), "
            "count(distinct ts_code) from stock_predictions where run_id = ?",
            (run_id,),
        ).fetchone()


def test_rendered_driver_job_runs_workers_as_separate_jobs(
    slurm_env: dict, tiny_market: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker jobs of 3.5 GB from a 2 GB driver job: the driver plans for them, not for
    its own allocation (which refused every worker size above 2 GB before)."""
    # sbatch passes the submitter's environment to the driver job
    monkeypatch.setenv("DASK_HPCBATCH__CLUSTER__INTERFACE", "lo")
    run_id = f"driver-{tmp_path.name}"
    argv = ["slurm", "render", "stocks", "--driver", "--mem", "3500M", "--cpus", "1",
            "--lookback-days", "150", "--walltime", "00:10:00",
            "--partition", slurm_env["partition"], "--python", sys.executable,
            "-o", str(tmp_path / "driver.sbatch"), "--", "--db", tiny_market["db"],
            "--model", tiny_market["model"], "--lookback-days", "150",
            "--report-dir", str(tmp_path / "reports"), "--run-id", run_id]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "driver.sbatch").read_text()
    assert "#   12 stocks in" in text  # counted in --db, no --stocks given
    assert "--cluster slurm --mem 3500M --cpus 1" in text
    worker_mem = re.search(r"--cpus-per-task=1 --mem=(\d+)M", text).group(1)
    assert int(worker_mem) > 2048  # each worker job is bigger than the driver job
    assert 2048 + int(worker_mem) <= slurm_env["real_memory_mb"]

    job_id = slurm.submit(tmp_path / "driver.sbatch", sbatch_args=["--chdir", str(tmp_path)])
    info = slurm.wait_for_job(job_id, timeout=200)
    out = _job_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED", out
    assert info["TRES"].startswith("cpu=1,mem=2G")
    assert "dask slurm cluster: 1 workers, 1 threads" in out, out
    # the dashboard listens on the driver node's loopback (the default), and says so
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/status$", out, re.M), out
    assert re.search(rf"run '{run_id}' finished: \d+ chunks \(12 items", out), out
    # every row once: each (stock, day, model) of every stock predicted written exactly once
    said = re.search(
        r"predictions: (\d+) rows upserted .* \((\d+) stocks predicted, (\d+) skipped", out
    )
    upserted, predicted, skipped = (int(x) for x in said.groups())
    assert predicted + skipped == 12 and predicted > 0, out
    rows, keys, stocks = _rows_of_run(tiny_market["path"], run_id)
    assert (rows, keys, stocks) == (upserted, upserted, predicted), out
    # the worker ran in its own job, of the size the rendered script announced
    worker_logs = [p for p in tmp_path.glob("slurm-*.out") if "dask_worker" in p.read_text()
                   or "distributed.worker" in p.read_text()]  # fmt: skip
    assert len(worker_logs) == 1
    worker_job = re.search(r"slurm-(\d+)\.out", worker_logs[0].name).group(1)
    winfo = slurm.job_info(worker_job) or {}
    assert winfo.get("TRES", "").startswith(f"cpu=1,mem={worker_mem}M")


def test_slurm_dashboard_listens_on_loopback_while_workers_reach_the_scheduler(
    slurm_env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    import psutil

    from hpcbatch.cluster import open_cluster

    monkeypatch.chdir(tmp_path)
    settings = hb_config.load()
    settings["cluster"].update(
        {
            "backend": "slurm",
            "queue": slurm_env["partition"],
            "walltime": "00:10:00",
            "interface": None,  # the scheduler on the node's addresses, as on a real cluster
            "dashboard-address": None,  # unset: hpcbatch's default
            "jobs": 1,
            "start-timeout": 90,
            "local-directory": str(tmp_path / "dask"),
        }
    )
    out = io.StringIO()
    with open_cluster(_tiny_plan(settings), settings, backend="slurm", out=out) as client:
        # a worker job reached the scheduler and runs tasks
        assert client.submit(lambda x: x + 1, 1).result(timeout=60) == 2
        info = client.scheduler_info()
        port = info["services"]["dashboard"]
        listening = {
            c.laddr.port: c.laddr.ip
            for c in psutil.Process().net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        }
        scheduler_port = int(info["address"].rsplit(":", 1)[1])
        assert listening[port] == "127.0.0.1"
        assert listening[scheduler_port] not in ("127.0.0.1", "::1")
        assert client.dashboard_link == f"http://127.0.0.1:{port}/status"
    assert f"dashboard: http://127.0.0.1:{port}/status" in out.getvalue()


def test_sigterm_mid_run_stops_cleanly_and_resubmission_runs_only_the_rest(
    slurm_env: dict, tiny_market: dict, tmp_path: Path, monkeypatch
) -> None:
    """What happens at the walltime warning (--signal=B:TERM@S): the signal reaches
    hpcbatch (the script execs it), finished chunks stay recorded, the rerun skips them."""
    import time

    # each chunk takes 0.5 s on the worker (tests/faults/inject.py, inherited by the job
    # through sbatch's environment): the run is still going when SIGTERM arrives, however
    # wide the runner's window for tiny chunks grows
    faults = Path(__file__).resolve().parent / "faults"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(faults), os.environ.get("PYTHONPATH")])))  # fmt: skip
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__PRELOAD", '["inject"]')
    monkeypatch.setenv("HPCBATCH_FAULT_DELAY_S", "0.5")

    argv = ["slurm", "render", "stocks", "--mem-gb", "2", "--cpus", "1", "--stocks", "12",
            "--batch-size", "1", "--lookback-days", "150", "--walltime", "00:10:00",
            "--partition", slurm_env["partition"], "--python", sys.executable,
            "-o", str(tmp_path / "job.sbatch"), "--", "--db", tiny_market["db"],
            "--model", tiny_market["model"], "--lookback-days", "150", "--batch-size", "1",
            "--report-dir", str(tmp_path / "reports"), "--run-id", f"int-{tmp_path.name}"]  # fmt: skip
    assert CliRunner().invoke(main, argv).exit_code == 0
    job_id = slurm.submit(tmp_path / "job.sbatch", sbatch_args=["--chdir", str(tmp_path)])
    out_file = tmp_path / f"hpcbatch-stocks-{job_id}.out"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the run loop has started (its handler is installed)
        if out_file.exists() and "progress: " in out_file.read_text():
            break
        time.sleep(0.1)
    r = subprocess.run(["scancel", "--signal=TERM", "--batch", job_id], capture_output=True,
                       text=True, env=slurm_env["env"], timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = slurm.wait_for_job(job_id, timeout=120)
    out = out_file.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "3:0"), out
    done = int(re.search(r"stopped by SIGTERM with (\d+) of 12 items done", out).group(1))
    assert done < 12, out
    death = slurm.explain_job(job_id)
    assert death.reason == "interrupted" and "rerun the same command with --resume" in death.detail

    again = slurm.submit(tmp_path / "job.sbatch", sbatch_args=["--chdir", str(tmp_path)])
    assert slurm.wait_for_job(again, timeout=200)["JobState"] == "COMPLETED"
    out2 = _job_output(tmp_path, again)
    assert f"{done} of 12 chunks already done, {12 - done} to run" in out2, out2
    assert re.search(rf"finished: {12 - done} chunks \({12 - done} items.*{done} skipped", out2)


@pytest.fixture(scope="module")
def fitted_predictive(tmp_path_factory) -> Path:
    """A simulated and fitted predictive data directory (200 cells x 40 features)."""
    d = tmp_path_factory.mktemp("predictive")
    hb = [sys.executable, "-m", "hpcbatch.cli", "predictive"]
    data = d / "data"
    for cmd in (["simulate", "--cells", "200", "--features", "40", "--out", str(data)],
                ["fit", str(data), "--steps", "50"]):  # fmt: skip
        r = subprocess.run(hb + cmd, capture_output=True, text=True, timeout=300, cwd=d)
        assert r.returncode == 0, r.stderr
    return data


def test_rendered_predictive_job_samples_into_zarr(
    slurm_env: dict, fitted_predictive: Path, tmp_path: Path
) -> None:
    data = fitted_predictive
    argv = ["slurm", "render", "predictive", "--cells", "200", "--features", "40",
            "--samples", "20", "--mem-gb", "2", "--cpus", "2", "--walltime", "00:10:00",
            "--partition", slurm_env["partition"], "--python", sys.executable,
            "-o", str(tmp_path / "pp.sbatch"), "--", str(data), "--samples", "20",
            "--out", str(tmp_path / "post.zarr"), "--report-dir", str(tmp_path / "reports")]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    job_id = slurm.submit(tmp_path / "pp.sbatch", sbatch_args=["--chdir", str(tmp_path)])
    info = slurm.wait_for_job(job_id, timeout=200)
    out = _job_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED", out
    assert "samples=20" in out, out
    import zarr

    store = zarr.open_group(str(tmp_path / "post.zarr"), mode="r")
    assert store["alpha_y"].shape == (20, 2, 40) and store["phi_y"].shape[0] == 20


def test_rendered_predictive_driver_job_plans_for_worker_jobs_bigger_than_itself(
    slurm_env: dict, fitted_predictive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`predictive sample --cluster slurm --mem 3.5GB` inside the 2 GB driver job."""
    import zarr

    monkeypatch.setenv("DASK_HPCBATCH__CLUSTER__INTERFACE", "lo")
    argv = ["slurm", "render", "predictive", "--driver", "--cells", "200", "--features", "40",
            "--samples", "20", "--mem", "3500M", "--cpus", "1", "--time", "00:10:00",
            "--partition", slurm_env["partition"], "--python", sys.executable,
            "-o", str(tmp_path / "ppd.sbatch"), "--", str(fitted_predictive), "--samples", "20",
            "--out", str(tmp_path / "post.zarr"), "--report-dir", str(tmp_path / "reports")]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "ppd.sbatch").read_text()
    assert "--cluster slurm --mem 3500M --cpus 1" in text
    assert int(re.search(r"--cpus-per-task=1 --mem=(\d+)M", text).group(1)) > 2048
    job_id = slurm.submit(tmp_path / "ppd.sbatch", sbatch_args=["--chdir", str(tmp_path)])
    info = slurm.wait_for_job(job_id, timeout=200)
    out = _job_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED", out
    assert info["TRES"].startswith("cpu=1,mem=2G")
    assert "dask slurm cluster: 1 workers, 1 threads" in out, out
    store = zarr.open_group(str(tmp_path / "post.zarr"), mode="r")
    assert store["alpha_y"].shape == (20, 2, 40) and store["phi_y"].shape[0] == 20
