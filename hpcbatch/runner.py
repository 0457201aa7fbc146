"""The chunk runner: the Dask shell around :class:`~hpcbatch.chunkstate.ChunkStates`.

Owns :func:`run`, :class:`RunOptions`, :func:`chunk_seed`, :class:`TaskContext` and the
Dask side of a run; :class:`Chunk` and :func:`make_chunks` come from
:mod:`hpcbatch.chunkstate`, which also owns what happens to each chunk (done, split,
retried, held, failed): this module only submits, gathers and watches.

:func:`run` keeps at most ``max_in_flight`` chunk tasks on the scheduler (so the
graph stays small for any number of chunks), reacts to each finished task as it
completes, and:

- records done chunks in the :class:`~hpcbatch.ledger.Ledger` (or lets the task's
  SQL sink record them in its own transaction, ``commit_on_worker=True``);
- splits a chunk in half and retries it when it ran out of memory (``MemoryError``,
  torch / CUDA out-of-memory, or ``KilledWorker`` after the nanny killed its workers
  for memory), down to ``min_chunk`` items, then raises :class:`ChunkFailedError`
  with the memory the chunk needed.  Only a chunk that was *executing* when its worker
  was killed is split: one queued behind it on the same worker (Dask's
  ``worker-saturation`` above 1) reruns unchanged;
- retries other failures ``retries`` times, then raises :class:`ChunkFailedError`
  with the chunk id and the worker's traceback (finished chunks stay recorded);
- on SIGTERM stops submitting, lets chunks in flight finish within a grace period,
  writes the report and raises :class:`RunInterrupted` (resume later);
- fails the run (report written, :class:`ChunkFailedError`) when the cluster has had
  no workers at all for ``no_worker_timeout_s``, instead of waiting forever (during a
  SIGTERM stop, no workers just ends the wait: the run is interrupted, not failed);
- checks the run's database is reachable before anything is submitted (preflight) and
  keeps a run-level circuit breaker on it: a chunk that fails with a transient
  database error (:func:`hpcbatch.retry.is_transient`, :class:`DatabaseUnavailable`)
  stops all submission while the runner probes the database itself; if it comes back
  the held chunks rerun, if it stays down for ``db_outage_s`` the run fails at once
  with one line (database, cause, chunks committed, the resume command).

It knows nothing about stocks or Pyro: a workload hands it chunks and a task function.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from distributed.diagnostics.plugin import WorkerPlugin

from .chunkstate import (
    DEFAULT_RESUME_HINT,
    QUARANTINED,
    Attempt,
    Chunk,
    ChunkStates,
    Counters,
    Policy,
    bad_item_limit,
    make_chunks,
    one_line,
    quarantine_line,
    quarantined_of,
    rechunk,
    undone_pieces,
)
from .errors import ChunkFailedError, ConfigError, HpcbatchError, RunInterrupted
from .ledger import ChunkAlreadyDone, DoneIndex, Ledger
from .provenance import collect as collect_provenance
from .report import (
    COUNTER_NAME,
    EXIT_TOPIC,
    SAMPLER_NAME,
    MemorySampler,
    RunReport,
    TaskCounter,
    add_slurm_job_reasons,
    classify_deaths,
    nanny_memory_timeline,
    plot_memory,
    preload_plotting,
    remove_scheduler_counter,
    scheduler_max_tasks,
    slurm_memory_kills,
    write_report_dir,
)
from .report_html import write_html_report_of
from .retry import DatabaseUnavailable, error_line, is_transient, probe_database, with_backoff
from .security import mask_url
from .units import format_bytes

__all__ = [
    "QUARANTINED",
    "Chunk",
    "RunOptions",
    "TaskContext",
    "chunk_seed",
    "execute_chunk",
    "is_memory_error",
    "make_chunks",
    "run",
]

log = logging.getLogger(__name__)
#: The progress lines of every run (INFO), whether or not they are printed.
progress_log = logging.getLogger("hpcbatch.progress")

_ALREADY_DONE = "__hpcbatch_already_done__"
_DB_UNAVAILABLE = "__hpcbatch_database_unavailable__"
NO_WORKER_TIMEOUT_S = 120.0  # no workers at all for this long fails the run (not a hang)
DB_OUTAGE_S = 60.0  # the database unreachable for this long fails the run (a restart is not)
STOPPING_NO_WORKER_S = 5.0  # during a SIGTERM stop: no workers this long ends the wait
RESTART_WAIT_S = 10.0  # after worker deaths: how long the report waits for restarted workers
# A chunk shorter than the driver's round trip through the scheduler (a few ms) leaves
# the workers idle with 2 x threads in flight: the default window doubles, up to
# FAST_WINDOW, while every chunk finishes within FAST_CHUNK_S of its submission
# (benchmarks/runner_overhead.py: 10,000 no-op chunks).  Longer chunks keep 2 x threads.
FAST_WINDOW = 64
FAST_CHUNK_S = 0.25
WITNESS_NAME = "hpcbatch-queue-witness"
EXECUTING_TOPIC = "hpcbatch-executing"  # which tasks ran while another waited behind
WATCH_EVERY_S = 0.5  # watchers get a snapshot at most this often (and once at the end)
EVENTS_KEPT = 50  # the recent events a snapshot carries (kills, splits, quarantines, ...)


# ------------------------------------------------------------ on a worker ----


def chunk_seed(run_seed: int, chunk_id: str) -> int:
    """A 63-bit seed from the run seed and the chunk id, the same in every process."""
    digest = hashlib.blake2b(f"{int(run_seed)}:{chunk_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class TaskContext:
    """What a task function gets besides its chunk (on the worker)."""

    run_id: str
    seed: int
    attempt: int
    ledger: Ledger | None = None
    chunk_id: str = ""


def execute_chunk(task_fn: Callable, chunk: Chunk, ctx: TaskContext) -> dict:
    """Run on the worker: the task function, checked to return small metadata."""
    try:
        meta = task_fn(chunk, ctx)
    except ChunkAlreadyDone:
        return {_ALREADY_DONE: True}
    except DatabaseUnavailable as exc:
        # an outage, not a bug: straight to the runner's breaker (no Dask error log
        # with a traceback on every worker)
        return {_DB_UNAVAILABLE: exc}
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TypeError(
            f"task function {getattr(task_fn, '__name__', task_fn)} returned "
            f"{type(meta).__name__}: it must return a small dict of counts (write data to the sink)"
        )
    return meta


class QueueWitness(WorkerPlugin):
    """On each worker: when a task arrives while every thread is busy (it waits behind
    them), log which tasks are executing (event :data:`EXECUTING_TOPIC`).  When the
    worker is then killed for memory, only those can have caused it: the scheduler's
    ``remove-worker`` event lists the waiting tasks too.  Silent when nothing waits."""

    name = WITNESS_NAME

    def setup(self, worker) -> None:
        self.worker = worker

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish != "ready":
            return
        state = self.worker.state
        if len(state.executing) < state.nthreads:
            return
        self.worker.log_event(
            EXECUTING_TOPIC,
            {"worker": self.worker.address, "executing": [ts.key for ts in state.executing]},
        )


# ------------------------------------------------------------- failures ----


def is_memory_error(exc: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError or a CUDA out-of-memory RuntimeError."""
    if isinstance(exc, MemoryError):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "OutOfMemoryError" in names:
        return True
    text = str(exc)
    return "CUDA out of memory" in text or "CUDA error: out of memory" in text


