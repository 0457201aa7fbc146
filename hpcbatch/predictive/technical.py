"""The built-in negative-binomial "technical" model, its simulator and its fit.

The model of REFERENCE.md section 2 (bayesDREAM ``fit_technical``), for N cells,
T features and C technical groups (group 0 is the baseline, its alpha fixed at 1):

- ``log2_alpha_y ~ StudentT(3, 0, 20)``, shape [C-1, T] (plate ``groups`` dim -2 x
  ``features`` dim -1); ``alpha_y`` [C, T] = [1, 2 ** log2_alpha_y] (deterministic);
- ``mu_ntc ~ Gamma(m^2/s^2, m/s^2)`` [T] from the per-feature mean ``m`` and sd ``s``
  of the size-factor-normalised counts;
- ``beta_o ~ Gamma(9, 3)``; ``o_y ~ Exponential(beta_o)`` [T]; ``phi_y = 1 / o_y^2``;
- ``y ~ NegativeBinomial(total_count=phi_y, logits=log(mu_ntc * alpha_y[group] *
  sum_factor) - log(phi_y))`` in the plate ``cells`` (dim -2) x ``features`` (dim -1).

A data directory (``simulate``) holds ``counts.npy`` (float32 [N, T], memory-mapped
when read), ``group.npy``, ``sum_factor.npy``, ``truth.npz`` and ``meta.json``; ``fit``
adds ``fit/guide.pt`` (the AutoNormal state dict, loadable with ``weights_only=True``),
``fit/prior.npz``, ``fit/elbo.png`` and ``fit/fit.json``.

Does not sample the posterior predictive: that is :mod:`hpcbatch.predictive.sampling`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_value

from ..config import require_positive
from ..errors import ConfigError, DataError
from ..security import load_weights

LATENT_SITES = ("alpha_y", "mu_ntc", "phi_y")
OBSERVED_SITE = "y"
DATA_PLATE = "cells"
SPLIT_ARGS = ("group", "sum_factor", "counts")


def technical_model(
    group: torch.Tensor,
    sum_factor: torch.Tensor,
    counts: torch.Tensor | None = None,
    *,
    mu_mean: torch.Tensor,
    mu_sd: torch.Tensor,
    n_groups: int,
) -> None:
    """The negative-binomial technical model; ``counts=None`` draws the observations."""
    n_cells = group.shape[0]
    n_features = mu_mean.shape[-1]
    beta_o = pyro.sample("beta_o", dist.Gamma(torch.tensor(9.0), torch.tensor(3.0)))
    features = pyro.plate("features", n_features, dim=-1)
    with features:
        if n_groups > 1:
            with pyro.plate("groups", n_groups - 1, dim=-2):
                log2_alpha_y = pyro.sample(
                    "log2_alpha_y",
                    dist.StudentT(torch.tensor(3.0), torch.tensor(0.0), torch.tensor(20.0)),
                )
        mu_ntc = pyro.sample("mu_ntc", dist.Gamma(mu_mean**2 / mu_sd**2, mu_mean / mu_sd**2))
        o_y = pyro.sample("o_y", dist.Exponential(beta_o))
        phi_y = pyro.deterministic("phi_y", 1.0 / o_y**2, event_dim=0)
    if n_groups > 1:
        ones = torch.ones_like(log2_alpha_y[..., :1, :])
        alpha_y = torch.cat([ones, torch.exp2(log2_alpha_y)], dim=-2)
    else:
        alpha_y = torch.ones_like(mu_ntc).unsqueeze(-2)
    with pyro.plate("all_groups", n_groups, dim=-2), features:
        alpha_y = pyro.deterministic("alpha_y", alpha_y, event_dim=0)
    # log(mu * alpha[group] * sf) - log(phi), summed in log space: two [.., N, T] temporaries.
    log_alpha = torch.log(alpha_y)[..., group, :]
    per_feature = torch.log(mu_ntc) - torch.log(phi_y)
    logits = (log_alpha + torch.log(sum_factor).unsqueeze(-1)) + per_feature
    with pyro.plate(DATA_PLATE, n_cells, dim=-2), features:
        pyro.sample(
            OBSERVED_SITE,
            dist.NegativeBinomial(total_count=phi_y, logits=logits),
            obs=counts,
        )


# ------------------------------------------------------------- data dir ----


@dataclass(frozen=True)
class TechnicalData:
    """A data directory's arrays; ``counts`` is memory-mapped (no copy)."""

    path: Path
    counts: np.ndarray
    group: np.ndarray
    sum_factor: np.ndarray
    n_groups: int

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.counts.shape[1])


