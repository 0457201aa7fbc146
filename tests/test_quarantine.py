"""Per-item quarantine (issue 16): a task skips its bad items with a reason, the runner
collects them (report, closing line, ledger), the rest completes, and past max-bad-items
the run fails with one line naming them.  Framework first (chunkstate alone, then the
runner on a small LocalCluster), then stocks on a real SQLite market."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import runtime_helpers as rh
from click.testing import CliRunner

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
from hpcbatch.stocks.features import min_rows
from hpcbatch.stocks.schema import make_engine
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
    resumed = ChunkStates(make_chunks(2, 1), Policy(max_bad_items=1))
    resumed.seed_quarantined(states.counters.quarantined)  # over the limit before it starts
    assert resumed.take(2) == [] and "3 items quarantined: w" in str(resumed.fatal)
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
    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    opts = dict(run_id="many", ledger=ledger, max_bad_items=3, progress=False)
    with pytest.raises(ChunkFailedError) as info:
        run(make_chunks(40, 4, items=items), flaky_items, client, report_dir=tmp_path, **opts)
    text = str(info.value)
    assert "\n" not in text and "more than max-bad-items (3)" in text
    assert text.startswith("4 items quarantined: bad")  # in the order the chunks finished
    assert all(f"bad{i} (no data for bad{i})" in text for i in (1, 2, 5, 9))
    saved = json.loads((tmp_path / "many" / "report.json").read_text())
    assert saved["status"] == "failed" and saved["items_quarantined"] >= 4
    # a resume counts the items recorded in the ledger: still too many, unless raised
    with pytest.raises(ChunkFailedError, match="items quarantined: .*max-bad-items \\(3\\)"):
        run(make_chunks(40, 4, items=items), flaky_items, client, **{**opts, "resume": True})
    resumed = run(make_chunks(40, 4, items=items), flaky_items, client,
                  **{**opts, "resume": True, "max_bad_items": "10%"})  # fmt: skip
    assert resumed.status == "finished" and resumed.items_quarantined == 4
    assert resumed.chunks_skipped + resumed.chunks_done == 10
    # the default (the larger of 10 and 1 %) lets the same four through
    report = run(make_chunks(40, 4, items=items), flaky_items, client, run_id="many2",
                 progress=False)  # fmt: skip
    assert report.status == "finished" and report.items_quarantined == 4


# ------------------------------------- the stocks catalogue, per stock ----


def _rows(code: str, closes, *, highs=None) -> list[tuple]:
    out = []
    for k, close in enumerate(closes):
        high = highs[k] if highs is not None else 20.0
        out.append((code, 20250101 + k, 1.0, high, 0.5, close, 1.0, 100.0, 10.0))
    return out


def test_each_bad_bar_quarantines_its_stock_with_the_first_bad_row_and_what_is_wrong():
    from hpcbatch.errors import DataError
    from hpcbatch.stocks.sink import bars_from_rows, screened_bars

    good = _rows("A.SZ", [1.0, 1.1, 1.2])
    dup = _rows("B.SZ", [1.0, 1.1, 1.2])
    dup.insert(2, dup[1])
    cases = {
        "C.SZ": (_rows("C.SZ", [1.0, None, float("nan")]), "close is NULL, NaN or not a number on 20250102"),
        "D.SZ": (_rows("D.SZ", [1.0, 1.0, float("inf")]), "close is infinite on 20250103"),
        "E.SZ": (_rows("E.SZ", [0.0, 1.0, 1.0]), "close is zero on 20250101"),
        "F.SZ": (_rows("F.SZ", [1.0, -2.0, 1.0]), "close is negative (-2) on 20250102"),
        "G.SZ": (_rows("G.SZ", [1.0, 1.0, 1.0], highs=[1.1, 0.4, 1.1]), "high 0.4 < low 0.5 on 20250102"),
        "H.SZ": (_rows("H.SZ", [1.0, "n/a", 1.0]), "close is NULL, NaN or not a number on 20250102"),
    }  # fmt: skip
    jump = _rows("J.SZ", [1.0, 11.0, 11.5])
    rows = sorted(good + dup + jump + [r for rs, _ in cases.values() for r in rs],
                  key=lambda r: r[0])  # fmt: skip
    bars, check = screened_bars(rows)
    assert bars.codes == ["A.SZ", "J.SZ"]  # the 10x jump is flagged but kept
    assert check.jumps == {"J.SZ": "close 1 -> 11 on 20250102"}
    assert check.bad == {"B.SZ": "duplicate rows on 20250102", **{c: r for c, (_, r) in cases.items()}}
    assert check.rows["B.SZ"] == 4 and check.rows["C.SZ"] == 3
    assert {"item": "F.SZ", "reason": "close is negative (-2) on 20250102"} in check.quarantined()
    with pytest.raises(DataError, match=r"bad row for B.SZ: duplicate rows on 20250102: fix"):
        bars_from_rows(rows)  # --strict: the first bad stock refuses the chunk
    assert bars_from_rows(good + jump).codes == ["A.SZ", "J.SZ"]


# ---------------------------------------------- stocks on a real market ----

N_STOCKS, N_DAYS = 60, 150
PREDICT = ("--lookback-days", "140", "--use-gpu", "false", "--mem", "4G", "--cpus", "2",
           "--chunk-size", "10")  # fmt: skip


@pytest.fixture(scope="module")
def market60(tmp_path_factory) -> Path:
    from hpcbatch.stocks.generate import generate_market

    path = tmp_path_factory.mktemp("market60") / "stocks.db"
    engine = make_engine(f"sqlite:///{path}", create=True)
    generate_market(engine, N_STOCKS, N_DAYS, seed=7)
    engine.dispose()
    return path


@pytest.fixture(scope="module")
def model60(tmp_path_factory) -> Path:
    """A tiny untrained model with fixed normalisation (as tests/stocks/conftest.py's)."""
    import numpy as np
    import torch

    from hpcbatch.stocks.model import SIZES, StockModel, save_model

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    mean = rng.normal(0, 0.1, 105).astype(np.float32)
    std = rng.uniform(0.2, 1.0, 105).astype(np.float32)
    out = tmp_path_factory.mktemp("model60") / "tiny"
    save_model(StockModel(SIZES["tiny"]), out, mean, std, {"version": "vtest"})
    return out


def _market(market60: Path, tmp_path: Path) -> str:
    dst = tmp_path / "stocks.db"
    dst.write_bytes(market60.read_bytes())
    return f"sqlite:///{dst}"


def _sql(url: str, sql: str, *args) -> list[tuple]:
    engine = make_engine(url)
    with engine.begin() as conn:
        result = conn.exec_driver_sql(sql, args)
        rows = result.all() if result.returns_rows else []
    engine.dispose()
    return rows


def _full_stocks(url: str) -> list[str]:
    """Stocks with all N_DAYS rows (the synthetic market has some shorter ones)."""
    rows = _sql(url, "SELECT ts_code FROM stock_daily GROUP BY ts_code HAVING count(*) = ?",
                N_DAYS)  # fmt: skip
    return sorted(r[0] for r in rows)


def _day(url: str, k: int) -> str:
    return _sql(url, "SELECT DISTINCT trade_date FROM stock_daily ORDER BY trade_date")[k][0]


def _predictions(url: str) -> list[tuple]:
    return _sql(url, "SELECT * FROM stock_predictions ORDER BY ts_code, trade_date")


def _cli(*args: str) -> tuple[int, str]:
    from hpcbatch.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_one_null_close_among_60_stocks_quarantines_that_stock_only(market60, model60, tmp_path):
    url = _market(market60, tmp_path)
    bad, day = _full_stocks(url)[3], _day(url, 100)
    _sql(url, "UPDATE stock_daily SET close = NULL WHERE ts_code = ? AND trade_date = ?", bad, day)
    reason = f"close is NULL, NaN or not a number on {day}"
    # train: finishes without the bad stock's windows, and says so
    code, out = _cli("stocks", "train", "--db", url, "--out", str(tmp_path / "m"), "--epochs",
                     "1", "--max-windows", "300", "--model-size", "tiny", "--lookback-days", "140")
    assert code == 0, out
    assert f"1 stock quarantined: {bad} ({reason})" in out
    # 140 rows read: 140 - 60 warm-up - 60 window = 20 windows with a next-day target
    assert "left out of training with 20 windows" in out
    assert "model saved to" in out and f"from {N_STOCKS - 1} stocks" in out
    # predict: finishes; the stock is named in the output and in report.json
    reports = tmp_path / "reports"
    argv = ("stocks", "predict", "--db", url, "--model", str(model60), *PREDICT, "--report-dir",
            str(reports))  # fmt: skip
    code, out = _cli(*argv)
    assert code == 0, out
    assert f"1 stock quarantined: {bad} ({reason})" in out
    (report_file,) = reports.glob("*/report.json")
    saved = json.loads(report_file.read_text())
    assert saved["status"] == "finished" and saved["item_name"] == "stock"
    assert saved["quarantined"] == [{"item": bad, "reason": reason}]
    assert saved["items_quarantined"] == 1
    # every other stock with enough rows is predicted, the bad one is not
    rows = _predictions(url)
    predicted = {r[0] for r in rows}
    enough = {r[0] for r in _sql(url, "SELECT ts_code FROM stock_daily GROUP BY ts_code "
                                 "HAVING count(*) >= ?", min_rows(10))}  # fmt: skip
    assert bad in enough and predicted == enough - {bad}
    assert saved["results_meta"]["stocks_missing"] == 0
    metas = Ledger(url).chunk_meta(saved["run_id"])
    assert [e for m in metas.values() for e in m.get(QUARANTINED, [])] == saved["quarantined"]
    # the same command again, and with --resume: nothing changes, the stock is still named
    for extra in ((), ("--resume",)):
        code, out = _cli(*argv, *extra)
        assert code == 0 and "nothing new to predict" in out, out
        assert _predictions(url) == rows
    # --strict restores the refusal, before anything starts
    code, out = _cli(*argv, "--strict")
    assert code == 2 and out.strip().splitlines() == [
        f"error: stock_daily has a NaN, infinite, zero or negative price for ({bad}, {day}): "
        "fix or delete such rows before predicting"
    ]
    code, out = _cli("stocks", "train", "--db", url, "--out", str(tmp_path / "m2"), "--strict",
                     "--epochs", "1", "--model-size", "tiny", "--lookback-days", "140")
    assert code == 2 and f"bad row for {bad}: {reason}" in out
    assert not (tmp_path / "m2").exists()


def test_too_many_bad_stocks_fail_the_run_with_one_line_naming_them(market60, model60, tmp_path):
    url = _market(market60, tmp_path)
    bad = _full_stocks(url)[:11]  # the default limit for 60 stocks: max(10, 1 %) = 10
    day = _day(url, 140)
    for code in bad:
        _sql(url, "UPDATE stock_daily SET high = low / 2 WHERE ts_code = ? AND trade_date = ?",
             code, day)  # fmt: skip
    code, out = _cli("stocks", "predict", "--db", url, "--model", str(model60), *PREDICT,
                     "--report-dir", str(tmp_path / "reports"))  # fmt: skip
    assert code == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors == [out.strip().splitlines()[-1]]
    line = errors[0]
    assert line.startswith("error: 11 stocks quarantined: ")
    assert "more than max-bad-items (10)" in line and "6 more (all in report.json)" in line
    (report_file,) = (tmp_path / "reports").glob("*/report.json")
    saved = json.loads(report_file.read_text())
    assert saved["status"] == "failed"
    assert sorted(e["item"] for e in saved["quarantined"]) == bad
    assert all(e["reason"].endswith(f"on {day}") and " < low " in e["reason"]
               for e in saved["quarantined"])  # fmt: skip
