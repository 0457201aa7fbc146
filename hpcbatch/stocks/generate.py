"""A synthetic, deterministic stock market written to ``stock_daily``.

Owns: the trading calendar (weekdays minus yearly holidays), stock codes with exchange
suffixes (.SH main board, .SZ main board and ChiNext), prices as random walks with a
common market factor and per-stock volatility regimes (a two-state Markov chain),
limit-up/limit-down days (10 %, 20 % on ChiNext; some "one-price" days), stocks listed
part way through, suspensions (missing rows, price frozen), zero-volume days, and the
bulk insert (``executemany`` per block of stocks, so memory stays bounded).

Everything is vectorised over a block of stocks x days; the block layout is fixed, so a
seed always gives the same market whatever the size of the insert batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..errors import ConfigError, DataError
from .schema import BAR_COLUMNS, init_db, stock_daily, write_transaction

BLOCK_STOCKS = 256
END_DATE = np.datetime64("2025-12-31")
ROW_KEYS = ("ts_code", "trade_date", *BAR_COLUMNS)


@dataclass(frozen=True)
class MarketSummary:
    stocks: int
    days: int
    rows: int
    first_date: str
    last_date: str


def trading_calendar(days: int, end: np.datetime64 = END_DATE) -> np.ndarray:
    """The last ``days`` trading days up to ``end``: weekdays minus fixed yearly holidays."""
    if days <= 0:
        raise ConfigError(f"--days must be positive, got {days}")
    span = int(days * 7 / 5 * 1.1) + 30
    start = end - np.timedelta64(span, "D")
    years = range(int(str(start)[:4]), int(str(end)[:4]) + 1)
    holidays = []
    for y in years:
        # New Year, a Spring Festival week, Labour Day, National Day week (approximate).
        holidays += [f"{y}-01-01", f"{y}-05-01", f"{y}-05-02", f"{y}-05-03"]
        sf = np.datetime64(f"{y}-01-28") + np.timedelta64((y * 11) % 20, "D")
        holidays += [str(sf + np.timedelta64(i, "D")) for i in range(7)]
        holidays += [f"{y}-10-{d:02d}" for d in range(1, 8)]
    all_days = np.arange(start, end + np.timedelta64(1, "D"), dtype="datetime64[D]")
    mask = np.is_busday(all_days, holidays=np.array(holidays, dtype="datetime64[D]"))
    return all_days[mask][-days:]


def stock_codes(n: int) -> list[str]:
    """Codes like 600000.SH, 000001.SZ, 300001.SZ (SH : SZ main : ChiNext = 2 : 2 : 1)."""
    codes = []
    counters = {"SH": 600000, "SZ": 1, "CN": 300001}
    pattern = ["SH", "SZ", "SH", "SZ", "CN"]
    for i in range(n):
        board = pattern[i % 5]
        num = counters[board]
        counters[board] += 1
        codes.append(f"{num:06d}.SH" if board == "SH" else f"{num:06d}.SZ")
    return codes


def _market_returns(rng: np.random.Generator, days: int) -> np.ndarray:
    return 0.0002 + 0.011 * rng.standard_t(5, size=days) / np.sqrt(5 / 3)


def simulate_block(
    codes: list[str], calendar: np.ndarray, market: np.ndarray, seed: int, block: int
) -> dict[str, np.ndarray]:
    """Bars of one block of stocks: a dict of (stocks, days) arrays plus a ``present`` mask."""
    rng = np.random.default_rng([seed, block])
    n, d = len(codes), len(calendar)
    limit = np.array([0.2 if c.startswith("300") else 0.1 for c in codes])[:, None]

    # Volatility regimes: a two-state Markov chain per stock.
    switches = rng.random((n, d)) < 0.02
    high_vol = (np.cumsum(switches, axis=1) + rng.integers(0, 2, (n, 1))) % 2 == 1
    sigma = np.where(high_vol, rng.uniform(0.025, 0.04, (n, 1)), rng.uniform(0.01, 0.018, (n, 1)))
    beta = rng.uniform(0.5, 1.5, (n, 1))
    idio = sigma * rng.standard_t(4, (n, d)) / np.sqrt(2.0)
    jumps = (rng.random((n, d)) < 0.004) * rng.choice([-1.0, 1.0], (n, d)) * 0.25
    ret = beta * market[None, :] + idio + jumps

    # Listing part way through (20 %), suspensions (frozen price, no rows), zero volume.
    listed_at = np.where(rng.random(n) < 0.2, rng.integers(0, max(1, int(d * 0.8)), n), 0)
    present = np.arange(d)[None, :] >= listed_at[:, None]
    n_spells = rng.poisson(0.8, n)
    for i in np.nonzero(n_spells)[0]:  # a handful of spells per block, not per row
        starts = rng.integers(0, d, n_spells[i])
        lengths = rng.integers(1, 20, n_spells[i])
        for s, length in zip(starts, lengths, strict=True):
            present[i, s : s + length] = False
    zero_vol = present & (rng.random((n, d)) < 0.002)
    ret = np.where(present & ~zero_vol, ret, 0.0)
    ret = np.clip(ret, -limit, limit)

    p0 = np.exp(rng.uniform(np.log(3.0), np.log(80.0), (n, 1)))
    close = np.round(p0 * np.cumprod(1.0 + ret, axis=1), 2)
    close = np.maximum(close, 0.01)
    pre_close = np.concatenate([np.round(p0, 2), close[:, :-1]], axis=1)
    lo_lim, hi_lim = pre_close * (1 - limit), pre_close * (1 + limit)

    open_ = np.clip(pre_close * (1 + 0.3 * sigma * rng.standard_normal((n, d))), lo_lim, hi_lim)
    top = np.maximum(open_, close) * (1 + 0.5 * sigma * np.abs(rng.standard_normal((n, d))))
    bottom = np.minimum(open_, close) * (1 - 0.5 * sigma * np.abs(rng.standard_normal((n, d))))
    high = np.clip(top, close, hi_lim)
    low = np.clip(bottom, lo_lim, close)
    high, low = np.maximum(high, np.maximum(open_, close)), np.minimum(low, np.minimum(open_, close))
    # Some limit days trade at one price all day.
    at_limit = np.abs(close / pre_close - 1) >= limit - 0.005
    one_price = at_limit & (rng.random((n, d)) < 0.3)
    frozen = one_price | zero_vol
    open_ = np.where(frozen, close, open_)
    high = np.where(frozen, close, high)
    low = np.where(frozen, close, low)
    open_, high, low = np.round(open_, 2), np.round(high, 2), np.round(low, 2)
    low = np.maximum(low, 0.01)

    base_vol = np.exp(rng.uniform(np.log(2e4), np.log(2e6), (n, 1)))
    vol = base_vol * np.exp(0.4 * rng.standard_normal((n, d)) + 8 * np.abs(ret) + 0.3 * high_vol)
    vol = np.where(zero_vol, 0.0, np.round(vol, 0))
    amount = np.round(vol * (open_ + high + low + close) / 4 * 100 / 1000, 3)
    change = np.round(close - pre_close, 2)
    pct_chg = np.round(change / pre_close * 100, 4)
    return {
        "open": open_,
        "high": high,
        "low": low,
        "close": close,
        "pre_close": pre_close,
        "change": change,
        "pct_chg": pct_chg,
        "vol": vol,
        "amount": amount,
        "present": present,
    }


def _block_rows(codes: list[str], dates: list[str], bars: dict[str, np.ndarray]) -> list[dict]:
    rows_i, cols_i = np.nonzero(bars["present"])
    code_arr = np.array(codes, dtype=object)[rows_i]
    date_arr = np.array(dates, dtype=object)[cols_i]
    values = [bars[name][rows_i, cols_i].tolist() for name in BAR_COLUMNS]
    return [
        dict(zip(ROW_KEYS, row, strict=True))
        for row in zip(code_arr.tolist(), date_arr.tolist(), *values, strict=True)
    ]


def generate_market(
    engine: Engine, stocks: int, days: int, seed: int = 0, *, replace: bool = False
) -> MarketSummary:
    """Write ``stocks`` x ``days`` synthetic bars to ``stock_daily`` (tables created if needed)."""
    if stocks <= 0:
        raise ConfigError(f"--stocks must be positive, got {stocks}")
    calendar = trading_calendar(days)
    dates = [str(x).replace("-", "") for x in calendar]
    init_db(engine)
    with engine.connect() as conn:
        existing = conn.execute(sa.select(sa.func.count()).select_from(stock_daily)).scalar_one()
    if existing and not replace:
        raise DataError(
            f"stock_daily already holds {existing} rows: use a new database, or --replace to "
            "delete them first"
        )
    codes = stock_codes(stocks)
    market = _market_returns(np.random.default_rng([seed, 10**6]), days)
    total = 0
    with write_transaction(engine) as conn:
        if existing:
            conn.execute(stock_daily.delete())
        for block, start in enumerate(range(0, stocks, BLOCK_STOCKS)):
            block_codes = codes[start : start + BLOCK_STOCKS]
            bars = simulate_block(block_codes, calendar, market, seed, block)
            rows = _block_rows(block_codes, dates, bars)
            conn.execute(stock_daily.insert(), rows)
            total += len(rows)
    # Fresh statistics: without them PostgreSQL's planner may read the whole table for
    # every chunk's query (benchmarks/load_stocks.py: a parallel scan of 7.2M rows each).
    with write_transaction(engine) as conn:
        conn.execute(sa.text("ANALYZE stock_daily"))
    return MarketSummary(stocks, days, total, dates[0], dates[-1])
