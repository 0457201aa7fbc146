"""`hpcbatch slurm ...`: render sbatch scripts from a plan, explain why a job ended.

A thin click layer over :mod:`hpcbatch.slurm`; ``render W`` exists for every
registered workload (built by :func:`add_render_command`) and plans exactly as
``hpcbatch plan W`` does (:func:`hpcbatch.pipeline.plan_sizes`).
"""

from __future__ import annotations

import functools
import json
import os

import click

from . import slurm as hb_slurm
from .errors import ConfigError
from .options import (
    GPUS_HELP,
    cpus_option,
    gpu_mem_option,
    mem_option,
    merge_renamed,
    params_of,
    renamed,
    render_gpus,
    resources_from_options,
)
from .pipeline import load_settings, plan_sizes, workload_settings
from .planner import Plan
from .workload import Workload


def _render_options(func):
    @mem_option("Memory of the job's node allocation to plan for (the plan sets #SBATCH --mem)")
    @cpus_option("CPUs of the allocation to plan for (sbatch -c, --cpus-per-task).")
    @click.option("--gpus", default=None, metavar="[TYPE:]N",
                  help=f"{GPUS_HELP}; written as #SBATCH --gpus and planned for.")
    @click.option("--gres", default=None, metavar="gpu[:TYPE][:N]",
                  help="Generic resources as sbatch --gres, e.g. gpu:2 or gpu:a100:2; "
                  "written as #SBATCH --gres, its GPUs planned for.")
    @gpu_mem_option
    @click.option("-t", "--time", "time", default=None, metavar="LIMIT",
                  help="Time limit as sbatch --time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                  "D-HH:MM:SS (default cluster.walltime).")
    @renamed("--walltime", "--time", "time", example="same formats, e.g. --time 02:00:00")
    @click.option("-p", "--partition", default=None, help="SLURM partition (default cluster.queue).")
    @click.option("-A", "--account", default=None, help="SLURM account (default cluster.account).")
    @click.option("-J", "--job-name", default=None, help="Job name (default hpcbatch-<workload>).")
    @click.option("--driver", is_flag=True,
                  help="A small driver job; workers run as separate jobs via dask-jobqueue.")
    @click.option("--jobs", type=int, default=1, show_default=True,
                  help="With --driver: at most this many worker jobs (adaptive).")
    @click.option("--directive", "directives", multiple=True,
                  help="Another #SBATCH option for this script's job, e.g. --directive=--qos=short "
                  "(repeatable). Worker jobs of --driver take cluster.job-extra-directives.")
    @click.option("--python", default=None,
                  help="Python of the hpcbatch install on the cluster (default: this one).")
    @click.option("--memory-fraction", type=float, default=None,
                  help="Share of each worker's memory limit the plan may fill (0-1).")
    @click.option("--profile", default=None, help="A profile (e.g. stocks-12gb); passed to the job.")
    @click.option("--config", "config_file", default=None, help="A YAML settings file; passed on.")
    @click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
                  help="Write the script to this file instead of printing it (not sbatch's "
                  "--output: the job's log is <job-name>-%j.out).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper  # fmt: skip


def _resources(opts: dict):
    """The allocation to plan for: the flags, else (inside a job) this job's own."""
    mem, cpus = opts["mem"], opts["cpus"]
    if (mem is None or cpus is None) and not os.environ.get("SLURM_JOB_ID"):
        missing = " and ".join(f for f, v in (("--mem", mem), ("--cpus", cpus)) if v is None)
        raise ConfigError(
            f"{missing} needed to size the job (this is not a SLURM allocation to measure): "
            "e.g. --mem 12G --cpus 4"
        )
    if cpus is not None and cpus <= 0:
        raise ConfigError(f"--cpus must be positive, got {cpus}")
    gpus = render_gpus(opts["gpus"], opts["gres"])
    return resources_from_options(mem, cpus, gpus, opts["gpu_mem"], plan_ahead=True)


def _job_cli(w: Workload) -> click.Command | None:
    """The click command the job runs (looked up from the running ``hpcbatch`` command)."""
    ctx = click.get_current_context(silent=True)
    cmd = ctx.find_root().command if ctx is not None else None
    for name in w.job_command():
        cmd = getattr(cmd, "commands", {}).get(name)
    return cmd


def _emit(
    w: Workload, plan: Plan, settings: dict, opts: dict, args: tuple[str, ...], note: str = ""
) -> None:
    passed = ("partition", "account", "job_name", "profile", "config_file", "driver", "python",
              "jobs", "gpus", "gres")  # fmt: skip
    script = hb_slurm.render_sbatch(
        w.name, plan, settings, command=w.job_command(), command_cli=_job_cli(w),
        extra=opts["directives"], args=args, plan_note=note, walltime=opts["time"],
        **{k: opts[k] for k in passed},
    )  # fmt: skip
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

    The flags are sbatch's (--mem 64G, -c 8, -t 02:00:00, -p, -A, -J, --gpus, --gres);
    see docs/slurm.md for the table.

    Arguments after `--` go onto the workload command in the job.
    """


def add_render_command(w: Workload) -> None:
    """``hpcbatch slurm render W`` for workload ``w``, from its size options."""
    own = w.size_options()

    def callback(args: tuple[str, ...], **opts) -> None:
        merge_renamed(params, opts)
        values = {p.name: opts.pop(p.name) for p in own if p.name in opts}
        settings = load_settings(
            w, opts["profile"], opts["config_file"], {"memory-fraction": opts["memory_fraction"]}
        )
        found = w.job_sizes(workload_settings(w, settings), values, args)
        if found.warning:
            click.echo(f"warning: {found.warning}", err=True)
        resources = _resources(opts)
        plan = plan_sizes(w, found.sizes, settings, resources, calibrate=False).plan
        _emit(w, plan, settings, opts, args, found.note)

    params = [*own, *params_of(_render_options), click.Argument(["args"], nargs=-1,
              type=click.UNPROCESSED)]  # fmt: skip
    job = " ".join(w.job_command())
    render.add_command(
        click.Command(w.name, params=params, callback=callback,
                      help=f"sbatch script for `hpcbatch {job}`.")  # fmt: skip
    )


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
