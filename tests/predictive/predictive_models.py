"""Small Pyro models and fitted guides shared by the predictive tests."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from hpcbatch.predictive import technical


def hierarchical_model(group, n_groups, y=None):
    """Eight-schools-like: global mu, tau; per-group theta; a deterministic site."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("groups", n_groups, dim=-1):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.deterministic("shrinkage", (theta - mu) / tau, event_dim=0)
    with pyro.plate("obs", group.shape[0], dim=-1):
        pyro.sample("y", dist.Normal(theta[..., group], 1.0), obs=y)


def regression_model(x, y=None):
    """Linear regression with a data plate 'data' over the rows of x."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    mean = (x * w.unsqueeze(-2)).sum(-1)
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def fit_autonormal(model, args, kwargs=None, steps=60, seed=0):
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(steps):
        svi.step(*args, **(kwargs or {}))
    return guide


def hierarchical_setup(n_obs=60, n_groups=5, seed=0):
    rng = np.random.default_rng(seed)
    group = torch.from_numpy(rng.integers(0, n_groups, n_obs))
    y = torch.from_numpy(rng.normal(2.0, 2.0, n_obs).astype(np.float32))
    guide = fit_autonormal(hierarchical_model, (group, n_groups, y))
    return guide, (group, n_groups, None)


def regression_setup(n_rows=300, n_features=4, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n_rows, n_features)).astype(np.float32))
    w = torch.arange(1.0, n_features + 1)
    y = (x * w).sum(-1) + torch.from_numpy(rng.normal(size=n_rows).astype(np.float32))
    guide = fit_autonormal(regression_model, (x, y), steps=100)
    return guide, x


def technical_setup(tmp_path, cells=200, features=20, steps=100):
    technical.simulate(cells, features, 2, seed=3, out=tmp_path / "data")
    technical.fit(tmp_path / "data", steps=steps)
    data, guide, mu_mean, mu_sd = technical.load_fit(tmp_path / "data")
    args, kwargs = technical.model_inputs(data, mu_mean, mu_sd, with_counts=False)
    return data, guide, args, kwargs