def _load_array(file: Path, **kwargs) -> np.ndarray:
    """``np.load`` without pickles: an object array or a damaged file is one clear error."""
    try:
        array = np.load(file, allow_pickle=False, **kwargs)
    except (ValueError, OSError, EOFError) as exc:
        reason = (
            "it holds Python objects (pickles are refused)"
            if "allow_pickle" in str(exc)
            else str(exc)
        )
        raise DataError(
            f"{file} is not a plain numeric .npy array ({reason}): "
            "rewrite it with numpy.save of a numeric array, or 'hpcbatch predictive simulate'"
        ) from None
    return array


def load_data(path: str | Path) -> TechnicalData:
    """Open a data directory written by :func:`simulate` (or by hand, same files)."""
    path = Path(path)
    files = [path / name for name in ("counts.npy", "group.npy", "sum_factor.npy")]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise DataError(
            f"{path} is not a predictive data directory (missing {', '.join(missing)}): "
            "create one with 'hpcbatch predictive simulate --out DIR'"
        )
    counts = _load_array(files[0], mmap_mode="r")
    group = _load_array(files[1]).astype(np.int64)
    sum_factor = _load_array(files[2]).astype(np.float32)
    if counts.ndim != 2 or group.shape != (counts.shape[0],) or sum_factor.shape != group.shape:
        raise DataError(
            f"{path}: counts must be [N, T] and group, sum_factor [N]; got {counts.shape}, "
            f"{group.shape}, {sum_factor.shape}"
        )
    n_groups = int(group.max()) + 1
    meta_file = path / "meta.json"
    if meta_file.exists():
        n_groups = max(n_groups, int(json.loads(meta_file.read_text()).get("groups", n_groups)))
    return TechnicalData(path, counts, group, sum_factor, n_groups)