def _is_killed_worker(exc: BaseException) -> bool:
    return type(exc).__name__ == "KilledWorker"


def _norm(key):
    """A task key as the scheduler's events return it (lists and tuples alike)."""
    return tuple(_norm(k) for k in key) if isinstance(key, (list, tuple)) else key


def executing_when_removed(event: tuple, witnessed: Sequence) -> list:
    """The tasks of a ``remove-worker`` event (time, msg) that were executing on it.

    ``witnessed``: the :data:`EXECUTING_TOPIC` events.  The last one the worker logged
    before it was removed names its executing tasks; without one (nothing ever waited
    there) every task it was processing is a suspect, as Dask itself assumes.
    """
    t, ev = event
    processing = [_norm(k) for k in ev.get("processing-tasks", ())]
    last = None
    for wt, msg in witnessed:
        if wt <= t + 1 and isinstance(msg, dict) and msg.get("worker") == ev.get("worker"):
            last = msg
    if last is None:
        return processing
    executing = {_norm(k) for k in last.get("executing", ())}
    return [k for k in processing if k in executing] or processing


def _blame(client, key, since: float) -> tuple[list[dict], bool]:
    """Memory kills of the workers that died while holding ``key``, and whether ``key``
    was executing on one of them (False: it only waited behind the chunk that was).

    A nanny memory kill (``worker-restart-memory`` event, with the RSS it saw), or a
    worker process that ended by SIGKILL: the kernel OOM killer or the batch system's
    memory enforcement (the nanny survives those and the sampler saw the exit code).
    """
    key = _norm(key)
    for attempt in range(6):  # the nanny's event can trail the worker's removal
        removed = [
            (t, ev)
            for t, ev in _events(client, "all")
            if t >= since - 1
            and isinstance(ev, dict)
            and ev.get("action") == "remove-worker"
            and key in {_norm(k) for k in ev.get("processing-tasks", ())}
        ]
        found = _kills_of(client, {ev.get("worker") for _t, ev in removed}, since)
        if found or attempt == 5:
            witnessed = _events(client, EXECUTING_TOPIC)
            killed = {k.get("worker") for k in found}
            guilty = any(
                key in executing_when_removed(e, witnessed)
                for e in removed
                if e[1].get("worker") in killed
            )
            return found, guilty or not found
        time.sleep(0.3)
    return [], True


def _kills_of(client, workers: set, since: float) -> list[dict]:
    found = [
        m
        for t, m in _events(client, "worker-restart-memory")
        if t >= since - 1 and m.get("worker") in workers
    ]
    if not found:
        found = [
            {"worker": ev.get("worker"), "rss": 0, "sigkill": True}
            for t, ev in _events(client, EXIT_TOPIC)
            if t >= since - 1 and ev.get("worker") in workers and ev.get("exitcode") == -9
        ]
    if not found:  # the whole SLURM job killed for its --mem (the nanny died too)
        found = slurm_memory_kills(workers, getattr(_job_watch(client), "job_of", None))
    return found


def _kill_how(kills: list[dict], exc_type, exc) -> tuple[str, int]:
    """How a chunk ran out of memory (for its message) and the bytes seen (0: unknown)."""
    needed = max((k.get("rss") or 0 for k in kills), default=0)
    if kills and not needed:
        how = (
            "its worker process was killed by SIGKILL (kernel OOM killer or batch-system "
            "memory limit)"
        )
    elif kills:
        how = f"its worker was killed for memory at {format_bytes(needed)}"
    else:
        how = f"{exc_type.__name__}: {str(exc)[:200]}"
    return how, needed


def _events(client, topic: str) -> list:
    try:
        return list(client.get_events(topic))
    except Exception:  # noqa: BLE001 (an old or foreign scheduler: no events)
        return []


# -------------------------------------------------------------- progress ----


