"""Calibration probe: the real per-chunk work for ``size`` stocks, in-process, no database.

Used by :mod:`hpcbatch.calibrate` (``hpcbatch.stocks.probe:probe``), which runs it in a
child process started as the run's workers are (for a local run: forked from the
forkserver that preloaded numpy, torch and SQLAlchemy, ``Job.worker_preload``) at a few
sizes and fits fixed + per-stock bytes from the peak RSS.  It
builds rows as Python tuples (what a database fetch returns), lays them out, computes
the 105 features, takes the prediction windows and runs the model in inference batches,
then builds the prediction rows -- everything a worker does except the SQL round trips.
The model has random weights of the configured size (the real one is memory-mapped and
counted once per node by the planner).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from .features import PRICE_FIELDS
from .footprint import WORKER_HEAP
from .footprint import cpu_batch as model_cpu_batch
from .generate import BLOCK_STOCKS, _market_returns, simulate_block, stock_codes, trading_calendar
from .model import LoadedModel, ModelConfig, StockModel, model_config
from .sink import bars_from_rows
from .task import PredictTask, compute_chunk

_MODEL: dict[str, LoadedModel] = {}


def synthetic_rows(n_stocks: int, days: int, seed: int = 0) -> list[tuple]:
    """Rows like a ``stock_daily`` fetch, sorted by (ts_code, trade_date)."""
    calendar = trading_calendar(days)
    dates = [str(x).replace("-", "") for x in calendar]
    codes = stock_codes(n_stocks)
    market = _market_returns(np.random.default_rng([seed, 10**6]), days)
    rows: list[tuple] = []
    for block, start in enumerate(range(0, n_stocks, BLOCK_STOCKS)):
        block_codes = codes[start : start + BLOCK_STOCKS]
        bars = simulate_block(block_codes, calendar, market, seed, block)
        present = bars["present"]
        for i, code in enumerate(block_codes):
            cols = [bars[f][i, present[i]].tolist() for f in PRICE_FIELDS]
            day = np.asarray(dates, dtype=object)[present[i]].tolist()
            rows.extend(zip([code] * len(day), day, *cols, strict=True))
    return rows


def _model(size: str, config_dict: dict | None = None) -> LoadedModel:
    key = json.dumps(config_dict, sort_keys=True) if config_dict else size
    if key not in _MODEL:
        config = ModelConfig.from_dict(config_dict) if config_dict else model_config(size)
        torch.manual_seed(0)
        model = StockModel(config).eval().requires_grad_(False)
        n = config.n_features
        _MODEL[key] = LoadedModel(
            model, config, np.zeros(n, np.float32), np.ones(n, np.float32), "probe", "cpu", ""
        )
    return _MODEL[key]


def probe(
    size: int,
    *,
    lookback_days: int = 400,
    predict_days: int = 10,
    model_size: str = "full",
    model_config: dict | None = None,
    cpu_batch: int | None = None,
    seed: int = 0,
) -> dict:
    """Run one chunk of ``size`` stocks (0: just the fixed cost) and return its counts.

    Every size first runs one full inference batch of ``cpu_batch`` windows: a worker
    always reaches full batches, so their activations are fixed per-worker bytes, and
    small probe sizes must not mistake a growing batch for bytes per stock.
    """
    WORKER_HEAP.apply()  # as the run's workers keep their heap (StocksJob.worker_heap)
    loaded = _model(model_size, model_config)
    cpu_batch = cpu_batch or model_cpu_batch(loaded.config)
    with torch.inference_mode():
        loaded.model.predict_last(  # what predict_windows runs
            torch.zeros(cpu_batch, loaded.config.window, loaded.config.n_features)
        )
    if size <= 0:
        return {"stocks": 0}
    rows = synthetic_rows(size, lookback_days, seed)
    bars = bars_from_rows(rows)
    del rows
    task = PredictTask(
        db_url="",
        model_dir="",
        lookback_days=lookback_days,
        predict_days=predict_days,
        cpu_batch=cpu_batch,
        loaded_model=loaded,
    )
    out, counts = compute_chunk(bars.codes, bars, task)
    return counts
