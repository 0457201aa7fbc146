"""The ``hpcbatch`` command line: a thin click layer over the Python API.

Reads config once (``--profile`` / ``--config`` / flags) and passes values down.
Every :class:`~hpcbatch.errors.HpcbatchError`, and every click usage error, becomes
one line ``error: ...`` on stderr and a non-zero exit (2 for bad input); no
traceback.

Nothing here knows a particular workload: ``hpcbatch plan W``, ``hpcbatch run W`` and
``hpcbatch slurm render W`` are built for every workload registered under the
``hpcbatch.workloads`` entry point from its own options, and a workload's own command
group (``hpcbatch stocks ...``) is added from the reference it declares (``cli_group``).
"""

from __future__ import annotations

import importlib
import json
import sys

import click

from . import config as hb_config
from .commands import plan_command, run_command
from .errors import HpcbatchError
from .options import (
    accepts_renamed,
    allocation_options,
    config_options,
    resources_from_options,
)
from .runs_cli import runs, status
from .slurm_cli import add_render_command, slurm
from .units import format_bytes
from .workload import Workload, get_workload, workloads

# click >= 8.2 raises this for a group called without a command (older click prints help).
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


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


@click.group(
    "hpcbatch", cls=HpcbatchGroup, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(package_name="hpcbatch")
def main() -> None:
    """Run big batch jobs on HPC clusters without running out of memory."""


@main.command()
@allocation_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@accepts_renamed
def resources(mem, cpus, gpus, gpu_mem, as_json) -> None:
    """Show the memory, CPUs and GPUs this process may use, and where each figure came from.

    --mem/--cpus/--gpus may only narrow what is detected here; to plan for a bigger
    node use 'hpcbatch plan ... --mem 64G --cpus 16'.
    """
    res = resources_from_options(mem, cpus, gpus, gpu_mem, plan_ahead=False)
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

    Without --mem/--cpus the allocation of this process is detected; with them the
    plan is for that allocation (e.g. a job not submitted yet).
    """


@main.command("report")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print report.json as it is.")
def report_cmd(directory, as_json) -> None:
    """Summarise a run's report (a run directory, or the report-dir: its latest run)."""
    from .report import load_report, summary_text

    data = load_report(directory)
    click.echo(json.dumps(data, indent=2) if as_json else summary_text(data))


@main.command("workloads")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def list_workloads(as_json) -> None:
    """List the workloads installed (the hpcbatch.workloads entry points)."""
    found = workloads()
    if as_json:
        click.echo(json.dumps({n: {"help": w.help, "item": w.item_name} for n, w in found.items()}))
        return
    for name, w in found.items():
        click.echo(f"{name:<12}  {w.help}")


@main.group()
def run() -> None:
    """Run a workload's batch job: plan, cluster, chunks, resume and report.

    Every installed workload has a command here (see 'hpcbatch workloads').
    """


def job_cli(name: str) -> tuple[tuple[str, ...], click.Command | None]:
    """The command a SLURM job of workload ``name`` runs, and its click command."""
    command = get_workload(name).job_command()
    cmd = main
    for part in command:
        cmd = getattr(cmd, "commands", {}).get(part)
    return command, cmd


def _workload_group(w: Workload) -> click.Command | None:
    """The workload's own command group, from its ``cli_group`` reference."""
    if not w.cli_group:
        return None
    module, _, attr = w.cli_group.partition(":")
    return getattr(importlib.import_module(module), attr)


def _add_workload_commands() -> None:
    for w in workloads().values():
        plan.add_command(plan_command(w))
        run.add_command(run_command(w))
        add_render_command(w)
        group = _workload_group(w)
        if group is not None and group.name not in main.commands:
            main.add_command(group)
    for command in (slurm, runs, status):  # hpcbatch slurm / runs / status
        main.add_command(command)


_add_workload_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
