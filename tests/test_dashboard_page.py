"""The live hpcbatch page in the Dask dashboard (hpcbatch/dashboard.py), in a real browser.

A real LocalCluster (two worker processes with a memory limit, dashboard on 127.0.0.1)
runs ``hpcbatch.map`` through its scheduler address, as a user's existing scheduler
would; one chunk allocates past the worker's limit, so the nanny kills the worker and the
runner splits the chunk. Headless chromium (tests/browser.py) opens
``<dashboard>/hpcbatch`` while the run goes and reads what a user sees.

Set HPCBATCH_UPDATE_SCREENSHOTS=1 to write docs/dashboard-live.png (the page mid-run,
with the split) from the live test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import dask.config
import pytest
import services
from browser import console_errors
from distributed import Client, LocalCluster

import hpcbatch
from hpcbatch import dashboard
from hpcbatch.cluster import dask_memory_config

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "dashboard-live.png"
MiB = 1024**2
LIMIT = 600 * MiB
HOG_ITEM = 9  # the chunk holding it (4 items) allocates past LIMIT; its halves do not
SMALL = {"per_item_bytes": 1024, "fixed_bytes": 32 * MiB}


def slow_square(batch, *, hog_item: int = -1, hog_mb: int = 0, sleep_s: float = 0.3):
    """x * x per item, ``sleep_s`` per item; a batch of more than 2 items holding
    ``hog_item`` first touches ``hog_mb`` MiB (the nanny kills the worker)."""
    import numpy as np

    items = [int(x) for x in batch]
    if hog_mb and hog_item in items and len(items) > 2:
        block = np.ones(hog_mb * MiB // 8)
        time.sleep(5.0)
        del block
    time.sleep(sleep_s * len(items))
    return [x * x for x in items]


@pytest.fixture(scope="module")
def cluster():
    with (
        dask.config.set(dask_memory_config(None)),
        LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=LIMIT, processes=True,
                     host="127.0.0.1", dashboard_address="127.0.0.1:0") as lc,
        Client(lc) as client,
    ):  # fmt: skip
        client.wait_for_workers(2, timeout=60)
        yield lc, client


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _page(client) -> str:
    return dashboard.page_url(client.dashboard_link)


def _wait_served(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _get(url)
            return
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _read(driver) -> dict:
    """What the page shows now: the counters and each worker's process memory."""
    return driver.execute_script(
        """
        var out = {polls: window.hpcbatchPolls, counters: {}, workers: {}, splits: [], kills: []};
        document.querySelectorAll('#counters .counter').forEach(function (d) {
            out.counters[d.id.slice(2)] = d.querySelector('b').textContent; });
        document.querySelectorAll('#workers tr.worker').forEach(function (tr) {
            out.workers[tr.dataset.name] = {process: Number(tr.dataset.process),
                status: tr.dataset.status, text: tr.textContent}; });
        document.querySelectorAll('#events tr.ev-split').forEach(function (tr) {
            out.splits.push(tr.textContent); });
        document.querySelectorAll('#events tr.ev-kill').forEach(function (tr) {
            out.kills.push(tr.textContent); });
        out.items = document.getElementById('items').textContent;
        out.plan = document.getElementById('plantable').textContent;
        out.reasons = document.getElementById('reasons').children.length;
        out.svg = document.querySelectorAll('#workers svg.membar').length;
        return out;
        """
    )


def _wait(driver, check, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    seen = _read(driver)
    while time.monotonic() < deadline:
        seen = _read(driver)
        if check(seen):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"the page never showed {what} within {timeout} s; it shows {seen}")


def _watch_splits(driver, seconds: float, until=None) -> tuple[dict, float | None]:
    """Read the page every 0.1 s for up to ``seconds``, until ``until(read)`` (default:
    a split shows): the last read and when a split was first seen (None: not yet)."""
    deadline, seen_at = time.monotonic() + seconds, None
    until = until or (lambda s: bool(s["splits"]))
    while True:
        seen = _read(driver)
        if seen["splits"] and seen_at is None:
            seen_at = time.time()
        if time.monotonic() >= deadline or until(seen):
            return seen, seen_at
        time.sleep(0.1)


def _changed(first: dict, now: dict) -> bool:
    """More chunks done and some worker's memory moved (while the kills of the hog
    chunk restart both workers, nothing finishes for a few seconds)."""
    return int(now["counters"].get("done") or 0) > int(first["counters"]["done"]) and any(
        now["workers"].get(n, w)["process"] != w["process"] for n, w in first["workers"].items()
    )


def _run_in_thread(fn, **kwargs):
    box: dict = {}

    def target():
        try:
            box["result"] = hpcbatch.map(fn, **kwargs)
        except BaseException as exc:  # noqa: BLE001 (re-raised by the test)
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


