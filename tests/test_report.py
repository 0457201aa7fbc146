"""Run reports: death reasons, the memory plot, report.json and `hpcbatch report`."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcbatch.cli import main
from hpcbatch.errors import ConfigError
from hpcbatch.report import (
    RunReport,
    classify_deaths,
    load_report,
    memory_plot_data,
    plot_memory,
    worker_key,
    write_report_dir,
)

T0 = 1_000.0


def _removed(t, worker, stimulus, tasks=(), expected=False):
    return (
        t,
        {
            "action": "remove-worker",
            "worker": worker,
            "stimulus_id": stimulus,
            "processing-tasks": set(tasks),
            "expected": expected,
        },
    )


def test_worker_deaths_get_a_reason():
    key = ("hpcbatch-hog-1234abcd", "c000003", 0)
    removed = [
        _removed(T0 + 5, "tcp://a:1", f"handle-worker-cleanup-{T0 + 5}", [key]),
        _removed(T0 + 6, "tcp://b:1", f"worker-close-gracefully-{T0 + 6}", expected=True),
        _removed(T0 + 7, "tcp://c:1", f"check-worker-ttl-{T0 + 7}"),
        _removed(T0 + 8, "tcp://d:1", f"handle-worker-cleanup-{T0 + 8}"),
        _removed(T0 + 9, "tcp://e:1", f"retire-workers-{T0 + 9}", expected=True),
        _removed(T0 - 50, "tcp://f:1", "handle-worker-cleanup-1"),  # before the run
        (T0 + 3, {"action": "add-worker", "worker": "tcp://g:1"}),
    ]
    kills = [(T0 + 4.9, {"worker": "tcp://a:1", "pid": 1, "rss": 400 * 2**20})]
    deaths = classify_deaths(removed, kills, since=T0, until=T0 + 100, terminate_fraction=0.95)
    by_worker = {d["worker"]: d for d in deaths}
    assert set(by_worker) == {"tcp://a:1", "tcp://b:1", "tcp://c:1", "tcp://d:1", "tcp://e:1"}
    assert by_worker["tcp://a:1"]["reason"] == "memory"
    assert by_worker["tcp://a:1"]["tasks"] == ["c000003"]
    assert by_worker["tcp://a:1"]["rss_bytes"] == 400 * 2**20
    assert (
        "95%" in by_worker["tcp://a:1"]["detail"]
        and "400.00 MiB" in by_worker["tcp://a:1"]["detail"]
    )
    assert by_worker["tcp://b:1"]["reason"] == "walltime"
    assert by_worker["tcp://c:1"]["reason"] == "connection"
    assert by_worker["tcp://d:1"]["reason"] == "connection"
    assert by_worker["tcp://e:1"]["reason"] == "other"


def _report(tmp_path, **kw) -> RunReport:
    base = dict(
        run_id="r1",
        status="finished",
        n_chunks=3,
        chunks_done=3,
        tasks_done=4,
        chunks_split=1,
        items_done=12,
        wall_time_s=3.5,
        predicted_peak_bytes=200 * 2**20,
        measured_peak_bytes=370 * 2**20,
        measured_peak_per_worker={"0": 370 * 2**20},
        memory_limit_bytes=400 * 2**20,
        report_dir=str(tmp_path / "r1"),
        worker_deaths=[
            {
                "worker": "tcp://a:1",
                "reason": "memory",
                "detail": "the nanny killed it",
                "tasks": ["c000000"],
                "time": T0,
                "rss_bytes": 370 * 2**20,
            }
        ],
        results_meta={"rows": 12},
    )
    base.update(kw)
    return RunReport(**base)


def test_run_report_is_frozen_and_round_trips_through_report_json(tmp_path):
    report = _report(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.status = "failed"  # type: ignore[misc]
    write_report_dir(report, tmp_path / "r1")
    assert load_report(tmp_path / "r1") == json.loads(json.dumps(report.to_dict()))
    text = report.summary()
    assert "chunks: 3 done of 3 (4 tasks" in text and "1 split" in text
    assert "predicted peak 200.00 MiB, measured peak 370.00 MiB, limit 400.00 MiB" in text
    assert "worker deaths: 1 (1 memory)" in text and "results: rows=12" in text


def test_hpcbatch_report_prints_the_latest_run_summary(tmp_path):
    write_report_dir(_report(tmp_path, run_id="old"), tmp_path / "old")
    old_time = time.time() - 100
    os.utime(tmp_path / "old" / "report.json", (old_time, old_time))
    write_report_dir(_report(tmp_path, run_id="new", status="interrupted"), tmp_path / "new")
    runner = CliRunner()
    result = runner.invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("run new: interrupted")
    result = runner.invoke(main, ["report", str(tmp_path / "old"), "--json"])
    assert json.loads(result.output)["run_id"] == "old"
    result = runner.invoke(main, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no run report at" in result.output
    with pytest.raises(ConfigError):
        load_report(tmp_path / "nothing")


def test_memory_plot_draws_workers_limit_thresholds_and_kills(tmp_path):
    import matplotlib.image

    mib = 2**20
    timelines = [
        {
            "name": "0",
            "t": [T0 + i * 0.1 for i in range(50)],
            "rss": [(80 + 5 * i) * mib for i in range(50)],
            "addresses": [],
            "memory_limit": 400 * mib,
        },
        {
            "name": "1",
            "t": [T0 + i * 0.1 for i in range(50)],
            "rss": [90 * mib if i != 20 else float("nan") for i in range(50)],
            "addresses": [],
            "memory_limit": 400 * mib,
        },
    ]
    path = plot_memory(
        timelines,
        tmp_path / "memory.png",
        t0=T0,
        memory_limit_bytes=400 * mib,
        thresholds={"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95},
        predicted_peak_bytes=200 * mib,
        deaths=[{"reason": "memory", "time": T0 + 4.9, "rss_bytes": 380 * mib}],
    )
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 400 and image.shape[1] > 800
    assert image.std() > 0.05  # not a blank canvas


def test_the_plot_imports_ahead_in_a_thread_and_leaves_pyplot_alone(tmp_path):
    # preload_plotting (called while the workers start) imports what plot_memory draws
    # with, once; plot_memory never imports pyplot nor changes the process's backend
    script = f"""
