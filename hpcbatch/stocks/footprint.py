"""Analytic memory footprint of stock batch prediction (per stock, per worker).

Figures from the workload (REFERENCE.md, section 1) and the code in this package:
rows fetched as Python tuples, a float64 indicator pass over ``(stocks, days)`` arrays
written column by column into float32 features, windows that are views (only one
inference batch is ever copied), and a model whose weights are memory-mapped.  The
worker baseline is in spawned-worker terms (SLURM's workers and an existing cluster's
are fresh processes); where the pipeline forks local workers from a server that
preloaded numpy, torch and SQLAlchemy, it takes ``FORKSERVER_SAVING_BYTES`` off
(:class:`hpcbatch.workload.PreloadSaving`).  Both were fitted to the per-worker peaks
of real runs (``PROVENANCE``); ``--calibrate`` measures the fixed and per-stock bytes
for the machine at hand.
"""

from __future__ import annotations

from typing import Any

from ..planner import Footprint
from ..workload import HeapTuning

N_FEATURES = 105
WINDOW_DAYS = 60
# Where the constants below come from (issue 15 item 6): measured on one machine, not on
# the machine at hand; --calibrate measures the fixed and per-stock bytes there.
SOURCE = (
    "analytic, constants measured 2026-12-06 on the build machine; --calibrate measures them here"
)
PROVENANCE = (
    "measured 2026-12-06 on the project's 2-core x86_64 Linux build machine (Python "
    "3.11.7, torch 2.13.0 CPU, numpy 2.4.6, SQLAlchemy 2.1.9, distributed 2026.8.0): "
    "worker baseline 304 MiB for spawned workers (SLURM, an existing cluster) = 240 MiB "
    "for local workers forked from a forkserver that preloaded numpy, torch and "
    "SQLAlchemy + the 64 MiB those share with it, plus the inference batch and the "
    "model's pages and 32 MiB of kept heap, fitted to the per-worker peaks of real runs "
    "({checked}); 500 B per fetched row from probe runs (2026-11-23) and 64 float64 "
    "temporaries per stock-day (~3x the peaks' growth per stock), rows and temporaries "
    "not alive together; driver 384 MiB over the measured 321-334 "
    "MiB; not measured on this machine: --calibrate measures them here"
).format(
    checked="forked: small model 306-325 MiB at 500-5,000 stocks x 150-400 days, full "
    "model 346-366 MiB at 500-2,000 stocks x 300-400 days, 25-250 stocks a chunk, "
    "measured/predicted 0.81-0.98; spawned: small model 374-388 MiB at 500-5,000 stocks, "
    "full model 408-409 MiB at 500-2,000 stocks, x 400 days, 50 stocks a chunk, "
    "measured/predicted 0.91-0.95; workers keeping their heap (WORKER_HEAP) at the "
    "model's CPU batch (cpu_batch)"
)
RAW_COLUMNS = 9
# A fetched row: SQLAlchemy Row + tuple + 2 str + 7 float objects, plus the column
# lists and numpy copies made while laying it out.
ROW_OBJECT_BYTES = 500
# Live float64 (stocks x days) intermediates during the feature pass (cached
# indicators, sliding-window extremes, the where/division temporaries).  Was 80; with
# WORKER_HEAP the per-worker peak grew 0.075-0.087 MiB a stock from 50 to 200-250
# stocks a chunk (small model, 300-400 days, 2026-12-06), 64 keeps ~3x that.
FEATURE_TEMPORARIES = 64
# Interpreter + numpy + torch + SQLAlchemy + a Dask worker (nanny excluded), forked from
# the forkserver that preloaded them (Job.worker_preload).  Fitted 2026-12-06 to real
# runs (helper measurements, benchmarks/calibration.py's cases and more): measured peak
# minus the inference batch, the model's pages and the chunk's stocks was 200-215 MiB
# for the small and the full model alike; 240 MiB keeps measured/predicted in 0.85-0.95.
FORKSERVER_BASELINE_BYTES = 240 * 1024**2
# What a spawned worker (SLURM, an existing cluster: a fresh process) holds more than a
# forked one: its own pages of the interpreter, numpy, torch and SQLAlchemy.  Measured
# 2026-12-06, stocks predict on 2 local workers with the same plan, forked from the
# forkserver (the default) vs a LocalCluster with multiprocessing spawn given as
# client=, per-worker peak (the runner's, RunReport.measured_peak_bytes) at 500, 2,000
# and 5,000 stocks x 400 days, 10 prediction days, 50 stocks a chunk: small model
# 348, 353, 365 MiB spawned vs 294, 293, 295 forked; full model (500 and 2,000 stocks)
# 539, 554 vs 480, 484: 54-70 MiB.  With 64 MiB both are 0.89-0.96 of the prediction
# (forked 0.89-0.94, spawned 0.89-0.96; spawned workers grow a little with the market).
# Same machine and versions as PROVENANCE; the machine was shared (load average 3-15),
# which moves the timings, not the peaks.  The pipeline takes the saving off where it
# forks local workers (hpcbatch.workload.PreloadSaving, stocks.workload.FORKSERVER_SAVING).
FORKSERVER_SAVING_BYTES = 64 * 1024**2
FORKSERVER_MEASURED = (
    "spawned workers measured 54-70 MiB over forked ones (stocks predict, 500-5,000 "
    "stocks x 400 days, small and full model, 2026-12-06)"
)
# The analytic baseline: spawned workers'.  Was 240 MiB for every worker (spawned ones
# measured 348-365 MiB at the small model against 328 MiB predicted: 1.06-1.11, unsafe).
BASELINE_BYTES = FORKSERVER_BASELINE_BYTES + FORKSERVER_SAVING_BYTES
# Workers keep freed memory for the next inference batch (hpcbatch.workload.HeapTuning,
# StocksJob.worker_heap): with Dask's MALLOC_TRIM_THRESHOLD_ every activation buffer over
# 128 KiB was mapped and faulted in afresh.  Measured 2026-12-06 (same machine and
# versions as PROVENANCE), 10 chunks of 50 stocks x 400 days in one process with Dask's
# environment, torch at 1 thread, inference seconds (features seconds): small model
# 3.33 (0.39) with Dask's setting, 1.73-1.78 (0.13-0.15) with these, 1.79-1.90 (0.13-0.17)
# with glibc's own defaults; full model 4.68 / 3.97-4.23 / 3.98-4.18.  An mmap
# threshold of 8 or 16 MiB, or a trim threshold of 16-32 MiB, left the small model at
# 2.1-2.6 s (trim 32 MiB at the model's own CPU batch: small 2.0 s against 1.55 s).
# What it adds to the peak, the same runs at the model's CPU batch: +22-23 MiB small
# (338 -> 360-361 MiB), +19 MiB full (374 -> 393); the footprint counts 32 MiB.
HEAP_MMAP_THRESHOLD = 32 * 1024**2
HEAP_TRIM_THRESHOLD = 64 * 1024**2
HEAP_PEAK_BYTES = 32 * 1024**2
WORKER_HEAP = HeapTuning(HEAP_MMAP_THRESHOLD, HEAP_TRIM_THRESHOLD, HEAP_PEAK_BYTES)
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


