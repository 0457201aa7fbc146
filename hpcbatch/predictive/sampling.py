"""``hpcbatch.predictive.sample``: Predictive(parallel=True) in planned chunks over Dask.

A thin entry over the pipeline: :func:`~hpcbatch.predictive.task.prepare_job` checks the
request (the model's layout from one test run, the output, the run identity) and writes
large inputs once for memory-mapping; :func:`hpcbatch.pipeline.run_job` plans it (for a
given client's workers, or the allocation), opens the cluster and runs the chunks; the
samples come back as a dict of numpy arrays, or the zarr group with ``out=``.
``client="sync"`` runs every chunk in this process, planned for one worker.

Where the chunks run is an explicit decision (:class:`Execution`'s ``cluster``): the
default ``"auto"`` runs a job in this process, without Dask, when it fits one chunk
under the memory fraction of a one-worker plan *and* either its drawing is estimated
to take less than a cluster start (:data:`CLUSTER_START_S`; the estimate times a short
test draw, :func:`estimate_draw`) or there is one CPU to use (a cluster would add no
cores).  Anything else starts the cluster: a job larger than one chunk, or a long one
that the cluster's workers draw on several cores (Pyro's draws use one).  The decision
and its reason are logged and kept in :attr:`SampleRun.execution` (and in the run
report's ``message`` of an in-process run).

The chunk task, the zarr layout and the seeds are described in
:mod:`hpcbatch.predictive.task` (its public names are re-exported here).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any

import torch

from .. import config as hb_config
from .. import runner
from ..errors import ConfigError, HpcbatchError
from ..pipeline import ClusterChoice, RunRequest, plan_job, run_job
from ..planner import Plan
from ..resources import detect_resources
from ..units import format_bytes
from ..workload import PreloadSaving
from .core import _describe, preserved_rng
from .footprint import FORKSERVER_MEASURED, FORKSERVER_SAVING_BYTES, SOURCE
from .task import (  # noqa: F401  (_create_store, _guide_state: re-exported for benchmarks)
    _ARRAYS,
    _JOBS,
    ZARR_CHUNK_BYTES,
    MemorySink,
    PredictiveJob,
    SampleOptions,
    SampleRequest,
    SampleRun,
    SamplingJob,
    _chunk_error,
    _create_store,
    _guide_state,
    choose_block,
    default_run_id,
    draw_chunk,
    ledger_path,
    portable_guide,
    prepare_job,
    pyro_seed,
    run_chunk,
    run_params,
    sample_chunk_task,
    samples_per_zarr_chunk,
    technical_job,
)
from .workload import WORKLOAD

log = logging.getLogger(__name__)

# Execution.cluster: "auto" decides (in this process when the job fits one chunk),
# "cluster" always starts/uses the Dask cluster, "inprocess" never does.
CLUSTER_CHOICES = ("auto", "cluster", "inprocess")
# Execution.worker_start: how a local cluster starts its worker processes.  "forkserver"
# forks them from one server that imported torch, Pyro and zarr once, so their pages
# are shared (see docs/predictive.md, "Worker start method", for the measurement).
WORKER_STARTS = ("spawn", "forkserver")
FORKSERVER_PRELOAD = ("numpy", "torch", "pyro", "zarr", "hpcbatch.predictive.task")
FORKSERVER_SAVING = PreloadSaving(FORKSERVER_SAVING_BYTES, SOURCE, FORKSERVER_MEASURED)
# What starting a local cluster costs before its workers draw, for cluster="auto" (a job
# whose drawing is estimated shorter runs in this process).  Measured 2026-12-06 on the
# 2-core development machine (quiet, load < 2), a 16-sample job of the technical model
# (200 cells x 20 features, 2 workers, forkserver): cluster="cluster" took 4.3-4.5 s
# (7.1 s with a cold page cache) in a fresh driver (the forkserver imports torch, Pyro
# and zarr; scheduler, nannies and workers start; inputs shared) and 0.8-1.6 s once the
# driver's forkserver runs, against 0.12-0.14 s in-process.  A script calls sample()
# once: the fresh-driver cost, rounded down.
CLUSTER_START_S = 4.0
# The timed test draws of estimate_draw: about PROBE_VALUES values of the data plate's
# rows per sample (at most one block), the samples grown until one draw takes
# PROBE_TARGET_S; no further draw past PROBE_BUDGET_S in all unless the decision is
# still open, and none past PROBE_HARD_S (a busy machine's draws take longer).
PROBE_VALUES = 2**16
PROBE_TARGET_S = 0.03
PROBE_BUDGET_S = 0.15
PROBE_HARD_S = 0.6


@dataclass(frozen=True)
class Execution:
    """Where and how the chunks run, and what the plan is made for.

    ``client``: a Dask client (planned for its workers), ``"sync"`` (this process) or
    None (a cluster of ``cluster_backend``, default the ``cluster.backend`` setting,
    started from the plan).  ``resources``: the allocation to plan for (default
    detected).  ``settings``: the loaded settings (default :func:`hpcbatch.config.load`).
    ``footprint``: a Footprint, or ``f(layout, block)`` returning one.  ``report_dir``:
    where the run report goes (none unless given).  ``cluster``: ``"auto"`` (with no
    client: in this process when the whole job fits one chunk of a one-worker plan,
    else the cluster), ``"cluster"`` (always the cluster) or ``"inprocess"`` (as
    ``client="sync"``).  ``worker_start``: how a *local* cluster starts its workers:
    ``"forkserver"`` (default; forked from one server that imported torch and Pyro, so
    their pages are shared) or ``"spawn"`` (Dask's default: each imports them anew).
    ``cluster_start_s``: what ``cluster="auto"`` takes a cluster start to cost, in
    seconds (None: :data:`CLUSTER_START_S`); a job that fits one chunk and whose drawing
    is estimated shorter runs in this process (0: every multi-CPU job takes the cluster).
    """

    client: Any = None
    cluster_backend: str | None = None
    resources: Any = None
    settings: Mapping | None = None
    memory_fraction: float | None = None
    footprint: Any = None
    report_dir: str | os.PathLike | None = None
    progress: bool | None = None  # None: printed only on a terminal (logged either way)
    cluster: str = "auto"
    worker_start: str = "forkserver"
    cluster_start_s: float | None = None

    def __post_init__(self) -> None:
        if self.cluster_start_s is not None and not self.cluster_start_s >= 0:
            raise ConfigError(
                f"cluster_start_s must be a number of seconds >= 0, got {self.cluster_start_s!r}"
            )
        if self.worker_start not in WORKER_STARTS:
            raise ConfigError(
                f"worker_start must be one of {', '.join(WORKER_STARTS)}, got {self.worker_start!r}"
            )
        if self.cluster not in CLUSTER_CHOICES:
            raise ConfigError(
                f"cluster must be one of {', '.join(CLUSTER_CHOICES)}, got {self.cluster!r}"
            )
        if self.client is not None and self.cluster == "inprocess" and not self._sync:
            raise ConfigError("pass either a client or cluster='inprocess', not both")

    @property
    def _sync(self) -> bool:
        return isinstance(self.client, str) and self.client == "sync"

    @property
    def in_process(self) -> bool:
        return self._sync or self.cluster == "inprocess"


@dataclass(frozen=True)
class Calibrate:
    """Whether the job's footprint is measured by the workload's probe (None: the
    ``calibrate`` setting), and the probe's two sizes (None: the workload's)."""

    wanted: bool | None = None
    probe_sizes: tuple[int, int] | None = None


def _names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def run_sampling(model: Callable, *, num_samples: int, **keywords: Any) -> SampleRun:
    """:func:`sample` with everything around it: the plan, the run report, the layout.

    The keywords are those of :class:`~hpcbatch.predictive.task.SampleRequest` (guide,
    posterior_samples, model_args, model_kwargs, return_sites, data_plate, split_args),
    :class:`~hpcbatch.predictive.task.SampleOptions` (chunk_size, cell_block, out,
    overwrite, resume, seed, run_id, shared_dir, compress) and :class:`Execution`
    (client, cluster_backend, resources, settings, memory_fraction, footprint,
    report_dir, progress, cluster, worker_start, cluster_start_s).

    With ``out`` and a Dask cluster the run is recorded in a SQLite ledger beside the
    store (:func:`ledger_path`) under a run id derived from :func:`run_params`; a
    failed or interrupted run keeps its store and ledger, and ``resume=True`` runs
    only the chunks not yet recorded (``client="sync"`` cannot resume).
    """
    unknown = set(keywords) - _names(SampleRequest) - _names(SampleOptions) - _names(Execution)
    if unknown:
        raise TypeError(f"run_sampling() got unexpected keyword arguments: {sorted(unknown)}")

    def pick(cls) -> dict:
        return {k: v for k, v in keywords.items() if k in _names(cls)}

    request = SampleRequest(model, num_samples, **pick(SampleRequest))
    return sample_with(request, SampleOptions(**pick(SampleOptions)), Execution(**pick(Execution)))


def sample_with(
    request: SampleRequest, options: SampleOptions, execution: Execution = Execution()
) -> SampleRun:
    """Prepare the job of a caller's model and run it (its footprint: ``execution``'s,
    or sized from the returned sites; never calibrated, a caller's model has no probe)."""

    def prepare(in_process: bool) -> PredictiveJob:
        return prepare_job(
            WORKLOAD, request, options, in_process=in_process, footprint=execution.footprint
        )

    return prepare_and_run(prepare, options, execution, Calibrate(False))