class _Progress:
    """The progress line: logged (INFO, logger ``hpcbatch.progress``) every ``interval_s``
    whenever that logger listens, and shown on ``out`` when ``enabled`` (``None``: when
    ``out`` is a terminal): a bar redrawn in place on a terminal, else a line per
    interval (a batch log)."""

    def __init__(
        self,
        client,
        total_items: int,
        done_items: int,
        *,
        enabled: bool | None,
        interval_s: float,
        out: TextIO,
    ):
        self.client = client
        self.total = total_items
        self.start_items = done_items
        isatty = hasattr(out, "isatty") and out.isatty()
        self.enabled = isatty if enabled is None else bool(enabled)
        self.interval = max(0.1, float(interval_s))
        self.out = out
        self.tty = self.enabled and isatty
        self.t0 = time.monotonic()
        self.last_line = -math.inf
        self.last_done = -1
        self.last_draw = -math.inf
        self.memory = None
        self.last_memory = -math.inf

    def _cluster_memory(self) -> int | None:
        now = time.monotonic()
        if now - self.last_memory >= self.interval:
            self.last_memory = now
            try:
                info = self.client.scheduler_info(n_workers=-1)
                self.memory = sum(
                    w.get("metrics", {}).get("memory", 0) for w in info["workers"].values()
                )
            except Exception:  # noqa: BLE001 (progress must never fail the run)
                self.memory = None
        return self.memory

    def rate(self, done_items: int) -> tuple[float, float | None]:
        """Items per second in this run so far, and the seconds left (None: unknown)."""
        elapsed = time.monotonic() - self.t0
        rate = (done_items - self.start_items) / elapsed if elapsed > 0 else 0.0
        return rate, (self.total - done_items) / rate if rate > 0 else None

    def text(self, done_items: int, chunks_done: int, in_flight: int) -> str:
        rate, left = self.rate(done_items)
        eta = _fmt_duration(left) if left is not None else "?"
        mem = self._cluster_memory()
        pct = 100.0 * done_items / self.total if self.total else 100.0
        return (
            f"{done_items}/{self.total} items ({pct:.0f}%), {chunks_done} chunks done, "
            f"{in_flight} in flight, {rate:.1f} items/s, ETA {eta}, cluster memory "
            f"{format_bytes(mem) if mem is not None else '?'}"
        )

    def tick(self, done_items: int, chunks_done: int, in_flight: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty and (force or now - self.last_draw >= 0.2):
            self.last_draw = now
            frac = done_items / self.total if self.total else 1.0
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            line = f"\r[{bar}] " + self.text(done_items, chunks_done, in_flight)
            self.out.write(line[:200].ljust(120))
            self.out.flush()
        if not (force and done_items != self.last_done) and now - self.last_line < self.interval:
            return
        listening = progress_log.isEnabledFor(logging.INFO)
        if not (listening or (self.enabled and not self.tty)):
            return
        self.last_line, self.last_done = now, done_items
        line = "progress: " + self.text(done_items, chunks_done, in_flight)
        progress_log.info(line)
        if self.enabled and not self.tty:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


class _Watchers:
    """:attr:`RunOptions.watchers`: each gets a snapshot of the run (a dict, see
    :meth:`_Shell.snapshot`) at most every :data:`WATCH_EVERY_S` and once at the end
    (``final=True``).  A watcher that raises is logged and dropped; the run goes on."""

    def __init__(self, watchers: Sequence[Callable[[dict], None]]):
        self.watchers = list(watchers)
        self.events: deque[dict] = deque(maxlen=EVENTS_KEPT)
        self.last = -math.inf

    def event(self, kind: str, **fields) -> None:
        """A run event for the snapshots: ``kill``, ``split``, ``quarantine``, ``retry``,
        ``requeue``, ``failed``, ``held``, ``run-failed``."""
        self.events.append({"kind": kind, "time": round(time.time(), 3), **fields})

    def due(self, force: bool) -> bool:
        if not self.watchers:
            return False
        now = time.monotonic()
        if force or now - self.last >= WATCH_EVERY_S:
            self.last = now
            return True
        return False

    def send(self, snapshot: dict) -> None:
        for watcher in list(self.watchers):
            try:
                watcher(snapshot)
            except Exception:  # noqa: BLE001 (a watcher never fails the run)
                name = getattr(watcher, "__qualname__", None) or type(watcher).__name__
                log.warning("progress watcher %s failed and is disabled", name, exc_info=True)
                self.watchers.remove(watcher)


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _next_batch(ac, timeout: float, wake: Callable[[], bool] = lambda: False) -> list:
    """Finished (future, result) pairs, waiting at most ``timeout`` seconds for one (or
    until ``wake()``, checked whenever ``ac.thread_condition`` is notified)."""
    deadline = time.monotonic() + timeout
    while not ac.has_ready() and not ac.is_empty() and not wake():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with ac.thread_condition:
            ac.thread_condition.wait(timeout=min(left, 0.05))
    return ac.next_batch(block=False) if ac.has_ready() else []


# ------------------------------------------------------------------- run ----


@dataclass(frozen=True)
class RunOptions:
    """Everything :func:`run` takes besides the chunks, the task and the client.

    ``report_dir`` is the base directory: the run's report goes to ``report_dir/run_id``.
    ``params`` (a small JSON-able dict) is recorded with the run; a resumed run must
    have the same.  ``no_worker_timeout_s``: when the cluster has had no workers at all
    for this long the run fails; ``None`` uses the cluster's start timeout when the
    client came from :func:`hpcbatch.cluster.open_cluster`, else
    :data:`NO_WORKER_TIMEOUT_S`.  ``database``: the URL the chunks read and write
    (default: the ledger's), probed before anything is submitted and while a chunk's
    database error holds the run, for up to ``db_outage_s`` seconds in all.
    ``progress``: show progress on ``out`` (``None``: only when ``out`` is a terminal); the
    lines are logged on ``hpcbatch.progress`` (INFO) either way.  ``watchers``: callables
    given a snapshot dict of the run's progress while it runs and once at the end (see
    :meth:`_Shell.snapshot`); one that raises is logged and dropped.
    """

    run_id: str
    ledger: Ledger | None = None
    max_in_flight: int | None = None
    retries: int = 2
    min_chunk: int = 1
    seed: int = 0
    plan: Any = None
    report_dir: str | Path | None = None
    commit_on_worker: bool = False
    progress: bool | None = True
    resume: bool = False
    params: dict | None = None
    progress_interval: float = 5.0
    grace_period_s: float = 60.0
    resume_hint: str = DEFAULT_RESUME_HINT
    out: TextIO | None = None
    no_worker_timeout_s: float | None = None
    database: str | None = None
    db_outage_s: float = DB_OUTAGE_S
    max_bad_items: int | str | None = None  # see chunkstate.bad_item_limit
    item_name: str = "item"
    watchers: tuple[Callable[[dict], None], ...] = ()

    def checked(self) -> RunOptions:
        """These options with ``out`` and ``database`` filled in; ConfigError if wrong."""
        if self.commit_on_worker and self.ledger is None:
            raise ConfigError(
                "commit_on_worker=True needs a ledger for the task's sink to write to"
            )
        Policy(self.retries, self.min_chunk)  # raises for a bad retries / min-chunk
        bad_item_limit(self.max_bad_items, 1)  # raises for a bad max-bad-items
        if not self.db_outage_s > 0:
            raise ConfigError(
                "database-outage-timeout must be a positive number of seconds, got "
                f"{self.db_outage_s}"
            )
        database = self.database
        if database is None and self.ledger is not None:
            database = self.ledger.url
        return dataclasses.replace(self, out=self.out or sys.stderr, database=database)

    def for_cluster(self, client) -> RunOptions:
        """The in-flight window and the no-worker timeout, from the cluster if not given."""
        window = self.max_in_flight
        if window is None:
            window = _default_in_flight(client, self.plan)
        if window < 1:
            raise ConfigError(f"max-in-flight must be at least 1, got {window}")
        timeout = self.no_worker_timeout_s
        if timeout is None:
            timeout = float(
                getattr(client, "hpcbatch_start_timeout_s", None) or NO_WORKER_TIMEOUT_S
            )
        if timeout <= 0:
            raise ConfigError(f"no-worker timeout must be positive, got {timeout}")
        return dataclasses.replace(self, max_in_flight=window, no_worker_timeout_s=timeout)

    @property
    def policy(self) -> Policy:
        limit = self.max_bad_items if isinstance(self.max_bad_items, int) else None
        return Policy(self.retries, self.min_chunk, self.resume_hint, limit, self.item_name)

    @property
    def run_dir(self) -> Path | None:
        return Path(self.report_dir) / self.run_id if self.report_dir is not None else None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def run(
    chunks: Sequence[Chunk], task_fn: Callable[[Chunk, TaskContext], dict], client, **options
) -> RunReport:
    """Run ``task_fn(chunk, ctx)`` for every chunk on ``client``'s cluster; see the module
    doc, and :class:`RunOptions` for the keyword arguments (``run_id`` is required).

    Returns a :class:`RunReport`; raises :class:`ChunkFailedError` or
    :class:`RunInterrupted` after writing the report, and
    :class:`~hpcbatch.retry.DatabaseUnavailable` when the run's database is gone.
    """
    return run_with(chunks, task_fn, client, RunOptions(**options))


def run_with(chunks: Sequence[Chunk], task_fn: Callable, client, opts: RunOptions) -> RunReport:
    """:func:`run` with its options gathered in ``opts``."""
    chunks = list(chunks)
    if not chunks:
        raise ConfigError("nothing to run: no chunks")
    opts = opts.checked()
    breaker = _DatabaseBreaker(opts.database, opts.db_outage_s)
    breaker.preflight(opts.resume_hint)
    t_start = time.time()
    start = _start(chunks, opts, breaker)
    if isinstance(start, RunReport):
        return start
    grow = opts.max_in_flight is None  # the default window may widen (see FAST_WINDOW)
    limit = bad_item_limit(opts.max_bad_items, start.n_items)
    opts = dataclasses.replace(opts.for_cluster(client), max_bad_items=limit)
    if opts.run_dir is not None:
        opts.run_dir.mkdir(parents=True, exist_ok=True)
        preload_plotting()  # memory.png's import overlaps the run (once per process)
    shell = _Shell(client, task_fn, opts, start, breaker, grow=grow)
    shell.run()
    return _finish(shell, t_start)


@dataclass(frozen=True)
class _Start:
    """What a run starts from: its chunks, the pieces to run, what resume skipped."""

    chunks: list[Chunk]
    pending: list[Chunk]
    skipped: int = 0  # chunks recorded done before this run
    done_before_items: int = 0
    quarantined_before: tuple = ()  # items the chunks done before this run quarantined

    @property
    def n_items(self) -> int:
        return sum(c.size for c in self.chunks)


def _start(chunks: list[Chunk], opts: RunOptions, breaker) -> _Start | RunReport:
    """The ledger's record of the run: a new run, a resumed one, or one already finished."""
    ledger, run_id = opts.ledger, opts.run_id
    if ledger is None:
        return _Start(chunks, list(chunks))
    chunk_size = max(c.size for c in chunks)
    with breaker.guard(opts.resume_hint):
        info = ledger.start_run(
            run_id,
            n_items=sum(c.size for c in chunks),
            chunk_size=chunk_size,
            seed=opts.seed,
            params=opts.params,
            resume=opts.resume,
        )
    if info["finished"]:
        msg = f"run {run_id!r} already finished ({info['n_done']} chunks recorded): nothing to do"
        opts.say(msg)
        plan = opts.plan.to_dict() if opts.plan is not None else None
        n, bad = len(chunks), _quarantined_before(ledger, run_id, breaker, opts)
        return RunReport(
            run_id=run_id, status="already-finished", n_chunks=n, chunks_skipped=n,
            message=msg, plan=plan, quarantined=bad, items_quarantined=len(bad),
            item_name=opts.item_name,
        )  # fmt: skip
    if int(info["chunk_size"]) != chunk_size:
        chunks = rechunk(chunks, int(info["chunk_size"]), run_id)
    with breaker.guard(opts.resume_hint):
        index = DoneIndex(ledger.done_ids(run_id))
    start = _resume_pieces(chunks, index)
    if start.skipped or start.done_before_items:
        bad = _quarantined_before(ledger, run_id, breaker, opts)
        start = dataclasses.replace(start, quarantined_before=tuple(bad))
    if info["resumed"]:
        opts.say(
            f"resuming run {run_id!r}: {start.skipped} of {len(chunks)} chunks already done, "
            f"{len(start.pending)} to run"
        )
    return start


def _quarantined_before(ledger: Ledger, run_id: str, breaker, opts: RunOptions) -> list[dict]:
    """The items quarantined by the chunks of ``run_id`` the ledger holds as done."""
    with breaker.guard(opts.resume_hint):
        metas = ledger.chunk_meta(run_id)
    return [e for _cid, meta in sorted(metas.items()) for e in quarantined_of(meta or {})]


def _resume_pieces(chunks: list[Chunk], index: DoneIndex) -> _Start:
    pending: list[Chunk] = []
    skipped = done_items = 0
    for chunk in chunks:
        if index.is_done(chunk.chunk_id):
            skipped += 1
            done_items += chunk.size
        else:
            pieces = undone_pieces(chunk, index)
            done_items += chunk.size - sum(p.size for p in pieces)
            pending.extend(pieces)
    return _Start(chunks, pending, skipped, done_items)


@dataclass
class _Stop:
    """Why the run stops submitting (a signal's name) and since when (monotonic)."""

    reason: str | None = None
    at: float | None = None
    announced: bool = False

    def on_signal(self, signum, _frame) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            self.at = time.monotonic()


@contextmanager
def _sigterm_to(stop: _Stop):
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, stop.on_signal)
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


