"""The load benchmark (benchmarks/load_stocks.py) at a tiny size on SQLite.

Runs the script the way a user does (a fresh process, real LocalCluster, real
prediction job) and checks that it reports what it claims: every size's outputs checked
and complete, per-worker memory measured, the JSON and the plot written.  Then its
nothing-lost check is shown to catch a lost and a stray prediction row.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "load_stocks.py"


def _module():
    spec = importlib.util.spec_from_file_location("load_stocks", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    db = tmp / "market.db"
    cmd = [
        sys.executable, str(SCRIPT), "--quick", "--db", f"sqlite:///{db}",
        "--stocks", "100", "--sizes", "40,100", "--predict-days", "2", "--model-size", "tiny",
        "--out", str(tmp / "results.json"), "--plot", str(tmp / "plot.png"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp, db, json.loads(done.stdout), json.loads((tmp / "results.json").read_text())


def test_quick_run_checks_every_size_and_measures_workers(quick_run):
    tmp, _, printed, saved = quick_run
    assert printed["all_checks_ok"] is True
    assert set(printed["sizes"]) == {"40", "100"}
    for n, entry in printed["sizes"].items():
        checks = entry["checks"]
        assert checks["ok"] is True
        assert checks["stocks_selected"] == int(n)
        assert checks["prediction_rows"] == checks["stocks_with_enough_history"] * 2 > 0
        assert checks["ledger_chunks"] == entry["plan"]["n_chunks"]
        # one timeline per worker process: the planned workers, and any a nanny restarted
        workers = entry["plan"]["n_workers"] + entry["worker_deaths"]
        assert len(entry["worker_peak_rss_bytes_psutil"]) == workers, (
            entry["worker_peak_rss_bytes_psutil"], entry["worker_deaths"], n,
            [(t["pid"], t["t"][:1], t["t"][-1:]) for t in saved["sizes"][n].get("timelines", [])],
        )
        assert all(p > 50 * 1024**2 for p in entry["worker_peak_rss_bytes_psutil"])
        assert entry["predicted_peak_bytes"] > 0
    assert printed["load"]["rows"] > 0
    # The saved JSON keeps the largest run's timelines (the plot's data), printed does not.
    assert saved["sizes"]["100"]["timelines"] and "timelines" not in printed["sizes"]["100"]
    assert (tmp / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_lost_check_catches_a_lost_and_a_stray_row(quick_run):
    _, db, printed, _ = quick_run
    mod = _module()
    entry = printed["sizes"]["40"]
    url = f"sqlite:///{db}"
    report = {"status": "finished", "n_chunks": entry["plan"]["n_chunks"],
              "chunks_done": entry["plan"]["n_chunks"], "chunks_failed": 0}
    args = (url, entry["run_id"], 40, 2, "load-40", report)
    assert mod.check_outputs(*args)["ok"] is True
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        key = conn.exec_driver_sql(
            "SELECT ts_code, trade_date FROM stock_predictions WHERE model_version='load-40' "
            "ORDER BY ts_code LIMIT 1"
        ).one()
        conn.exec_driver_sql(
            "DELETE FROM stock_predictions WHERE model_version='load-40' AND ts_code=? "
            "AND trade_date=?", tuple(key),
        )
    lost = mod.check_outputs(*args)
    assert lost["ok"] is False and lost["prediction_rows"] == lost["expected_rows"] - 1
    with engine.begin() as conn:  # back, plus a row for a stock outside the selection
        conn.exec_driver_sql(
            "INSERT INTO stock_predictions SELECT ts_code, trade_date, 'load-40', "
            "predicted_return, predicted_direction, confidence, predicted_return_3d, "
            "predicted_direction_3d, prediction_date, run_id FROM stock_predictions "
            "WHERE model_version='load-100' AND ts_code=? AND trade_date=?", tuple(key),
        )
    assert mod.check_outputs(*args)["ok"] is True
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO stock_predictions SELECT ts_code, trade_date, 'load-40', "
            "predicted_return, predicted_direction, confidence, predicted_return_3d, "
            "predicted_direction_3d, prediction_date, run_id FROM stock_predictions "
            "WHERE model_version='load-100' ORDER BY ts_code DESC LIMIT 1"
        )
    stray = mod.check_outputs(*args)
    engine.dispose()
    assert stray["ok"] is False and stray["no_stock_outside_selection"] is False


def test_a_forked_workers_own_child_is_not_counted_as_a_worker():
    """A worker forked by a forkserver carries the server's command line, and so do the
    processes it forks in turn: only the server's own children are workers."""
    import multiprocessing
    import os

    mod = _module()
    ctx = multiprocessing.get_context("forkserver")
    worker = ctx.Process(target=os.system, args=("sleep 60",))  # a worker that forks a child
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not psutil.Process(worker.pid).children():
            assert time.monotonic() < deadline and worker.is_alive()
            time.sleep(0.05)
        child = psutil.Process(worker.pid).children()[0]
        me = os.getpid()
        assert mod._is_worker(psutil.Process(worker.pid), me)
        assert not mod._is_worker(child, me)
        assert not mod._is_worker(psutil.Process(worker.pid).parent(), me)  # the server
    finally:
        for proc in psutil.Process(worker.pid).children(recursive=True):
            proc.kill()
        worker.kill()
        worker.join(10)


def test_the_stocks_benchmark_counts_the_forkservers_children_only():
    spec = importlib.util.spec_from_file_location("bench_stocks", REPO / "benchmarks" / "stocks.py")
    stocks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stocks)
    server = "python -c from multiprocessing.forkserver import main; main(8, 9, ['torch'])"
    sampler = stocks.TreeSampler(root=100)
    sampler.peaks = {
        100: {"peak": 500, "cmd": "python stocks.py --contender hpcbatch", "parent": 1,
              "cpu_s": 9.0},
        101: {"peak": 300, "cmd": server, "parent": 100, "cpu_s": 1.5},  # the forkserver
        102: {"peak": 400, "cmd": server, "parent": 101, "cpu_s": 4.0},  # its workers
        103: {"peak": 410, "cmd": server, "parent": 101, "cpu_s": 4.25},
        104: {"peak": 200, "cmd": server, "parent": 102, "cpu_s": 0.25},  # a worker's fork
        105: {"peak": 10, "cmd": "python -c from multiprocessing.resource_tracker ...",
              "parent": 100, "cpu_s": 0.01},
    }  # fmt: skip
    split = sampler.split()
    assert split["worker_peak_rss_bytes"] == [400, 410]
    assert split["other_process_peaks_bytes"] == [10, 200, 300]
    # CPU the same way: the workers' apart, the root's own left to the contender (getrusage)
    assert split["worker_cpu_s"] == 8.25
    assert split["other_process_cpu_s"] == 1.76


def test_the_stocks_benchmark_reads_a_process_cpu_time_as_proc_stat_says():
    spec = importlib.util.spec_from_file_location("bench_stocks", REPO / "benchmarks" / "stocks.py")
    stocks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stocks)
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.6: pass\ntime.sleep(30)"])  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while stocks._cpu(busy.pid) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.05)
        used = stocks._cpu(busy.pid)
        assert 0.6 <= used < 2.0, used  # the spin's CPU, not wall time or a tick count
        times = psutil.Process(busy.pid).cpu_times()
        assert times.user + times.system == pytest.approx(used, abs=0.05)
    finally:
        busy.kill()
        busy.wait()
    assert stocks._cpu(busy.pid) == 0.0  # gone: nothing, not an error