def sample_technical(
    data_dir: str | os.PathLike,
    *,
    samples: int,
    with_observations: bool,
    options: SampleOptions,
    execution: Execution = Execution(),
    calibrate: Calibrate = Calibrate(),
) -> SampleRun:
    """The built-in technical model of a fitted data directory (``hpcbatch predictive
    sample``): planned with its analytic footprint, or measured by its probe."""

    def prepare(in_process: bool) -> PredictiveJob:
        return technical_job(
            WORKLOAD, data_dir, samples, with_observations, options, in_process=in_process
        )

    return prepare_and_run(prepare, options, execution, calibrate)


def _may_run_here(execution: Execution, options: SampleOptions, calibrate: Calibrate) -> bool:
    """Whether ``cluster="auto"`` may choose this process: no client, no resume (it
    needs the ledger a cluster run keeps), no probe asked for, not a given scheduler."""
    if execution.cluster != "auto" or execution.client is not None or options.resume:
        return False
    settings = _settings(execution, options.seed)
    backend = execution.cluster_backend or settings["cluster"]["backend"]
    wanted = settings["calibrate"] if calibrate.wanted is None else calibrate.wanted
    return backend != "address" and not settings["cluster"].get("address") and not wanted


def prepare_and_run(
    prepare: Callable[[bool], PredictiveJob],
    options: SampleOptions,
    execution: Execution,
    calibrate: Calibrate,
) -> SampleRun:
    """Prepare (``prepare(in_process)``) and run, deciding where for ``cluster="auto"``.

    The job is first prepared for this process (no inputs written, no ledger) and
    planned for one worker with its analytic footprint; :func:`choose_where` decides
    from that plan (and a timed test draw) whether it runs here, else it is prepared
    again for the cluster.  Either way :attr:`SampleRun.execution` says why.
    """
    if not _may_run_here(execution, options, calibrate):
        return run_prepared(prepare(execution.in_process), execution, calibrate)
    job = prepare(True)
    try:
        settings = _settings(execution, job.prep.seed)
        resources = execution.resources or detect_resources()
        plan = _local_plan(job, settings, execution, Calibrate(False), resources)
        where = choose_where(job, plan, settings["memory-fraction"], resources.cpus,
                             execution.cluster_start_s)  # fmt: skip
    except BaseException as exc:
        job.discard(exc)
        raise
    log.info("%s", where.reason)
    if where.in_process:
        here = replace(execution, cluster="inprocess")
        return run_prepared(job, here, Calibrate(False), plan=plan, reason=where.reason)
    shutil.rmtree(job.prep.scratch, ignore_errors=True)
    run = run_prepared(prepare(False), execution, calibrate)
    run.execution = where.reason
    return run


