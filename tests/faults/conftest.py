"""Fixtures of the fault-injection suite: a small market + model and an undisturbed
baseline run. The helpers they use live in faultkit.py."""

from __future__ import annotations

import pytest
from faultkit import (
    DAYS,
    N_STOCKS,
    checksum,
    fresh_db,
    make_stock_inputs,
    prediction_rows,
    start_stocks,
)


@pytest.fixture(scope="session")
def stock_inputs(tmp_path_factory) -> dict:
    """A SQLite market of 24 stocks x 200 days and a tiny model with fixed weights."""
    return make_stock_inputs(tmp_path_factory.mktemp("stock-inputs"), N_STOCKS, DAYS)


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
