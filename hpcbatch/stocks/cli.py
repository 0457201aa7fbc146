"""`hpcbatch stocks ...` commands: thin wrappers over the hpcbatch.stocks API.

Reads settings once (``--profile`` / ``--config`` / flags) and passes values down;
every logic step lives in the modules of this package.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from .. import config as hb_config
from ..commands import run_command
from ..security import database_url
from .workload import WORKLOAD


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
@click.option("--strict", is_flag=True, default=None,
              help="Refuse bad bars instead of leaving their stocks out.")  # fmt: skip
@profile_options
def train(
    db_url, out_dir, epochs, max_stocks, max_windows, model_size, lookback_days, seed,
    model_version, strict, profile, config_file,
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
        strict=settings.get("strict", False) if strict is None else strict,
    )
    engine.dispose()
    click.echo(
        f"model saved to {summary.out_dir}: {summary.parameters:,} parameters, "
        f"{summary.windows} windows from {summary.stocks} stocks, {summary.epochs} epochs, "
        f"validation loss {summary.val_loss:.4f}, direction accuracy "
        f"{summary.val_direction_accuracy:.1%}, {summary.seconds:.0f} s"
    )


stocks.add_command(
    run_command(
        WORKLOAD,
        name="predict",
        help="Predict the last trading days of every stock and upsert them into "
        "stock_predictions.",
    )
)


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
