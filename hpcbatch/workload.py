"""The Workload contract: what a batch job tells hpcbatch, and the registry of workloads.

A :class:`Workload` is one small object per kind of job.  It says

- its ``name`` (``hpcbatch plan NAME``, ``hpcbatch run NAME``, ``hpcbatch slurm render NAME``),
- its config section turned into a typed settings object (:meth:`Workload.settings`),
- what its work costs: :meth:`Workload.footprint` from the sizes a user gives before any
  data exists (``hpcbatch plan`` and ``slurm render`` need nothing else), and optionally a
  ``probe`` (``"module:function"``) that ``--calibrate`` runs in fresh processes,
- its CLI options: ``size_options`` (what the plan needs) and ``run_options`` (where the
  data and the results are), plain click parameters,
- :meth:`Workload.prepare`: check the inputs and return a :class:`Job`.

A :class:`Job` is one prepared run: its real footprint, its chunks for a plan, the task a
worker runs for a chunk, the sink (where results are committed exactly once together with
the chunk's ledger row) and the run identity that ``--resume`` finds again.

Everything else -- resources, planning, calibration, the cluster, bounded submission,
split-and-retry, resume, reports, SLURM scripts -- is :mod:`hpcbatch.pipeline`'s, once, for
every workload.  Workloads register through the ``hpcbatch.workloads`` entry-point group;
the built-in ``stocks`` and ``predictive`` register exactly as a third-party package does::

    [project.entry-points."hpcbatch.workloads"]
    scores = "my_package.workload:ScoresWorkload"

This module imports nothing of hpcbatch above the runtime layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from importlib import metadata
from typing import Any, ClassVar

from .chunkstate import QUARANTINED as QUARANTINED  # the meta key of a task's bad items
from .chunkstate import bad_item_limit
from .errors import ConfigError
from .planner import Footprint, Plan
from .runner import Chunk, TaskContext, make_chunks

ENTRY_POINT_GROUP = "hpcbatch.workloads"

log = logging.getLogger(__name__)

TaskFn = Callable[[Chunk, TaskContext], dict]
# A task reports the items it skipped as bad data in its meta under QUARANTINED
# ("quarantined"), e.g. {QUARANTINED: [{"item": "000001.SZ", "reason": "close is NULL on
# 20240529"}], ...}: the rest of its chunk counts as done; the runner lists them in the
# report, the closing line and the ledger, and fails the run past max-bad-items
# (RunSettings.max_bad_items).


@dataclass(frozen=True)
class Sink:
    """Where a run's results and its ledger go.

    ``ledger_url``: the SQLAlchemy URL of the ledger (done chunks). For a SQL sink it is the
    results' own database, and ``commit_on_worker=True`` says the task writes its rows and
    the chunk's ledger row in one transaction (:meth:`hpcbatch.ledger.Ledger.transaction`).
    For file sinks (zarr, Parquet) the ledger is a SQLite file beside the output and the
    runner records a chunk after its task returned (its writes are idempotent).
    ``database``: the URL the runner's outage breaker watches (default: the ledger's).
    ``None`` ledger: results are returned, nothing is recorded, no resume.
    """

    ledger_url: str | None = None
    commit_on_worker: bool = False
    database: str | None = None
    description: str = ""


@dataclass(frozen=True)
class RunIdentity:
    """How ``--resume`` finds a run again: its id, and what defines its output.

    A resumed run must have the same ``params`` (recorded in the ledger); ``run_id`` is
    derived from them by default, so the same inputs and settings find the earlier run.
    """

    run_id: str
    params: Mapping[str, Any] = field(default_factory=dict)


def _positive_seconds(key: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if isinstance(value, bool) or not 0 < seconds < float("inf"):
        raise ConfigError(f"{key} must be a positive number of seconds, got {value!r}: e.g. 60")
    return seconds


@dataclass(frozen=True)
class RunSettings:
    """The runner's settings, typed once from the loaded config (no default restated)."""

    seed: int
    retries: int
    max_in_flight: int | None
    report_dir: str | None
    db_outage_s: float
    progress_interval: float
    calibrate: bool
    gpu_memory_fraction: float
    max_bad_items: int | str | None = None  # a count, "N%" of the items, None: max(10, 1 %)

    @classmethod
    def from_config(cls, settings: Mapping[str, Any]) -> RunSettings:
        in_flight = settings["max-in-flight"]
        return cls(
            seed=int(settings["seed"] or 0),
            retries=int(settings["retries"]),
            max_in_flight=None if in_flight is None else int(in_flight),
            report_dir=settings["report-dir"],
            db_outage_s=_positive_seconds(
                "database-outage-timeout", settings["database-outage-timeout"]
            ),
            progress_interval=float(settings["progress-interval"]),
            calibrate=bool(settings["calibrate"]),
            gpu_memory_fraction=float(settings["gpu-memory-fraction"]),
            max_bad_items=_bad_items_setting(settings.get("max-bad-items")),
        )


