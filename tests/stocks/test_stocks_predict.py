"""Batch prediction: the chunk task, exactly-once writes through runner.run on a real
LocalCluster (SQLite and PostgreSQL), and the bad-input errors of the issue."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from hpcbatch import config as hb_config
from hpcbatch.errors import ChunkFailedError, ConfigError, DataError
from hpcbatch.ledger import ChunkAlreadyDone, Ledger
from hpcbatch.resources import detect_resources
from hpcbatch.runner import Chunk, TaskContext, make_chunks
from hpcbatch.stocks.features import min_rows
from hpcbatch.stocks.predict import PredictOptions, predict, predict_chunk, prepare
from hpcbatch.stocks.schema import make_engine, stock_daily, stock_predictions


def _count(url: str) -> tuple[int, int]:
    engine = make_engine(url)
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(stock_predictions)).scalar_one()
        distinct = conn.execute(
            sa.select(sa.func.count()).select_from(
                sa.select(stock_predictions.c.ts_code, stock_predictions.c.trade_date)
                .distinct()
                .subquery()
            )
        ).scalar_one()
    engine.dispose()
    return total, distinct


def _expected(url: str, predict_days: int = 10) -> tuple[int, int]:
    """(stocks with enough rows, stocks without) from the bars themselves."""
    engine = make_engine(url)
    with engine.connect() as conn:
        counts = conn.execute(
            sa.select(sa.func.count()).select_from(stock_daily).group_by(stock_daily.c.ts_code)
        ).scalars().all()
    engine.dispose()
    ok = sum(1 for c in counts if c >= min_rows(predict_days))
    return ok, len(counts) - ok


def _opts(**kw) -> PredictOptions:
    return PredictOptions(lookback_days=140, predict_days=10, use_gpu="false", **kw)


def test_chunk_task_writes_its_rows_and_ledger_row_in_one_transaction(market_copy, tiny_model):
    prep = prepare(market_copy, str(tiny_model), _opts())
    chunk = make_chunks(len(prep.codes), len(prep.codes), items=prep.codes)[0]
    ledger = Ledger(market_copy)
    ledger.start_run("r1", n_items=chunk.size, chunk_size=chunk.size, seed=0, resume=False)
    ctx = TaskContext(run_id="r1", seed=0, attempt=0, ledger=ledger)

    class FailingLedger:
        def mark_done(self, *a, **k):
            raise RuntimeError("ledger write failed")

    with pytest.raises(RuntimeError):
        predict_chunk(chunk, TaskContext("r1", 0, 0, FailingLedger()), prep.task)
    assert _count(market_copy) == (0, 0)  # predictions rolled back with the ledger row

    counts = predict_chunk(chunk, ctx, prep.task)
    ok, short = _expected(market_copy)
    assert counts["stocks_predicted"] == ok and counts["stocks_skipped_short"] == short > 0
    assert counts["predictions"] == 10 * ok
    assert _count(market_copy) == (10 * ok, 10 * ok)
    assert ledger.done_ids("r1") == {chunk.chunk_id}
    with pytest.raises(ChunkAlreadyDone):  # a second copy of the chunk rolls back
        predict_chunk(chunk, ctx, prep.task)
    assert _count(market_copy) == (10 * ok, 10 * ok)


def test_predictions_are_real_returns_on_the_last_days(market_copy, tiny_model):
    prep = prepare(market_copy, str(tiny_model), _opts())
    predict_chunk(Chunk("c0", 0, 3, tuple(prep.codes[:3])), None, prep.task)
    engine = make_engine(market_copy)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(stock_predictions)).all()
        last = conn.execute(sa.select(sa.func.max(stock_daily.c.trade_date))).scalar_one()
    assert rows and {r.model_version for r in rows} == {"v1"}
    assert max(r.trade_date for r in rows) == last
    assert all(abs(r.predicted_return) < 0.3 for r in rows)
    assert all(r.predicted_direction == (r.predicted_return > 0) for r in rows)
    assert all(0 < r.confidence < 1 for r in rows)


def test_end_to_end_on_a_local_cluster_lands_every_row_exactly_once(market_copy, tiny_model, tmp_path):
    settings = hb_config.load()
    resources = detect_resources(memory_bytes=6 * 10**9, cpus=2)
    report = predict(
        market_copy, str(tiny_model), settings=settings, options=_opts(), resources=resources,
        backend="local", report_dir=str(tmp_path / "reports"), progress=False, quiet=True,
    )
    ok, short = _expected(market_copy)
    assert report.status == "finished" and report.n_chunks > 1
    assert report.results_meta["predictions"] == 10 * ok
    assert report.results_meta["stocks_skipped_short"] == short
    assert _count(market_copy) == (10 * ok, 10 * ok)
    assert len(Ledger(market_copy).done_ids(report.run_id)) == report.n_chunks
    assert (tmp_path / "reports" / report.run_id / "report.json").exists()
    # Same command again: the run is recognised as finished, nothing is rewritten.
    again = predict(
        market_copy, str(tiny_model), settings=settings, options=_opts(), resources=resources,
        backend="local", resume=True, progress=False, quiet=True, report_dir=None,
    )
    assert again.status == "already-finished"
    assert _count(market_copy) == (10 * ok, 10 * ok)
    # New bars make a new run: it runs, and its upserts replace rows instead of adding.
    engine = make_engine(market_copy)
    with engine.begin() as conn:
        conn.execute(stock_daily.delete().where(stock_daily.c.trade_date == "20251231"))
    third = predict(
        market_copy, str(tiny_model), settings=settings, options=_opts(), resources=resources,
        backend="local", progress=False, quiet=True, report_dir=None,
    )
    assert third.status == "finished" and third.run_id != report.run_id
    ok3, _ = _expected(market_copy)
    total, distinct = _count(market_copy)
    assert total == distinct and total >= 10 * ok  # old last-day rows stay, nothing doubled
    assert third.results_meta["predictions"] == 10 * ok3


def test_bad_input_fails_before_anything_is_written(market_copy, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="--offset 500 is past the end: stock_daily holds 20"):
        prepare(market_copy, str(tiny_model), _opts(offset=500))
    with pytest.raises(DataError, match="model directory .* does not exist"):
        prepare(market_copy, str(tmp_path / "missing"), _opts())
    with pytest.raises(ConfigError, match="lookback-days 100 .* is too short"):
        PredictOptions.from_settings({}, lookback_days=100)
    engine = make_engine(market_copy)
    with engine.begin() as conn:
        conn.execute(
            stock_daily.update().where(stock_daily.c.trade_date == "20251230").values(close=-1.0)
        )
    # --strict: refused before anything starts, as before issue 16
    with pytest.raises(DataError, match="negative price"):
        predict(market_copy, str(tiny_model), options=_opts(strict=True), progress=False,
                quiet=True)  # fmt: skip
    assert "stock_predictions" not in sa.inspect(engine).get_table_names() or _count(market_copy) == (0, 0)
    # default: each such stock is quarantined; all of them are more than max-bad-items
    with pytest.raises(ChunkFailedError, match=r"^\d+ stocks quarantined: .*close is negative "
                       r"\(-1\) on 20251230.*more than max-bad-items \(10\)"):  # fmt: skip
        predict(market_copy, str(tiny_model), options=_opts(), progress=False, quiet=True,
                resources=detect_resources(memory_bytes=6 * 10**9, cpus=2), backend="local",
                report_dir=str(tmp_path / "reports"))  # fmt: skip
    with engine.connect() as conn:  # the stocks without that bad day were still predicted
        bad = set(conn.execute(sa.select(stock_daily.c.ts_code).where(stock_daily.c.close < 0)).scalars())
        predicted = set(conn.execute(sa.select(stock_predictions.c.ts_code)).scalars())
    assert len(bad) > 10 and not bad & predicted


def test_cli_errors_are_one_line_with_exit_code(market_copy, tiny_model):
    from hpcbatch.cli import main

    runner = CliRunner()
    result = runner.invoke(
        main, ["stocks", "predict", "--db", market_copy, "--model", str(tiny_model), "--offset", "99"]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --offset 99 is past the end")
    result = runner.invoke(
        main, ["stocks", "predict", "--db", market_copy, "--model", str(tiny_model), "--use-gpu"]
    )
    assert result.exit_code == 2 and "no CUDA device" in result.output
    result = runner.invoke(main, ["stocks", "predict", "--db", "sqlite:///nowhere/x.db"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_cli_generate_train_predict_small(tmp_path):
    from hpcbatch.cli import main

    runner = CliRunner()
    db = f"sqlite:///{tmp_path}/s.db"
    r = runner.invoke(main, ["stocks", "generate", "--db", db, "--stocks", "6", "--days", "140"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        main,
        ["stocks", "train", "--db", db, "--out", str(tmp_path / "m"), "--epochs", "1",
         "--max-windows", "64", "--model-size", "tiny", "--lookback-days", "140"],
    )
    assert r.exit_code == 0, r.output
    assert "model saved" in r.output and (tmp_path / "m" / "weights.pt").exists()
    r = runner.invoke(main, ["stocks", "init-db", "--db", db])
    assert r.exit_code == 0 and "nothing" in r.output


@pytest.mark.postgres
def test_end_to_end_on_postgresql_lands_every_row_exactly_once(
    postgres_db_url, tiny_model, market_factory
):
    engine, _ = market_factory(postgres_db_url, stocks=12, days=140, seed=3)
    engine.dispose()
    settings = hb_config.load()
    resources = detect_resources(memory_bytes=6 * 10**9, cpus=2)
    opts = _opts(batch_size=3)
    report = predict(
        postgres_db_url, str(tiny_model), settings=settings, options=opts, resources=resources,
        backend="local", report_dir=None, progress=False, quiet=True,
    )
    ok, short = _expected(postgres_db_url)
    assert report.status == "finished" and report.n_chunks == 4
    assert report.results_meta["predictions"] == 10 * ok
    assert _count(postgres_db_url) == (10 * ok, 10 * ok)
    # a new run over the same data updates in place (ON CONFLICT DO UPDATE): no duplicates
    predict(
        postgres_db_url, str(tiny_model), settings=settings, options=opts, resources=resources,
        backend="local", run_id="second", report_dir=None, progress=False, quiet=True,
    )
    assert _count(postgres_db_url) == (10 * ok, 10 * ok)


def _watch_read_leases(dask_scheduler=None) -> None:
    """On the scheduler: after every granted semaphore lease, record how many leases of
    that semaphore are held at once."""
    ext = dask_scheduler.extensions["semaphores"]
    seen: dict = {}
    dask_scheduler.hpcbatch_leases_seen = seen
    original = dask_scheduler.handlers["semaphore_acquire"]

    async def acquire(name=None, timeout=None, lease_id=None):
        granted = await original(name=name, timeout=timeout, lease_id=lease_id)
        if granted:
            seen[name] = max(seen.get(name, 0), len(ext.leases[name]))
        return granted

    dask_scheduler.handlers["semaphore_acquire"] = acquire


def _read_leases(dask_scheduler=None) -> dict:
    ext = dask_scheduler.extensions["semaphores"]
    return {
        name: {
            "max_leases": ext.max_leases.get(name),
            "acquired": ext.metrics["acquire_total"][name],
            "most_at_once": most,
        }
        for name, most in dask_scheduler.hpcbatch_leases_seen.items()
    }


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrency_caps_parallel_database_reads_across_the_cluster(
    market_copy, tiny_model, concurrency
):
    """--concurrency N: every chunk's read takes a lease of one cluster-wide semaphore of
    N leases, so at most N chunks read the database at once (on any worker)."""
    from distributed import Client, LocalCluster

    settings = hb_config.load()
    resources = detect_resources(memory_bytes=6 * 10**9, cpus=2)
    with LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None
    ) as cluster, Client(cluster) as client:
        client.run_on_scheduler(_watch_read_leases)
        report = predict(
            market_copy, str(tiny_model), settings=settings,
            options=_opts(concurrency=concurrency, batch_size=1), resources=resources,
            client=client, progress=False, quiet=True, report_dir=None,
        )  # fmt: skip
        leases = client.run_on_scheduler(_read_leases)
    assert report.status == "finished"
    (name, seen), *others = leases.items()
    assert not others and name == f"hpcbatch-db-reads-{report.run_id}"
    assert seen["max_leases"] == concurrency
    assert seen["acquired"] >= report.n_chunks  # every chunk read under a lease
    assert 1 <= seen["most_at_once"] <= concurrency
