"""Posterior predictive sampling as a :class:`~hpcbatch.workload.Workload`.

``predictive``: the built-in negative-binomial technical model of a fitted data directory
(``hpcbatch predictive sample DATA``), drawn in planned chunks of samples into a zarr store
with its SQLite ledger beside it.  Registered through the ``hpcbatch.workloads`` entry
point like any plugin.  Planning (``hpcbatch plan predictive``, ``slurm render
predictive``) needs only the sizes: this module imports neither torch nor Pyro; the job
(:mod:`hpcbatch.predictive.task`) is imported when one is prepared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import click

from ..config import require_positive
from ..errors import ConfigError
from ..planner import Footprint
from ..workload import Invocation, Job, Workload, typed_settings
from .footprint import technical_footprint

PROBE = "hpcbatch.predictive.probe:probe"


def auto_or_int(flag: str, value: Any) -> int | str:
    """``"auto"`` for None/auto, else ``value`` as a whole number of at least 1."""
    if value in (None, "auto"):
        return "auto"
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} must be 'auto' or a whole number, got {value!r}") from None
    if isinstance(value, bool) or number != float(value):
        raise ConfigError(f"{flag} must be 'auto' or a whole number, got {value!r}")
    if number < 1:
        raise ConfigError(f"{flag} must be at least 1, got {number}")
    return number


@dataclass(frozen=True)
class PredictiveSettings:
    """The ``predictive`` config section, typed (``auto`` or a number for the sizes)."""

    samples: int
    chunk_size: int | str
    with_observations: bool
    cell_block: int | str

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> PredictiveSettings:
        raw = typed_settings(cls, section)
        return cls(
            samples=require_positive("setting predictive.samples", raw.samples),
            chunk_size=auto_or_int("setting predictive.chunk-size", raw.chunk_size),
            with_observations=bool(raw.with_observations),
            cell_block=auto_or_int("setting predictive.cell-block", raw.cell_block),
        )


def _fixed(value: int | str) -> int | None:
    return None if value == "auto" else int(value)


def _draw_options() -> list:
    """What is drawn: ``--samples`` and ``--with-observations`` (plan and run alike)."""
    return [
        click.Option(["--samples"], type=int, default=None,
                     help="S, posterior samples (default: setting predictive.samples, 1000)."),
        click.Option(["--with-observations"], is_flag=True, default=None,
                     help="Also draw the observed counts y."),
    ]  # fmt: skip


def _size_options() -> list:
    return [
        click.Option(["--cells"], type=int, required=True,
                     help="N, cells (rows of the counts matrix)."),
        click.Option(["--features"], type=int, required=True, help="T, features (columns)."),
        click.Option(["--groups"], type=int, default=2, show_default=True,
                     help="C, technical groups."),
        *_draw_options(),
        click.Option(["--copy-input"], is_flag=True,
                     help="Plan for the input copied into each worker instead of memory-mapped."),
    ]  # fmt: skip


def _run_options() -> list:
    return [
        click.Argument(["data_dir"]),
        *_draw_options(),
        click.Option(["--chunk-size"], default=None,
                     help="Samples per chunk: auto (planned) or a number."),
        click.Option(["--cell-block"], default=None,
                     help="Cells per model run with observations."),
        click.Option(["--out"], required=True, help="The zarr store to write."),
        click.Option(["--overwrite"], is_flag=True, help="Replace an existing --out."),
        click.Option(["--compress"], type=click.Choice(["lz4", "zstd", "none"]),
                     default="lz4", show_default=True,
                     help="The store's codec: lz4 (fast), zstd (smaller), none."),
    ]  # fmt: skip


class PredictiveWorkload(Workload):
    """Posterior predictive sampling of the built-in technical model
    (``hpcbatch predictive sample``)."""

    name = "predictive"
    help = "Posterior predictive sampling: a fitted Pyro model -> chunks of samples -> zarr."
    item_name = "sample"
    settings_type = PredictiveSettings
    probe = PROBE
    probe_sizes = (2, 8)
    command = ("predictive", "sample")
    cli_group = "hpcbatch.predictive.cli:predictive"

    def size_options(self) -> list:
        return _size_options()

    def sizes(self, settings: PredictiveSettings, values: Mapping[str, Any]) -> dict:
        samples = values.get("samples")
        sizes = {
            "cells": values.get("cells"),
            "features": values.get("features"),
            "groups": values.get("groups") or 2,
            "samples": settings.samples if samples is None else samples,
        }
        for name, value in sizes.items():
            require_positive(f"--{name}", value)
        with_obs = values.get("with_observations")
        return {
            **sizes,
            "with_observations": settings.with_observations if with_obs is None else with_obs,
            "copy_input": bool(values.get("copy_input")),
            "cell_block": _fixed(settings.cell_block),
            "chunk_size": _fixed(settings.chunk_size),
        }

    def footprint(self, sizes: Mapping[str, Any], settings: PredictiveSettings) -> Footprint:
        return technical_footprint(
            sizes["cells"], sizes["features"], sizes["groups"], sizes["samples"],
            with_observations=sizes["with_observations"], cell_block=sizes["cell_block"],
            shared_input_mmap=not sizes["copy_input"],
        )  # fmt: skip

    def plan_overrides(self, sizes: Mapping[str, Any], settings: PredictiveSettings) -> dict:
        return {"chunk_size": sizes["chunk_size"]}

    def probe_kwargs(self, sizes: Mapping[str, Any], settings: PredictiveSettings) -> dict:
        return {key: sizes[key] for key in
                ("cells", "features", "groups", "with_observations", "cell_block")}  # fmt: skip

    def run_options(self) -> list:
        return _run_options()

    def prepare(self, settings: PredictiveSettings, values: Mapping[str, Any],
                invocation: Invocation = Invocation()) -> Job:  # fmt: skip
        """The job of ``hpcbatch predictive sample DATA --out STORE``.

        The invocation's seed, ``resume`` and ``run_id`` define the store and the run
        identity.  Nothing is written but the inputs shared for memory-mapping (and a
        stale ledger of a store to replace is removed).
        """
        from .task import SampleOptions, technical_job

        samples = values.get("samples")
        samples = settings.samples if samples is None else samples
        with_obs = values.get("with_observations")
        options = SampleOptions(
            chunk_size=auto_or_int("--chunk-size", values.get("chunk_size") or settings.chunk_size),
            cell_block=auto_or_int("--cell-block", values.get("cell_block") or settings.cell_block),
            out=values["out"], overwrite=bool(values.get("overwrite")),
            compress=values.get("compress") or "lz4", resume=invocation.resume,
            seed=invocation.seed, run_id=invocation.run_id,
        )  # fmt: skip
        return technical_job(
            self, values["data_dir"], require_positive("--samples", samples),
            settings.with_observations if with_obs is None else bool(with_obs), options,
        )  # fmt: skip


WORKLOAD = PredictiveWorkload()
