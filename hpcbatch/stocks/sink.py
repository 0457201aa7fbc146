"""Reading a chunk's bars and writing its predictions (the SQL side of a task).

Owns: the read of each stock's last ``lookback`` rows (PostgreSQL: one query per chunk,
a ``row_number()`` window; SQLite: one index seek per stock on one connection and one
read snapshot, 2x less CPU than the window, which sorts; each stock's rows become arrays
right after its fetch, while they are in the CPU cache), per-process engines (one
connection pool per worker, not per chunk), and the upsert of predictions: one compiled
``INSERT .. ON CONFLICT DO UPDATE`` executed over batches of 200 rows (executemany:
~10 us a row; a 200-row VALUES statement compiled per batch cost ~110 us a row; on
SQLite the same SQL on the driver's cursor with SQLAlchemy's bind processors, ~5 us a row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import ConfigError, DataError, HpcbatchError
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


# SQLite: a stock's last rows by a descending seek of the (ts_code, trade_date) key.
_SQLITE_LAST_ROWS = (
    "SELECT trade_date, open, high, low, close, pre_close, vol, amount FROM stock_daily "
    "WHERE ts_code = ? ORDER BY trade_date DESC LIMIT ?"
)


_KEYED: dict[str, bool] = {}


def _sqlite_keyed(conn: Connection) -> bool:
    """Whether stock_daily has an index led by ts_code (its primary key, or one a tool
    made): without one a per-stock seek would scan the table once per stock."""
    key = str(conn.engine.url)
    if key not in _KEYED:
        found = conn.exec_driver_sql(
            "SELECT 1 FROM pragma_index_list('stock_daily') AS l, pragma_index_info(l.name) "
            "AS i WHERE i.seqno = 0 AND i.name = 'ts_code' LIMIT 1"
        ).first()
        _KEYED[key] = found is not None
    return _KEYED[key]


def fetch_bar_columns(
    conn: Connection, codes: Sequence[str], lookback_days: int
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(ts_code per row, trade_date per row, price columns) of each stock's last
    ``lookback_days`` rows, sorted by (ts_code, trade_date); see :func:`_columns`."""
    if conn.dialect.name != "sqlite" or not _sqlite_keyed(conn):
        rows = conn.execute(bars_query(codes, lookback_days)).all()
        return _columns(rows) if rows else _no_columns()
    if not conn.in_transaction():
        conn.begin()  # one read snapshot for every stock (ended by the caller's connection)
    cursor = conn.connection.cursor()
    dates: list = []
    prices: list[np.ndarray] = []
    present: list[str] = []
    counts: list[int] = []
    try:
        for code in sorted(set(codes)):  # the window query's order: ts_code, then date
            found = cursor.execute(_SQLITE_LAST_ROWS, (code, lookback_days)).fetchall()
            if found:
                # converted while the stock's rows are still in the CPU cache: ~20 % less
                # CPU than converting the whole chunk's rows at the end
                found.reverse()
                cols = list(zip(*found, strict=True))
                dates += cols[0]  # parsed at the end in one pass (stocks' days differ)
                prices.append(_prices(cols[1:]))
                present.append(code)
                counts.append(len(found))
    finally:
        cursor.close()
    if not present:
        return _no_columns()
    row_codes = np.repeat(np.asarray(present, dtype=object), counts)
    data = dict(zip(PRICE_FIELDS, np.concatenate(prices, axis=1), strict=True))
    return row_codes, _dates(dates), data


def read_bars(conn: Connection, codes: Sequence[str], lookback_days: int) -> Bars:
    """Fetch and lay out a chunk's bars; malformed rows are a DataError (``--strict``;
    :func:`read_screened_bars` quarantines the stocks instead)."""
    return _checked_bars(*fetch_bar_columns(conn, codes, lookback_days))


def read_screened_bars(
    conn: Connection, codes: Sequence[str], lookback_days: int
) -> tuple[Bars, BarCheck]:
    """A chunk's bars without the stocks whose bars are bad, and what was wrong with them."""
    return _screened(*fetch_bar_columns(conn, codes, lookback_days))


