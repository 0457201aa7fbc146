"""SLURM glue: sbatch scripts and dask-jobqueue clusters from a Plan, and why a job died.

Owns:

- walltime parsing/formatting in SLURM's own formats;
- the job size a plan needs (``--mem``, ``--cpus-per-task``) and rendering the sbatch
  templates in ``slurm/`` (a single-node job running a local Dask cluster, or a small
  driver job whose workers are separate jobs submitted by dask-jobqueue);
- ``dask_jobqueue.SLURMCluster`` keyword arguments built from a plan (exact per-worker
  ``memory_limit``, Dask memory thresholds, worker lifetime from the walltime);
- submitting, waiting for and explaining jobs (``memory`` / ``walltime`` / ``node`` /
  ...), through a small injectable command layer so the parsing is unit-testable
  without SLURM (as submitit does).

Does not own opening clusters for the runner (``hpcbatch.cluster``) or planning.
Database URLs are never written into a script: a URL with a password becomes
``$HPCBATCH_DB_URL``, and any URL shown is masked.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from .errors import ClusterStartError, ConfigError, HpcbatchError, RunInterrupted
from .planner import Plan
from .security import DB_URL_ENV, mask_url  # noqa: F401 (mask_url re-exported)
from .units import format_bytes, format_mem, parse_bytes

logger = logging.getLogger(__name__)

MiB = 1024**2

#: Where the sbatch templates live: shipped inside the package (hpcbatch/sbatch/, which the
#: repository's slurm/ links to); HPCBATCH_SLURM_TEMPLATES points at a site's own copies.
TEMPLATE_DIR = Path(
    os.environ.get("HPCBATCH_SLURM_TEMPLATES", Path(__file__).resolve().parent / "sbatch")
)

#: Where a SLURM-mode scheduler's dashboard listens unless cluster.dashboard-address says.
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:8787"

#: The commands each workload runs inside a job.


# ------------------------------------------------------------------ walltime ----

_WALLTIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


def parse_walltime(text: str | int) -> int:
    """SLURM time limit -> seconds. ``"90"`` is 90 minutes, ``"1-12:00:00"`` 36 hours.

    Accepts what ``sbatch --time`` accepts (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
    ``D-HH:MM``, ``D-HH:MM:SS``) with minutes and seconds below 60 and hours below 24
    where a larger unit is given; unlimited walltimes are refused (workers need a
    lifetime).
    """
    raw = str(text).strip()
    bad = ConfigError(
        f"walltime {raw!r} is not a SLURM time limit: use {_WALLTIME_FORMATS}, "
        "e.g. --time 02:00:00 or --time 1-00:00:00"
    )
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", raw)
    if not m:
        raise bad
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        h, mi, s = (parts + [0, 0])[:3]
        seconds = int(days) * 86400 + h * 3600 + mi * 60 + s
        if h >= 24 or mi >= 60 or s >= 60:
            raise bad
    elif len(parts) == 1:
        seconds = parts[0] * 60
    elif len(parts) == 2:
        seconds = parts[0] * 60 + parts[1]
        if parts[1] >= 60:
            raise bad
    else:
        h, mi, s = parts
        if mi >= 60 or s >= 60:
            raise bad
        seconds = h * 3600 + mi * 60 + s
    if seconds <= 0:
        raise ConfigError(
            f"walltime {raw!r} is zero: give a positive time, e.g. --time 01:00:00"
        )
    return seconds


def format_walltime(seconds: int) -> str:
    """Seconds -> ``HH:MM:SS`` (or ``D-HH:MM:SS`` from one day on)."""
    days, rest = divmod(int(seconds), 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return f"{days}-{h:02d}:{m:02d}:{s:02d}" if days else f"{h:02d}:{m:02d}:{s:02d}"


def worker_lifetime(walltime_s: int) -> tuple[int, int]:
    """(lifetime, stagger) seconds so every worker retires before SLURM kills its job.

    Dask draws each worker's lifetime from ``lifetime +- stagger``; the margin before
    the walltime is 5 minutes, or a quarter of a short walltime, and the stagger is
    at most 2 minutes and below half the margin, so ``lifetime + stagger < walltime``.
    """
    margin = min(300, walltime_s // 4)
    stagger = min(120, margin * 2 // 5)
    return walltime_s - margin, stagger


# ------------------------------------------------------------ job size -----------


@dataclass(frozen=True)
class JobSize:
    """What one job asks SLURM for, and how it adds up."""

    cpus: int
    mem_bytes: int  # the exact sum (before rounding up to whole MiB)
    workers_bytes: int
    node_shared_bytes: int
    reserve_bytes: int

    @property
    def mem_mb(self) -> int:
        """Whole MiB (SLURM's ``M``), rounded up."""
        return math.ceil(self.mem_bytes / MiB)

    @property
    def sbatch_mem(self) -> str:
        """The ``--mem`` value: ``NG`` when a whole number of GiB, else ``NM``."""
        return f"{self.mem_mb // 1024}G" if self.mem_mb % 1024 == 0 else f"{self.mem_mb}M"


def job_size(plan: Plan, reserve_bytes: int) -> JobSize:
    """``--mem`` = workers x memory_limit + node-shared (mmap'd) bytes + reserve;
    ``--cpus-per-task`` = workers x threads."""
    workers = plan.n_workers * plan.memory_limit_bytes
    shared = plan.footprint.node_shared_bytes
    return JobSize(
        cpus=plan.n_workers * plan.threads_per_worker,
        mem_bytes=workers + shared + reserve_bytes,
        workers_bytes=workers,
        node_shared_bytes=shared,
        reserve_bytes=reserve_bytes,
    )


# ------------------------------------------------------------ secrets ------------


def _has_password(value: str) -> bool:
    return bool(re.search(r"://[^:/@\s]+:[^@\s]+@", value))


def scrub_args(args: Sequence[str]) -> tuple[list[str], bool]:
    """Replace any argument holding a URL with a password by ``$HPCBATCH_DB_URL``.

    Returns the new arguments and whether anything was replaced (the script then
    requires the variable at run time instead of carrying the password).
    """
    out, replaced = [], False
    for arg in args:
        if _has_password(arg):
            prefix = arg.split("=", 1)[0] + "=" if arg.startswith("--") and "=" in arg else ""
            out.append(
                f"{prefix}$" + "{" + f"{DB_URL_ENV}:?export {DB_URL_ENV} before sbatch" + "}"
            )
            replaced = True
        else:
            out.append(arg)
    return out, replaced


def _quote(arg: str) -> str:
    """Shell-quote, but keep a ``${HPCBATCH_DB_URL...}`` expansion working."""
    if f"${{{DB_URL_ENV}" in arg:
        return '"' + arg + '"'
    return shlex.quote(arg)


# ------------------------------------------------------------ rendering ----------


def load_template(name: str, template_dir: Path | None = None) -> Template:
    path = (template_dir or TEMPLATE_DIR) / name
    try:
        return Template(path.read_text())
    except OSError:
        raise ConfigError(
            f"sbatch template {path} not found: set HPCBATCH_SLURM_TEMPLATES to the "
            "directory holding local.sbatch and driver.sbatch (the package ships them in "
            "hpcbatch/sbatch/)"
        ) from None


def _directive_lines(partition: str | None, account: str | None, extra: Sequence[str]) -> str:
    lines = []
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    for directive in extra:
        d = directive.strip()
        if not d:
            continue
        if d.startswith("#SBATCH"):
            d = d[len("#SBATCH") :].strip()
        if "\n" in d or "\r" in d:
            raise ConfigError(
                f"extra sbatch directive {directive!r} has a line break: give one option per "
                "--directive"
            )
        if not d.startswith("-"):
            raise ConfigError(
                f"extra sbatch directive {directive!r} is not an option: write it like "
                "--constraint=skylake or --qos=short"
            )
        lines.append(f"#SBATCH {d}")
    return "\n".join(lines)


def _check_python(python: str) -> str:
    """The interpreter path goes inside ``"${HPCBATCH_PYTHON:-...}"``: no quotes or expansions."""
    if re.search(r'["$`\\}\n\r]', python):
        raise ConfigError(
            f"--python {python!r} has characters that cannot go into the script "
            "(quote, $, backquote, backslash, }, line break): use a plain path"
        )
    return python


def _check_name(what: str, value: str | None) -> None:
    if value is not None and not re.fullmatch(r"[A-Za-z0-9_.+-]+", value):
        raise ConfigError(
            f"{what} {value!r} has characters SLURM or the shell would misread: use letters, "
            "digits, '.', '_', '+' or '-'"
        )


def workload_options(command_cli: Any) -> set[str]:
    """The option names (``--resume``, ``--mem`` ...) a workload's job command accepts."""
    return {
        o
        for p in getattr(command_cli, "params", ())
        for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]
    }


