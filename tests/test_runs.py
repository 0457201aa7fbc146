"""Seeing a run: progress watchers, progress.json, ``hpcbatch status`` / ``runs``."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import runs_helpers as rsh
import runtime_helpers as rh

from hpcbatch.cluster import open_cluster
from hpcbatch.config import load
from hpcbatch.runner import make_chunks, run

pytestmark = pytest.mark.timeout(300)
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def client():
    plan = rh.small_plan(100, 4)
    settings = load(overrides={"cluster": {"dashboard-address": "127.0.0.1:0"}})
    with open_cluster(plan, settings, quiet=True) as c:
        yield c


def test_watchers_get_snapshots_and_a_raising_watcher_is_dropped(client, caplog):
    seen: list[dict] = []
    bad_calls = []

    def bad(snapshot: dict) -> None:
        bad_calls.append(snapshot)
        raise RuntimeError("watcher bug")

    task = functools.partial(rsh.busy, delay=0.1)
    with caplog.at_level(logging.WARNING, logger="hpcbatch.runner"):
        report = run(make_chunks(24, 4), task, client, run_id="watched", progress=False,
                     max_in_flight=2, watchers=(seen.append, bad))  # fmt: skip
    assert report.status == "finished" and report.chunks_split == 1
    assert len(bad_calls) == 1
    assert "progress watcher" in caplog.text and "disabled" in caplog.text
    assert len(seen) >= 3
    last = seen[-1]
    assert last["final"] is True and last["state"] == "finished"
    assert not any(s["final"] for s in seen[:-1])
    assert last["run_id"] == "watched" and last["n_chunks"] == 6 and last["n_items"] == 24
    assert last["items_done"] == 24 and last["counters"]["done"] == 6
    assert last["counters"]["split"] == 1 and last["counters"]["quarantined"] == 1
    done = [s["items_done"] for s in seen]
    assert done == sorted(done) and done[0] < 24
    assert {"rate", "eta_s", "started", "elapsed_s"} <= set(last)
    kinds = [e["kind"] for e in last["events"]]
    split = next(e for e in last["events"] if e["kind"] == "split")
    assert split["chunk"] == "c000000" and split["children"] == ["c000000.0", "c000000.1"]
    bad_item = next(e for e in last["events"] if e["kind"] == "quarantine")
    assert bad_item["item"] == 5 and bad_item["reason"] == "item 5 is bad"
    assert "split" in kinds


# ------------------------------------------------ progress.json + status ----


def _status(*args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from hpcbatch.runs_cli import runs, status

    cmd = runs if args and args[0] == "runs" else status
    result = CliRunner().invoke(cmd, list(args[1:] if cmd is runs else args))
    return result.exit_code, result.output


def test_a_map_run_writes_progress_json_and_status_follows_it_live(
    client, tmp_path, capsys, caplog
):
    import hpcbatch

    reports = tmp_path / "reports"
    settings = load(overrides={"progress-interval": 0.5})
    box: dict = {}

    def go() -> None:
        try:
            box["out"] = hpcbatch.map(
                rsh.slow_square,
                list(range(60)),
                client=client,
                footprint={"per_item_bytes": 1000, "fixed_bytes": 0},
                chunk_size=2,
                per_item=True,
                run_id="live",
                report_dir=str(reports),
                settings=settings,
                scratch=tmp_path,
            )  # fmt: skip (progress: default)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    caplog.set_level(logging.INFO, logger="hpcbatch.progress")
    thread = threading.Thread(target=go)
    thread.start()
    path = reports / "live" / "progress.json"
    seen, listed_running = [], False
    while thread.is_alive():
        data = _read(path)
        if data and data["state"] == "running":
            seen.append(data["items_done"])
            code, out = _status("runs", str(reports))
            assert code == 0, out
            listed_running |= bool(re.search(r"^live\s+map\s+running\s", out, re.M))
        time.sleep(0.3)
    thread.join()
    assert "error" not in box, box.get("error")
    assert box["out"] == [x * x for x in range(60)]
    assert listed_running, "status never listed the run as running"
    assert len(set(seen)) >= 2 and seen == sorted(seen), seen
    final = _read(path)
    assert final["state"] == "finished" and final["final"] is True
    assert final["items_done"] == 60 and final["counters"]["done"] == 30
    assert final["pid"] == os.getpid() and final["host"] == socket.gethostname()
    assert final["workload"] == "map"
    code, out = _status("runs", str(reports))
    assert code == 0 and re.search(r"^live\s+map\s+finished\s+60/60 \(100%\)\s+30/30", out, re.M)
    code, out = _status("live", "--report-dir", str(reports), "--json")
    assert code == 0
    view = json.loads(out)
    assert view["state"] == "finished" and view["items_done"] == 60 and view["percent"] == 100.0
    # library manners: nothing on stdout, the progress lines in the log
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "progress: " not in captured.err  # progress=None: not a terminal, not shown
    lines = [r.getMessage() for r in caplog.records if r.name == "hpcbatch.progress"]
    assert any(line.startswith("progress: ") and "/60 items" in line for line in lines)
    assert any(line.startswith("run 'live' finished: 30 chunks") for line in lines)


def _read(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


KILLED_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
import runs_helpers as rsh
import runtime_helpers as rh
from hpcbatch.cluster import open_cluster
from hpcbatch.config import load
from hpcbatch.runner import make_chunks, run
from hpcbatch.runs import progress_watchers

if __name__ == "__main__":
    settings = load(overrides={{"cluster": {{"dashboard-address": "127.0.0.1:0"}}}})
    with open_cluster(rh.small_plan(200, 2), settings, quiet=True) as client:
        run(make_chunks(200, 2), rsh.slow_chunk, client, run_id="doomed",
            report_dir={reports!r}, progress=False, max_in_flight=2,
            watchers=progress_watchers({reports!r}, "doomed", "test"))
"""


