"""core.vectorized_draw: Predictive's vectorised run without its two unvectorised ones."""

from __future__ import annotations

import functools

import pyro
import pyro.poutine as poutine
import pytest
import torch
from predictive_models import technical_setup
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample
from pyro.infer.predictive import _guess_max_plate_nesting

from hpcbatch.predictive import core
from hpcbatch.predictive import technical as tech

SITES = ["alpha_y", "mu_ntc", "phi_y", "y"]


@pytest.fixture(scope="module")
def tech_fit(tmp_path_factory):
    return technical_setup(tmp_path_factory.mktemp("tech"), cells=120, features=30, steps=20)


def _layout(guide, args, kwargs, n):
    return core.inspect_model(
        tech.technical_model, guide=guide, posterior=None, num_samples=n, model_args=args,
        model_kwargs=kwargs, return_sites=SITES, data_plate=tech.DATA_PLATE,
        split_args=tech.SPLIT_ARGS,
    )  # fmt: skip


def _rows(layout, args, kwargs, start, stop):
    return core.slice_rows(
        args, kwargs, layout.split_positions, layout.split_names, start, stop
    )


def test_vectorized_draw_is_predictives_vectorised_run(tech_fit):
    """From the RNG state Predictive reaches after its two shape-guessing runs, the lean
    draw returns exactly what Predictive returns: same values, shapes and dtypes."""
    _, guide, args, kwargs = tech_fit
    n = 6
    layout = _layout(guide, args, kwargs, n)
    assert layout.max_plate_nesting == 2
    posterior = core.guide_draw(guide, n, args, kwargs)
    block_args, block_kwargs = _rows(layout, args, kwargs, 40, 75)

    pyro.set_rng_seed(123)
    ref = core.predictive_draw(
        tech.technical_model, guide=None, posterior=posterior, num_samples=n,
        model_args=block_args, model_kwargs=block_kwargs, return_sites=layout.names,
    )  # fmt: skip

    pyro.set_rng_seed(123)
    guessing = InitMessenger(init_to_sample)(
        torch.no_grad()(poutine.mask(tech.technical_model, mask=False))
    )
    _guess_max_plate_nesting(guessing, block_args, block_kwargs)  # what Predictive runs first
    poutine.trace(guessing).get_trace(*block_args, **block_kwargs)  # ... and second
    got = core.vectorized_draw(
        tech.technical_model, posterior=posterior, num_samples=n, model_args=block_args,
        model_kwargs=block_kwargs, layout=layout, rows=35,
    )  # fmt: skip
    assert set(got) == set(ref)
    for name in SITES:
        assert got[name].shape == ref[name].shape, name
        assert got[name].dtype == ref[name].dtype
        assert torch.equal(got[name], ref[name]), name
    assert got["y"].shape == (n, 35, 30)


def test_blocks_run_the_model_once_each_and_one_block_stays_predictive(tech_fit):
    """Several blocks: one model run per block (Predictive runs it three times); one
    block covering every row keeps Predictive's own call (bit-identical to it)."""
    _, guide, args, kwargs = tech_fit
    n = 4
    layout = _layout(guide, args, kwargs, n)
    posterior = core.guide_draw(guide, n, args, kwargs)
    calls = []

    def counted(*a, **k):
        calls.append(a[0].shape[0])
        return tech.technical_model(*a, **k)

    blocks = list(core.draw_blocks(
        counted, posterior=posterior, num_samples=n, model_args=args, model_kwargs=kwargs,
        layout=layout, block=50,
    ))  # fmt: skip
    assert [(b[0], b[1]) for b in blocks] == [(0, 50), (50, 100), (100, 120)]
    assert calls == [50, 50, 20]
    y = torch.cat([b[2]["y"] for b in blocks], dim=1)
    assert y.shape == (n, 120, 30) and torch.all(y >= 0)
    for name in ("alpha_y", "mu_ntc", "phi_y"):  # latents: the posterior's, in every block
        assert all(torch.equal(b[2][name], blocks[0][2][name]) for b in blocks)

    calls.clear()  # a block drawn 20 rows at a time: the same rows, each drawn once
    pieces = list(core.draw_blocks(
        counted, posterior=posterior, num_samples=n, model_args=args, model_kwargs=kwargs,
        layout=layout, block=50, draw_rows=20,
    ))  # fmt: skip
    assert calls == [20, 20, 10, 20, 20, 10, 20]
    assert [(b[0], b[1]) for b in pieces] == [(0, 50), (50, 100), (100, 120)]
    assert torch.cat([b[2]["y"] for b in pieces], dim=1).shape == (n, 120, 30)
    assert all(torch.equal(b[2]["mu_ntc"], blocks[0][2]["mu_ntc"]) for b in pieces)

    calls.clear()
    pyro.set_rng_seed(5)
    (one,) = core.draw_blocks(
        counted, posterior=posterior, num_samples=n, model_args=args, model_kwargs=kwargs,
        layout=layout, block=120,
    )  # fmt: skip
    assert len(calls) == 3  # Predictive's two unvectorised runs + the vectorised one
    pyro.set_rng_seed(5)
    ref = core.predictive_draw(
        tech.technical_model, guide=None, posterior=posterior, num_samples=n,
        model_args=args, model_kwargs=kwargs, return_sites=layout.names,
    )  # fmt: skip
    assert torch.equal(one[2]["y"], ref["y"])


