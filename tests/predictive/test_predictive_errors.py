"""Bad input to hpcbatch.predictive.sample: one clear error, nothing half-written."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from predictive_models import (
    fit_autonormal,
    hierarchical_model,
    hierarchical_setup,
    regression_model,
    regression_setup,
)

from hpcbatch.errors import ChunkFailedError, ConfigError, HpcbatchError
from hpcbatch.predictive import sample


@pytest.fixture(scope="module")
def hier():
    return hierarchical_setup()


def test_unknown_return_site_lists_the_real_ones(hier):
    guide, args = hier
    with pytest.raises(ConfigError) as err:
        sample(
            hierarchical_model,
            guide=guide,
            num_samples=4,
            model_args=args,
            return_sites=["theta", "thetta"],
            client="sync",
        )
    message = str(err.value)
    assert "'thetta'" in message
    for real in ("mu", "tau", "theta", "shrinkage", "y"):
        assert real in message


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_samples_must_be_positive(hier, bad):
    guide, args = hier
    with pytest.raises(ConfigError, match="num_samples"):
        sample(hierarchical_model, guide=guide, num_samples=bad, model_args=args, client="sync")


def test_guide_fitted_to_other_data_is_refused(hier):
    guide, _ = hier  # fitted with 5 groups
    other_args = (torch.zeros(10, dtype=torch.long), 7, None)
    with pytest.raises(ConfigError, match="guide"):
        sample(hierarchical_model, guide=guide, num_samples=4, model_args=other_args, client="sync")


def test_guide_of_another_model_is_refused():
    guide, x = regression_setup(n_rows=50)
    group = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ConfigError, match="does not sample|does not match"):
        sample(
            hierarchical_model,
            guide=guide,
            num_samples=4,
            model_args=(group, 3, None),
            client="sync",
        )


def test_split_args_with_different_leading_dimensions():
    guide, x = regression_setup(n_rows=50)
    with pytest.raises(ConfigError, match="different leading dimensions"):
        sample(
            regression_model,
            guide=guide,
            num_samples=4,
            model_args=(x, torch.zeros(49)),
            data_plate="data",
            split_args=("x", "y"),
            client="sync",
        )


def fixed_size_model(x, n_rows):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", n_rows, dim=-1):
        pyro.sample("y", dist.Normal(w * x, 1.0))


def test_split_args_rows_differ_from_plate_size():
    x = torch.randn(40)
    posterior = {"w": torch.randn(6)}
    with pytest.raises(ConfigError, match="40 rows but the model's plate 'data' has size 41"):
        sample(
            fixed_size_model,
            posterior_samples=posterior,
            num_samples=6,
            model_args=(x, 41),
            data_plate="data",
            split_args=("x",),
            client="sync",
        )
    with pytest.raises(ConfigError, match="keeps size 40"):
        sample(
            fixed_size_model,
            posterior_samples=posterior,
            num_samples=6,
            model_args=(x, 40),
            data_plate="data",
            split_args=("x",),
            client="sync",
        )


def local_latent_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(w * x, 1.0))
        pyro.sample("y", dist.Normal(z, 0.5), obs=y)


def _sample_local_latent(x, **source):
    """Sample ``local_latent_model`` split over its data plate; ``source`` is the guide or the draws."""
    return sample(
        local_latent_model,
        **source,
        num_samples=4,
        model_args=(x,),
        return_sites=["y"],
        data_plate="data",
        split_args=("x",),
        client="sync",
    )


def test_plate_with_local_latents_is_refused():
    x = torch.randn(30)
    guide = fit_autonormal(local_latent_model, (x, x + 1), steps=3)
    with pytest.raises(ConfigError, match="local latent variable 'z'"):
        _sample_local_latent(x, guide=guide)


def test_posterior_samples_of_a_local_latent_are_refused():
    x = torch.randn(30)
    posterior = {"w": torch.randn(4), "z": torch.randn(4, 30)}
    with pytest.raises(ConfigError, match="local latent variable 'z' .*posterior_samples"):
        _sample_local_latent(x, posterior_samples=posterior)


def test_unknown_data_plate_names_the_plates():
    guide, x = regression_setup(n_rows=50)
    with pytest.raises(ConfigError, match="no plate named 'cells'.*data"):
        sample(
            regression_model,
            guide=guide,
            num_samples=4,
            model_args=(x,),
            data_plate="cells",
            split_args=("x",),
            client="sync",
        )


def test_existing_out_is_refused_unless_overwrite(hier, tmp_path):
    guide, args = hier
    out = tmp_path / "s.zarr"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists.*overwrite"):
        sample(
            hierarchical_model, guide=guide, num_samples=4, model_args=args, out=out, client="sync"
        )
    assert (out / "keep.txt").read_text() == "mine"
    group = sample(
        hierarchical_model,
        guide=guide,
        num_samples=4,
        model_args=args,
        out=out,
        client="sync",
        overwrite=True,
    )
    assert group["theta"].shape == (4, 5)
    assert not (out / "keep.txt").exists()


def test_out_in_a_missing_or_unwritable_place(hier, tmp_path):
    guide, args = hier
    with pytest.raises(ConfigError, match="does not exist"):
        sample(
            hierarchical_model,
            guide=guide,
            num_samples=4,
            model_args=args,
            out=tmp_path / "no" / "s.zarr",
            client="sync",
        )
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot write|does not exist"):
        sample(
            hierarchical_model,
            guide=guide,
            num_samples=4,
            model_args=args,
            out=tmp_path / "file" / "s.zarr",
            client="sync",
        )
    with pytest.raises(ConfigError, match="cannot (write|create)"):
        sample(
            hierarchical_model,
            guide=guide,
            num_samples=4,
            model_args=args,
            out="/proc/hpcbatch-test.zarr",
            client="sync",
        )


def raises_when_vectorised(x):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    if w.dim() > 0:
        raise ValueError("boom in the vectorised model")
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(w * x, 1.0))


def test_a_model_that_raises_names_the_chunk_and_the_error(tmp_path):
    posterior = {"w": torch.randn(10)}
    out = tmp_path / "s.zarr"
    with pytest.raises(ChunkFailedError) as err:
        sample(
            raises_when_vectorised,
            posterior_samples=posterior,
            num_samples=10,
            model_args=(torch.randn(5),),
            chunk_size=5,
            client="sync",
            out=out,
        )
    assert "chunk c000000" in str(err.value)
    assert "ValueError: boom in the vectorised model" in str(err.value)
    assert err.value.chunk_id == "c000000"
    assert not out.exists()  # nothing half-written


def test_a_model_that_raises_on_the_test_run():
    def broken(x):
        raise KeyError("missing column")

    with pytest.raises(HpcbatchError, match="KeyError"):
        sample(broken, num_samples=3, model_args=(torch.ones(2),), client="sync")


def test_guide_and_posterior_together_and_mismatched_posterior(hier):
    guide, args = hier
    with pytest.raises(ConfigError, match="not both"):
        sample(
            hierarchical_model,
            guide=guide,
            posterior_samples={"mu": torch.zeros(3)},
            num_samples=3,
            model_args=args,
            client="sync",
        )
    with pytest.raises(ConfigError, match="has 3 samples but num_samples is 5"):
        sample(
            hierarchical_model,
            posterior_samples={"mu": torch.zeros(3)},
            num_samples=5,
            model_args=args,
            client="sync",
        )