def test_a_sigkilled_run_shows_as_interrupted(tmp_path):
    reports = tmp_path / "reports"
    script = tmp_path / "doomed.py"
    script.write_text(KILLED_RUN.format(tests=str(HERE), reports=str(reports)))
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    path = reports / "doomed" / "progress.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            data = _read(path)
            if data and data["items_done"] > 0:
                break
            assert proc.poll() is None, "the run ended before it was killed"
            time.sleep(0.2)
        else:
            pytest.fail("the run wrote no progress.json in 120 s")
        code, out = _status("doomed", "--report-dir", str(reports))
        assert code == 0 and out.startswith("run doomed: running"), out
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local workers
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert _read(path)["state"] == "running"  # it never had the chance to say otherwise
    code, out = _status("doomed", "--report-dir", str(reports))
    assert code == 0 and out.startswith("run doomed: interrupted (its process"), out
    code, out = _status("runs", str(reports), "--json")
    (view,) = json.loads(out)
    assert view["state"] == "interrupted" and view["run_id"] == "doomed"
    assert 0 < view["items_done"] < 200 and view["workload"] == "test"


def test_status_of_an_unknown_run_is_one_line(tmp_path):
    (tmp_path / "r").mkdir()
    code, out = _status("nope", "--report-dir", str(tmp_path / "r"))
    assert code != 0
    code, out = _status("runs", str(tmp_path / "missing"))
    assert code != 0


def test_a_run_on_another_host_is_judged_by_its_last_update(tmp_path):
    from hpcbatch.runs import STALE_S, read_run, write_json_atomic

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    now = time.time()
    data = {"run_id": "elsewhere", "state": "running", "host": "node-that-is-not-here",
            "pid": 1, "n_items": 10, "items_done": 4, "n_chunks": 5,
            "counters": {"done": 2, "in_flight": 1}, "started": now - 600}  # fmt: skip
    write_json_atomic(run_dir / "progress.json", {**data, "updated": now - 5})
    view = read_run(run_dir)
    assert view.state == "running" and view.in_flight == 1 and view.percent == 40.0
    write_json_atomic(run_dir / "progress.json", {**data, "updated": now - STALE_S - 10})
    view = read_run(run_dir)
    assert view.state == "interrupted" and "no update for" in view.why and view.in_flight == 0


def test_the_hpcbatch_command_lists_and_shows_runs(tmp_path):
    from hpcbatch.runs import write_json_atomic

    reports = tmp_path / "reports"
    (reports / "r1").mkdir(parents=True)
    now = time.time()
    write_json_atomic(reports / "r1" / "progress.json", {
        "run_id": "r1", "state": "finished", "final": True, "workload": "stocks",
        "n_items": 60, "items_done": 60, "n_chunks": 6, "item_name": "stock",
        "counters": {"done": 6, "retried": 1, "split": 1, "quarantined": 1},
        "started": now - 30, "updated": now, "slurm_job_id": "4242",
        "events": [{"kind": "split", "time": now - 10, "chunk": "c000001",
                    "children": ["c000001.0", "c000001.1"], "reason": "MemoryError"}],
    })  # fmt: skip
    done = _hpcbatch("runs", str(reports))
    assert done.returncode == 0, done.stderr
    assert re.search(
        r"^r1\s+stocks\s+finished\s+60/60 \(100%\)\s+6/6\s+1\s+1\s+1\s+4242\s", done.stdout, re.M
    ), done.stdout
    done = _hpcbatch("status", "r1", "--report-dir", str(reports))
    assert done.returncode == 0 and done.stdout.startswith("run r1: finished"), done.stdout
    assert "split: chunk c000001, children ['c000001.0', 'c000001.1']" in done.stdout
    done = _hpcbatch("status", "r9", "--report-dir", str(reports))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: 'r9' is not a run directory or a run id")
    assert len(done.stderr.strip().splitlines()) == 1


