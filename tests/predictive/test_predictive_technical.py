"""The built-in technical model: simulator, fit recovers the truth, CLI, footprint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from hpcbatch.cli import main
from hpcbatch.errors import DataError
from hpcbatch.planner import make_plan
from hpcbatch.predictive import technical
from hpcbatch.predictive.footprint import (
    DRAW_FIXED_BYTES,
    DRAW_TARGET_BYTES,
    OBS_COPIES,
    OUTPUT_COPIES,
    WORKER_TRIM_THRESHOLD,
    auto_block,
    sampling_footprint,
    technical_footprint,
)
from hpcbatch.resources import Resources


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    path = tmp_path_factory.mktemp("tech") / "data"
    technical.simulate(1000, 60, 2, seed=1, out=path)
    technical.fit(path, steps=800)
    return path


def test_simulate_writes_a_data_directory(tmp_path):
    data = technical.simulate(120, 9, 3, seed=5, out=tmp_path / "d")
    assert data.counts.shape == (120, 9) and isinstance(data.counts, np.memmap)
    assert data.n_groups == 3 and set(np.unique(data.group)) <= {0, 1, 2}
    truth = np.load(tmp_path / "d" / "truth.npz")
    assert truth["alpha_y"].shape == (3, 9) and np.all(truth["alpha_y"][0] == 1)
    assert np.all(data.counts == np.round(data.counts)) and data.counts.min() >= 0
    again = technical.simulate(120, 9, 3, seed=5, out=tmp_path / "e")
    np.testing.assert_array_equal(np.asarray(again.counts), np.asarray(data.counts))


def test_fit_recovers_the_true_parameters(fitted):
    """Thresholds, for 1,000 cells x 60 features and 800 steps.

    Correlation of log posterior means with log truth: mu_ntc is pinned by ~1,000 cells
    per feature (>= 0.98); alpha_y by ~500 cells per group (>= 0.9); phi_y, the
    overdispersion, is weakly identified for low-mean features (>= 0.6).  Coverage of
    central 95 % intervals: mean-field AutoNormal is known to be overconfident, so we
    ask >= 60 % (a wrong model, e.g. alpha applied to the wrong group or phi inverted,
    drives coverage towards 0).  The ELBO curve is saved as a PNG.
    """
    scores = technical.recovery(fitted)
    assert scores["mu_ntc"]["correlation"] >= 0.98
    assert scores["alpha_y"]["correlation"] >= 0.9
    assert scores["phi_y"]["correlation"] >= 0.6
    for name in ("mu_ntc", "alpha_y", "phi_y"):
        assert scores[name]["coverage"] >= 0.6, (name, scores[name])
    png = fitted / "fit" / "elbo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((fitted / "fit" / "fit.json").read_text())
    assert info["steps"] == 800


def test_fitted_guide_loads_weights_only_and_refuses_other_data(fitted, tmp_path):
    import torch

    state = torch.load(fitted / "fit" / "guide.pt", weights_only=True)
    assert any("mu_ntc" in key for key in state)
    technical.simulate(50, 61, 2, seed=2, out=tmp_path / "other")
    (tmp_path / "other" / "fit").mkdir()
    for name in ("guide.pt", "prior.npz"):
        (tmp_path / "other" / "fit" / name).write_bytes((fitted / "fit" / name).read_bytes())
    with pytest.raises(DataError, match="does not match"):
        technical.load_fit(tmp_path / "other")
    technical.simulate(20, 5, 2, seed=0, out=tmp_path / "unfitted")
    with pytest.raises(DataError, match="no fitted guide"):
        technical.load_fit(tmp_path / "unfitted")


def test_cli_sample_writes_zarr_and_refuses_existing_out(fitted, tmp_path):
    runner = CliRunner()
    out = tmp_path / "s.zarr"
    args = [
        "predictive",
        "sample",
        str(fitted),
        "--samples",
        "12",
        "--with-observations",
        "--chunk-size",
        "5",
        "--cell-block",
        "400",
        "--cluster",
        "sync",
        "--out",
        str(out),
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(out), mode="r")
    assert group["y"].shape == (12, 1000, 60) and group["alpha_y"].shape == (12, 2, 60)
    assert "predicted peak" in result.output and "measured peak" in result.output
    again = runner.invoke(main, args)
    assert again.exit_code == 2
    assert "already exists" in again.output and "--overwrite" in again.output


def test_cli_bad_input_is_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "predictive",
            "sample",
            str(tmp_path),
            "--out",
            str(tmp_path / "x.zarr"),
            "--cluster",
            "sync",
        ],
    )
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "predictive simulate" in result.output
    result = runner.invoke(
        main, ["predictive", "simulate", "--cells", "0", "--out", str(tmp_path / "d")]
    )
    assert result.exit_code == 2 and "--cells" in result.output


def test_footprint_bounds_the_likelihood_by_the_cell_block():
    latent_only = technical_footprint(20_000, 30_000, 2, 1000)
    with_obs = technical_footprint(20_000, 30_000, 2, 1000, with_observations=True)
    block = auto_block(20_000, 30_000 * 4)
    assert 1 <= block < 20_000
    # several blocks: a sample holds its block's output (OUTPUT_COPIES) and a row's
    # temporaries; the draw's temporaries for the whole chunk are one fixed budget
    row = 30_000 * 4
    assert with_obs.per_item_bytes - latent_only.per_item_bytes == (
        (OUTPUT_COPIES * block + OBS_COPIES) * row
    )
    assert with_obs.baseline_bytes - latent_only.baseline_bytes == DRAW_FIXED_BYTES
    # one block over every row: Predictive's own vectorised run, OBS_COPIES per value
    one = technical_footprint(500, 300, 2, 10, with_observations=True)
    assert one.per_item_bytes - technical_footprint(500, 300, 2, 10).per_item_bytes == (
        OBS_COPIES * 500 * 300 * 4
    )
    assert one.baseline_bytes == technical_footprint(500, 300, 2, 10).baseline_bytes
    # Counts are a shared input: one page-cache copy per node, not per worker.
    assert with_obs.shared_input_bytes == 20_000 * 30_000 * 4 and with_obs.shared_input_mmap
    res = Resources(memory_bytes=16 * 1024**3, memory_source="test", cpus=4, cpus_source="test")
    plan = make_plan(with_obs, res)
    assert plan.predicted_peak_bytes <= plan.memory_limit_bytes * plan.memory_fraction
    assert plan.chunk_size >= 1


def test_generic_footprint_counts_blocks_and_latents():
    fp = sampling_footprint(
        100,
        latent_bytes_per_sample=1000,
        row_bytes_per_sample=40,
        rows_per_block=50,
        shared_input_bytes=10**6,
    )
    assert fp.per_item_bytes == 4 * 1000 + OBS_COPIES * 40 * 50  # one block: every row
    several = sampling_footprint(100, latent_bytes_per_sample=1000, row_bytes_per_sample=40,
                                 rows_per_block=50, plate_rows=400)  # fmt: skip
    assert several.per_item_bytes == 4 * 1000 + (OUTPUT_COPIES * 50 + OBS_COPIES) * 40
    # several blocks: the draw's temporaries and the freed memory the worker keeps
    assert several.baseline_bytes == fp.baseline_bytes + DRAW_TARGET_BYTES + WORKER_TRIM_THRESHOLD
    assert fp.node_shared_bytes == 10**6