@pytest.mark.browser
def test_live_page_shows_memory_chunks_and_the_split_of_an_oom(cluster, browser, tmp_path):
    lc, client = cluster
    items = list(range(48))
    fn = _partial(hog_item=HOG_ITEM, hog_mb=900)
    thread, box = _run_in_thread(
        fn, items=items, cluster=lc.scheduler_address, footprint=SMALL, chunk_size=4,
        scratch=tmp_path, report_dir=str(tmp_path / "reports"), progress=False,
    )  # fmt: skip
    _wait_served(_page(client) + "/state.json", 60)  # the run registers the page
    browser.get(_page(client))
    first = _wait(browser, lambda s: s["counters"].get("done") not in (None, "-", "0")
                  and len(s["workers"]) == 2, 60, "chunks done and two workers")  # fmt: skip
    assert all(w["process"] > 10 * MiB for w in first["workers"].values()), first
    assert "600 MiB" in first["plan"] and first["reasons"] >= 1 and first["svg"] == 2
    unseen = not first["splits"]  # then the moment it appears is measured below
    second, split_seen = _watch_splits(browser, 30.0, until=lambda s: _changed(first, s))
    assert int(second["counters"]["done"]) > int(first["counters"]["done"]), (first, second)
    assert second["polls"] > first["polls"]
    assert any(second["workers"][n]["process"] != w["process"]
               for n, w in first["workers"].items() if n in second["workers"]), (first, second)

    if split_seen is None:
        _, split_seen = _watch_splits(browser, 90)
    split = _read(browser)
    assert split["splits"], "the page never showed a split"
    assert "c000002" in split["splits"][0] and "split into" in split["splits"][0], split
    assert split["kills"] and "memory" in " ".join(split["kills"]), split
    latency = split_seen - _split_event(client)["time"]
    print(f"\nsplit shown {latency:.2f} s after the runner recorded it (measured: {unseen})")
    if unseen:
        assert latency < 5.0, latency  # runner tick 0.5 s + feed 1 s + page poll 1 s + slack
    both = _wait(browser, lambda s: len(s["workers"]) == 2, 30, "both workers back")
    assert any("restarted" in w["text"] for w in both["workers"].values()), both["workers"]
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(2400, int(height) + 140))
    time.sleep(1.2)  # a poll at the new size
    shot = tmp_path / "dashboard-live.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("HPCBATCH_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(shot, SCREENSHOT)

    thread.join(180)
    assert not thread.is_alive(), "hpcbatch.map did not finish"
    assert "error" not in box, box.get("error")
    assert list(box["result"]) == [x * x for x in items]
    assert box["result"].report.chunks_split >= 1
    last = _wait(browser, lambda s: s["counters"].get("done") == "12", 10, "12 chunks done")
    assert "48 / 48" in last["items"], last
    state = json.loads(_get(_page(client) + "/state.json"))
    n, elapsed = state["messages"]["n"], state["progress"]["elapsed_s"]
    print(f"{n} messages from the driver in a run of {elapsed:.1f} s")
    assert n <= elapsed / dashboard.FEED_EVERY_S + 3, (n, elapsed)  # + run, final, slack
    assert console_errors(browser) == []


def _partial(**kwargs):
    import functools

    return functools.partial(slow_square, **kwargs)


def _split_event(client) -> dict:
    state = json.loads(_get(_page(client) + "/state.json"))
    splits = [e for e in state["events"] if e["kind"] == "split"]
    assert splits, state["events"]
    return splits[0]


# -------------------------------------------------- without a browser ----


def test_page_is_registered_once_and_each_run_resets_it(cluster, tmp_path):
    lc, client = cluster
    feeds = dashboard.install(client, None, "first")
    assert len(feeds) == 1 and dashboard.install(client, None, "second")
    routes = client.run_on_scheduler(_route_patterns)
    assert sum("hpcbatch/state" in r for r in routes) == 1, routes
    state = json.loads(_get(_page(client) + "/state.json"))
    assert state["run"]["run_id"] == "second" and state["progress"] is None
    feeds[0]({"run_id": "second", "state": "running", "final": True, "counters": {"done": 3},
              "events": [{"kind": "split", "chunk": "c1", "children": ["c1a"], "time": 1.0}]})
    state = json.loads(_get(_page(client) + "/state.json"))
    assert state["progress"]["counters"] == {"done": 3} and len(state["events"]) == 1
    assert state["thresholds"]["terminate"] == 0.95  # read from the workers
    assert {w["memory_limit"] for w in state["workers"]} == {LIMIT}
    assert b'href="hpcbatch"' in _get(client.dashboard_link)  # navbar link on Dask's pages


def _route_patterns(dask_scheduler) -> list[str]:
    return [
        rule.matcher.regex.pattern
        for host in dask_scheduler.http_application.default_router.rules
        for rule in getattr(host.target, "rules", ())
    ]


