"""``hpcbatch stocks demo``: generate + train (small, seeded) + predict, under one directory.

Owns the demo's layout (``<dir>/stocks.db``, ``<dir>/model``, ``<dir>/reports``) and its
printout.  Re-running it is safe: the bars are regenerated in place, the model is
overwritten, predictions are upserted and each run gets a new ledger run id.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from .. import config as hb_config
from .generate import generate_market
from .predict import PredictOptions, predict
from .schema import make_engine, stock_predictions
from .train import train


def run_demo(
    directory: Path,
    *,
    n_stocks: int = 300,
    days: int = 400,
    epochs: int = 3,
    max_windows: int = 2000,
    model_size: str = "small",
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the whole pipeline on SQLite in ``directory``; return where everything is."""
    t0 = time.perf_counter()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "stocks.db"
    url = f"sqlite:///{db}"
    model_dir = directory / "model"
    report_dir = directory / "reports"

    echo(f"[1/3] generating {n_stocks} stocks x {days} trading days into {db} ...")
    engine = make_engine(url, create=True)
    summary = generate_market(engine, n_stocks, days, seed, replace=True)
    echo(f"      {summary.rows} rows, {summary.first_date}..{summary.last_date}")

    echo(f"[2/3] training a {model_size} model ({epochs} epochs, up to {max_windows} windows) ...")
    fit = train(
        engine, model_dir, epochs=epochs, max_stocks=min(n_stocks, 200), max_windows=max_windows,
        size=model_size, seed=seed, log=lambda m: echo(f"      {m}"),
    )
    echo(
        f"      saved to {model_dir} ({fit.parameters:,} parameters), validation direction "
        f"accuracy {fit.val_direction_accuracy:.1%}"
    )

    echo("[3/3] predicting the last 10 trading days of every stock on a local Dask cluster ...")
    settings = hb_config.load()
    opts = PredictOptions.from_settings(settings["stocks"], use_gpu="auto")
    report = predict(
        url, str(model_dir), settings=settings, options=opts, report_dir=str(report_dir),
        run_id=f"demo-{time.strftime('%Y%m%d-%H%M%S')}", backend="local",
    )
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(stock_predictions)).scalar_one()
        sample = conn.execute(
            sa.select(
                stock_predictions.c.ts_code,
                stock_predictions.c.trade_date,
                stock_predictions.c.predicted_return,
                stock_predictions.c.confidence,
            )
            .order_by(stock_predictions.c.trade_date.desc(), stock_predictions.c.ts_code)
            .limit(5)
        ).all()
    engine.dispose()
    meta = report.results_meta or {}
    echo("")
    echo(f"done in {time.perf_counter() - t0:.0f} s")
    echo(
        f"predictions: {total} rows in table stock_predictions of {db} "
        f"({meta.get('stocks_predicted', 0)} stocks; {meta.get('stocks_skipped_short', 0)} "
        "skipped: too few rows)"
    )
    echo(f"report:      {report.report_dir}/report.json (memory per worker: memory.png)")
    echo(f"model:       {model_dir}")
    echo("latest predictions (predicted_return is the next day's return, 0.01 = +1 %):")
    for code, date, ret, conf in sample:
        echo(f"  {code}  {date}  {ret:+.4f}  confidence {conf:.2f}")
    return {
        "db": str(db),
        "model_dir": str(model_dir),
        "report_dir": report.report_dir,
        "predictions": total,
        "report": report,
    }