import sys, threading
from hpcbatch.report import preload_plotting, plot_memory
preload_plotting(); preload_plotting()
threads = [t for t in threading.enumerate() if t.name == "hpcbatch-plot-import"]
assert len(threads) == 1, threads
threads[0].join(60)
assert "matplotlib.backends.backend_agg" in sys.modules
path = plot_memory([{{"name": "0", "t": [1.0, 2.0], "rss": [1e8, 2e8], "addresses": []}}],
                   {str(tmp_path / "m.png")!r}, t0=1.0, memory_limit_bytes=None, thresholds=None)
assert path.stat().st_size > 10_000
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_sigkilled_worker_process_is_a_memory_death():
    removed = [
        _removed(T0 + 5, "tcp://a:1", f"handle-worker-cleanup-{T0 + 5}"),
        _removed(T0 + 6, "tcp://b:1", f"handle-worker-cleanup-{T0 + 6}"),
    ]
    exits = [(T0 + 4.8, "tcp://a:1", -9), (T0 + 5.9, "tcp://b:1", -11)]
    deaths = {d["worker"]: d for d in classify_deaths(removed, [], since=T0, exits=exits)}
    assert deaths["tcp://a:1"]["reason"] == "memory" and "SIGKILL" in deaths["tcp://a:1"]["detail"]
    assert deaths["tcp://b:1"]["reason"] == "other" and "signal 11" in deaths["tcp://b:1"]["detail"]


# ------------------------------------------------------- the kill picture ----

MiB = 2**20
THRESHOLDS = {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}


def _unnamed_worker(port: int, peak_mib: float, restarts: int = 0) -> dict:
    """The timeline of an existing cluster's worker: no name (``dask worker`` without
    --name: the sampler used to key it "None"); a new address after each restart."""
    addresses = [(T0 + k * 10, f"tcp://127.0.0.1:{port + k}") for k in range(restarts + 1)]
    return {
        "name": worker_key(None, addresses[0][1]),
        "t": [T0 + i * 0.1 for i in range(300)],
        "rss": [(100 + (peak_mib - 100) * (i % 100) / 99) * MiB for i in range(300)],
        "addresses": addresses,
        "memory_limit": 450 * MiB,
    }


def test_a_worker_without_a_name_is_keyed_by_its_address():
    assert worker_key(None, "tcp://127.0.0.1:40123") == "tcp://127.0.0.1:40123"
    assert worker_key("None", "tcp://127.0.0.1:40123") == "tcp://127.0.0.1:40123"
    assert worker_key(0, "tcp://127.0.0.1:40123") == "0"
    assert worker_key("SLURMCluster-0-1", None) == "SLURMCluster-0-1"


def test_the_plot_has_one_legend_entry_and_colour_per_worker_and_names_each_kill():
    timelines = [_unnamed_worker(40100, 443, restarts=2), _unnamed_worker(40200, 420)]
    deaths = [
        {"reason": "memory", "time": T0 + 9.9, "rss_bytes": 443 * MiB,
         "worker": "tcp://127.0.0.1:40100", "tasks": ["c000000"]},
        {"reason": "memory", "time": T0 + 19.9, "rss_bytes": 440 * MiB,
         "worker": "tcp://127.0.0.1:40101", "tasks": ["c000002.1"]},
        {"reason": "connection", "time": T0 + 25, "worker": "tcp://127.0.0.1:40200"},
    ]  # fmt: skip
    data = memory_plot_data(
        timelines,
        t0=T0,
        memory_limit_bytes=450 * MiB,
        thresholds=THRESHOLDS,
        predicted_peak_bytes=300 * MiB,
        deaths=deaths,
    )
    assert data.worker_labels == ("w0 127.0.0.1:40100", "w1 127.0.0.1:40200")
    assert sum(label.startswith("w0 ") for label in data.legend_labels) == 1
    assert not any("None" in label for label in data.legend_labels)
    colours = [s.color for s in data.series]
    assert len(set(colours)) == 2
    assert not {line.color for line in data.lines} & set(colours)  # predicted peak included
    # the limit is in range: drawn, with every threshold
    assert {line.label.split()[0] for line in data.lines} == {
        "memory", "target", "spill", "pause", "terminate", "predicted",
    }  # fmt: skip
    assert 450 < data.y_max < 2 * 450
    # one entry per memory kill, in time order, naming its worker and its one chunk
    assert [k.label for k in data.kills] == [
        "kill 1 at 10 s: w0 127.0.0.1:40100, c000000",
        "kill 2 at 20 s: w0 127.0.0.1:40100, c000002.1",
    ]


def test_the_y_axis_fits_the_data_when_the_limit_is_far_above():
    """Issue 14: a limit line at ~11,860 MiB squashed a run that used < 450 MiB."""
    timelines = [_unnamed_worker(40100, 443), _unnamed_worker(40200, 420)]
    data = memory_plot_data(
        timelines,
        t0=T0,
        memory_limit_bytes=11_860 * MiB,
        thresholds=THRESHOLDS,
        predicted_peak_bytes=200 * MiB,
    )
    assert data.data_max == pytest.approx(443)
    assert data.data_max <= data.y_max < 1.5 * data.data_max  # not 10x above it
    assert [line.label for line in data.lines] == ["predicted peak 200 MiB"]
    assert "memory limit 11,860 MiB: above the plot" in data.legend_labels
    assert "terminate 95% (11,267 MiB): above the plot" in data.legend_labels
    assert len(data.worker_labels) == 2


def test_many_kills_are_one_legend_entry_and_many_workers_distinct_colours(tmp_path):
    timelines = [_unnamed_worker(41000 + 10 * i, 300 + i) for i in range(20)]
    deaths = [
        {"reason": "memory", "time": T0 + i, "rss_bytes": 400 * MiB,
         "worker": f"tcp://127.0.0.1:{41000 + 10 * (i % 20)}", "tasks": [f"c{i:06d}"]}
        for i in range(25)
    ]  # fmt: skip
    kwargs = dict(t0=T0, memory_limit_bytes=450 * MiB, thresholds=THRESHOLDS, deaths=deaths)
    data = memory_plot_data(timelines, **kwargs)
    assert len({s.color for s in data.series}) == 20
    assert len(data.worker_labels) == 15 and "... 5 more workers (not labelled)" in (
        data.legend_labels
    )
    kills = [label for label in data.legend_labels if "killed for memory" in label]
    assert kills == ["25 workers killed for memory (x); their chunks: report.json worker_deaths"]
    path = plot_memory(timelines, tmp_path / "memory.png", **kwargs)
    assert path.stat().st_size > 10_000
    from PIL import Image

    drawn = json.loads(Image.open(path).text["Description"])  # what the PNG shows, for readers
    assert drawn["legend"] == list(data.legend_labels) and drawn["kills"] == 25
    assert len(drawn["workers"]) == 20 and drawn["y_max_mib"] == round(data.y_max, 1)


# ------------------------------------------------------------ provenance ----


