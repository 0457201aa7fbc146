"""hpcbatch.predictive.sample draws what pyro.infer.Predictive(parallel=True) draws."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
import zarr
from predictive_models import (
    hierarchical_model,
    hierarchical_setup,
    regression_model,
    regression_setup,
    technical_setup,
)
from pyro.infer import Predictive

from hpcbatch.predictive import sample
from hpcbatch.predictive import technical as tech
from hpcbatch.predictive.sampling import pyro_seed, run_sampling
from hpcbatch.runner import chunk_seed

TECH_SITES = ["alpha_y", "mu_ntc", "phi_y", "y"]


@pytest.fixture(scope="module")
def tech_fit(tmp_path_factory):
    return technical_setup(tmp_path_factory.mktemp("tech"))


def _predictive(model, seed, args, kwargs=None, **options):
    pyro.set_rng_seed(seed)
    out = Predictive(model, parallel=True, **options)(*args, **(kwargs or {}))
    return {k: v.numpy() for k, v in out.items()}


def _first_chunk_seed(seed):
    return pyro_seed(chunk_seed(seed, "c000000"))


# ------------------------------------------------------------ exactness ----


def test_single_chunk_equals_predictive_technical(tech_fit):
    data, guide, args, kwargs = tech_fit
    ref = _predictive(
        tech.technical_model,
        _first_chunk_seed(11),
        args,
        kwargs,
        guide=guide,
        num_samples=16,
        return_sites=TECH_SITES,
    )
    got = sample(
        tech.technical_model,
        guide=guide,
        num_samples=16,
        model_args=args,
        model_kwargs=kwargs,
        return_sites=TECH_SITES,
        chunk_size=16,
        client="sync",
        seed=11,
    )
    assert set(got) == set(ref)
    for name in TECH_SITES:
        assert got[name].shape == ref[name].shape
        np.testing.assert_array_equal(got[name], ref[name])


def test_single_chunk_default_sites_equal_predictive_hierarchical():
    guide, args = hierarchical_setup()
    ref = _predictive(hierarchical_model, _first_chunk_seed(3), args, guide=guide, num_samples=40)
    got = sample(
        hierarchical_model,
        guide=guide,
        num_samples=40,
        model_args=args,
        chunk_size=40,
        client="sync",
        seed=3,
    )
    # Predictive's default with a guide: every site, deterministic ones included.
    assert set(got) == set(ref) == {"mu", "tau", "theta", "shrinkage", "y"}
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name])


def test_single_chunk_equals_predictive_with_posterior_samples():
    _, x = regression_setup()
    posterior = {"w": torch.randn(25, 4), "sigma": torch.rand(25) + 0.5}
    ref = _predictive(regression_model, _first_chunk_seed(5), (x,), posterior_samples=posterior)
    got = sample(
        regression_model,
        posterior_samples=posterior,
        num_samples=25,
        model_args=(x,),
        chunk_size=25,
        client="sync",
        seed=5,
    )
    assert set(got) == set(ref) == {"y"}
    np.testing.assert_array_equal(got["y"], ref["y"])


# ------------------------------------------------------ many chunks: MC ----


def _agree(a: np.ndarray, b: np.ndarray, z: float = 5.0) -> None:
    """Per-element means and sds agree within ``z`` Monte Carlo standard errors."""
    n_a, n_b = a.shape[0], b.shape[0]
    mean_a, mean_b = a.mean(0), b.mean(0)
    sd_a, sd_b = a.std(0), b.std(0)
    se_mean = np.sqrt(sd_a**2 / n_a + sd_b**2 / n_b) + 1e-6
    assert np.max(np.abs(mean_a - mean_b) / se_mean) < z
    # Normal-theory se of an sd: sd / sqrt(2n); fine for the near-symmetric sites tested.
    se_sd = np.sqrt(sd_a**2 / (2 * n_a) + sd_b**2 / (2 * n_b)) + 1e-6
    assert np.max(np.abs(sd_a - sd_b) / se_sd) < z


def test_many_chunks_technical_with_observations_matches_predictive(tech_fit):
    data, guide, args, kwargs = tech_fit
    n = 400
    ref = _predictive(
        tech.technical_model, 1, args, kwargs, guide=guide, num_samples=n, return_sites=TECH_SITES
    )
    run = run_sampling(
        tech.technical_model,
        guide=guide,
        num_samples=n,
        model_args=args,
        model_kwargs=kwargs,
        return_sites=TECH_SITES,
        chunk_size=37,
        client="sync",
        seed=2,
        data_plate=tech.DATA_PLATE,
        split_args=tech.SPLIT_ARGS,
        cell_block=64,
    )
    got = run.samples
    assert run.block == 64 and run.report.n_chunks == 11
    for name in TECH_SITES:
        assert got[name].shape == ref[name].shape
    # phi_y = 1/o^2 is heavy-tailed: compare it (and the positive sites) on the log scale.
    for name in ("alpha_y", "mu_ntc", "phi_y"):
        _agree(np.log(got[name]), np.log(ref[name]))
    # Observations: per-cell-and-feature moments of log1p counts over 400 draws.
    _agree(np.log1p(got["y"]), np.log1p(ref["y"]))


def test_blocks_hold_one_consistent_draw_per_sample(tech_fit):
    """Every block of one sample is conditioned on the same latents (no mixing)."""
    data, guide, args, kwargs = tech_fit
    got = sample(
        tech.technical_model,
        guide=guide,
        num_samples=60,
        model_args=args,
        model_kwargs=kwargs,
        return_sites=TECH_SITES,
        chunk_size=20,
        client="sync",
        data_plate=tech.DATA_PLATE,
        split_args=tech.SPLIT_ARGS,
        cell_block=50,
    )
    group = args[0].numpy()
    sf = args[1].numpy()
    # Baseline-group cells of one sample: mean count / size factor tracks that sample's mu.
    base = group == 0
    per_sample = (got["y"][:, base, :] / sf[base, None]).mean(1)  # [S, T]
    mu = got["mu_ntc"][:, 0, :]
    corr_same = np.corrcoef(np.log1p(per_sample).ravel(), np.log(mu).ravel())[0, 1]
    assert corr_same > 0.9


def test_many_chunks_hierarchical_matches_predictive():
    guide, args = hierarchical_setup()
    ref = _predictive(hierarchical_model, 4, args, guide=guide, num_samples=600)
    got = sample(
        hierarchical_model,
        guide=guide,
        num_samples=600,
        model_args=args,
        chunk_size=70,
        client="sync",
        seed=9,
    )
    for name in ref:
        assert got[name].shape == ref[name].shape
    for name in ("mu", "theta", "shrinkage", "y"):
        _agree(got[name], ref[name])
    _agree(np.log(got["tau"]), np.log(ref["tau"]))


def test_many_chunks_observed_site_with_data_plate_split():
    guide, x = regression_setup()
    ref = _predictive(
        regression_model, 6, (x,), guide=guide, num_samples=500, return_sites=["w", "sigma", "y"]
    )
    run = run_sampling(
        regression_model,
        guide=guide,
        num_samples=500,
        model_args=(x,),
        return_sites=["w", "sigma", "y"],
        chunk_size=60,
        client="sync",
        seed=1,
        data_plate="data",
        split_args=("x",),
        cell_block=70,
    )
    assert run.layout.needs_blocks and run.block == 70
    for name in ref:
        assert run.samples[name].shape == ref[name].shape
    for name in ("w", "y"):
        _agree(run.samples[name], ref[name])
    _agree(np.log(run.samples["sigma"]), np.log(ref["sigma"]))


def test_latent_only_with_data_plate_runs_the_likelihood_on_one_row(tech_fit):
    data, guide, args, kwargs = tech_fit
    run = run_sampling(
        tech.technical_model,
        guide=guide,
        num_samples=30,
        model_args=args,
        model_kwargs=kwargs,
        return_sites=["alpha_y", "mu_ntc", "phi_y"],
        chunk_size=10,
        client="sync",
        data_plate=tech.DATA_PLATE,
        split_args=tech.SPLIT_ARGS,
    )
    assert not run.layout.needs_blocks and run.block is None
    assert run.samples["alpha_y"].shape == (30, 2, data.n_features)
    # The baseline group's alpha is fixed at 1; the other is drawn.
    assert np.all(run.samples["alpha_y"][:, 0] == 1)
    assert np.std(run.samples["alpha_y"][:, 1]) > 0


# -------------------------------------------------------- zarr + workers ----


def test_zarr_output_is_chunked_with_the_samples_and_matches_dict(tech_fit, tmp_path):
    data, guide, args, kwargs = tech_fit
    common = dict(
        guide=guide,
        num_samples=24,
        model_args=args,
        model_kwargs=kwargs,
        return_sites=TECH_SITES,
        chunk_size=7,
        client="sync",
        seed=4,
        data_plate=tech.DATA_PLATE,
        split_args=tech.SPLIT_ARGS,
        cell_block=60,
    )
    group = sample(tech.technical_model, out=tmp_path / "s.zarr", **common)
    as_dict = sample(tech.technical_model, **common)
    assert isinstance(group, zarr.Group)
    reopened = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    for name in TECH_SITES:
        np.testing.assert_array_equal(reopened[name][...], as_dict[name])
        # Planned chunks (7 samples) are whole zarr chunks: no two tasks share one.
        assert 7 % reopened[name].chunks[0] == 0
    assert reopened["alpha_y"].chunks[0] == 7
    assert reopened["y"].chunks[1] == 60
    assert reopened.attrs["hpcbatch"]["chunk_size"] == 7


def _codec(array) -> tuple[str, str | None]:
    (compressor,) = array.compressors or (None,)
    return type(compressor).__name__, getattr(compressor, "cname", None)


def test_store_codec_lz4_by_default_zstd_or_none_on_request_same_values(tech_fit, tmp_path):
    """The out store is lossless whatever its codec: LZ4 by default, zstd or none asked."""
    from zarr.codecs import BloscCname

    data, guide, args, kwargs = tech_fit
    common = dict(
        guide=guide, num_samples=10, model_args=args, model_kwargs=kwargs,
        return_sites=TECH_SITES, chunk_size=5, client="sync", seed=3,
        data_plate=tech.DATA_PLATE, split_args=tech.SPLIT_ARGS, cell_block=60,
    )  # fmt: skip
    expected = sample(tech.technical_model, **common)
    codecs = {}
    for compress in (None, "zstd", "none", True):
        path = tmp_path / f"{compress}.zarr"
        chosen = {} if compress is None else {"compress": compress}
        sample(tech.technical_model, out=path, **common, **chosen)
        group = zarr.open_group(str(path), mode="r")
        for name in TECH_SITES:
            np.testing.assert_array_equal(group[name][...], expected[name])
        codecs[compress] = _codec(group["y"])
    assert codecs[None] == ("BloscCodec", BloscCname.lz4)
    assert codecs["zstd"] == codecs[True] == ("ZstdCodec", None)
    assert codecs["none"] == ("NoneType", None)


def test_unknown_store_codec_is_refused_before_anything_is_written(tech_fit, tmp_path):
    from hpcbatch.errors import ConfigError

    data, guide, args, kwargs = tech_fit
    with pytest.raises(ConfigError, match=r"compress must be one of lz4, zstd, none.*'gzip'"):
        sample(tech.technical_model, guide=guide, num_samples=4, model_args=args,
               model_kwargs=kwargs, client="sync", out=tmp_path / "s.zarr",
               compress="gzip")  # fmt: skip
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.timeout(240)
def test_results_do_not_depend_on_the_number_of_workers(tech_fit, tmp_path):
    from distributed import Client, LocalCluster

    data, guide, args, kwargs = tech_fit
    common = dict(
        guide=guide,
        num_samples=30,
        model_args=args,
        model_kwargs=kwargs,
        return_sites=TECH_SITES,
        chunk_size=8,
        seed=21,
        progress=False,
        data_plate=tech.DATA_PLATE,
        split_args=tech.SPLIT_ARGS,
        cell_block=80,
    )
    results = {"sync": sample(tech.technical_model, client="sync", **common)}
    for n_workers in (1, 2):
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                memory_limit="2GiB",
            ) as cluster,
            Client(cluster) as client,
        ):
            results[n_workers] = sample(tech.technical_model, client=client, **common)
    for name in TECH_SITES:
        np.testing.assert_array_equal(results[1][name], results["sync"][name])
        np.testing.assert_array_equal(results[2][name], results["sync"][name])


def test_large_arguments_are_shared_by_memory_map(tmp_path):
    from hpcbatch.predictive import shared

    big = np.arange(300_000, dtype=np.float32).reshape(1000, 300)
    np.save(tmp_path / "big.npy", big)
    mapped = np.load(tmp_path / "big.npy", mmap_mode="r")
    args, kwargs = shared.share_all((mapped, big, 3), {"small": np.ones(3)}, tmp_path / "sh")
    # An .npy already mapped is used in place; an in-memory array is written once.
    assert args[0].path == str(tmp_path / "big.npy")
    assert isinstance(args[1], shared.SharedArray) and args[1].path != args[0].path
    assert args[2] == 3 and isinstance(kwargs["small"], np.ndarray)
    opened = args[1].open()
    assert opened is args[1].open()  # once per process
    # Each argument comes back as the type it was given, over the memory map.
    assert isinstance(opened, np.memmap) and np.array_equal(opened, big)
    as_tensor = shared.share(torch.from_numpy(big.copy()), tmp_path / "sh", "t")
    tensor = as_tensor.open()
    assert isinstance(tensor, torch.Tensor) and torch.equal(tensor, torch.from_numpy(big))
    assert shared.shared_bytes(args, kwargs) == 2 * big.nbytes


def test_split_halves_share_zarr_chunks_safely(tmp_path):
    """After an OOM split, halves write parts of one zarr chunk, under a lock."""
    from hpcbatch.predictive import core
    from hpcbatch.predictive.task import (
        _create_store,
        _partial_chunks,
        _write,
        samples_per_zarr_chunk,
    )

    assert samples_per_zarr_chunk(1000, 12) == 12
    assert samples_per_zarr_chunk(8 * 1024**2, 12) == 2  # 16 MiB cap, a divisor of 12
    assert samples_per_zarr_chunk(10**9, 12) == 1
    assert _partial_chunks(0, 12, 12, 40) == []  # a planned chunk: whole zarr chunk
    assert _partial_chunks(12, 18, 12, 40) == [1]  # first half of c000001
    assert _partial_chunks(18, 24, 12, 40) == [1]  # second half
    assert _partial_chunks(36, 40, 12, 40) == []  # the short last chunk
    site = core.SiteLayout("w", (40, 3), "float32", None)
    layout = core.Layout((site,), None, (), (), False, ())
    _create_store(tmp_path / "s.zarr", layout, None, False, {}, 12)
    values = np.arange(120, dtype=np.float32).reshape(40, 3)
    for start, stop in ((0, 12), (12, 18), (18, 24), (24, 36), (36, 40)):
        _write(str(tmp_path / "s.zarr"), site, start, stop, values[start:stop])
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "s.zarr" / "w"))[...], values)
