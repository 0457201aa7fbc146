"""Click commands built for a workload: ``plan W`` and ``run W``.

The top-level CLI builds one of each for every registered workload, and a workload's
own group may reuse them (``hpcbatch stocks predict`` is :func:`run_command` of the
stocks workload), so every workload's commands take the same options and print the
same way.  Output goes through click (these are commands); the work is the pipeline's.
"""

from __future__ import annotations

import json

import click

from .calibrate import check_probe
from .options import (
    allocation_options,
    calibration_options,
    config_options,
    json_option,
    merge_renamed,
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
    warm_workers,
    workload_settings,
)
from .planner import Plan, plural
from .units import format_bytes
from .workload import Invocation, RunSettings, Workload


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
    gpus = plan.resources.gpus
    if gpus:
        each = format_bytes(min(g.total_bytes for g in gpus))
        rows.append(("gpus", f"{len(gpus)} x {each} ({plan.resources.gpus_source})"))
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


def _values(workload_params: list[click.Parameter], kwargs: dict) -> dict:
    """The values of the workload's own parameters, taken out of ``kwargs``."""
    return {p.name: kwargs.pop(p.name) for p in workload_params if p.name in kwargs}


def plan_command(w: Workload) -> click.Command:
    """``hpcbatch plan W``: the plan for sizes given as options, no data needed."""
    own = w.size_options()

    def callback(**kw) -> None:
        values = _values(own, merge_renamed([*own, *common], kw))
        settings = load_settings(
            w, kw["profile"], kw["config_file"], {"memory-fraction": kw["memory_fraction"]}
        )
        sizes = w.sizes(workload_settings(w, settings), values)
        res = resources_from_options(
            kw["mem"], kw["cpus"], kw["gpus"], kw["gpu_mem"], plan_ahead=True
        )
        pair = probe_sizes(kw["probe_sizes"])
        if settings["calibrate"] if kw["calibrate"] is None else kw["calibrate"]:
            if w.probe:
                check_probe(w.probe)
            click.echo(f"calibrating: running {w.probe} in fresh processes ...", err=True)
        planned = plan_sizes(w, sizes, settings, res, calibrate=kw["calibrate"], probe_sizes=pair)
        echo_plan(planned.plan, kw["as_json"], planned.extra())

    common = params_of(
        click.option("--memory-fraction", type=float, default=None,
                     help="Share of each worker's memory limit the plan may fill (0-1)."),
        calibration_options, allocation_options, config_options, json_option,
    )  # fmt: skip
    return click.Command(
        w.name, params=[*own, *common], callback=callback, help=f"Plan {w.help or w.name}"
    )


def run_command(w: Workload, name: str | None = None, help: str | None = None) -> click.Command:
    """``hpcbatch run W`` (or a workload's own command ``name``): prepare, plan, run, report."""
    own = w.run_options()

    def callback(**kw) -> None:
        values = _values(own, merge_renamed([*own, *common], kw))
        settings = load_settings(w, kw["profile"], kw["config_file"])
        if kw["tls"] is not None:
            settings["cluster"]["tls"] = kw["tls"]
        choice = ClusterChoice.parse(kw["cluster"], settings)
        invocation = Invocation(
            seed=RunSettings.from_config(settings).seed, resume=kw["resume"], run_id=kw["run_id"]
        )
        warm_workers(w, choice)  # the workers' imports overlap the input checks
        job = w.prepare(workload_settings(w, settings), values, invocation)
        request = RunRequest(
            cluster=choice, resources=run_resources(kw["mem"], kw["cpus"], choice.backend),
            resume=kw["resume"], run_id=kw["run_id"], report_dir=kw["report_dir"],
            calibrate=kw["calibrate"], probe_sizes=probe_sizes(kw["probe_sizes"]),
        )  # fmt: skip
        report = run_job(job, settings, request)
        if kw["as_json"]:
            click.echo(json.dumps(report.to_dict(), indent=2, default=str))
        else:
            click.echo(job.summary(report))

    common = params_of(run_options, calibration_options, config_options)
    return click.Command(
        name or w.name, params=[*own, *common], callback=callback,
        help=help or f"Run {w.help or w.name}",
    )  # fmt: skip