@dataclass(frozen=True)
class BarCheck:
    """What is wrong with a chunk's bars, per stock: ``bad`` (ts_code -> the first bad
    row and what is wrong; such a stock is quarantined), ``rows`` (ts_code -> its rows, for
    the bad ones) and ``jumps`` (ts_code -> its first 10x close-to-close jump: flagged,
    kept)."""

    bad: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)
    jumps: dict = field(default_factory=dict)

    def quarantined(self) -> list[dict]:
        """The bad stocks as the runner's ``quarantined`` entries."""
        return [{"item": code, "reason": reason} for code, reason in self.bad.items()]


def bars_from_rows(rows: Sequence[Sequence]) -> Bars:
    """Rows ``(ts_code, trade_date, open, high, low, close, pre_close, vol, amount)`` sorted
    by (ts_code, trade_date) -> a checked :class:`Bars` layout; the first bad row is a
    :class:`DataError` (the whole chunk is refused)."""
    return _checked_bars(*(_columns(rows) if rows else _no_columns()))


def _checked_bars(row_codes: np.ndarray, dates: np.ndarray, data: dict[str, np.ndarray]) -> Bars:
    if not len(row_codes):
        return bars_from_columns([], {})
    check = check_rows(row_codes, dates, data)
    if check.bad:
        code, reason = next(iter(check.bad.items()))
        raise DataError(
            f"stock_daily has a bad row for {code}: {reason}: fix or delete such rows "
            "(NaN, infinite, zero or negative price, high < low, or duplicate rows), or run "
            "without --strict to quarantine such stocks"
        )
    return bars_from_columns(row_codes, {"trade_date": dates, **data})


def screened_bars(rows: Sequence[Sequence]) -> tuple[Bars, BarCheck]:
    """Like :func:`bars_from_rows`, but a stock with a bad row is left out and named in
    the returned :class:`BarCheck` instead of failing the chunk."""
    return _screened(*(_columns(rows) if rows else _no_columns()))


def _screened(
    row_codes: np.ndarray, dates: np.ndarray, data: dict[str, np.ndarray]
) -> tuple[Bars, BarCheck]:
    if not len(row_codes):
        return bars_from_columns([], {}), BarCheck()
    check = check_rows(row_codes, dates, data)
    if check.bad:
        keep = ~np.isin(row_codes, np.asarray(list(check.bad), dtype=object))
        row_codes, dates = row_codes[keep], dates[keep]
        data = {k: v[keep] for k, v in data.items()}
    return bars_from_columns(row_codes, {"trade_date": dates, **data}), check


