"""The ``hpcbatch`` command line: a thin click layer over the Python API.

Reads config once (``--profile`` / ``--config`` / flags) and passes values down.
Every :class:`~hpcbatch.errors.HpcbatchError`, and every click usage error, becomes
one line ``error: ...`` on stderr and a non-zero exit (2 for bad input); no
traceback.  Workload commands live beside their workloads
(``hpcbatch/stocks/cli.py``, ``hpcbatch/predictive/cli.py``) and are added here.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable

import click

from . import config as hb_config
from .errors import ConfigError, HpcbatchError
from .planner import Footprint, Plan, make_plan, plural
from .resources import Resources, detect_resources
from .units import format_bytes, parse_bytes

# click >= 8.2 raises this for a group called without a command (older click prints help).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())

STOCKS_PROBE = "hpcbatch.stocks.probe:probe"
PREDICTIVE_PROBE = "hpcbatch.predictive.probe:probe"


class HpcbatchGroup(click.Group):
    """Turns HpcbatchError and click's usage errors into one clean line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HpcbatchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except _NO_ARGS_IS_HELP as exc:
            # `hpcbatch` or `hpcbatch plan` alone: the help, not an error.
            click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
            sys.exit(0)
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            message = " ".join(exc.format_message().split())
            click.echo(f"error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except HpcbatchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(result if isinstance(result, int) else 0)


def config_options(func: Callable) -> Callable:
    """``--profile NAME`` and ``--config FILE``."""

    @click.option(
        "--profile",
        default=None,
        help="A packaged profile: stocks-12gb, stocks-19gb, stocks-debug, predictive.",
    )
    @click.option("--config", "config_file", default=None, help="A YAML file of hpcbatch settings.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def allocation_options(func: Callable) -> Callable:
    """``--mem``/``--mem-gb``, ``--cpus``, ``--gpus``: describe an allocation instead of detecting it."""

    @click.option("--mem-gb", type=float, default=None, help="Memory of the allocation in GB.")
    @click.option("--mem", "mem", default=None, help="Memory as a size: 12GB, 500GiB, 64G.")
    @click.option("--cpus", type=int, default=None, help="CPUs of the allocation.")
    @click.option("--gpus", type=int, default=None, help="GPUs of the allocation.")
    @click.option(
        "--gpu-mem-gb", type=float, default=None, help="Memory of each planned GPU in GB."
    )
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


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
    mem_gb, cpus, gpus, gpu_mem_gb=None, *, plan_ahead: bool, mem: str | None = None
) -> Resources:
    """The allocation, from detection narrowed (or, planning ahead, replaced) by the flags."""
    if gpu_mem_gb is not None and not gpu_mem_gb > 0:
        raise ConfigError(f"--gpu-mem-gb must be positive, got {gpu_mem_gb:g}")
    return detect_resources(
        memory_bytes=memory_option_bytes(mem_gb, mem),
        cpus=cpus,
        gpus=gpus,
        gpu_memory_bytes=None if gpu_mem_gb is None else int(gpu_mem_gb * 1e9),
        plan_ahead=plan_ahead,
        memory_flag="--mem" if mem is not None else "--mem-gb",
    )


def echo_plan(plan: Plan, as_json: bool, extra: dict | None = None) -> None:
    if as_json:
        data = plan.to_dict()
        data.update(extra or {})
        click.echo(json.dumps(data, indent=2, default=str))
        return
    item = plan.footprint.item_name
    rows = [
        ("workers", str(plan.n_workers)),
        ("threads per worker", str(plan.threads_per_worker)),
        ("memory limit per worker", format_bytes(plan.memory_limit_bytes)),
        ("chunk size", f"{plural(plan.chunk_size, item)} ({plural(plan.n_chunks, 'chunk')})"),
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
    for note in (extra or {}).get("calibration", {}).get("notes", []):
        click.echo(f"note: {note}")
    for note in plan.resources.notes:
        click.echo(f"note: {note}")


@click.group(
    "hpcbatch", cls=HpcbatchGroup, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(package_name="hpcbatch")
def main() -> None:
    """Run big batch jobs on HPC clusters without running out of memory."""


@main.command()
@allocation_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def resources(mem_gb, mem, cpus, gpus, gpu_mem_gb, as_json) -> None:
    """Show the memory, CPUs and GPUs this process may use, and where each figure came from.

    --mem/--cpus/--gpus may only narrow what is detected here; to plan for a bigger
    node use 'hpcbatch plan ... --mem-gb G --cpus C'.
    """
    res = resources_from_options(mem_gb, cpus, gpus, gpu_mem_gb, mem=mem, plan_ahead=False)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
        return
    rows = res.summary_rows()
    width = max(len(r[0]) for r in rows)
    for name, value, source in rows:
        click.echo(f"{name:<{width}}  {value:<24}  {source}")
    for cand in res.memory_candidates:
        click.echo(f"  memory limit considered: {format_bytes(cand.value)} from {cand.source}")
    for cand in res.cpu_candidates:
        click.echo(f"  cpu limit considered: {cand.value} from {cand.source}")
    for note in res.notes:
        click.echo(f"note: {note}")


@main.command("config")
@config_options
def show_config(profile, config_file) -> None:
    """Print the effective hpcbatch settings (defaults < DASK_HPCBATCH__* < profile < file)."""
    import yaml

    settings = hb_config.load(profile, config_file)
    click.echo(yaml.safe_dump({"hpcbatch": settings}, sort_keys=False), nl=False)


@main.group()
def plan() -> None:
    """Plan workers, memory limit and chunk size for a workload, without running it.

    Without --mem/--mem-gb/--cpus the allocation of this process is detected; with
    them the plan is for that allocation (e.g. a job not submitted yet).
    """


def calibration_options(func: Callable) -> Callable:
    @click.option(
        "--calibrate/--no-calibrate",
        default=None,
        help="Measure the footprint with the workload's probe in fresh processes "
        "instead of the analytic estimate.",
    )
    @click.option("--probe-sizes", default=None, help="The two probe sizes, e.g. 4,16.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def _probe_sizes(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if text is None:
        return default
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--probe-sizes {text!r} must be two whole numbers, e.g. 4,16") from None
    if a < 1 or b < 1 or a == b:
        raise ConfigError(f"--probe-sizes must be two different positive numbers, got {text}")
    return a, b


def _maybe_calibrate(
    footprint: Footprint,
    wanted: bool | None,
    settings: dict,
    probe: str,
    sizes: tuple[int, int],
    probe_kwargs: dict,
) -> tuple[Footprint, dict]:
    """The measured footprint when asked for (flag, else config ``calibrate``)."""
    if not (settings.get("calibrate") if wanted is None else wanted):
        return footprint, {}
    from .calibrate import calibrated_footprint, check_probe

    check_probe(probe)
    click.echo(f"calibrating: running {probe} at sizes 0, {sizes[0]}, {sizes[1]} ...", err=True)
    measured, result = calibrated_footprint(
        footprint, probe, sizes, probe_kwargs, max_size=footprint.n_items
    )
    return measured, {"calibration": result.to_dict()}


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
@calibration_options
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
    calibrate,
    probe_sizes,
    mem_gb,
    mem,
    cpus,
    gpus,
    gpu_mem_gb,
    profile,
    config_file,
    as_json,
) -> None:
    """Plan stock batch prediction."""
    from .stocks.footprint import stocks_footprint, stocks_max_chunk

    settings = hb_config.load(profile, config_file, {"memory-fraction": memory_fraction})
    stock_cfg = settings["stocks"]
    lookback = hb_config.require_positive(
        "--lookback-days", stock_cfg["lookback-days"] if lookback_days is None else lookback_days
    )
    predict = hb_config.require_positive(
        "--predict-days", stock_cfg["predict-days"] if predict_days is None else predict_days
    )
    hb_config.require_positive("--stocks", n_stocks)
    if stock_cfg.get("limit"):
        n_stocks = min(n_stocks, int(stock_cfg["limit"]))
    chunk = batch_size if batch_size is not None else stock_cfg["batch-size"]
    if chunk is not None:
        hb_config.require_positive("--batch-size", chunk)
    res = resources_from_options(mem_gb, cpus, gpus, gpu_mem_gb, mem=mem, plan_ahead=True)
    footprint = stocks_footprint(n_stocks, lookback, predict)
    footprint, extra = _maybe_calibrate(
        footprint,
        calibrate,
        settings,
        STOCKS_PROBE,
        _probe_sizes(probe_sizes, (4, 16)),
        {"lookback_days": lookback, "predict_days": predict},
    )
    plan_obj = make_plan(
        footprint,
        res,
        hb_config.plan_settings(
            settings, chunk_size=chunk, use_gpu=use_gpu, max_chunk=stocks_max_chunk(settings)
        ),
    )
    echo_plan(plan_obj, as_json, extra)


@plan.command("predictive")
@click.option("--cells", type=int, required=True, help="N, cells (rows of the counts matrix).")
@click.option("--features", type=int, required=True, help="T, features (columns).")
@click.option("--groups", type=int, default=2, show_default=True, help="C, technical groups.")
@click.option("--samples", type=int, default=None, help="S, posterior samples (default 1000).")
@click.option("--with-observations", is_flag=True, help="Also draw the observed counts.")
@click.option(
    "--copy-input",
    is_flag=True,
    help="Plan for the input copied into each worker instead of memory-mapped.",
)
@click.option("--memory-fraction", type=float, default=None)
@calibration_options
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
    calibrate,
    probe_sizes,
    mem_gb,
    mem,
    cpus,
    gpus,
    gpu_mem_gb,
    profile,
    config_file,
    as_json,
) -> None:
    """Plan posterior predictive sampling of the built-in technical model."""
    from .predictive.footprint import technical_footprint

    settings = hb_config.load(profile, config_file, {"memory-fraction": memory_fraction})
    pred_cfg = settings["predictive"]
    samples = samples if samples is not None else pred_cfg["samples"]
    with_observations = with_observations or bool(pred_cfg["with-observations"])
    for name, value in (
        ("--cells", cells),
        ("--features", features),
        ("--groups", groups),
        ("--samples", samples),
    ):
        hb_config.require_positive(name, value)
    res = resources_from_options(mem_gb, cpus, gpus, gpu_mem_gb, mem=mem, plan_ahead=True)
    footprint = technical_footprint(
        cells,
        features,
        groups,
        samples,
        with_observations=with_observations,
        shared_input_mmap=not copy_input,
    )
    footprint, extra = _maybe_calibrate(
        footprint,
        calibrate,
        settings,
        PREDICTIVE_PROBE,
        _probe_sizes(probe_sizes, (2, 8)),
        {
            "cells": cells,
            "features": features,
            "groups": groups,
            "with_observations": with_observations,
        },
    )
    echo_plan(make_plan(footprint, res, hb_config.plan_settings(settings)), as_json, extra)


@main.command("report")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print report.json as it is.")
def report_cmd(directory, as_json) -> None:
    """Summarise a run's report (a run directory, or the report-dir: its latest run)."""
    from .report import load_report, summary_text

    data = load_report(directory)
    click.echo(json.dumps(data, indent=2) if as_json else summary_text(data))


def _add_command_groups() -> None:
    from .predictive.cli import predictive
    from .slurm_cli import slurm
    from .stocks.cli import stocks

    for group in (stocks, predictive, slurm):
        main.add_command(group)


_add_command_groups()

if __name__ == "__main__":  # pragma: no cover
    main()