def check_workload_args(command_cli: Any, command: Sequence[str], argv: Sequence[str]) -> None:
    """Parse the job's arguments with its click command, without running it."""
    import click

    path = "hpcbatch " + " ".join(command)
    try:
        with command_cli.make_context(path, list(argv)):
            pass
    except click.exceptions.Exit:
        pass
    except click.UsageError as exc:
        raise ConfigError(
            f"the job would fail at once: '{path}' says: {exc.format_message().rstrip('.')}: "
            "fix the workload arguments after --"
        ) from None


def _workload_command(
    job: Sequence[str],
    plan: Plan,
    cmd_args: Sequence[str],
    profile: str | None,
    config_file: str | None,
    driver: bool,
    options: Collection[str],
) -> tuple[list[str], str]:
    """The ``hpcbatch <command> ...`` argv for the job, and what resubmitting does."""
    options = set(options)
    name = " ".join(job)
    command = list(job)
    if profile:
        command += ["--profile", profile]
    if config_file:
        command += ["--config", config_file]
    if driver:
        if "--cluster" not in options:
            raise ConfigError(
                f"'hpcbatch {name}' has no --cluster option, so it cannot drive worker "
                "jobs: render without --driver"
            )
        # The driver plans for the worker jobs' allocation (not its own small one): the
        # same figures as this plan (--mem in sbatch's units, whole MiB rounded up), so it
        # sizes workers as rendered here.
        mem = format_mem(plan.resources.memory_bytes)
        command += ["--cluster", "slurm", "--mem", mem, "--cpus", str(plan.resources.cpus)]
    command += list(cmd_args)
    if "--resume" in options:
        command.append("--resume")
        return command, "Submit this script again to resume."
    return command, f"'hpcbatch {name}' has no --resume: resubmitting starts again."


