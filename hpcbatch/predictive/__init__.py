"""Minibatched posterior predictive sampling for Pyro models over Dask."""
