"""The one way a run goes, for every workload.

    Resources + Footprint -> Plan -> cluster -> chunks + task -> runner -> report

:func:`plan_job` and :func:`plan_sizes` make the plan (``hpcbatch plan``, ``slurm render``,
and the start of every run); :func:`run_job` runs a prepared :class:`~hpcbatch.workload.Job`
on a local, SLURM or existing cluster, or on a client the caller already has.  Settings
are typed here, once (:class:`RunSettings`); nothing below restates a default.

For an existing cluster (``--cluster tcp://...``, a scheduler file, or ``client=``) the plan
is made for the workers that are there (their count, threads and memory limits), not for
this machine; for a local or SLURM cluster the cluster is started from the plan.

No workload is known here: a workload is a plugin on :mod:`hpcbatch.workload`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from . import config as hb_config
from .calibrate import Calibration, calibrated_footprint, check_probe
from .cluster import cluster_resources, forkserver_workers, open_cluster, start_forkserver
from .dashboard import install as install_dashboard
from .errors import ConfigError
from .ledger import Ledger
from .planner import Footprint, Plan, make_plan
from .resources import Resources, detect_resources
from .runner import run as run_chunks
from .runs import progress_watchers
from .workload import HeapTunedTask, Job, RunContext, RunSettings, Workload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterChoice:
    """Where a run's workers come from: ``local``, ``slurm`` or an existing ``address``."""

    backend: str = "local"
    address: str | None = None

    @classmethod
    def parse(cls, value: str | None, settings: Mapping[str, Any]) -> ClusterChoice:
        """From ``--cluster`` (local, slurm, tcp://host:port, tls://..., a scheduler file)."""
        cfg = settings["cluster"]
        if value is None:
            return cls(cfg["backend"], cfg["address"])
        if value in ("local", "slurm"):
            return cls(value, None)
        if value.startswith(("tcp://", "tls://")) or value.endswith(".json"):
            return cls("address", value)
        raise ConfigError(
            f"--cluster {value!r}: use local, slurm, a scheduler address tcp://host:8786 "
            "or a scheduler file ending in .json"
        )

    @property
    def existing(self) -> bool:
        return self.backend == "address"


@dataclass(frozen=True)
class Planned:
    """A plan and how its footprint was obtained (``calibration`` when measured)."""

    plan: Plan
    calibration: Calibration | None = None

    def extra(self) -> dict:
        return {"calibration": self.calibration.to_dict()} if self.calibration else {}


# ------------------------------------------------------------- settings ----


