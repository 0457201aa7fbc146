"""The runner's chunk bookkeeping as a pure state machine: no Dask, no I/O, no printing.

Owns :class:`Chunk` and :func:`make_chunks` (the run's items cut into slices), the
resume helpers :func:`undone_pieces` / :func:`rechunk`, and :class:`ChunkStates`: every
chunk of a run is *pending* (queued), *in flight* (an :class:`Attempt` handed out by
:meth:`ChunkStates.take`), *held* (its database is down), or it ended *done*, *split*
(out of memory: its two halves are pending), *retried* (another attempt is pending) or
*failed* (the run failed: :attr:`ChunkStates.fatal` says why).

The shell (:mod:`hpcbatch.runner` on Dask, or a plain loop in this process) feeds it
what happened to each attempt and submits what it hands out; the machine answers with
a :class:`Verdict` whose ``message`` is the line to show the user.  Invariant: every
item of the pieces it was given is done exactly once when :attr:`ChunkStates.finished`
and :attr:`ChunkStates.fatal` is ``None`` (splits neither lose nor duplicate items).

It does not own the database breaker, the SIGTERM grace or worker deaths: those are
the shell's, which reports their consequences here (``held``, ``requeue``, ``fail_run``).
"""

from __future__ import annotations

import math
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import ChunkFailedError, ConfigError
from .units import format_bytes

DEFAULT_RESUME_HINT = "rerun the same command with --resume"
#: The key of a task's returned meta under which it reports the items it skipped as bad:
#: ``{QUARANTINED: [{"item": "000001.SZ", "reason": "close is NULL on 20240529"}], ...}``.
#: The runner collects them (not summed), records them and fails the run past
#: ``max-bad-items``.
QUARANTINED = "quarantined"
#: ``max-bad-items`` unset: the larger of this many items and DEFAULT_BAD_PERCENT %.
DEFAULT_BAD_ITEMS = 10
DEFAULT_BAD_PERCENT = 1.0


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

    @property
    def root(self) -> str:
        """The id of the run's chunk this one is a piece of (``c000001`` of ``c000001.0``)."""
        return self.chunk_id.split(".", 1)[0]

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

    def describe(self) -> str:
        return f"chunk {self.chunk_id} ({self.size} items {self.start}..{self.stop - 1})"


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


def undone_pieces(chunk: Chunk, index) -> list[Chunk]:
    """The pieces of ``chunk`` not recorded done in ``index`` (a :class:`DoneIndex`)."""
    if index.is_done(chunk.chunk_id):
        return []
    if not index.partly_done(chunk.chunk_id) or chunk.size < 2:
        return [chunk]
    first, second = chunk.split()
    return undone_pieces(first, index) + undone_pieces(second, index)


def rechunk(chunks: list[Chunk], recorded: int, run_id: str) -> list[Chunk]:
    """``chunks`` cut again at the chunk size a resumed run was recorded with."""
    n_items = sum(c.size for c in chunks)
    standard = make_chunks(n_items, max(c.size for c in chunks))
    if [(c.chunk_id, c.start, c.stop) for c in chunks] != [
        (c.chunk_id, c.start, c.stop) for c in standard
    ]:
        raise ConfigError(
            f"run {run_id!r} was recorded with {recorded} items per chunk but these chunks "
            f"have {max(c.size for c in chunks)}: resume with --chunk-size {recorded}"
        )
    items = [item for c in chunks for item in c.items] if chunks[0].items else None
    return make_chunks(n_items, recorded, items)


# ------------------------------------------------------------ the machine ----


@dataclass(frozen=True)
class Policy:
    """How failures are handled: ``retries`` per chunk, splits down to ``min_chunk``."""

    retries: int = 2
    min_chunk: int = 1
    resume_hint: str = DEFAULT_RESUME_HINT
    max_bad_items: int | None = None  # more quarantined items fail the run (None: no limit)
    item_name: str = "item"  # what an item is called in messages ("stock")

    def __post_init__(self) -> None:
        if self.retries < 0 or self.min_chunk < 1:
            raise ConfigError("retries must be >= 0 and min-chunk >= 1")


@dataclass(frozen=True, eq=False)
class Attempt:
    """One submission of ``chunk``: ``number`` retries used, ``again`` resubmissions that
    used none (a database outage, a worker killed by another chunk)."""

    chunk: Chunk
    number: int = 0
    again: int = 0

    @property
    def label(self) -> int | str:
        """Distinct for every submission of the chunk (a task key needs that)."""
        return self.number if not self.again else f"{self.number}.{self.again}"


@dataclass(frozen=True)
class Verdict:
    """What became of a failed attempt (``split``, ``retry``, ``requeued``, ``held``,
    ``failed``) and the line to tell the user (empty: nothing to say)."""

    action: str
    message: str = ""