@dataclass(frozen=True)
class Where:
    """Where ``cluster="auto"`` runs a job, and why (the line logged and reported)."""

    in_process: bool
    reason: str
    estimate: DrawEstimate | None = None


@dataclass(frozen=True)
class DrawEstimate:
    """A job's drawing time in one process, fitted to timed test draws: ``fixed_s`` per
    model run (``runs`` of them) plus ``per_value_s`` for each of its ``values``."""

    seconds: float
    values: int  # the values the job draws: every returned site, every sample
    per_value_s: float  # the slope of the test draws' time over their values
    fixed_s: float  # their time at no values: Pyro's tracing, the model's fixed work
    runs: int  # model runs of the job in one process (blocks of the data plate)
    probe_samples: tuple[int, ...]  # samples of each test draw
    probe_rows: int | None  # data-plate rows of the test draws (None: not in blocks)
    probe_s: float  # what the test draws took in all
    upper_bound: bool = False  # no slope yet: the last draw's time per value (at most)

    def describe(self) -> str:
        rows = f" on {self.probe_rows} rows" if self.probe_rows is not None else ""
        sizes = "/".join(map(str, self.probe_samples))
        what = "at most" if self.upper_bound else "an estimated"
        return (
            f"{what} {_seconds(self.seconds)} of drawing ({self.values:,} values at "
            f"{self.per_value_s * 1e9:.3g} ns each, from test draws of {sizes} "
            f"sample{'s' if self.probe_samples[-1] > 1 else ''}{rows})"
        )