def _bad_items_setting(value: Any) -> int | str | None:
    """``max-bad-items`` checked (a count, ``"N%"`` or None), not yet resolved."""
    bad_item_limit(value, 100)  # raises ConfigError for a bad value
    if value is None or str(value).strip().endswith("%"):
        return None if value is None else str(value).strip()
    return int(float(value))


@dataclass(frozen=True)
class RunContext:
    """What :meth:`Job.task` gets to build the worker's task: the run id, the client of
    the cluster it runs on (e.g. for a ``distributed.Semaphore``) and the run settings."""

    run_id: str
    client: Any
    settings: RunSettings


@dataclass(frozen=True)
class Invocation:
    """What the caller asked of this run, known before anything starts: the run's seed,
    ``--resume`` and ``--run-id``.  :meth:`Workload.prepare` gets it because a workload's
    output and run identity may depend on it (e.g. a store to continue or to create)."""

    seed: int = 0
    resume: bool = False
    run_id: str | None = None


@dataclass(frozen=True)
class PreloadSaving:
    """How much less a worker forked from the preload server holds than a spawned one.

    A workload's analytic footprint is in spawned-worker terms: SLURM workers and an
    existing cluster's workers are fresh processes.  Where the pipeline forks local
    workers from the server that imported :attr:`Job.worker_preload`, their pages of
    those modules are shared with it: the pipeline takes ``saving_bytes`` (measured for
    the workload) off the baseline of the job's analytic footprint, the one whose
    ``source`` is ``source``, and never off a caller's own footprint or one a probe
    measured.  ``measured``: where the saving was measured, for the plan's reasons.
    """

    saving_bytes: int
    source: str
    measured: str = ""

    def applied(self, footprint: Footprint) -> Footprint:
        """``footprint`` for forked workers (unchanged unless it is the analytic one)."""
        if footprint.source != self.source or self.saving_bytes <= 0:
            return footprint
        note = (
            f"local workers forked from a forkserver that preloaded the workload's modules: "
            f"baseline {self.saving_bytes / 1024**2:.0f} MiB under the spawned workers' "
            f"(SLURM, an existing cluster)" + (f", {self.measured}" if self.measured else "")
        )
        constants = f"{footprint.constants}; {note}" if footprint.constants else note
        baseline = max(0, footprint.baseline_bytes - self.saving_bytes)
        return replace(footprint, baseline_bytes=baseline, constants=constants)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_heap_now: tuple[int, int] | None = None  # this process's (mmap, trim) thresholds, once set


@dataclass(frozen=True)
class HeapTuning:
    """How a worker's C heap (glibc malloc) should keep freed memory for the next chunk.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed
    memory goes back to the OS at once.  Setting it also fixes glibc's mmap threshold at
    128 KiB: every buffer above that (torch's activations, numpy's temporaries) is mapped
    and faulted in afresh, page by page, each time.  A workload whose chunks reuse large
    temporaries sets :attr:`Job.worker_heap`: buffers under ``mmap_threshold`` then come
    from the heap, and up to ``trim_threshold`` free bytes at its top are kept.  The
    workload's footprint counts :attr:`kept_bytes`: ``peak_bytes``, what the kept heap
    was measured to add to a worker's peak (freed memory is mostly reused by the next
    batch, not added to it), else the whole trim threshold (the workload's footprint
    module says where its numbers come from).  Applied per worker process by the
    pipeline (:class:`HeapTunedTask`); nothing changes where the C library is not glibc.
    """

    mmap_threshold: int
    trim_threshold: int
    peak_bytes: int | None = None

    @property
    def kept_bytes(self) -> int:
        """What a worker's footprint counts for its kept heap."""
        return self.trim_threshold if self.peak_bytes is None else self.peak_bytes

    def apply(self) -> bool:
        """Set this process's malloc thresholds (once; again only if they differ).
        False where the C library is not glibc (nothing changed)."""
        global _heap_now
        wanted = (self.mmap_threshold, self.trim_threshold)
        if _heap_now == wanted:
            return True
        try:
            import ctypes

            mallopt = ctypes.CDLL("libc.so.6").mallopt
            ok = mallopt(_M_MMAP_THRESHOLD, self.mmap_threshold) == 1
            ok = mallopt(_M_TRIM_THRESHOLD, self.trim_threshold) == 1 and ok
        except (OSError, AttributeError):
            ok = False
        if ok:
            _heap_now = wanted
            log.debug("malloc: mmap threshold %d, trim threshold %d", *wanted)
        return ok


