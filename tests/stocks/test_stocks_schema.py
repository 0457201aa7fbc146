"""Schema creation and checks, connection errors, the synthetic market, bad bars."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from hpcbatch.errors import ConfigError, DataError
from hpcbatch.stocks.generate import generate_market, stock_codes, trading_calendar
from hpcbatch.stocks.schema import (
    init_db,
    make_engine,
    masked,
    preflight,
    require_tables,
    stock_daily,
)


def test_init_db_creates_tables_and_is_idempotent(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/a.db", create=True)
    assert init_db(engine) == ["stock_daily", "stock_predictions"]
    assert init_db(engine) == []


def test_sqlite_bars_are_clustered_by_their_key(tmp_path):
    """stock_daily is created WITHOUT ROWID on SQLite (one range scan per stock's read)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'k.db'}", create=True)
    init_db(engine)
    with engine.connect() as conn:
        ddl = dict(conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'table'").all())
    assert ddl["stock_daily"].rstrip().endswith("WITHOUT ROWID")
    assert "WITHOUT ROWID" not in ddl["stock_predictions"]  # inserts: faster with a rowid
    engine.dispose()


def test_existing_table_with_wrong_columns_is_refused_and_left_alone(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/a.db", create=True)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE stock_predictions (ts_code TEXT, score REAL)")
    with pytest.raises(DataError, match="lacks column.*never alters"):
        init_db(engine)
    cols = [c["name"] for c in sa.inspect(engine).get_columns("stock_predictions")]
    assert cols == ["ts_code", "score"]
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE stock_predictions")
        conn.exec_driver_sql(
            "CREATE TABLE stock_daily (ts_code TEXT, trade_date TEXT, open BLOB, high REAL, "
            "low REAL, close REAL, pre_close REAL, change REAL, pct_chg REAL, vol REAL, amount REAL)"
        )
    with pytest.raises(DataError, match="incompatible column types.*open"):
        init_db(engine)


def test_missing_database_file_and_tables(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        make_engine(f"sqlite:///{tmp_path}/none.db")
    engine = make_engine(f"sqlite:///{tmp_path}/empty.db", create=True)
    with pytest.raises(DataError, match="table stock_daily is missing.*init-db"):
        require_tables(engine, "stock_daily")


def test_unreachable_server_error_never_shows_the_password():
    url = "postgresql+psycopg://alice:s3cr3t-pw@127.0.0.1:1/db"
    with pytest.raises(DataError) as info:
        make_engine(url)
    text = str(info.value)
    assert "s3cr3t-pw" not in text and "***" in text and "\n" not in text
    assert "cannot connect" in text
    assert "s3cr3t" not in masked(url)
    with pytest.raises(ConfigError, match="unsupported database"):
        make_engine("mysql://u:p@h/d")


@pytest.mark.postgres
def test_server_side_connection_error_never_shows_the_password(postgres_url):
    url = sa.engine.make_url(postgres_url).set(password="pw-xyz-987", database="no_such_db_hb")
    with pytest.raises(DataError) as info:
        make_engine(url)
    text = str(info.value)
    assert "no_such_db_hb" in text and "pw-xyz-987" not in text and "\n" not in text


def test_market_is_deterministic_and_realistic(tmp_path):
    e1 = make_engine(f"sqlite:///{tmp_path}/1.db", create=True)
    e2 = make_engine(f"sqlite:///{tmp_path}/2.db", create=True)
    s1 = generate_market(e1, 60, 300, seed=11)
    generate_market(e2, 60, 300, seed=11)
    q = sa.select(stock_daily).order_by(stock_daily.c.ts_code, stock_daily.c.trade_date)
    with e1.connect() as c1, e2.connect() as c2:
        rows = c1.execute(q).all()
        assert rows == c2.execute(q).all()
    assert len(rows) == s1.rows
    codes = sorted({r.ts_code for r in rows})
    assert {c[-3:] for c in codes} == {".SH", ".SZ"} and any(c.startswith("300") for c in codes)
    per_stock = {c: sum(1 for r in rows if r.ts_code == c) for c in codes}
    assert min(per_stock.values()) < 300 == max(per_stock.values())  # late listings, suspensions
    pct = np.array([r.pct_chg for r in rows])
    close = np.array([r.close for r in rows])
    high, low = np.array([r.high for r in rows]), np.array([r.low for r in rows])
    assert (np.abs(pct) >= 9.5).sum() > 0  # limit-up/limit-down days
    assert np.all(np.abs(pct) <= 20.5)
    assert np.all((low <= close) & (close <= high) & (low > 0))
    assert sum(1 for r in rows if r.vol == 0) > 0  # zero-volume days
    assert len({r.trade_date for r in rows}) == 300
    with pytest.raises(DataError, match="already holds"):
        generate_market(e1, 5, 10, seed=1)


def test_calendar_skips_weekends_and_holidays():
    days = trading_calendar(300)
    assert len(days) == 300
    assert np.all(np.is_busday(days))
    assert not any(str(d).endswith("-10-01") or str(d).endswith("-01-01") for d in days)
    assert stock_codes(5) == ["600000.SH", "000001.SZ", "600001.SH", "000002.SZ", "300001.SZ"]


def _unkeyed_market(tmp_path):
    """A stock_daily created by another tool: no primary key, so duplicates can exist."""
    engine = make_engine(f"sqlite:///{tmp_path}/u.db", create=True)
    cols = ", ".join(f"{c} REAL" for c in stock_daily.c.keys()[2:])
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE stock_daily (ts_code TEXT, trade_date TEXT, {cols})")
        conn.execute(
            stock_daily.insert(),
            [
                {"ts_code": "600000.SH", "trade_date": f"202501{d:02d}", "open": 1.0, "high": 1.1,
                 "low": 0.9, "close": 1.0, "pre_close": 1.0, "change": 0, "pct_chg": 0,
                 "vol": 10.0, "amount": 1.0}
                for d in range(1, 20)
            ],
        )
    return engine


def test_duplicate_rows_and_bad_prices_are_refused_before_anything_is_written(tmp_path):
    engine = _unkeyed_market(tmp_path)
    preflight(engine)  # clean
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO stock_daily SELECT * FROM stock_daily WHERE trade_date = '20250103'"
        )
    with pytest.raises(DataError, match=r"duplicate rows for \(600000.SH, 20250103\)"):
        preflight(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM stock_daily WHERE rowid IN (SELECT max(rowid) FROM stock_daily)")
    for bad in ("0", "-1.5", "NULL", "9e999"):
        with engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE stock_daily SET close = {bad} WHERE trade_date = '20250105'")
        with pytest.raises(DataError, match=r"NaN, infinite, zero or negative price for \(600000.SH, 20250105\)"):
            preflight(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE stock_daily SET close = 1.0")
    preflight(engine)
