"""Run reports: what a run did, how much memory each worker really used, and why workers died.

Owns :class:`RunReport` (frozen, returned by :func:`hpcbatch.runner.run`), the
measurement plugins the runner installs on the cluster, and the report directory::

    <report_dir>/<run_id>/report.json   # plan, predicted vs measured peak, chunk counts,
                                        # worker deaths with reasons, wall time
    <report_dir>/<run_id>/memory.png    # per-worker memory over time, limit + thresholds
    <report_dir>/<run_id>/dask-report.html   # Dask's performance_report (Bokeh inline)
    <report_dir>/<run_id>/report.html   # all of it on one offline page (report_html)

Memory is measured where it happens: a :class:`MemorySampler` nanny plugin samples
its worker process's RSS ten times a second (peaks between the scheduler's
heartbeats are not missed) and keeps the timeline across worker restarts, so a worker
the nanny kills for memory shows its climb to the kill.  Worker deaths come from the
scheduler's ``remove-worker`` events and the nanny's ``worker-restart-memory`` events;
on a SLURM cluster a worker whose whole job ended takes the reason SLURM gives for the
job (:func:`add_slurm_job_reasons`: ``cancelled`` / ``memory`` / ``walltime`` / ``node``,
with the job id), since Dask alone only sees a lost connection.
It does not decide anything about the run (the runner does).
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from distributed.diagnostics.plugin import NannyPlugin, SchedulerPlugin

from .chunkstate import quarantine_line
from .errors import ConfigError
from .units import format_bytes

SAMPLER_NAME = "hpcbatch-memory-sampler"
COUNTER_NAME = "hpcbatch-task-counter"
EXIT_TOPIC = "hpcbatch-worker-exit"
SAMPLE_INTERVAL_S = 0.1
_MAX_SAMPLES = 20_000


@dataclass(frozen=True)
class RunReport:
    """The outcome of one run (also written to ``report.json``)."""

    run_id: str
    status: str  # finished | already-finished | failed | interrupted
    n_chunks: int
    chunks_done: int = 0
    tasks_done: int = 0
    chunks_skipped: int = 0
    chunks_retried: int = 0
    chunks_split: int = 0
    chunks_failed: int = 0
    items_done: int = 0
    wall_time_s: float = 0.0
    plan: dict | None = None
    predicted_peak_bytes: int | None = None
    measured_peak_bytes: int | None = None
    measured_peak_per_worker: dict = field(default_factory=dict)
    memory_limit_bytes: int | None = None
    worker_deaths: list = field(default_factory=list)
    results_meta: dict = field(default_factory=dict)
    report_dir: str | None = None
    max_in_flight: int = 0
    max_tasks_on_scheduler: int | None = None
    failures: list = field(default_factory=list)
    message: str = ""
    quarantined: list = field(default_factory=list)  # [{item, reason}]: skipped as bad data
    items_quarantined: int = 0
    item_name: str = "item"  # what the items are ("stock"), for the summary
    #: versions, host, SLURM job, command line, start/end (:mod:`hpcbatch.provenance`)
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return summary_text(self.to_dict())


# ------------------------------------------------------ cluster plugins ----


class MemorySampler(NannyPlugin):
    """Samples the RSS of the nanny's worker process every ``interval_s`` seconds."""

    name = SAMPLER_NAME
    restart = False

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.interval_s = interval_s

    def setup(self, nanny) -> None:
        from tornado.ioloop import PeriodicCallback

        state = {
            "t": [],
            "rss": [],
            "addresses": [],  # (time, worker address) as the worker restarts
            "memory_limit": getattr(getattr(nanny, "memory_manager", None), "memory_limit", None),
            "name": worker_key(nanny.name, nanny.worker_address or nanny.address),
            "proc": None,
        }
        nanny._hpcbatch_memory = state

        def sample() -> None:
            proc = nanny.process.process if nanny.process is not None else None
            now = time.time()
            if proc is None or proc.pid is None:
                _append(state, now, math.nan)
                return
            cached = state["proc"]
            try:
                if cached is None or cached.pid != proc.pid:
                    cached = state["proc"] = psutil.Process(proc.pid)
                rss = cached.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                rss = math.nan
            address = nanny.worker_address
            if not state["addresses"] or state["addresses"][-1][1] != address:
                state["addresses"].append((now, address))
            _append(state, now, rss)

        _record_worker_exits(nanny)
        old = nanny.periodic_callbacks.pop(SAMPLER_NAME, None)
        if old is not None:
            old.stop()
        pc = PeriodicCallback(sample, self.interval_s * 1000)
        nanny.periodic_callbacks[SAMPLER_NAME] = pc
        pc.start()
        sample()

    def teardown(self, nanny) -> None:
        pc = nanny.periodic_callbacks.pop(SAMPLER_NAME, None)
        if pc is not None:
            pc.stop()