@dataclass
class Counters:
    chunks_done: int = 0  # chunks of the run finished (all their pieces)
    tasks_done: int = 0  # tasks finished: chunks and halves of split chunks
    items_done: int = 0
    retried: int = 0
    split: int = 0
    failed: int = 0
    requeued: int = 0  # resubmitted unchanged (no retry used): e.g. kill victims
    max_in_flight: int = 0
    meta: dict = field(default_factory=dict)  # summed numeric metadata from the tasks
    quarantined: list = field(default_factory=list)  # [{"item", "reason"}] from the tasks

    def add_meta(self, meta: dict) -> None:
        for k, v in meta.items():
            if k == QUARANTINED:
                self.quarantined.extend(quarantined_of(meta))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                self.meta[k] = self.meta.get(k, 0) + v


def quarantined_of(meta: dict) -> list[dict]:
    """The items a task's ``meta`` reports under :data:`QUARANTINED`, as ``{"item",
    "reason"}`` dicts (a bare item is accepted, with an empty reason)."""
    out = []
    for entry in meta.get(QUARANTINED) or ():
        if isinstance(entry, dict):
            out.append({"item": entry.get("item"), "reason": str(entry.get("reason", ""))})
        else:
            out.append({"item": entry, "reason": ""})
    return out


def bad_item_limit(setting, n_items: int) -> int:
    """How many quarantined items a run of ``n_items`` tolerates: ``setting`` is a count
    (``0``: none), a percentage of the items (``"2%"``), or ``None``: the larger of
    :data:`DEFAULT_BAD_ITEMS` and :data:`DEFAULT_BAD_PERCENT` %."""
    if setting is None:
        return max(DEFAULT_BAD_ITEMS, math.ceil(n_items * DEFAULT_BAD_PERCENT / 100))
    text = str(setting).strip()
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if 0 <= percent <= 100:
                return math.floor(n_items * percent / 100)
        elif not isinstance(setting, bool) and float(text) == int(float(text)) >= 0:
            return int(float(text))
    except ValueError:
        pass
    raise ConfigError(
        f"max-bad-items must be a number of items (e.g. 10), a percentage (e.g. 1%) or null, "
        f"got {setting!r}"
    )


