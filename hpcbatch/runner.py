"""The chunk runner: bounded submission, progress, OOM split-and-retry, resume.

Owns :class:`Chunk` (a small description of a slice of the run's items),
:func:`make_chunks`, :func:`chunk_seed`, :class:`TaskContext` and :func:`run`.

:func:`run` keeps at most ``max_in_flight`` chunk tasks on the scheduler (so the
graph stays small for any number of chunks), reacts to each finished task as it
completes, and:

- records done chunks in the :class:`~hpcbatch.ledger.Ledger` (or lets the task's
  SQL sink record them in its own transaction, ``commit_on_worker=True``);
- splits a chunk in half and retries it when it ran out of memory (``MemoryError``,
  torch / CUDA out-of-memory, or ``KilledWorker`` after the nanny killed its workers
  for memory), down to ``min_chunk`` items, then raises :class:`ChunkFailedError`
  with the memory the chunk needed;
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

import asyncio
import hashlib
import math
import signal
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .errors import ChunkFailedError, ConfigError, HpcbatchError, RunInterrupted
from .ledger import ChunkAlreadyDone, DoneIndex, Ledger
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
    remove_scheduler_counter,
    scheduler_max_tasks,
    slurm_memory_kills,
    write_report_dir,
)
from .retry import DatabaseUnavailable, error_line, is_transient, probe_database, with_backoff
from .security import mask_url
from .units import format_bytes

_ALREADY_DONE = "__hpcbatch_already_done__"
_DB_UNAVAILABLE = "__hpcbatch_database_unavailable__"
NO_WORKER_TIMEOUT_S = 120.0  # no workers at all for this long fails the run (not a hang)
DB_OUTAGE_S = 60.0  # the database unreachable for this long fails the run (a restart is not)
STOPPING_NO_WORKER_S = 5.0  # during a SIGTERM stop: no workers this long ends the wait


# ---------------------------------------------------------------- chunks ----


@dataclass(frozen=True)
class Chunk:
    """Items ``start`` to ``stop`` (exclusive) of a run; ``items`` optionally names them."""

    chunk_id: str
    start: int
    stop: int
    items: tuple = ()

    def __post_init__(self) -> None:
        if self.stop <= self.start:
            raise ConfigError(f"chunk {self.chunk_id} is empty ({self.start}..{self.stop})")
        if self.items and len(self.items) != self.stop - self.start:
            raise ConfigError(
                f"chunk {self.chunk_id} has {len(self.items)} items for range "
                f"{self.start}..{self.stop}: give one item per index"
            )

    @property
    def size(self) -> int:
        return self.stop - self.start

    def split(self) -> tuple[Chunk, Chunk]:
        """The two halves, ``<id>.0`` and ``<id>.1`` (the first has the smaller half)."""
        if self.size < 2:
            raise ValueError(f"chunk {self.chunk_id} has one item and cannot be split")
        mid = self.start + self.size // 2
        k = mid - self.start
        return (
            Chunk(f"{self.chunk_id}.0", self.start, mid, tuple(self.items[:k])),
            Chunk(f"{self.chunk_id}.1", mid, self.stop, tuple(self.items[k:])),
        )


def make_chunks(n_items: int, chunk_size: int, items: Sequence | None = None) -> list[Chunk]:
    """Cut ``n_items`` (optionally named by ``items``) into chunks of ``chunk_size``."""
    if n_items < 1:
        raise ConfigError(f"nothing to run: {n_items} items")
    if chunk_size < 1:
        raise ConfigError(f"chunk size must be at least 1, got {chunk_size}")
    if items is not None and len(items) != n_items:
        raise ConfigError(f"{len(items)} items given for n_items={n_items}: they must match")
    n_chunks = math.ceil(n_items / chunk_size)
    width = max(6, len(str(n_chunks - 1)))
    chunks = []
    for k in range(n_chunks):
        start, stop = k * chunk_size, min(n_items, (k + 1) * chunk_size)
        named = tuple(items[start:stop]) if items is not None else ()
        chunks.append(Chunk(f"c{k:0{width}d}", start, stop, named))
    return chunks


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


# -------------------------------------------------------------- failures ----


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


def _memory_kills_of(client, key, since: float) -> list[dict]:
    """Memory kills of the workers that died while running ``key``.

    A nanny memory kill (``worker-restart-memory`` event, with the RSS it saw), or a
    worker process that ended by SIGKILL: the kernel OOM killer or the batch system's
    memory enforcement (the nanny survives those and the sampler saw the exit code).
    """
    for attempt in range(6):  # the nanny's event can trail the worker's removal
        try:
            removed = client.get_events("all")
            kills = client.get_events("worker-restart-memory")
        except Exception:  # noqa: BLE001 (an old or foreign scheduler: no events)
            return []
        workers = {
            ev.get("worker")
            for t, ev in removed
            if t >= since - 1
            and isinstance(ev, dict)
            and ev.get("action") == "remove-worker"
            and key in ev.get("processing-tasks", ())
        }
        found = [m for t, m in kills if t >= since - 1 and m.get("worker") in workers]
        if not found:
            found = [
                {"worker": ev.get("worker"), "rss": 0, "sigkill": True}
                for t, ev in _events(client, EXIT_TOPIC)
                if t >= since - 1 and ev.get("worker") in workers and ev.get("exitcode") == -9
            ]
        if not found:  # the whole SLURM job killed for its --mem (the nanny died too)
            found = slurm_memory_kills(workers, getattr(_job_watch(client), "job_of", None))
        if found or attempt == 5:
            return found
        time.sleep(0.3)
    return []


def _events(client, topic: str) -> list:
    try:
        return list(client.get_events(topic))
    except Exception:  # noqa: BLE001
        return []


# -------------------------------------------------------------- progress ----


class _Progress:
    def __init__(
        self,
        client,
        total_items: int,
        done_items: int,
        *,
        enabled: bool,
        interval_s: float,
        out: TextIO,
    ):
        self.client = client
        self.total = total_items
        self.start_items = done_items
        self.enabled = enabled
        self.interval = max(0.1, float(interval_s))
        self.out = out
        self.tty = enabled and hasattr(out, "isatty") and out.isatty()
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

    def text(self, done_items: int, chunks_done: int, in_flight: int) -> str:
        elapsed = time.monotonic() - self.t0
        rate = (done_items - self.start_items) / elapsed if elapsed > 0 else 0.0
        left = self.total - done_items
        eta = _fmt_duration(left / rate) if rate > 0 else "?"
        mem = self._cluster_memory()
        pct = 100.0 * done_items / self.total if self.total else 100.0
        return (
            f"{done_items}/{self.total} items ({pct:.0f}%), {chunks_done} chunks done, "
            f"{in_flight} in flight, {rate:.1f} items/s, ETA {eta}, cluster memory "
            f"{format_bytes(mem) if mem is not None else '?'}"
        )

    def tick(self, done_items: int, chunks_done: int, in_flight: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if force or now - self.last_draw >= 0.2:
                self.last_draw = now
                frac = done_items / self.total if self.total else 1.0
                bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
                line = f"\r[{bar}] " + self.text(done_items, chunks_done, in_flight)
                self.out.write(line[:200].ljust(120))
                self.out.flush()
        elif (force and done_items != self.last_done) or now - self.last_line >= self.interval:
            self.last_line = now
            self.last_done = done_items
            print(
                "progress: " + self.text(done_items, chunks_done, in_flight),
                file=self.out,
                flush=True,
            )

    def close(self) -> None:
        if self.enabled and self.tty:
            self.out.write("\n")
            self.out.flush()


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _next_batch(ac, timeout: float) -> list:
    """Finished (future, result) pairs, waiting at most ``timeout`` seconds for one."""
    deadline = time.monotonic() + timeout
    while not ac.has_ready() and not ac.is_empty():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with ac.thread_condition:
            ac.thread_condition.wait(timeout=min(left, 0.05))
    return ac.next_batch(block=False) if ac.has_ready() else []


# ------------------------------------------------------------------- run ----


@dataclass
class _State:
    chunks_done: int = 0  # chunks of the run finished (all their pieces)
    tasks_done: int = 0  # tasks finished: chunks and halves of split chunks
    items_done: int = 0
    retried: int = 0
    split: int = 0
    failed: int = 0
    max_in_flight: int = 0
    items_left: dict = field(default_factory=dict)  # root chunk id -> items not yet done
    meta: dict = field(default_factory=dict)  # summed numeric metadata from the tasks


def run(
    chunks: Sequence[Chunk],
    task_fn: Callable[[Chunk, TaskContext], dict],
    client,
    *,
    run_id: str,
    ledger: Ledger | None = None,
    max_in_flight: int | None = None,
    retries: int = 2,
    min_chunk: int = 1,
    seed: int = 0,
    plan=None,
    report_dir: str | Path | None = None,
    commit_on_worker: bool = False,
    progress: bool = True,
    resume: bool = False,
    params: dict | None = None,
    progress_interval: float = 5.0,
    grace_period_s: float = 60.0,
    resume_hint: str = "rerun the same command with --resume",
    out: TextIO | None = None,
    no_worker_timeout_s: float | None = None,
    database: str | None = None,
    db_outage_s: float = DB_OUTAGE_S,
) -> RunReport:
    """Run ``task_fn(chunk, ctx)`` for every chunk on ``client``'s cluster; see the module doc.

    ``report_dir`` is the base directory: the run's report goes to ``report_dir/run_id``.
    ``params`` (a small JSON-able dict) is recorded with the run; a resumed run must
    have the same.  Returns a :class:`RunReport`; raises :class:`ChunkFailedError` or
    :class:`RunInterrupted` after writing the report.

    ``no_worker_timeout_s``: when the cluster has had no workers at all for this long
    the run fails (report written, finished chunks kept) instead of waiting forever.
    ``None`` uses the cluster's start timeout when the client came from
    :func:`hpcbatch.cluster.open_cluster` (``cluster.start-timeout``: a SLURM job may
    wait in the queue), else :data:`NO_WORKER_TIMEOUT_S`.

    ``database``: the URL of the database the chunks read and write (default: the
    ledger's); it is probed before anything is submitted, and when a chunk fails with a
    transient database error the run holds all submission until it answers again.  It
    may stay unreachable for ``db_outage_s`` seconds in all (a restart is ridden out);
    after that the run fails with :class:`~hpcbatch.retry.DatabaseUnavailable`.
    """
    out = out or sys.stderr
    chunks = list(chunks)
    if not chunks:
        raise ConfigError("nothing to run: no chunks")
    if commit_on_worker and ledger is None:
        raise ConfigError("commit_on_worker=True needs a ledger for the task's sink to write to")
    if retries < 0 or min_chunk < 1:
        raise ConfigError("retries must be >= 0 and min-chunk >= 1")
    if not db_outage_s > 0:
        raise ConfigError(
            f"database-outage-timeout must be a positive number of seconds, got {db_outage_s}"
        )
    if database is None and ledger is not None:
        database = ledger.url
    breaker = _DatabaseBreaker(database, db_outage_s)
    breaker.preflight(resume_hint)
    t_start = time.time()
    n_items = sum(c.size for c in chunks)
    chunk_size = max(c.size for c in chunks)
    n_chunks = len(chunks)

    pending: list[Chunk] = list(chunks)
    skipped = 0
    done_before_items = 0
    if ledger is not None:
        with breaker.guard(resume_hint):
            info = ledger.start_run(
                run_id,
                n_items=n_items,
                chunk_size=chunk_size,
                seed=seed,
                params=params,
                resume=resume,
            )
        if info["finished"]:
            msg = (
                f"run {run_id!r} already finished ({info['n_done']} chunks recorded): nothing to do"
            )
            print(msg, file=out, flush=True)
            report = RunReport(
                run_id=run_id,
                status="already-finished",
                n_chunks=n_chunks,
                chunks_skipped=n_chunks,
                message=msg,
                plan=plan.to_dict() if plan is not None else None,
            )
            return report
        if int(info["chunk_size"]) != chunk_size:
            chunks = _rechunk(chunks, int(info["chunk_size"]), run_id)
            n_chunks = len(chunks)
        with breaker.guard(resume_hint):
            index = DoneIndex(ledger.done_ids(run_id))
        pending = []
        for chunk in chunks:
            if index.is_done(chunk.chunk_id):
                skipped += 1
                done_before_items += chunk.size
            else:
                pieces = _undone_pieces(chunk, index)
                done_before_items += chunk.size - sum(p.size for p in pieces)
                pending.extend(pieces)
        if info["resumed"]:
            print(
                f"resuming run {run_id!r}: {skipped} of {n_chunks} chunks already done, "
                f"{len(pending)} to run",
                file=out,
                flush=True,
            )

    if max_in_flight is None:
        max_in_flight = _default_in_flight(client, plan)
    if max_in_flight < 1:
        raise ConfigError(f"max-in-flight must be at least 1, got {max_in_flight}")
    if no_worker_timeout_s is None:
        no_worker_timeout_s = float(
            getattr(client, "hpcbatch_start_timeout_s", None) or NO_WORKER_TIMEOUT_S
        )
    if no_worker_timeout_s <= 0:
        raise ConfigError(f"no-worker timeout must be positive, got {no_worker_timeout_s}")

    run_dir = Path(report_dir) / run_id if report_dir is not None else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)

    sampler_on = _install(client, MemorySampler(), nanny=True)
    counter_on = _install_scheduler_plugin(client)
    state = _State()
    for piece in pending:
        root = piece.chunk_id.split(".")[0]
        state.items_left[root] = state.items_left.get(root, 0) + piece.size
    failures: list[dict] = []
    stop: dict[str, Any] = {"reason": None, "at": None}
    loop_t0 = time.time()

    def on_signal(signum, _frame):
        if stop["reason"] is None:
            stop["reason"] = signal.Signals(signum).name
            stop["at"] = time.monotonic()

    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, on_signal)

    bar = _Progress(
        client, n_items, done_before_items, enabled=progress, interval_s=progress_interval, out=out
    )
    fatal: ChunkFailedError | None = None
    try:
        with ExitStack() as stack:
            if run_dir is not None:
                stack.enter_context(_performance_report(client, run_dir / "dask-report.html"))
            fatal = _loop(
                client,
                pending,
                task_fn,
                run_id=run_id,
                ledger=ledger,
                seed=seed,
                commit_on_worker=commit_on_worker,
                max_in_flight=max_in_flight,
                retries=retries,
                min_chunk=min_chunk,
                state=state,
                failures=failures,
                stop=stop,
                grace_period_s=grace_period_s,
                bar=bar,
                done_before_items=done_before_items,
                out=out,
                resume_hint=resume_hint,
                no_worker_timeout_s=no_worker_timeout_s,
                chunks_before=skipped,
                n_chunks=n_chunks,
                breaker=breaker,
            )
    except BaseException:
        # lost scheduler, Ctrl-C, a ledger error: the done chunks are recorded; mark the run
        if ledger is not None:
            with suppress(Exception):
                ledger.finish_run(run_id, "interrupted")
        raise
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    t_end = time.time()
    status = "finished"
    if fatal is not None:
        status = "failed"
    elif stop["reason"] is not None:
        status = "interrupted"
    if ledger is not None and not breaker.took_down(ledger.url):
        try:
            _finish_ledger(ledger, run_id, status, chunks, commit_on_worker, out)
        except Exception as exc:  # noqa: BLE001 (the full disk / lost database that failed the run)
            print(
                f"warning: could not record run {run_id!r} as {status} in the ledger "
                f"({type(exc).__name__}: {error_line(exc)}); the chunks recorded before stay "
                "done, --resume will finish the record",
                file=out,
                flush=True,
            )

    report = _build_report(
        client,
        run_id=run_id,
        status=status,
        n_chunks=n_chunks,
        skipped=skipped,
        state=state,
        wall=t_end - t_start,
        plan=plan,
        run_dir=run_dir,
        failures=failures,
        since=loop_t0,
        until=t_end,
        sampler_on=sampler_on,
        counter_on=counter_on,
        max_in_flight=max_in_flight,
        message=str(fatal or ""),
    )
    if progress or status != "finished":
        print(
            f"run {run_id!r} {status}: {state.chunks_done} chunks ({state.items_done} items, "
            f"{state.tasks_done} tasks) "
            f"in {report.wall_time_s:.1f} s, {skipped} skipped, {state.retried} retried, "
            f"{state.split} split" + (f"; report in {run_dir}" if run_dir else ""),
            file=out,
            flush=True,
        )
    if fatal is not None:
        raise fatal
    if status == "interrupted":
        raise RunInterrupted(
            f"run {run_id!r} stopped by {stop['reason']} with {done_before_items + state.items_done}"
            f" of {n_items} items done: {resume_hint}"
        )
    return report


def _loop(
    client,
    pending: list[Chunk],
    task_fn,
    *,
    run_id,
    ledger,
    seed,
    commit_on_worker,
    max_in_flight,
    retries,
    min_chunk,
    state: _State,
    failures: list,
    stop: dict,
    grace_period_s: float,
    bar: _Progress,
    done_before_items: int,
    out: TextIO,
    resume_hint: str = "rerun the same command with --resume",
    no_worker_timeout_s: float = 120.0,
    chunks_before: int = 0,
    n_chunks: int = 0,
    breaker: _DatabaseBreaker | None = None,
) -> ChunkFailedError | None:
    from distributed import as_completed

    watch = _WorkerWatch(client, no_worker_timeout_s)
    breaker = breaker or _DatabaseBreaker(None, DB_OUTAGE_S)

    queue: deque[tuple[Chunk, int]] = deque((c, 0) for c in pending)
    in_flight: dict[Any, tuple[Chunk, int, float]] = {}
    group = f"hpcbatch-{getattr(task_fn, '__name__', 'task')}-{uuid.uuid4().hex[:8]}"
    ac = as_completed(with_results=True, raise_errors=False)
    fatal: ChunkFailedError | None = None
    announced = False
    submitted_before: dict[tuple, int] = {}
    while True:
        if breaker.is_open and fatal is None:
            verdict = breaker.poll()
            if verdict == "up":
                held = breaker.release()
                queue.extendleft(reversed(held))
                print(
                    f"\ndatabase {breaker.where} is back after {breaker.last_outage_s:.0f} s: "
                    f"resubmitting the {len(held)} chunks held",
                    file=out,
                    flush=True,
                )
            elif verdict == "gone":
                fatal = _run_failed(
                    breaker.error(chunks_before + state.chunks_done, n_chunks, resume_hint),
                    state,
                    failures,
                    out,
                )
                break  # nothing can commit: cancel what is in flight, write the report
        stopping = stop["reason"] is not None or fatal is not None or breaker.is_open
        while queue and len(in_flight) < max_in_flight and not stopping:
            chunk, attempt = queue.popleft()
            key = (group, chunk.chunk_id, attempt)
            # a chunk the database breaker sent again keeps its attempt: a fresh key, so
            # the scheduler never hands back the failed task of the same name
            again = submitted_before.get(key, 0)
            submitted_before[key] = again + 1
            if again:
                key = (group, chunk.chunk_id, f"{attempt}.{again}")
            ctx = TaskContext(
                run_id=run_id,
                seed=chunk_seed(seed, chunk.chunk_id),
                attempt=attempt,
                ledger=ledger if commit_on_worker else None,
                chunk_id=chunk.chunk_id,
            )
            future = client.submit(execute_chunk, task_fn, chunk, ctx, key=key, pure=False)
            in_flight[key] = (chunk, attempt, time.time())
            ac.add(future)
            state.max_in_flight = max(state.max_in_flight, len(in_flight))
        if not in_flight:
            if not breaker.is_open or stop["reason"] is not None or fatal is not None:
                break
            time.sleep(0.2)  # nothing in flight: wait for the database (polled above)
            continue
        if stop["reason"] is not None and not announced:
            announced = True
            print(
                f"\n{stop['reason']} received: submitting no more chunks; waiting up to "
                f"{grace_period_s:.0f} s for the {len(in_flight)} in flight",
                file=out,
                flush=True,
            )
        if fatal is not None and stop["at"] is None:
            stop["at"] = time.monotonic()  # a failed chunk: the others get the same grace
        if stop["at"] is not None and time.monotonic() - stop["at"] > grace_period_s:
            print(
                f"grace period over: cancelling {len(in_flight)} chunks in flight "
                "(they are not recorded and will rerun on resume)",
                file=out,
                flush=True,
            )
            break
        batch = _next_batch(ac, 0.5)
        for future, result in batch:
            chunk, attempt, submitted = in_flight.pop(future.key)
            status = _outcome(result)
            key = future.key
            future.release()
            if status == "finished" and isinstance(result, dict) and _DB_UNAVAILABLE in result:
                outage = result[_DB_UNAVAILABLE]
                status, result = "error", (type(outage), outage, outage.__traceback__)
            if status == "finished":
                if breaker.gone:  # the ledger cannot record it: it reruns on resume
                    continue
                try:
                    _on_success(
                        chunk,
                        result,
                        run_id=run_id,
                        ledger=ledger,
                        commit_on_worker=commit_on_worker,
                        state=state,
                        outage_s=breaker.outage_s,
                    )
                except DatabaseUnavailable as exc:  # the driver's own ledger write
                    committed = chunks_before + state.chunks_done
                    fatal = _run_failed(
                        breaker.fail(exc, ledger.url, committed, n_chunks, resume_hint),
                        state,
                        failures,
                        out,
                    )
                continue
            if status == "cancelled":  # e.g. the scheduler restarted: run it again
                if attempt < retries:
                    state.retried += 1
                    queue.appendleft((chunk, attempt + 1))
                elif fatal is None:
                    state.failed += 1
                    fatal = ChunkFailedError(
                        f"chunk {chunk.chunk_id} was cancelled {attempt + 1} times (scheduler "
                        f"restarted or someone cancelled it): check the cluster, then "
                        f"{resume_hint}",
                        chunk_id=chunk.chunk_id,
                    )
                continue
            exc_type, exc, tb = result
            verdict = breaker.on_failure(chunk, attempt, exc) if fatal is None else "ordinary"
            if verdict == "again":  # the outage it met is over already
                queue.appendleft((chunk, attempt))
                continue
            if verdict == "held":
                if breaker.newly_open and breaker.seconds_left() >= 1:
                    print(
                        f"\nchunk {chunk.chunk_id}: database {breaker.where} unreachable "
                        f"({breaker.cause}): submitting no more chunks; waiting up to "
                        f"{breaker.seconds_left():.0f} s for it to come back",
                        file=out,
                        flush=True,
                    )
                continue
            problem = _on_failure(
                client,
                chunk,
                attempt,
                key,
                submitted,
                exc_type,
                exc,
                tb,
                queue=queue,
                retries=retries,
                min_chunk=min_chunk,
                state=state,
                failures=failures,
                out=out,
                resume_hint=resume_hint,
            )
            if problem is not None and fatal is None:
                fatal = problem
        if breaker.gone:
            break  # nothing can be recorded: cancel what is in flight, write the report
        if batch:
            # releases travel through the client's event loop; let them leave before
            # the next submissions so the scheduler never holds more than max_in_flight
            client.sync(_settle)
        bar.tick(done_before_items + state.items_done, state.chunks_done, len(in_flight))
        if fatal is None and in_flight:
            gone = watch.seconds_without_workers()
            if (
                gone is not None
                and stop["reason"] is not None
                and gone >= min(no_worker_timeout_s, STOPPING_NO_WORKER_S)
            ):
                # stopping anyway (SIGTERM at walltime ends the worker jobs too): the
                # chunks in flight cannot finish; the run is interrupted, not failed
                print(
                    f"no workers left to finish the {len(in_flight)} chunks in flight "
                    "(they are not recorded and will rerun on resume)",
                    file=out,
                    flush=True,
                )
                break
            if gone is not None and gone >= no_worker_timeout_s:
                job_watch = _job_watch(client)
                waiting = job_watch.waiting_replacements() if job_watch is not None else None
                fatal = _run_failed(
                    _no_workers_error(
                        gone, state, failures, chunks_before, n_chunks, resume_hint, waiting
                    ),
                    state,
                    failures,
                    out,
                )
                break  # nothing can run: cancel what is in flight, write the report
    bar.tick(done_before_items + state.items_done, state.chunks_done, len(in_flight), force=True)
    if in_flight:
        client.cancel(list(_futures_of(ac)), force=True)
    ac.clear() if hasattr(ac, "clear") else None
    return fatal


async def _settle() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


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


def _run_failed(
    fatal: ChunkFailedError, state: _State, failures: list, out: TextIO
) -> ChunkFailedError:
    """Record a run-level failure (not one chunk's): counted, in the report, printed."""
    state.failed += 1
    failures.append({"chunk_id": None, "error": str(fatal), "traceback": ""})
    print(f"\n{fatal}", file=out, flush=True)
    return fatal


def _job_watch(client):
    """The SLURM :class:`~hpcbatch.cluster.WorkerJobWatch` of ``client``'s cluster, or None."""
    return getattr(client, "hpcbatch_job_watch", None)


def _finish_ledger(ledger, run_id: str, status: str, chunks, commit_on_worker: bool, out) -> None:
    ledger.finish_run(run_id, status)
    if status == "finished" and commit_on_worker:
        index = DoneIndex(ledger.done_ids(run_id))
        missing = [c.chunk_id for c in chunks if not index.is_done(c.chunk_id)]
        if missing:
            print(
                f"warning: {len(missing)} chunks (e.g. {missing[0]}) finished but their "
                "sink did not record them in the ledger: they will rerun on --resume",
                file=out,
                flush=True,
            )


def _futures_of(ac) -> list:
    with ac.lock:
        return list(ac.futures)


def _on_success(
    chunk: Chunk,
    meta: dict,
    *,
    run_id,
    ledger,
    commit_on_worker,
    state: _State,
    outage_s: float = DB_OUTAGE_S,
) -> None:
    already = bool(meta.pop(_ALREADY_DONE, False))
    if ledger is not None and not commit_on_worker and not already:
        # a restart of the ledger's database is waited out; a longer outage raises
        # DatabaseUnavailable (the chunk's output is idempotent: it reruns on resume)
        with_backoff(
            lambda: ledger.mark_done(run_id, chunk, meta),
            attempts=None,
            max_total_s=outage_s,
            database=ledger.url,
            what=f"recording chunk {chunk.chunk_id} in the ledger",
        )
    state.tasks_done += 1
    state.items_done += chunk.size
    root = chunk.chunk_id.split(".")[0]
    left = state.items_left.get(root, chunk.size) - chunk.size
    state.items_left[root] = left
    if left <= 0:
        state.chunks_done += 1
    _add_meta(state, meta)


def _add_meta(state: _State, meta: dict) -> None:
    for k, v in meta.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            state.meta[k] = state.meta.get(k, 0) + v


def _on_failure(
    client,
    chunk: Chunk,
    attempt: int,
    key,
    submitted: float,
    exc_type,
    exc,
    tb,
    *,
    queue: deque,
    retries: int,
    min_chunk: int,
    state: _State,
    failures: list,
    out: TextIO,
    resume_hint: str = "rerun the same command with --resume",
) -> ChunkFailedError | None:
    kills: list[dict] = []
    memory = is_memory_error(exc)
    if not memory and _is_killed_worker(exc):
        kills = _memory_kills_of(client, key, submitted)
        memory = bool(kills)
    where = f"chunk {chunk.chunk_id} ({chunk.size} items {chunk.start}..{chunk.stop - 1})"
    if memory:
        needed = max((k.get("rss") or 0 for k in kills), default=0)
        how = (
            "its worker process was killed by SIGKILL (kernel OOM killer or batch-system "
            "memory limit)"
            if kills and not needed
            else None
        ) or (
            f"its worker was killed for memory at {format_bytes(needed)}"
            if kills
            else f"{exc_type.__name__}: {str(exc)[:200]}"
        )
        halves_fit = chunk.size // 2 >= min_chunk
        if halves_fit:
            first, second = chunk.split()
            queue.appendleft((second, 0))
            queue.appendleft((first, 0))
            state.split += 1
            print(
                f"\n{where} ran out of memory ({how}): split into {first.size} + "
                f"{second.size} items and retried",
                file=out,
                flush=True,
            )
            return None
        state.failed += 1
        need_txt = f"more than {format_bytes(needed)}" if needed else "more than its worker's limit"
        message = (
            f"{where} ran out of memory at the minimum chunk size ({min_chunk}): it needed "
            f"{need_txt} ({how}): give each worker more memory (--mem-gb, fewer workers) "
            "or lower min-chunk"
        )
        failures.append({"chunk_id": chunk.chunk_id, "error": message, "traceback": ""})
        return ChunkFailedError(message, chunk_id=chunk.chunk_id)
    if attempt < retries:
        state.retried += 1
        queue.append((chunk, attempt + 1))
        print(
            f"\n{where} failed ({exc_type.__name__}: {str(exc)[:200]}): retry "
            f"{attempt + 1} of {retries}",
            file=out,
            flush=True,
        )
        return None
    state.failed += 1
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    failures.append(
        {"chunk_id": chunk.chunk_id, "error": f"{exc_type.__name__}: {exc}", "traceback": text}
    )
    print(
        f"\n{where} failed {attempt + 1} times; the worker's traceback:\n{text}",
        file=out,
        flush=True,
    )
    error = ChunkFailedError(
        f"{where} failed after {attempt + 1} attempts: {exc_type.__name__}: "
        f"{_one_line(str(exc))}: fix the cause (traceback above and in the report), then "
        f"{resume_hint} (finished chunks are kept)",
        chunk_id=chunk.chunk_id,
    )
    error.traceback = text  # type: ignore[attr-defined]
    return error


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
    not answering -> open: the chunk is held and nothing more is submitted while the
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
        self.held: list[tuple[Chunk, int]] = []
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

    def on_failure(self, chunk: Chunk, attempt: int, exc: BaseException) -> str:
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
        self.held.append((chunk, attempt))
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

    def release(self) -> list[tuple[Chunk, int]]:
        held, self.held = self.held, []
        self.down_since = None
        return held

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
    state: _State,
    failures: list,
    chunks_before: int,
    n_chunks: int,
    hint: str,
    waiting: str | None = None,
) -> ChunkFailedError:
    """``waiting``: the SLURM job watch's account of replacement jobs not started yet."""
    done = f"{chunks_before + state.chunks_done} of {n_chunks} chunks done"
    if waiting:  # the workers' jobs ended and their replacements sit in the queue
        return ChunkFailedError(
            f"the cluster lost all its workers and none came back for {gone:.0f} s "
            f"({waiting}): {done}; check the queue (squeue, the partition's limits) or "
            f"raise no_worker_timeout_s, then {hint}"
        )
    kills = state.split + sum("out of memory" in str(f.get("error")) for f in failures)
    why = (
        f"after {kills} out-of-memory kills: most likely the worker processes were "
        "killed for memory faster than they restarted"
        if kills
        else "most likely repeated memory kills (or the workers' jobs ended)"
    )
    return ChunkFailedError(
        f"the cluster lost all its workers and none came back for {gone:.0f} s ({why}): "
        f"{done}; give each worker more memory (--mem-gb, fewer workers) or use smaller "
        f"chunks, then {hint}"
    )


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) < 300 else text[:297] + "..."


