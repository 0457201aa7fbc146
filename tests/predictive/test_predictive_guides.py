"""Guides: saved and loaded weights_only-safe; hand-written guides with pyro.param."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from predictive_models import hierarchical_model, hierarchical_setup
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal

from hpcbatch.errors import DataError
from hpcbatch.predictive import sample
from hpcbatch.predictive.guides import load_guide, save_guide
from hpcbatch.predictive.sampling import pyro_seed
from hpcbatch.runner import chunk_seed


def test_autoguide_round_trip_draws_the_same(tmp_path):
    guide, args = hierarchical_setup()
    save_guide(guide, tmp_path / "guide.pt")
    fit_args = (args[0], args[1], torch.zeros(args[0].shape[0]))  # y observed, as in the fit
    fresh = load_guide(AutoNormal(hierarchical_model), tmp_path / "guide.pt", *fit_args)
    assert fresh is not guide
    a = sample(hierarchical_model, guide=guide, num_samples=20, model_args=args, client="sync")
    b = sample(hierarchical_model, guide=fresh, num_samples=20, model_args=args, client="sync")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_saved_guide_of_other_shape_is_refused(tmp_path):
    guide, args = hierarchical_setup(n_groups=5)
    save_guide(guide, tmp_path / "guide.pt")
    other_args = (torch.zeros(4, dtype=torch.long), 6, torch.zeros(4))
    with pytest.raises(DataError, match="does not match this guide .*size mismatch"):
        load_guide(AutoNormal(hierarchical_model), tmp_path / "guide.pt", *other_args)


def scalar_model(n):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", n):
        pyro.sample("x", dist.Normal(loc, 1.0))


def scalar_guide(n):
    mean = pyro.param("mean", torch.tensor(3.0))
    sd = pyro.param("sd", torch.tensor(0.2), constraint=dist.constraints.positive)
    pyro.sample("loc", dist.Normal(mean, sd))


def test_hand_written_guide_with_param_store(tmp_path):
    pyro.clear_param_store()
    scalar_guide(4)
    pyro.param("mean").data.fill_(-7.0)
    save_guide(scalar_guide, tmp_path / "g.pt")
    pyro.clear_param_store()
    scalar_guide(4)  # creates the params (and the constraint) at their initial values
    load_guide(scalar_guide, tmp_path / "g.pt")
    assert float(pyro.param("mean").detach()) == -7.0
    pyro.set_rng_seed(pyro_seed(chunk_seed(0, "c000000")))
    ref = Predictive(scalar_model, guide=scalar_guide, num_samples=30, parallel=True)(4)
    got = sample(
        scalar_model,
        guide=scalar_guide,
        num_samples=30,
        model_args=(4,),
        chunk_size=30,
        client="sync",
    )
    for name in ("loc", "x"):
        np.testing.assert_array_equal(got[name], ref[name].numpy())
    assert abs(got["loc"].mean() + 7.0) < 0.5
    # The caller's param store is left as it was.
    assert float(pyro.param("mean").detach()) == -7.0


def test_guides_travel_to_workers_without_the_data_they_were_built_on():
    import cloudpickle

    from hpcbatch.predictive.sampling import portable_guide

    guide, args = hierarchical_setup()
    big_y = torch.zeros(400_000)
    group = torch.zeros(400_000, dtype=torch.long)
    built = AutoNormal(hierarchical_model)
    built(group, 5, big_y)  # its prototype trace holds the 1.6 MB of observations
    assert len(cloudpickle.dumps(built)) > big_y.numel() * 4
    light = portable_guide(built)
    assert len(cloudpickle.dumps(light)) < 100_000
    assert light is not built and len(cloudpickle.dumps(built)) > big_y.numel() * 4
    pyro.set_rng_seed(0)
    a = Predictive(hierarchical_model, guide=built, num_samples=5, parallel=True)(*args)
    pyro.set_rng_seed(0)
    b = Predictive(hierarchical_model, guide=light, num_samples=5, parallel=True)(*args)
    for name in a:
        assert torch.equal(a[name], b[name])