def simulate(
    cells: int, features: int, groups: int = 2, *, seed: int = 0, out: str | Path
) -> TechnicalData:
    """Draw counts from the model with known true parameters and write a data directory.

    The truth is drawn from plausible ranges rather than the vague priors (a
    StudentT(3, 0, 20) log2 fold change would be absurd): ``mu_ntc`` LogNormal(log 5, 1),
    ``log2_alpha_y`` Normal(0, 0.5), ``phi_y`` LogNormal(log 5, 0.5), sum factors
    LogNormal(0, 0.2) rescaled to mean 1.  Written row block by row block, so N x T may
    exceed memory.
    """
    for name, value in (("cells", cells), ("features", features), ("groups", groups)):
        require_positive(f"--{name}", value)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mu = rng.lognormal(math.log(5.0), 1.0, features).astype(np.float32)
    log2_alpha = rng.normal(0.0, 0.5, (groups - 1, features)).astype(np.float32)
    alpha = np.concatenate([np.ones((1, features), np.float32), np.exp2(log2_alpha)])
    phi = rng.lognormal(math.log(5.0), 0.5, features).astype(np.float32)
    group = rng.integers(0, groups, cells).astype(np.int64)
    sum_factor = rng.lognormal(0.0, 0.2, cells)
    sum_factor = (sum_factor / sum_factor.mean()).astype(np.float32)
    counts = np.lib.format.open_memmap(
        out / "counts.npy", mode="w+", dtype=np.float32, shape=(cells, features)
    )
    block = max(1, 2**24 // features)
    for start in range(0, cells, block):
        stop = min(cells, start + block)
        mean = mu * alpha[group[start:stop]] * sum_factor[start:stop, None]
        # NB(phi, p) as a Gamma-Poisson mixture with mean `mean`.
        rate = rng.gamma(phi, mean / phi)
        counts[start:stop] = rng.poisson(rate)
    counts.flush()
    del counts
    np.save(out / "group.npy", group)
    np.save(out / "sum_factor.npy", sum_factor)
    np.savez(out / "truth.npz", mu_ntc=mu, alpha_y=alpha, phi_y=phi, log2_alpha_y=log2_alpha)
    meta = {"cells": cells, "features": features, "groups": groups, "seed": seed}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return load_data(out)


def prior_moments(data: TechnicalData) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and sd of the size-factor-normalised counts (the mu_ntc prior)."""
    total = np.zeros(data.n_features, np.float64)
    total_sq = np.zeros(data.n_features, np.float64)
    block = max(1, 2**24 // data.n_features)
    for start in range(0, data.n_cells, block):
        rows = np.asarray(data.counts[start : start + block], np.float64)
        rows /= data.sum_factor[start : start + block, None]
        total += rows.sum(0)
        total_sq += (rows**2).sum(0)
    mean = total / data.n_cells
    sd = np.sqrt(np.maximum(total_sq / data.n_cells - mean**2, 0.0))
    return np.maximum(mean, 1e-3).astype(np.float32), np.maximum(sd, 1e-3).astype(np.float32)


def model_inputs(
    data: TechnicalData, mu_mean: np.ndarray, mu_sd: np.ndarray, *, with_counts: bool
) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for :func:`technical_model` over the data directory's arrays.

    ``counts`` is a tensor over the memory-mapped file (``torch.from_numpy``, no copy).
    """
    counts = _readonly_tensor(data.counts) if with_counts else None
    args = (torch.from_numpy(data.group), torch.from_numpy(data.sum_factor), counts)
    kwargs = {
        "mu_mean": torch.from_numpy(mu_mean),
        "mu_sd": torch.from_numpy(mu_sd),
        "n_groups": data.n_groups,
    }
    return args, kwargs


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only (memory-mapped) array, without a copy or a warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def sensible_init(mu_mean: np.ndarray, n_groups: int) -> dict:
    """Initial guide locations from the data: mu at its moment estimate, no fold change."""
    features = mu_mean.shape[0]
    values = {
        "mu_ntc": torch.from_numpy(mu_mean).clone(),
        "beta_o": torch.tensor(3.0),
        "o_y": torch.full((features,), 0.4),
    }
    if n_groups > 1:
        values["log2_alpha_y"] = torch.zeros(n_groups - 1, features)
    return values


def make_guide(mu_mean: np.ndarray, n_groups: int) -> AutoNormal:
    return AutoNormal(
        technical_model,
        init_loc_fn=init_to_value(values=sensible_init(mu_mean, n_groups)),
        init_scale=0.05,
    )


def setup_guide(guide: AutoNormal, data: TechnicalData, mu_mean, mu_sd) -> AutoNormal:
    """Build the guide's parameters from a one-cell slice (cheap at any N)."""
    args, kwargs = model_inputs(data, mu_mean, mu_sd, with_counts=True)
    from .guides import build_guide

    # Copies, not views: the guide's prototype trace keeps these arguments.
    return build_guide(guide, *(a[:1].clone() for a in args), **kwargs)


# ------------------------------------------------------------------ fit ----


@dataclass(frozen=True)
class FitResult:
    path: Path
    steps: int
    final_elbo_loss: float
    wall_time_s: float


def fit(
    path: str | Path,
    *,
    steps: int = 1500,
    max_lr: float = 0.05,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> FitResult:
    """SVI with AutoNormal and Adam under a one-cycle learning rate; saves ``fit/``.

    Full-batch: every step sees all cells (the counts are read into memory once).
    """
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    data = load_data(path)
    mu_mean, mu_sd = prior_moments(data)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = setup_guide(make_guide(mu_mean, data.n_groups), data, mu_mean, mu_sd)
    optim = pyro.optim.OneCycleLR(
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": max_lr / 25},
            "max_lr": max_lr,
            "total_steps": steps,
        }
    )
    svi = SVI(technical_model, guide, optim, Trace_ELBO())
    args, kwargs = model_inputs(data, mu_mean, mu_sd, with_counts=True)
    counts_t = torch.as_tensor(np.asarray(data.counts))
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        loss = svi.step(args[0], args[1], counts_t, **kwargs)
        optim.step()
        losses.append(float(loss))
        if progress is not None:
            progress(step + 1, float(loss))
    elapsed = time.perf_counter() - start
    fit_dir = Path(path) / "fit"
    fit_dir.mkdir(exist_ok=True)
    torch.save(guide.state_dict(), fit_dir / "guide.pt")
    np.savez(fit_dir / "prior.npz", mu_mean=mu_mean, mu_sd=mu_sd)
    _plot_elbo(losses, fit_dir / "elbo.png")
    info = {
        "steps": steps,
        "max_lr": max_lr,
        "seed": seed,
        "final_loss": losses[-1],
        "wall_time_s": elapsed,
    }
    (fit_dir / "fit.json").write_text(json.dumps(info, indent=2))
    return FitResult(fit_dir, steps, losses[-1], elapsed)


def _plot_elbo(losses: list[float], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8)
    ax.set_yscale("symlog")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("-ELBO")
    ax.set_title("technical model fit")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def load_fit(path: str | Path) -> tuple[TechnicalData, AutoNormal, np.ndarray, np.ndarray]:
    """The data directory and its fitted guide (state loaded with ``weights_only=True``)."""
    data = load_data(path)
    fit_dir = Path(path) / "fit"
    if not (fit_dir / "guide.pt").exists():
        raise DataError(
            f"{path} has no fitted guide (fit/guide.pt): run 'hpcbatch predictive fit {path}'"
        )
    prior = np.load(fit_dir / "prior.npz")
    mu_mean, mu_sd = prior["mu_mean"], prior["mu_sd"]
    if mu_mean.shape != (data.n_features,):
        raise DataError(
            f"{fit_dir} was fitted to {mu_mean.shape[0]} features but {path} has "
            f"{data.n_features}: the fit does not match the data; refit with "
            f"'hpcbatch predictive fit {path}'"
        )
    guide = setup_guide(make_guide(mu_mean, data.n_groups), data, mu_mean, mu_sd)
    state = load_weights(
        fit_dir / "guide.pt",
        what="fitted guide",
        fix=f"refit with 'hpcbatch predictive fit {path}'",
    )
    try:
        guide.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(
            f"{fit_dir / 'guide.pt'} does not match the data in {path} "
            f"({str(exc).splitlines()[0]}): refit with 'hpcbatch predictive fit {path}'"
        ) from None
    return data, guide, mu_mean, mu_sd


def recovery(path: str | Path, num_samples: int = 400, seed: int = 0) -> dict[str, dict]:
    """How well the fit recovered the simulated truth, per latent site.

    ``correlation``: Pearson correlation of log posterior mean with log truth (alpha_y
    without the baseline row, which is fixed at 1); ``coverage``: the share of true
    values inside the central 95 % posterior interval.
    """
    from pyro.infer import Predictive

    truth_file = Path(path) / "truth.npz"
    if not truth_file.exists():
        raise DataError(f"{path} has no truth.npz: recovery needs simulated data")
    truth = np.load(truth_file)
    data, guide, mu_mean, mu_sd = load_fit(path)
    args, kwargs = model_inputs(data, mu_mean, mu_sd, with_counts=False)
    one_cell = tuple(a[:1] if a is not None else None for a in args)
    with pyro.util.optional(torch.random.fork_rng(), True):
        pyro.set_rng_seed(seed)
        draws = Predictive(
            technical_model,
            guide=guide,
            num_samples=num_samples,
            return_sites=list(LATENT_SITES),
            parallel=True,
        )(*one_cell, **kwargs)
    result = {}
    for name in LATENT_SITES:
        values = draws[name].numpy().reshape(num_samples, -1)
        true = np.asarray(truth[name]).reshape(-1)
        if name == "alpha_y":
            values, true = values[:, data.n_features :], true[data.n_features :]
        if true.size == 0:
            continue
        low, high = np.quantile(values, [0.025, 0.975], axis=0)
        corr = np.corrcoef(np.log(values.mean(0)), np.log(true))[0, 1]
        result[name] = {
            "correlation": float(corr),
            "coverage": float(np.mean((true >= low) & (true <= high))),
        }
    return result
