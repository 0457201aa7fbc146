"""Analytic memory footprint of stock batch prediction (per stock, per worker).

Figures from the workload (REFERENCE.md, section 1) and the code in this package:
rows fetched as Python tuples, a float64 indicator pass over ``(stocks, days)`` arrays
written column by column into float32 features, windows that are views (only one
inference batch is ever copied), and a model whose weights are memory-mapped.  The
constants were refined with measurements of :mod:`hpcbatch.stocks.probe` on this
machine (see docs/stocks.md); ``--calibrate`` measures them for the machine at hand.
"""

from __future__ import annotations

from typing import Any

from ..planner import Footprint

N_FEATURES = 105
WINDOW_DAYS = 60
# Where the constants below come from (issue 15 item 6): measured on one machine, not on
# the machine at hand; --calibrate measures the fixed and per-stock bytes there.
SOURCE = "analytic, constants measured 2026-11-23 on the build machine; --calibrate measures them here"
PROVENANCE = (
    "measured 2026-11-23 on the project's 2-core x86_64 Linux build "
    "machine (Python 3.11, torch 2.x CPU, numpy 2.x, SQLAlchemy 2.x, distributed 2026.x): "
    "worker baseline 300 MiB from hpcbatch.stocks.probe at size 0 (310 MiB, full model) and "
    "the benchmark workers; 500 B per fetched row and 80 float64 temporaries per stock-day "
    "refined with probe runs; driver 384 MiB over the measured 321-325 MiB; checked "
    "against benchmarks/stocks.py on that machine (measured/predicted per-worker peak "
    "{checked}); not measured on this machine: --calibrate measures them here"
).format(
    checked="0.81-0.84 small model at 500-5,000 stocks, 0.90-0.95 full model at 500-2,000: "
    "results-stocks-small.json / -full.json of 2026-11-23"
)
RAW_COLUMNS = 9
# A fetched row: SQLAlchemy Row + tuple + 2 str + 7 float objects, plus the column
# lists and numpy copies made while laying it out.
ROW_OBJECT_BYTES = 500
# Live float64 (stocks x days) intermediates during the feature pass (cached
# indicators, sliding-window extremes, the where/division temporaries).
FEATURE_TEMPORARIES = 80
# Interpreter + numpy + torch + SQLAlchemy + a Dask worker (nanny excluded), measured
# (probe at size 0: 310 MiB with the full model in its heap; benchmark workers).
BASELINE_BYTES = 300 * 1024**2
# The driver: client + in-process scheduler, with torch imported to check the model.
# Measured peak RSS 321-325 MiB (benchmarks/results-stocks-*.json, 500-5,000 stocks).
DRIVER_BYTES = 384 * 1024**2
# Full size model: ~9.1M float32 parameters.
FULL_MODEL_PARAMETERS = 9_081_962
# Prediction rows as dicts before the upsert, per prediction.
PREDICTION_ROW_BYTES = 1_200
#: Stocks per chunk when neither --chunk-size nor the max-chunk setting is given (the
#: original's default batch).  50 stocks are 500 windows, two full inference batches;
#: bigger chunks only raise the per-worker peak, so it stays flat as the market grows.
MAX_CHUNK_STOCKS = 50


def stocks_max_chunk(settings: dict) -> int:
    """The planner's cap on stocks per chunk: the ``max-chunk`` setting, else 50."""
    return int(settings.get("max-chunk") or MAX_CHUNK_STOCKS)


def _model_shape(model_config: Any) -> tuple[int, int, int, int]:
    if model_config is None:
        return 384, 256, 1536, FULL_MODEL_PARAMETERS
    from .model import n_parameters

    c = model_config
    return c.d_model, c.hidden, c.ff_inner, n_parameters(c)


def activation_bytes_per_window(model_config: Any = None) -> int:
    """Inference activations of one window (float32): per step the input, the first
    projection, the LSTM gates of both directions and both layers' outputs; the residual
    stream, one FF inner layer and the head for the last step only (``predict_last``).
    Measured: the probe's size-0 peak fell 752 -> 528 MiB at full size (256 windows)
    when the steps after the LSTM were cut to the last one (~1.4 -> ~0.9 MB a window)."""
    d_model, hidden, inner, _ = _model_shape(model_config)
    per_step = N_FEATURES + d_model + 2 * 4 * hidden + 2 * 2 * hidden
    return (WINDOW_DAYS * per_step + 2 * d_model + inner + 2 * N_FEATURES) * 4


def stocks_footprint(
    n_stocks: int,
    lookback_days: int = 400,
    predict_days: int = 10,
    *,
    inference_batch: int = 256,
    model_mmap: bool = True,
    model_config: Any = None,
) -> Footprint:
    """Peak bytes per stock in a chunk (raw rows, indicator work, float32 features,
    prediction rows) and per worker (baseline, one inference batch of activations)."""
    raw = lookback_days * (ROW_OBJECT_BYTES + RAW_COLUMNS * 8 * 2)
    # float64 indicator passes over every day; float32 features kept only for the days
    # the windows cover (compute_features(last_days=...))
    kept_days = min(lookback_days, WINDOW_DAYS + predict_days - 1)
    feature_work = lookback_days * FEATURE_TEMPORARIES * 8 + kept_days * N_FEATURES * 4
    outputs = predict_days * PREDICTION_ROW_BYTES
    per_stock = raw + feature_work + outputs
    per_window = activation_bytes_per_window(model_config)
    window_bytes = WINDOW_DAYS * N_FEATURES * 4
    activations = inference_batch * (per_window + 2 * window_bytes)
    params = _model_shape(model_config)[3]
    model_bytes = params * 4
    return Footprint(
        workload="stocks",
        item_name="stock",
        n_items=n_stocks,
        per_item_bytes=per_stock,
        baseline_bytes=BASELINE_BYTES + activations,
        model_bytes=model_bytes,
        model_mmap=model_mmap,
        gpu_per_item_bytes=per_window + 2 * window_bytes,
        gpu_fixed_bytes=model_bytes,
        driver_bytes=DRIVER_BYTES,
        source=SOURCE,
        constants=PROVENANCE,
        details=(
            ("raw rows per stock", raw),
            ("feature computation per stock", feature_work),
            ("prediction rows per stock", outputs),
            ("inference batch per worker", activations),
        ),
        shrink_hints=(
            f"set --lookback-days {max(130, lookback_days // 2)}"
            if lookback_days > 130
            else "lower --chunk-size",
        ),
    )