def test_a_hand_started_scheduler_serves_the_page_of_the_run(tmp_path):
    """`dask scheduler` in its own process (as a user starts one): the plugin is unpickled
    there and the page keeps the run's final counts after the run."""
    import subprocess
    import sys

    port = services.free_port()
    sched_file = tmp_path / "scheduler.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    commands = [
        [*dask, "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
         f"127.0.0.1:{port}", "--scheduler-file", str(sched_file)],
        [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
         str(sched_file), "--nthreads", "1", "--memory-limit", "500MiB", "--no-dashboard"],
    ]  # fmt: skip
    procs = []
    try:
        for i, command in enumerate(commands):
            log = open(tmp_path / f"dask-{i}.log", "w")  # noqa: SIM115 (closed with the process)
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
            deadline = time.monotonic() + 60
            while i == 0 and not sched_file.exists():
                assert time.monotonic() < deadline and procs[0].poll() is None, "no scheduler"
                time.sleep(0.2)
        items = list(range(12))
        result = hpcbatch.map(_partial(sleep_s=0.01), items, cluster=str(sched_file),
                              footprint=SMALL, chunk_size=3, scratch=tmp_path, progress=False,
                              report_dir=str(tmp_path / "reports"))  # fmt: skip
        assert list(result) == [x * x for x in items]
        state = json.loads(_get(f"http://127.0.0.1:{port}/hpcbatch/state.json"))
        assert state["progress"]["final"] and state["progress"]["state"] == "finished", state
        assert state["progress"]["counters"]["done"] == 4
        assert state["plan"]["chunk_size"] == 3 and state["plan"]["reasons"]
        assert [w["memory_limit"] for w in state["workers"]] == [500 * MiB]
        assert b"state.json" in _get(f"http://127.0.0.1:{port}/hpcbatch")
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_page_is_bound_to_the_dashboard_address_only(cluster):
    lc, client = cluster
    dashboard.install(client, None, "bound")
    port = int(client.dashboard_link.split(":")[2].split("/")[0])
    assert b"state.json" in _get(f"http://127.0.0.1:{port}/hpcbatch")
    others = ["127.0.0.2", *_non_loopback_addresses()]
    for host in others:
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((host, port)) != 0, f"the dashboard answers on {host}:{port}"
        with pytest.raises(urllib.error.URLError):
            _get(f"http://{host}:{port}/hpcbatch", timeout=2)


def _non_loopback_addresses() -> list[str]:
    found = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(info[4][0])
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            found.add(s.getsockname()[0])
        except OSError:
            pass
    return sorted(a for a in found if not a.startswith("127."))


def test_the_printed_dashboard_line_names_the_page():
    assert dashboard.page_url("http://127.0.0.1:8787/status") == "http://127.0.0.1:8787/hpcbatch"
    assert dashboard.page_url("http://h:1/pre/status") == "http://h:1/pre/hpcbatch"


# ------------------------------------------------------------- real SLURM ----


@pytest.mark.slurm
@pytest.mark.browser
def test_live_page_of_a_run_on_slurm_worker_jobs(
    slurm_env: dict, browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """hpcbatch.map on dask-jobqueue worker jobs of the real SLURM: the page is served by
    the scheduler in this driver and shows the SLURM workers' memory and the counts."""
    from hpcbatch import config as hb_config
    from hpcbatch.resources import detect_resources

    monkeypatch.chdir(tmp_path)  # worker jobs write slurm-<id>.out here
    # sbatch passes this environment on: the worker jobs import slow_square from tests/
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent),
                                                      os.environ.get("PYTHONPATH", "")]))
    settings = hb_config.load()
    settings["cluster"].update({
        "backend": "slurm", "queue": slurm_env["partition"], "walltime": "00:10:00",
        "interface": "lo", "dashboard-address": "127.0.0.1:0", "jobs": 1,
        "start-timeout": 90, "local-directory": str(tmp_path / "dask"),
    })  # fmt: skip
    caplog.set_level("INFO", logger="hpcbatch.dashboard")
    seen: dict = {}

    def watch() -> None:  # the run needs the main thread (dask-jobqueue sets signals)
        try:
            seen["url"] = url = _page_from_log(caplog, 150)
            browser.get(url)
            seen["first"] = _wait(browser, lambda s: s["counters"].get("done") not in
                                  (None, "-", "0") and s["workers"], 90, "chunks done")
            time.sleep(3)
            seen["second"] = _read(browser)
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            seen["error"] = exc

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    items = list(range(40))
    result = hpcbatch.map(
        _partial(sleep_s=0.4), items, cluster="slurm", settings=settings,
        resources=detect_resources(memory_bytes=1200 * 10**6, cpus=1, plan_ahead=True),
        footprint=SMALL, chunk_size=4, scratch=tmp_path, progress=False,
        report_dir=str(tmp_path / "reports"),
    )  # fmt: skip
    watcher.join(30)
    assert list(result) == [x * x for x in items]
    if "error" in seen:
        raise seen["error"]
    assert seen["url"].startswith("http://127.0.0.1:"), seen
    first, second = seen["first"], seen["second"]
    assert int(second["counters"]["done"]) > int(first["counters"]["done"]), (first, second)
    ((name, worker),) = second["workers"].items()
    assert worker["process"] > 10 * MiB and worker["status"] == "running", second
    assert console_errors(browser) == []


