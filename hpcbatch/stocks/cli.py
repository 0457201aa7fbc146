"""`hpcbatch stocks ...` commands: thin wrappers over the hpcbatch.stocks API."""

from __future__ import annotations

import click


@click.group("stocks")
def stocks() -> None:
    """Stock batch prediction: generate, init-db, train, predict, demo."""