def _record_worker_exits(nanny) -> None:
    """Log an ``hpcbatch-worker-exit`` event (worker address, exit code) on the scheduler
    each time the nanny's worker process ends.

    Wraps the nanny's exit handler, which runs before the nanny unregisters the dead
    worker, so the address is the dead worker's (a SIGKILL shows as exit code -9).
    """
    handler = getattr(nanny, "_on_worker_exit", None)
    if handler is None or getattr(handler, "_hpcbatch", False):
        return

    async def on_exit(exitcode, _handler=handler):
        if exitcode is not None and getattr(nanny, "_hpcbatch_memory", None) is not None:
            with contextlib.suppress(Exception):
                nanny.log_event(EXIT_TOPIC, {"worker": nanny.worker_address, "exitcode": exitcode})
        return await _handler(exitcode)

    on_exit._hpcbatch = True  # type: ignore[attr-defined]
    nanny._on_worker_exit = on_exit


def _append(state: dict, t: float, rss: float) -> None:
    state["t"].append(t)
    state["rss"].append(rss)
    if len(state["t"]) > _MAX_SAMPLES:  # halve the resolution, keep every peak
        ts, rs = state["t"], state["rss"]
        pairs = range(0, len(ts) - 1, 2)
        state["t"] = [ts[i] for i in pairs]
        state["rss"] = [_nanmax(rs[i], rs[i + 1]) for i in pairs]


def _nanmax(a: float, b: float) -> float:
    if math.isnan(a):
        return b
    if math.isnan(b):
        return a
    return max(a, b)


def nanny_memory_timeline(dask_worker=None) -> dict | None:
    """Run on each nanny (``client.run(..., nanny=True)``): its sampled timeline."""
    state = getattr(dask_worker, "_hpcbatch_memory", None)
    if state is None:
        return None
    return {
        "name": state["name"],
        "memory_limit": state["memory_limit"],
        "t": list(state["t"]),
        "rss": list(state["rss"]),
        "addresses": list(state["addresses"]),
    }


class TaskCounter(SchedulerPlugin):
    """Scheduler-side: the most tasks the scheduler held at once since it was added."""

    name = COUNTER_NAME

    def __init__(self) -> None:
        self.max_tasks = 0
        self.scheduler = None

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        self.max_tasks = len(scheduler.tasks)

    def update_graph(self, scheduler, **kwargs: Any) -> None:
        self.max_tasks = max(self.max_tasks, len(scheduler.tasks))

    def transition(self, key, start, finish, *args: Any, **kwargs: Any) -> None:
        if self.scheduler is not None:
            self.max_tasks = max(self.max_tasks, len(self.scheduler.tasks))


def scheduler_max_tasks(dask_scheduler=None) -> int | None:
    """Run on the scheduler: the :class:`TaskCounter`'s maximum (and reset it)."""
    plugin = dask_scheduler.plugins.get(COUNTER_NAME)
    if plugin is None:
        return None
    value = plugin.max_tasks
    return value


