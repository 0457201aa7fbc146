"""Fitting the stock model on the database (single process, seeded).

Owns: gathering training windows (every post-warm-up 60-day window with a next-day
target, sampled up to ``max_windows``), the normalisation statistics (per-feature mean
and std over post-warm-up days, saved beside the weights), and the fit: the model
predicts the next day's features at every step (MSE, with extra weight on the last
step's close change) and its confidence head learns whether the predicted direction is
right (BCE).  A held-out tenth of the windows gives the reported validation figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..report import quarantine_line
from .features import CLOSE_PCT, WARMUP_DAYS, compute_features, min_rows
from .model import ModelConfig, StockModel, model_config, save_model
from .schema import require_tables
from .sink import BarCheck, list_codes, read_bars, read_screened_bars
from .windows import all_windows, training_index


@dataclass(frozen=True)
class TrainSummary:
    out_dir: str
    stocks: int
    windows: int
    epochs: int
    train_loss: float
    val_loss: float
    val_direction_accuracy: float
    seconds: float
    parameters: int
    dropped_stocks: int = 0  # stocks with a bad bar, left out with all their windows
    dropped_windows: int = 0  # the training windows they would have given
    quarantined: tuple = ()  # ({"item": ts_code, "reason": ...}, ...)


@dataclass
class _Dropped:
    """The stocks training leaves out for bad bars (and the stocks with 10x jumps kept)."""

    entries: list = field(default_factory=list)
    windows: int = 0
    jumps: int = 0

    def add(self, check: BarCheck) -> None:
        self.entries.extend(check.quarantined())
        self.jumps += len(check.jumps)
        for n in check.rows.values():
            if n >= min_rows(1) + 1:
                self.windows += len(training_index(np.array([n]), n))

    def say(self, log) -> None:
        if self.entries:
            log(
                f"{quarantine_line(self.entries, 'stock')}: left out of training with "
                f"{self.windows} windows (--strict refuses bad bars instead)"
            )
        if self.jumps:
            log(f"{self.jumps} stock(s) with a 10x close-to-close jump: kept")


def _gather(engine, codes: list[str], lookback_days: int, dropped: _Dropped | None = None):
    """Features of every usable stock and the (stock, window) index of training windows;
    stocks with bad bars go to ``dropped`` (``None``: they are a DataError, ``--strict``)."""
    feats, index, offset = [], [], 0
    for start in range(0, len(codes), 200):
        with engine.connect() as conn:
            if dropped is None:
                bars = read_bars(conn, codes[start : start + 200], lookback_days)
            else:
                bars, check = read_screened_bars(conn, codes[start : start + 200], lookback_days)
                dropped.add(check)
        if not bars.codes:
            continue
        keep = bars.n_rows >= min_rows(1) + 1
        if not keep.any():
            continue
        f = compute_features(bars)[keep]
        idx = training_index(bars.n_rows[keep], f.shape[1])
        idx[:, 0] += offset
        offset += f.shape[0]
        feats.append(f)
        index.append(idx)
    if not feats:
        raise DataError(
            f"no stock has the {min_rows(1) + 1} rows training needs: generate more --days"
        )
    width = max(f.shape[1] for f in feats)
    padded = [np.pad(f, ((0, 0), (width - f.shape[1], 0), (0, 0)), mode="edge") for f in feats]
    for idx, f in zip(index, feats, strict=True):
        idx[:, 1] += width - f.shape[1]
    return np.concatenate(padded), np.concatenate(index)


def _norm_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    body = features[:, WARMUP_DAYS:].reshape(-1, features.shape[-1]).astype(np.float64)
    mean = body.mean(axis=0)
    std = body.std(axis=0)
    std = np.where(std < 1e-3, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def train(
    engine,
    out_dir: str | Path,
    *,
    epochs: int = 3,
    max_stocks: int = 200,
    max_windows: int = 20_000,
    size: str | ModelConfig = "small",
    lookback_days: int = 400,
    batch: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    version: str = "v1",
    log=print,
    strict: bool = False,
) -> TrainSummary:
    """Fit a model on up to ``max_stocks`` stocks of ``engine`` and save it to ``out_dir``.

    A stock with a bad bar (NaN/inf/zero/negative price, high < low, a duplicate row) is
    left out with its windows and named through ``log``; ``strict`` refuses it instead
    (DataError)."""
    for name, value in (("--epochs", epochs), ("--max-stocks", max_stocks), ("--max-windows", max_windows)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    t0 = time.perf_counter()
    config = model_config(size) if isinstance(size, str) else size
    rng = np.random.default_rng(seed)
    dropped = None if strict else _Dropped()
    data = _training_data(engine, config, max_stocks, lookback_days, max_windows, rng, dropped)
    codes, views, mean, std, train_idx, val_idx = data
    n_dropped = len(dropped.entries) if dropped is not None else 0
    if dropped is not None:
        dropped.say(log)
    torch.manual_seed(seed)
    model = StockModel(config)
    loss_of = _loss_function(model, views)
    train_loss = _fit(model, loss_of, train_idx, epochs, batch, lr, rng, log)
    model.eval()
    with torch.no_grad():
        val_loss, val_acc = loss_of(val_idx)
    info = {
        "version": version,
        "trained_stocks": len(codes) - n_dropped,
        "trained_windows": int(len(train_idx)),
        "epochs": epochs,
        "seed": seed,
        "val_loss": float(val_loss),
        "val_direction_accuracy": float(val_acc),
    }
    save_model(model, out_dir, mean, std, info)
    return TrainSummary(
        out_dir=str(out_dir),
        stocks=len(codes) - n_dropped,
        windows=int(len(train_idx)),
        epochs=epochs,
        train_loss=train_loss,
        val_loss=float(val_loss),
        val_direction_accuracy=float(val_acc),
        seconds=round(time.perf_counter() - t0, 2),
        parameters=sum(p.numel() for p in model.parameters()),
        dropped_stocks=n_dropped,
        dropped_windows=dropped.windows if dropped else 0,
        quarantined=tuple(dropped.entries) if dropped else (),
    )


def _training_data(engine, config, max_stocks, lookback_days, max_windows, rng, dropped) -> tuple:
    """Codes, the normalised windows (a view) and the train/validation window indices."""
    require_tables(engine, "stock_daily")
    codes = list_codes(engine)
    if not codes:
        raise DataError("stock_daily holds no stocks: run 'hpcbatch stocks generate' first")
    step = max(1, len(codes) // max_stocks)
    codes = codes[::step][:max_stocks]
    features, index = _gather(engine, codes, lookback_days, dropped)
    mean, std = _norm_stats(features)
    features = (features - mean) / std
    views = all_windows(features, config.window + 1)  # window plus its next day: a view
    index = index[rng.permutation(len(index))[:max_windows]]
    n_val = max(1, len(index) // 10)
    val_idx, train_idx = index[:n_val], index[n_val:]
    if len(train_idx) == 0:
        raise DataError("too few training windows: generate more stocks or days")
    return codes, views, mean, std, train_idx, val_idx


def _loss_function(model, views):
    """``loss_of(idx) -> (loss, direction accuracy)`` over the windows ``idx``."""
    bce = nn.BCELoss()

    def loss_of(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(np.ascontiguousarray(views[idx[:, 0], idx[:, 1]], dtype=np.float32))
        x, y = w[:, :-1], w[:, 1:]
        out, conf = model(x)
        last_pred, last_true = out[:, -1, CLOSE_PCT], y[:, -1, CLOSE_PCT]
        mse = ((out - y) ** 2).mean() + 4 * ((last_pred - last_true) ** 2).mean()
        correct = ((last_pred > 0) == (last_true > 0)).float()
        return mse + 0.1 * bce(conf, correct), correct.mean()

    return loss_of


def _fit(model, loss_of, train_idx, epochs, batch, lr, rng, log) -> float:
    """AdamW over shuffled mini-batches; the last epoch's mean training loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    train_loss = float("nan")
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(train_idx))
        total, count = 0.0, 0
        for start in range(0, len(order), batch):
            loss, _ = loss_of(train_idx[order[start : start + batch]])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += float(loss.detach()) * min(batch, len(order) - start)
            count += min(batch, len(order) - start)
        train_loss = total / count
        log(f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}")
    return train_loss
