"""Fixtures of the fault-injection suite: a small market + model and an undisturbed
baseline run. The helpers they use live in faultkit.py."""

from __future__ import annotations

import pytest
from faultkit import DAYS, N_STOCKS, checksum, fresh_db, prediction_rows, start_stocks


@pytest.fixture(scope="session")
def stock_inputs(tmp_path_factory) -> dict:
    """A SQLite market of 24 stocks x 200 days and a tiny model with fixed weights."""
    import numpy as np
    import torch

    from hpcbatch.stocks.generate import generate_market
    from hpcbatch.stocks.model import SIZES, StockModel, save_model
    from hpcbatch.stocks.schema import make_engine

    base = tmp_path_factory.mktemp("stock-inputs")
    engine = make_engine(f"sqlite:///{base / 'market.db'}", create=True)
    generate_market(engine, N_STOCKS, DAYS, seed=1)
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
    return {"db": base / "market.db", "model": base / "model"}


@pytest.fixture(scope="session")
def stocks_baseline(stock_inputs, tmp_path_factory) -> dict:
    """An undisturbed run: its prediction rows and checksum."""
    import json

    base = tmp_path_factory.mktemp("baseline")
    url = fresh_db(stock_inputs, base)
    proc = start_stocks(url, stock_inputs["model"], base / "reports")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    rows = prediction_rows(url)
    assert rows, "the undisturbed run wrote no predictions"
    return {"rows": rows, "checksum": checksum(rows), "report": json.loads(out.splitlines()[-1])}
