"""Batch prediction's per-chunk task (runs on a worker) and the checks before a run.

Owns: :class:`PredictTask` -- read the chunk's bars in one query (at most
``concurrency`` chunks read at once, through a ``distributed.Semaphore``), compute
features, take the zero-copy windows of the last ``predict_days`` days, run the cached
model in batches, then upsert the predictions and the chunk's ledger row in one
transaction and return only counts -- and :func:`prepare`, which checks the database and
model before anything starts.  The workload around it is :mod:`hpcbatch.stocks.workload`.

Convention: a prediction row's ``trade_date`` is the last day of its window (the day the
prediction is made on); ``predicted_return`` is the model's next-trading-day close-to-close
return as a fraction (0.012 = +1.2 %), de-normalised from the model's units.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DEFAULTS
from ..errors import ConfigError
from ..planner import gpu_batch_size
from ..workload import QUARANTINED
from .features import WINDOW_DAYS, compute_features, min_rows
from .footprint import cpu_batch, stocks_footprint
from .schema import init_db, make_engine, masked, preflight, require_tables, write_transaction
from .sink import (
    BarCheck,
    engine_for,
    list_codes,
    read_bars,
    read_screened_bars,
    select_codes,
    upsert_predictions,
)
from .windows import prediction_windows

log = logging.getLogger(__name__)


def inference_batch(
    device: str,
    cpu_batch: int,
    *,
    planned_gpu_batch: int | None = None,
    free_bytes: int | None = None,
    per_window_bytes: int = 0,
    fraction: float = 0.8,
) -> int:
    """Windows per forward pass: fixed on CPU; on a GPU from the free device memory.

    ``free_bytes`` is read from the device when not given (tests inject it).
    """
    if not device.startswith("cuda"):
        return cpu_batch
    if free_bytes is None:
        from .model import gpu_free_bytes

        free_bytes = gpu_free_bytes(device)
    fitted = gpu_batch_size(free_bytes, 0, max(1, per_window_bytes), fraction)
    if planned_gpu_batch:
        fitted = min(fitted, planned_gpu_batch)
    return max(1, fitted)


@dataclass(frozen=True)
class PredictTask:
    """The picklable task function ``task(chunk, ctx) -> counts`` run on the workers."""

    db_url: str = field(repr=False)  # reprs reach Dask's logs: never show the password
    model_dir: str
    lookback_days: int = 400
    predict_days: int = 10
    model_version: str = "v1"
    device: str = "cpu"
    cpu_batch: int | None = None  # windows per CPU forward pass (None: the model's own)
    planned_gpu_batch: int | None = None
    gpu_per_window_bytes: int = 0
    gpu_memory_fraction: float = 0.8
    upsert_rows: int = 200
    read_semaphore: Any = None
    run_id: str | None = None
    loaded_model: Any = None  # in-process use only (probe): a LoadedModel instead of model_dir
    db_outage_s: float = 60.0  # database-outage-timeout: retry this long, then give up
    strict: bool = False  # a bad bar fails the chunk (DataError) instead of quarantining its stock
    torch_threads: int | None = None  # intra-op threads per worker process (None: torch's own)

    def __call__(self, chunk: Any, ctx: Any = None) -> dict:
        from ..retry import with_backoff  # a database restart mid-run: wait, then redo the chunk

        # a restart is ridden out; a database down for db_outage_s raises
        # DatabaseUnavailable, which the runner's circuit breaker turns into one line
        return with_backoff(
            lambda: predict_chunk(chunk, ctx, self),
            attempts=None,
            max_total_s=self.db_outage_s,
            database=self.db_url,
            what=f"stocks chunk {getattr(chunk, 'chunk_id', '?')}",
        )


def _read_slot(task: PredictTask):
    return task.read_semaphore if task.read_semaphore is not None else contextlib.nullcontext()


def _codes_of(chunk: Any) -> list[str]:
    items = list(getattr(chunk, "items", ()) or ())
    if not items:
        raise ConfigError(f"chunk {getattr(chunk, 'chunk_id', '?')} carries no ts_codes")
    return items


def prediction_rows(
    codes: list[str], dates: np.ndarray, returns: np.ndarray, confidence: np.ndarray,
    model_version: str, run_id: str | None,
) -> list[dict]:
    """One dict per (stock, prediction day); ``dates`` is ``(stocks, predict_days)``."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)
    k = dates.shape[1]
    code_col = np.repeat(np.asarray(codes, dtype=object), k).tolist()
    return [
        {
            "ts_code": code,
            "trade_date": str(int(date)),
            "model_version": model_version,
            "predicted_return": float(r),
            "predicted_direction": bool(r > 0),
            "confidence": float(c),
            "predicted_return_3d": None,
            "predicted_direction_3d": None,
            "prediction_date": now,
            "run_id": run_id,
        }
        for code, date, r, c in zip(
            code_col, dates.reshape(-1).tolist(), returns.tolist(), confidence.tolist(), strict=True
        )
    ]