def remove_scheduler_counter(dask_scheduler=None) -> None:
    if COUNTER_NAME in dask_scheduler.plugins:
        dask_scheduler.remove_plugin(name=COUNTER_NAME)


# --------------------------------------------------------- worker deaths ----


def classify_deaths(
    remove_events: list[tuple[float, dict]],
    memory_events: list[tuple[float, dict]],
    *,
    since: float,
    until: float | None = None,
    terminate_fraction: float | None = None,
    exits: list[tuple[float, str, int]] = (),
) -> list[dict]:
    """Why each worker removed between ``since`` and ``until`` left.

    ``remove_events``: the scheduler's ``remove-worker`` events (topic ``all``);
    ``memory_events``: the nannies' ``worker-restart-memory`` events.  Reasons:
    ``memory`` (the nanny killed it above the terminate threshold), ``walltime``
    (it retired itself gracefully: Dask worker ``lifetime``, set from the walltime),
    ``connection`` (lost connection or missed heartbeats), ``other``.  ``exits``
    (time, worker address, exit code) from the :class:`MemorySampler` refine a lost
    connection: SIGKILL without a Dask memory kill is the kernel's or the batch system's
    memory enforcement in practice.
    """
    until = until if until is not None else math.inf
    kills = [(t, m) for t, m in memory_events if since <= t <= until + 1]
    deaths = []
    for t, ev in remove_events:
        if ev.get("action") != "remove-worker" or not since <= t <= until:
            continue
        address = ev.get("worker", "?")
        stimulus = str(ev.get("stimulus_id", ""))
        kill = next(
            (m for kt, m in kills if m.get("worker") == address and kt <= t + 5 and kt >= t - 120),
            None,
        )
        tasks = sorted(_chunk_of(k) for k in ev.get("processing-tasks", ()))
        if kill is not None:
            at = f" at {terminate_fraction:.0%} of its limit" if terminate_fraction else ""
            reason = "memory"
            detail = (
                f"the nanny killed the worker{at}: RSS {format_bytes(kill.get('rss', 0))}"
                f" while running {', '.join(tasks) or 'no task'}"
            )
        elif (code := _exit_code(exits, address, t)) is not None and code < 0:
            if code == -9:
                reason = "memory"
                detail = (
                    "the worker process was killed by SIGKILL, not by Dask: most likely the "
                    "kernel OOM killer or the batch system's memory limit (check dmesg or the job log)"
                )
            else:
                reason, detail = "other", f"the worker process was killed by signal {-code}"
        elif stimulus.startswith("worker-close-gracefully"):
            reason, detail = "walltime", "retired gracefully (worker lifetime before the walltime)"
        elif stimulus.startswith("check-worker-ttl"):
            reason, detail = "connection", "missed heartbeats (node hung or network)"
        elif stimulus.startswith("handle-worker-cleanup"):
            reason, detail = "connection", "lost connection (process died or node lost)"
        elif stimulus.startswith("retire-workers"):
            reason, detail = "other", "retired by the scheduler (scale down)"
        else:
            reason, detail = "other", f"removed ({stimulus.split('-1')[0] or 'unknown'})"
        deaths.append(
            {
                "worker": address,
                "time": t,
                "reason": reason,
                "detail": detail,
                "tasks": tasks,
                "rss_bytes": kill.get("rss") if kill else None,
            }
        )
    return deaths


#: SLURM's reasons (:func:`hpcbatch.slurm.classify_job`) that say more than Dask's
#: "connection": the job itself was ended by SLURM or a user.
SLURM_DEATH_REASONS = ("cancelled", "memory", "walltime", "node", "preempted")


