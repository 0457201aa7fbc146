"""Indicators against straightforward loop implementations; the 105-feature array."""

from __future__ import annotations

import numpy as np
import pytest

from hpcbatch.stocks import features as F


def loop_ema(x, alpha, init=None):
    out, prev = [], (x[0] if init is None else init)
    for v in x:
        prev = (1 - alpha) * prev + alpha * v
        out.append(prev)
    return np.array(out)


def loop_sma(x, n):
    padded = [x[0]] * (n - 1) + list(x)
    return np.array([sum(padded[i : i + n]) / n for i in range(len(x))])


def loop_std(x, n):
    padded = [x[0]] * (n - 1) + list(x)
    out = []
    for i in range(len(x)):
        w = padded[i : i + n]
        m = sum(w) / n
        out.append((sum((v - m) ** 2 for v in w) / n) ** 0.5)
    return np.array(out)


def loop_rsi(close, n):
    gains, losses = [0.0], [0.0]
    for a, b in zip(close[:-1], close[1:], strict=True):
        gains.append(max(b - a, 0.0))
        losses.append(max(a - b, 0.0))
    g, lo = loop_ema(gains, 1 / n), loop_ema(losses, 1 / n)
    return np.array([50.0 if gg + ll == 0 else 100 * gg / (gg + ll) for gg, ll in zip(g, lo, strict=True)])


def loop_atr(high, low, prev_close, n):
    tr = [max(h - lo, abs(h - p), abs(lo - p)) for h, lo, p in zip(high, low, prev_close, strict=True)]
    return loop_ema(tr, 1 / n)


@pytest.fixture
def series():
    """Hand-made bars: a trend, a flat stretch, a crash and a rebound (300 days)."""
    rng = np.random.default_rng(3)
    close = np.concatenate(
        [
            np.linspace(10, 14, 80),
            np.full(30, 14.0),
            np.linspace(14, 9, 40),
            9 + np.cumsum(rng.normal(0, 0.2, 150)),
        ]
    )
    close = np.maximum(close, 1.0)
    pre = np.r_[close[0], close[:-1]]
    high = np.maximum(close, pre) * 1.01
    low = np.minimum(close, pre) * 0.99
    return close, pre, high, low


def test_ema_blocked_closed_form_matches_the_recursion_over_long_series():
    x = np.random.default_rng(0).normal(50, 5, (3, 1000))
    for alpha in (2 / 6, 2 / 27, 1 / 14, 0.5):
        got = F.ema(x, alpha)
        for row in range(3):
            np.testing.assert_allclose(got[row], loop_ema(x[row], alpha), rtol=1e-10)
    np.testing.assert_allclose(F.ema(x, 1 / 3, init=50.0)[0], loop_ema(x[0], 1 / 3, 50.0), rtol=1e-10)


def test_sma_and_bollinger_match_loops(series):
    close = series[0][None, :]
    for n in (5, 20, 60):
        np.testing.assert_allclose(F.sma(close, n)[0], loop_sma(series[0], n), rtol=1e-10)
    mid, upper, lower = F.bollinger(close, 20, 2.0)
    sd = loop_std(series[0], 20)
    np.testing.assert_allclose(mid[0], loop_sma(series[0], 20), rtol=1e-10)
    np.testing.assert_allclose(upper[0], loop_sma(series[0], 20) + 2 * sd, atol=1e-7)
    np.testing.assert_allclose(lower[0], loop_sma(series[0], 20) - 2 * sd, atol=1e-7)


def test_rsi_matches_loop_and_is_50_on_a_flat_series(series):
    close = series[0]
    for n in (6, 14):
        np.testing.assert_allclose(F.rsi(close[None, :], n)[0], loop_rsi(close, n), atol=1e-9)
    flat = np.full((1, 100), 7.0)
    assert np.all(F.rsi(flat, 14) == 50.0)
    rising = np.linspace(1, 2, 100)[None, :]
    assert F.rsi(rising, 14)[0, -1] == pytest.approx(100.0)


def test_macd_matches_loops(series):
    close = series[0]
    line = loop_ema(close, 2 / 13) - loop_ema(close, 2 / 27)
    signal = loop_ema(line, 2 / 10)
    got = F.macd(close[None, :])
    np.testing.assert_allclose(got[0][0], line, atol=1e-9)
    np.testing.assert_allclose(got[1][0], signal, atol=1e-9)
    np.testing.assert_allclose(got[2][0], line - signal, atol=1e-9)


