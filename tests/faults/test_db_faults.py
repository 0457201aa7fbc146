"""Database faults during a real stock prediction run on PostgreSQL.

The server is restarted half way through: each chunk's database work retries with
backoff (:mod:`hpcbatch.retry`) and the run completes with exactly the undisturbed
predictions.  The server is stopped for good half way through: the run fails within
``database-outage-timeout`` with one line (database, cause, chunks committed, the
resume command), submits nothing more, leaves the ledger consistent with the rows, and
a ``--resume`` once the server is back runs only the missing chunks.  Plus unit tests
of which errors count as transient and of the outage bound.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from faultkit import (
    DAYS,
    N_STOCKS,
    checksum,
    done_chunks,
    done_ids,
    prediction_rows,
    query,
    start_stocks,
    wait_until,
)

from hpcbatch.retry import (
    DatabaseUnavailable,
    backoff_delays,
    is_transient,
    probe_database,
    with_backoff,
)

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


def test_an_outage_longer_than_the_bound_gives_up_on_time_naming_the_database() -> None:
    import pickle

    now = [0.0]
    pauses = []

    def sleep(seconds):
        pauses.append(seconds)
        now[0] += seconds

    def down():
        now[0] += 0.01  # each try takes a little while
        raise _operational('connection failed: connection to server at "db", port 5432 '
                           "failed: Connection refused\n\tIs the server running?")

    url = "postgresql+psycopg://alice:s3cret@db:5432/market"
    with pytest.raises(DatabaseUnavailable) as err:
        with_backoff(down, attempts=None, max_total_s=20, database=url, sleep=sleep,
                     clock=lambda: now[0], what="stocks chunk c000003")
    # the pauses grow, and the last one is cut so that giving up happens on the bound
    assert pauses[0] < pauses[1] < pauses[2]
    assert 19.9 <= sum(pauses) <= 20.0 + 1e-9
    exc = err.value
    message = str(exc)
    assert "\n" not in message and "s3cret" not in message
    assert "alice:***@db:5432/market" in message and "Connection refused" in message
    assert "stocks chunk c000003" in message and exc.waited_s >= 19.9
    assert isinstance(exc.__cause__, Exception) and is_transient(exc.__cause__)
    back = pickle.loads(pickle.dumps(exc))  # it travels from a worker to the runner
    assert (str(back), back.database, back.cause, back.waited_s) == (
        message, exc.database, exc.cause, exc.waited_s)
    # a short outage within the bound is ridden out
    calls = []

    def blip():
        calls.append(1)
        if len(calls) < 3:
            raise _operational("the database system is starting up")
        return "ok"

    assert with_backoff(blip, attempts=None, max_total_s=20, database=url, sleep=sleep) == "ok"


def test_probe_names_an_unreachable_server_in_one_line_without_the_password() -> None:
    port = services.free_port()
    cause = probe_database(f"postgresql+psycopg://bob:hunter2@127.0.0.1:{port}/x", timeout_s=2)
    assert cause is not None and "\n" not in cause and "hunter2" not in cause
    assert "refused" in cause.lower() or "failed" in cause.lower()


# ----------------------------------------------------------- a real server ----


@pytest.fixture
def own_postgres():
    """A PostgreSQL server this test may stop and restart (not the shared session one)."""
    server = services.PostgresServer()
    try:
        server.start()
    except (services.ServiceUnavailable, OSError, services.subprocess.SubprocessError) as e:
        if os.environ.get("HPCBATCH_REQUIRE_SERVICES") == "1":  # CI: never skip silently
            pytest.fail(f"required test service unavailable: PostgreSQL: {e}", pytrace=False)
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


def _stop_for_good(server) -> float:
    server.proc.send_signal(signal.SIGINT)  # fast shutdown, and it stays down
    server.proc.wait(timeout=60)
    return time.monotonic()


def _started(mark_dir: Path) -> set[str]:
    """Chunk ids whose task started (each try of a chunk leaves one mark)."""
    return {p.name.rsplit("-", 1)[0] for p in mark_dir.glob("*")} if mark_dir.exists() else set()


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_postgres_gone_for_good_fails_fast_in_one_line_and_resume_completes(
    own_postgres, stock_inputs, stocks_baseline, tmp_path, monkeypatch
) -> None:
    import sqlalchemy as sa

    from hpcbatch.stocks.generate import generate_market
    from hpcbatch.stocks.schema import make_engine
    from hpcbatch.stocks.sink import list_codes

    outage_s = 10  # database-outage-timeout for this run (default 60)
    monkeypatch.setenv("DASK_HPCBATCH__DATABASE_OUTAGE_TIMEOUT", str(outage_s))
    url = own_postgres.url
    engine = make_engine(url)
    generate_market(engine, N_STOCKS, DAYS, seed=1)
    codes = list_codes(engine)
    engine.dispose()
    reports, marks = tmp_path / "reports", tmp_path / "marks"
    proc = start_stocks(url, stock_inputs["model"], reports, delay_s=0.7, mark_dir=marks)
    wait_until(lambda: done_chunks(url) >= 3, proc, what="3 chunks done")
    stopped = _stop_for_good(own_postgres)
    out, err = proc.communicate(timeout=300)
    took = time.monotonic() - stopped
    print(f"database stopped -> driver exit: {took:.1f} s (outage bound {outage_s} s)")

    # one clear line, exit code of a failed run, within the bound (plus shutdown)
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: database {url} unreachable for "), err[-3000:]
    assert "refused" in last.lower()
    assert last.endswith("start the database, then rerun the same command with --resume")
    assert took < outage_s + 60, err[-3000:]
    assert "the worker's traceback" not in err  # not a chunk's bug: no traceback dump
    (tmp_path / "driver-stderr.txt").write_text(err)

    # the report is written and says the same
    (run_dir,) = [d for d in reports.iterdir() if d.is_dir()]
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["status"] == "failed" and saved["message"] == last[len("error: ") :]

    # bring the server back to look at what was committed, and to resume
    assert own_postgres._start_postmaster(), own_postgres.log_tail()
    done = done_ids(url)
    committed = len(done)
    assert 3 <= committed < 12
    assert f": {committed} of 12 chunks committed, no more submitted;" in last
    # once the database was known gone nothing new started: only chunks committed or
    # in flight at the outage ever ran
    assert len(_started(marks)) <= committed + saved["max_in_flight"]

    # ledger consistent: exactly the rows of the chunks marked done, as undisturbed
    chunks = query(url, "SELECT chunk_id, start, stop FROM hpcbatch_chunks")
    meta = {cid: (start, stop) for cid, start, stop in chunks}
    done_codes = {c for start, stop in meta.values() for c in codes[start:stop]}
    rows = prediction_rows(url)
    assert {r[0] for r in rows} == done_codes
    assert rows == [r for r in stocks_baseline["rows"] if r[0] in done_codes]
    with sa.create_engine(url, poolclass=sa.pool.NullPool).connect() as conn:
        status = conn.execute(sa.text("SELECT status FROM hpcbatch_runs")).scalar_one()
    assert status in ("running", "failed")  # not finished: --resume continues it

    # resume: only the missing chunks run; the table equals an undisturbed run
    resumed_marks = tmp_path / "marks-resume"
    proc = start_stocks(url, stock_inputs["model"], reports, "--resume", mark_dir=resumed_marks)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    assert report["chunks_skipped"] == committed and report["chunks_done"] == 12 - committed
    assert _started(resumed_marks) == {f"c{k:06d}" for k in range(12)} - done
    rows = prediction_rows(url)
    assert len(rows) == len(stocks_baseline["rows"])
    assert checksum(rows) == stocks_baseline["checksum"]
    assert done_chunks(url) == 12


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_runner_preflight_submits_nothing_to_a_database_that_is_down(
    own_postgres, tmp_path
) -> None:
    import functools

    import runtime_helpers as rh
    from distributed import Client

    from hpcbatch.ledger import Ledger
    from hpcbatch.runner import make_chunks, run

    url = own_postgres.url.replace("postgres@", "postgres:pw-not-shown@")
    ledger = Ledger(url)  # the tables exist; then the server goes away
    _stop_for_good(own_postgres)
    with Client(n_workers=1, processes=False, dashboard_address=":0") as client:
        t0 = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as err:
            run(make_chunks(4, 1), functools.partial(rh.log_call, base=str(tmp_path)), client,
                run_id="pre", ledger=ledger, progress=False)
        took = time.monotonic() - t0
    message = str(err.value)
    assert "\n" not in message and "pw-not-shown" not in message
    assert message.startswith(
        f"database postgresql+psycopg://postgres:***@127.0.0.1:{own_postgres.port}/postgres "
        "is unreachable ("
    )
    assert "nothing was submitted" in message and message.endswith("with --resume")
    assert not (tmp_path / "calls").exists()  # no task ran
    assert took < 30


def select_one_task(chunk, ctx, url: str, base: str) -> dict:
    """A chunk task without its own retries: one query, then a mark of the chunk."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()
    time.sleep(0.1)
    (Path(base) / f"{chunk.chunk_id}-{time.time_ns()}").touch()
    return {"items": chunk.size}


