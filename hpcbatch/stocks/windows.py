"""60-day windows as zero-copy views, materialised one batch at a time.

Owns: the view of every prediction window of a chunk
(``sliding_window_view`` over the feature array: no copy), the training windows with
their next-day targets, and :func:`iter_batches`, the only place a window is copied
(one contiguous float32 batch on its way into the model).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import ConfigError
from .features import WARMUP_DAYS, WINDOW_DAYS

WINDOW_BYTES = WINDOW_DAYS * 105 * 4


def all_windows(features: np.ndarray, window: int = WINDOW_DAYS) -> np.ndarray:
    """``(stocks, days - window + 1, window, n_features)`` view; window k ends on day k+window-1."""
    view = sliding_window_view(features, window, axis=1)  # (S, W, F, window)
    return view.swapaxes(-1, -2)


def prediction_windows(
    features: np.ndarray, predict_days: int, window: int = WINDOW_DAYS
) -> np.ndarray:
    """The windows ending on each of the last ``predict_days`` days: ``(S, K, window, F)`` view."""
    if predict_days < 1:
        raise ConfigError(f"--predict-days must be at least 1, got {predict_days}")
    view = all_windows(features, window)
    if predict_days > view.shape[1]:
        raise ConfigError(
            f"--predict-days {predict_days} needs at least {predict_days + window - 1} days "
            "per stock: raise --lookback-days or lower --predict-days"
        )
    return view[:, view.shape[1] - predict_days :]


def iter_batches(windows: np.ndarray, batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, contiguous float32 batch)`` over the flattened leading axes.

    ``windows`` is a view of shape ``(..., window, F)``; only ``batch`` windows are ever
    copied at once.
    """
    if batch < 1:
        raise ConfigError(f"inference batch must be at least 1, got {batch}")
    lead = windows.shape[:-2]
    n = int(np.prod(lead)) if lead else 1
    for start in range(0, n, batch):
        idx = np.unravel_index(np.arange(start, min(n, start + batch)), lead)
        yield start, np.ascontiguousarray(windows[idx], dtype=np.float32)


def training_index(n_rows: np.ndarray, width: int, window: int = WINDOW_DAYS) -> np.ndarray:
    """``(stock, window_index)`` pairs of every training window that has a next-day target.

    Windows start after the warm-up of each stock and end at least one day before its
    last row (the next day's features are the target).
    """
    first_start = width - n_rows + WARMUP_DAYS  # first day with full indicators
    n_windows = width - window + 1
    starts = np.arange(n_windows)[None, :]
    ok = (starts >= first_start[:, None]) & (starts + window <= width - 1)
    s, k = np.nonzero(ok)
    return np.stack([s, k], axis=1)