def add_slurm_job_reasons(deaths: list[dict], job_of: Any) -> list[dict]:
    """Deaths of workers whose SLURM job ended, with the reason SLURM gives for the job.

    ``job_of(worker_address)`` (:meth:`hpcbatch.cluster.WorkerJobWatch.job_of`) returns
    the ended job (``job_id``, ``state``, ``reason``, ``detail``, and when it was
    replaced ``replacement_job_id`` / ``replacement_wait_s``) or None.  Each such death
    gains ``slurm_job_id`` and ``slurm_state``; its reason becomes SLURM's when that is
    one of :data:`SLURM_DEATH_REASONS` (a job that completed at its worker lifetime keeps
    Dask's ``walltime``).  ``job_of`` None (not a SLURM cluster) returns ``deaths`` as is.
    """
    if job_of is None:
        return deaths
    out = []
    for death in deaths:
        job = _ended_job(job_of, death.get("worker", ""))
        if not job:
            out.append(death)
            continue
        death = dict(death, slurm_job_id=job["job_id"], slurm_state=job.get("state"))
        for key in ("replacement_job_id", "replacement_wait_s"):
            if job.get(key) is not None:
                death[key] = job[key]
        if job.get("reason") in SLURM_DEATH_REASONS:
            death["reason"] = job["reason"]
            death["detail"] = (
                f"SLURM job {job['job_id']} {job.get('state', '?')}: {job.get('detail', '')}"
            )
        out.append(death)
    return out


def slurm_memory_kills(workers: Any, job_of: Any) -> list[dict]:
    """Memory kills (as the runner counts them) of the ``workers`` whose whole SLURM job
    was killed for exceeding its ``--mem``: the nanny died with the worker, so neither
    its ``worker-restart-memory`` event nor an exit code exists; only SLURM knows.
    ``job_of``: :meth:`hpcbatch.cluster.WorkerJobWatch.job_of`, or None."""
    if job_of is None:
        return []
    found = []
    for worker in workers:
        job = _ended_job(job_of, worker)
        if job and job.get("reason") == "memory":
            found.append(
                {"worker": worker, "rss": 0, "sigkill": True, "slurm_job_id": job["job_id"]}
            )
    return found


def _ended_job(job_of: Any, worker: str) -> dict | None:
    """``job_of(worker)``, or None when SLURM cannot be asked (Dask's reason stands)."""
    try:
        return job_of(worker)
    except Exception:  # noqa: BLE001 (SLURM unreachable)
        return None


def _exit_code(exits, address: str, t: float) -> int | None:
    for et, eaddress, code in exits:
        if eaddress == address and t - 30 <= et <= t + 30:
            return int(code)
    return None


def _chunk_of(key: Any) -> str:
    """The chunk id in a runner task key ``(group, chunk_id, attempt)``; else the key."""
    if isinstance(key, (tuple, list)) and len(key) == 3 and str(key[0]).startswith("hpcbatch-"):
        return str(key[1])
    return str(key)


# ------------------------------------------------------------ the plot ----

_MIB = 1024**2
#: one colour per worker: Matplotlib's tab10 without red (kills) and purple (the predicted
#: peak), then tab20's lighter shades; reference lines are black/grey
_WORKER_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f",
    "#aec7e8", "#ffbb78", "#98df8a", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#c7c7c7",
)  # fmt: skip
_KILL_COLOR = "#d62728"
_PREDICTED_COLOR = "#9467bd"
_THRESHOLD_STYLES = {"target": ":", "spill": (0, (6, 3)), "pause": "--", "terminate": "-."}
#: a reference line above this multiple of the data's peak is named, not drawn
_NEAR = 1.5
_MAX_WORKER_LABELS = 16
_MAX_KILL_LABELS = 10


@dataclass(frozen=True)
class PlotSeries:
    key: str  # the worker's key in measured_peak_per_worker
    label: str  # its legend entry
    color: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]  # MiB


@dataclass(frozen=True)
class PlotLine:
    label: str
    y: float  # MiB
    color: str
    style: Any
    width: float


@dataclass(frozen=True)
class PlotKill:
    number: int
    x: float
    y: float  # MiB
    label: str  # "kill 1 at 12 s: w0 127.0.0.1:40123, c000003"