def load_settings(
    workload: Workload | None = None,
    profile: str | None = None,
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """The effective settings, with ``workload``'s own config section known to the config."""
    if workload is not None and workload.defaults:
        hb_config.register_section(workload.name, workload.defaults)
    return hb_config.load(profile, config_file, overrides)


def workload_settings(workload: Workload, settings: Mapping[str, Any]) -> Any:
    """``workload``'s typed settings from its section of the loaded settings."""
    return workload.settings(settings.get(workload.name) or {})


# ------------------------------------------------------------- planning ----


def calibrate_footprint(
    workload: Workload,
    footprint: Footprint,
    probe_kwargs: Mapping[str, Any],
    probe_sizes: tuple[int, int] | None = None,
    start: str = "spawn",
) -> tuple[Footprint, Calibration]:
    """``footprint`` measured by the workload's probe in child processes started as the
    run's workers are (``start``: ``"spawn"``, or ``"forkserver"`` for local workers
    forked from :func:`~hpcbatch.cluster.forkserver_workers`'s server)."""
    if not workload.probe:
        raise ConfigError(
            f"workload {workload.name!r} has no probe to calibrate with: drop --calibrate, "
            "or give the workload a probe ('module:function')"
        )
    check_probe(workload.probe)
    sizes = probe_sizes or workload.probe_sizes
    log.info("calibrating %s: running %s at sizes 0, %s, %s", workload.name, workload.probe, *sizes)
    return calibrated_footprint(
        footprint, workload.probe, sizes, dict(probe_kwargs), max_size=footprint.n_items,
        start=start,
    )  # fmt: skip


def make_planned(
    workload: Workload,
    footprint: Footprint,
    resources: Resources,
    settings: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> Plan:
    """:func:`~hpcbatch.planner.make_plan` with the loaded settings and the job's overrides
    (the workload's own chunk cap applies when the ``max-chunk`` setting is unset)."""
    overrides = {"max_chunk": settings["max-chunk"] or workload.max_chunk, **dict(overrides)}
    return make_plan(footprint, resources, hb_config.plan_settings(settings, **overrides))


def plan_sizes(
    workload: Workload,
    sizes: Mapping[str, Any],
    settings: Mapping[str, Any],
    resources: Resources,
    *,
    calibrate: bool | None = None,
    probe_sizes: tuple[int, int] | None = None,
) -> Planned:
    """The plan for ``sizes`` of ``workload`` on ``resources`` (no data needed)."""
    wsettings = workload_settings(workload, settings)
    footprint = workload.footprint(sizes, wsettings)
    calibration = None
    if settings["calibrate"] if calibrate is None else calibrate:
        kwargs = workload.probe_kwargs(sizes, wsettings)
        footprint, calibration = calibrate_footprint(workload, footprint, kwargs, probe_sizes)
    overrides = workload.plan_overrides(sizes, wsettings)
    return Planned(make_planned(workload, footprint, resources, settings, overrides), calibration)


def plan_job(
    job: Job,
    settings: Mapping[str, Any],
    resources: Resources,
    *,
    calibrate: bool | None = None,
    probe_sizes: tuple[int, int] | None = None,
    probe_start: str = "spawn",
    forked: bool = False,
) -> Planned:
    """The plan of a prepared job: its real footprint (measured when asked, by probes
    started as ``probe_start`` says: as the run's workers) on ``resources``; ``forked``:
    the workers are forked from the server that preloaded ``job.worker_preload`` (see
    :func:`worker_footprint`)."""
    footprint, calibration = worker_footprint(job, forked), None
    if settings["calibrate"] if calibrate is None else calibrate:
        footprint, calibration = calibrate_footprint(
            job.workload, footprint, job.probe_kwargs, probe_sizes or job.probe_sizes,
            probe_start,
        )  # fmt: skip
    overrides = job.plan_overrides()
    plan = make_planned(job.workload, footprint, resources, settings, overrides)
    return Planned(plan, calibration)


def worker_footprint(job: Job, forked: bool = False) -> Footprint:
    """The job's footprint for the workers it runs on.  Analytic footprints are in
    spawned-worker terms (SLURM workers, an existing cluster's); workers ``forked`` from
    the server that preloaded ``job.worker_preload`` (a local cluster) hold less: the
    job's :class:`~hpcbatch.workload.PreloadSaving` comes off its analytic footprint
    (a caller's own footprint and a probe's measurement are left as they are)."""
    if forked and job.worker_preload and job.preload_saving is not None:
        return job.preload_saving.applied(job.footprint)
    return job.footprint


# ------------------------------------------------------------------ runs ----


@dataclass(frozen=True)
class RunRequest:
    """How to run a prepared job (the CLI's and the Python API's common options)."""

    cluster: ClusterChoice = ClusterChoice()
    resources: Resources | None = None
    client: Any = None
    resume: bool = False
    run_id: str | None = None
    report_dir: str | None = None
    progress: bool = True
    quiet: bool = False
    calibrate: bool | None = None
    probe_sizes: tuple[int, int] | None = None


def warm_workers(workload: Workload, cluster: ClusterChoice, client: Any = None) -> None:
    """Before a local run's job is prepared: start its workers' forkserver, which imports
    ``workload.worker_preload`` (torch...) in its own process meanwhile.  Nothing for a
    given client, an existing cluster or SLURM (their workers are not forked here)."""
    local = client is None and not cluster.existing and cluster.backend == "local"
    if local and workload.worker_preload:
        start_forkserver(workload.worker_preload)


def run_job(job: Job, settings: Mapping[str, Any], request: RunRequest = RunRequest()) -> Any:
    """Plan, open the cluster, run every chunk, report; returns ``job.finish(report)``."""
    run_settings = RunSettings.from_config(settings)
    try:
        with _planned_client(job, settings, request) as (planned, client):
            report = _run_on(job, planned.plan, client, run_settings, request)
    except BaseException as exc:
        job.discard(exc)  # e.g. a first attempt's empty store; recorded chunks stay
        raise
    return job.finish(report)


@contextmanager
def _planned_client(
    job: Job, settings: Mapping[str, Any], request: RunRequest
) -> Iterator[tuple[Planned, Any]]:
    """The plan and a client on the cluster it runs on (planned from the workers there
    for an existing cluster or a given client; started from the plan otherwise)."""
    plan_kw = {"calibrate": request.calibrate, "probe_sizes": request.probe_sizes}
    if request.client is not None:
        yield _plan_for_client(job, settings, request.client, plan_kw), request.client
        return
    if request.cluster.existing:
        with open_cluster(
            None, settings, backend="address", address=request.cluster.address,
            quiet=request.quiet,
        ) as client:  # fmt: skip
            yield _plan_for_client(job, settings, client, plan_kw), client
        return
    resources = request.resources or detect_resources()
    local = request.cluster.backend == "local"
    forked = local and bool(job.worker_preload)  # SLURM's and existing workers: spawned
    with ExitStack() as stack:
        if forked:  # workers forked from a server that imported its modules: the plan
            stack.enter_context(forkserver_workers(job.worker_preload))  # takes the saving
        start = "forkserver" if local and _forkserver_method() else "spawn"
        planned = plan_job(job, settings, resources, **plan_kw, probe_start=start,
                           forked=forked)  # fmt: skip
        client = stack.enter_context(open_cluster(
            planned.plan, settings, backend=request.cluster.backend, quiet=request.quiet
        ))  # fmt: skip
        yield planned, client


def _forkserver_method() -> bool:
    """Whether local Dask workers start from the forkserver here (inside
    :func:`~hpcbatch.cluster.forkserver_workers`): a probe then starts the same way."""
    import dask

    return dask.config.get("distributed.worker.multiprocessing-method", "spawn") == "forkserver"


def _plan_for_client(job: Job, settings: Mapping[str, Any], client: Any, plan_kw: dict) -> Planned:
    """Planned for the workers that are there (the planner keeps their count, threads and
    memory limit: :attr:`Resources.workers`)."""
    return plan_job(job, settings, cluster_resources(client), **plan_kw)


def _run_on(
    job: Job,
    plan: Plan,
    client: Any,
    run_settings: RunSettings,
    request: RunRequest,
) -> Any:
    run_id = request.run_id or job.identity.run_id
    sink = job.sink
    ledger = Ledger(sink.ledger_url) if sink.ledger_url else None
    report_dir = request.report_dir if request.report_dir is not None else run_settings.report_dir
    task = job.task(plan, RunContext(run_id, client, run_settings))
    if job.worker_heap is not None:
        task = HeapTunedTask(task, job.worker_heap)
    return run_chunks(
        job.chunks(plan),
        task,
        client,
        run_id=run_id,
        ledger=ledger,
        params=dict(job.identity.params),
        commit_on_worker=sink.commit_on_worker,
        seed=run_settings.seed,
        plan=plan,
        report_dir=report_dir,
        resume=request.resume,
        progress=request.progress,
        progress_interval=run_settings.progress_interval,
        max_in_flight=run_settings.max_in_flight,
        retries=run_settings.retries,
        database=sink.database,  # None: the runner watches the ledger's database
        db_outage_s=run_settings.db_outage_s,
        max_bad_items=run_settings.max_bad_items,
        item_name=job.workload.item_name,
        watchers=(
            *progress_watchers(report_dir, run_id, job.workload.name, sink.ledger_url),
            *install_dashboard(client, plan, run_id),  # the live page: <dashboard>/hpcbatch
        ),
    )
