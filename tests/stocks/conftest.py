"""Fixtures of the stock tests: a small synthetic market in SQLite and a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hpcbatch.stocks.generate import generate_market
from hpcbatch.stocks.model import SIZES, StockModel, save_model
from hpcbatch.stocks.schema import make_engine

N_STOCKS = 20
N_DAYS = 150


def make_market(url: str, stocks: int = N_STOCKS, days: int = N_DAYS, seed: int = 7):
    engine = make_engine(url, create=True)
    summary = generate_market(engine, stocks, days, seed)
    return engine, summary


def make_model(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = StockModel(SIZES[size])
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 0.1, 105).astype(np.float32)
    std = rng.uniform(0.2, 1.0, 105).astype(np.float32)
    save_model(model, out, mean, std, {"version": "vtest"})
    return out


@pytest.fixture(scope="session")
def market_url(tmp_path_factory) -> str:
    """SQLite URL of a 20-stock x 150-day market (read-only for tests: copy to write)."""
    path = tmp_path_factory.mktemp("market") / "stocks.db"
    url = f"sqlite:///{path}"
    engine, _ = make_market(url)
    engine.dispose()
    return url


@pytest.fixture
def market_copy(market_url, tmp_path) -> str:
    """A private copy of the market database."""
    src = Path(market_url.removeprefix("sqlite:///"))
    dst = tmp_path / "stocks.db"
    dst.write_bytes(src.read_bytes())
    return f"sqlite:///{dst}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def market_factory():
    """``make_market(url, stocks, days, seed)`` for tests that need their own database."""
    return make_market