@dataclass(frozen=True)
class MemoryPlotData:
    """What :func:`plot_memory` draws, computed without Matplotlib (and testable)."""

    series: tuple[PlotSeries, ...]
    lines: tuple[PlotLine, ...]  # reference lines inside the y range
    off_scale: tuple[str, ...]  # reference lines above it: named in the legend only
    kills: tuple[PlotKill, ...]
    y_max: float  # MiB; the y axis starts at 0
    data_max: float  # the highest RSS sampled or seen at a kill (MiB)

    def summary(self) -> dict:
        """The y range (MiB), the legend and each worker's key, label and colour."""
        return {
            "y_max_mib": round(self.y_max, 1),
            "data_max_mib": round(self.data_max, 1),
            "legend": list(self.legend_labels),
            "workers": [{"key": s.key, "label": s.label, "color": s.color} for s in self.series],
            "kills": len(self.kills),
        }

    @property
    def worker_labels(self) -> tuple[str, ...]:
        return tuple(s.label for s in self.series if s.label)

    @property
    def legend_labels(self) -> tuple[str, ...]:
        labels = list(self.worker_labels)
        if len(self.series) > len(labels):
            labels.append(f"... {len(self.series) - len(labels)} more workers (not labelled)")
        labels += [line.label for line in self.lines]
        labels += [f"{text}: above the plot" for text in self.off_scale]
        labels += _kill_legend(self.kills)
        return tuple(labels)


def worker_key(name: Any, address: str | None) -> str:
    """A worker's key in the report: its name, or its address when it has none (the
    workers of an existing cluster started by ``dask worker`` without ``--name``)."""
    if name is None or str(name) in ("", "None"):
        return str(address or "?")
    return str(name)


def _short_labels(keys: list[str]) -> list[str]:
    """``w0 127.0.0.1:40123`` for an address key, ``worker 3`` for a name."""
    out = []
    for i, key in enumerate(keys):
        if "://" in key:
            out.append(f"w{i} {key.split('://', 1)[1]}")
        else:
            out.append(f"worker {key}")
    return out


def _unique_keys(timelines: list[dict]) -> list[str]:
    """Each timeline's key; a missing or repeated name becomes the worker's first address."""
    keys = []
    for tl in timelines:
        first = next((a for _t, a in tl.get("addresses", ()) if a), None)
        key = worker_key(tl.get("name"), first)
        if key in keys:
            key = f"{key} ({first})" if first and first != key else f"{key} #{len(keys)}"
        keys.append(key)
    return keys


def _finite(values) -> list[float]:
    return [v for v in values if v == v and v is not None]


def memory_plot_data(
    timelines: list[dict],
    *,
    t0: float,
    memory_limit_bytes: int | None,
    thresholds: dict | None,
    predicted_peak_bytes: int | None = None,
    deaths: list[dict] | None = None,
) -> MemoryPlotData:
    """The series, reference lines, kills and y range of the memory plot.

    One series (colour, legend entry) per worker timeline.  The y axis fits what was
    used: a reference line (limit, thresholds, predicted peak) more than
    :data:`_NEAR` times above the highest RSS is not drawn but named in the legend.
    """
    kept = sorted((tl for tl in timelines if tl.get("t")), key=lambda tl: str(tl.get("name")))
    keys = _unique_keys(kept)
    order = sorted(range(len(kept)), key=lambda i: keys[i])
    labels = _short_labels([keys[i] for i in order])
    series = []
    for rank, i in enumerate(order):
        tl = kept[i]
        series.append(
            PlotSeries(
                key=keys[i],
                label=labels[rank]
                if rank < _MAX_WORKER_LABELS - 1 or len(kept) <= _MAX_WORKER_LABELS
                else "",
                color=_worker_color(rank, len(kept)),
                xs=tuple(t - t0 for t in tl["t"]),
                ys=tuple(r / _MIB for r in tl["rss"]),
            )
        )
    kills = _plot_kills(kept, keys, labels, order, deaths or (), t0)
    peaks = [max(_finite(s.ys), default=0.0) for s in series] + [k.y for k in kills]
    data_max = max(peaks, default=0.0)
    candidates = _reference_lines(memory_limit_bytes, thresholds, predicted_peak_bytes)
    top = data_max if data_max > 0 else max((c.y for c in candidates), default=1.0)
    lines = tuple(c for c in candidates if c.y <= _NEAR * top)
    off = tuple(c.label for c in candidates if c.y > _NEAR * top)
    # headroom for the kills' numbers (staggered up to three rows above their markers)
    y_max = max([top] + [c.y for c in lines]) * (1.2 if kills else 1.08)
    return MemoryPlotData(tuple(series), lines, off, kills, y_max, data_max)


