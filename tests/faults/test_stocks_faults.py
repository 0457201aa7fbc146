"""Faults during real stock prediction runs: a worker killed, the driver killed or told to stop.

Every run predicts the same 24 stocks in 12 chunks with the same seed and model; the
result must equal the undisturbed run row for row (count and checksum), each
prediction present exactly once.
"""

from __future__ import annotations

import json
import signal

import pytest
from faultkit import (
    checksum,
    dask_workers,
    done_chunks,
    done_ids,
    fresh_db,
    kill_tree,
    prediction_rows,
    start_stocks,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _marks(directory) -> list[str]:
    return (
        sorted(p.name.rsplit("-", 1)[0] for p in directory.glob("*")) if directory.exists() else []
    )


def test_worker_sigkilled_half_way_loses_and_duplicates_nothing(
    stock_inputs, stocks_baseline, tmp_path
) -> None:
    url = fresh_db(stock_inputs, tmp_path)
    proc = start_stocks(url, stock_inputs["model"], tmp_path / "reports", delay_s=0.7)
    wait_until(lambda: done_chunks(url) >= 5, proc, what="5 chunks done")
    victims = dask_workers(proc.pid)
    assert victims, "no worker process found"
    victims[0].send_signal(signal.SIGKILL)  # as the OOM killer or SLURM would
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    assert report["status"] == "finished"
    assert report["worker_deaths"], "the killed worker is not in the report"
    print("worker deaths:", report["worker_deaths"])
    rows = prediction_rows(url)
    keys = [r[:3] for r in rows]
    assert len(keys) == len(set(keys))  # exactly once
    assert len(rows) == len(stocks_baseline["rows"])
    assert checksum(rows) == stocks_baseline["checksum"]
    assert done_chunks(url) == 12


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_driver_stopped_half_way_then_resume_runs_only_the_missing_chunks(
    stock_inputs, stocks_baseline, tmp_path, sig
) -> None:
    url = fresh_db(stock_inputs, tmp_path)
    marks = tmp_path / "marks"
    proc = start_stocks(
        url, stock_inputs["model"], tmp_path / "reports", delay_s=0.7, mark_dir=marks
    )
    wait_until(lambda: done_chunks(url) >= 4, proc, what="4 chunks done")
    if sig == signal.SIGKILL:
        kill_tree(proc)  # the driver and its workers die at once (node lost, scancel -s KILL)
        proc.communicate(timeout=60)
    else:
        proc.send_signal(signal.SIGTERM)  # what SLURM sends at the walltime
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, err
        assert "resume with" in err or "--resume" in err, err
        assert len(err.strip().splitlines()) >= 1
        reports = list((tmp_path / "reports").rglob("report.json"))
        assert reports and json.loads(reports[0].read_text())["status"] == "interrupted"
    committed = done_ids(url)
    done_before = len(committed)
    assert 4 <= done_before < 12
    rows_before = prediction_rows(url)
    keys = [r[:3] for r in rows_before]
    assert len(keys) == len(set(keys))

    resumed_marks = tmp_path / "marks-resume"
    proc = start_stocks(
        url, stock_inputs["model"], tmp_path / "reports", "--resume", mark_dir=resumed_marks
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    ran_again = _marks(resumed_marks)
    # only the chunks not committed before ran (a chunk killed mid-flight runs again)
    assert len(ran_again) == 12 - done_before, (ran_again, done_before)
    assert set(ran_again) == {f"c{i:06d}" for i in range(12)} - committed
    assert report["chunks_skipped"] == done_before
    assert report["chunks_done"] == 12 - done_before
    rows = prediction_rows(url)
    assert len(rows) == len(stocks_baseline["rows"])
    assert checksum(rows) == stocks_baseline["checksum"]
    assert done_chunks(url) == 12


MEMORY = "1700000000"  # 2 workers of ~620 MiB each: a 600 MB allocation kills one


def test_chunk_over_its_memory_limit_is_split_and_retried_until_it_fits(
    stock_inputs, stocks_baseline, tmp_path
) -> None:
    url = fresh_db(stock_inputs, tmp_path)
    proc = start_stocks(
        url,
        stock_inputs["model"],
        tmp_path / "reports",
        driver_memory=MEMORY,
        hog_mb=600,
        hog_above=1,  # the 2-stock chunk holding 000005.SZ: killed every time; its halves fit
        hog_item="000005.SZ",
    )
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    assert report["status"] == "finished"
    assert report["chunks_split"] >= 1
    assert any(d["reason"] == "memory" for d in report["worker_deaths"])
    assert "ran out of memory" in err and "split into 1 + 1" in err
    assert {"c000002.0", "c000002.1"} <= done_ids(url)
    rows = prediction_rows(url)
    assert len(rows) == len(stocks_baseline["rows"])
    assert checksum(rows) == stocks_baseline["checksum"]


def test_chunk_that_cannot_fit_at_the_minimum_size_fails_clearly_and_the_rest_is_kept(
    stock_inputs, stocks_baseline, tmp_path
) -> None:
    url = fresh_db(stock_inputs, tmp_path)
    poison = "000005.SZ"
    proc = start_stocks(
        url,
        stock_inputs["model"],
        tmp_path / "reports",
        driver_memory=MEMORY,
        hog_mb=600,
        hog_above=0,  # even the 1-stock chunk of 000005.SZ is over the limit
        hog_item=poison,
    )
    out, err = proc.communicate(timeout=400)
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "memory" in last and "c000002" in last, last
    rows = prediction_rows(url)
    expected = [r for r in stocks_baseline["rows"] if r[0] != poison]
    assert rows == expected  # everything else committed, nothing of the poison chunk
    assert done_ids(url) == ({f"c{i:06d}" for i in range(12)} - {"c000002"}) | {"c000002.1"}