# Windows per CPU forward pass: as many as keep one batch's activations under this, at
# most MAX_CPU_BATCH.  Bigger batches only grew the workers: measured 2026-12-06 in one
# process with Dask's environment and WORKER_HEAP, torch at 1 thread, 4 chunks of 50
# stocks x 10 days, full model (0.82 MiB a window), inference s / peak RSS MiB: batch 32
# 7.6 / 363, 64 7.2-7.5 / 397-405, 96 7.8 / 449, 128 7.9 / 487, 256 8.8-9.7 / 590-626;
# small model (0.22 MiB), 10 chunks: 64 1.80 / 314, 128 1.70 / 331, 256 1.72 / 376.
ACTIVATION_TARGET_BYTES = 48 * 1024**2
MAX_CPU_BATCH = 256


def cpu_batch(model_config: Any = None) -> int:
    """Windows per CPU forward pass for the model (``None``: the full one): its batch's
    activations stay under ``ACTIVATION_TARGET_BYTES`` (256 at most): 58 full, 214
    small."""
    per_window = activation_bytes_per_window(model_config)
    return max(1, min(MAX_CPU_BATCH, ACTIVATION_TARGET_BYTES // per_window))


def stocks_footprint(
    n_stocks: int,
    lookback_days: int = 400,
    predict_days: int = 10,
    *,
    inference_batch: int | None = None,
    model_mmap: bool = True,
    model_config: Any = None,
) -> Footprint:
    """Peak bytes per stock in a chunk (raw rows, indicator work, float32 features,
    prediction rows) and per worker (baseline, one inference batch of activations)."""
    # The fetched rows are laid out as price columns and dropped before the feature pass
    # (hpcbatch.stocks.sink.fetch_bar_columns): the peak holds one or the other.
    rows = lookback_days * ROW_OBJECT_BYTES
    columns = lookback_days * RAW_COLUMNS * 8 * 2
    # float64 indicator passes over every day; float32 features kept only for the days
    # the windows cover (compute_features(last_days=...))
    kept_days = min(lookback_days, WINDOW_DAYS + predict_days - 1)
    feature_work = lookback_days * FEATURE_TEMPORARIES * 8 + kept_days * N_FEATURES * 4
    outputs = predict_days * PREDICTION_ROW_BYTES
    per_stock = max(rows, feature_work) + columns + outputs
    per_window = activation_bytes_per_window(model_config)
    window_bytes = WINDOW_DAYS * N_FEATURES * 4
    batch = inference_batch or cpu_batch(model_config)
    activations = batch * (per_window + 2 * window_bytes)
    params = _model_shape(model_config)[3]
    model_bytes = params * 4
    # Memory-mapped weights are counted once per node, but every worker's RSS (what its
    # nanny compares with the memory limit) holds the pages it read: all of them.
    model_pages = model_bytes if model_mmap else 0
    return Footprint(
        workload="stocks",
        item_name="stock",
        n_items=n_stocks,
        per_item_bytes=per_stock,
        baseline_bytes=BASELINE_BYTES + activations + model_pages + WORKER_HEAP.kept_bytes,
        model_bytes=model_bytes,
        model_mmap=model_mmap,
        gpu_per_item_bytes=per_window + 2 * window_bytes,
        gpu_fixed_bytes=model_bytes,
        driver_bytes=DRIVER_BYTES,
        source=SOURCE,
        constants=PROVENANCE,
        details=(
            ("fetched rows per stock (dropped before the features)", rows),
            ("price columns per stock", columns),
            ("feature computation per stock", feature_work),
            ("prediction rows per stock", outputs),
            ("inference batch per worker", activations),
            ("memory-mapped model pages in each worker's RSS", model_pages),
            ("freed heap a worker keeps for the next batch", WORKER_HEAP.kept_bytes),
        ),
        shrink_hints=(
            f"set --lookback-days {max(130, lookback_days // 2)}"
            if lookback_days > 130
            else "lower --chunk-size",
        ),
    )
