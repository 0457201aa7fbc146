"""`hpcbatch stocks ...` commands: thin wrappers over the hpcbatch.stocks API.

Reads settings once (``--profile`` / ``--config`` / flags) and passes values down;
every logic step lives in the modules of this package.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .. import config as hb_config
from ..errors import ConfigError
from ..security import database_url


def _settings(profile, config_file) -> dict:
    return hb_config.load(profile, config_file)


def db_option(func):
    return click.option(
        "--db",
        "db_url",
        default=None,
        help="SQLAlchemy URL: sqlite:///FILE or postgresql+psycopg://user@host/db (default: "
        "$HPCBATCH_DB_URL, else config; password from $HPCBATCH_DB_PASSWORD_FILE, mode 600).",
    )(func)


def profile_options(func):
    func = click.option("--config", "config_file", default=None, help="A YAML settings file.")(func)
    return click.option(
        "--profile", default=None, help="stocks-12gb, stocks-19gb, stocks-debug or a file."
    )(func)


@click.group("stocks")
def stocks() -> None:
    """Stock batch prediction: generate, init-db, train, predict, demo."""


@stocks.command("init-db")
@db_option
@profile_options
def init_db_cmd(db_url, profile, config_file) -> None:
    """Create stock_daily and stock_predictions (existing tables are checked, never altered)."""
    from .schema import init_db, make_engine, masked

    url = database_url(db_url, default=_settings(profile, config_file)["stocks"]["db"])
    engine = make_engine(url, create=True)
    created = init_db(engine)
    engine.dispose()
    what = ", ".join(created) if created else "nothing (tables exist and match)"
    click.echo(f"{masked(url)}: created {what}")


@stocks.command()
@db_option
@click.option("--stocks", "n_stocks", type=int, default=500, show_default=True)
@click.option("--days", type=int, default=400, show_default=True, help="Trading days.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--replace", is_flag=True, help="Delete existing bars first.")
@profile_options
def generate(db_url, n_stocks, days, seed, replace, profile, config_file) -> None:
    """Write a synthetic, deterministic market to stock_daily."""
    from .generate import generate_market
    from .schema import make_engine, masked

    url = database_url(db_url, default=_settings(profile, config_file)["stocks"]["db"])
    t0 = time.perf_counter()
    engine = make_engine(url, create=True)
    summary = generate_market(engine, n_stocks, days, seed, replace=replace)
    engine.dispose()
    click.echo(
        f"{masked(url)}: {summary.rows} rows of {summary.stocks} stocks, {summary.first_date}.."
        f"{summary.last_date}, in {time.perf_counter() - t0:.1f} s"
    )


@stocks.command()
@db_option
@click.option("--out", "out_dir", default=None, help="Model directory (default from config).")
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--max-stocks", type=int, default=200, show_default=True)
@click.option("--max-windows", type=int, default=20_000, show_default=True)
@click.option(
    "--model-size",
    type=click.Choice(["full", "small", "tiny"]),
    default="small",
    show_default=True,
    help="full = the ~9M-parameter model of the workload (slow to train on a CPU).",
)
@click.option("--lookback-days", type=int, default=400, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--model-version", default=None, help="Stored with the predictions (default v1).")
@profile_options
def train(
    db_url, out_dir, epochs, max_stocks, max_windows, model_size, lookback_days, seed,
    model_version, profile, config_file,
) -> None:
    """Fit the model on the database and save weights, config and normalisation stats."""
    from .schema import make_engine
    from .train import train as fit

    settings = _settings(profile, config_file)["stocks"]
    url = database_url(db_url, default=settings["db"])
    out_dir = out_dir or settings["model-dir"]
    engine = make_engine(url)
    summary = fit(
        engine, out_dir, epochs=epochs, max_stocks=max_stocks, max_windows=max_windows,
        size=model_size, lookback_days=lookback_days, seed=seed,
        version=model_version or settings["model-version"],
        log=lambda m: click.echo(m, err=True),
    )
    engine.dispose()
    click.echo(
        f"model saved to {summary.out_dir}: {summary.parameters:,} parameters, "
        f"{summary.windows} windows from {summary.stocks} stocks, {summary.epochs} epochs, "
        f"validation loss {summary.val_loss:.4f}, direction accuracy "
        f"{summary.val_direction_accuracy:.1%}, {summary.seconds:.0f} s"
    )


def _cluster_choice(value: str | None) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    if value in ("local", "slurm"):
        return value, None
    if value.startswith(("tcp://", "tls://")) or value.endswith(".json"):
        return "address", value
    raise ConfigError(
        f"--cluster {value!r}: use local, slurm, a scheduler address tcp://host:8786 "
        "or a scheduler file ending in .json"
    )


@stocks.command()
@db_option
@click.option("--model", "model_dir", default=None, help="Model directory (default from config).")
@click.option("--batch-size", type=int, default=None, help="Stocks per chunk (default: planned).")
@click.option("--concurrency", type=int, default=None, help="Parallel database reads (default 4).")
@click.option("--lookback-days", type=int, default=None, help="Rows fetched per stock (400).")
@click.option("--predict-days", type=int, default=None, help="Last trading days predicted (10).")
@click.option(
    "--use-gpu",
    default=None,
    is_flag=False,
    flag_value="true",
    help="--use-gpu (require a GPU), --use-gpu auto (GPU if present), --use-gpu false.",
)
@click.option("--limit", type=int, default=None, help="Predict at most this many stocks.")
@click.option("--offset", type=int, default=None, help="Skip this many stocks (by ts_code).")
@click.option("--model-version", default=None, help="Stored with the predictions (v1).")
@click.option("--cluster", "cluster", default=None, help="local, slurm, or a scheduler address.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (same settings).")
@click.option("--run-id", default=None, help="Name of the run in the ledger (default: derived).")
@click.option("--report-dir", default=None, help="Where run reports go (hpcbatch-reports).")
@click.option("--calibrate/--no-calibrate", default=None, help="Measure the footprint first.")
@click.option(
    "--mem-gb", type=float, default=None,
    help="Use at most this much memory (GB); with --cluster slurm: each worker job's.",
)
@click.option(
    "--cpus", type=int, default=None,
    help="Use at most this many CPUs; with --cluster slurm: each worker job's.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON.")
@click.option("--tls/--no-tls", default=None, help="TLS between client, scheduler and workers.")
@profile_options
def predict(
    db_url, model_dir, batch_size, concurrency, lookback_days, predict_days, use_gpu, limit,
    offset, model_version, cluster, resume, run_id, report_dir, calibrate, mem_gb, cpus,
    as_json, tls, profile, config_file,
) -> None:
    """Predict the last trading days of every stock and upsert them into stock_predictions."""
    from ..resources import detect_resources
    from .predict import PredictOptions
    from .predict import predict as run_predict

    settings = _settings(profile, config_file)
    if tls is not None:
        settings["cluster"]["tls"] = tls
    stock_cfg = settings["stocks"]
    opts = PredictOptions.from_settings(
        stock_cfg,
        batch_size=batch_size, concurrency=concurrency, lookback_days=lookback_days,
        predict_days=predict_days, use_gpu=use_gpu, limit=limit, offset=offset,
        model_version=model_version,
    )
    if mem_gb is not None and mem_gb <= 0:
        raise ConfigError(f"--mem-gb must be positive, got {mem_gb}")
    backend, address = _cluster_choice(cluster)
    # With SLURM workers, --mem-gb/--cpus size each worker job, a new allocation: planned
    # ahead, not checked against this process's (a small driver job's) own allocation.
    worker_jobs = (backend or settings["cluster"].get("backend")) == "slurm"
    resources = detect_resources(
        memory_bytes=None if mem_gb is None else int(mem_gb * 1e9), cpus=cpus,
        plan_ahead=worker_jobs,
    )
    url = database_url(db_url, default=stock_cfg["db"])
    report = run_predict(
        url, model_dir or stock_cfg["model-dir"], settings=settings, options=opts,
        resources=resources, backend=backend, address=address, resume=resume, run_id=run_id,
        report_dir=report_dir, calibrate=calibrate,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
        return
    _echo_outcome(report, url)


def _echo_outcome(report, url: str) -> None:
    from .schema import masked

    meta = report.results_meta or {}
    if report.status == "already-finished":
        click.echo(
            f"nothing new to predict: run {report.run_id} finished earlier with the same bars, "
            f"model and settings; its predictions are in stock_predictions of {masked(url)} "
            "(give --run-id NAME to run again anyway)"
        )
        return
    click.echo(
        f"predictions: {meta.get('predictions', 0)} rows upserted into stock_predictions of "
        f"{masked(url)} ({meta.get('stocks_predicted', 0)} stocks predicted, "
        f"{meta.get('stocks_skipped_short', 0)} skipped with too few rows, "
        f"{meta.get('stocks_missing', 0)} without rows)"
    )
    if report.report_dir:
        click.echo(f"report: {report.report_dir}")


@stocks.command()
@click.option("--dir", "directory", default="hpcbatch-demo", show_default=True)
@click.option("--stocks", "n_stocks", type=int, default=300, show_default=True)
@click.option("--days", type=int, default=400, show_default=True)
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--max-windows", type=int, default=2000, show_default=True)
@click.option(
    "--model-size", type=click.Choice(["full", "small", "tiny"]), default="small",
    show_default=True,
)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(directory, n_stocks, days, epochs, max_windows, model_size, seed) -> None:
    """Generate a market, train a small model and predict it, all under --dir (SQLite)."""
    from .demo import run_demo

    run_demo(
        Path(directory), n_stocks=n_stocks, days=days, epochs=epochs, max_windows=max_windows,
        model_size=model_size, seed=seed, echo=click.echo,
    )