def _undone_pieces(chunk: Chunk, index: DoneIndex) -> list[Chunk]:
    if index.is_done(chunk.chunk_id):
        return []
    if not index.partly_done(chunk.chunk_id) or chunk.size < 2:
        return [chunk]
    first, second = chunk.split()
    return _undone_pieces(first, index) + _undone_pieces(second, index)


def _rechunk(chunks: list[Chunk], recorded: int, run_id: str) -> list[Chunk]:
    n_items = sum(c.size for c in chunks)
    standard = make_chunks(n_items, max(c.size for c in chunks))
    if [(c.chunk_id, c.start, c.stop) for c in chunks] != [
        (c.chunk_id, c.start, c.stop) for c in standard
    ]:
        raise ConfigError(
            f"run {run_id!r} was recorded with {recorded} items per chunk but these chunks "
            f"have {max(c.size for c in chunks)}: resume with --batch-size {recorded}"
        )
    items = [item for c in chunks for item in c.items] if chunks[0].items else None
    return make_chunks(n_items, recorded, items)


def _default_in_flight(client, plan) -> int:
    threads = 0
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # noqa: BLE001
        threads = 0
    if plan is not None:
        threads = max(threads, plan.n_workers * plan.threads_per_worker)
    return max(2, 2 * threads)


