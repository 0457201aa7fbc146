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
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

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


def backoff_delays(
    attempts: int, base_s: float, max_s: float, rng: random.Random | None = None
) -> list[float]:
    """The pauses between ``attempts`` tries: base, 2 x base, 4 x base ... capped at
    ``max_s``, each with up to 25 % jitter (so workers do not retry in lockstep)."""
    rng = rng or random.Random()
    return [
        min(max_s, base_s * 2**i) * (1 + 0.25 * rng.random()) for i in range(max(0, attempts - 1))
    ]


def with_backoff(
    fn: Callable[[], T],
    *,
    attempts: int = 8,
    base_s: float = 0.5,
    max_s: float = 15.0,
    what: str = "database work",
    sleep: Callable[[float], None] = time.sleep,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """``fn()``, called again after a backoff pause while it raises a transient error.

    The defaults wait about 0.5 + 1 + 2 + 4 + 8 + 15 + 15 = 45 s in all (a server
    restart or fail-over); the last error is raised unchanged when they run out.
    """
    delays = backoff_delays(attempts, base_s, max_s)
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1 or not transient(exc):
                raise
            pause = delays[attempt]
            from .security import scrub

            log.warning(
                "%s failed (%s: %s); retry %d of %d in %.1f s",
                what,
                type(exc).__name__,
                scrub(str(exc).splitlines()[0][:160]) if str(exc) else "",
                attempt + 1,
                attempts - 1,
                pause,
            )
            sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover
