"""Run reports: death reasons, the memory plot, report.json and `hpcbatch report`."""

from __future__ import annotations

import dataclasses
import json
import os
import time

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
