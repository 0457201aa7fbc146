"""``hpcbatch runs`` and ``hpcbatch status``: the runs under a report directory.

Reads what :mod:`hpcbatch.runs` reads (each run's ``progress.json``, its ledger while it
runs, else its ``report.json``), so it works from any shell that sees the report
directory, a login node included, while the job runs.  Registered on the top-level
group by :mod:`hpcbatch.cli` (``main.add_command(runs)``, ``main.add_command(status)``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from . import config as hb_config
from .options import config_options
from .runs import RunView, find_run, list_runs

_report_dir_option = click.option(
    "--report-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="The directory the runs wrote to (default: the report-dir setting).",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")


def _report_dir(report_dir: str | None, profile: str | None, config_file: str | None) -> str:
    if report_dir is not None:
        return report_dir
    return str(hb_config.load(profile, config_file)["report-dir"])


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _progress(r: RunView) -> str:
    total = r.n_items if r.n_items is not None else "?"
    pct = f" ({r.percent:.0f}%)" if r.percent is not None else ""
    return f"{r.items_done}/{total}{pct}"


def _chunks(r: RunView) -> str:
    total = r.n_chunks if r.n_chunks is not None else "?"
    return f"{r.chunks_done}/{total}"


COLUMNS = ("RUN", "WORKLOAD", "STATE", "ITEMS", "CHUNKS", "RETRIED", "SPLIT", "QUARANT.",
           "JOB", "STARTED", "DURATION")  # fmt: skip


def runs_table(runs: list[RunView]) -> str:
    """One line per run, under a header."""
    rows = [COLUMNS] + [
        (
            r.run_id,
            r.workload or "-",
            r.state,
            _progress(r),
            _chunks(r),
            str(r.retried),
            str(r.split),
            str(r.quarantined),
            r.slurm_job_id or "-",
            _when(r.started),
            _duration(r.duration_s),
        )  # fmt: skip
        for r in runs
    ]
    widths = [max(len(row[k]) for row in rows) for k in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def status_text(r: RunView) -> str:
    """One run in detail."""
    lines = [
        f"run {r.run_id}: {r.state}" + (f" ({r.why})" if r.why else ""),
        f"  workload:    {r.workload or '-'}",
        f"  directory:   {r.directory}",
        f"  progress:    {_progress(r)} {r.item_name}s"
        + (f", {r.rate:.1f}/s" if r.rate else "")
        + (f", ETA {_duration(r.eta_s)}" if r.state == "running" and r.eta_s else ""),
        f"  chunks:      {_chunks(r)} done, {r.in_flight} in flight, {r.retried} retried, "
        f"{r.split} split, {r.failed} failed; {r.quarantined} {r.item_name}s quarantined",
        f"  started:     {_when(r.started)}, for {_duration(r.duration_s)}"
        + (
            f" (last update {time.time() - r.updated:.0f} s ago)"
            if r.state == "running" and r.updated
            else ""
        ),  # fmt: skip
        f"  where:       host {r.host or '-'}, pid {r.pid or '-'}, SLURM job "
        f"{r.slurm_job_id or '-'}",
    ]
    if r.message:
        lines.append(f"  message:     {r.message}")
    for e in r.events[-10:]:
        detail = ", ".join(f"{k} {v}" for k, v in e.items() if k not in ("kind", "time"))
        lines.append(f"  event {_when(e.get('time'))} {e.get('kind')}: {detail}")
    if r.source != "progress.json":
        lines.append(f"  (from {r.source}: the run wrote no progress.json)")
    return "\n".join(lines)


@click.command("runs")
@click.argument("report_dir", required=False, type=click.Path(file_okay=False))
@_json_option
@config_options
def runs(report_dir, as_json, profile, config_file) -> None:
    """List the runs under a report directory (default: the report-dir setting): state
    (running, finished, failed, interrupted), progress, chunks, SLURM job, start, duration."""
    found = list_runs(_report_dir(report_dir, profile, config_file))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in found], indent=2))
    elif not found:
        click.echo(f"no runs under {Path(_report_dir(report_dir, profile, config_file))}")
    else:
        click.echo(runs_table(found))


@click.command("status")
@click.argument("run", required=False)
@_report_dir_option
@_json_option
@config_options
def status(run, report_dir, as_json, profile, config_file) -> None:
    """Show one run (a run id or its directory) in detail, or, without RUN, list the runs.

    A running run's counts are live: read from its progress.json (and its ledger)."""
    base = _report_dir(report_dir, profile, config_file)
    if run is None:
        found = list_runs(base)
        if as_json:
            click.echo(json.dumps([r.to_dict() for r in found], indent=2))
        else:
            click.echo(runs_table(found) if found else f"no runs under {base}")
        return
    view = find_run(base, run)
    click.echo(json.dumps(view.to_dict(), indent=2) if as_json else status_text(view))