@dataclass(frozen=True)
class _Job:
    """What the script runs and how: resolved by :func:`render_sbatch`, used by its parts."""

    workload: str
    plan: Plan
    driver: bool
    walltime_s: int
    partition: str | None
    account: str | None
    job_name: str
    jobs: int


def render_sbatch(
    workload: str,
    plan: Plan,
    settings: Mapping[str, Any],
    *,
    walltime: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    job_name: str | None = None,
    extra: Sequence[str] = (),
    args: Sequence[str] = (),
    profile: str | None = None,
    config_file: str | None = None,
    driver: bool = False,
    python: str | None = None,
    driver_mem: str = "2G",
    jobs: int = 1,
    template_dir: Path | None = None,
    command: Sequence[str] = (),
    command_cli: Any = None,
    command_options: Collection[str] | None = None,
    check_command: bool = True,
    plan_note: str = "",
    gpus: str | None = None,
    gres: str | None = None,
) -> str:
    """A ready sbatch script for ``workload`` whose ``--mem``/``--cpus-per-task`` come from ``plan``.

    ``driver=False``: one node, ``hpcbatch <command> ... --resume`` on a local cluster
    of the plan's workers. ``driver=True``: a one-CPU driver job that runs the same
    command with ``--cluster slurm``; dask-jobqueue submits the workers as jobs of the
    plan's size (``--mem``/``--cpus`` given to the command), adaptively up to ``jobs``
    worker jobs so workers retiring at their lifetime are replaced. ``walltime``,
    ``partition`` and ``account`` default to the ``cluster`` settings; ``extra`` are
    more ``#SBATCH`` options; ``args`` go onto the workload command (a database URL
    with a password there becomes ``$HPCBATCH_DB_URL``).

    ``command``: the job's command under ``hpcbatch`` (default ``run WORKLOAD``), and
    ``command_cli`` its click command: its options decide the flags (``--resume`` only if
    it has one, the allocation as ``--mem`` in sbatch's units; ``command_options``
    overrides them) and, with ``check_command``, it parses the final command line now, so
    a missing argument fails here and not in the queue. ``plan_note`` goes into the
    plan's comment (e.g. that the item count was assumed). ``gpus`` / ``gres`` become
    ``#SBATCH --gpus`` / ``--gres`` lines as given (sbatch's forms: ``2``, ``a100:2``;
    ``gpu:2``, ``gpu:a100:2``); the plan's GPUs are in the script's comment.
    """
    job = _job(workload, plan, settings, driver, walltime, partition, account, job_name, jobs)
    for what, value in (("profile", profile),):
        _check_name(what, value)
    command = tuple(command) or ("run", workload)
    options = workload_options(command_cli) if command_options is None else command_options
    cmd_args, secret = scrub_args(args)
    argv, resume_text = _workload_command(
        command, plan, cmd_args, profile, config_file, driver, options
    )
    if check_command and command_cli is not None:
        check_workload_args(command_cli, command, argv[len(command) :])
    # cluster.job-extra-directives describe the worker jobs: the single-node job is one,
    # a driver is not (dask-jobqueue puts them on the worker jobs it submits).
    gpu = _gpu_directives(gpus, gres)
    directives = list(extra) if driver else gpu + list(extra)
    if not driver:
        directives += list(settings.get("cluster", {}).get("job-extra-directives") or [])
    values = _template_values(job, directives, plan_note)
    if driver and gpu:  # the GPUs go on the worker jobs, not on the driver
        values["exports"] += "\n" + _worker_gpu_export(settings, gpu, profile, config_file)
    values.update(
        resume_text=resume_text,
        secret_note=_SECRET_NOTE if secret else "",
        python=_check_python(python or sys.executable),
        command=" ".join(_quote(a) for a in argv),
        driver_mem=driver_mem,
    )
    template = load_template("driver.sbatch" if driver else "local.sbatch", template_dir)
    try:
        return template.substitute(values)
    except (KeyError, ValueError) as exc:
        raise ConfigError(
            f"sbatch template is broken ({exc}): fix the $placeholders in it"
        ) from None


def _gpu_directives(gpus: str | None, gres: str | None) -> list[str]:
    """``--gpus=N`` / ``--gres=gpu:N`` directives, their characters checked."""
    out = []
    for flag, value in (("--gpus", gpus), ("--gres", gres)):
        if value is None:
            continue
        if not re.fullmatch(r"[A-Za-z0-9_.:,+-]+", str(value)):
            raise ConfigError(
                f"{flag} {value!r} has characters sbatch would misread: e.g. {flag} "
                + ("a100:2" if flag == "--gpus" else "gpu:a100:2")
            )
        if str(value) != "0":
            out.append(f"{flag}={value}")
    return out