@dataclass(frozen=True)
class HeapTunedTask:
    """``task`` run with the worker's heap tuned first (:attr:`Job.worker_heap`)."""

    task: Callable
    heap: HeapTuning

    @property
    def __name__(self) -> str:  # the runner names its task group after the task
        return getattr(self.task, "__name__", type(self.task).__name__)

    def __call__(self, chunk: Chunk, ctx: TaskContext) -> Any:
        self.heap.apply()
        return self.task(chunk, ctx)


class Job:
    """One prepared run of a workload (returned by :meth:`Workload.prepare`).

    Subclass it, or use it directly with the fields filled in.  ``items`` names the items
    (e.g. stock codes) when there are names; else the run has ``n_items`` numbered items.
    """

    workload: Workload
    footprint: Footprint
    sink: Sink
    identity: RunIdentity
    items: Sequence | None = None
    probe_kwargs: Mapping[str, Any] = {}
    probe_sizes: tuple[int, int] | None = None  # --calibrate's sizes (default the workload's)
    #: modules a local cluster's workers should find imported: when set, they are forked
    #: from a server that imported them once (:func:`hpcbatch.cluster.forkserver_workers`)
    worker_preload: tuple[str, ...] = ()
    #: what those forked workers hold less than spawned ones, taken off the analytic
    #: footprint where the pipeline forks them (:class:`PreloadSaving`); None: nothing
    preload_saving: PreloadSaving | None = None
    #: how the workers' C heap keeps freed memory for the next chunk (the pipeline tunes
    #: each worker before its chunks run: :class:`HeapTuning`); None: Dask's setting
    worker_heap: HeapTuning | None = None

    @property
    def n_items(self) -> int:
        return self.footprint.n_items

    def plan_overrides(self) -> dict:
        """PlanSettings fields this job fixes (``chunk_size``, ``max_chunk``, ``use_gpu``)."""
        return {}

    def chunks(self, plan: Plan) -> list[Chunk]:
        """The run's chunks for ``plan`` (by default ``plan.chunk_size`` items each)."""
        return make_chunks(self.n_items, plan.chunk_size, items=self.items)

    def task(self, plan: Plan, run: RunContext) -> TaskFn:
        """The picklable ``task(chunk, ctx) -> small dict`` a worker runs for a chunk."""
        raise NotImplementedError(f"{type(self).__name__} must define task(plan, run)")

    def summary(self, result: Any) -> str:
        """What ``hpcbatch run`` prints for :meth:`finish`'s result (default: its summary)."""
        return result.summary()

    def finish(self, report: Any) -> Any:
        """What the run returns to its caller (default: the RunReport)."""
        return report

    def discard(self, exc: BaseException | None = None) -> None:
        """After a failed or interrupted run (``exc``): remove what ``--resume`` cannot use
        (default: nothing)."""


@dataclass(frozen=True)
class JobSizes:
    """Sizes for a SLURM script, a note for its comment and a warning for the user."""

    sizes: dict
    note: str = ""
    warning: str = ""


