"""`hpcbatch slurm ...`: render sbatch scripts from a plan, explain why a job ended.

A thin click layer over :mod:`hpcbatch.slurm`; planning reuses the same footprints
and settings as ``hpcbatch plan``.
"""

from __future__ import annotations

import functools
import json
import os

import click

from . import config as hb_config
from . import slurm as hb_slurm
from .errors import ConfigError
from .planner import Plan, make_plan


def _render_options(func):
    @click.option(
        "--mem-gb",
        type=float,
        default=None,
        help="Memory of the job's node allocation in GB (the plan sets --mem from it).",
    )
    @click.option("--cpus", type=int, default=None, help="CPUs of the allocation.")
    @click.option(
        "--walltime",
        default=None,
        help="SLURM time limit: HH:MM:SS, D-HH:MM:SS or minutes (default from config).",
    )
    @click.option("--partition", default=None, help="SLURM partition (default cluster.queue).")
    @click.option("--account", default=None, help="SLURM account (default cluster.account).")
    @click.option("--job-name", default=None, help="Job name (default hpcbatch-<workload>).")
    @click.option(
        "--driver",
        is_flag=True,
        help="A small driver job; workers run as separate jobs via dask-jobqueue.",
    )
    @click.option(
        "--jobs",
        type=int,
        default=1,
        show_default=True,
        help="With --driver: at most this many worker jobs (adaptive).",
    )
    @click.option(
        "--directive",
        "directives",
        multiple=True,
        help="Another #SBATCH option for this script's job, e.g. --directive=--qos=short "
        "(repeatable). Worker jobs of --driver take cluster.job-extra-directives.",
    )
    @click.option(
        "--python",
        default=None,
        help="Python of the hpcbatch install on the cluster (default: this one).",
    )
    @click.option("--memory-fraction", type=float, default=None)
    @click.option(
        "--profile", default=None, help="A profile (e.g. stocks-12gb); passed to the job."
    )
    @click.option("--config", "config_file", default=None, help="A YAML settings file; passed on.")
    @click.option(
        "-o",
        "--output",
        type=click.Path(dir_okay=False),
        default=None,
        help="Write the script to this file instead of printing it.",
    )
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def _resources(mem_gb: float | None, cpus: int | None):
    from .cli import resources_from_options

    if (mem_gb is None or cpus is None) and not os.environ.get("SLURM_JOB_ID"):
        missing = " and ".join(f for f, v in (("--mem-gb", mem_gb), ("--cpus", cpus)) if v is None)
        raise ConfigError(
            f"{missing} needed to size the job (this is not a SLURM allocation to measure): "
            "e.g. --mem-gb 12 --cpus 4"
        )
    for flag, value in (("--mem-gb", mem_gb), ("--cpus", cpus)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    return resources_from_options(mem_gb, cpus, None, plan_ahead=True)


def _emit(
    workload: str, plan: Plan, settings: dict, opts: dict, args: tuple[str, ...], note: str = ""
) -> None:
    script = hb_slurm.render_sbatch(
        workload,
        plan,
        settings,
        walltime=opts["walltime"],
        partition=opts["partition"],
        account=opts["account"],
        job_name=opts["job_name"],
        extra=opts["directives"],
        args=args,
        profile=opts["profile"],
        config_file=opts["config_file"],
        driver=opts["driver"],
        python=opts["python"],
        jobs=opts["jobs"],
        plan_note=note,
    )
    if opts["output"]:
        try:
            with open(opts["output"], "w") as f:
                f.write(script)
        except OSError as exc:
            raise ConfigError(
                f"cannot write {opts['output']}: {exc.strerror}: check the directory exists "
                "and is writable"
            ) from None
        click.echo(f"wrote {opts['output']}: sbatch {opts['output']}", err=True)
    else:
        click.echo(script, nl=False)


@click.group("slurm")
def slurm() -> None:
    """SLURM: render sbatch scripts sized from the plan; explain why a job ended."""


@slurm.group("render")
def render() -> None:
    """Print a ready sbatch script whose --mem and --cpus-per-task come from the plan.

    Arguments after `--` go onto the workload command in the job.
    """


#: Stocks planned for when neither --stocks nor a readable --db after -- says how many.
ASSUMED_STOCKS = 5000


def _arg_value(args: tuple[str, ...], flag: str) -> str | None:
    """The value of ``flag`` (``--db URL`` or ``--db=URL``) among the workload arguments."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _stock_count(n_stocks: int | None, args: tuple[str, ...], default_db: str | None):
    """(stocks to plan for, a note for the script's comment): ``--stocks``; else the stocks
    in the ``--db`` given after ``--``, chosen by its --offset/--limit as `stocks predict`
    does; else :data:`ASSUMED_STOCKS`, said to be assumed."""
    if n_stocks is not None:
        return n_stocks, ""
    url = _arg_value(args, "--db")
    if url is None:
        return ASSUMED_STOCKS, (
            f"{ASSUMED_STOCKS} stocks assumed (no --db after -- to count them): "
            "give --stocks N for your count"
        )
    from .security import database_url
    from .stocks.schema import make_engine
    from .stocks.sink import list_codes, select_codes

    try:
        engine = make_engine(database_url(url, default=default_db))
        try:
            codes = list_codes(engine)
        finally:
            engine.dispose()
        offset, limit = _arg_value(args, "--offset"), _arg_value(args, "--limit")
        count = len(select_codes(codes, int(offset or 0), None if limit is None else int(limit)))
    except Exception as exc:  # noqa: BLE001 (any reason the database cannot be counted)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        click.echo(
            f"warning: could not count the stocks in --db ({reason}): planning for "
            f"{ASSUMED_STOCKS}; give --stocks N",
            err=True,
        )
        return ASSUMED_STOCKS, (
            f"{ASSUMED_STOCKS} stocks assumed: the --db database could not be read when "
            "rendered; give --stocks N for your count"
        )
    return count, "the stock count was read from the --db database when rendered"


@render.command("stocks", context_settings={"ignore_unknown_options": False})
@click.option(
    "--stocks",
    "n_stocks",
    type=int,
    default=None,
    help=f"Stocks to plan for (default: counted in --db after --, else {ASSUMED_STOCKS}).",
)
@click.option("--lookback-days", type=int, default=None)
@click.option("--predict-days", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="Fix the stocks per chunk.")
@_render_options
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def render_stocks(n_stocks, lookback_days, predict_days, batch_size, args, **opts) -> None:
    """sbatch script for `hpcbatch stocks predict`."""
    from .stocks.footprint import stocks_footprint, stocks_max_chunk

    settings = hb_config.load(
        opts["profile"], opts["config_file"], {"memory-fraction": opts["memory_fraction"]}
    )
    cfg = settings["stocks"]
    n_stocks, count_note = _stock_count(n_stocks, args, cfg.get("db"))
    lookback = cfg["lookback-days"] if lookback_days is None else lookback_days
    predict = cfg["predict-days"] if predict_days is None else predict_days
    batch_size = cfg["batch-size"] if batch_size is None else batch_size
    for flag, value in (
        ("--stocks", n_stocks),
        ("--lookback-days", lookback),
        ("--predict-days", predict),
        ("--batch-size", batch_size if batch_size is not None else 1),
    ):
        hb_config.require_positive(flag, value)
    footprint = stocks_footprint(n_stocks, lookback, predict)
    plan = make_plan(
        footprint,
        _resources(opts["mem_gb"], opts["cpus"]),
        # the same chunk cap as `hpcbatch plan stocks` and `stocks predict`
        hb_config.plan_settings(
            settings, chunk_size=batch_size, max_chunk=stocks_max_chunk(settings)
        ),
    )
    _emit("stocks", plan, settings, opts, args, count_note)


@render.command("predictive")
@click.option("--cells", type=int, required=True, help="N, cells.")
@click.option("--features", type=int, required=True, help="T, features.")
@click.option("--groups", type=int, default=2, show_default=True, help="C, technical groups.")
@click.option("--samples", type=int, default=None, help="S, posterior samples (default config).")
@click.option("--with-observations", is_flag=True)
@click.option("--copy-input", is_flag=True, help="Plan for the input copied into each worker.")
@_render_options
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def render_predictive(
    cells, features, groups, samples, with_observations, copy_input, args, **opts
) -> None:
    """sbatch script for `hpcbatch predictive sample`."""
    from .predictive.footprint import technical_footprint

    settings = hb_config.load(
        opts["profile"], opts["config_file"], {"memory-fraction": opts["memory_fraction"]}
    )
    samples = int(settings["predictive"]["samples"]) if samples is None else samples
    for flag, value in (
        ("--cells", cells),
        ("--features", features),
        ("--groups", groups),
        ("--samples", samples),
    ):
        hb_config.require_positive(flag, value)
    footprint = technical_footprint(
        cells,
        features,
        groups,
        samples,
        with_observations=with_observations,
        shared_input_mmap=not copy_input,
    )
    plan = make_plan(
        footprint, _resources(opts["mem_gb"], opts["cpus"]), hb_config.plan_settings(settings)
    )
    _emit("predictive", plan, settings, opts, args)


@slurm.command("why")
@click.argument("job_id")
@click.option(
    "--output",
    "output_file",
    default=None,
    help="The job's output file (default: its StdOut from scontrol).",
)
@click.option(
    "--jobcomp", default=None, help="A jobcomp/filetxt file, for jobs scontrol has forgotten."
)
@click.option("--json", "as_json", is_flag=True)
def why(job_id, output_file, jobcomp, as_json) -> None:
    """Why a SLURM job ended: memory, walltime, node, preempted, cancelled, other."""
    death = hb_slurm.explain_job(job_id, jobcomp=jobcomp, output=output_file)
    if as_json:
        click.echo(json.dumps(death.__dict__))
    else:
        click.echo(str(death))