def test_provenance_reads_the_slurm_job_from_the_environment_and_orders_its_times():
    from hpcbatch.provenance import collect

    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_ARRAY_TASK_ID": "3"}
    started = time.time()
    prov = collect("r7", started, started + 12.5, argv=["hpcbatch", "stocks", "predict", "a b"],
                   env=env).to_dict()  # fmt: skip
    assert prov["run_id"] == "r7" and prov["host"]
    assert prov["slurm_job_id"] == "4242" and prov["slurm_node_list"] == "node[01-02]"
    assert prov["slurm_array_task_id"] == "3"
    assert prov["command_line"] == "hpcbatch stocks predict 'a b'"
    from datetime import datetime

    start, end = (datetime.fromisoformat(prov[k]) for k in ("started_at", "ended_at"))
    assert start.utcoffset().total_seconds() == 0 and (end - start).total_seconds() == 12.5
    assert abs(start.timestamp() - started) < 0.001
    assert {"hpcbatch", "dask", "distributed"} <= set(prov["versions"])
    import distributed

    assert prov["versions"]["distributed"] == distributed.__version__


def test_provenance_outside_slurm_has_no_job_and_an_unfinished_run_no_end():
    from hpcbatch.provenance import collect, versions

    prov = collect("r8", time.time(), None, env={}).to_dict()
    assert prov["slurm_job_id"] is None and prov["slurm_node_list"] is None
    assert prov["ended_at"] is None
    assert versions([("x", "no-such-distribution-hpcbatch")]) == {}  # missing: left out


def test_the_summary_names_the_run_times_and_the_offline_page(tmp_path):
    prov = {
        "started_at": "2026-12-06T10:00:00.000+00:00",
        "ended_at": "2026-12-06T10:01:00.000+00:00",
        "host": "node01",
        "slurm_job_id": "77",
    }
    report = _report(tmp_path, provenance=prov)  # fmt: skip
    write_report_dir(report, tmp_path / "r1")
    text = report.summary()
    assert "ran 2026-12-06T10:00:00.000+00:00 to 2026-12-06T10:01:00.000+00:00 on node01, " \
           "SLURM job 77" in text  # fmt: skip
    assert "report.html" not in text  # not written yet
    (tmp_path / "r1" / "report.html").write_text("<html></html>")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "r1")])
    assert f"report page (offline): {tmp_path / 'r1' / 'report.html'}" in result.output


# --------------------------------------------------------- report.html ----


def _stream(group="hpcbatch-t-1234"):
    """Task stream records: 6 chunks on two workers, a failed attempt and its retry,
    the two pieces of a split chunk, and a task of another run (ignored)."""
    recs = []

    def rec(chunk, attempt, worker, start, stop, status="OK", grp=group):
        recs.append({"key": (grp, chunk, attempt), "worker": f"tcp://127.0.0.1:{worker}",
                     "status": status, "startstops": [
                         {"action": "transfer", "start": T0 + start - 0.1, "stop": T0 + start},
                         {"action": "compute", "start": T0 + start, "stop": T0 + stop}]})  # fmt: skip

    for k in range(6):
        rec(f"c{k:06d}", 0, 40100 + 100 * (k % 2), 1 + 2 * k, 2.5 + 2 * k)
    rec("c000006", 0, 40100, 14, 15, status="error")
    rec("c000006", 1, 40200, 16, 17)
    rec("c000007.0", 0, 40100, 18, 19)
    rec("c000007.1", 0, 40200, 18.5, 19.5)
    rec("c000009", 0, 40100, 5, 6, grp="hpcbatch-other-99")
    return recs


def test_chunk_bars_and_ticks_come_from_the_runs_task_stream():
    from hpcbatch.report_html import chunk_bars, timeline_ticks

    bars = chunk_bars(_stream(), T0, "hpcbatch-t-1234")
    assert len(bars) == 10 and "c000009" not in {b.chunk_id for b in bars}
    assert bars[0].start == pytest.approx(1.0) and bars[0].stop == pytest.approx(2.5)  # compute
    failed = [b for b in bars if not b.ok]
    assert [(b.chunk_id, b.attempt) for b in failed] == [("c000006", "0")]
    deaths = [{"worker": "tcp://127.0.0.1:40200", "time": T0 + 20, "reason": "memory",
               "tasks": ["c000008"]}]  # fmt: skip
    owner = {"tcp://127.0.0.1:40100": "w-a", "tcp://127.0.0.1:40200": "w-b"}
    ticks = timeline_ticks(bars, deaths, T0, owner)
    kinds = [t.kind for t in ticks]
    assert kinds.count("start") == 10 and kinds.count("retry") == 1
    assert [t.label for t in ticks if t.kind == "split"] == [
        "c000007 split into c000007.0 + c000007.1"
    ]
    death = next(t for t in ticks if t.kind == "death")
    assert death.x == pytest.approx(20) and death.worker == "w-b" and "c000008" in death.label
    assert [t.x for t in ticks] == sorted(t.x for t in ticks)