def address_owners(timelines: list[dict]) -> dict[str, str]:
    """Worker address -> the worker's key in :func:`memory_plot_data` (every address a
    worker had across restarts)."""
    kept = sorted((tl for tl in timelines if tl.get("t")), key=lambda tl: str(tl.get("name")))
    owner = {}
    for tl, key in zip(kept, _unique_keys(kept), strict=True):
        for _t, address in tl.get("addresses", ()):
            if address:
                owner[address] = key
    return owner


def _worker_color(rank: int, n: int) -> str:
    if rank < len(_WORKER_COLORS):
        return _WORKER_COLORS[rank]
    import colorsys

    # beyond 16 workers: evenly spaced hues, away from the kills' red (hue 0)
    hue = 0.08 + 0.84 * (rank - len(_WORKER_COLORS)) / max(1, n - len(_WORKER_COLORS))
    r, g, b = colorsys.hsv_to_rgb(hue, 0.55, 0.8)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _reference_lines(
    limit_bytes: int | None, thresholds: dict | None, predicted_bytes: int | None
) -> list[PlotLine]:
    lines = []
    if limit_bytes:
        limit = limit_bytes / _MIB
        lines.append(PlotLine(f"memory limit {limit:,.0f} MiB", limit, "black", "-", 1.6))
        for name, style in _THRESHOLD_STYLES.items():
            frac = (thresholds or {}).get(name)
            if frac is None or frac is False:
                continue
            y = limit * float(frac)
            lines.append(
                PlotLine(f"{name} {float(frac):.0%} ({y:,.0f} MiB)", y, "#555555", style, 1.0)
            )
    if predicted_bytes:
        y = predicted_bytes / _MIB
        lines.append(PlotLine(f"predicted peak {y:,.0f} MiB", y, _PREDICTED_COLOR, "-.", 1.4))
    return lines


def _plot_kills(kept, keys, labels, order, deaths, t0: float) -> tuple[PlotKill, ...]:
    """Memory kills with an RSS, numbered in time order, each naming its worker and chunk."""
    label_of = {keys[i]: labels[rank] for rank, i in enumerate(order)}
    owner = {}
    for tl, key in zip(kept, keys, strict=True):
        for _t, address in tl.get("addresses", ()):
            owner[address] = key
    found = sorted(
        (d for d in deaths if d.get("reason") == "memory" and d.get("rss_bytes")),
        key=lambda d: d["time"],
    )
    kills = []
    for number, d in enumerate(found, start=1):
        who = label_of.get(owner.get(d.get("worker"), ""), str(d.get("worker", "?")))
        chunks = ", ".join(d.get("tasks") or ()) or "no chunk"
        x = d["time"] - t0
        kills.append(
            PlotKill(
                number, x, d["rss_bytes"] / _MIB, f"kill {number} at {x:,.0f} s: {who}, {chunks}"
            )
        )
    return tuple(kills)


def _kill_legend(kills: tuple[PlotKill, ...]) -> list[str]:
    if not kills:
        return []
    if len(kills) > _MAX_KILL_LABELS:
        return [
            f"{len(kills)} workers killed for memory (x); their chunks: report.json worker_deaths"
        ]
    return [k.label for k in kills]


_PLOT_IMPORT: list[threading.Thread] = []  # the background import, started once
_PLOT_IMPORT_LOCK = threading.Lock()


