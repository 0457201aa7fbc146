"""`hpcbatch slurm why` against real SLURM accounting (slurmdbd + MariaDB of the
`slurm_multinode_env` fixture): jobs killed for memory, walltime, cancellation and node
failure, each compared with what `sacct` itself prints for the job, and the same
explanation read back through `sacct` alone (as once `scontrol` has forgotten the job).

Memory: with the cgroup plugins (where cgroup v1 is writable) the job is
OUT_OF_MEMORY 0:125 in sacct; without them (jobacct_gather's OverMemoryKill) FAILED 0:9,
which only the job's output tells apart from any other SIGKILL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcbatch import slurm

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]


def _sacct(mn: dict, job_id: str) -> dict[str, list[str]]:
    """{JobID: [State, ExitCode, NodeList]} of the job and its steps, as sacct prints them."""
    r = mn["cluster_obj"].run(
        "sacct", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,NodeList"
    )
    assert r.returncode == 0, r.stderr
    return {f[0]: f[1:] for f in (line.split("|") for line in r.stdout.splitlines())}


def _why(mn: dict, job_id: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "hpcbatch.cli", "slurm", "why", job_id, "--json"],
        capture_output=True, text=True, env=mn["env"], timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _sbatch(tmp_path: Path, *args: str, wrap: str) -> str:
    r = subprocess.run(
        ["sbatch", "--parsable", "--chdir", str(tmp_path), "-o", "j-%j.out", *args,
         "--wrap", wrap], capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _wait_sacct(mn: dict, job_id: str, timeout: float = 60) -> dict[str, list[str]]:
    """sacct's lines once slurmdbd has the job's final state."""
    deadline = time.monotonic() + timeout
    while True:
        rows = _sacct(mn, job_id)
        # slurmdbd may not have the job yet (no line at all): keep waiting
        if slurm.job_state({"JobState": rows.get(job_id, [""])[0]}) in slurm.FINISHED_STATES:
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)


def test_memory_kill_explained_as_sacct_says(slurm_mn: dict, tmp_path: Path) -> None:
    job = _sbatch(tmp_path, "--mem=100M",
                  wrap=f'{sys.executable} -c "b = bytearray(600 * 2**20); import time; '
                  'time.sleep(20)"')  # fmt: skip
    slurm.wait_for_job(job, timeout=60)
    rows = _wait_sacct(slurm_mn, job)
    why = _why(slurm_mn, job)
    print("sacct:", rows, "| why:", why)
    assert why["reason"] == "memory", why
    if slurm_mn["cgroup"]:
        assert rows[job][:2] == ["OUT_OF_MEMORY", "0:125"], rows
        assert rows[f"{job}.batch"][0] == "OUT_OF_MEMORY", rows
        assert (why["state"], why["exit_code"]) == ("OUT_OF_MEMORY", "0:125")
        assert "oom-kill" in why["detail"], why
        from_sacct = slurm.sacct_record(job)
        assert slurm.classify_job(from_sacct)[0] == "memory", from_sacct
    else:
        assert rows[job][:2] == ["FAILED", "0:9"], rows
        assert "exceeded memory limit" in why["detail"], why


def test_cancelled_job_explained_as_sacct_says(slurm_mn: dict, tmp_path: Path) -> None:
    job = _sbatch(tmp_path, wrap="sleep 300")
    deadline = time.monotonic() + 60
    while (slurm.job_info(job) or {}).get("JobState") != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    slurm_mn["cluster_obj"].run("scancel", job)
    rows = _wait_sacct(slurm_mn, job)
    why = _why(slurm_mn, job)
    print("sacct:", rows, "| why:", why)
    assert rows[job][0].startswith("CANCELLED by "), rows  # "CANCELLED by <uid>"
    assert why["state"] == "CANCELLED" and why["reason"] == "cancelled", why
    assert slurm.classify_job(slurm.sacct_record(job))[0] == "cancelled"


@pytest.mark.slow
def test_walltime_and_node_failure_explained_as_sacct_says(slurm_mn: dict, tmp_path: Path) -> None:
    """--time=1 ends at 74-81 s (limits are checked every ~30 s); a node killed at the
    same time is DOWN 25-30 s later and its --no-requeue job NODE_FAIL."""
    cluster = slurm_mn["cluster_obj"]
    first, victim = slurm_mn["nodes"][0], slurm_mn["nodes"][-1]
    timeout_job = _sbatch(tmp_path, "--time=1", "-w", first, wrap="sleep 150")
    node_job = _sbatch(tmp_path, "--no-requeue", "-w", victim, wrap="sleep 300")
    deadline = time.monotonic() + 60
    while (slurm.job_info(node_job) or {}).get("JobState") != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    t0 = time.monotonic()
    cluster.kill_node(victim)
    try:
        node_rows = _wait_sacct(slurm_mn, node_job, timeout=90)
        t_down = time.monotonic() - t0
        node_why = _why(slurm_mn, node_job)
        time_rows = _wait_sacct(slurm_mn, timeout_job, timeout=150)
        time_why = _why(slurm_mn, timeout_job)
    finally:
        cluster.start_slurmd(victim, timeout=90)
    print(f"NODE_FAIL after {t_down:.0f} s; sacct: {node_rows} | why: {node_why}")
    print(f"sacct: {time_rows} | why: {time_why}")
    assert node_rows[node_job][0] == "NODE_FAIL" and node_rows[node_job][2] == victim
    assert node_why["state"] == "NODE_FAIL" and node_why["reason"] == "node", node_why
    assert victim in node_why["detail"], node_why
    assert slurm.classify_job(slurm.sacct_record(node_job))[0] == "node"
    assert time_rows[timeout_job][0] == "TIMEOUT", time_rows
    assert time_why["state"] == "TIMEOUT" and time_why["reason"] == "walltime", time_why
    assert "DUE TO TIME LIMIT" in time_why["detail"], time_why
    assert slurm.classify_job(slurm.sacct_record(timeout_job))[0] == "walltime"