def test_report_html_has_every_section_and_no_network_reference(tmp_path):
    import re

    from hpcbatch.report_html import write_html_report

    timelines = [_unnamed_worker(40100, 443, restarts=1), _unnamed_worker(40200, 120)]
    report = _report(
        tmp_path,
        measured_peak_per_worker={"tcp://127.0.0.1:40100": 443 * MiB,
                                  "tcp://127.0.0.1:40200": 120 * MiB},
        memory_limit_bytes=11_860 * MiB,
        worker_deaths=[{"worker": "tcp://127.0.0.1:40100", "time": T0 + 9.9, "reason": "memory",
                        "detail": "the nanny killed <it>", "tasks": ["c000003"],
                        "rss_bytes": 443 * MiB}],
        plan={"n_workers": 2, "reasons": ["binding constraint: memory"], "thresholds": THRESHOLDS},
        provenance={"run_id": "r1", "host": "node01", "versions": {"dask": "2026.8.0"}},
    )  # fmt: skip
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "memory.png").write_bytes(b"png")
    path = write_html_report(tmp_path / "r1", report.to_dict(), timelines=timelines,
                             thresholds=THRESHOLDS, t0=T0, t_end=T0 + 30,
                             task_stream=_stream(), group="hpcbatch-t-1234")  # fmt: skip
    page = path.read_text()
    assert page.count('<path class="series"') == 2  # one per worker, distinct colours
    colours = re.findall(r'<path class="series" data-worker="[^"]*" d="[^"]*" stroke="(#\w+)"',
                         page)  # fmt: skip
    assert len(set(colours)) == 2
    assert page.count('<g class="lane"') == 2 and page.count('class="bar') == 10
    assert 'class="bar failed"' in page and 'class="bar retry"' in page
    # the limit (11,860 MiB) is far above the data: named, not drawn; predicted drawn
    assert "memory limit 11,860 MiB: above the plot" in page
    assert re.search(r'class="reflabel"[^>]*>predicted peak 200 MiB<', page)
    assert "binding constraint: memory" in page and "node01" in page
    assert "the nanny killed &lt;it&gt;" in page  # escaped
    assert 'href="memory.png"' in page and 'href="report.json"' not in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)
    assert "<script" not in page


def test_long_timelines_are_thinned_but_keep_every_peak():
    from hpcbatch.report_html import _downsample

    xs = [i * 0.1 for i in range(100_000)]
    ys = [float(i % 997) for i in range(100_000)]
    ys[54_321] = 5_000.0
    ys[60_000] = float("nan")
    points = _downsample(xs, ys, 2400)
    assert len(points) <= 2 * 2400 + 10
    assert max(y for _x, y in points if y == y) == 5_000.0
    assert any(y != y for _x, y in points)  # the gap stays a gap
    assert [x for x, _y in points] == sorted(x for x, _y in points)


def test_a_run_of_many_chunks_gives_a_page_of_bounded_size():
    from hpcbatch.report_html import _MAX_BARS, render_html

    n_workers, n_tasks = 8, 20_000
    stream = [
        {"key": ("hpcbatch-t-1", f"c{k:06d}", 0), "worker": f"tcp://127.0.0.1:{40000 + k % 8}",
         "status": "OK", "startstops": [{"action": "compute", "start": T0 + (k // 8) * 0.1,
                                         "stop": T0 + (k // 8) * 0.1 + 0.09}]}
        for k in range(n_tasks)
    ]  # fmt: skip
    timelines = [_unnamed_worker(40000 + i, 300 + i) for i in range(n_workers)]
    data = _report(Path("/nonexistent"), report_dir=None, worker_deaths=[]).to_dict()
    page = render_html(data, timelines=timelines, thresholds=THRESHOLDS, t0=T0,
                       t_end=T0 + 250, task_stream=stream)  # fmt: skip
    assert page.count('class="bar') < _MAX_BARS
    assert page.count('<g class="lane"') == n_workers
    assert len(page) < 1_500_000