def _plot_api():
    """matplotlib's figure, its Agg canvas and Line2D: no pyplot (its import and backend
    selection cost ~0.4 s, and the process's backend stays the caller's)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    return Figure, FigureCanvasAgg, Line2D


def _import_quietly() -> None:
    with contextlib.suppress(Exception):  # plot_memory imports it again, and says why
        _plot_api()


def preload_plotting() -> None:
    """Import what :func:`plot_memory` draws with in a background thread (once per
    process), so the import (~0.4 s, more on a busy machine) overlaps a wait, e.g. for the
    cluster's workers, instead of adding to the end of the run.  The plot itself waits for
    the import as any import does (the module lock)."""
    with _PLOT_IMPORT_LOCK:
        if _PLOT_IMPORT:
            return
        thread = threading.Thread(target=_import_quietly, name="hpcbatch-plot-import", daemon=True)
        _PLOT_IMPORT.append(thread)
        thread.start()


def plot_memory(
    timelines: list[dict],
    path: str | Path,
    *,
    t0: float,
    memory_limit_bytes: int | None,
    thresholds: dict | None,
    predicted_peak_bytes: int | None = None,
    deaths: list[dict] | None = None,
    title: str = "",
) -> Path:
    """Per-worker RSS over time with the limit, Dask's thresholds, the prediction and the
    memory kills (numbered markers, listed in the legend); see :func:`memory_plot_data`."""
    Figure, FigureCanvasAgg, Line2D = _plot_api()
    data = memory_plot_data(
        timelines,
        t0=t0,
        memory_limit_bytes=memory_limit_bytes,
        thresholds=thresholds,
        predicted_peak_bytes=predicted_peak_bytes,
        deaths=deaths,
    )
    fig = Figure(figsize=(11, 5.5), dpi=110)
    FigureCanvasAgg(fig)  # draws into memory; savefig writes the PNG
    ax = fig.subplots()
    handles = []
    for s in data.series:
        (line,) = ax.plot(s.xs, s.ys, lw=1.2, color=s.color, label=s.label or None)
        if s.label:
            handles.append(line)
    if len(data.series) > len(data.worker_labels):
        handles.append(Line2D([], [], ls="none", label=data.legend_labels[len(handles)]))
    for ref in data.lines:
        handles.append(
            ax.axhline(ref.y, color=ref.color, ls=ref.style, lw=ref.width, label=ref.label)
        )
    for text in data.off_scale:
        handles.append(Line2D([], [], ls="none", label=f"{text}: above the plot"))
    handles += _draw_kills(ax, data.kills, Line2D)
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel("worker memory, RSS (MiB)")
    ax.set_title(title or "Per-worker memory (RSS sampled every 0.1 s)")
    ax.set_ylim(0, data.y_max)
    ax.grid(alpha=0.3)
    ax.legend(
        handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False
    )
    fig.tight_layout()
    path = Path(path)
    # what is drawn, for a reader (or a test) of the PNG: its "Description" text chunk
    fig.savefig(path, metadata={"Description": json.dumps(data.summary())})
    return path


def _draw_kills(ax, kills: tuple[PlotKill, ...], line2d) -> list:
    """Red crosses at the RSS each kill saw; up to :data:`_MAX_KILL_LABELS` numbered, the
    numbers staggered in height so that kills close in time do not overlap."""
    if not kills:
        return []
    marker = {"marker": "X", "color": _KILL_COLOR, "markersize": 8, "ls": "none"}
    ax.plot([k.x for k in kills], [k.y for k in kills], zorder=5, **marker)
    if len(kills) > _MAX_KILL_LABELS:
        return [line2d([], [], label=_kill_legend(kills)[0], **marker)]
    for i, k in enumerate(kills):
        ax.annotate(
            str(k.number),
            (k.x, k.y),
            textcoords="offset points",
            xytext=(4, 5 + 9 * (i % 3)),
            fontsize=8,
            color=_KILL_COLOR,
            fontweight="bold",
        )
    return [line2d([], [], label=k.label, **marker) for k in kills]


# ------------------------------------------------------- the directory ----


def write_report_dir(report: RunReport, directory: str | Path) -> Path:
    """Write ``report.json`` (the plot and HTML are written by the runner)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "report.json.tmp"
    tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str))
    tmp.replace(directory / "report.json")
    return directory