def _worker_gpu_export(
    settings: Mapping[str, Any], gpu: list[str], profile: str | None, config_file: str | None
) -> str:
    """A driver's GPUs: ``cluster.job-extra-directives`` of the worker jobs dask-jobqueue
    submits, exported into the driver's environment (below a profile or --config file in
    the settings' layers, so one that sets the list itself is refused)."""
    from . import config as hb_config

    for what, path in (("profile", profile and hb_config.profile_path(profile)),
                       ("--config file", config_file)):  # fmt: skip
        if path and "job-extra-directives" in hb_config.read_file(path).get("cluster", {}):
            raise ConfigError(
                f"--gpus/--gres with --driver, and the {what} sets cluster.job-extra-directives "
                f"(it would replace the GPUs): add '{gpu[0]}' to that list instead"
            )
    directives = [*gpu, *(settings.get("cluster", {}).get("job-extra-directives") or [])]
    # a JSON list is a Python literal too: what Dask parses an environment variable with
    return f"export DASK_HPCBATCH__CLUSTER__JOB_EXTRA_DIRECTIVES={shlex.quote(json.dumps(directives))}"


_SECRET_NOTE = (
    f"# The database URL is read from ${DB_URL_ENV} at run time (export it before sbatch;\n"
    "# sbatch passes your environment to the job). It is never written into this file.\n"
)


def _job(workload, plan, settings, driver, walltime, partition, account, job_name, jobs) -> _Job:
    """The job's settings, defaults from the ``cluster`` section, names checked."""
    cluster = settings.get("cluster", {})
    job = _Job(
        workload=workload,
        plan=plan,
        driver=driver,
        walltime_s=parse_walltime(walltime or cluster.get("walltime") or "01:00:00"),
        partition=partition or cluster.get("queue"),
        account=account or cluster.get("account"),
        job_name=job_name or f"hpcbatch-{workload}",
        jobs=jobs,
    )
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    for what, value in (
        ("partition", job.partition),
        ("account", job.account),
        ("job name", job.job_name),
    ):
        _check_name(what, value)
    return job