def test_atr_matches_loop(series):
    close, pre, high, low = series
    got = F.atr(high[None, :], low[None, :], pre[None, :], 14)[0]
    np.testing.assert_allclose(got, loop_atr(high, low, pre, 14), rtol=1e-10)


def test_rolling_extremes_and_days_since(series):
    close = series[0]
    got_max = F.rolling_max(close[None, :], 10)[0]
    padded = [close[0]] * 9 + list(close)
    assert np.allclose(got_max, [max(padded[i : i + 10]) for i in range(len(close))])
    peak = np.r_[np.zeros(10), 5.0, np.zeros(20)][None, :]
    assert F.days_since_max(peak, 25)[0, 10] == 0
    assert F.days_since_max(peak, 25)[0, 15] == 5


@pytest.mark.parametrize("n", [1, 2, 9, 14, 25, 26, 60, 64, 500])
def test_doubling_extremes_equal_the_window_loop_ties_and_nan_included(n):
    """rolling max/min and days-since by doubling (issue 15) are exactly the edge-padded
    window's max, min and most recent argmax/argmin, ties (rounded prices) included."""
    rng = np.random.default_rng(n)
    x = np.round(rng.random((5, 300)) * 4)  # few distinct values: many ties
    x[4, 100] = np.nan  # NaN: the window way's result
    for row in x:
        padded = [row[0]] * n + list(row)  # n + 1 values per window for days-since
        wins = [padded[i + 1 : i + n + 1] for i in range(len(row))]
        since = [padded[i : i + n + 1] for i in range(len(row))]
        assert np.array_equal(F.rolling_max(row[None], n)[0], [np.max(w) for w in wins], equal_nan=True)
        assert np.array_equal(F.rolling_min(row[None], n)[0], [np.min(w) for w in wins], equal_nan=True)
        assert np.array_equal(F.days_since_max(row[None], n)[0], [np.argmax(w[::-1]) for w in since])
        assert np.array_equal(F.days_since_min(row[None], n)[0], [np.argmin(w[::-1]) for w in since])


def test_features_of_the_last_days_equal_the_full_table_there():
    """Only the last days (plus the local features' warm-up) are computed; every value,
    padded stocks and a frozen one included, equals the full table's bit for bit."""
    bars = _bars(6, 300)
    assert len(set(bars.n_rows.tolist())) > 1  # some stock is padded on the left
    for name in ("open", "high", "low", "close", "pre_close"):
        getattr(bars, name)[1, -100:] = 5.0  # frozen for the last 100 days
    full = F.compute_features(bars)
    for last in (1, 2, 61, 69, 150, 239, 240):
        assert np.array_equal(F.compute_features(bars, last_days=last), full[:, -last:]), last
    assert F.compute_features(bars, last_days=1000).shape == full.shape


def _bars(n_stocks=3, days=200, seed=1):
    from hpcbatch.stocks.probe import synthetic_rows
    from hpcbatch.stocks.sink import bars_from_rows

    return bars_from_rows(synthetic_rows(n_stocks, days, seed))


def test_105_float32_features_all_finite_even_with_degenerate_bars():
    bars = _bars()
    # A stock frozen at one price with zero volume: divisions by zero everywhere.
    for name in ("open", "high", "low", "close", "pre_close"):
        getattr(bars, name)[1] = 5.0
    bars.vol[1] = 0.0
    bars.amount[1] = 0.0
    out = F.compute_features(bars)
    assert out.shape == (3, bars.shape[1], 105) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert len(F.FEATURE_NAMES) == 105 and F.FEATURE_NAMES[F.CLOSE_PCT] == "close_pct"
    assert np.abs(out).max() <= 10.0
    # close_pct is tanh(percent change / 3) and inverts back to the percent change.
    pct = 100 * (bars.close[0] / bars.pre_close[0] - 1)
    np.testing.assert_allclose(F.unsquash(out[0, :, F.CLOSE_PCT].astype(float)), pct, atol=1e-3)