def compute_chunk(
    codes: list[str], bars, task: PredictTask, check: BarCheck | None = None
) -> tuple[list[dict], dict]:
    """Features -> windows -> model for a chunk's bars; returns (rows, counts).

    ``check``: what :func:`~hpcbatch.stocks.sink.read_screened_bars` left out (its bad
    stocks go to the counts' ``quarantined`` list) and flagged (10x jumps, kept)."""
    check = check or BarCheck()
    need = min_rows(task.predict_days)
    keep = np.flatnonzero(bars.n_rows >= need) if bars.codes else np.zeros(0, int)
    counts = {
        QUARANTINED: check.quarantined(),
        "stocks_flagged_jump": len(check.jumps),
        "stocks": len(codes),
        "stocks_missing": len(codes) - len(bars.codes) - len(check.bad),
        "stocks_skipped_short": int(len(bars.codes) - keep.size),
        "stocks_predicted": int(keep.size),
        "rows_read": int(bars.n_rows.sum()) if bars.codes else 0,
        "windows": 0,
        "predictions": 0,
    }
    if keep.size == 0:
        return [], counts
    if keep.size < len(bars.codes):
        bars = _subset(bars, keep)
    t0 = time.perf_counter()
    # only the days the windows cover (the indicators still run over every day)
    features = compute_features(bars, last_days=WINDOW_DAYS + task.predict_days - 1)
    windows = prediction_windows(features, task.predict_days)  # a view: no copy
    t1 = time.perf_counter()
    from .model import cached_model, predict_windows  # torch: on the workers, not at import

    loaded = task.loaded_model or cached_model(task.model_dir, task.device)
    batch = inference_batch(
        task.device,
        task.cpu_batch or cpu_batch(loaded.config),
        planned_gpu_batch=task.planned_gpu_batch,
        per_window_bytes=task.gpu_per_window_bytes,
        fraction=task.gpu_memory_fraction,
    )
    returns, confidence, used = predict_windows(loaded, windows, batch)
    halvings = int(np.log2(batch // used)) if used < batch else 0
    del windows, features
    dates = bars.dates[:, -task.predict_days :]
    version = task.model_version or loaded.version
    rows = prediction_rows(bars.codes, dates, returns, confidence, version, task.run_id)
    counts.update(windows=len(rows), predictions=len(rows), inference_halvings=halvings,
                  features_s=round(t1 - t0, 4), inference_s=round(time.perf_counter() - t1, 4))  # fmt: skip
    return rows, counts


def _first(found: dict) -> str:
    return next((f"{code}: {why}" for code, why in found.items()), "-")


def _subset(bars, keep: np.ndarray):
    from .features import Bars

    arrays = {f: getattr(bars, f)[keep] for f in ("dates", "open", "high", "low", "close",
                                                  "pre_close", "vol", "amount")}
    return Bars(codes=[bars.codes[i] for i in keep], n_rows=bars.n_rows[keep], **arrays)


def predict_chunk(chunk: Any, ctx: Any, task: PredictTask) -> dict:
    """The whole job of one chunk on a worker; only counts come back."""
    t0 = time.perf_counter()
    codes = _codes_of(chunk)
    if task.torch_threads:
        from .model import match_threads

        match_threads(task.torch_threads)
    engine = engine_for(task.db_url)
    with _read_slot(task), engine.connect() as conn:
        if task.strict:
            bars, check = read_bars(conn, codes, task.lookback_days), BarCheck()
        else:
            bars, check = read_screened_bars(conn, codes, task.lookback_days)
    where = getattr(chunk, "chunk_id", "?")
    if check.bad:
        log.warning("chunk %s: %d stock(s) quarantined, e.g. %s", where, len(check.bad),
                    _first(check.bad))  # fmt: skip
    if check.jumps:
        log.warning("chunk %s: %d stock(s) with a 10x jump, kept, e.g. %s", where,
                    len(check.jumps), _first(check.jumps))  # fmt: skip
    t_read = time.perf_counter() - t0
    rows, counts = compute_chunk(codes, bars, task, check)
    run_id = getattr(ctx, "run_id", None) or task.run_id
    ledger = getattr(ctx, "ledger", None)
    t_write = time.perf_counter()
    with write_transaction(engine) as conn:  # predictions and ledger row: one transaction
        upsert_predictions(conn, rows, task.upsert_rows)
        counts["read_s"] = round(t_read, 4)
        counts["write_s"] = round(time.perf_counter() - t_write, 4)  # the commit not included
        counts["seconds"] = round(time.perf_counter() - t0, 3)
        if ledger is not None:
            ledger.mark_done(run_id, chunk, counts, connection=conn)
    return counts


# ------------------------------------------------------------------ client ----


@dataclass(frozen=True)
class PredictOptions:
    lookback_days: int = 400
    predict_days: int = 10
    batch_size: int | None = None
    concurrency: int = 4
    use_gpu: str = "auto"
    limit: int | None = None
    offset: int = 0
    model_version: str = "v1"
    upsert_rows: int = 200
    strict: bool = False  # a bad bar refuses the run instead of quarantining its stock

    @classmethod
    def from_settings(cls, stocks: Mapping[str, Any], **overrides: Any) -> PredictOptions:
        """From the ``stocks`` config section (missing keys: hpcbatch.yaml's defaults) and
        flag values (``None`` keeps the setting)."""
        section = {**DEFAULTS["hpcbatch"]["stocks"], **stocks}
        values = {f.name: section[f.name.replace("_", "-")] for f in fields(cls)}
        values["offset"] = values["offset"] or 0
        values["strict"] = bool(values["strict"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        opts = cls(**values)
        opts.check()
        return opts

    def check(self) -> None:
        for name in ("lookback_days", "predict_days", "concurrency", "upsert_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive whole number, got {value}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--chunk-size must be at least 1, got {self.batch_size}")
        need = min_rows(self.predict_days)
        if self.lookback_days < need:
            raise ConfigError(
                f"--lookback-days {self.lookback_days} (flag or profile) is too short: "
                f"{self.predict_days} prediction "
                f"days need {need} days (60 warm-up + 60-day window + {self.predict_days - 1})"
            )


def run_params(
    db_url: str, model_dir: str, opts: PredictOptions, inputs: Mapping[str, Any] | None = None
) -> dict:
    """What defines a run's output (recorded in the ledger; a resumed run must match).

    ``inputs`` fingerprints the bars and the weights (:func:`input_fingerprint`), so new
    data or a retrained model makes a new run instead of "already finished".
    ``batch_size``, ``concurrency`` and ``strict`` (which only refuses bad data) do not
    change the predictions, so they may change on resume.
    """
    values = asdict(opts)
    for key in ("batch_size", "concurrency", "strict"):
        values.pop(key)
    return {
        "db": masked(db_url),
        "model_dir": str(Path(model_dir).resolve()),
        **values,
        **dict(inputs or {}),
    }


def input_fingerprint(engine, model_dir: str | Path) -> dict:
    """Row count and last date of the bars, size and mtime of the weights."""
    import sqlalchemy as sa

    from .model import WEIGHTS_FILE
    from .schema import stock_daily

    with engine.connect() as conn:
        rows, last = conn.execute(
            sa.select(sa.func.count(), sa.func.max(stock_daily.c.trade_date))
        ).one()
    weights = (Path(model_dir) / WEIGHTS_FILE).stat()
    return {
        "bars_rows": int(rows),
        "bars_last_date": last,
        "weights": f"{weights.st_size}-{weights.st_mtime_ns}",
    }


def default_run_id(
    db_url: str, model_dir: str, opts: PredictOptions, inputs: Mapping[str, Any] | None = None
) -> str:
    """Same inputs -> same run id, so ``--resume`` finds the earlier run's ledger."""
    key = json.dumps(run_params(db_url, model_dir, opts, inputs), sort_keys=True)
    return "stocks-" + hashlib.sha1(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Prepared:
    """Everything checked on the client before a worker starts."""

    codes: list[str]
    device: str
    footprint: Any
    task: PredictTask
    model_config: Any
    inputs: dict


def prepare(db_url: str, model_dir: str, opts: PredictOptions, *, gpu_memory_fraction: float = 0.8) -> Prepared:
    """Check database, data and model; nothing is written except missing tables."""
    from .model import load_model, resolve_device

    device = resolve_device(opts.use_gpu)
    engine = make_engine(db_url)
    try:
        require_tables(engine, "stock_daily")
        init_db(engine)  # creates stock_predictions if missing, checks it otherwise
        if opts.strict:  # else bad bars quarantine their stocks, chunk by chunk
            preflight(engine)
        loaded = load_model(model_dir)  # fail here, not on every worker
        codes = select_codes(list_codes(engine), opts.offset, opts.limit)
        inputs = input_fingerprint(engine, model_dir)
    finally:
        engine.dispose()
    footprint = stocks_footprint(
        len(codes), opts.lookback_days, opts.predict_days, model_config=loaded.config
    )
    task = PredictTask(
        db_url=str(db_url),
        model_dir=str(model_dir),
        lookback_days=opts.lookback_days,
        predict_days=opts.predict_days,
        model_version=opts.model_version,
        device=device,
        gpu_per_window_bytes=footprint.gpu_per_item_bytes,
        gpu_memory_fraction=gpu_memory_fraction,
        upsert_rows=opts.upsert_rows,
        strict=opts.strict,
    )
    return Prepared(codes, device, footprint, task, loaded.config, inputs)