def _template_values(job: _Job, directives: list[str], plan_note: str) -> dict[str, str]:
    """The template's $placeholders for the job's size, its plan and its walltime."""
    plan, fb = job.plan, format_bytes
    # the plan's reserve: the setting, or the workload's measured driver if larger
    size = job_size(plan, 0 if job.driver else plan.reserve_bytes)
    exports = _driver_exports(job.partition, job.account, job.walltime_s, job.jobs)
    return {
        "workload": job.workload,
        "job_name": job.job_name,
        "cpus": str(size.cpus),
        "mem": size.sbatch_mem,
        "mem_exact": fb(size.mem_bytes),
        "walltime": format_walltime(job.walltime_s),
        "signal_seconds": str(min(WALLTIME_WARNING_S, max(10, job.walltime_s // 10))),
        "directives": _directive_lines(job.partition, job.account, directives),
        "n_workers": str(plan.n_workers),
        "threads": str(plan.threads_per_worker),
        "memory_limit": fb(plan.memory_limit_bytes),
        "node_shared": fb(size.node_shared_bytes),
        "reserve": fb(size.reserve_bytes),
        "chunk_size": str(plan.chunk_size),
        "item": plan.footprint.item_name,
        "n_items": str(plan.footprint.n_items),
        "n_chunks": str(plan.n_chunks),
        "plan_note": "".join(
            f"#   {line}\n" for line in (*plan_note.splitlines(), _gpu_note(plan)) if line.strip()
        ),
        "peak": fb(plan.predicted_peak_bytes),
        "plan_source": _plan_source(plan),
        "worker_walltime": format_walltime(job.walltime_s),
        "jobs": str(job.jobs),
        "exports": exports if job.driver else "",
    }


def _plan_source(plan: Plan) -> str:
    """The allocation the plan is for: memory, CPUs and GPUs."""
    res = plan.resources
    text = f"{format_bytes(res.memory_bytes)}, {res.cpus} CPUs"
    if res.gpus:
        n = len(res.gpus)
        text += f", {n} GPU{'s' if n > 1 else ''} ({format_bytes(res.gpus[0].total_bytes)} each)"
    return text


def _gpu_note(plan: Plan) -> str:
    """The plan's GPU batch, when it sized one."""
    if plan.gpu_batch_size is None:
        return ""
    return f"GPU batch: {plan.gpu_batch_size} {plan.footprint.item_name}s per inference batch"


def _driver_exports(partition: str | None, account: str | None, walltime_s: int, jobs: int) -> str:
    # Adaptive, not a fixed scale: dask-jobqueue replaces workers that retire at their
    # --lifetime only in adaptive mode.
    lines = [
        f"export DASK_HPCBATCH__CLUSTER__WALLTIME={format_walltime(walltime_s)}",
        f"export DASK_HPCBATCH__CLUSTER__ADAPT_MAXIMUM={jobs}",
    ]
    if partition:
        lines.append(f"export DASK_HPCBATCH__CLUSTER__QUEUE={partition}")
    if account:
        lines.append(f"export DASK_HPCBATCH__CLUSTER__ACCOUNT={account}")
    return "\n".join(lines)


# ------------------------------------------------------- dask-jobqueue ------------


@dataclass(frozen=True)
class SlurmClusterSpec:
    """The ``SLURMCluster`` keyword arguments for a plan, and what was checked."""

    kwargs: dict
    derived_memory_limit: int  # what dask-jobqueue alone would give each worker
    memory_limit: int  # what each worker gets (the plan's, pinned with --memory-limit)
    notes: tuple[str, ...] = field(default=())


def threshold_exports(thresholds: Mapping[str, Any]) -> list[str]:
    """``export DASK_DISTRIBUTED__WORKER__MEMORY__<NAME>=<value>`` for a job script."""
    lines = []
    for name in ("target", "spill", "pause", "terminate"):
        if name in thresholds:
            value = thresholds[name]
            text = "False" if value is False else repr(float(value))
            lines.append(f"export DASK_DISTRIBUTED__WORKER__MEMORY__{name.upper()}={text}")
    return lines


def slurm_cluster_kwargs(
    plan: Plan,
    settings: Mapping[str, Any],
    *,
    python: str | None = None,
    job_name: str | None = None,
    log_directory: str | None = None,
) -> SlurmClusterSpec:
    """``SLURMCluster`` kwargs so each job runs the plan's workers with the plan's limit.

    cores = workers x threads, processes = workers, memory = workers x memory_limit
    (+ node-shared mmap'd bytes); the job's ``--mem`` is passed in whole MiB (dask-
    jobqueue alone rounds up to whole GiB). dask-jobqueue gives each worker
    ``format_bytes(memory / processes)`` (two significant decimals); the plan's exact
    limit is pinned with ``--memory-limit`` and any difference is noted.
    """
    cluster = settings.get("cluster", {})
    walltime_s = parse_walltime(cluster.get("walltime") or "01:00:00")
    lifetime, stagger = worker_lifetime(walltime_s)
    size = job_size(plan, 0)
    memory = size.mem_bytes
    limit = plan.memory_limit_bytes
    derived = parse_bytes(format_bytes(memory / plan.n_workers).replace(" ", ""))
    notes = []
    if abs(derived - limit) > 0:
        notes.append(
            f"dask-jobqueue would give each worker {format_bytes(derived)} ({derived} bytes) "
            f"= memory / processes rounded; pinned to the plan's {limit} bytes with --memory-limit"
        )
    worker_args = [
        "--memory-limit",
        str(limit),
        "--lifetime",
        f"{lifetime}s",
        "--lifetime-stagger",
        f"{stagger}s",
    ]
    prologue = threshold_exports(plan.thresholds)
    # as dask_memory_config does for local workers (its memory grows through long runs)
    profile = "True" if cluster.get("worker-profile") else "False"
    prologue.append(f"export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED={profile}")
    kwargs: dict[str, Any] = {
        "cores": plan.n_workers * plan.threads_per_worker,
        "processes": plan.n_workers,
        "memory": f"{memory}B",
        "job_mem": f"{size.mem_mb}M",
        "walltime": format_walltime(walltime_s),
        "queue": cluster.get("queue"),
        "account": cluster.get("account"),
        "job_extra_directives": list(cluster.get("job-extra-directives") or []),
        "interface": cluster.get("interface"),
        "local_directory": cluster.get("local-directory"),
        "python": python or sys.executable,
        "worker_extra_args": worker_args,
        "job_script_prologue": prologue,
        "job_name": job_name or f"hpcbatch-{plan.footprint.workload}",
    }
    if log_directory:
        kwargs["log_directory"] = log_directory
    # The scheduler listens where the worker jobs on other nodes reach it (cluster.interface,
    # else every interface); its dashboard (no authentication) on this node's loopback only,
    # reached with the SSH tunnel line, unless cluster.dashboard-address says otherwise
    # (":PORT" opens it on every interface). dask-jobqueue alone would use ":8787".
    dash = str(cluster.get("dashboard-address") or DEFAULT_DASHBOARD_ADDRESS)
    kwargs["scheduler_options"] = {"dashboard_address": dash}
    return SlurmClusterSpec(
        kwargs=kwargs, derived_memory_limit=derived, memory_limit=limit, notes=tuple(notes)
    )


def dashboard_host(address: str | int | None) -> str | None:
    """The host a dashboard address (``127.0.0.1:8787``, ``[::1]:0``, ``:8787``) binds to;
    None when it binds every interface or the scheduler's own host (a bare port)."""
    text = str(address or "").strip()
    m = re.fullmatch(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:]*)):\d+", text)
    host = (m.group("v6") or m.group("host")) if m else None
    return None if host in (None, "", "0.0.0.0", "::") else host


@functools.cache
def _cluster_class() -> type:
    """``SLURMCluster`` whose dashboard link names where the dashboard listens.

    dask-jobqueue's link takes the scheduler's host (the node's network address) even
    when the dashboard listens on 127.0.0.1 only, so the printed link would not open.
    """
    from dask_jobqueue import SLURMCluster
    from distributed.utils import format_dashboard_link

    class HpcbatchSLURMCluster(SLURMCluster):
        @property
        def dashboard_link(self) -> str:
            spec = getattr(self, "hpcbatch_spec", None)
            options = spec.kwargs.get("scheduler_options", {}) if spec else {}
            host = dashboard_host(options.get("dashboard_address"))
            port = self.scheduler_info.get("services", {}).get("dashboard")
            if host is None or port is None:
                return super().dashboard_link
            return format_dashboard_link(f"[{host}]" if ":" in host else host, port)

    return HpcbatchSLURMCluster


def check_interface(interface: str | None) -> None:
    """The scheduler binds to ``interface`` on this node: it must exist here."""
    if not interface:
        return
    import psutil

    have = sorted(psutil.net_if_addrs())
    if interface not in have:
        raise ConfigError(
            f"network interface {interface!r} does not exist on this node (it has "
            f"{', '.join(have)}): set cluster.interface to one of them, or leave it unset"
        )


def slurm_cluster(plan: Plan, settings: Mapping[str, Any], *, security: Any = None, **kw: Any):
    """A ``dask_jobqueue.SLURMCluster`` for ``plan`` (no jobs submitted until you scale).

    ``security`` (:func:`hpcbatch.security.cluster_security`) turns on TLS; temporary
    certificates are written for the worker jobs (mode 0600) into the current directory,
    which the jobs must see (a shared filesystem).
    """
    try:
        cluster_class = _cluster_class()
    except ImportError:  # pragma: no cover - a declared dependency
        raise ClusterStartError(
            "dask-jobqueue is not installed: pip install dask-jobqueue"
        ) from None
    spec = slurm_cluster_kwargs(plan, settings, **kw)
    check_interface(spec.kwargs.get("interface"))
    tls = {"security": security, "shared_temp_directory": os.getcwd()} if security else {}
    kwargs = dict(spec.kwargs)
    directives = list(kwargs.get("job_extra_directives") or [])
    if not any(d.split("=")[0] in ("--requeue", "--no-requeue") for d in directives):
        # a lost worker job is replaced by hpcbatch (WorkerJobWatch) at once: a SLURM requeue
        # after a node failure would restart it silently, cred_expire (120 s) later
        directives.append("--no-requeue")
    kwargs["job_extra_directives"] = directives
    cluster = cluster_class(**kwargs, **tls)
    cluster.hpcbatch_spec = spec
    for note in spec.notes:
        logger.info("%s", note)
    given = job_script_memory_limit(cluster.job_script())
    if given != plan.memory_limit_bytes:
        cluster.close()
        raise ClusterStartError(
            f"dask-jobqueue's worker command would give each worker {given} bytes, not the plan's "
            f"{plan.memory_limit_bytes}: this dask-jobqueue orders worker arguments differently; "
            "pin dask-jobqueue 0.9 or report it"
        )
    return cluster


def job_script_memory_limit(script: str) -> int | None:
    """The memory limit a dask-jobqueue job script gives each worker (the last
    ``--memory-limit`` wins on the worker's command line)."""
    found = re.findall(r"--memory-limit[ =](\S+)", script)
    if not found:
        return None
    try:
        return parse_bytes(found[-1])
    except ConfigError:
        return None


# --------------------------------------------------------- jobs -------------------

#: ``run(argv) -> (returncode, stdout, stderr)``; replace it in tests.
CommandRunner = Callable[[Sequence[str]], tuple[int, str, str]]


def _runner() -> CommandRunner:
    """The module's command layer, looked up at call time so tests can replace it."""
    return subprocess_runner


def subprocess_runner(argv: Sequence[str]) -> tuple[int, str, str]:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: command not found"
    except subprocess.TimeoutExpired:
        return 124, "", f"{' '.join(argv)} timed out"
    return r.returncode, r.stdout, r.stderr


def submit(
    script: str | Path, *, run: CommandRunner | None = None, sbatch_args: Sequence[str] = ()
) -> str:
    """``sbatch --parsable`` a script file; returns the job id."""
    run = run or _runner()
    code, out, err = run(["sbatch", "--parsable", *sbatch_args, str(script)])
    if code != 0:
        raise HpcbatchError(
            f"sbatch failed: {err.strip() or out.strip()}: check the script "
            "and that SLURM_CONF / the partition are right"
        )
    return out.strip().split(";")[0]


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job`` output (one or many lines) -> {Key: value}."""
    fields: dict[str, str] = {}
    for token in re.findall(r"(\w[\w/:]*)=(.*?)(?=\s+\w[\w/:]*=|\s*$)", text.strip(), flags=re.S):
        fields.setdefault(token[0], token[1].strip())
    return fields


def job_info(job_id: str, *, run: CommandRunner | None = None) -> dict[str, str] | None:
    """``scontrol show job -o`` fields, or None once SLURM has forgotten the job."""
    run = run or _runner()
    code, out, _ = run(["scontrol", "show", "job", "-o", str(job_id)])
    if code != 0 or "JobId=" not in out:
        return None
    return parse_scontrol(out.splitlines()[0])


SACCT_FIELDS = ("JobID", "State", "ExitCode", "Timelimit", "Elapsed", "NodeList")


def sacct_record(job_id: str, *, run: CommandRunner | None = None) -> dict[str, str] | None:
    """The job from SLURM accounting (``sacct``), in ``scontrol``'s field names.

    Used once ``scontrol`` has forgotten the job. A step that ran out of memory
    (``OUT_OF_MEMORY`` on ``JOBID.batch``) makes the job's state ``OUT_OF_MEMORY``.
    """
    run = run or _runner()
    code, out, _ = run(["sacct", "-j", str(job_id), "-n", "-P", "-o", ",".join(SACCT_FIELDS)])
    if code != 0:
        return None
    rows = [dict(zip(SACCT_FIELDS, line.split("|"), strict=False)) for line in out.splitlines()]
    main = next((r for r in rows if r.get("JobID") == str(job_id)), None)
    if main is None:
        return None
    state = main.get("State") or "UNKNOWN"
    if any(r.get("State", "").startswith("OUT_OF_MEMORY") for r in rows):
        state = "OUT_OF_MEMORY"
    return {
        "JobId": str(job_id),
        "JobState": state,
        "ExitCode": main.get("ExitCode", ""),
        "TimeLimit": main.get("Timelimit", ""),
        "RunTime": main.get("Elapsed", ""),
        "NodeList": main.get("NodeList", ""),
        "Source": "sacct",
    }


def jobcomp_record(job_id: str, path: str | Path) -> dict[str, str] | None:
    """The job's line in a ``jobcomp/filetxt`` file (kept after scontrol forgets the job)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith(f"JobId={job_id} "):
            return parse_scontrol(line)
    return None


FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
}