def _columns(
    rows: Sequence[Sequence], row_codes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The rows as columns; a NULL or non-numeric value becomes NaN (a date: -1), which
    :func:`check_rows` reports.  Rows start with ts_code unless ``row_codes`` gives it."""
    cols = list(zip(*rows, strict=True))
    if row_codes is None:
        row_codes, cols = np.asarray(cols[0], dtype=object), cols[1:]
    data = dict(zip(PRICE_FIELDS, _prices(cols[1:]), strict=True))
    return row_codes, _dates(cols[0]), data


def _prices(cols: Sequence[Sequence]) -> np.ndarray:
    """The price columns as one ``(fields, rows)`` float64 array in one call; with a NULL
    or text among them, column by column (such values become NaN)."""
    try:
        return np.array(cols, dtype=np.float64)
    except (TypeError, ValueError):
        return np.stack([_numeric(col, np.float64, np.nan) for col in cols])


_DATE_DIGITS = (10 ** np.arange(7, -1, -1)).astype(np.float64)  # exact: dates < 2**53


def _dates(values: Sequence) -> np.ndarray:
    """``YYYYMMDD`` dates as int64 (-1 where not a number); read from one byte buffer when
    every value is 8 ASCII digits (the usual case), else value by value.  The buffer is
    the values each followed by a newline: 8 digits then a newline in every 9 bytes means
    exactly that (no value holds a newline or has another length)."""
    n = len(values)
    try:
        text = ("\n".join(values) + "\n").encode("ascii")
    except (TypeError, UnicodeEncodeError):  # not all text (a NULL, an integer column)
        text = b""
    if n and len(text) == 9 * n:
        rows = np.frombuffer(text, dtype=np.uint8).reshape(n, 9)
        digits = rows[:, :8] - 48
        if (rows[:, 8] == 10).all() and (digits < 10).all():
            return (digits @ _DATE_DIGITS).astype(np.int64)
    return _numeric(values, np.int64, -1)


def _no_columns() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    return np.zeros(0, dtype=object), np.zeros(0, np.int64), {}


def _numeric(values: Sequence, dtype, missing) -> np.ndarray:
    try:
        return np.asarray(values, dtype=dtype)
    except (TypeError, ValueError):
        out = np.empty(len(values), dtype=dtype)
        for i, v in enumerate(values):
            try:
                out[i] = dtype(v)
            except (TypeError, ValueError, OverflowError):
                out[i] = missing
        return out


_CHECKED_PRICES = ("open", "high", "low", "close", "pre_close")
JUMP_FACTOR = 10.0  # a close this many times the previous one (or 1/x of it) is flagged


def check_rows(codes: np.ndarray, dates: np.ndarray, data: dict[str, np.ndarray]) -> BarCheck:
    """Each stock's first bad row (what is wrong with it) and first 10x jump, vectorised
    over the rows (sorted by ts_code, trade_date)."""
    n = len(codes)
    same = np.r_[False, codes[1:] == codes[:-1]]
    tests: list[tuple[np.ndarray, str]] = [
        (dates < 0, "trade_date"),
        (same & np.r_[False, dates[1:] == dates[:-1]], "duplicate"),
    ]
    tests += [(~(np.isfinite(data[f]) & (data[f] > 0)), f) for f in _CHECKED_PRICES]
    tests.append((data["high"] < data["low"], "high<low"))
    which = np.full(n, -1)
    for k, (mask, _what) in enumerate(tests):
        which[(which < 0) & mask] = k
    check = BarCheck()
    for i in np.flatnonzero(which >= 0):
        code = codes[i]
        if code not in check.bad:
            check.bad[code] = _reason(tests[which[i]][1], i, dates, data)
    if check.bad:
        bad_codes, counts = np.unique(codes[np.isin(codes, list(check.bad))], return_counts=True)
        check.rows.update(zip(bad_codes.tolist(), counts.tolist(), strict=True))
    close = data["close"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = close[1:] / close[:-1]
    jump = same[1:] & ((ratio > JUMP_FACTOR) | (ratio < 1 / JUMP_FACTOR))
    for i in np.flatnonzero(jump) + 1:
        code = codes[i]
        if code not in check.jumps and code not in check.bad:
            check.jumps[code] = (
                f"close {close[i - 1]:g} -> {close[i]:g} on {dates[i]}"
            )
    return check


def _reason(what: str, i: int, dates: np.ndarray, data: dict[str, np.ndarray]) -> str:
    """``close is NULL or NaN on 20240529`` and the like: the row and what is wrong."""
    day = f"on {dates[i]}"
    if what == "trade_date":
        return "trade_date is NULL or not a YYYYMMDD date"
    if what == "duplicate":
        return f"duplicate rows {day}"
    if what == "high<low":
        return f"high {data['high'][i]:g} < low {data['low'][i]:g} {day}"
    value = data[what][i]
    if np.isnan(value):
        kind = "NULL, NaN or not a number"
    elif np.isinf(value):
        kind = "infinite"
    else:
        kind = "zero" if value == 0 else f"negative ({value:g})"
    return f"{what} is {kind} {day}"


def _insert_for(dialect: str):
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:  # pragma: no cover - make_engine refuses other databases
        raise ConfigError(f"upsert is not supported on {dialect}")
    return insert


_UPSERTS: dict[str, sa.Insert] = {}


def upsert_statement(dialect: str) -> sa.Insert:
    """``INSERT .. ON CONFLICT (ts_code, trade_date, model_version) DO UPDATE`` of every
    other column, built once per dialect (SQLAlchemy then caches its compiled form)."""
    if dialect not in _UPSERTS:
        stmt = _insert_for(dialect)(stock_predictions)
        updates = {
            c.name: stmt.excluded[c.name]
            for c in stock_predictions.columns
            if c.name not in KEY_COLUMNS
        }
        _UPSERTS[dialect] = stmt.on_conflict_do_update(
            index_elements=list(KEY_COLUMNS), set_=updates
        )
    return _UPSERTS[dialect]


def upsert_predictions(conn: Connection, rows: list[dict], rows_per_statement: int = 200) -> int:
    """Upsert ``rows`` (dicts with every column) by :func:`upsert_statement`, executed over
    ``rows_per_statement`` rows at a time (executemany).  SQLite: the same statement's
    SQL on the driver's cursor, with the values SQLAlchemy's own bind processors make
    (the rows land identical; ~1 us a row instead of ~10)."""
    if rows_per_statement < 1:
        raise ConfigError(f"upsert-rows must be at least 1, got {rows_per_statement}")
    if conn.dialect.name == "sqlite":
        return _sqlite_upsert(conn, rows, rows_per_statement)
    stmt = upsert_statement(conn.dialect.name)
    for start in range(0, len(rows), rows_per_statement):
        conn.execute(stmt, rows[start : start + rows_per_statement])
    return len(rows)


_SQLITE_UPSERT: dict[str, tuple[str, list[str], list]] = {}


def _sqlite_upsert_plan(conn: Connection) -> tuple[str, list[str], list]:
    """The upsert's SQL as SQLAlchemy compiles it for the driver (``?`` markers), the
    column behind each marker and its bind processor (None: bound as it is)."""
    dialect = conn.dialect
    if dialect.name not in _SQLITE_UPSERT:
        names = [c.name for c in stock_predictions.columns]
        compiled = upsert_statement(dialect.name).compile(dialect=dialect, column_keys=names)
        order = list(compiled.positiontup or ())
        if sorted(order) != sorted(names):
            raise HpcbatchError(f"unexpected upsert parameters {order}: report this as a bug")
        columns = {c.name: c for c in stock_predictions.columns}
        procs = [columns[n].type.dialect_impl(dialect).bind_processor(dialect) for n in order]
        _SQLITE_UPSERT[dialect.name] = (compiled.string, order, procs)
    return _SQLITE_UPSERT[dialect.name]


def _sqlite_upsert(conn: Connection, rows: list[dict], rows_per_statement: int) -> int:
    """:func:`upsert_predictions` on SQLite: one executemany per ``rows_per_statement``
    rows on the connection's driver cursor, inside the caller's transaction."""
    sql, names, procs = _sqlite_upsert_plan(conn)
    if not rows:
        return 0
    columns = []
    for name, proc in zip(names, procs, strict=True):
        values = [row[name] for row in rows]
        columns.append(values if proc is None else _bound(values, proc))
    params = list(zip(*columns, strict=True))
    if not conn.in_transaction():
        conn.begin()  # as conn.execute would (autobegin): the caller commits
    cursor = conn.connection.cursor()
    try:
        for start in range(0, len(params), rows_per_statement):
            cursor.executemany(sql, params[start : start + rows_per_statement])
    finally:
        cursor.close()
    return len(rows)


def _bound(values: list, proc) -> list:
    """``proc`` over ``values``, called once per distinct object (every row shares one
    ``prediction_date`` and a few booleans: formatting the date per row cost ~6 us)."""
    distinct = {id(v): v for v in values}
    done = {key: proc(v) for key, v in distinct.items()}
    return [done[id(v)] for v in values]
