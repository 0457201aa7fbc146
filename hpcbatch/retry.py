"""Retry with exponential backoff for transient database failures.

Owns :func:`with_backoff` (call a function again after a growing, jittered pause while
it fails with a *transient* error) and :func:`is_transient` (which errors are worth
waiting for: a dropped or refused connection, a server restarting or shutting down, a
serialization failure or deadlock, SQLite's "database is locked").  Anything else
(bad SQL, constraint violations, bad data) is raised at once.

Used around a chunk's whole database work (read, compute, write in one transaction):
the transaction either committed or did not, and a retried chunk writes the same rows
(upserts) and the same ledger row, so a retry never duplicates anything.  Does not
own the transactions themselves (the sinks do).

Also owns :class:`DatabaseUnavailable` (a database that stayed unreachable for a whole
outage budget: ``with_backoff(..., max_total_s=, database=)`` raises it, and the
runner's circuit breaker recognises it, with :func:`is_transient`, to stop the whole
run at once) and :func:`probe_database` (is the database reachable now? one line why
not), used by the runner's preflight and breaker.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import ChunkFailedError

T = TypeVar("T")
log = logging.getLogger("hpcbatch.retry")

#: PostgreSQL SQLSTATEs that mean "try again": serialization failure, deadlock,
#: admin/crash shutdown, cannot connect now, connection exceptions (class 08).
_TRANSIENT_SQLSTATES = {"40001", "40P01", "57P01", "57P02", "57P03"}
_TRANSIENT_TEXT = (
    "connection refused",
    "server closed the connection",
    "terminating connection",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "connection is closed",
    "connection already closed",
    "could not connect",
    "connection timeout",
    "connection reset",
    "database is locked",
    "ssl syscall error",
    "consuming input failed",
    "cannot connect to database",
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a database failure worth retrying."""
    seen = 0
    while exc is not None and seen < 10:
        seen += 1
        if getattr(exc, "connection_invalidated", False):
            return True
        state = getattr(exc, "sqlstate", None) or getattr(
            getattr(exc, "orig", None), "sqlstate", None
        )
        if state and (state in _TRANSIENT_SQLSTATES or str(state).startswith("08")):
            return True
        name = type(exc).__name__
        text = str(exc).lower()
        db_error = name in ("OperationalError", "InterfaceError", "DisconnectionError", "DataError")
        if db_error and any(t in text for t in _TRANSIENT_TEXT):
            return True
        if isinstance(exc, ConnectionError):
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return False


class DatabaseUnavailable(ChunkFailedError):
    """A database that stayed unreachable for a whole outage budget (not a brief restart).

    ``database`` is the URL with its password masked, ``cause`` the last error in one
    line, ``waited_s`` how long it was retried.  Picklable, so it travels from a worker
    to the runner intact.
    """

    def __init__(
        self,
        message: str,
        database: str = "",
        cause: str = "",
        waited_s: float = 0.0,
        *,
        chunk_id: str | None = None,
    ):
        super().__init__(message, chunk_id=chunk_id)
        self.database = database
        self.cause = cause
        self.waited_s = float(waited_s)

    def __reduce__(self):
        return (type(self), (str(self), self.database, self.cause, self.waited_s))


def error_line(exc: BaseException) -> str:
    """``exc`` as one short line without any password: the driver's own first line
    (psycopg's ``connection failed: ...``), else the exception's first line."""
    from .security import scrub

    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(orig).__name__
    return scrub(text if len(text) <= 200 else text[:197] + "...")


def backoff_delays(
    attempts: int, base_s: float, max_s: float, rng: random.Random | None = None
) -> list[float]:
    """The pauses between ``attempts`` tries: base, 2 x base, 4 x base ... capped at
    ``max_s``, each with up to 25 % jitter (so workers do not retry in lockstep)."""
    rng = rng or random.Random()
    return [_delay(i, base_s, max_s, rng) for i in range(max(0, attempts - 1))]


def _delay(i: int, base_s: float, max_s: float, rng: random.Random) -> float:
    return min(max_s, base_s * 2 ** min(i, 60)) * (1 + 0.25 * rng.random())


def with_backoff(
    fn: Callable[[], T],
    *,
    attempts: int | None = 8,
    base_s: float = 0.5,
    max_s: float = 15.0,
    max_total_s: float | None = None,
    database: str | None = None,
    what: str = "database work",
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """``fn()``, called again after a backoff pause while it raises a transient error.

    The defaults wait about 0.5 + 1 + 2 + 4 + 8 + 15 + 15 = 45 s in all (a server
    restart or fail-over); the last error is raised unchanged when they run out.

    ``max_total_s`` bounds the time from the first transient failure to giving up
    (the last pause is shortened to end on the bound; ``attempts=None``: as many as fit).
    ``database`` (a URL; shown masked) turns running out into
    :class:`DatabaseUnavailable` naming it, the cause and the time waited (the last
    error is its ``__cause__``), which the runner's circuit breaker recognises.
    """
    if attempts is None and max_total_s is None:
        raise ValueError("with_backoff needs attempts or max_total_s")
    rng = random.Random()
    first_failure: float | None = None
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not transient(exc):
                raise
            now = clock()
            first_failure = now if first_failure is None else first_failure
            pause = _delay(attempt, base_s, max_s, rng)
            if max_total_s is not None:
                pause = min(pause, first_failure + max_total_s - now)
            attempt += 1
            if (attempts is not None and attempt >= attempts) or pause <= 0:
                if database is None:
                    raise
                raise _unavailable(database, exc, now - first_failure, what) from exc
            _log_retry(what, exc, attempt, attempts, pause)
            sleep(pause)


def _unavailable(database: str, exc: BaseException, waited_s: float, what: str):
    from .security import mask_url

    where, cause = mask_url(database), error_line(exc)
    return DatabaseUnavailable(
        f"database {where} unreachable for {waited_s:.0f} s during {what} ({cause})",
        where,
        cause,
        waited_s,
    )


def _log_retry(what: str, exc: BaseException, attempt: int, attempts: int | None, pause: float):
    log.warning(
        "%s failed (%s: %s); retry %d%s in %.1f s",
        what,
        type(exc).__name__,
        error_line(exc) if str(exc) else "",
        attempt,
        f" of {attempts - 1}" if attempts is not None else "",
        pause,
    )


def probe_database(url: str, timeout_s: float = 5.0) -> str | None:
    """``None`` when the database at ``url`` answers ``SELECT 1`` within ``timeout_s``,
    else the reason in one line (password masked).  A SQLite file is reachable when it
    exists (it is never created here)."""
    import sqlalchemy as sa

    try:
        parsed = sa.engine.make_url(url)
    except Exception:  # noqa: BLE001 (an unparseable URL fails elsewhere, clearly)
        return None
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if path and path != ":memory:" and not path.startswith("file:"):
            from pathlib import Path

            return None if Path(path).exists() else f"SQLite file {path} does not exist"
        return None
    connect_args = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = max(1, int(math.ceil(timeout_s)))
    engine = sa.create_engine(parsed, poolclass=sa.pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return None
    except Exception as exc:  # noqa: BLE001 (any failure means: not usable now)
        return error_line(exc)
    finally:
        engine.dispose()