def job_state(fields: Mapping[str, str] | None) -> str:
    """The state word of a job's fields (``CANCELLED`` of ``CANCELLED by 0``);
    ``UNKNOWN`` where there is none (no fields, an empty state)."""
    words = ((fields or {}).get("JobState") or "").split()
    return words[0] if words else "UNKNOWN"


def wait_for_job(
    job_id: str,
    *,
    timeout: float = 300,
    poll: float = 0.25,
    run: CommandRunner | None = None,
    jobcomp: str | Path | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, str]:
    """Poll until the job has finished; its final ``scontrol`` (or jobcomp) fields."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id, run=run)
        if info is None and jobcomp is not None:
            info = jobcomp_record(job_id, jobcomp)
        if info is None:
            info = sacct_record(job_id, run=run)
        state = job_state(info)
        if state in FINISHED_STATES:
            return info
        if info is None:
            raise HpcbatchError(
                f"SLURM does not know job {job_id}: check the job id and SLURM_CONF"
            )
        if time.monotonic() > deadline:
            raise HpcbatchError(
                f"job {job_id} still {state} after {timeout:.0f} s: "
                f"check squeue -j {job_id}"
            )
        sleep(poll)


@dataclass(frozen=True)
class JobDeath:
    """Why a job ended. ``reason``: completed | memory | walltime | node | preempted |
    cancelled | interrupted (hpcbatch stopped on SIGTERM, not at the walltime) | other."""

    job_id: str
    state: str
    reason: str
    detail: str
    exit_code: str = ""

    def __str__(self) -> str:
        return f"job {self.job_id}: {self.state} -> {self.reason}: {self.detail}"


_MEMORY_PATTERNS = (
    re.compile(r"exceeded (job )?memory limit", re.I),
    re.compile(r"oom[-_ ]kill", re.I),
    re.compile(r"out of memory", re.I),
)
_TIME_PATTERNS = (re.compile(r"DUE TO TIME LIMIT", re.I),)
_NODE_PATTERNS = (re.compile(r"DUE TO NODE FAILURE", re.I),)
# hpcbatch's own stop on SIGTERM (RunInterrupted, exit code 3)
_STOPPED_PATTERNS = (re.compile(r"run '.*' stopped by SIG\w+ with"),)

#: The most seconds before the walltime that rendered scripts ask for SIGTERM
#: (``--signal=B:TERM@S``, S = a tenth of the walltime, 10 s to 5 min).
WALLTIME_WARNING_S = 300


def _duration(text: str | None) -> int | None:
    """SLURM's ``[D-]HH:MM:SS`` (RunTime, TimeLimit) in seconds; None if unlimited/odd."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)", (text or "").strip())
    if not m:
        return None
    d, h, mi, sec = (int(x) if x else 0 for x in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + sec


def _seconds_left(fields: Mapping[str, str]) -> int | None:
    limit, ran = _duration(fields.get("TimeLimit")), _duration(fields.get("RunTime"))
    return None if limit is None or ran is None else max(0, limit - ran)


def classify_job(fields: Mapping[str, str], output: str = "") -> tuple[str, str]:
    """(reason, detail) from a job's state fields and the tail of its output."""
    state = job_state(fields)
    exit_code = fields.get("ExitCode", "")
    lines = output.splitlines()

    def first(patterns: Sequence[re.Pattern]) -> str | None:
        for line in lines:
            if any(p.search(line) for p in patterns):
                return line.strip()
        return None

    mem_line = first(_MEMORY_PATTERNS)
    if state == "OUT_OF_MEMORY":
        return "memory", mem_line or "SLURM state OUT_OF_MEMORY (the job's cgroup hit --mem)"
    if mem_line:
        return "memory", mem_line
    if state in ("TIMEOUT", "DEADLINE") or first(_TIME_PATTERNS):
        limit = fields.get("TimeLimit", "?")
        return "walltime", first(_TIME_PATTERNS) or f"reached its time limit {limit}"
    if state == "NODE_FAIL" or first(_NODE_PATTERNS):
        return "node", first(_NODE_PATTERNS) or f"node {fields.get('NodeList', '?')} failed"
    if state == "PREEMPTED":
        return "preempted", "preempted by a higher-priority job"
    if state == "CANCELLED":
        said = first((re.compile(r"\*\*\* JOB .* CANCELLED AT"),))
        return "cancelled", said or "cancelled by scancel (a user, an admin or a Dask scale-down)"
    stopped = first(_STOPPED_PATTERNS)
    if stopped and exit_code.startswith(f"{RunInterrupted.exit_code}:"):
        left = _seconds_left(fields)
        if left is not None and left <= WALLTIME_WARNING_S + 30:
            return "walltime", f"stopped at the walltime warning ({left} s left): {stopped}"
        return "interrupted", stopped
    if state == "COMPLETED" and exit_code in ("", "0:0"):
        return "completed", "finished with exit code 0"
    return "other", f"state {state}, exit code {exit_code or '?'} (see the job's output)"


def explain_job(
    job_id: str,
    *,
    run: CommandRunner | None = None,
    jobcomp: str | Path | None = None,
    output: str | Path | None = None,
    tail_bytes: int = 65536,
) -> JobDeath:
    """Why job ``job_id`` ended, from ``scontrol show job`` (else the jobcomp file, else
    ``sacct``) and the tail of its output.

    The output file is taken from ``StdOut`` unless given; memory kills by the
    ``jobacct_gather`` OverMemoryKill only show there (state FAILED, exit 0:9).
    """
    fields = _settled(job_info(job_id, run=run), job_id, run)
    if fields is None and jobcomp is not None:
        fields = jobcomp_record(job_id, jobcomp)
    if fields is None:
        fields = sacct_record(job_id, run=run)
    if fields is None:
        raise HpcbatchError(
            f"no record of job {job_id}: scontrol has forgotten it (MinJobAge), sacct has "
            "nothing (no accounting?) and no jobcomp line: pass --jobcomp FILE"
        )
    out_path = output or fields.get("StdOut")
    text = ""
    if out_path:
        out_path = str(out_path).replace("%j", str(job_id)).replace("%J", str(job_id))
        try:
            with open(out_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - tail_bytes))
                text = f.read().decode(errors="replace")
        except OSError:
            text = ""
    reason, detail = classify_job(fields, text)
    if reason == "cancelled":  # e.g. by Dask, its workers lost on a node SLURM now calls dead
        trouble = node_trouble(fields.get("NodeList", ""), run=run)
        if trouble:
            detail += f"; its node {trouble} is down now: a node failure may be the cause"
    return JobDeath(
        job_id=str(job_id),
        state=job_state(fields),
        reason=reason,
        detail=detail,
        exit_code=fields.get("ExitCode", ""),
    )


