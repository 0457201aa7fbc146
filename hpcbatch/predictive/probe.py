"""The calibration probe: one real chunk of the built-in model, in this process.

``probe(size, cells=, features=, groups=, with_observations=)`` builds the technical
model's inputs and a guide initialised from data-like moments (no fit: the cost of a
draw does not depend on the fitted values), then runs exactly what a worker runs for
a chunk of ``size`` samples (:func:`hpcbatch.predictive.task.sample_chunk_task`),
writing to a throwaway zarr store.  ``size=0`` loads everything but draws nothing.
:mod:`hpcbatch.calibrate` runs it in child processes started as the run's workers are (for
a local run: forked from the forkserver that preloaded torch, Pyro and zarr) and fits
fixed + per-sample bytes.

The counts matrix is not created: the predictive draw never reads it (it is the
shared input, counted from its exact size by the planner).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .footprint import FLOAT, auto_block


def technical_inputs(cells: int, features: int, groups: int, seed: int = 0):
    """Data-like arguments of the technical model and a sensibly initialised guide."""
    from . import technical

    rng = np.random.default_rng(seed)
    group = torch.from_numpy(rng.integers(0, groups, cells).astype(np.int64))
    sum_factor = torch.from_numpy(rng.lognormal(0.0, 0.2, cells).astype(np.float32))
    mu_mean = rng.lognormal(np.log(5.0), 1.0, features).astype(np.float32)
    mu_sd = (mu_mean * 1.5).astype(np.float32)
    kwargs = {
        "mu_mean": torch.from_numpy(mu_mean),
        "mu_sd": torch.from_numpy(mu_sd),
        "n_groups": groups,
    }
    guide = technical.make_guide(mu_mean, groups)
    from .guides import build_guide

    build_guide(guide, group[:1], sum_factor[:1], torch.zeros(1, features), **kwargs)
    return (group, sum_factor, None), kwargs, guide


def probe(
    size: int,
    *,
    cells: int,
    features: int,
    groups: int = 2,
    with_observations: bool = False,
    cell_block: int | None = None,
    seed: int = 0,
) -> dict:
    """Run one chunk of ``size`` samples of the built-in model; return what was done."""
    from ..runner import Chunk, TaskContext, chunk_seed
    from . import core, technical
    from .task import _ARRAYS, _JOBS, SamplingJob, _create_store, sample_chunk_task

    args, kwargs, guide = technical_inputs(cells, features, groups, seed)
    if size <= 0:
        return {"samples": 0}
    sites = list(technical.LATENT_SITES) + ([technical.OBSERVED_SITE] if with_observations else [])
    layout = core.inspect_model(
        technical.technical_model, guide=guide, posterior=None, num_samples=size,
        model_args=args, model_kwargs=kwargs, return_sites=sites,
        data_plate=technical.DATA_PLATE, split_args=technical.SPLIT_ARGS,
    )  # fmt: skip
    block = cell_block or auto_block(cells, features * FLOAT) if layout.needs_blocks else None
    job = SamplingJob(
        technical.technical_model, guide, {}, args, kwargs, layout, technical.DATA_PLATE, block
    )
    scratch = Path(tempfile.mkdtemp(prefix="hpcbatch-probe-"))
    key = f"probe-{scratch.name}"
    try:
        _create_store(scratch / "probe.zarr", layout, block, False, {}, size)
        _JOBS[key] = job
        start = time.perf_counter()
        meta = sample_chunk_task(
            Chunk("c000000", 0, size),
            TaskContext("probe", chunk_seed(seed, "c000000"), 0),
            job_path=key,
            out=str(scratch / "probe.zarr"),
        )
        meta["seconds"] = time.perf_counter() - start
        meta["cell_block"] = block
        return meta
    finally:
        _JOBS.pop(key, None)
        for cache_key in [k for k in _ARRAYS if k[0] == str(scratch / "probe.zarr")]:
            _ARRAYS.pop(cache_key, None)
        shutil.rmtree(scratch, ignore_errors=True)