def _install(client, plugin, *, nanny: bool) -> bool:
    try:
        client.register_plugin(plugin, name=SAMPLER_NAME)
        return True
    except Exception as exc:  # noqa: BLE001 (no nannies, e.g. dask worker --no-nanny)
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
    stack.enter_context(performance_report(filename=str(path)))
    return stack


def _build_report(
    client,
    *,
    run_id,
    status,
    n_chunks,
    skipped,
    state: _State,
    wall,
    plan,
    run_dir,
    failures,
    since,
    until,
    sampler_on,
    counter_on,
    max_in_flight,
    message,
) -> RunReport:
    timelines: list[dict] = []
    if sampler_on:
        try:
            got = client.run(nanny_memory_timeline, nanny=True)
            timelines = [tl for tl in got.values() if tl]
        except Exception as exc:  # noqa: BLE001
            print(f"note: could not fetch worker memory timelines: {exc}", file=sys.stderr)
        with suppress(Exception):
            client.unregister_worker_plugin(SAMPLER_NAME, nanny=True)
    max_tasks = None
    if counter_on:
        try:
            max_tasks = client.run_on_scheduler(scheduler_max_tasks)
            client.run_on_scheduler(remove_scheduler_counter)
        except Exception:  # noqa: BLE001
            max_tasks = None
    thresholds = dict(plan.thresholds) if plan is not None else None
    try:
        removed = client.get_events("all")
        kills = client.get_events("worker-restart-memory")
    except Exception:  # noqa: BLE001
        removed, kills = (), ()
    terminate = thresholds.get("terminate") if thresholds else None
    deaths = classify_deaths(
        list(removed),
        list(kills),
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
    deaths = add_slurm_job_reasons(deaths, getattr(_job_watch(client), "job_of", None))
    peaks = _peaks(timelines, deaths)
    limit = (
        plan.memory_limit_bytes
        if plan is not None
        else next((tl["memory_limit"] for tl in timelines if tl.get("memory_limit")), None)
    )
    report = RunReport(
        run_id=run_id,
        status=status,
        n_chunks=n_chunks,
        chunks_done=state.chunks_done,
        tasks_done=state.tasks_done,
        chunks_skipped=skipped,
        chunks_retried=state.retried,
        chunks_split=state.split,
        chunks_failed=state.failed,
        items_done=state.items_done,
        wall_time_s=round(wall, 3),
        plan=plan.to_dict() if plan is not None else None,
        predicted_peak_bytes=plan.predicted_peak_bytes if plan is not None else None,
        measured_peak_bytes=max(peaks.values()) if peaks else None,
        measured_peak_per_worker=peaks,
        memory_limit_bytes=limit,
        worker_deaths=deaths,
        results_meta=dict(state.meta),
        report_dir=str(run_dir) if run_dir is not None else None,
        max_in_flight=state.max_in_flight,
        max_tasks_on_scheduler=max_tasks,
        failures=failures,
        message=message,
    )
    if run_dir is not None:
        try:
            write_report_dir(report, run_dir)
            if timelines:
                plot_memory(
                    timelines,
                    run_dir / "memory.png",
                    t0=since,
                    memory_limit_bytes=limit,
                    thresholds=thresholds or _thresholds_of(client),
                    predicted_peak_bytes=report.predicted_peak_bytes,
                    deaths=deaths,
                    title=f"Per-worker memory of run {run_id} (RSS sampled every 0.1 s)",
                )
        except OSError as exc:
            raise HpcbatchError(
                f"cannot write the report to {run_dir}: {exc}: check the report-dir"
            ) from None
    return report


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