def _hpcbatch(*args: str) -> subprocess.CompletedProcess:
    """``hpcbatch ARGS`` through the real top-level group, in this process."""
    from click.testing import CliRunner

    from hpcbatch.cli import main

    result = CliRunner().invoke(main, list(args))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


# ----------------------------------------------------------- real SLURM ----

DRIVER_JOB = """#!/bin/bash
#SBATCH --job-name=hpcbatch-status-test
#SBATCH --cpus-per-task=2
#SBATCH --mem=2000M
#SBATCH --output={out}/job-%j.out
exec {python} {out}/driver.py
"""

DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import hpcbatch
import runs_helpers as rsh

if __name__ == "__main__":
    hpcbatch.map(rsh.slow_square, list(range(80)), per_item=True, run_id="in-slurm",
                 report_dir={reports!r}, chunk_size=2, scratch={out!r},
                 footprint={{"per_item_bytes": 1000, "fixed_bytes": 0}})
"""


@pytest.mark.slurm
def test_a_slurm_driver_job_is_listed_with_its_job_id_live_and_after(slurm_env, tmp_path):
    from hpcbatch import slurm

    reports = tmp_path / "reports"
    script = tmp_path / "driver.sbatch"
    script.write_text(DRIVER_JOB.format(out=str(tmp_path), python=sys.executable))
    (tmp_path / "driver.py").write_text(
        DRIVER.format(out=str(tmp_path), tests=str(HERE), reports=str(reports))
    )
    job_id = slurm.submit(script, sbatch_args=["--chdir", str(tmp_path)])
    path = reports / "in-slurm" / "progress.json"
    listed_running = False
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        data = _read(path)
        if data and data["state"] != "running":
            break
        if (slurm.job_info(job_id) or {}).get("JobState") in slurm.FINISHED_STATES:
            break
        if data and data["items_done"] > 0 and not listed_running:
            done = _hpcbatch("runs", str(reports))
            listed_running = bool(
                re.search(rf"^in-slurm\s+map\s+running\s.*\s{job_id}\s", done.stdout, re.M)
            )
            assert listed_running, done.stdout
        time.sleep(0.3)
    info = slurm.wait_for_job(job_id, timeout=60)
    output = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert info["JobState"] == "COMPLETED", output
    assert listed_running, "the run was never seen running"
    data = _read(path)
    assert data["state"] == "finished" and data["slurm_job_id"] == job_id
    done = _hpcbatch("runs", str(reports))
    print(done.stdout)  # shown with -s: a real listing of a SLURM run
    assert re.search(rf"^in-slurm\s+map\s+finished\s+80/80 \(100%\)\s.*\s{job_id}\s", done.stdout,
                     re.M), done.stdout  # fmt: skip


@pytest.mark.slurm
def test_a_run_on_another_node_is_interrupted_when_its_slurm_job_is_gone(slurm_env, tmp_path):
    from hpcbatch import slurm
    from hpcbatch.runs import read_run, write_json_atomic

    script = tmp_path / "sleep.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --mem=100M\nsleep 120\n")
    job_id = slurm.submit(script, sbatch_args=["--chdir", str(tmp_path)])
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    write_json_atomic(run_dir / "progress.json", {
        "run_id": "r", "state": "running", "host": "a-compute-node", "pid": 1,
        "slurm_job_id": job_id, "n_items": 10, "items_done": 3, "started": time.time(),
        "updated": time.time() - 3600,  # old: squeue's word counts, not the age
    })  # fmt: skip
    try:
        assert read_run(run_dir).state == "running"
    finally:
        subprocess.run(["scancel", job_id], check=True, env=slurm_env["env"])
    deadline = time.monotonic() + 60
    while (view := read_run(run_dir)).state == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert view.state == "interrupted" and f"SLURM job {job_id}" in view.why, view


def test_progress_json_never_holds_a_password(tmp_path, monkeypatch):
    from hpcbatch.runs import ProgressFile

    url = "postgresql://me:s3cret@db.example:5432/prices"
    monkeypatch.setattr(sys, "argv", ["hpcbatch", "run", "stocks", "--db-url", url])
    watcher = ProgressFile(tmp_path, workload="stocks", ledger_url=url)
    watcher({"run_id": "x", "state": "running", "final": False, "items_done": 0})
    text = (tmp_path / "progress.json").read_text()
    assert "s3cret" not in text and "postgresql://me:***@db.example:5432/prices" in text
    assert "ledger" not in json.loads(text)  # a ledger URL with a password is left out
