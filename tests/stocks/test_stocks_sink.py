"""The read path of a chunk: SQLite's per-stock seek against the window query, and the
conversion of fetched rows into columns (fast paths against the value-by-value way)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from hpcbatch.stocks.schema import init_db, make_engine, stock_predictions, write_transaction
from hpcbatch.stocks.sink import (
    _columns,
    _dates,
    _numeric,
    bars_query,
    engine_for,
    fetch_bar_columns,
    list_codes,
    read_screened_bars,
    upsert_predictions,
    upsert_statement,
)


def _same(a: tuple, b: tuple) -> None:
    assert a[0].tolist() == b[0].tolist()
    assert np.array_equal(a[1], b[1])
    assert a[2].keys() == b[2].keys()
    for key in a[2]:
        assert np.array_equal(a[2][key], b[2][key], equal_nan=True), key


def test_sqlite_seek_read_equals_the_window_query(market_copy):
    engine = engine_for(market_copy)
    codes = list_codes(engine)
    chunk = [codes[3], "NOPE.SZ", *codes[:3], codes[3]]  # unsorted, a missing and a repeated code
    chunk += codes[5:9]  # dates: an integer, a malformed one, fewer days, fewer and shifted
    with engine.begin() as conn:  # a NULL close and a text open: NaN, the stock quarantined
        last = conn.exec_driver_sql("SELECT max(trade_date) FROM stock_daily").scalar()
        first = conn.exec_driver_sql("SELECT min(trade_date) FROM stock_daily").scalar()
        for code, new_date in ((codes[5], int(last) + 1), (codes[6], "2099-1-2")):
            conn.exec_driver_sql(f"UPDATE stock_daily SET trade_date = ? WHERE ts_code = '{code}' "
                                 f"AND trade_date = '{last}'", (new_date,))  # fmt: skip
        conn.exec_driver_sql(f"DELETE FROM stock_daily WHERE ts_code IN ('{codes[7]}', '{codes[8]}') "
                             f"AND trade_date = '{first}'")  # fmt: skip
        conn.exec_driver_sql(f"DELETE FROM stock_daily WHERE ts_code = '{codes[8]}' "
                             f"AND trade_date = '{last}'")  # fmt: skip
        conn.exec_driver_sql(f"UPDATE stock_daily SET close = NULL WHERE ts_code = '{codes[1]}' "
                             f"AND trade_date = '{last}'")  # fmt: skip
        conn.exec_driver_sql(f"UPDATE stock_daily SET open = 'n/a' WHERE ts_code = '{codes[2]}' "
                             f"AND trade_date = '{last}'")  # fmt: skip
    with engine.connect() as conn:
        for lookback in (1, 100, 1000):
            seek = fetch_bar_columns(conn, chunk, lookback)
            window = _columns(conn.execute(bars_query(chunk, lookback)).all())
            _same(seek, window)
            counts = np.unique(seek[0], return_counts=True)[1]
            assert counts.max() == min(lookback, 150) and len(counts) == 8
        assert np.isnan(seek[2]["close"]).sum() == 1 and np.isnan(seek[2]["open"]).sum() == 1
        bars, check = read_screened_bars(conn, codes[:5], 100)
    assert bars.codes == [codes[0], *codes[3:5]] and set(check.bad) == {codes[1], codes[2]}
    assert bars.close.shape == (3, 100) and (np.diff(bars.dates, axis=1) > 0).all()
    assert np.isfinite(bars.close).all() and np.isfinite(bars.open).all()


def test_dates_read_in_one_pass_equal_the_value_by_value_way():
    cases = [
        ["20250102", "20250103", "19991231"],
        ["20250102", "2025010", "202501034"],  # 8 characters a value on average only
        ["20250102", None],
        ["20250102", "2025-1-2"],
        ["２０２５０１０２", "20250103"],  # not ASCII (int() reads these digits)
        [20250102, 20250103],  # an integer column
        ["20250102", " 2025010"],
        ["2025010\n", "20250103"],  # a newline where the buffer's separators go
        ["20250102\n2025010", "2"],  # 18 characters, 2 values: a newline inside one
        ["202501\n02", "20250103"],
        ["20250102"] * 3 + ["2025010", "202501034"],
        [],
    ]
    for values in cases:
        got = _dates(values)
        assert got.dtype == np.int64
        assert got.tolist() == _numeric(values, np.int64, -1).tolist(), values
    assert _dates(["20250102", "x"]).tolist() == [20250102, -1]


def test_prices_with_null_or_text_become_nan_column_by_column():
    rows = [
        ("A", "20250101", 1.0, 2.0, 0.5, 1.5, 1.0, 100.0, 10.0),
        ("A", "20250102", None, 2.0, 0.5, "1.25", 1.0, 100, 10.0),
        ("A", "20250103", 1.0, 2.0, 0.5, "n/a", 1.0, 100.0, 10.0),
    ]
    codes, dates, data = _columns(rows)
    assert codes.tolist() == ["A"] * 3 and dates.tolist() == [20250101, 20250102, 20250103]
    assert np.isnan(data["open"]).tolist() == [False, True, False]
    assert data["close"][:2].tolist() == [1.5, 1.25] and np.isnan(data["close"][2])
    assert data["vol"].tolist() == [100.0] * 3 and data["vol"].dtype == np.float64
    clean = _columns([r[:2] + (1.0,) * 7 for r in rows])[2]
    assert all(v.dtype == np.float64 and v.tolist() == [1.0] * 3 for v in clean.values())


def _stored(conn) -> list[tuple]:
    cols = [c.name for c in stock_predictions.columns]
    sql = ", ".join(f"{c}, typeof({c})" for c in cols)
    return conn.exec_driver_sql(f"SELECT {sql} FROM stock_predictions ORDER BY 1, 3, 5").all()


def test_sqlite_upsert_on_the_driver_stores_what_sqlalchemy_stores(market_copy, tmp_path):
    """The SQLite fast path binds the values SQLAlchemy's processors make: every stored
    value and its storage class equal SQLAlchemy's own executemany; a second upsert
    updates in place (exactly once), and it rides the caller's transaction."""
    now = dt.datetime(2026, 12, 6, 19, 52, 7)  # as prediction_rows: no microseconds
    rows = [
        {"ts_code": f"{i:06d}.SZ", "trade_date": str(20250101 + d), "model_version": "v1",
         "predicted_return": r, "predicted_direction": r > 0, "confidence": 0.25 * d,
         "predicted_return_3d": None if d else 1e-300, "predicted_direction_3d": None if d else True,
         "prediction_date": now, "run_id": None if i else "run"}
        for i, r in enumerate([0.1, -2.5e-17, 0.0, float(np.float32(1 / 3))]) for d in range(3)
    ]  # fmt: skip
    engine = engine_for(market_copy)
    other = make_engine(f"sqlite:///{tmp_path / 'other.db'}", create=True)
    init_db(engine), init_db(other)
    with write_transaction(engine) as conn:
        assert upsert_predictions(conn, rows, 5) == len(rows)
    with write_transaction(other) as conn:
        for start in range(0, len(rows), 5):
            conn.execute(upsert_statement("sqlite"), rows[start : start + 5])
    with engine.connect() as a, other.connect() as b:
        assert _stored(a) == _stored(b) and len(_stored(a)) == len(rows)
    changed = [{**r, "predicted_return": -r["predicted_return"], "run_id": "again"} for r in rows]
    with pytest.raises(RuntimeError), write_transaction(engine) as conn:
        upsert_predictions(conn, changed)
        raise RuntimeError("rolled back")
    with write_transaction(engine) as conn:
        upsert_predictions(conn, changed[:4])
    with engine.connect() as conn:
        stored = _stored(conn)
    assert len(stored) == len(rows)
    assert [s[-2] for s in stored].count("again") == 4
    other.dispose()
