"""The chunk runner on a real local Dask cluster: bounded submission, OOM split, retries, resume."""

from __future__ import annotations

import functools
import gc
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import runtime_helpers as rh

from hpcbatch.cluster import open_cluster
from hpcbatch.config import load
from hpcbatch.errors import ChunkFailedError, ConfigError
from hpcbatch.ledger import Ledger
from hpcbatch.runner import Chunk, chunk_seed, is_memory_error, make_chunks, run

HERE = Path(__file__).parent
# a hang must fail the test with a traceback, not stall CI
pytestmark = pytest.mark.timeout(300)
PYTHON = sys.executable


# ------------------------------------------------------------ pure parts ----


def test_make_chunks_and_split_keep_items_with_their_range():
    chunks = make_chunks(10, 4, items=list("abcdefghij"))
    assert [(c.chunk_id, c.start, c.stop) for c in chunks] == [
        ("c000000", 0, 4),
        ("c000001", 4, 8),
        ("c000002", 8, 10),
    ]
    assert chunks[2].items == ("i", "j")
    first, second = chunks[1].split()
    assert (first.chunk_id, first.start, first.stop, first.items) == ("c000001.0", 4, 6, ("e", "f"))
    assert (second.chunk_id, second.start, second.stop, second.items) == (
        "c000001.1",
        6,
        8,
        ("g", "h"),
    )
    with pytest.raises(ValueError):
        Chunk("c9", 3, 4).split()
    with pytest.raises(ConfigError, match="must match"):
        make_chunks(3, 2, items=["a"])
    with pytest.raises(ConfigError):
        make_chunks(0, 2)