def _seconds(value: float) -> str:
    return f"{value:.2g} s" if value < 10 else f"{value:,.0f} s"


def choose_where(
    job: PredictiveJob, plan: Plan, fraction: float, cpus: int, cluster_start_s: float | None
) -> Where:
    """``cluster="auto"``'s decision for a job prepared in-process and its one-worker
    ``plan``: here when every sample fits one chunk and either the drawing is estimated
    shorter than a cluster start (``cluster_start_s``, default :data:`CLUSTER_START_S`)
    or ``cpus`` is 1; else the cluster."""
    n = job.layout.sites[0].shape[0]
    limit = format_bytes(plan.memory_limit_bytes)
    if plan.chunk_size < n:
        return Where(False, (
            f"cluster (cluster='auto'): {n} samples need {-(-n // plan.chunk_size)} chunks "
            f"of {plan.chunk_size} under {fraction:g} of {limit} in one process: starting "
            "the cluster"
        ))  # fmt: skip
    start_s = CLUSTER_START_S if cluster_start_s is None else float(cluster_start_s)
    fits = (
        f"all {n} samples fit one chunk (predicted peak "
        f"{format_bytes(plan.predicted_peak_bytes)}, under {fraction:g} of {limit})"
    )
    stay = "no cluster started (cluster='cluster' starts one)"
    if cpus <= 1:
        return Where(True, (
            f"in-process (cluster='auto'): {fits} and there is one CPU to use (a cluster "
            f"would add no cores): {stay}"
        ))  # fmt: skip
    estimate = estimate_draw(job.prep.sampling, enough=start_s)
    if estimate.seconds < start_s:
        return Where(True, (
            f"in-process (cluster='auto'): {fits}; {estimate.describe()}, shorter than a "
            f"cluster start (~{start_s:g} s): {stay}"
        ), estimate)  # fmt: skip
    return Where(False, (
        f"cluster (cluster='auto'): {fits}, but {estimate.describe()} on one core, longer "
        f"than a cluster start (~{start_s:g} s), and {cpus} CPUs to draw at once: starting "
        "the cluster"
    ), estimate)  # fmt: skip


