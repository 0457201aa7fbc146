"""The ledger: done chunks in SQL, resume rules, exactly-once with a caller's transaction."""

from __future__ import annotations

import pickle

import pytest
import sqlalchemy as sa

from hpcbatch.errors import ConfigError
from hpcbatch.ledger import ChunkAlreadyDone, Ledger, is_done
from hpcbatch.runner import make_chunks


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(f"sqlite:///{tmp_path}/ledger.db")


def _start(ledger: Ledger, run_id="r1", resume=False, **kw):
    args = dict(n_items=100, chunk_size=10, seed=7, params={"model": "v1"})
    args.update(kw)
    return ledger.start_run(run_id, resume=resume, **args)


def test_records_done_chunks_and_finished_runs(ledger):
    info = _start(ledger)
    assert info["resumed"] is False and info["finished"] is False
    chunks = make_chunks(100, 10)
    ledger.mark_done("r1", chunks[0], {"rows": 10})
    ledger.mark_done("r1", chunks[3], {"rows": 10})
    ledger.mark_done("r1", chunks[3], {"rows": 10})  # idempotent without a connection
    assert ledger.done_ids("r1") == {"c000000", "c000003"}
    assert ledger.chunk_meta("r1")["c000000"] == {"rows": 10}
    assert ledger.done_ids("other") == set()
    ledger.finish_run("r1", "finished")
    again = _start(ledger, resume=False)
    assert again["finished"] is True and again["n_done"] == 2


def test_existing_unfinished_run_needs_resume(ledger):
    _start(ledger)
    with pytest.raises(ConfigError, match="--resume"):
        _start(ledger)
    info = _start(ledger, resume=True)
    assert info["resumed"] is True and info["finished"] is False


def test_resume_keeps_recorded_chunk_size_and_refuses_changed_inputs(ledger):
    _start(ledger, chunk_size=10)
    info = _start(ledger, resume=True, chunk_size=25)
    assert info["chunk_size"] == 10
    with pytest.raises(ConfigError, match="model 'v1' -> 'v2'"):
        _start(ledger, resume=True, params={"model": "v2"})
    with pytest.raises(ConfigError, match="seed 7 -> 8"):
        _start(ledger, resume=True, seed=8)
    with pytest.raises(ConfigError, match="items 100 -> 99"):
        _start(ledger, resume=True, n_items=99)


def test_bad_url_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a database URL"):
        Ledger(str(tmp_path / "ledger.db"))


def test_pickles_as_its_url(ledger):
    _start(ledger)
    ledger.mark_done("r1", make_chunks(100, 10)[1], {})
    clone = pickle.loads(pickle.dumps(ledger))
    assert clone.url == ledger.url and clone._engine is None
    assert clone.done_ids("r1") == {"c000001"}


def test_is_done_counts_both_halves_recursively():
    assert is_done("c1", {"c1"})
    assert not is_done("c1", {"c1.0"})
    assert is_done("c1", {"c1.0", "c1.1"})
    assert not is_done("c1", {"c1.0", "c1.1.0"})
    assert is_done("c1", {"c1.0", "c1.1.0", "c1.1.1"})
    assert not is_done("c10", {"c1"})


def _sink_table(engine) -> sa.Table:
    meta = sa.MetaData()
    table = sa.Table("rows", meta, sa.Column("k", sa.Integer), sa.Column("chunk", sa.String(20)))
    meta.create_all(engine)
    return table


def _write_chunk(ledger: Ledger, table: sa.Table, chunk) -> str:
    """A SQL sink: the chunk's rows and its ledger row in one transaction."""
    try:
        with ledger.engine.begin() as conn:
            conn.execute(
                table.insert(),
                [{"k": i, "chunk": chunk.chunk_id} for i in range(chunk.start, chunk.stop)],
            )
            ledger.mark_done("r1", chunk, {"rows": chunk.size}, connection=conn)
    except ChunkAlreadyDone:
        return "duplicate"
    return "written"


def _exactly_once(ledger: Ledger) -> None:
    _start(ledger)
    table = _sink_table(ledger.engine)
    chunk = make_chunks(100, 10)[2]
    assert _write_chunk(ledger, table, chunk) == "written"
    assert _write_chunk(ledger, table, chunk) == "duplicate"  # a chunk that ran twice
    with ledger.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
    assert n == 10  # the second copy rolled back with the duplicate ledger row
    assert ledger.done_ids("r1") == {"c000002"}

    # a sink that fails after marking: neither its rows nor the ledger row stay
    other = make_chunks(100, 10)[3]
    with pytest.raises(RuntimeError), ledger.engine.begin() as conn:
        conn.execute(table.insert(), [{"k": 1, "chunk": other.chunk_id}])
        ledger.mark_done("r1", other, {}, connection=conn)
        raise RuntimeError("disk full")
    assert ledger.done_ids("r1") == {"c000002"}
    with ledger.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
    assert n == 10


def test_exactly_once_in_the_sinks_transaction_sqlite(ledger):
    _exactly_once(ledger)


@pytest.mark.postgres
def test_exactly_once_in_the_sinks_transaction_postgres(postgres_db_url):
    _exactly_once(Ledger(postgres_db_url))