@pytest.mark.postgres
@pytest.mark.timeout(180)
@pytest.mark.parametrize("ledger_on", ["sqlite", "postgres"])
def test_runner_rides_out_a_postgres_restart_without_using_a_retry(
    own_postgres, tmp_path, ledger_on
) -> None:
    # the tasks do not retry and the run allows no retries (retries=0): without the
    # runner's breaker the first refused connection would fail the run.  Ledger in a
    # SQLite file: the breaker opens, holds the failed chunks, resubmits them when the
    # server answers.  Ledger on the same server: the driver's own ledger writes wait
    # the outage out (with_backoff), and chunks that failed meanwhile rerun at once.
    import functools
    import io
    import threading

    from distributed import Client

    from hpcbatch.ledger import Ledger
    from hpcbatch.runner import make_chunks, run

    url = own_postgres.url
    ledger = Ledger(url if ledger_on == "postgres" else f"sqlite:///{tmp_path}/ledger.db")
    base = tmp_path / "calls"
    base.mkdir()
    out = io.StringIO()
    result = {}

    with Client(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as c:

        def driver():
            try:
                result["report"] = run(
                    make_chunks(40, 1),
                    functools.partial(select_one_task, url=url, base=str(base)),
                    c,
                    run_id="blip",
                    ledger=ledger,
                    database=url,
                    retries=0,
                    db_outage_s=30,
                    progress=False,
                    out=out,
                )
            except BaseException as exc:  # noqa: BLE001 (reported below)
                result["error"] = exc

        thread = threading.Thread(target=driver, daemon=True)
        thread.start()
        # the server is restarted from this (main) thread: it dies with its parent thread
        deadline = time.monotonic() + 60
        while len(list(base.iterdir())) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        _stop_for_good(own_postgres)
        time.sleep(4)
        assert own_postgres._start_postmaster(), own_postgres.log_tail()
        thread.join(120)
    assert "error" not in result, result.get("error")
    report = result["report"]
    log = out.getvalue()
    assert report.status == "finished" and report.chunks_done == 40, log
    assert report.chunks_retried == 0 and report.chunks_failed == 0
    if ledger_on == "sqlite":
        assert "unreachable" in log and "submitting no more chunks" in log
        assert re.search(r"is back after \d+ s: resubmitting the \d+ chunks held", log), log
    ran = sorted(p.name.rsplit("-", 1)[0] for p in base.iterdir())
    assert ran == sorted(c.chunk_id for c in make_chunks(40, 1))  # each exactly once
    assert ledger.done_ids("blip") == set(ran)
    assert ledger.run_info("blip")["status"] == "finished"