def test_vectorized_guide_draw_is_predictives_vectorised_guide_run(tech_fit):
    """The guide's lean draw (estimate_draw's test draws) returns, from the RNG state
    Predictive reaches after its two shape-guessing runs of the guide, exactly the
    guide draws Predictive returns."""
    _, guide, args, kwargs = tech_fit
    n = 5
    layout = _layout(guide, args, kwargs, n)

    pyro.set_rng_seed(7)
    ref = core.guide_draw(guide, n, args, kwargs)

    pyro.set_rng_seed(7)
    guessing = InitMessenger(init_to_sample)(torch.no_grad()(poutine.mask(guide, mask=False)))
    _guess_max_plate_nesting(guessing, args, kwargs)
    poutine.trace(guessing).get_trace(*args, **kwargs)
    got = core.vectorized_guide_draw(guide, n, args, kwargs, layout)
    assert set(got) == set(ref)
    for name, value in ref.items():
        assert got[name].shape == value.shape, name
        assert torch.equal(got[name], value), name


def _counted_estimate(tech_fit):
    """estimate_draw on the technical model for 64 latent samples; the runs of guide and
    model it made, and the estimate."""
    from hpcbatch.predictive.sampling import SampleOptions, SampleRequest, estimate_draw
    from hpcbatch.predictive.task import prepare_job
    from hpcbatch.predictive.workload import WORKLOAD

    _, guide, args, kwargs = tech_fit
    runs = {"model": 0, "guide": 0}

    @functools.wraps(tech.technical_model)  # its signature names the split arguments
    def model(*a, **k):
        runs["model"] += 1
        return tech.technical_model(*a, **k)

    def counted_guide(*a, **k):
        runs["guide"] += 1
        return guide(*a, **k)

    request = SampleRequest(
        model, 64, guide=counted_guide, model_args=args, model_kwargs=kwargs,
        return_sites=("alpha_y", "mu_ntc"), data_plate=tech.DATA_PLATE,
        split_args=tech.SPLIT_ARGS,
    )  # fmt: skip
    job = prepare_job(WORKLOAD, request, SampleOptions(), in_process=True)
    try:
        runs.update(model=0, guide=0)
        estimate = estimate_draw(job.prep.sampling)
    finally:
        job.discard()
    return runs, estimate


def test_a_failing_lean_test_draw_falls_back_to_predictive_s_call(tech_fit, monkeypatch):
    """Where the guide's vectorised run alone fails (e.g. its own plates clash with the
    model's nesting), the test draws time Predictive's own call instead: three runs of
    guide and model per draw, and nothing added on top."""

    def clash(*_a, **_k):
        raise ValueError("plate dim clash")

    monkeypatch.setattr(core, "vectorized_guide_draw", clash)
    runs, estimate = _counted_estimate(tech_fit)
    draws = len(estimate.probe_samples) + 1  # the first draw is made twice
    assert runs == {"model": 3 * draws, "guide": 3 * draws}
    assert estimate.seconds > 0


def test_the_test_draws_run_guide_and_model_once_each(tech_fit):
    """estimate_draw's timed draws are vectorised runs alone: one model run and one guide
    run per draw (Predictive's call makes three of each), and the estimate adds the two
    unvectorised runs Predictive makes before the job's own one-block draw."""
    runs, estimate = _counted_estimate(tech_fit)
    draws = len(estimate.probe_samples) + 1  # the first draw is made twice
    assert runs == {"model": draws, "guide": draws}
    assert estimate.runs == 1 and estimate.seconds > 0