class _Shell:
    """One run on Dask: submits what the :class:`ChunkStates` hands out, feeds it each
    task's outcome, and watches the SIGTERM grace, the database breaker and the workers."""

    def __init__(self, client, task_fn, opts: RunOptions, start: _Start, breaker, grow: bool):
        self.client, self.task_fn, self.opts = client, task_fn, opts
        self.window = opts.max_in_flight
        # the default window widens for chunks shorter than the round trip to the
        # scheduler (else the workers wait on the driver; see _widen)
        self.widest = max(self.window, FAST_WINDOW) if grow else self.window
        self.unflushed = 0  # released futures whose release has not left the client yet
        self.slow = False  # a chunk of this batch took FAST_CHUNK_S or more
        self.start, self.breaker = start, breaker
        self.states = ChunkStates(start.pending, opts.policy)
        self.states.seed_quarantined(start.quarantined_before)
        self.stop = _Stop()
        self.in_flight: dict[Any, tuple[Attempt, float]] = {}  # key -> attempt, submitted
        self.group = f"hpcbatch-{getattr(task_fn, '__name__', 'task')}-{uuid.uuid4().hex[:8]}"
        self.bar = _Progress(
            client,
            start.n_items,
            start.done_before_items,
            enabled=opts.progress,
            interval_s=opts.progress_interval,
            out=opts.out,
        )
        self.watch = _WorkerWatch(client, opts.no_worker_timeout_s)
        self.watchers = _Watchers(opts.watchers)
        self.started = time.time()
        self.sampler_on = self.counter_on = False
        self.n_workers = 0  # at the start: the nannies whose timelines the report gathers
        self.t0 = self.t_end = 0.0

    @property
    def counters(self) -> Counters:
        return self.states.counters

    @property
    def fatal(self) -> ChunkFailedError | None:
        return self.states.fatal

    def run(self) -> None:
        """The whole run on the cluster (plugins in, loop, plugins out)."""
        from distributed import as_completed

        self.sampler_on = _install(self.client, MemorySampler(), SAMPLER_NAME)
        self.n_workers = len(self.client.scheduler_info().get("workers", {}))
        self.counter_on = _install_scheduler_plugin(self.client)
        _install(self.client, QueueWitness(), WITNESS_NAME, quiet=True)
        # this client's loop: as_completed() with no futures would take the *default*
        # client's loop, another (maybe closed) client's when several live in one process,
        # and the tasks' completions then never arrive (a run that hangs)
        self.ac = as_completed(loop=self.client.loop, with_results=True, raise_errors=False)
        self.t0 = time.time()
        try:
            with ExitStack() as stack:
                stack.enter_context(_sigterm_to(self.stop))
                if self.opts.run_dir is not None:
                    path = self.opts.run_dir / "dask-report.html"
                    stack.enter_context(_performance_report(self.client, path))
                self._loop()
        except BaseException as exc:
            # lost scheduler, Ctrl-C, a ledger error: the done chunks are recorded
            self.notify_end("failed" if isinstance(exc, Exception) else "interrupted")
            if self.opts.ledger is not None:
                with suppress(Exception):
                    self.opts.ledger.finish_run(self.opts.run_id, "interrupted")
            raise
        finally:
            self.bar.close()
            with suppress(Exception):
                self.client.unregister_worker_plugin(WITNESS_NAME)
        self.t_end = time.time()

    def _loop(self) -> None:
        first = True
        while self._breaker_allows():
            self._submit()
            if first:  # the first progress line as the first chunks go out, not after a wait
                first = False
                self._tick()
            if not self.in_flight:
                if self.states.pending and not self._stopping():
                    # no room yet: the last releases had not left the client when
                    # _submit looked (they may have since: then submit at once)
                    if self.unflushed:
                        self._await_releases()
                    continue
                if not self.breaker.is_open or self.stop.reason or self.fatal is not None:
                    break
                time.sleep(0.2)  # nothing in flight: wait for the database (polled above)
                continue
            if self._grace_over():
                break
            batch = _next_batch(self.ac, 0.5, self._can_submit)
            for future, result in batch:
                self._gather(future, result)
            self._release([future for future, _result in batch])
            if self.breaker.gone:
                break  # nothing can be recorded: cancel what is in flight, write the report
            self._tick()
            if self.fatal is None and self.in_flight and self._workers_gone():
                break
        self._tick(force=True)
        if self.in_flight:
            self.client.cancel(list(_futures_of(self.ac)), force=True)
        self.ac.clear()

    def _tick(self, force: bool = False) -> None:
        c = self.counters
        done = self.start.done_before_items + c.items_done
        self.bar.tick(done, c.chunks_done, len(self.in_flight), force=force)
        if self.watchers.due(force):
            self.watchers.send(self.snapshot())

    def notify_end(self, state: str) -> None:
        """The watchers' last snapshot (``final=True``): ``state`` is how the run ended."""
        if self.watchers.watchers:
            self.watchers.send(self.snapshot(final=True, state=state))

    def snapshot(self, final: bool = False, state: str = "running") -> dict:
        """The run's progress for a watcher: counts of chunks (this run's; ``skipped``:
        done before a resume) and items (all done, resumed ones too), rate, ETA and the
        recent events."""
        c, start = self.counters, self.start
        items_done = start.done_before_items + c.items_done
        rate, eta = self.bar.rate(items_done)
        return {
            "run_id": self.opts.run_id,
            "state": state,
            "final": final,
            "n_chunks": self.n_chunks,
            "n_items": start.n_items,
            "item_name": self.opts.item_name,
            "counters": {
                "done": c.chunks_done,
                "in_flight": len(self.in_flight),
                "retried": c.retried,
                "split": c.split,
                "quarantined": len(c.quarantined),
                "failed": c.failed,
                "requeued": c.requeued,
                "skipped": start.skipped,
                "tasks_done": c.tasks_done,
            },  # fmt: skip
            "items_done": items_done,
            "rate": round(rate, 3),
            "eta_s": round(eta, 1) if eta is not None else None,
            "started": round(self.started, 3),
            "elapsed_s": round(time.time() - self.started, 3),
            "report_dir": str(self.opts.run_dir) if self.opts.run_dir is not None else None,
            "message": str(self.fatal or ""),
            "events": list(self.watchers.events),
        }

    def _stopping(self) -> bool:
        return self.stop.reason is not None or self.fatal is not None or self.breaker.is_open

    def _room(self) -> int:
        return self.window - len(self.in_flight) - self.unflushed

    def _can_submit(self) -> bool:
        """Room for a batch worth a submission: a quarter of the window (or all that is
        left), so a wide window is refilled in batches, not one task at a time."""
        want = min(max(1, self.window // 4), self.states.pending)
        return want > 0 and self._room() >= want and not self._stopping()

    def _release(self, futures: list) -> None:
        """Release finished tasks without waiting: their room in the window counts once
        the releases have left the client, so the scheduler never holds more than the
        window (a release takes two hops through the client's event loop, a submission
        one: a marker two hops behind the releases says when they are out)."""
        if not futures:
            return
        self._widen()
        for future in futures:
            future.release()
        self.unflushed += len(futures)
        loop, n = self.client.loop, len(futures)

        def flushed() -> None:
            with self.ac.thread_condition:
                self.unflushed -= n
                self.ac.thread_condition.notify_all()

        loop.add_callback(loop.add_callback, flushed)

    def _await_releases(self) -> None:
        with self.ac.thread_condition:
            self.ac.thread_condition.wait_for(lambda: not self.unflushed, timeout=0.5)

    def _widen(self) -> None:
        """Double the (default) window while chunks finish faster than FAST_CHUNK_S."""
        slow, self.slow = self.slow, False
        if self.window < self.widest and not slow:
            self.window = min(self.widest, 2 * self.window)

    def _submit(self) -> None:
        if self._stopping():
            return
        attempts = self.states.take(self._room())
        if not attempts:
            return
        keys = [(self.group, a.chunk.chunk_id, a.label) for a in attempts]
        chunks = [a.chunk for a in attempts]
        contexts = [self._context(a) for a in attempts]
        if len(attempts) == 1:
            futures = [
                self.client.submit(
                    execute_chunk, self.task_fn, chunks[0], contexts[0], key=keys[0], pure=False
                )
            ]
        else:
            fns = [self.task_fn] * len(attempts)
            futures = self.client.map(execute_chunk, fns, chunks, contexts, key=keys, pure=False)
        now = time.time()
        for key, attempt in zip(keys, attempts, strict=True):
            self.in_flight[key] = (attempt, now)
        self.ac.update(futures)

    def _context(self, attempt: Attempt) -> TaskContext:
        opts, chunk_id = self.opts, attempt.chunk.chunk_id
        return TaskContext(
            run_id=opts.run_id,
            seed=chunk_seed(opts.seed, chunk_id),
            attempt=attempt.number,
            ledger=opts.ledger if opts.commit_on_worker else None,
            chunk_id=chunk_id,
        )

    def _gather(self, future, result) -> None:
        """One finished task: its outcome goes to the state machine."""
        attempt, submitted = self.in_flight.pop(future.key)
        self.slow = self.slow or time.time() - submitted >= FAST_CHUNK_S
        status = _outcome(result)
        key = future.key
        if status == "finished" and isinstance(result, dict) and _DB_UNAVAILABLE in result:
            outage = result[_DB_UNAVAILABLE]
            status, result = "error", (type(outage), outage, outage.__traceback__)
        if status == "finished":
            self._succeeded(attempt, result)
        elif status == "cancelled":  # e.g. the scheduler restarted: run it again
            self.states.cancelled(attempt)
        else:
            self._failed(attempt, key, submitted, result)

    def _succeeded(self, attempt: Attempt, meta: dict) -> None:
        opts = self.opts
        if self.breaker.gone:  # the ledger cannot record it: it reruns on resume
            self.states.hold(attempt)
            return
        already = bool(meta.pop(_ALREADY_DONE, False))
        if opts.ledger is not None and not opts.commit_on_worker and not already:
            # a restart of the ledger's database is waited out; a longer outage raises
            # DatabaseUnavailable (the chunk's output is idempotent: it reruns on resume)
            try:
                with_backoff(
                    lambda: opts.ledger.mark_done(opts.run_id, attempt.chunk, meta),
                    attempts=None,
                    max_total_s=self.breaker.outage_s,
                    database=opts.ledger.url,
                    what=f"recording chunk {attempt.chunk.chunk_id} in the ledger",
                )
            except DatabaseUnavailable as exc:  # the driver's own ledger write
                self.states.hold(attempt)
                committed = self.start.skipped + self.counters.chunks_done
                self._run_failed(
                    self.breaker.fail(
                        exc, opts.ledger.url, committed, self.n_chunks, opts.resume_hint
                    )
                )
                return
        before = len(self.counters.quarantined)
        self.states.succeeded(attempt, meta)
        for entry in self.counters.quarantined[before:]:
            self.watchers.event("quarantine", chunk=attempt.chunk.chunk_id, **entry)

    @property
    def n_chunks(self) -> int:
        return len(self.start.chunks)

    def _failed(self, attempt: Attempt, key, submitted: float, triple) -> None:
        exc_type, exc, tb = triple
        verdict = "ordinary"
        if self.fatal is None:
            verdict = self.breaker.on_failure(attempt.chunk, exc)
        if verdict == "again":  # the outage it met is over already
            self.states.requeue(attempt)
            return
        if verdict == "held":
            self.states.hold(attempt)
            self.watchers.event("held", chunk=attempt.chunk.chunk_id, reason=error_line(exc))
            self._say_held(attempt.chunk)
            return
        kills: list[dict] = []
        memory = is_memory_error(exc)
        if not memory and _is_killed_worker(exc):
            kills, guilty = _blame(self.client, key, submitted)
            if kills and not guilty:  # it only waited behind the chunk that was killed
                log.info("chunk %s waited on a worker killed for memory: rerun as it is",
                         attempt.chunk.chunk_id)  # fmt: skip
                self.states.requeue(attempt)
                self.watchers.event("requeue", chunk=attempt.chunk.chunk_id,
                                    reason="waited behind a chunk killed for memory")  # fmt: skip
                return
            memory = bool(kills)
        if memory:
            how, needed = _kill_how(kills, exc_type, exc)
            verdict = self.states.memory_failure(attempt, how, needed)
        else:
            how = f"{exc_type.__name__}: {one_line(str(exc))[:200]}"
            verdict = self.states.error(attempt, exc_type, exc, tb)
        _note(self.watchers, attempt.chunk, verdict.action, kills, how)
        if verdict.message:
            self.opts.say(verdict.message)

    def _say_held(self, chunk: Chunk) -> None:
        b = self.breaker
        if b.newly_open and b.seconds_left() >= 1:
            self.opts.say(
                f"\nchunk {chunk.chunk_id}: database {b.where} unreachable ({b.cause}): "
                f"submitting no more chunks; waiting up to {b.seconds_left():.0f} s for it "
                "to come back"
            )

    def _breaker_allows(self) -> bool:
        """Poll an open breaker: held chunks go again when the database is back; False
        when it stayed down too long (the run failed)."""
        b = self.breaker
        if not b.is_open or self.fatal is not None:
            return True
        verdict = b.poll()
        if verdict == "up":
            b.release()
            held = self.states.release()
            self.opts.say(
                f"\ndatabase {b.where} is back after {b.last_outage_s:.0f} s: "
                f"resubmitting the {held} chunks held"
            )
        elif verdict == "gone":
            committed = self.start.skipped + self.counters.chunks_done
            self._run_failed(b.error(committed, self.n_chunks, self.opts.resume_hint))
            return False  # nothing can commit: cancel what is in flight, write the report
        return True

    def _run_failed(self, error: ChunkFailedError) -> None:
        """A run-level failure (not one chunk's): counted, in the report, printed."""
        self.states.fail_run(error)
        self.watchers.event("run-failed", reason=str(error))
        self.opts.say(f"\n{error}")

    def _grace_over(self) -> bool:
        stop, grace = self.stop, self.opts.grace_period_s
        if stop.reason is not None and not stop.announced:
            stop.announced = True
            self.opts.say(
                f"\n{stop.reason} received: submitting no more chunks; waiting up to "
                f"{grace:.0f} s for the {len(self.in_flight)} in flight"
            )
        if self.fatal is not None and stop.at is None:
            stop.at = time.monotonic()  # a failed chunk: the others get the same grace
        if stop.at is not None and time.monotonic() - stop.at > grace:
            self.opts.say(
                f"grace period over: cancelling {len(self.in_flight)} chunks in flight "
                "(they are not recorded and will rerun on resume)"
            )
            return True
        return False

    def _workers_gone(self) -> bool:
        """No workers: during a stop, soon ends the wait; else, after the timeout, fails."""
        gone = self.watch.seconds_without_workers()
        timeout = self.opts.no_worker_timeout_s
        if gone is None:
            return False
        if self.stop.reason is not None and gone >= min(timeout, STOPPING_NO_WORKER_S):
            # stopping anyway (SIGTERM at walltime ends the worker jobs too): the chunks
            # in flight cannot finish; the run is interrupted, not failed
            self.opts.say(
                f"no workers left to finish the {len(self.in_flight)} chunks in flight "
                "(they are not recorded and will rerun on resume)"
            )
            return True
        if gone < timeout:
            return False
        job_watch = _job_watch(self.client)
        waiting = job_watch.waiting_replacements() if job_watch is not None else None
        done = self.start.skipped + self.counters.chunks_done
        error = _no_workers_error(
            gone, self.states, done, self.n_chunks, self.opts.resume_hint, waiting
        )
        self._run_failed(error)
        return True  # nothing can run: cancel what is in flight, write the report


def _note(watchers: _Watchers, chunk: Chunk, action: str, kills: list[dict], how: str) -> None:
    """A failed attempt's events: the kills of its workers, then what became of it."""
    for kill in kills:
        watchers.event("kill", chunk=chunk.chunk_id, worker=kill.get("worker"), reason=how,
                       rss_bytes=kill.get("rss") or None)  # fmt: skip
    if action == "split":
        children = [piece.chunk_id for piece in chunk.split()]
        watchers.event("split", chunk=chunk.chunk_id, children=children, reason=how)
    elif action in ("retry", "failed"):
        watchers.event(action, chunk=chunk.chunk_id, reason=how)


def _finish(shell: _Shell, t_start: float) -> RunReport:
    """The ledger's record, the report, the closing line; raises for a run that did not
    finish."""
    opts, c, start = shell.opts, shell.counters, shell.start
    status = "finished"
    if shell.fatal is not None:
        status = "failed"
    elif shell.stop.reason is not None:
        status = "interrupted"
    if opts.ledger is not None and not shell.breaker.took_down(opts.ledger.url):
        _finish_ledger(opts, status, start.chunks)
    try:
        report = _build_report(shell, status, shell.t_end - t_start)
    finally:
        shell.notify_end(status)
    run_dir = opts.run_dir
    line = (
        f"run {opts.run_id!r} {status}: {c.chunks_done} chunks ({c.items_done} items, "
        f"{c.tasks_done} tasks) in {report.wall_time_s:.1f} s, {start.skipped} skipped, "
        f"{c.retried} retried, {c.split} split"
        + (f"; report in {run_dir}" if run_dir else "")
        + (f"; {quarantine_line(c.quarantined, opts.item_name)}" if c.quarantined else "")
    )
    if shell.bar.enabled or status != "finished":
        opts.say(line)
    else:
        progress_log.info(line)
    if shell.fatal is not None:
        raise shell.fatal
    if status == "interrupted":
        raise RunInterrupted(
            f"run {opts.run_id!r} stopped by {shell.stop.reason} with "
            f"{start.done_before_items + c.items_done} of {start.n_items} items done: "
            f"{opts.resume_hint}"
        )
    return report


def _outcome(result: Any) -> str:
    """How a task ended, from what ``as_completed(with_results=True, raise_errors=False)``
    captured: an exception triple (``error``), a ``CancelledError`` (``cancelled``), else
    its value (``finished``).  Not ``future.status``: that moves on after the result was
    taken (a finished chunk whose workers just left reads ``lost``)."""
    if isinstance(result, BaseException):
        return "cancelled"
    if isinstance(result, tuple) and len(result) == 3 and isinstance(result[1], BaseException):
        return "error"
    return "finished"


def _job_watch(client):
    """The SLURM :class:`~hpcbatch.cluster.WorkerJobWatch` of ``client``'s cluster, or None."""
    return getattr(client, "hpcbatch_job_watch", None)


def _finish_ledger(opts: RunOptions, status: str, chunks) -> None:
    ledger, run_id, out = opts.ledger, opts.run_id, opts.out
    try:
        ledger.finish_run(run_id, status)
        if status == "finished" and opts.commit_on_worker:
            index = DoneIndex(ledger.done_ids(run_id))
            missing = [c.chunk_id for c in chunks if not index.is_done(c.chunk_id)]
            if missing:
                opts.say(
                    f"warning: {len(missing)} chunks (e.g. {missing[0]}) finished but their "
                    "sink did not record them in the ledger: they will rerun on --resume"
                )
    except Exception as exc:  # noqa: BLE001 (the full disk / lost database that failed the run)
        print(
            f"warning: could not record run {run_id!r} as {status} in the ledger "
            f"({type(exc).__name__}: {error_line(exc)}); the chunks recorded before stay "
            "done, --resume will finish the record",
            file=out,
            flush=True,
        )


def _futures_of(ac) -> list:
    with ac.lock:
        return list(ac.futures)


class _WorkerWatch:
    """How long the cluster has had no workers at all (asked at most every ``every_s``)."""

    def __init__(self, client, timeout_s: float, every_s: float = 1.0):
        self.client = client
        self.every_s = min(every_s, max(timeout_s / 4, 0.05))
        self.last_check = float("-inf")
        self.empty_since: float | None = None

    def seconds_without_workers(self) -> float | None:
        now = time.monotonic()
        if now - self.last_check >= self.every_s:
            self.last_check = now
            try:
                info = self.client.scheduler_info(n_workers=1)
            except Exception:  # noqa: BLE001 (a lost scheduler fails the run elsewhere)
                return None
            if info.get("workers") or info.get("n_workers"):
                self.empty_since = None
            elif self.empty_since is None:
                self.empty_since = now
        return None if self.empty_since is None else now - self.empty_since


class _DatabaseBreaker:
    """The run's circuit breaker on its database (``url``; ``None``: none known).

    Closed: chunks run.  A chunk that fails with a transient database error is checked
    against the database itself: answering -> the chunk reruns at once without using a
    retry (for ``outage_s`` per chunk; after that an ordinary failure, retried as usual);
    not answering -> open: the chunk is held (by the state machine) and nothing more is submitted while the
    database is probed every ``every_s``.  It answers again -> closed, the held chunks
    rerun (no retry used up).  Still down ``outage_s`` after the outage began (counting
    the time the failing chunk already retried on its worker) -> gone: the run fails.
    """

    def __init__(self, url: str | None, outage_s: float, *, every_s: float = 1.0, probe=None):
        self.url = url
        self.where = mask_url(url) if url else "(unknown)"
        self.outage_s = float(outage_s)
        self.every_s = every_s
        self.probe = probe or probe_database
        self.down_since: float | None = None
        self.cause = ""
        self.newly_open = False
        self.gone = False
        self.gone_url: str | None = None
        self.first_failure: dict[str, float] = {}  # chunk id -> its first database error
        self.last_probe = float("-inf")
        self.last_outage_s = 0.0

    @property
    def is_open(self) -> bool:
        return self.down_since is not None

    def preflight(self, hint: str) -> None:
        """Nothing is submitted to a database that does not answer (one line why)."""
        if self.url is not None and (cause := self.probe(self.url)) is not None:
            raise DatabaseUnavailable(
                f"database {self.where} is unreachable ({cause}): nothing was submitted; "
                f"start it (or fix the URL), then {hint}",
                self.where,
                cause,
            )

    @contextmanager
    def guard(self, hint: str):
        """The driver's own ledger calls: a transient database error is one line."""
        try:
            yield
        except Exception as exc:
            if not is_transient(exc):
                raise
            cause = error_line(exc)
            raise DatabaseUnavailable(
                f"database {self.where} became unreachable before any chunk was submitted "
                f"({cause}): start it, then {hint}",
                self.where,
                cause,
            ) from None

    def recognises(self, exc: BaseException) -> bool:
        return isinstance(exc, DatabaseUnavailable) or (self.url is not None and is_transient(exc))

    def on_failure(self, chunk: Chunk, exc: BaseException) -> str:
        """What to do with a failed chunk: ``held`` (the database is down: the breaker
        is open and the chunk waits), ``again`` (a database error, but the database
        answers now: rerun it without using a retry, for up to ``outage_s`` per chunk)
        or ``ordinary`` (not a database outage: the usual retries)."""
        self.newly_open = False
        if not self.recognises(exc):
            return "ordinary"
        if not self.is_open:
            if self.url is None and isinstance(exc, DatabaseUnavailable):
                self.where, self.cause = exc.database or self.where, exc.cause
            if self._check() is None:
                now = time.monotonic()
                first = self.first_failure.setdefault(chunk.chunk_id, now)
                return "again" if now - first < self.outage_s else "ordinary"
            waited = exc.waited_s if isinstance(exc, DatabaseUnavailable) else 0.0
            self.down_since = time.monotonic() - waited
            self.newly_open = True
        return "held"

    def _check(self) -> str | None:
        self.last_probe = time.monotonic()
        if self.url is None:  # nothing to probe: a worker's own verdict stands
            return self.cause or "unreachable"
        cause = self.probe(self.url)
        if cause is not None:
            self.cause = cause
        return cause

    def poll(self) -> str:
        """``up`` (closed again), ``down`` (keep waiting) or ``gone`` (fail the run)."""
        assert self.down_since is not None
        now = time.monotonic()
        if now - self.last_probe >= self.every_s and self._check() is None:
            self.last_outage_s = now - self.down_since
            return "up"
        if now - self.down_since >= self.outage_s:
            self.gone, self.gone_url = True, self.url
            return "gone"
        return "down"

    def release(self) -> None:
        self.down_since = None

    def seconds_left(self) -> float:
        return max(0.0, (self.down_since or 0.0) + self.outage_s - time.monotonic())

    def took_down(self, url: str) -> bool:
        """Whether the run failed because ``url`` (e.g. the ledger's database) is gone."""
        return self.gone and url == self.gone_url

    def fail(
        self, exc: DatabaseUnavailable, url: str, committed: int, n_chunks: int, hint: str
    ) -> DatabaseUnavailable:
        """The run's error after the driver itself gave up on the database at ``url``."""
        self.where, self.cause = exc.database or mask_url(url), exc.cause
        self.down_since = time.monotonic() - exc.waited_s
        self.gone, self.gone_url = True, url
        return self.error(committed, n_chunks, hint)

    def error(self, committed: int, n_chunks: int, hint: str) -> DatabaseUnavailable:
        down = time.monotonic() - (self.down_since or time.monotonic())
        return DatabaseUnavailable(
            f"database {self.where} unreachable for {down:.0f} s ({self.cause}): "
            f"{committed} of {n_chunks} chunks committed, no more submitted; start the "
            f"database, then {hint}",
            self.where,
            self.cause,
            down,
        )


def _no_workers_error(
    gone: float,
    states: ChunkStates,
    done: int,
    n_chunks: int,
    hint: str,
    waiting: str | None = None,
) -> ChunkFailedError:
    """``waiting``: the SLURM job watch's account of replacement jobs not started yet."""
    done_txt = f"{done} of {n_chunks} chunks done"
    if waiting:  # the workers' jobs ended and their replacements sit in the queue
        return ChunkFailedError(
            f"the cluster lost all its workers and none came back for {gone:.0f} s "
            f"({waiting}): {done_txt}; check the queue (squeue, the partition's limits) or "
            f"raise no_worker_timeout_s, then {hint}"
        )
    kills = states.counters.split + sum(
        "out of memory" in str(f.get("error")) for f in states.failures
    )
    why = (
        f"after {kills} out-of-memory kills: most likely the worker processes were "
        "killed for memory faster than they restarted"
        if kills
        else "most likely repeated memory kills (or the workers' jobs ended)"
    )
    return ChunkFailedError(
        f"the cluster lost all its workers and none came back for {gone:.0f} s ({why}): "
        f"{done_txt}; give each worker more memory (--mem, fewer workers) or use smaller "
        f"chunks, then {hint}"
    )


def _default_in_flight(client, plan) -> int:
    threads = 0
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # noqa: BLE001
        threads = 0
    if plan is not None:
        threads = max(threads, plan.n_workers * plan.threads_per_worker)
    return max(2, 2 * threads)


def _install(client, plugin, name: str, *, quiet: bool = False) -> bool:
    try:
        client.register_plugin(plugin, name=name)
        return True
    except Exception as exc:  # noqa: BLE001 (no nannies, e.g. dask worker --no-nanny)
        if not quiet:
            print(
                f"note: per-worker memory sampling is off ({type(exc).__name__}: {exc})",
                file=sys.stderr,
            )
        return False


def _install_scheduler_plugin(client) -> bool:
    try:
        client.register_plugin(TaskCounter(), name=COUNTER_NAME)
        return True
    except Exception:  # noqa: BLE001 (a scheduler that cannot import hpcbatch)
        return False


def _performance_report(client, path: Path):
    try:
        from distributed import performance_report
    except ImportError:  # pragma: no cover
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(client.as_current())
    # Bokeh inline: the file opens without a network (a compute node, no CDN)
    stack.enter_context(performance_report(filename=str(path), mode="inline"))
    return stack


# ---------------------------------------------------------------- report ----


def _timelines(client, sampler_on: bool, n_workers: int = 0) -> list[dict]:
    """Each nanny's sampled memory; after worker deaths, first a short wait for the workers
    a nanny is still restarting (a nanny is reached through its worker)."""
    if not sampler_on:
        return []
    if n_workers:
        with suppress(Exception):  # fewer for good (a lost SLURM job): report what is there
            client.wait_for_workers(n_workers, timeout=RESTART_WAIT_S)
    timelines: list[dict] = []
    try:
        got = client.run(nanny_memory_timeline, nanny=True)
        timelines = [tl for tl in got.values() if tl]
    except Exception as exc:  # noqa: BLE001
        print(f"note: could not fetch worker memory timelines: {exc}", file=sys.stderr)
    with suppress(Exception):
        client.unregister_worker_plugin(SAMPLER_NAME, nanny=True)
    return timelines


def _max_tasks(client, counter_on: bool) -> int | None:
    if not counter_on:
        return None
    try:
        max_tasks = client.run_on_scheduler(scheduler_max_tasks)
        client.run_on_scheduler(remove_scheduler_counter)
        return max_tasks
    except Exception:  # noqa: BLE001
        return None


def _deaths(client, since: float, until: float, terminate: float | None) -> list[dict]:
    """Why each worker that left during the run left, each naming only the chunks that
    were executing there (not those that waited behind them)."""
    witnessed = _events(client, EXECUTING_TOPIC)
    removed = [
        (t, {**ev, "processing-tasks": executing_when_removed((t, ev), witnessed)})
        if isinstance(ev, dict) and ev.get("action") == "remove-worker"
        else (t, ev)
        for t, ev in _events(client, "all")
    ]
    deaths = classify_deaths(
        removed,
        _events(client, "worker-restart-memory"),
        since=since,
        until=until,
        terminate_fraction=terminate or None,
        exits=[
            (t, ev.get("worker"), ev.get("exitcode"))
            for t, ev in _events(client, EXIT_TOPIC)
            if isinstance(ev, dict)
        ],
    )
    # a SLURM worker job that ended: the reason SLURM gives (cancelled, memory, ...)
    return add_slurm_job_reasons(deaths, getattr(_job_watch(client), "job_of", None))


def _build_report(shell: _Shell, status: str, wall: float) -> RunReport:
    client, opts, c, plan = shell.client, shell.opts, shell.counters, shell.opts.plan
    thresholds = dict(plan.thresholds) if plan is not None else None
    terminate = thresholds.get("terminate") if thresholds else None
    deaths = _deaths(client, shell.t0, shell.t_end, terminate)
    timelines = _timelines(client, shell.sampler_on, shell.n_workers if deaths else 0)
    max_tasks = _max_tasks(client, shell.counter_on)
    peaks = _peaks(timelines, deaths)
    limit = (
        plan.memory_limit_bytes
        if plan is not None
        else next((tl["memory_limit"] for tl in timelines if tl.get("memory_limit")), None)
    )
    report = RunReport(
        run_id=opts.run_id,
        status=status,
        n_chunks=shell.n_chunks,
        chunks_done=c.chunks_done,
        tasks_done=c.tasks_done,
        chunks_skipped=shell.start.skipped,
        chunks_retried=c.retried,
        chunks_split=c.split,
        chunks_failed=c.failed,
        items_done=c.items_done,
        wall_time_s=round(wall, 3),
        plan=plan.to_dict() if plan is not None else None,
        predicted_peak_bytes=plan.predicted_peak_bytes if plan is not None else None,
        measured_peak_bytes=max(peaks.values()) if peaks else None,
        measured_peak_per_worker=peaks,
        memory_limit_bytes=limit,
        worker_deaths=deaths,
        results_meta=dict(c.meta),
        quarantined=list(c.quarantined),
        items_quarantined=len(c.quarantined),
        item_name=opts.item_name,
        report_dir=str(opts.run_dir) if opts.run_dir is not None else None,
        max_in_flight=c.max_in_flight,
        max_tasks_on_scheduler=max_tasks,
        failures=shell.states.failures,
        message=str(shell.fatal or ""),
        provenance=collect_provenance(opts.run_id, shell.t_end - wall, shell.t_end).to_dict(),
    )
    if opts.run_dir is not None:
        _write_report(client, report, timelines, thresholds, shell.t0, shell.t_end, shell.group)
    return report


def _write_report(
    client, report: RunReport, timelines, thresholds, t0: float, t_end: float, group: str
) -> None:
    """report.json, memory.png, then report.html (it links the others)."""
    run_dir = Path(report.report_dir)
    try:
        write_report_dir(report, run_dir)
        if timelines:
            thresholds = thresholds or _thresholds_of(client)
            plot_memory(
                timelines,
                run_dir / "memory.png",
                t0=t0,
                memory_limit_bytes=report.memory_limit_bytes,
                thresholds=thresholds,
                predicted_peak_bytes=report.predicted_peak_bytes,
                deaths=report.worker_deaths,
                title=f"Per-worker memory of run {report.run_id} (RSS sampled every 0.1 s)",
            )
        write_html_report_of(
            client, run_dir, report.to_dict(), timelines=timelines, thresholds=thresholds,
            t0=t0, t_end=t_end, group=group,
        )  # fmt: skip
    except OSError as exc:
        raise HpcbatchError(
            f"cannot write the report to {run_dir}: {exc}: check the report-dir"
        ) from None


def _thresholds_of(client) -> dict | None:
    def read(dask_worker=None):
        import dask.config

        return {
            k: dask.config.get(f"distributed.worker.memory.{k}")
            for k in ("target", "spill", "pause", "terminate")
        }

    try:
        got = client.run(read)
        return next(iter(got.values()), None)
    except Exception:  # noqa: BLE001
        return None


def _peaks(timelines: list[dict], deaths: list[dict]) -> dict[str, int]:
    """Each worker's highest sampled RSS, or the RSS the nanny saw when it killed it."""
    peaks: dict[str, int] = {}
    owner: dict[str, str] = {}
    for tl in timelines:
        values = [r for r in tl["rss"] if r == r]  # skip NaN (no process)
        if values:
            peaks[tl["name"]] = int(max(values))
        for _t, address in tl.get("addresses", ()):
            owner[address] = tl["name"]
    for death in deaths:
        name = owner.get(death["worker"])
        if name is not None and death.get("rss_bytes"):
            peaks[name] = max(peaks.get(name, 0), int(death["rss_bytes"]))
    return peaks
