"""Analytic memory footprint of stock batch prediction (per stock, per worker).

Figures from the workload (REFERENCE.md, section 1): 11 raw columns per day,
105 float32 features per day, windows of 60 days, ~8M-parameter model.  Replaced by
a measured footprint with ``--calibrate``.
"""

from __future__ import annotations

from ..planner import Footprint

N_FEATURES = 105
WINDOW_DAYS = 60
RAW_COLUMNS = 11
# A fetched row as Python objects (tuple + floats + strings) before it becomes numpy.
ROW_OBJECT_BYTES = 64 * RAW_COLUMNS
# Interpreter + numpy + torch + SQLAlchemy + a Dask worker, measured on this machine.
BASELINE_BYTES = 420 * 1024**2
# ~8M float32 parameters.
MODEL_BYTES = 8_200_000 * 4
# Inference batch activations of the full-size model, per window (BiLSTM + 5 FF blocks).
ACTIVATION_BYTES_PER_WINDOW = WINDOW_DAYS * (384 + 2 * 512 + 384 + 1536 + 105) * 4


def stocks_footprint(
    n_stocks: int,
    lookback_days: int = 400,
    predict_days: int = 10,
    *,
    inference_batch: int = 256,
    model_mmap: bool = True,
) -> Footprint:
    """Peak bytes per stock in a chunk: raw rows, float64 indicator work, float32 features,
    and the materialised windows of its prediction days."""
    raw = lookback_days * (ROW_OBJECT_BYTES + RAW_COLUMNS * 8)
    feature_work = lookback_days * N_FEATURES * (8 * 2 + 4)
    windows = predict_days * WINDOW_DAYS * N_FEATURES * 4
    per_stock = raw + feature_work + windows
    activations = inference_batch * ACTIVATION_BYTES_PER_WINDOW
    return Footprint(
        workload="stocks",
        item_name="stock",
        n_items=n_stocks,
        per_item_bytes=per_stock,
        baseline_bytes=BASELINE_BYTES + activations,
        model_bytes=MODEL_BYTES,
        model_mmap=model_mmap,
        gpu_per_item_bytes=ACTIVATION_BYTES_PER_WINDOW + WINDOW_DAYS * N_FEATURES * 4,
        gpu_fixed_bytes=MODEL_BYTES,
        details=(
            ("raw rows per stock", raw),
            ("feature computation per stock", feature_work),
            ("windows per stock", windows),
            ("inference activations per worker", activations),
        ),
        shrink_hints=(
            f"set --lookback-days {max(120, lookback_days // 2)}"
            if lookback_days > 120
            else "lower --batch-size",
        ),
    )
