"""The ``hpcbatch`` command line: a thin click layer over the Python API.

Reads config once (``--profile`` / ``--config`` / flags) and passes values down.
Every :class:`~hpcbatch.errors.HpcbatchError` becomes one line on stderr and its
exit code; no traceback.  Workload commands live beside their workloads
(``hpcbatch/stocks/cli.py``, ``hpcbatch/predictive/cli.py``) and are added here.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from . import config as hb_config
from .errors import HpcbatchError
from .planner import Plan, make_plan
from .resources import Resources, detect_resources
from .units import format_bytes


class HpcbatchGroup(click.Group):
    """Turns HpcbatchError into one clean line and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HpcbatchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


def config_options(func):
    """``--profile NAME`` and ``--config FILE``."""

    @click.option("--profile", default=None, help="A profile from configs/ (e.g. stocks-12gb).")
    @click.option("--config", "config_file", default=None, help="A YAML file of hpcbatch settings.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def allocation_options(func):
    """``--mem-gb``, ``--cpus``, ``--gpus``: describe an allocation instead of detecting it."""

    @click.option("--mem-gb", type=float, default=None, help="Memory of the allocation in GB.")
    @click.option("--cpus", type=int, default=None, help="CPUs of the allocation.")
    @click.option("--gpus", type=int, default=None, help="GPUs of the allocation.")
    @click.option(
        "--gpu-mem-gb", type=float, default=None, help="Memory of each planned GPU in GB."
    )
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def resources_from_options(mem_gb, cpus, gpus, gpu_mem_gb=None, *, plan_ahead: bool) -> Resources:
    return detect_resources(
        memory_bytes=None if mem_gb is None else int(mem_gb * 1e9),
        cpus=cpus,
        gpus=gpus,
        gpu_memory_bytes=None if gpu_mem_gb is None else int(gpu_mem_gb * 1e9),
        plan_ahead=plan_ahead,
    )


def echo_plan(plan: Plan, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2, default=str))
        return
    rows = [
        ("workers", str(plan.n_workers)),
        ("threads per worker", str(plan.threads_per_worker)),
        ("memory limit per worker", format_bytes(plan.memory_limit_bytes)),
        ("chunk size", f"{plan.chunk_size} {plan.footprint.item_name}s ({plan.n_chunks} chunks)"),
        ("predicted peak per worker", format_bytes(plan.predicted_peak_bytes)),
        ("memory fraction", f"{plan.memory_fraction:.0%}"),
        ("footprint", plan.footprint.source),
        ("binding constraint", plan.binding),
    ]
    if plan.gpu_batch_size is not None:
        rows.append(("GPU batch", str(plan.gpu_batch_size)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    click.echo("\nwhy:")
    for reason in plan.reasons:
        click.echo(f"  - {reason}")


@click.group(cls=HpcbatchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpcbatch")
def main() -> None:
    """Run big batch jobs on HPC clusters without running out of memory."""


@main.command()
@allocation_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def resources(mem_gb, cpus, gpus, gpu_mem_gb, as_json) -> None:
    """Show the memory, CPUs and GPUs this process may use, and where each figure came from."""
    res = resources_from_options(mem_gb, cpus, gpus, gpu_mem_gb, plan_ahead=True)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
        return
    rows = res.summary_rows()
    width = max(len(r[0]) for r in rows)
    for name, value, source in rows:
        click.echo(f"{name:<{width}}  {value:<24}  {source}")
    for cand in res.memory_candidates:
        click.echo(f"  memory limit considered: {format_bytes(cand.value)} from {cand.source}")
    for note in res.notes:
        click.echo(f"note: {note}")


@main.group()
def plan() -> None:
    """Plan workers, memory limit and chunk size for a workload, without running it."""


def _plan_for(
    footprint, mem_gb, cpus, gpus, gpu_mem_gb, profile, config_file, overrides, use_gpu=False
):
    settings = hb_config.load(profile, config_file, overrides)
    res = resources_from_options(mem_gb, cpus, gpus, gpu_mem_gb, plan_ahead=True)
    return make_plan(footprint, res, hb_config.plan_settings(settings, use_gpu=use_gpu))


@plan.command("stocks")
@click.option("--stocks", "n_stocks", type=int, default=5000, show_default=True)
@click.option(
    "--lookback-days", type=int, default=None, help="Days fetched per stock (default 400)."
)
@click.option(
    "--predict-days", type=int, default=None, help="Trading days predicted per stock (default 10)."
)
@click.option("--batch-size", type=int, default=None, help="Fix the stocks per chunk.")
@click.option("--use-gpu", is_flag=True, help="Size the GPU inference batch too.")
@click.option("--memory-fraction", type=float, default=None)
@allocation_options
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan_stocks(
    n_stocks,
    lookback_days,
    predict_days,
    batch_size,
    use_gpu,
    memory_fraction,
    mem_gb,
    cpus,
    gpus,
    gpu_mem_gb,
    profile,
    config_file,
    as_json,
) -> None:
    """Plan stock batch prediction."""
    from .stocks.footprint import stocks_footprint

    settings = hb_config.load(profile, config_file, {"memory-fraction": memory_fraction})
    stock_cfg = settings["stocks"]
    lookback = _positive("--lookback-days", lookback_days or stock_cfg["lookback-days"])
    predict = _positive("--predict-days", predict_days or stock_cfg["predict-days"])
    _positive("--stocks", n_stocks)
    footprint = stocks_footprint(n_stocks, lookback, predict)
    res = resources_from_options(mem_gb, cpus, gpus, gpu_mem_gb, plan_ahead=True)
    chunk = batch_size or stock_cfg["batch-size"]
    plan_obj = make_plan(
        footprint, res, hb_config.plan_settings(settings, chunk_size=chunk, use_gpu=use_gpu)
    )
    echo_plan(plan_obj, as_json)


@plan.command("predictive")
@click.option("--cells", type=int, required=True, help="N, cells (rows of the counts matrix).")
@click.option("--features", type=int, required=True, help="T, features (columns).")
@click.option("--groups", type=int, default=2, show_default=True, help="C, technical groups.")
@click.option("--samples", type=int, default=1000, show_default=True, help="S, posterior samples.")
@click.option("--with-observations", is_flag=True, help="Also draw the observed counts.")
@click.option(
    "--copy-input",
    is_flag=True,
    help="Plan for the input copied into each worker instead of memory-mapped.",
)
@click.option("--memory-fraction", type=float, default=None)
@allocation_options
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan_predictive(
    cells,
    features,
    groups,
    samples,
    with_observations,
    copy_input,
    memory_fraction,
    mem_gb,
    cpus,
    gpus,
    gpu_mem_gb,
    profile,
    config_file,
    as_json,
) -> None:
    """Plan posterior predictive sampling of the built-in technical model."""
    from .predictive.footprint import technical_footprint

    for name, value in (
        ("--cells", cells),
        ("--features", features),
        ("--groups", groups),
        ("--samples", samples),
    ):
        _positive(name, value)
    settings = hb_config.load(profile, config_file, {"memory-fraction": memory_fraction})
    footprint = technical_footprint(
        cells,
        features,
        groups,
        samples,
        with_observations=with_observations,
        shared_input_mmap=not copy_input,
    )
    res = resources_from_options(mem_gb, cpus, gpus, gpu_mem_gb, plan_ahead=True)
    echo_plan(make_plan(footprint, res, hb_config.plan_settings(settings)), as_json)


def _positive(flag: str, value: int) -> int:
    if value is None or value <= 0:
        raise hb_config.ConfigError(f"{flag} must be a positive whole number, got {value}")
    return value


def _add_command_groups() -> None:
    from .predictive.cli import predictive
    from .slurm_cli import slurm
    from .stocks.cli import stocks

    for group in (stocks, predictive, slurm):
        main.add_command(group)


_add_command_groups()

if __name__ == "__main__":  # pragma: no cover
    main()
