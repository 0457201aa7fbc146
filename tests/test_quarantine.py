"""Per-item quarantine (issue 16): a task skips its bad items with a reason, the runner
collects them (report, closing line, ledger), the rest completes, and past max-bad-items
the run fails with one line naming them.  Framework first (chunkstate alone, then the
runner on a small LocalCluster), then stocks on a real SQLite market."""

from __future__ import annotations

import json

import pytest
import runtime_helpers as rh

from hpcbatch.chunkstate import (
    QUARANTINED,
    ChunkStates,
    Policy,
    bad_item_limit,
    make_chunks,
    quarantine_line,
)
from hpcbatch.cluster import open_cluster
from hpcbatch.config import load
from hpcbatch.errors import ChunkFailedError, ConfigError
from hpcbatch.ledger import Ledger
from hpcbatch.runner import run
from hpcbatch.workload import RunSettings

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------ pure parts ----


def test_the_limit_is_a_count_a_percentage_or_the_larger_of_10_and_1_percent():
    assert bad_item_limit(None, 60) == 10
    assert bad_item_limit(None, 5000) == 50
    assert bad_item_limit(None, 5001) == 51  # 1 % rounded up
    assert bad_item_limit(0, 60) == 0
    assert bad_item_limit(3, 60) == 3
    assert bad_item_limit("3", 60) == 3
    assert bad_item_limit("5%", 200) == 10
    assert bad_item_limit(" 0.5% ", 1000) == 5
    for bad in ("-1", "many", "150%", 2.5, True):
        with pytest.raises(ConfigError, match="max-bad-items must be"):
            bad_item_limit(bad, 60)
    settings = load()
    assert RunSettings.from_config(settings).max_bad_items is None  # the packaged default
    assert RunSettings.from_config({**settings, "max-bad-items": "2%"}).max_bad_items == "2%"
    assert RunSettings.from_config({**settings, "max-bad-items": 7}).max_bad_items == 7
    with pytest.raises(ConfigError, match="max-bad-items"):
        RunSettings.from_config({**settings, "max-bad-items": "lots"})


def _bad(*items: str) -> dict:
    return {QUARANTINED: [{"item": i, "reason": f"{i} is broken"} for i in items], "rows": 1}


def test_chunk_states_collect_quarantined_items_instead_of_summing_them():
    chunks = make_chunks(6, 2, items=list("abcdef"))
    states = ChunkStates(chunks, Policy(max_bad_items=2, item_name="stock"))
    first, second, third = states.take(3)
    states.succeeded(first, _bad("a"))
    states.succeeded(second, {"rows": 2})
    assert states.counters.quarantined == [{"item": "a", "reason": "a is broken"}]
    assert states.counters.meta == {"rows": 3}  # the list is not a number to sum
    assert states.fatal is None
    states.succeeded(third, _bad("e", "f"))  # 3 > 2: the run fails, naming them
    assert states.finished and states.counters.chunks_done == 3
    error = states.fatal
    assert isinstance(error, ChunkFailedError) and error.chunk_id == "c000002"
    text = str(error)
    assert "\n" not in text
    assert text.startswith("3 stocks quarantined: a (a is broken), e (e is broken), f (f is broken)")
    assert "more than max-bad-items (2)" in text and "--resume" in text


def test_without_a_limit_and_seeded_from_a_resume_every_item_is_kept():
    states = ChunkStates(make_chunks(2, 1, items=["x", "y"]), Policy())
    states.seed_quarantined([{"item": "w", "reason": "earlier"}])
    for attempt in states.take(2):
        states.succeeded(attempt, {QUARANTINED: [attempt.chunk.items[0]]})  # a bare item
    assert states.fatal is None
    assert [e["item"] for e in states.counters.quarantined] == ["w", "x", "y"]
    line = quarantine_line(states.counters.quarantined, "box")
    assert line == "3 boxes quarantined: w (earlier), x, y"
    many = [{"item": f"s{i}", "reason": "bad"} for i in range(8)]
    assert quarantine_line(many, "stock").endswith("s4 (bad) and 3 more (all in report.json)")


# ------------------------------------------------- the runner on Dask ----


def flaky_items(chunk, ctx) -> dict:
    """A task whose items named ``bad*`` are quarantined; the others are counted."""
    bad = [i for i in chunk.items if str(i).startswith("bad")]
    return {
        QUARANTINED: [{"item": i, "reason": f"no data for {i}"} for i in bad],
        "good": chunk.size - len(bad),
    }


@pytest.fixture(scope="module")
def client():
    plan = rh.small_plan(40, 4)
    settings = load(overrides={"cluster": {"dashboard-address": "127.0.0.1:0"}})
    with open_cluster(plan, settings, quiet=True) as c:
        yield c


def _items(n: int, bad: set[int]) -> list[str]:
    return [f"bad{i}" if i in bad else f"ok{i}" for i in range(n)]


def test_runner_records_quarantined_items_in_report_ledger_and_closing_line(
    client, tmp_path, capsys
):
    items = _items(40, {3, 17, 29})
    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    opts = dict(run_id="q", ledger=ledger, report_dir=tmp_path, item_name="thing")
    report = run(make_chunks(40, 4, items=items), flaky_items, client, **opts)
    assert report.status == "finished" and report.items_done == 40
    assert report.results_meta == {"good": 37}
    assert report.items_quarantined == 3
    assert sorted(e["item"] for e in report.quarantined) == ["bad17", "bad29", "bad3"]
    assert {"item": "bad3", "reason": "no data for bad3"} in report.quarantined
    saved = json.loads((tmp_path / "q" / "report.json").read_text())
    assert saved["items_quarantined"] == 3 and saved["quarantined"] == report.quarantined
    assert "3 things quarantined: bad" in report.summary()
    assert "bad3 (no data for bad3)" in report.summary()
    assert "; 3 things quarantined: bad" in capsys.readouterr().err
    metas = ledger.chunk_meta("q")
    assert metas["c000000"][QUARANTINED] == [{"item": "bad3", "reason": "no data for bad3"}]
    assert QUARANTINED not in metas["c000001"] or not metas["c000001"][QUARANTINED]
    # the same run again: already finished, and its report still names them (from the ledger)
    again = run(make_chunks(40, 4, items=items), flaky_items, client, **{**opts, "resume": True})
    assert again.status == "already-finished"
    assert sorted(e["item"] for e in again.quarantined) == ["bad17", "bad29", "bad3"]


def test_runner_fails_past_max_bad_items_with_one_line_naming_them(client, tmp_path):
    items = _items(40, {1, 2, 5, 9})
    with pytest.raises(ChunkFailedError) as info:
        run(
            make_chunks(40, 4, items=items), flaky_items, client, run_id="many",
            max_bad_items=3, progress=False, report_dir=tmp_path,
        )  # fmt: skip
    text = str(info.value)
    assert "\n" not in text and "more than max-bad-items (3)" in text
    assert text.startswith("4 items quarantined: bad")  # in the order the chunks finished
    assert all(f"bad{i} (no data for bad{i})" in text for i in (1, 2, 5, 9))
    saved = json.loads((tmp_path / "many" / "report.json").read_text())
    assert saved["status"] == "failed" and saved["items_quarantined"] >= 4
    # the default (the larger of 10 and 1 %) lets the same four through
    report = run(make_chunks(40, 4, items=items), flaky_items, client, run_id="many2",
                 progress=False)  # fmt: skip
    assert report.status == "finished" and report.items_quarantined == 4