def test_chunk_seed_is_stable_across_processes_and_distinct():
    here = {cid: chunk_seed(42, cid) for cid in ("c000000", "c000001", "c000001.0")}
    assert len(set(here.values())) == 3
    assert chunk_seed(43, "c000000") != here["c000000"]
    code = "from hpcbatch.runner import chunk_seed; print(chunk_seed(42, 'c000001.0'))"
    out = subprocess.run(
        [PYTHON, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    ).stdout
    assert int(out) == here["c000001.0"]
    assert 0 <= here["c000000"] < 2**63


def test_memory_errors_are_recognised():
    class OutOfMemoryError(RuntimeError):  # the name torch uses
        pass

    assert is_memory_error(MemoryError())
    assert is_memory_error(OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_memory_error(RuntimeError("CUDA error: out of memory"))
    assert not is_memory_error(ValueError("bad value"))


# --------------------------------------------------------- local cluster ----


@pytest.fixture(scope="module")
def client():
    plan = rh.small_plan(100, 4)
    settings = load(overrides={"cluster": {"dashboard-address": "127.0.0.1:0"}})
    with open_cluster(plan, settings, quiet=True) as c:
        yield c


@pytest.fixture
def logged(tmp_path):
    """A task function that logs each execution under tmp_path (see runtime_helpers.calls)."""
    return functools.partial(rh.log_call, base=str(tmp_path))


def test_chunk_that_exceeds_its_worker_memory_is_split_and_completes(client, tmp_path):
    # chunk c000000 asks for 4 x 90 MB: over the 380 MB terminate threshold of a
    # 400 MB worker; its halves (2 x 90 MB) fit.
    plan = rh.small_plan(12, 4)
    items = [90] * 4 + [1] * 8
    report = run(
        make_chunks(12, 4, items=items),
        rh.hog,
        client,
        run_id="oom",
        plan=plan,
        report_dir=tmp_path,
        progress=False,
        ledger=Ledger(f"sqlite:///{tmp_path}/l.db"),
    )
    assert report.status == "finished"
    assert report.chunks_split == 1
    assert report.chunks_done == 3 and report.tasks_done == 4
    assert report.items_done == 12 and report.results_meta["mb"] == sum(items)
    memory_deaths = [d for d in report.worker_deaths if d["reason"] == "memory"]
    assert len(memory_deaths) >= 1
    assert all("c000000" in " ".join(d["tasks"]) for d in memory_deaths)
    # the nanny saw the worker above its terminate threshold: the measured peak shows it
    assert report.measured_peak_bytes > 0.9 * plan.memory_limit_bytes
    saved = json.loads((tmp_path / "oom" / "report.json").read_text())
    assert saved["chunks_split"] == 1
    assert saved["worker_deaths"][0]["reason"] == "memory"
    assert (tmp_path / "oom" / "memory.png").stat().st_size > 10_000
    assert (tmp_path / "oom" / "dask-report.html").stat().st_size > 10_000
    assert Ledger(f"sqlite:///{tmp_path}/l.db").done_ids("oom") == {
        "c000000.0",
        "c000000.1",
        "c000001",
        "c000002",
    }


def test_a_worker_memory_kill_is_blamed_on_the_executing_chunk_only(tmp_path):
    """Issue 14: on a cluster whose 1-thread workers also hold a queued task (Dask's
    default worker-saturation 1.1, as on an existing cluster), a memory kill splits only
    the chunk that was executing; the one queued behind it reruns unchanged."""
    import dask
    from distributed import Client, LocalCluster

    # two 4 x 90 MB chunks (over the 380 MB terminate threshold of a 400 MB worker),
    # each followed by small chunks that land in the queue behind it
    items = ([90] * 4 + [1] * 4 * 3) * 2
    cfg = {
        "distributed.scheduler.worker-saturation": 1.1,
        # every task on a killed worker gets KilledWorker at once: a queued one too
        "distributed.scheduler.allowed-failures": 0,
        "distributed.worker.memory.pause": False,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.target": False,
    }
    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    with (
        dask.config.set(cfg),
        LocalCluster(
            n_workers=2, threads_per_worker=1, memory_limit="400MB", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        report = run(
            make_chunks(len(items), 4, items=items),
            rh.hog,
            c,
            run_id="blame",
            ledger=ledger,
            max_in_flight=4,
            progress=False,
            report_dir=tmp_path,
        )
        removed = [ev for _t, ev in c.get_events("all") if ev.get("action") == "remove-worker"]
    # a killed worker held a queued chunk too (else this test proves nothing)
    assert any(len(ev["processing-tasks"]) >= 2 for ev in removed)
    assert report.status == "finished"
    assert report.chunks_split == 2  # the two chunks that ran out of memory, once each
    memory_deaths = [d for d in report.worker_deaths if d["reason"] == "memory"]
    assert len(memory_deaths) == report.chunks_split
    assert sorted(t for d in memory_deaths for t in d["tasks"]) == ["c000000", "c000004"]
    assert all(", " not in d["detail"] for d in memory_deaths)  # "while running <one>"
    assert report.items_done == len(items) and report.results_meta["mb"] == sum(items)
    expected = {f"c{k:06d}" for k in range(8) if k not in (0, 4)}
    expected |= {"c000000.0", "c000000.1", "c000004.0", "c000004.1"}
    assert ledger.done_ids("blame") == expected


def test_worker_sigkilled_like_the_oom_killer_counts_as_memory_and_splits(client, tmp_path):
    report = run(
        make_chunks(4, 4),
        rh.oom_killed,
        client,
        run_id="sigkill",
        progress=False,
        report_dir=tmp_path,
    )
    assert report.status == "finished" and report.items_done == 4
    assert report.chunks_split == 1
    deaths = [d for d in report.worker_deaths if d["reason"] == "memory"]
    assert deaths and all("SIGKILL" in d["detail"] for d in deaths)


def test_memory_error_splits_down_to_min_chunk_then_names_the_chunk(client):
    report = run(make_chunks(16, 8), rh.raise_memory_error, client, run_id="me", progress=False)
    assert report.status == "finished" and report.items_done == 16
    assert report.chunks_split == 6  # per chunk: 8 -> 4+4 -> 2+2+2+2 is 3 splits
    assert report.tasks_done == 8
    with pytest.raises(
        ChunkFailedError, match=r"chunk c000000\.[01] \(4 items.*minimum chunk size \(4\)"
    ) as err:
        run(
            make_chunks(8, 8),
            rh.raise_memory_error,
            client,
            run_id="me2",
            min_chunk=4,
            progress=False,
        )
    assert err.value.chunk_id in ("c000000.0", "c000000.1")


def test_other_failures_are_retried_then_fail_with_chunk_id_and_traceback(client, tmp_path, capsys):
    report = run(make_chunks(6, 2), rh.flaky, client, run_id="flaky", retries=1, progress=False)
    assert report.status == "finished" and report.chunks_retried == 3
    assert report.results_meta["attempt"] == 3

    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    with pytest.raises(
        ChunkFailedError, match=r"chunk c000002 .*after 3 attempts: ValueError: bad row"
    ) as err:
        run(
            make_chunks(10, 2),
            rh.always_fails,
            client,
            run_id="bad",
            retries=2,
            ledger=ledger,
            progress=False,
            report_dir=tmp_path,
        )
    assert err.value.chunk_id == "c000002"
    assert "runtime_helpers.py" in err.value.traceback  # the worker's traceback
    assert "raise ValueError" in capsys.readouterr().err
    done = ledger.done_ids("bad")
    assert "c000002" not in done and len(done) >= 1  # finished chunks stay recorded
    saved = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert saved["status"] == "failed" and saved["failures"][0]["chunk_id"] == "c000002"


def test_resume_recomputes_only_the_missing_chunks(client, tmp_path, logged):
    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    (tmp_path / "stop").write_text("20")  # chunks from item 20 on crash
    with pytest.raises(ChunkFailedError):
        run(
            make_chunks(40, 2),
            logged,
            client,
            run_id="res",
            ledger=ledger,
            retries=0,
            max_in_flight=2,
            progress=False,
        )
    first = set(ledger.done_ids("res"))
    assert 0 < len(first) < 20
    (tmp_path / "stop").unlink()
    before = len(rh.calls(tmp_path))
    with pytest.raises(ConfigError, match="--resume"):
        run(make_chunks(40, 2), logged, client, run_id="res", ledger=ledger, progress=False)
    report = run(
        make_chunks(40, 2),
        logged,
        client,
        run_id="res",
        ledger=ledger,
        resume=True,
        progress=False,
    )
    rerun = rh.calls(tmp_path)[before:]
    assert report.chunks_skipped == len(first)
    assert report.chunks_done == 20 - len(first)
    assert len(rerun) == 20 - len(first)
    assert not set(rerun) & first  # nothing already done ran again
    assert ledger.done_ids("res") == {c.chunk_id for c in make_chunks(40, 2)}

    again = run(
        make_chunks(40, 2),
        logged,
        client,
        run_id="res",
        ledger=ledger,
        resume=True,
        progress=False,
    )
    assert again.status == "already-finished" and again.chunks_done == 0
    assert len(rh.calls(tmp_path)) == before + len(rerun)


def test_resume_of_a_split_chunk_runs_only_its_undone_half(client, tmp_path, logged):
    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    chunks = make_chunks(8, 4)
    ledger.start_run("half", n_items=8, chunk_size=4, seed=0, params={}, resume=False)
    ledger.mark_done("half", chunks[0].split()[0], {})
    report = run(chunks, logged, client, run_id="half", ledger=ledger, resume=True, progress=False)
    assert sorted(rh.calls(tmp_path)) == ["c000000.1", "c000001"]
    assert report.items_done == 6 and report.chunks_done == 2


def test_seeds_are_deterministic_per_chunk(client):
    def draws(seed):
        rep = run(
            make_chunks(6, 2), rh.seeded, client, run_id=f"s{seed}", seed=seed, progress=False
        )
        return rep.results_meta["draw"]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_a_batch_log_gets_progress_lines(client, capsys):
    run(make_chunks(20, 2), rh.tiny, client, run_id="prog", progress=True, progress_interval=0.2)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("progress: ")]
    assert lines and "20/20 items (100%)" in lines[-1]
    assert "items/s" in lines[-1] and "ETA" in lines[-1] and "cluster memory" in lines[-1]


def test_the_first_progress_line_goes_out_with_the_first_chunks(client, capsys):
    # logged as the first chunks are submitted (before any has finished), not after the
    # first wait for results: a log's timeline shows no gap before the first chunk
    run(make_chunks(8, 2), rh.tiny, client, run_id="first", progress=True, progress_interval=5)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("progress: ")]
    first = re.match(r"progress: 0/8 items \(0%\), 0 chunks done, (\d+) in flight", lines[0])
    assert first and int(first.group(1)) > 0, lines


def test_no_chunk_is_left_behind_when_the_releases_leave_just_after_a_full_window(
    client, monkeypatch
):
    # The interleaving a busy machine makes likely: _submit finds no room (the window
    # is taken by released futures whose release has not left the client yet), then
    # the client's loop flushes them before the runner looks again.  The run must go on
    # submitting, not end "finished" with chunks never run.
    import hpcbatch.runner as runner_mod

    submit = runner_mod._Shell._submit

    def submit_then_flush(self):
        before = len(self.in_flight)
        submit(self)
        if len(self.in_flight) == before and self.unflushed:
            with self.ac.thread_condition:  # the loop thread's callbacks run meanwhile
                self.ac.thread_condition.wait_for(lambda: not self.unflushed, timeout=10)

    monkeypatch.setattr(runner_mod._Shell, "_submit", submit_then_flush)
    report = run(make_chunks(30, 1), rh.tiny, client, run_id="flush", max_in_flight=1,
                 progress=False)  # fmt: skip
    assert report.status == "finished" and report.items_done == 30 and report.chunks_done == 30


# ------------------------------------------------------ 10,000 chunks ----


@pytest.fixture(scope="module")
def external_scheduler(tmp_path_factory):
    """A scheduler and two workers in other processes, so the client's RSS is only the client's."""
    d = tmp_path_factory.mktemp("sched")
    sched_file = d / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    dask_cli = str(Path(PYTHON).with_name("dask"))
    procs = [
        subprocess.Popen(
            [
                dask_cli,
                "scheduler",
                "--scheduler-file",
                str(sched_file),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                ":0",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        procs.append(
            subprocess.Popen(
                [
                    dask_cli,
                    "worker",
                    "--scheduler-file",
                    str(sched_file),
                    "--nworkers",
                    "2",
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    "300MB",
                    "--host",
                    "127.0.0.1",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        yield str(sched_file)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_ten_thousand_chunks_stay_bounded_and_client_memory_flat(external_scheduler):
    plan = rh.small_plan(10_000, 1)
    with open_cluster(plan, load(), backend="address", address=external_scheduler, quiet=True) as c:
        c.wait_for_workers(2, timeout=60)
        run(make_chunks(1000, 1), rh.tiny, c, run_id="warm-up", max_in_flight=8, progress=False)
        gc.collect()
        rss_before = psutil.Process().memory_info().rss
        t0 = time.time()
        report = run(
            make_chunks(10_000, 1),
            rh.tiny,
            c,
            run_id="ten-thousand",
            max_in_flight=8,
            progress=False,
        )
        wall = time.time() - t0
        gc.collect()
        rss_after = psutil.Process().memory_info().rss
    print(
        f"\n10,000 chunks: max in flight {report.max_in_flight}, max tasks on the scheduler "
        f"{report.max_tasks_on_scheduler}, client RSS {rss_before / 2**20:.1f} -> "
        f"{rss_after / 2**20:.1f} MiB, wall {wall:.1f} s"
    )
    assert report.status == "finished" and report.items_done == 10_000
    assert report.results_meta["items"] == 10_000
    assert report.max_tasks_on_scheduler is not None
    assert report.max_tasks_on_scheduler <= 8  # measured on the scheduler, not by the runner
    assert report.max_in_flight == 8
    assert rss_after - rss_before < 40 * 2**20


# ---------------------------------------------------------- SIGTERM ----


DRIVER = textwrap.dedent(
    """
    import functools
    import sys
    sys.path.insert(0, {here!r})
    import runtime_helpers as rh
    from hpcbatch.cluster import open_cluster
    from hpcbatch.config import load
    from hpcbatch.errors import HpcbatchError
    from hpcbatch.ledger import Ledger
    from hpcbatch.runner import make_chunks, run

    if __name__ == "__main__":
        plan = rh.small_plan(60, 1)
        try:
            with open_cluster(plan, load(), quiet=True) as client:
                rep = run(make_chunks(60, 1), functools.partial(rh.slow_logged, base={base!r}), client, run_id="term",
                          ledger=Ledger({url!r}), resume={resume}, max_in_flight=2,
                          grace_period_s=30, progress=False, report_dir={reports!r})
                print("DONE", rep.chunks_done, rep.chunks_skipped, flush=True)
        except HpcbatchError as exc:
            print("error:", exc, file=sys.stderr, flush=True)
            sys.exit(exc.exit_code)
    """
)


def test_sigterm_stops_cleanly_and_resume_finishes_the_rest(tmp_path):
    url = f"sqlite:///{tmp_path}/l.db"
    env = {**os.environ, "HPCBATCH_TEST_DIR": str(tmp_path)}

    def driver(resume: bool) -> subprocess.Popen:
        script = tmp_path / f"driver_{resume}.py"
        script.write_text(
            DRIVER.format(
                here=str(HERE),
                url=url,
                resume=resume,
                reports=str(tmp_path / "reports"),
                base=str(tmp_path),
            )
        )
        return subprocess.Popen(
            [PYTHON, str(script)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    first = driver(False)
    deadline = time.time() + 120
    while len(list((tmp_path / "calls").glob("*")) if (tmp_path / "calls").exists() else []) < 6:
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 3, err
    assert "resume with" in err or "--resume" in err
    done_first = Ledger(url).done_ids("term")
    assert 6 <= len(done_first) < 60
    saved = json.loads((tmp_path / "reports" / "term" / "report.json").read_text())
    assert saved["status"] == "interrupted"
    calls_first = rh.calls(tmp_path)
    # in-flight chunks were allowed to finish and were recorded
    assert set(calls_first) == done_first

    second = driver(True)
    out, err = second.communicate(timeout=180)
    assert second.returncode == 0, err
    assert out.split()[:3] == ["DONE", str(60 - len(done_first)), str(len(done_first))]
    calls_all = rh.calls(tmp_path)
    assert sorted(calls_all) == sorted({c.chunk_id for c in make_chunks(60, 1)})  # each once


def test_cluster_that_loses_all_its_workers_fails_the_run_instead_of_hanging(tmp_path):
    # every worker gone mid-run (what repeated memory kills under load left behind):
    # the run fails within no_worker_timeout_s with one line, the report written and
    # the finished chunks kept, instead of waiting forever for results
    import threading

    plan, settings, ledger = rh.slow_run_setup(tmp_path)
    with open_cluster(plan, settings, quiet=True) as c:

        def kill_workers():
            rh.wait_done(ledger, "lost", 3)
            c.cluster.scale(0)

        killer = threading.Thread(target=kill_workers, daemon=True)
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(ChunkFailedError) as err:
            rh.run_slow(c, ledger, tmp_path, "lost", resume_hint="rerun with --resume-please")
        waited = time.monotonic() - t0
        killer.join(5)
    message = str(err.value)
    assert "\n" not in message
    assert "lost all its workers" in message and "memory" in message
    assert message.endswith("rerun with --resume-please")
    done = ledger.done_ids("lost")
    assert len(done) >= 3
    assert f"{len(done)} of 100 chunks done" in message
    assert waited < 50
    saved = json.loads((tmp_path / "lost" / "report.json").read_text())
    assert saved["status"] == "failed"
    assert "lost all its workers" in saved["message"]


def test_a_failed_chunk_names_the_runs_own_resume_hint(client):
    with pytest.raises(ChunkFailedError, match=r"then rerun from scratch \(finished chunks"):
        run(
            make_chunks(6, 2),
            rh.always_fails,
            client,
            run_id="hint",
            retries=0,
            progress=False,
            resume_hint="rerun from scratch",
        )


def test_no_workers_error_names_slurm_jobs_waiting_in_the_queue() -> None:
    """Workers gone because their SLURM jobs ended and the replacements are still queued:
    the line says so (and to check the queue), not 'memory kills'."""
    from hpcbatch.chunkstate import ChunkStates
    from hpcbatch.cluster import WorkerJobWatch
    from hpcbatch.runner import _no_workers_error

    watch = WorkerJobWatch(cluster=None)
    assert watch.waiting_replacements() is None
    watch.lost.append({"job_id": "41", "reason": "cancelled", "replacement_ready": 1.0})
    assert watch.waiting_replacements() is None  # its replacement is up
    watch.lost.append({"job_id": "42", "reason": "walltime", "replacement_ready": None})
    waiting = watch.waiting_replacements()
    assert "42 walltime" in waiting and "41" not in waiting

    states = ChunkStates(make_chunks(10, 1))
    queued = str(_no_workers_error(120, states, 5, 10, "rerun with --resume", waiting))
    assert "42 walltime" in queued and "squeue" in queued and "memory" not in queued
    assert "5 of 10 chunks done" in queued and queued.endswith("rerun with --resume")
    plain = str(_no_workers_error(120, states, 5, 10, "rerun with --resume"))
    assert "memory" in plain and "squeue" not in plain


def test_a_task_outcome_comes_from_the_captured_result_not_the_later_status() -> None:
    """A chunk that finished and whose workers then left: its future reads 'lost' by the
    time the runner looks, but the result as_completed captured is its metadata dict."""
    from concurrent.futures import CancelledError

    from hpcbatch.runner import _outcome

    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        triple = (type(exc), exc, exc.__traceback__)
    assert _outcome({"items": 2}) == "finished"  # a one-key dict is not an error triple
    assert _outcome({}) == "finished"
    assert _outcome(triple) == "error"
    assert _outcome(CancelledError("k")) == "cancelled"