def _settled(fields: dict[str, str] | None, job_id: str, run: CommandRunner | None):
    """``scontrol``'s fields, with the final state from ``sacct`` while the job is still
    COMPLETING (its steps being cleaned up: a job past its time limit is TIMEOUT there
    already); unchanged where accounting has no final state yet."""
    if fields is None or job_state(fields) != "COMPLETING":
        return fields
    record = sacct_record(job_id, run=run)
    if record is None or job_state(record) not in FINISHED_STATES:
        return fields
    return {**fields, "JobState": record["JobState"], "ExitCode": record.get("ExitCode", "")}


#: Node states (``scontrol show node``, ``+``-joined) of a node that stopped working.
NODE_TROUBLE_STATES = frozenset({"DOWN", "NOT_RESPONDING", "FAIL", "FAILING"})


def node_trouble(nodelist: str, *, run: CommandRunner | None = None) -> str | None:
    """Which nodes of ``nodelist`` (a SLURM host list) SLURM now calls down or not
    responding, as ``NAME (STATE: REASON)``; None if every one answers or SLURM cannot say.

    A dead node's worker job is often cancelled by Dask (its workers lost for
    ``distributed.deploy.lost-worker-timeout``) before SLURM marks the node DOWN and the
    job NODE_FAIL (``SlurmdTimeout``, 300 s by default): the node's state tells them apart.
    """
    if not nodelist or nodelist.startswith(("None", "(null)")):
        return None
    code, out, _ = (run or _runner())(["scontrol", "show", "node", "-o", nodelist])
    if code != 0:
        return None
    bad = []
    for line in out.splitlines():
        fields = parse_scontrol(line)
        state = fields.get("State", "")
        if NODE_TROUBLE_STATES & set(state.split("+")):
            reason = fields.get("Reason", "")
            bad.append(f"{fields.get('NodeName', '?')} ({state}{': ' + reason if reason else ''})")
    return ", ".join(bad) or None
