"""`hpcbatch predictive ...` commands: thin wrappers over the hpcbatch.predictive API."""

from __future__ import annotations

import click


@click.group("predictive")
def predictive() -> None:
    """Posterior predictive sampling: simulate, fit, sample, demo."""
