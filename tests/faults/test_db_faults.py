"""Database faults during a real stock prediction run on PostgreSQL.

The server is restarted half way through: each chunk's database work retries with
backoff (:mod:`hpcbatch.retry`) and the run completes with exactly the undisturbed
predictions.  Plus unit tests of which errors count as transient.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    DAYS,
    N_STOCKS,
    checksum,
    done_chunks,
    prediction_rows,
    start_stocks,
    wait_until,
)

from hpcbatch.retry import backoff_delays, is_transient, with_backoff

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import services  # noqa: E402  (tests/services.py: the throwaway PostgreSQL)

# ------------------------------------------------------------------ unit ----


def _operational(message: str):
    import psycopg
    import sqlalchemy as sa

    return sa.exc.OperationalError("SELECT 1", {}, psycopg.OperationalError(message))


def test_transient_errors_are_retried_with_growing_pauses() -> None:
    calls, pauses = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise _operational("connection refused")
        return "ok"

    assert with_backoff(flaky, sleep=pauses.append, base_s=0.5, max_s=4) == "ok"
    assert len(calls) == 4 and len(pauses) == 3
    assert pauses[0] < pauses[1] < pauses[2] <= 4 * 1.25
    delays = backoff_delays(8, 0.5, 15)
    assert len(delays) == 7 and max(delays) <= 15 * 1.25 and sum(delays) > 40


def test_permanent_errors_are_raised_at_once_and_retries_run_out() -> None:
    import sqlalchemy as sa

    pauses = []

    def bad_sql():
        raise sa.exc.ProgrammingError("SELEC 1", {}, Exception('syntax error at or near "SELEC"'))

    with pytest.raises(sa.exc.ProgrammingError):
        with_backoff(bad_sql, sleep=pauses.append)
    assert pauses == []

    def down():
        raise _operational("the database system is shutting down")

    with pytest.raises(sa.exc.OperationalError):
        with_backoff(down, attempts=3, sleep=pauses.append)
    assert len(pauses) == 2


@pytest.mark.parametrize(
    ("message", "transient"),
    [
        ("connection refused", True),
        ("server closed the connection unexpectedly", True),
        ("terminating connection due to administrator command", True),
        ("the database system is starting up", True),
        ("database is locked", True),
        ('relation "stock_daily" does not exist', False),
        ("duplicate key value violates unique constraint", False),
    ],
)
def test_which_database_errors_are_transient(message: str, transient: bool) -> None:
    assert is_transient(_operational(message)) is transient


# ----------------------------------------------------------- a real server ----


@pytest.fixture
def own_postgres():
    """A PostgreSQL server this test may stop and restart (not the shared session one)."""
    server = services.PostgresServer()
    try:
        server.start()
    except (services.ServiceUnavailable, OSError, services.subprocess.SubprocessError) as e:
        pytest.skip(f"PostgreSQL unavailable: {e}")
    try:
        yield server
    finally:
        server.stop()


def _restart(server, outage_s: float) -> None:
    server.proc.send_signal(signal.SIGINT)  # fast shutdown: clients are disconnected
    server.proc.wait(timeout=60)
    time.sleep(outage_s)
    assert server._start_postmaster(), server.log_tail()


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_postgres_restarted_mid_run_the_run_completes_exactly_once(
    own_postgres, stock_inputs, stocks_baseline, tmp_path
) -> None:
    from hpcbatch.stocks.generate import generate_market
    from hpcbatch.stocks.schema import make_engine

    url = own_postgres.url
    engine = make_engine(url)
    generate_market(engine, N_STOCKS, DAYS, seed=1)  # the same market as the baseline
    engine.dispose()
    proc = start_stocks(url, stock_inputs["model"], tmp_path / "reports", delay_s=0.7)
    wait_until(lambda: done_chunks(url) >= 3, proc, what="3 chunks done")
    _restart(own_postgres, outage_s=3.0)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    assert report["status"] == "finished" and report["chunks_done"] == 12
    rows = prediction_rows(url)
    keys = [r[:3] for r in rows]
    assert len(keys) == len(set(keys))
    assert len(rows) == len(stocks_baseline["rows"])
    assert checksum(rows) == stocks_baseline["checksum"]
    assert done_chunks(url) == 12
