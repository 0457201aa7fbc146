"""A chunk that runs out of memory is halved and retried (sync and on Dask workers)."""

from __future__ import annotations

import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from hpcbatch.predictive.sampling import run_sampling

MAX_SAMPLES = 4


def picky_model(x):
    """Raises MemoryError for a vectorised draw of more than MAX_SAMPLES samples."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    if w.dim() > 0 and w.shape[0] > MAX_SAMPLES:
        raise MemoryError(f"simulated: {w.shape[0]} samples do not fit")
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(w * x, 1.0))


def _run(client, out, n_rows=3):
    posterior = {"w": torch.linspace(-1, 1, 20)}
    return run_sampling(
        picky_model,
        posterior_samples=posterior,
        num_samples=20,
        model_args=(torch.ones(n_rows),),
        chunk_size=10,
        client=client,
        out=out,
        seed=5,
        progress=False,
    )


def test_sync_halves_chunks_that_run_out_of_memory(tmp_path):
    run = _run("sync", tmp_path / "a.zarr")
    # 2 chunks of 10 -> 5 + 5 -> 2 + 3 each: 6 splits.
    assert run.report.chunks_split == 6
    y = np.asarray(run.samples["y"][...])
    assert y.shape == (20, 3)
    # Each sample's y is centred on its own w (rows not mixed up by the splits).
    assert np.corrcoef(y.mean(1), np.linspace(-1, 1, 20))[0, 1] > 0.5
    again = _run("sync", tmp_path / "b.zarr")
    np.testing.assert_array_equal(np.asarray(again.samples["y"][...]), y)


@pytest.mark.timeout(240)
def test_dask_runner_halves_chunks_and_matches_sync(tmp_path):
    import cloudpickle
    from distributed import Client, LocalCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with (
            LocalCluster(
                n_workers=1,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                memory_limit="2GiB",
            ) as cluster,
            Client(cluster) as client,
        ):
            # 1.2 MB of x: a shared input, memory-mapped by the worker, not pickled.
            run = _run(client, tmp_path / "d.zarr", n_rows=300_000)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert run.report.chunks_split == 6 and run.report.status == "finished"
    sync = _run("sync", tmp_path / "s.zarr", n_rows=300_000)
    np.testing.assert_array_equal(
        np.asarray(run.samples["y"][...]), np.asarray(sync.samples["y"][...])
    )
