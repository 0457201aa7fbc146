"""Reading a chunk's bars and writing its predictions (the SQL side of a task).

Owns: the one query per chunk that fetches each stock's last ``lookback`` rows (a
``row_number()`` window, both dialects), per-process engines (one connection pool per
worker, not per chunk), and the upsert of predictions in 200-row
``INSERT .. ON CONFLICT DO UPDATE`` statements for SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import ConfigError, DataError
from .features import PRICE_FIELDS, Bars, bars_from_columns
from .schema import make_engine, stock_daily, stock_predictions

_ENGINES: dict[str, Engine] = {}
KEY_COLUMNS = ("ts_code", "trade_date", "model_version")


def engine_for(url: str) -> Engine:
    """One engine (connection pool) per database URL per process."""
    if url not in _ENGINES:
        _ENGINES[url] = make_engine(url)
    return _ENGINES[url]


def list_codes(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(stock_daily.c.ts_code).distinct().order_by(stock_daily.c.ts_code)
            ).scalars()
        )


def select_codes(codes: list[str], offset: int = 0, limit: int | None = None) -> list[str]:
    """``codes[offset : offset + limit]`` with clear errors for impossible values."""
    if offset < 0:
        raise ConfigError(f"--offset must not be negative, got {offset}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if not codes:
        raise DataError("stock_daily holds no stocks: generate or load bars first")
    if offset >= len(codes):
        raise ConfigError(
            f"--offset {offset} is past the end: stock_daily holds {len(codes)} stocks "
            f"(use --offset below {len(codes)})"
        )
    return codes[offset : None if limit is None else offset + limit]


def bars_query(codes: Sequence[str], lookback_days: int) -> sa.Select:
    """Each stock's last ``lookback_days`` rows, ordered by (ts_code, trade_date)."""
    t = stock_daily.c
    rn = (
        sa.func.row_number()
        .over(partition_by=t.ts_code, order_by=t.trade_date.desc())
        .label("rn")
    )
    cols = [t.ts_code, t.trade_date, *[t[f] for f in PRICE_FIELDS]]
    inner = sa.select(*cols, rn).where(t.ts_code.in_(list(codes))).subquery()
    return (
        sa.select(*[inner.c[c.name] for c in cols])
        .where(inner.c.rn <= lookback_days)
        .order_by(inner.c.ts_code, inner.c.trade_date)
    )


def read_bars(conn: Connection, codes: Sequence[str], lookback_days: int) -> Bars:
    """Fetch and lay out a chunk's bars (one query); malformed rows are a DataError."""
    return bars_from_rows(conn.execute(bars_query(codes, lookback_days)).all())


def bars_from_rows(rows: Sequence[Sequence]) -> Bars:
    """Rows ``(ts_code, trade_date, open, high, low, close, pre_close, vol, amount)`` sorted
    by (ts_code, trade_date) -> a checked :class:`Bars` layout."""
    if not rows:
        return bars_from_columns([], {})
    cols = list(zip(*rows, strict=True))
    row_codes = np.asarray(cols[0], dtype=object)
    try:
        dates = np.asarray(cols[1], dtype=np.int64)
        data = {f: np.asarray(cols[2 + i], dtype=np.float64) for i, f in enumerate(PRICE_FIELDS)}
    except (TypeError, ValueError):
        raise DataError(
            f"stock_daily rows for {cols[0][0]}..{cols[0][-1]} hold NULL or non-numeric values: "
            "trade_date must be YYYYMMDD and prices numbers"
        ) from None
    _check_rows(row_codes, dates, data)
    return bars_from_columns(row_codes, {"trade_date": dates, **data})


def _check_rows(codes: np.ndarray, dates: np.ndarray, data: dict[str, np.ndarray]) -> None:
    same = codes[1:] == codes[:-1]
    dup = np.flatnonzero(same & (dates[1:] == dates[:-1]))
    if dup.size:
        i = dup[0]
        raise DataError(
            f"stock_daily has duplicate rows for ({codes[i]}, {dates[i]}): keep one row per "
            "(ts_code, trade_date)"
        )
    for name in ("open", "high", "low", "close", "pre_close"):
        bad = np.flatnonzero(~(np.isfinite(data[name]) & (data[name] > 0)))
        if bad.size:
            i = bad[0]
            raise DataError(
                f"stock_daily has a NaN, infinite, zero or negative {name} for ({codes[i]}, "
                f"{dates[i]}): fix or delete such rows"
            )


def _insert_for(dialect: str):
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:  # pragma: no cover - make_engine refuses other databases
        raise ConfigError(f"upsert is not supported on {dialect}")
    return insert


def upsert_predictions(conn: Connection, rows: list[dict], rows_per_statement: int = 200) -> int:
    """``INSERT .. ON CONFLICT (ts_code, trade_date, model_version) DO UPDATE`` in batches."""
    if rows_per_statement < 1:
        raise ConfigError(f"upsert-rows must be at least 1, got {rows_per_statement}")
    insert = _insert_for(conn.dialect.name)
    for start in range(0, len(rows), rows_per_statement):
        stmt = insert(stock_predictions).values(rows[start : start + rows_per_statement])
        updates = {
            c.name: stmt.excluded[c.name]
            for c in stock_predictions.columns
            if c.name not in KEY_COLUMNS
        }
        conn.execute(stmt.on_conflict_do_update(index_elements=list(KEY_COLUMNS), set_=updates))
    return len(rows)
