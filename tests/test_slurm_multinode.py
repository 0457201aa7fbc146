"""hpcbatch on a 3-node SLURM (three slurmd on this host, `slurm_multinode_env`).

- ``slurm render stocks --driver --jobs 3``: the driver job's three worker jobs run on
  three different nodes (one worker job fits a node: 3.1 GB of 5.9 GB) and the run
  finishes with every stock predicted once;
- a node dies mid-run (its slurmd and job steps SIGKILLed): its worker job is noticed,
  explained as ``node`` (SLURM's NODE_FAIL, or the node DOWN after Dask cancelled the
  job whose workers it lost), replaced by a job on another node, and the predictions
  equal the undisturbed run's;
- ``sbatch --nodes=2``: ``hpcbatch resources`` in the job reports the batch node's
  share and says that the allocation has two nodes.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcbatch import slurm
from hpcbatch.cli import main

FAULTS = Path(__file__).resolve().parent / "faults"
sys.path.insert(0, str(FAULTS))
from faultkit import checksum, make_stock_inputs  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

N_STOCKS = 12
DAYS = 150
WORKER_MEM = "3600M"  # a 3216M worker job: one per 6000 MB node, beside the 2G driver


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> dict:
    """12 stocks x 150 days in SQLite and a tiny model with fixed weights (~4 s)."""
    return make_stock_inputs(tmp_path_factory.mktemp("mn-market"), N_STOCKS, DAYS)


def _rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "select ts_code, trade_date, model_version, predicted_return, predicted_direction, "
            "confidence from stock_predictions order by ts_code, trade_date, model_version"
        ).fetchall()


def _chunks(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("select chunk_id from hpcbatch_chunks")]


def _submit_driver(mn: dict, market: dict, d: Path, jobs: int, monkeypatch, delay_s: float):
    """Render and submit `stocks predict --cluster slurm` as a driver job; its job id."""
    import shutil

    shutil.copy(market["db"], d / "s.db")
    # sbatch passes the submitter's environment to the driver job, and it to its workers
    monkeypatch.setenv("DASK_HPCBATCH__CLUSTER__INTERFACE", "lo")
    monkeypatch.setenv("PYTHONPATH", str(FAULTS))
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__PRELOAD", '["inject"]')
    monkeypatch.setenv("HPCBATCH_FAULT_DELAY_S", str(delay_s))
    argv = ["slurm", "render", "stocks", "--driver", "--jobs", str(jobs), "--mem", WORKER_MEM,
            "--cpus", "1", "--lookback-days", str(DAYS), "--time", "00:10:00",
            "--partition", mn["partition"], "--python", sys.executable, "--chunk-size", "1",
            "-o", str(d / "driver.sbatch"), "--", "--db", f"sqlite:///{d / 's.db'}",
            "--model", str(market["model"]), "--lookback-days", str(DAYS), "--chunk-size", "1",
            "--report-dir", str(d / "reports"), "--run-id", d.name]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    assert f"Up to {jobs} such job(s)" in (d / "driver.sbatch").read_text()
    return slurm.submit(d / "driver.sbatch", sbatch_args=["--chdir", str(d)])


def _worker_jobs(mn: dict, driver: str) -> dict[str, str]:
    """{job id: node} of every worker job (name hpcbatch-stocks) SLURM ran, from sacct."""
    r = mn["cluster_obj"].run("sacct", "-X", "-n", "-P", "-o", "JobID,JobName,NodeList,State")
    jobs = {}
    for line in r.stdout.splitlines():
        job_id, name, node, _state = line.split("|")
        if name == "hpcbatch-stocks" and int(job_id) > int(driver):
            jobs[job_id] = node
    return jobs


def _report(d: Path) -> dict:
    return json.loads(next((d / "reports").rglob("report.json")).read_text())


@pytest.fixture(scope="module")
def undisturbed(slurm_multinode_env, market, tmp_path_factory) -> dict:
    """The 3-job driver run, nothing broken: its job ids, nodes, output and rows."""
    mp = pytest.MonkeyPatch()
    for key in [k for k in __import__("os").environ if k.startswith("SLURM_")]:
        mp.delenv(key)
    mp.setenv("SLURM_CONF", slurm_multinode_env["SLURM_CONF"])
    d = tmp_path_factory.mktemp("mn-three")
    t0 = time.monotonic()
    try:
        job_id = _submit_driver(slurm_multinode_env, market, d, 3, mp, delay_s=1.5)
        info = slurm.wait_for_job(job_id, timeout=240)
        workers = _worker_jobs(slurm_multinode_env, job_id)
    finally:
        mp.undo()
    out = next(d.glob(f"*-{job_id}.out")).read_text()
    print(f"3-job driver run: {time.monotonic() - t0:.1f} s")
    return {"dir": d, "job": job_id, "info": info, "workers": workers, "out": out,
            "rows": _rows(d / "s.db"), "chunks": _chunks(d / "s.db")}  # fmt: skip


def test_driver_with_three_jobs_runs_its_workers_on_three_nodes(
    slurm_multinode_env: dict, undisturbed: dict
) -> None:
    out = undisturbed["out"]
    assert undisturbed["info"]["JobState"] == "COMPLETED", out
    assert re.search(rf"run '{undisturbed['dir'].name}' finished: {N_STOCKS} chunks", out), out
    nodes = undisturbed["workers"]
    assert len(nodes) == 3, nodes
    assert sorted(nodes.values()) == sorted(slurm_multinode_env["nodes"]), nodes
    # each worker job reached the scheduler: its log names the driver's scheduler
    for job_id in nodes:
        log = (undisturbed["dir"] / f"slurm-{job_id}.out").read_text()
        assert "Registered to:" in log, log
    said = re.search(r"predictions: (\d+) rows upserted .*\((\d+) stocks predicted", out)
    rows = undisturbed["rows"]
    assert said and int(said.group(1)) == len(rows) > 0, out
    assert len({r[:3] for r in rows}) == len(rows)  # every (stock, day, model) once
    assert sorted(undisturbed["chunks"]) == [f"c{i:06d}" for i in range(N_STOCKS)]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _running_workers(mn: dict, driver: str) -> dict[str, str]:
    r = mn["cluster_obj"].run("squeue", "-h", "-t", "RUNNING", "-o", "%i|%j|%N")
    return {
        i: n
        for i, name, n in (line.split("|") for line in r.stdout.split())
        if name == "hpcbatch-stocks" and int(i) > int(driver)
    }


@pytest.mark.slow
def test_a_node_dies_mid_run_its_worker_job_is_explained_and_replaced_elsewhere(
    slurm_mn: dict, market: dict, undisturbed: dict, tmp_path: Path, monkeypatch
) -> None:
    """Two worker jobs; the node of the one not beside the driver dies. Dask cancels the
    job 15 s later and submits it again (the third node is the only one with room);
    SLURM calls the node DOWN 25-30 s after the kill, so chunks of 8 s keep the run going
    past that (about 75 s in all)."""
    cluster = slurm_mn["cluster_obj"]
    t0 = time.monotonic()
    job_id = _submit_driver(slurm_mn, market, tmp_path, 2, monkeypatch, delay_s=8)
    _wait(lambda: len(_running_workers(slurm_mn, job_id)) == 2, 90, "two worker jobs")
    _wait(lambda: len(_done(tmp_path)) >= 2, 90, "two chunks done")
    driver_node = cluster.run("squeue", "-h", "-j", job_id, "-o", "%N").stdout.strip()
    victim_job, victim = next(
        (j, n) for j, n in _running_workers(slurm_mn, job_id).items() if n != driver_node
    )
    cluster.kill_node(victim)
    t_kill = time.monotonic()
    try:
        info = slurm.wait_for_job(job_id, timeout=240)
        out = next(tmp_path.glob(f"*-{job_id}.out")).read_text()
        print(f"killed {victim} at +{t_kill - t0:.0f} s; run ended +{time.monotonic() - t0:.0f} s")
        assert info["JobState"] == "COMPLETED", out
        # noticed and explained: the watch's line, and the report's worker death
        assert f"SLURM worker job {victim_job} " in out, out
        assert re.search(rf"SLURM worker job {victim_job} (ended \(NODE_FAIL -> node|was lost "
                         rf"with its node {victim} \()", out), out  # fmt: skip
        print("\n".join(line for line in out.splitlines() if "SLURM worker job" in line))
        deaths = [d for d in _report(tmp_path)["worker_deaths"] if d.get("slurm_job_id")]
        print("report's worker deaths:", deaths)
        assert deaths and all(d["reason"] == "node" for d in deaths), deaths
        assert {d["slurm_job_id"] for d in deaths} == {victim_job}, deaths
        assert all(victim in d["detail"] for d in deaths), deaths
        # replaced on another node
        workers = _worker_jobs(slurm_mn, job_id)
        assert len(workers) == 3, workers
        replacement = max(workers, key=int)
        assert workers[replacement] not in (victim, ""), workers
        # the same result as undisturbed, every row once
        assert _rows(tmp_path / "s.db") == undisturbed["rows"]
        assert checksum(_rows(tmp_path / "s.db")) == checksum(undisturbed["rows"])
        assert sorted(_done(tmp_path)) == [f"c{i:06d}" for i in range(N_STOCKS)]
        # `hpcbatch slurm why` alone: SLURM's state (CANCELLED by Dask, or NODE_FAIL) and
        # the node that is down now
        why = slurm.explain_job(victim_job)
        print("slurm why:", why, "| sacct:", cluster.run(
            "sacct", "-D", "-n", "-P", "-j", victim_job, "-o", "JobID,State,ExitCode,NodeList"
        ).stdout.split())  # fmt: skip
        assert why.reason in ("node", "cancelled") and victim in why.detail, why
    finally:
        cluster.start_slurmd(victim, timeout=90)  # back to idle for the other tests


def _done(d: Path) -> list[str]:
    try:
        return _chunks(d / "s.db")
    except sqlite3.Error:
        return []


def test_two_node_allocation_is_detected_as_this_nodes_share(
    slurm_mn: dict, tmp_path: Path
) -> None:
    script = tmp_path / "two.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --cpus-per-task=2\n"
        "#SBATCH --mem=1500M\n#SBATCH --output=two-%j.out\n"
        f"{sys.executable} -m hpcbatch.cli resources --json\n"
    )
    job_id = slurm.submit(script, sbatch_args=["--chdir", str(tmp_path)])
    info = slurm.wait_for_job(job_id, timeout=90)
    out = (tmp_path / f"two-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", out
    assert len(info["NodeList"]) and info["NumNodes"] == "2", info
    found = json.loads(out[out.index("{") :])
    assert found["memory_bytes"] == 1500 * 2**20
    assert found["memory_source"] == "SLURM_MEM_PER_NODE (1500 MB)"
    assert found["cpus"] == 2
    note = next(n for n in found["notes"] if "2 nodes" in n)
    assert info["NodeList"] in note and "this node" in note, found["notes"]


# `scontrol show node -o` of a node whose slurmd was killed (captured from this fixture)
DOWN_NODE = (
    "NodeName=hbn2 Arch=x86_64 CoresPerSocket=2 CPUAlloc=0 CPUEfctv=2 CPUTot=2 CPULoad=0.51 "
    "AvailableFeatures=(null) ActiveFeatures=(null) Gres=(null) NodeAddr=127.0.0.1 "
    "NodeHostName=vm Port=41001 RealMemory=6000 AllocMem=0 FreeMem=N/A Sockets=1 Boards=1 "
    "State=DOWN+NOT_RESPONDING ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A "
    "Partitions=debug Reason=Not responding [root@2026-12-06T14:40:01]\n"
    "NodeName=hbn3 Arch=x86_64 CoresPerSocket=2 CPUAlloc=1 NodeAddr=127.0.0.1 "
    "State=MIXED ThreadsPerCore=1 Partitions=debug\n"
)


def test_node_trouble_names_the_down_node_and_its_reason() -> None:
    calls = []

    def run(argv):
        calls.append(list(argv))
        return 0, DOWN_NODE, ""

    got = slurm.node_trouble("hbn[2-3]", run=run)
    assert got == "hbn2 (DOWN+NOT_RESPONDING: Not responding [root@2026-12-06T14:40:01])"
    assert calls == [["scontrol", "show", "node", "-o", "hbn[2-3]"]]
    assert slurm.node_trouble("None assigned", run=run) is None and len(calls) == 1
    assert slurm.node_trouble("hbn3", run=lambda a: (0, DOWN_NODE.splitlines()[1], "")) is None