class ChunkStates:
    """The state of every chunk of a run (see the module doc)."""

    def __init__(self, pieces: Sequence[Chunk], policy: Policy = Policy()):
        self.policy = policy
        self.counters = Counters()
        self.queue: deque[Attempt] = deque(Attempt(c) for c in pieces)
        self.in_flight: set[Attempt] = set()
        self.held: list[Attempt] = []
        self.failures: list[dict] = []
        self.fatal: ChunkFailedError | None = None
        self.items_left: dict[str, int] = {}  # root chunk id -> items not yet done
        for piece in pieces:
            self.items_left[piece.root] = self.items_left.get(piece.root, 0) + piece.size

    # ------------------------------------------------------------- queries --

    @property
    def finished(self) -> bool:
        """Nothing pending, in flight or held (all done, unless :attr:`fatal`)."""
        return not self.queue and not self.in_flight and not self.held

    @property
    def pending(self) -> int:
        return len(self.queue)

    # ------------------------------------------------------------- events --

    def take(self, room: int) -> list[Attempt]:
        """Up to ``room`` pending attempts, now in flight (none once the run failed)."""
        if self.fatal is not None:
            return []
        out = [self.queue.popleft() for _ in range(min(room, len(self.queue)))]
        self.in_flight.update(out)
        c = self.counters
        c.max_in_flight = max(c.max_in_flight, len(self.in_flight))
        return out

    def _settle(self, attempt: Attempt) -> None:
        if attempt not in self.in_flight:
            raise ValueError(
                f"chunk {attempt.chunk.chunk_id} (attempt {attempt.label}) is not in flight"
            )
        self.in_flight.discard(attempt)

    def succeeded(self, attempt: Attempt, meta: dict) -> None:
        self._settle(attempt)
        chunk, c = attempt.chunk, self.counters
        c.tasks_done += 1
        c.items_done += chunk.size
        left = self.items_left.get(chunk.root, chunk.size) - chunk.size
        self.items_left[chunk.root] = left
        if left <= 0:
            c.chunks_done += 1
        before = len(c.quarantined)
        c.add_meta(meta)
        if len(c.quarantined) > before:
            self._check_bad_items(chunk)

    def _check_bad_items(self, chunk: Chunk | None) -> None:
        """More than ``max_bad_items`` quarantined: the run fails, naming them."""
        limit, bad = self.policy.max_bad_items, self.counters.quarantined
        if limit is None or len(bad) <= limit or self.fatal is not None:
            return
        message = (
            f"{quarantine_line(bad, self.policy.item_name)}: more than max-bad-items "
            f"({limit}): fix the data, or raise max-bad-items (in --config, or "
            f"DASK_HPCBATCH__MAX_BAD_ITEMS=5%), then {self.policy.resume_hint}"
        )
        if chunk is None:
            self.fail_run(ChunkFailedError(message))
        else:
            self._chunk_failed(chunk, message, "")

    def seed_quarantined(self, entries: Sequence[dict]) -> None:
        """Items quarantined by chunks done before this run (a resume): counted too, so
        a resume past ``max_bad_items`` fails again unless the limit was raised."""
        self.counters.quarantined.extend(entries)
        if entries:
            self._check_bad_items(None)

    def requeue(self, attempt: Attempt) -> Verdict:
        """Run it again, same size, no retry used (front of the queue)."""
        self._settle(attempt)
        self.counters.requeued += 1
        self.queue.appendleft(Attempt(attempt.chunk, attempt.number, attempt.again + 1))
        return Verdict("requeued")

    def hold(self, attempt: Attempt) -> Verdict:
        """Its database is down: keep it aside until :meth:`release`."""
        self._settle(attempt)
        self.held.append(attempt)
        return Verdict("held")

    def release(self) -> int:
        """The database is back: the held attempts go first, no retry used."""
        held, self.held = self.held, []
        for a in reversed(held):
            self.queue.appendleft(Attempt(a.chunk, a.number, a.again + 1))
        return len(held)

    def memory_failure(self, attempt: Attempt, how: str, needed: int = 0) -> Verdict:
        """It ran out of memory (``how``; ``needed``: bytes seen, 0 unknown): split it in
        half, or fail the run at ``min_chunk``."""
        self._settle(attempt)
        chunk = attempt.chunk
        where = chunk.describe()
        if chunk.size // 2 >= self.policy.min_chunk:
            first, second = chunk.split()
            self.queue.appendleft(Attempt(second))
            self.queue.appendleft(Attempt(first))
            self.counters.split += 1
            return Verdict(
                "split",
                f"\n{where} ran out of memory ({how}): split into {first.size} + "
                f"{second.size} items and retried",
            )
        need = f"more than {format_bytes(needed)}" if needed else "more than its worker's limit"
        message = (
            f"{where} ran out of memory at the minimum chunk size ({self.policy.min_chunk}): "
            f"it needed {need} ({how}): give each worker more memory (--mem, fewer "
            "workers) or lower min-chunk"
        )
        self._chunk_failed(chunk, message, "")
        return Verdict("failed")

    def error(self, attempt: Attempt, exc_type: type, exc: BaseException, tb) -> Verdict:
        """Any other failure: retried ``retries`` times, then the run fails with the
        worker's traceback."""
        self._settle(attempt)
        chunk, n = attempt.chunk, attempt.number
        where, retries = chunk.describe(), self.policy.retries
        if n < retries:
            self.counters.retried += 1
            self.queue.append(Attempt(chunk, n + 1))
            return Verdict(
                "retry",
                f"\n{where} failed ({exc_type.__name__}: {str(exc)[:200]}): retry "
                f"{n + 1} of {retries}",
            )
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        error = self._chunk_failed(
            chunk,
            f"{where} failed after {n + 1} attempts: {exc_type.__name__}: "
            f"{one_line(str(exc))}: fix the cause (traceback above and in the report), then "
            f"{self.policy.resume_hint} (finished chunks are kept)",
            text,
            record=f"{exc_type.__name__}: {exc}",
        )
        error.traceback = text  # type: ignore[attr-defined]
        return Verdict("failed", f"\n{where} failed {n + 1} times; the worker's traceback:\n{text}")

    def cancelled(self, attempt: Attempt) -> Verdict:
        """Cancelled (e.g. the scheduler restarted): run again, using a retry."""
        self._settle(attempt)
        chunk, n = attempt.chunk, attempt.number
        if n < self.policy.retries:
            self.counters.retried += 1
            self.queue.appendleft(Attempt(chunk, n + 1))
            return Verdict("retry")
        if self.fatal is None:
            self.counters.failed += 1
            self.fatal = ChunkFailedError(
                f"chunk {chunk.chunk_id} was cancelled {n + 1} times (scheduler restarted "
                f"or someone cancelled it): check the cluster, then {self.policy.resume_hint}",
                chunk_id=chunk.chunk_id,
            )
        return Verdict("failed")

    def fail_run(self, error: ChunkFailedError) -> ChunkFailedError:
        """A run-level failure (no workers, the database gone): counted and recorded."""
        self.counters.failed += 1
        self.failures.append({"chunk_id": None, "error": str(error), "traceback": ""})
        if self.fatal is None:
            self.fatal = error
        return error

    def _chunk_failed(
        self, chunk: Chunk, message: str, text: str, record: str | None = None
    ) -> ChunkFailedError:
        self.counters.failed += 1
        self.failures.append(
            {"chunk_id": chunk.chunk_id, "error": record or message, "traceback": text}
        )
        error = ChunkFailedError(message, chunk_id=chunk.chunk_id)
        if self.fatal is None:
            self.fatal = error
        return error


def quarantine_line(entries: Sequence[dict], item_name: str = "item", shown: int = 5) -> str:
    """``3 stocks quarantined: A (reason), B (reason), C (reason)`` (one line; at most
    ``shown`` named, then how many more)."""
    n = len(entries)
    noun = item_name if n == 1 else plural(item_name)
    named = ", ".join(
        f"{e['item']} ({one_line(e['reason'])[:120]})" if e.get("reason") else str(e["item"])
        for e in entries[:shown]
    )
    more = f" and {n - shown} more (all in report.json)" if n > shown else ""
    return f"{n} {noun} quarantined: {named}{more}"


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) < 300 else text[:297] + "..."
