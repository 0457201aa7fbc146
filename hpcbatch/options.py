"""Command-line options every workload shares, and turning their values into objects.

The top-level CLI (``hpcbatch plan/run/slurm render W``) and a workload's own commands
(``hpcbatch stocks predict``, a plugin's group) take the same ``--profile``/``--config``,
allocation (``--mem-gb``/``--mem``/``--cpus``/``--gpus``), ``--calibrate`` and run options
from here, so they read and behave the same everywhere.  Pure click and value checks: no
workload, no cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from .errors import ConfigError
from .resources import Resources, detect_resources
from .units import parse_bytes


def _stack(*decorators: Callable) -> Callable:
    """One decorator applying ``decorators`` in order (the first is the outermost)."""

    def apply(func: Callable) -> Callable:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


def params_of(*decorators: Callable) -> list[click.Parameter]:
    """The click parameters a stack of option decorators declares (to build commands)."""

    @_stack(*decorators)
    def _none(**_: Any) -> None:
        return None

    return list(click.command()(_none).params)


config_options = _stack(
    click.option(
        "--profile",
        default=None,
        help="A packaged profile: stocks-12gb, stocks-19gb, stocks-debug, predictive.",
    ),
    click.option("--config", "config_file", default=None, help="A YAML file of hpcbatch settings."),
)

allocation_options = _stack(
    click.option("--mem-gb", type=float, default=None, help="Memory of the allocation in GB."),
    click.option("--mem", "mem", default=None, help="Memory as a size: 12GB, 500GiB, 64G."),
    click.option("--cpus", type=int, default=None, help="CPUs of the allocation."),
    click.option("--gpus", type=int, default=None, help="GPUs of the allocation."),
    click.option("--gpu-mem-gb", type=float, default=None, help="Memory of each planned GPU in GB."),
)

calibration_options = _stack(
    click.option(
        "--calibrate/--no-calibrate",
        default=None,
        help="Measure the footprint with the workload's probe in fresh processes "
        "instead of the analytic estimate.",
    ),
    click.option("--probe-sizes", default=None, help="The two probe sizes, e.g. 4,16."),
)

run_options = _stack(
    click.option("--cluster", "cluster", default=None, help="local, slurm, or a scheduler address."),
    click.option("--resume", is_flag=True, help="Continue an interrupted run (same settings)."),
    click.option("--run-id", default=None, help="Name of the run in the ledger (default: derived)."),
    click.option("--report-dir", default=None, help="Where run reports go (hpcbatch-reports)."),
    click.option(
        "--mem-gb", type=float, default=None,
        help="Use at most this much memory (GB); with --cluster slurm: each worker job's.",
    ),
    click.option(
        "--cpus", type=int, default=None,
        help="Use at most this many CPUs; with --cluster slurm: each worker job's.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON."),
    click.option("--tls/--no-tls", default=None, help="TLS between client, scheduler and workers."),
)  # fmt: skip


def json_option(func: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(func)


def memory_option_bytes(mem_gb: float | None, mem: str | None = None) -> int | None:
    """Bytes from ``--mem-gb`` (decimal GB) or ``--mem`` (a size string); one at most."""
    if mem_gb is not None and mem is not None:
        raise ConfigError("give --mem or --mem-gb, not both")
    if mem is not None:
        return parse_bytes(mem, what="--mem")
    if mem_gb is None:
        return None
    if not mem_gb > 0:
        raise ConfigError(f"--mem-gb must be positive, got {mem_gb:g}: e.g. --mem-gb 12")
    return int(mem_gb * 1e9)


def resources_from_options(
    mem_gb, cpus, gpus=None, gpu_mem_gb=None, *, plan_ahead: bool, mem: str | None = None
) -> Resources:
    """The allocation, from detection narrowed (or, planning ahead, replaced) by the flags."""
    if gpu_mem_gb is not None and not gpu_mem_gb > 0:
        raise ConfigError(f"--gpu-mem-gb must be positive, got {gpu_mem_gb:g}")
    if cpus is not None and cpus <= 0:
        raise ConfigError(f"--cpus must be positive, got {cpus}")
    return detect_resources(
        memory_bytes=memory_option_bytes(mem_gb, mem),
        cpus=cpus,
        gpus=gpus,
        gpu_memory_bytes=None if gpu_mem_gb is None else int(gpu_mem_gb * 1e9),
        plan_ahead=plan_ahead,
        memory_flag="--mem" if mem is not None else "--mem-gb",
    )


def run_resources(mem_gb, cpus, backend: str, mem: str | None = None) -> Resources:
    """The allocation a run plans for.  With SLURM workers (``backend == "slurm"``) the
    flags size each worker job, a new allocation: planned ahead, not checked against this
    process's (a small driver job's) own allocation."""
    return resources_from_options(mem_gb, cpus, plan_ahead=backend == "slurm", mem=mem)


def probe_sizes(text: str | None, default: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """``--probe-sizes 4,16`` as a pair of different positive whole numbers."""
    if text is None:
        return default
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--probe-sizes {text!r} must be two whole numbers, e.g. 4,16") from None
    if a < 1 or b < 1 or a == b:
        raise ConfigError(f"--probe-sizes must be two different positive numbers, got {text}")
    return a, b