class Workload:
    """A kind of batch job; see the module docstring.  Subclass and register by entry point."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    item_name: ClassVar[str] = "item"
    #: the typed settings of the workload's config section (a dataclass with
    #: ``from_config(section)``), or None for a workload without settings
    settings_type: ClassVar[type | None] = None
    #: defaults of the config section ``hpcbatch.<name>`` (kebab-case keys), for workloads
    #: whose section is not in hpcbatch's own defaults file
    defaults: ClassVar[Mapping[str, Any]] = {}
    #: ``"module:function"`` run by ``--calibrate`` in fresh processes, or None
    probe: ClassVar[str | None] = None
    probe_sizes: ClassVar[tuple[int, int]] = (4, 16)
    #: the planner's cap on items per chunk when the ``max-chunk`` setting is unset
    max_chunk: ClassVar[int | None] = None
    #: modules the workers of a local run import before their first chunk: the pipeline
    #: starts their forkserver before :meth:`prepare` (``pipeline.warm_workers``), so the
    #: imports overlap the input checks; the job's own ``Job.worker_preload`` forks them
    worker_preload: ClassVar[tuple[str, ...]] = ()
    #: the command a SLURM job runs for this workload (default ``hpcbatch run NAME``)
    command: ClassVar[tuple[str, ...]] = ()
    #: ``"module:attribute"`` of the workload's own click group (``hpcbatch stocks ...``),
    #: added to the ``hpcbatch`` command; a reference, so the workload never imports its CLI
    cli_group: ClassVar[str | None] = None

    # ------------------------------------------------------------ planning ----

    def settings(self, section: Mapping[str, Any]) -> Any:
        """The config section (``hpcbatch.<name>``) as the typed settings object."""
        if self.settings_type is None:
            return dict(section)
        return self.settings_type.from_config(section)

    def size_options(self) -> list:
        """click options describing the work's size, for ``plan`` and ``slurm render``."""
        return []

    def sizes(self, settings: Any, values: Mapping[str, Any]) -> dict:
        """The sizes from the size options' values (checked; defaults from ``settings``)."""
        return dict(values)

    def job_sizes(
        self, settings: Any, values: Mapping[str, Any], job_args: Sequence[str]
    ) -> JobSizes:
        """The sizes for a SLURM script whose job gets ``job_args`` (``slurm render W ... --
        ARGS``): a workload may read its real size from the job's inputs (e.g. count the
        stocks in ``--db``), or say in the note what it assumed."""
        return JobSizes(self.sizes(settings, values))

    def footprint(self, sizes: Mapping[str, Any], settings: Any) -> Footprint:
        """What one worker holds and what one item costs, from ``sizes`` alone."""
        raise NotImplementedError(f"workload {self.name!r} must define footprint(sizes, settings)")

    def plan_overrides(self, sizes: Mapping[str, Any], settings: Any) -> dict:
        """PlanSettings fields fixed by the sizes/settings (e.g. ``chunk_size``)."""
        return {}

    def probe_kwargs(self, sizes: Mapping[str, Any], settings: Any) -> dict:
        """Keyword arguments of ``probe`` for these sizes."""
        return {}

    # ----------------------------------------------------------------- runs ----

    def run_options(self) -> list:
        """click options/arguments of ``hpcbatch run NAME`` (inputs, outputs)."""
        return []

    def prepare(
        self, settings: Any, values: Mapping[str, Any], invocation: Invocation = Invocation()
    ) -> Job:
        """Check the inputs named by ``values`` (the run options) and return the :class:`Job`.

        Nothing may be written here but what a run needs to exist (e.g. missing tables).
        """
        raise NotImplementedError(f"workload {self.name!r} must define prepare(settings, values)")

    def job_command(self) -> tuple[str, ...]:
        return self.command or ("run", self.name)


# ------------------------------------------------------------- registry ----


def typed_settings(cls: type, section: Mapping[str, Any]) -> Any:
    """Build dataclass ``cls`` from a kebab-case config section; unknown keys are refused."""
    names = {f.name for f in fields(cls)}
    values = {}
    for key, value in section.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(
                f"unknown setting {key!r} for {cls.__name__}: known are "
                + ", ".join(sorted(n.replace("_", "-") for n in names))
            )
        values[name] = value
    return cls(**values)


_REGISTRY: dict[str, Workload] = {}


def register(workload: Workload | type[Workload]) -> Workload:
    """Register a workload in this process (entry points do this for installed packages)."""
    obj = workload() if isinstance(workload, type) else workload
    if not obj.name or not obj.name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"workload {obj!r} needs a name of letters, digits, '-' or '_'")
    _REGISTRY[obj.name] = obj
    return obj


def _load_entry_points() -> None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            register(ep.load())
        except Exception as exc:  # noqa: BLE001 (a broken plugin must not break the others)
            log.warning("workload plugin %r (%s) did not load: %s", ep.name, ep.value, exc)


def workloads() -> dict[str, Workload]:
    """Every registered workload by name (entry points loaded on first use)."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_workload(name: str) -> Workload:
    """The registered workload ``name``, or one line naming the ones there are."""
    found = workloads()
    if name not in found:
        known = ", ".join(found) or "none"
        raise ConfigError(
            f"no workload named {name!r} (installed: {known}): install its package, whose "
            f"pyproject.toml registers it under [project.entry-points.\"{ENTRY_POINT_GROUP}\"]"
        )
    return found[name]