def _page_from_log(caplog, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in list(caplog.records):
            if record.name == "hpcbatch.dashboard" and record.getMessage().startswith(
                "hpcbatch page: "
            ):
                return record.getMessage().split(": ", 1)[1]
        time.sleep(0.2)
    raise AssertionError("no 'hpcbatch page:' line logged")


# ------------------------------------ states a short run rarely reaches ----


def _serve(state: dict):
    """The page and a fixed state.json on 127.0.0.1 (a plain HTTP server in a thread)."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body, kind = (
                (json.dumps(state).encode(), "application/json")
                if self.path.endswith("/state.json")
                else (dashboard.PAGE_HTML.encode(), "text/html; charset=utf-8")
            )
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _worker_state(name: str, **over) -> dict:
    w = {"name": name, "address": f"tcp://127.0.0.1:1{name}", "status": "running",
         "nthreads": 1, "memory_limit": 1024 * MiB, "process": 300 * MiB, "managed": 100 * MiB,
         "unmanaged": 200 * MiB, "spilled": 0, "executing": 1, "restarts": 0,
         "gpu_used": None, "gpu_total": None, "thresholds": None}  # fmt: skip
    return {**w, **over}


@pytest.mark.browser
def test_page_draws_paused_spilled_restarted_and_gpu_workers(browser):
    state = {
        "now": time.time(), "run": {"run_id": "r"}, "thresholds": {"target": 0.6,
        "spill": 0.7, "pause": 0.8, "terminate": 0.95},
        "plan": {"predicted_peak_bytes": 400 * MiB, "reasons": ["because"], "n_workers": 2},
        "progress": {"run_id": "r", "state": "running", "final": False, "n_chunks": 10,
                     "n_items": 100, "items_done": 40, "rate": 2.0, "eta_s": 30,
                     "elapsed_s": 20, "counters": {"done": 4, "failed": 1}, "events": []},
        "progress_age_s": 0.3, "events": [], "deaths": [], "messages": {"n": 3},
        "workers": [
            _worker_state("0", status="paused", process=850 * MiB, spilled=200 * MiB),
            _worker_state("1", restarts=2, gpu_used=3 * 1024 * MiB, gpu_total=80 * 1024 * MiB),
        ],
    }  # fmt: skip
    server = _serve(state)
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/hpcbatch")
        seen = _wait(browser, lambda s: len(s["workers"]) == 2, 10, "two workers")
    finally:
        server.shutdown()
    paused, gpu = seen["workers"]["0"], seen["workers"]["1"]
    assert paused["status"] == "paused" and "paused" in paused["text"]
    assert "200 MiB" in paused["text"]  # spilled
    assert "restarted 2x" in gpu["text"] and "3 GiB / 80 GiB" in gpu["text"]
    bars = browser.execute_script(
        "return Array.from(document.querySelectorAll('#workers svg.membar')).map("
        "function (s) { return [s.querySelectorAll('rect').length, s.querySelectorAll('text')"
        ".length, s.querySelectorAll('line').length]; })"
    )
    # spilled adds a rect; T/S/P/K labels; 4 thresholds + limit + predicted peak lines
    assert bars == [[4, 4, 6], [3, 4, 6]], bars
    assert seen["counters"]["failed"] == "1" and "40 / 100" in seen["items"]
    assert console_errors(browser) == []


def test_page_follows_the_dashboard_prefix():
    """A scheduler started with ``--dashboard-prefix /dask`` serves ``/dask/hpcbatch``."""
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                     dashboard_address="127.0.0.1:0",
                     scheduler_kwargs={"http_prefix": "/dask"}) as lc,
        Client(lc) as client,
    ):  # fmt: skip
        assert dashboard.install(client, None, "prefixed")
        port = lc.scheduler.http_server.port
        state = json.loads(_get(f"http://127.0.0.1:{port}/dask/hpcbatch/state.json"))
        assert state["run"]["run_id"] == "prefixed"
        with pytest.raises(urllib.error.HTTPError):
            _get(f"http://127.0.0.1:{port}/hpcbatch/state.json")
