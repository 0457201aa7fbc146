"""Seeing a run: progress watchers, progress.json, ``hpcbatch status`` / ``runs``."""

from __future__ import annotations

import functools
import logging

import pytest
import runs_helpers as rsh
import runtime_helpers as rh

from hpcbatch.cluster import open_cluster
from hpcbatch.config import load
from hpcbatch.runner import make_chunks, run

pytestmark = pytest.mark.timeout(300)


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