def estimate_draw(sampling: SamplingJob, enough: float | None = None) -> DrawEstimate:
    """The whole job's drawing time in one process, from test draws timed here (the
    caller's random state untouched): the same model, guide and inputs, on the job's
    first samples and, when it runs in blocks, on about :data:`PROBE_VALUES` values of
    the data plate's rows, with one torch thread (see :func:`_test_draws`).  The test
    draws are vectorised runs alone (``lean``, ~3x cheaper each than Predictive's call);
    where the job itself draws through Predictive's own call (one block), the two
    unvectorised runs of guide and model Predictive makes first are added, each at the
    fitted time of a one-sample draw of the whole job.

    Where the last draw took at least 1.25 times the one-sample draw, the line through
    the two (time over values) gives a fixed cost per model run and a cost per value,
    and the estimate is both times the job's runs and values; else the last draw's time
    per value times the job's values (an upper bound: the job spreads the fixed costs
    over more values).  ``enough``: the time the caller compares with (a cluster
    start): the draws stop as soon as the estimate is under half of it or over twice
    it (more draws could not change the decision), and past :data:`PROBE_BUDGET_S`
    they go on only while it is within a factor 2."""
    layout = sampling.layout
    total = layout.sites[0].shape[0]
    rows, runs = None, 1
    if layout.needs_blocks:
        plate = layout.plate_size or 1
        per_row = _values(layout, 1, 1) - _values(layout, 1, 0)
        rows = max(1, min(sampling.block or plate, plate, PROBE_VALUES // max(1, per_row)))
        runs = -(-plate // (sampling.block or plate))
    values = _values(layout, total, layout.plate_size or 0)
    # one block: the job's draw is Predictive's call, which first runs guide and model
    # twice more, unvectorised: each about a one-sample draw of the whole job
    one_block = runs == 1
    one_sample = values / max(1, total)
    draw = _TestDraw(sampling, rows)

    def fit(points: list[tuple[int, float]]) -> tuple[float, float, float, bool]:
        """(seconds, per value, fixed per run, whether the slope stands out of the
        noise) from the first and last test draw."""
        (n1, t1), (n2, t2) = points[0], points[-1]
        v1, v2 = _values(layout, n1, rows or 0), _values(layout, n2, rows or 0)
        predictive_runs = 2 if one_block and draw.lean else 0
        if n2 > n1 and t2 >= 1.25 * t1:
            per_value = (t2 - t1) / max(1, v2 - v1)
            fixed = max(0.0, t1 - per_value * v1)
            extra = predictive_runs * (fixed + per_value * one_sample)
            return fixed * runs + per_value * values + extra, per_value, fixed, True
        per_value = t2 / max(1, v2)
        extra = predictive_runs * max(t1, per_value * one_sample)
        return per_value * values + extra, per_value, 0.0, False

    def open_(points: list[tuple[int, float]]) -> bool:
        """Whether more draws could change the decision: the estimate within a factor 2
        of ``enough``, or an upper bound (no slope yet) not under half of it."""
        seconds, _, _, line = fit(points)
        return enough is not None and enough / 2 <= seconds and (not line or seconds <= 2 * enough)

    def decided(points: list[tuple[int, float]]) -> bool:
        return enough is not None and not open_(points)

    points, spent = _test_draws(draw, total, open_, decided)
    log.debug("test draws (samples, seconds)%s: %s", f" on {rows} rows" if rows else "",
              ", ".join(f"({n}, {t:.4f})" for n, t in points))  # fmt: skip
    seconds, per_value, fixed, line = fit(points)
    sizes = tuple(n for n, _ in points)
    return DrawEstimate(seconds, values, per_value, fixed, runs, sizes, rows, spent, not line)


def _test_draws(
    draw: _TestDraw, total: int,
    open_: Callable[[list[tuple[int, float]]], bool],
    decided: Callable[[list[tuple[int, float]]], bool] = lambda _points: False,
) -> tuple[list[tuple[int, float]], float]:  # fmt: skip
    """Timed draws ``[(samples, seconds)]`` and their total: one sample twice (the
    faster counts), then 4 to 16 times as many samples until a draw takes three times
    the first (the fixed costs then weigh little) and :data:`PROBE_TARGET_S`, holds
    every sample, or the decision is already ``decided`` (a job estimated at most
    0.75 s against a 4 s cluster start needs no finer estimate).  A draw that would
    pass :data:`PROBE_BUDGET_S` is made only while the decision is ``open_``, and none
    past :data:`PROBE_HARD_S`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as a worker draws (and steady on a busy machine)
    try:
        first = min(draw(1), draw(1))
        points, spent = [(1, first)], 2 * first
        goal = max(PROBE_TARGET_S, 3 * first)
        while points[-1][0] < total:
            n, took = points[-1]
            if len(points) > 1 and (took >= goal or decided(points)):
                break
            factor = min(16, max(4, math.ceil(goal / max(took, 1e-6))))
            cost = spent + took * factor
            if (
                len(points) > 1
                and cost > PROBE_BUDGET_S
                and (cost > PROBE_HARD_S or not open_(points))
            ):
                break
            n = min(total, n * factor)
            points.append((n, draw(n)))
            spent += points[-1][1]
    finally:
        torch.set_num_threads(threads)
    return points, spent


def _values(layout, n: int, rows: int) -> int:
    """Values of the returned sites in ``n`` samples, with ``rows`` rows of the plate."""
    total = 0
    for site in layout.sites:
        per_sample = math.prod(site.shape[1:])
        if site.plate_axis is not None:
            per_sample = per_sample // max(1, site.shape[site.plate_axis]) * rows
        total += per_sample
    return n * total


class _TestDraw:
    """Timed, discarded draws of the job's first ``n`` samples (on ``rows`` rows of the
    plate when it runs in blocks): ``lean`` (vectorised runs alone) unless a lean draw
    fails (say a guide whose own plates clash with the model's nesting); from then on
    they time Predictive's own call and ``lean`` is False."""

    def __init__(self, sampling: SamplingJob, rows: int | None):
        self.sampling, self.rows, self.lean = sampling, rows, True

    def __call__(self, n: int) -> float:
        try:
            return _timed_draw(self.sampling, n, self.rows, lean=self.lean)
        except Exception as exc:  # noqa: BLE001 (any failure of the lean run alone)
            if not self.lean:
                raise
            log.debug("lean test draw failed (%s): timing Predictive's call", _describe(exc))
            self.lean = False
            return _timed_draw(self.sampling, n, self.rows, lean=False)


def _timed_draw(sampling: SamplingJob, n: int, rows: int | None, lean: bool = True) -> float:
    """Seconds to draw the first ``n`` samples (on ``rows`` rows of the plate), discarded."""
    if rows is not None:
        layout = replace(sampling.layout, plate_size=rows)
        sampling = replace(sampling, layout=layout, block=rows)
    with preserved_rng():
        t0 = time.perf_counter()
        run_chunk(sampling, runner.Chunk("estimate", 0, n), 0, _discard, lean=lean)
        return time.perf_counter() - t0


def _discard(*_piece: Any) -> int:
    return 0


def run_prepared(
    job: PredictiveJob,
    execution: Execution,
    calibrate: Calibrate,
    *,
    plan: Plan | None = None,
    reason: str = "",
) -> SampleRun:
    """Run a prepared job in this process or through the pipeline; after a failure the
    store is kept for ``--resume`` when chunks are recorded, else removed.  ``plan`` and
    ``reason``: an in-process run's plan and why it runs here (``cluster='auto'``)."""
    settings = _settings(execution, job.prep.seed)
    try:
        if execution.in_process:
            reason = reason or "in-process (asked for: client='sync' / cluster='inprocess')"
            return _run_here(job, settings, execution, calibrate, plan, reason)
        finished = _finished_report(job, settings, execution)
        if finished is not None:
            return job.finish(finished)
        request = _run_request(job, settings, execution, calibrate)
        local = execution.client is None and request.cluster.backend == "local"
        if execution.worker_start == "forkserver" and local:
            # the pipeline forks local workers from a server that imported these once,
            # and takes their saving off the analytic footprint (not off a caller's)
            job.worker_preload = FORKSERVER_PRELOAD
            job.preload_saving = FORKSERVER_SAVING
        return run_job(job, settings, request)
    except BaseException as exc:
        job.discard(exc)
        raise


def _settings(execution: Execution, seed: int) -> dict:
    """The loaded settings with this run's seed, report directory and memory fraction."""
    settings = dict(execution.settings) if execution.settings is not None else hb_config.load()
    settings.update({"seed": int(seed), "report-dir": execution.report_dir})
    if execution.memory_fraction is not None:
        settings["memory-fraction"] = execution.memory_fraction
    return settings


def _run_request(
    job: PredictiveJob, settings: Mapping, execution: Execution, calibrate: Calibrate
) -> RunRequest:
    cluster = settings["cluster"]
    choice = ClusterChoice(execution.cluster_backend or cluster["backend"], cluster["address"])
    return RunRequest(
        cluster=choice, resources=execution.resources, client=execution.client,
        resume=job.resuming, progress=execution.progress, quiet=not execution.progress,
        calibrate=calibrate.wanted, probe_sizes=calibrate.probe_sizes,
    )  # fmt: skip


def _local_plan(
    job: PredictiveJob, settings: Mapping, execution: Execution, calibrate: Calibrate,
    resources: Any = None,
):  # fmt: skip
    resources = resources or execution.resources or detect_resources()
    kwargs = {"calibrate": calibrate.wanted, "probe_sizes": calibrate.probe_sizes}
    return plan_job(job, settings, resources, **kwargs).plan


def _run_here(
    job: PredictiveJob, settings: Mapping, execution: Execution, calibrate: Calibrate,
    plan: Plan | None, reason: str,
) -> SampleRun:  # fmt: skip
    """Planned for one worker, every chunk in this process: into memory (no zarr) when
    the samples are returned, else into the zarr store."""
    plan = plan or _local_plan(job, settings, execution, calibrate)
    chunks, sampling = job.chunks(plan), job.prep.sampling
    ids = (job.identity.run_id, job.prep.seed, plan, reason)
    if job.prep.out is None:
        job.plan, sink = plan, MemorySink(job.layout)
        report = _run_in_process(partial(_memory_task, sampling, sink.put), chunks, *ids)
        shutil.rmtree(job.prep.scratch, ignore_errors=True)
        return SampleRun(sink.samples(), report, plan, job.layout, job.prep.block, reason)
    store = str(job.open_store(plan))
    key = f"sync-{uuid.uuid4().hex}"
    _JOBS[key] = sampling
    try:
        task = partial(sample_chunk_task, job_path=key, out=store)
        report = _run_in_process(task, chunks, *ids)
    finally:
        _JOBS.pop(key, None)
        for cache_key in [k for k in _ARRAYS if k[0] == store]:
            _ARRAYS.pop(cache_key, None)
    run = job.finish(report)
    run.execution = reason
    return run


def _memory_task(sampling: SamplingJob, put: Callable, chunk, ctx) -> dict:
    return run_chunk(sampling, chunk, ctx.seed, put)


def _finished_report(job: PredictiveJob, settings: Mapping, execution: Execution):
    """A resumed run its ledger records as finished: the runner says so without
    starting a cluster (None when there is anything to run, or a client is given)."""
    if execution.client is not None or not job.finished_before():
        return None
    plan = _local_plan(job, settings, execution, Calibrate(False))
    job.plan = plan
    return runner.run(
        job.chunks(plan), sample_chunk_task, None, run_id=job.identity.run_id,
        ledger=job.ledger(), params=dict(job.identity.params), resume=True,
        seed=job.prep.seed, plan=plan, progress=execution.progress,
    )  # fmt: skip


def _run_in_process(task, chunks, run_id, seed, plan, reason):
    """Every chunk in this process, one after another (no Dask): ``task(chunk, ctx)``."""
    import resource
    import time

    from ..chunkstate import ChunkStates, Policy
    from ..report import RunReport

    t0 = time.time()
    # the runner's own state machine: out of memory -> halved and retried, else fails
    states = ChunkStates(chunks, Policy(retries=0, min_chunk=1))
    while attempts := states.take(1):
        chunk = attempts[0].chunk
        ctx = runner.TaskContext(run_id, runner.chunk_seed(seed, chunk.chunk_id), 0)
        try:
            meta = task(chunk, ctx)
        except HpcbatchError:
            raise
        except Exception as exc:
            if runner.is_memory_error(exc):
                verdict = states.memory_failure(attempts[0], type(exc).__name__)
                if verdict.action == "split":
                    continue
            raise _chunk_error(chunk, exc) from exc
        states.succeeded(attempts[0], meta)
    total = {"samples": 0, "bytes_written": 0, **states.counters.meta}
    from ..calibrate import _vm_hwm

    # VmHWM, not ru_maxrss: the latter carries the parent's peak across exec.
    peak = _vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return RunReport(
        run_id=run_id,
        status="finished",
        n_chunks=len(chunks),
        chunks_done=len(chunks),
        chunks_split=states.counters.split,
        items_done=total["samples"],
        wall_time_s=time.time() - t0,
        plan=plan.to_dict(),
        predicted_peak_bytes=plan.predicted_peak_bytes,
        measured_peak_bytes=peak,
        measured_peak_per_worker={"this process (in-process)": peak},
        memory_limit_bytes=plan.memory_limit_bytes,
        results_meta={**total, "execution": "in-process"},
        message=reason,
    )


def sample(
    model: Callable,
    *,
    guide: Callable | None = None,
    posterior_samples: Mapping | None = None,
    num_samples: int,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    return_sites: Sequence[str] | None = None,
    data_plate: str | None = None,
    split_args: Sequence | None = None,
    chunk_size: int | str = "auto",
    client: Any = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    memory_fraction: float | None = None,
    overwrite: bool = False,
    cluster: str = "auto",
    as_tensors: bool = False,
    **options: Any,
):
    """Draw what ``pyro.infer.Predictive(model, guide=..., parallel=True)`` draws, in chunks.

    The chunk size comes from the memory planner (or ``chunk_size``); chunks run on the
    Dask workers of ``client``; with no client, ``cluster="auto"`` (the default) runs a
    job that fits one chunk in this process (no Dask; logged, and said in the run
    report) when its drawing is estimated shorter than a cluster start (or there is one
    CPU), and starts a local cluster from the plan for anything larger or longer;
    ``cluster="cluster"`` always starts it, ``cluster="inprocess"`` (or
    ``client="sync"``) never does.  Returns a dict of numpy arrays shaped as
    Predictive's output (torch tensors with ``as_tensors=True``, as Predictive returns),
    or with ``out="x.zarr"`` the zarr group the workers wrote.

    With ``data_plate`` and ``split_args``, the model runs block by block of that
    plate's rows for each chunk of samples, conditioned on one draw of the global
    latents, so observations far larger than memory are drawn consistently.  Further
    ``options`` (``cell_block``, ``footprint``, ``settings``, ``shared_dir``,
    ``compress``, ``run_id``, ``report_dir``, ``progress``, ``resources``,
    ``worker_start``, ``cluster_start_s``) go to :func:`run_sampling`.  ``compress``
    is the ``out`` store's codec: ``"lz4"`` (default; lossless, faster to write and
    read than no codec), ``"zstd"`` (smaller, slower) or ``"none"``.
    """
    run = run_sampling(
        model,
        guide=guide,
        posterior_samples=posterior_samples,
        num_samples=num_samples,
        model_args=model_args,
        model_kwargs=model_kwargs,
        return_sites=return_sites,
        data_plate=data_plate,
        split_args=split_args,
        chunk_size=chunk_size,
        client=client,
        out=out,
        seed=seed,
        memory_fraction=memory_fraction,
        overwrite=overwrite,
        cluster=cluster,
        **options,
    )
    if as_tensors:
        if out is not None:
            raise ConfigError("as_tensors=True returns the samples in memory: drop out=")
        import torch

        return {name: torch.from_numpy(value) for name, value in run.samples.items()}
    return run.samples


__all__ = [
    "CLUSTER_START_S",
    "Calibrate",
    "DrawEstimate",
    "Execution",
    "Where",
    "SampleOptions",
    "SampleRequest",
    "SampleRun",
    "SamplingJob",
    "CLUSTER_CHOICES",
    "ZARR_CHUNK_BYTES",
    "choose_block",
    "choose_where",
    "default_run_id",
    "draw_chunk",
    "estimate_draw",
    "ledger_path",
    "portable_guide",
    "prepare_and_run",
    "pyro_seed",
    "run_params",
    "run_sampling",
    "sample",
    "run_prepared",
    "sample_chunk_task",
    "sample_technical",
    "sample_with",
    "samples_per_zarr_chunk",
]
