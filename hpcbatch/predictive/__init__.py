"""Minibatched posterior predictive sampling for Pyro models over Dask.

``hpcbatch.predictive.sample(model, guide=..., num_samples=...)`` draws what
``pyro.infer.Predictive(..., parallel=True)`` draws, in planned chunks of samples on
Dask workers, optionally block by block of a data plate, into numpy or zarr.
The built-in negative-binomial technical model lives in :mod:`.technical`.

Names are imported lazily so that ``hpcbatch plan predictive`` (which only needs
:mod:`.footprint`) does not import torch and Pyro.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SampleRun", "run_sampling", "sample"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import sampling

        return getattr(sampling, name)
    raise AttributeError(f"module 'hpcbatch.predictive' has no attribute {name!r}")