def test_a_stock_features_do_not_depend_on_its_chunk():
    """Left padding to the longest stock of the chunk must not change a stock's features."""
    from hpcbatch.stocks.probe import synthetic_rows
    from hpcbatch.stocks.sink import bars_from_rows

    rows = synthetic_rows(10, 300, seed=5)
    codes = sorted({r[0] for r in rows})
    counts = {c: sum(1 for r in rows if r[0] == c) for c in codes}
    short = min(codes, key=lambda c: counts[c])
    assert counts[short] < max(counts.values())  # some stock is listed later / suspended
    alone = F.compute_features(bars_from_rows([r for r in rows if r[0] == short]))
    together_bars = bars_from_rows(rows)
    together = F.compute_features(together_bars)
    i = together_bars.codes.index(short)
    n = counts[short]
    body = slice(F.WARMUP_DAYS, None)  # after the warm-up every window is full
    np.testing.assert_allclose(together[i, -n:][body], alone[0][body], atol=2e-5)


def test_bars_layout_right_aligns_and_edge_pads():
    codes = ["A", "A", "A", "B"]
    cols = {"trade_date": [20250101, 20250102, 20250103, 20250103]}
    for f in F.PRICE_FIELDS:
        cols[f] = [1.0, 2.0, 3.0, 9.0]
    bars = F.bars_from_columns(codes, cols)
    assert bars.codes == ["A", "B"] and list(bars.n_rows) == [3, 1]
    assert bars.close.tolist() == [[1.0, 2.0, 3.0], [9.0, 9.0, 9.0]]
    assert bars.dates[1].tolist() == [20250103] * 3


def test_ema_of_the_last_days_equals_the_full_ema_there_bit_for_bit():
    """``tail``: blocks before the kept days give only their carry; the kept days equal
    the full recursion's bits (tail inside a block, on a block edge, longer than x)."""
    x = np.random.default_rng(5).normal(10, 3, size=(4, 3 * F._BLOCK + 17))
    for alpha, init in ((0.1, None), (2 / 13, None), (1 / 3, 50.0)):
        full = F.ema(x, alpha, init)
        for tail in (0, 1, 17, 18, F._BLOCK + 17, F._BLOCK + 18, 200, x.shape[1], 10_000):
            got = F.ema(x, alpha, init, tail=tail)
            assert got.shape == (4, min(tail, x.shape[1]))
            assert np.array_equal(got.view(np.int64), F._tail(full, tail).view(np.int64)), tail


def test_calendar_once_per_distinct_date_equals_date_by_date():
    dates = np.array([[20250102, 20250103, 20250106, 20250106], [20241231, 20250102, 20250103, 20250228],
                      [20250301, 20250301, 20250301, 20250301]])  # fmt: skip
    got = F._calendar(dates)
    assert len(got) == 5 and all(f.shape == dates.shape for f in got)
    for i, j in np.ndindex(dates.shape):
        one = F._calendar(dates[i : i + 1, j : j + 1])  # a single date: computed directly
        assert all(f[i, j].tobytes() == o[0, 0].tobytes() for f, o in zip(got, one, strict=True))
    assert got[0][0, 2] == np.sin(0.0) and got[4][2, 0] == (1 - 16) / 15.0  # a Monday; the 1st


def test_cumsum_by_torch_equals_numpy_bit_for_bit():
    """The scan behind EMAs and rolling sums: torch's where loaded (as here), numpy's
    bits every time: leading -0.0, NaN, infinities, views with a row stride, in place."""
    import torch  # noqa: F401 (loaded: the torch path runs)

    rng = np.random.default_rng(11)
    for trial in range(60):
        x = rng.normal(size=(int(rng.integers(1, 60)), int(rng.integers(1, 700)))) * 10.0 ** rng.integers(-5, 8)
        if trial % 3 == 0:
            hit = rng.random(x.shape) < 0.02
            x[hit] = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0], size=int(hit.sum()))
        if trial % 4 == 0:
            x[: x.shape[0] // 2 + 1, :2] = -0.0  # numpy keeps -0.0 sums; torch starts at +0.0
        inplace, view = x.copy(), np.concatenate([x, x], axis=1)[:, 1 : 1 + x.shape[1]]
        with np.errstate(invalid="ignore"):  # inf - inf
            ref, ref_view = np.cumsum(x, axis=-1), np.cumsum(view, axis=-1)
            got = [F.cumsum(x), F.cumsum(x, out=np.empty_like(x)), F.cumsum(inplace, out=inplace)]
            F.cumsum(view, out=view)
        for g in [*got]:
            assert np.array_equal(g.view(np.int64), ref.view(np.int64)), trial
        assert np.array_equal(view.view(np.int64), ref_view.view(np.int64)), trial