def find_reports(path: str | Path) -> list[Path]:
    """``report.json`` files at ``path``: the run directory itself, or its run subdirectories."""
    path = Path(path)
    if path.is_file() and path.name == "report.json":
        return [path]
    if (path / "report.json").is_file():
        return [path / "report.json"]
    if path.is_dir():
        found = sorted(path.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
        if found:
            return found
    raise ConfigError(
        f"no run report at {path}: pass a run's report directory (with report.json) "
        "or the report-dir that holds them"
    )


def load_report(path: str | Path) -> dict:
    """The latest ``report.json`` at ``path`` as a dict."""
    file = find_reports(path)[-1]
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}: rerun the job to rewrite it") from None


def summary_text(data: dict) -> str:
    """A few readable lines from a report dict."""
    fb = format_bytes
    lines = [
        f"run {data['run_id']}: {data['status']}"
        + (f" ({data['message']})" if data.get("message") else ""),
        f"chunks: {data['chunks_done']} done of {data['n_chunks']} "
        f"({data.get('tasks_done', data['chunks_done'])} tasks incl. halves of split chunks), "
        f"{data.get('chunks_skipped', 0)} skipped (already done), "
        f"{data.get('chunks_retried', 0)} retried, {data.get('chunks_split', 0)} split, "
        f"{data.get('chunks_failed', 0)} failed; {data.get('items_done', 0)} items",
        f"wall time: {data.get('wall_time_s', 0):.1f} s; most chunks in flight "
        f"{data.get('max_in_flight', 0)}"
        + (
            f", most tasks on the scheduler {data['max_tasks_on_scheduler']}"
            if data.get("max_tasks_on_scheduler") is not None
            else ""
        ),
    ]
    predicted, measured = data.get("predicted_peak_bytes"), data.get("measured_peak_bytes")
    limit = data.get("memory_limit_bytes")
    mem = "memory per worker:"
    if predicted:
        mem += f" predicted peak {fb(predicted)},"
    mem += f" measured peak {fb(measured) if measured else 'not measured'}"
    if limit:
        mem += f", limit {fb(limit)}"
    lines.append(mem)
    for name, peak in sorted((data.get("measured_peak_per_worker") or {}).items()):
        lines.append(f"  worker {name}: peak {fb(peak)}")
    deaths = data.get("worker_deaths") or []
    if deaths:
        reasons: dict[str, int] = {}
        for d in deaths:
            reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
        by = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
        lines.append(f"worker deaths: {len(deaths)} ({by})")
        for d in deaths:
            lines.append(f"  {d['worker']}: {d['reason']} - {d['detail']}")
    else:
        lines.append("worker deaths: none")
    for f in data.get("failures") or []:
        lines.append(f"failed chunk {f['chunk_id']}: {f['error']}")
    if data.get("quarantined"):
        lines.append(quarantine_line(data["quarantined"], data.get("item_name") or "item"))
    if data.get("results_meta"):
        counts = ", ".join(f"{k}={v}" for k, v in sorted(data["results_meta"].items()))
        lines.append(f"results: {counts}")
    prov = data.get("provenance") or {}
    if prov:
        job = f", SLURM job {prov['slurm_job_id']}" if prov.get("slurm_job_id") else ""
        lines.append(
            f"ran {prov.get('started_at')} to {prov.get('ended_at')} on {prov.get('host')}{job}"
        )
    if data.get("report_dir"):
        lines.append(f"report: {data['report_dir']}")
        page = Path(data["report_dir"]) / "report.html"
        if page.is_file():
            lines.append(f"report page (offline): {page}")
    return "\n".join(lines)
