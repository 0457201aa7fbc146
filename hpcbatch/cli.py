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
from .calibrate import check_probe
from .errors import HpcbatchError
from .options import (
    allocation_options,
    calibration_options,
    config_options,
    json_option,
    params_of,
    probe_sizes,
    resources_from_options,
    run_options,
    run_resources,
)
from .pipeline import (
    ClusterChoice,
    RunRequest,
    load_settings,
    plan_sizes,
    run_job,
    workload_settings,
)
from .planner import Plan, plural
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


def _values(workload_params: list[click.Parameter], kwargs: dict) -> dict:
    """The values of the workload's own parameters, taken out of ``kwargs``."""
    return {p.name: kwargs.pop(p.name) for p in workload_params if p.name in kwargs}


def _plan_command(w: Workload) -> click.Command:
    own = w.size_options()

    def callback(**kw) -> None:
        values = _values(own, kw)
        settings = load_settings(
            w, kw["profile"], kw["config_file"], {"memory-fraction": kw["memory_fraction"]}
        )
        sizes = w.sizes(workload_settings(w, settings), values)
        res = resources_from_options(
            kw["mem_gb"], kw["cpus"], kw["gpus"], kw["gpu_mem_gb"], mem=kw["mem"], plan_ahead=True
        )
        pair = probe_sizes(kw["probe_sizes"])
        if settings["calibrate"] if kw["calibrate"] is None else kw["calibrate"]:
            if w.probe:
                check_probe(w.probe)
            click.echo(f"calibrating: running {w.probe} in fresh processes ...", err=True)
        planned = plan_sizes(w, sizes, settings, res, calibrate=kw["calibrate"], probe_sizes=pair)
        echo_plan(planned.plan, kw["as_json"], planned.extra())

    common = params_of(
        click.option("--memory-fraction", type=float, default=None),
        calibration_options, allocation_options, config_options, json_option,
    )  # fmt: skip
    return click.Command(
        w.name, params=[*own, *common], callback=callback, help=f"Plan {w.help or w.name}"
    )


def _run_command(w: Workload) -> click.Command:
    own = w.run_options()

    def callback(**kw) -> None:
        values = _values(own, kw)
        settings = load_settings(w, kw["profile"], kw["config_file"])
        if kw["tls"] is not None:
            settings["cluster"]["tls"] = kw["tls"]
        choice = ClusterChoice.parse(kw["cluster"], settings)
        job = w.prepare(workload_settings(w, settings), values)
        request = RunRequest(
            cluster=choice, resources=run_resources(kw["mem_gb"], kw["cpus"], choice.backend),
            resume=kw["resume"], run_id=kw["run_id"], report_dir=kw["report_dir"],
            calibrate=kw["calibrate"], probe_sizes=probe_sizes(kw["probe_sizes"]),
        )  # fmt: skip
        report = run_job(job, settings, request)
        echo_report(report, kw["as_json"])

    common = params_of(run_options, calibration_options, config_options)
    return click.Command(
        w.name, params=[*own, *common], callback=callback, help=f"Run {w.help or w.name}"
    )


def echo_report(report, as_json: bool) -> None:
    """A finished run's report: JSON, or its one-paragraph summary."""
    data = report.to_dict() if hasattr(report, "to_dict") else report
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    elif hasattr(report, "summary"):
        click.echo(report.summary())
    else:
        click.echo(str(report))


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
        plan.add_command(_plan_command(w))
        run.add_command(_run_command(w))
        add_render_command(w)
        group = _workload_group(w)
        if group is not None and group.name not in main.commands:
            main.add_command(group)
    main.add_command(slurm)


_add_workload_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
