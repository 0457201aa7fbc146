"""``report.html`` of a real run, opened offline in a real browser (headless chromium).

One small run on a real local cluster (2 workers of 400 MB, the plan's cluster via
``open_cluster``) with one chunk that fails once (a retry) and one that is SIGKILLed
like the kernel OOM killer does it while it has more than 2 items (a worker death and a
split).  Then: report.json has the provenance; report.html and Dask's performance
report reference nothing on the network; in chromium with networking off, every plot
of report.html is drawn (one memory series and one Gantt lane per worker, ticks for
the retry, the split and the death) with no console error, and dask-report.html renders
its Bokeh document with no console error.  The screenshot goes to ``tmp_path``, and to
``docs/report-html.png`` when ``HPCBATCH_SCREENSHOTS=1``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import runtime_helpers as rh
from browser import browser, console_errors  # noqa: F401  (the fixture)

from hpcbatch.cluster import open_cluster
from hpcbatch.config import load
from hpcbatch.runner import Chunk, TaskContext, make_chunks, run

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
RUN_ID = "html-demo"
#: a src/href/url() that leaves the file: another host or protocol-relative
EXTERNAL = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?)\s*(?:https?:)?//""", re.I)


def demo_task(chunk: Chunk, ctx: TaskContext) -> dict:
    """0.3 s per chunk; c000001 fails on its first attempt; c000002 is SIGKILLed while
    it has more than 2 items (its halves of 2 pass)."""
    time.sleep(0.3)
    if chunk.chunk_id == "c000001" and ctx.attempt == 0:
        raise ValueError("transient failure (injected)")
    if chunk.chunk_id == "c000002" and chunk.size > 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"items": chunk.size}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("html")
    plan = rh.small_plan(32, 4)
    settings = load(overrides={"cluster": {"dashboard-address": "127.0.0.1:0"}})
    with open_cluster(plan, settings, quiet=True) as client:
        report = run(
            make_chunks(32, 4),
            demo_task,
            client,
            run_id=RUN_ID,
            plan=plan,
            report_dir=base,
            progress=False,
            retries=2,
        )
    assert report.status == "finished", report.summary()
    assert report.chunks_retried >= 1 and report.chunks_split >= 1
    return base / RUN_ID


def test_report_json_has_the_provenance_and_the_page_is_self_contained(run_dir):
    data = json.loads((run_dir / "report.json").read_text())
    prov = data["provenance"]
    assert prov["run_id"] == RUN_ID and prov["host"]
    assert prov["started_at"] < prov["ended_at"]  # ISO 8601 UTC strings sort by time
    assert prov["started_at"].endswith("+00:00")
    assert {"hpcbatch", "dask", "distributed"} <= set(prov["versions"])
    page = (run_dir / "report.html").read_text()
    assert not EXTERNAL.findall(page), EXTERNAL.findall(page)[:5]
    assert "<script" not in page and "@import" not in page
    for text in (RUN_ID, prov["started_at"], prov["versions"]["distributed"], "Reasons"):
        assert text in page
    # Dask's performance report carries Bokeh inline: no script or stylesheet from a CDN
    dask_page = (run_dir / "dask-report.html").read_text()
    assert not re.findall(r"<script[^>]*\bsrc=", dask_page)
    assert not re.findall(r"<link[^>]*\bhref=[\"']?(?:https?:)?//", dask_page)
    assert "Bokeh" in dask_page and len(dask_page) > 500_000


def _offline(driver) -> None:
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )


def _fetched(driver) -> list[str]:
    """What the page loaded besides itself (resource timing entries)."""
    return driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")


def _size(driver, css: str) -> tuple[float, float]:
    rect = driver.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return [r.width, r.height]",
        css,
    )
    return rect[0], rect[1]


def _count(driver, css: str) -> int:
    return driver.execute_script("return document.querySelectorAll(arguments[0]).length", css)


@pytest.mark.browser
def test_report_html_draws_every_plot_offline_without_console_errors(run_dir, browser, tmp_path):  # noqa: F811
    data = json.loads((run_dir / "report.json").read_text())
    n_workers = len(data["measured_peak_per_worker"])
    assert n_workers == 2
    _offline(browser)
    browser.get((run_dir / "report.html").as_uri())
    assert browser.title == f"hpcbatch run {RUN_ID}"
    for plot in ("svg#peaks", "svg#memory", "svg#gantt"):
        width, height = _size(browser, plot)
        assert width > 500 and height > 60, (plot, width, height)
    # one series per worker, each a drawn line (a path with a nonzero box)
    assert _count(browser, "svg#memory path.series") == n_workers
    boxes = browser.execute_script(
        "return [...document.querySelectorAll('svg#memory path.series')]"
        ".map(p => { const b = p.getBBox(); return b.width * b.height; })"
    )
    assert all(b > 0 for b in boxes), boxes
    assert _count(browser, "svg#peaks rect.peak") == n_workers
    assert _count(browser, "svg#gantt g.lane") >= n_workers
    assert _count(browser, "svg#gantt rect.bar") >= data["tasks_done"]
    assert _count(browser, "svg#gantt rect.bar.failed") >= 1  # the attempt that raised
    for kind in ("start", "retry", "split", "death"):
        assert _count(browser, f"svg#memory .tick-{kind}") >= 1, kind
    assert _count(browser, "#deaths tr") >= 2  # a header and the killed worker
    assert "SIGKILL" in browser.find_element("id", "deaths").text
    assert _count(browser, "#provenance tr") >= 8
    assert console_errors(browser) == []
    assert [u for u in _fetched(browser) if not u.startswith("file:")] == []
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1200, min(int(height) + 40, 4000))
    shot = tmp_path / "report-html.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    if os.environ.get("HPCBATCH_SCREENSHOTS") == "1":
        shutil.copy(shot, ROOT / "docs" / "report-html.png")


@pytest.mark.browser
def test_dask_performance_report_renders_offline_without_console_errors(run_dir, browser):  # noqa: F811
    _offline(browser)
    browser.get((run_dir / "dask-report.html").as_uri())
    deadline = time.monotonic() + 30
    roots = 0
    while time.monotonic() < deadline and not roots:
        roots = browser.execute_script(
            "return window.Bokeh && Bokeh.documents ? Bokeh.documents.length : 0"
        )
        time.sleep(0.2)
    assert roots >= 1, "Bokeh did not render the performance report"
    time.sleep(1.0)  # let the views draw (errors would be logged by then)
    assert console_errors(browser) == []
    assert [u for u in _fetched(browser) if not u.startswith(("file:", "data:"))] == []
