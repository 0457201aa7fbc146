"""Helpers of the fault-injection suite: start a real run, wait until it is half way,
break it, and compare what landed with an undisturbed run.

A module of its own name (not ``conftest``): ``from conftest import ...`` picks whichever
conftest was imported first when several test directories are collected together."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).parent
PYTHON = sys.executable
HPCBATCH = str(Path(sys.executable).with_name("hpcbatch"))  # the CLI of this venv
N_STOCKS = 24
DAYS = 200
BATCH = 2  # stocks per chunk -> 12 chunks


def fault_env(**faults) -> dict:
    """The environment of a driver whose workers load the fault injector."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCBATCH_FAULT", "SLURM_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["DASK_DISTRIBUTED__WORKER__PRELOAD"] = '["inject"]'
    env["PYTHONWARNINGS"] = "ignore"
    env.update({f"HPCBATCH_FAULT_{k.upper()}": str(v) for k, v in faults.items()})
    return env


def make_stock_inputs(base: Path, n_stocks: int, days: int, url: str | None = None) -> dict:
    """A synthetic market of ``n_stocks`` x ``days`` (seed 1) and a tiny model with fixed
    weights (torch seed 0) in ``base / "model"``.  The market goes to the SQLite file
    ``base / "market.db"``, or to the database ``url`` if given; ``{"db", "model"}``
    (``db`` the SQLite path, or ``url``)."""
    import numpy as np
    import torch

    from hpcbatch.stocks.generate import generate_market
    from hpcbatch.stocks.model import SIZES, StockModel, save_model
    from hpcbatch.stocks.schema import make_engine

    base.mkdir(parents=True, exist_ok=True)
    db = base / "market.db" if url is None else url
    engine = make_engine(f"sqlite:///{db}" if url is None else url, create=True)
    generate_market(engine, n_stocks, days, seed=1)
    engine.dispose()
    torch.manual_seed(0)
    config = SIZES["tiny"]
    save_model(
        StockModel(config),
        base / "model",
        np.zeros(config.n_features, np.float32),
        np.ones(config.n_features, np.float32),
        {},
    )
    return {"db": db, "model": base / "model"}


def fresh_db(stock_inputs: dict, directory: Path) -> str:
    """A copy of the market database (no predictions yet); its SQLAlchemy URL."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "stocks.db"
    shutil.copy(stock_inputs["db"], target)
    return f"sqlite:///{target}"


def _sqlite_path(url: str) -> str:
    return url.split("sqlite:///", 1)[1]


def query(url: str, sql: str) -> list[tuple]:
    """Rows of a constant query, read-only for SQLite, through SQLAlchemy otherwise."""
    if url.startswith("sqlite"):
        con = sqlite3.connect(f"file:{_sqlite_path(url)}?mode=ro", uri=True, timeout=5)
        try:
            return [tuple(r) for r in con.execute(sql).fetchall()]
        finally:
            con.close()
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql)).fetchall()]
    finally:
        engine.dispose()


def prediction_rows(url: str) -> list[tuple]:
    """Every prediction, sorted; prediction time and run id left out (they differ per run);
    booleans as 0/1 so SQLite and PostgreSQL compare equal."""
    rows = query(
        url,
        "SELECT ts_code, trade_date, model_version, predicted_return, predicted_direction, "
        "confidence, predicted_return_3d FROM stock_predictions "
        "ORDER BY ts_code, trade_date, model_version",
    )
    return [tuple(int(v) if isinstance(v, bool) else v for v in r) for r in rows]


def checksum(rows: list[tuple]) -> str:
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def ledger_chunk_ids(url: str) -> list[str]:
    """Every chunk id the ledger holds, duplicates kept (for the exactly-once checks);
    raises if the database or its tables are not there."""
    return [r[0] for r in query(url, "SELECT chunk_id FROM hpcbatch_chunks")]


def done_ids(url: str) -> set[str]:
    """Chunk ids the ledger has recorded as done (empty before the tables exist)."""
    try:
        return set(ledger_chunk_ids(url))
    except Exception:  # noqa: BLE001 (no table yet, or the server is down)
        return set()


def done_chunks(url: str) -> int:
    return len(done_ids(url))


def fitted_data(directory: Path, cells: int, features: int) -> Path:
    """``directory / "data"``: a simulated predictive data set (2 groups, seed 0) with a
    20-step fit, ready for ``hpcbatch predictive sample``."""
    from hpcbatch.predictive.technical import fit, simulate

    data = directory / "data"
    simulate(cells, features, 2, seed=0, out=data)
    fit(data, steps=20, seed=0)
    return data


def start_stocks(url: str, model: Path, reports: Path, *extra: str, **faults) -> subprocess.Popen:
    cmd = [PYTHON, str(HERE / "drive_stocks.py"), url, str(model), str(reports), *extra]
    return subprocess.Popen(
        cmd, env=fault_env(**faults), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"driver ended before {what}: {proc.returncode}\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def dask_workers(driver_pid: int) -> list[psutil.Process]:
    """The worker processes of a driver's local cluster (started by its in-process nannies)."""
    workers = []
    for child in psutil.Process(driver_pid).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            # spawned, or forked by the forkserver (itself a child of the driver)
            forked = "forkserver" in cmd and child.ppid() != driver_pid
            if "spawn_main" in cmd or forked:
                workers.append(child)
        except psutil.Error:
            continue
    return workers


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a driver and everything it started (nannies, workers)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    for p in [psutil.Process(proc.pid), *family] if proc.poll() is None else family:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
