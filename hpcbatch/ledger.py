"""The run ledger: which chunks of a run are done, in SQL.

Owns two tables, ``hpcbatch_runs`` (one row per run: its size, chunk size, seed,
parameters and status) and ``hpcbatch_chunks`` (one row per finished chunk, unique on
``(run_id, chunk_id)``).  The database is any SQLAlchemy URL: a SQLite file by default,
PostgreSQL for many writers.  When the sink is SQL too, the sink writes its rows and
calls :meth:`Ledger.mark_done` with its own connection, so rows and ledger row commit
in one transaction (exactly once): a chunk that runs twice fails the unique constraint
and its second copy of the rows rolls back.

A :class:`Ledger` pickles as its URL; each process makes its own engine lazily.
It does not decide what to run (the runner does), it only records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .errors import ConfigError, HpcbatchError

_META = sa.MetaData()
CONNECT_TIMEOUT_S = 10  # PostgreSQL connect timeout of the ledger's engine

RUNS = sa.Table(
    "hpcbatch_runs",
    _META,
    sa.Column("run_id", sa.String(200), primary_key=True),
    sa.Column("n_items", sa.BigInteger, nullable=False),
    sa.Column("chunk_size", sa.BigInteger, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("params", sa.Text, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
)

CHUNKS = sa.Table(
    "hpcbatch_chunks",
    _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(200), nullable=False),
    sa.Column("chunk_id", sa.String(200), nullable=False),
    sa.Column("start", sa.BigInteger, nullable=False),
    sa.Column("stop", sa.BigInteger, nullable=False),
    sa.Column("meta", sa.Text, nullable=False),
    sa.Column("done_at", sa.Float, nullable=False),
    sa.UniqueConstraint("run_id", "chunk_id", name="uq_hpcbatch_chunks_run_chunk"),
)


class ChunkAlreadyDone(Exception):  # noqa: N818 (a signal, not a failure)
    """Raised by :meth:`Ledger.mark_done` inside a caller's transaction when the chunk
    is already recorded: the caller's transaction must roll back (its rows are a
    duplicate).  The runner counts such a chunk as done."""


class DoneIndex:
    """Done chunk ids plus every ancestor of one, for quick :func:`is_done` checks."""

    def __init__(self, done_ids: Iterable[str]):
        self.done = set(done_ids)
        self.ancestors: set[str] = set()
        for cid in self.done:
            parts = cid.split(".")
            for k in range(1, len(parts)):
                self.ancestors.add(".".join(parts[:k]))

    def is_done(self, chunk_id: str) -> bool:
        if chunk_id in self.done:
            return True
        if chunk_id not in self.ancestors:
            return False
        return self.is_done(chunk_id + ".0") and self.is_done(chunk_id + ".1")

    def partly_done(self, chunk_id: str) -> bool:
        """Some piece of the chunk (a half, a quarter, ...) is done."""
        return chunk_id in self.ancestors


def is_done(chunk_id: str, done_ids: Iterable[str] | DoneIndex) -> bool:
    """A chunk is done if it is recorded, or both its halves are (recursively)."""
    index = done_ids if isinstance(done_ids, DoneIndex) else DoneIndex(done_ids)
    return index.is_done(chunk_id)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class Ledger:
    """Done chunks of runs in SQL tables at ``url`` (created on first use)."""

    def __init__(self, url: str):
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(
                f"ledger URL {url!r} is not a database URL: use e.g. sqlite:///runs.db "
                "or postgresql+psycopg://user@host/db"
            )
        self.url = url
        self._engine: Engine | None = None
        self.engine  # noqa: B018 (create the tables now, in the driver)

    # ------------------------------------------------------------ plumbing --

    def __getstate__(self) -> dict:
        return {"url": self.url}

    def __setstate__(self, state: dict) -> None:
        self.url = state["url"]
        self._engine = None

    def __repr__(self) -> str:
        from .security import mask_url

        return f"Ledger({mask_url(self.url)!r})"  # reprs reach Dask's logs: no password

    @property
    def engine(self) -> Engine:
        """This process's engine (made on first use; tables created if missing)."""
        from .security import mask_url

        if self._engine is None:
            kwargs: dict[str, Any] = {"pool_pre_ping": True}  # survive a server restart
            if self.url.startswith("sqlite"):
                # many worker processes may write: wait for the lock instead of failing
                kwargs["connect_args"] = {"timeout": 60}
            elif self.url.startswith("postgresql"):
                # a server that vanished (no RST) fails a connect in seconds, not minutes
                kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
            try:
                engine = sa.create_engine(self.url, **kwargs)
                if self.url.startswith("sqlite"):
                    sa.event.listen(engine, "connect", _sqlite_pragmas)
                _META.create_all(engine, checkfirst=True)
            except sa.exc.ArgumentError as exc:
                raise ConfigError(
                    f"ledger URL {mask_url(self.url)!r} is not valid: {exc}"
                ) from None
            except sa.exc.OperationalError as exc:
                from .retry import error_line

                raise HpcbatchError(
                    f"cannot open the ledger database {mask_url(self.url)} ({error_line(exc)}): "
                    "check the path, or that the server is running and reachable"
                ) from None
            self._engine = engine
        return self._engine

    # ---------------------------------------------------------------- runs --

    def run_info(self, run_id: str) -> dict | None:
        """The recorded run, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(RUNS).where(RUNS.c.run_id == run_id)).mappings().first()
        if row is None:
            return None
        info = dict(row)
        info["params"] = json.loads(info["params"])
        return info

    def start_run(
        self,
        run_id: str,
        *,
        n_items: int,
        chunk_size: int,
        seed: int,
        params: dict | None = None,
        resume: bool,
    ) -> dict:
        """Record a new run, or check a resumed one against its record.

        Returns the run's record plus ``resumed`` (bool), ``finished`` (bool: a
        finished run, nothing to do) and ``n_done`` (chunks recorded).  A resumed run
        keeps its recorded ``chunk_size`` so chunk ids match.  Raises
        :class:`ConfigError` when the run exists and ``resume`` is false, or when the
        run's inputs (items, seed, parameters) differ from the record.
        """
        params = _jsonable(params or {})
        existing = self.run_info(run_id)
        if existing is None:
            with self.engine.begin() as conn:
                conn.execute(
                    RUNS.insert().values(
                        run_id=run_id,
                        n_items=int(n_items),
                        chunk_size=int(chunk_size),
                        seed=int(seed),
                        params=json.dumps(params, sort_keys=True),
                        status="running",
                        started_at=time.time(),
                        finished_at=None,
                    )
                )
            info = self.run_info(run_id) or {}
            return {**info, "resumed": False, "finished": False, "n_done": 0}

        n_done = len(self.done_ids(run_id))
        if existing["status"] == "finished":
            return {**existing, "resumed": True, "finished": True, "n_done": n_done}
        if not resume:
            raise ConfigError(
                f"run {run_id!r} already exists in the ledger {self.url} with {n_done} chunks "
                f"done (status {existing['status']}): pass --resume to continue it, "
                "or use a new --run-id"
            )
        _check_same(run_id, existing, n_items=n_items, seed=seed, params=params)
        with self.engine.begin() as conn:
            conn.execute(RUNS.update().where(RUNS.c.run_id == run_id).values(status="running"))
        existing["status"] = "running"
        return {**existing, "resumed": True, "finished": False, "n_done": n_done}

    def finish_run(self, run_id: str, status: str) -> None:
        """Set the run's status (``finished``, ``failed``, ``interrupted``)."""
        with self.engine.begin() as conn:
            conn.execute(
                RUNS.update()
                .where(RUNS.c.run_id == run_id)
                .values(status=status, finished_at=time.time())
            )

    # -------------------------------------------------------------- chunks --

    def done_ids(self, run_id: str) -> set[str]:
        """Ids of the chunks of ``run_id`` recorded as done."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(CHUNKS.c.chunk_id).where(CHUNKS.c.run_id == run_id)
            ).scalars()
            return set(rows)

    def chunk_meta(self, run_id: str) -> dict[str, dict]:
        """``{chunk_id: meta}`` of the done chunks of ``run_id``."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(CHUNKS.c.chunk_id, CHUNKS.c.meta).where(CHUNKS.c.run_id == run_id)
            )
            return {cid: json.loads(meta) for cid, meta in rows}

    def mark_done(
        self,
        run_id: str,
        chunk: Any,
        meta: dict | None = None,
        *,
        connection: Connection | None = None,
    ) -> None:
        """Record ``chunk`` (a :class:`~hpcbatch.runner.Chunk`) of ``run_id`` as done.

        With ``connection`` the row is written in the caller's transaction (it commits
        or rolls back with the caller's rows); a chunk already recorded then raises
        :class:`ChunkAlreadyDone` so the caller's duplicate rows roll back.  Without
        ``connection`` the row commits on its own and a duplicate is ignored.
        """
        values = dict(
            run_id=run_id,
            chunk_id=chunk.chunk_id,
            start=int(chunk.start),
            stop=int(chunk.stop),
            meta=json.dumps(_jsonable(meta or {}), sort_keys=True),
            done_at=time.time(),
        )
        if connection is not None:
            try:
                # a savepoint keeps PostgreSQL's transaction usable for the rollback
                with connection.begin_nested():
                    connection.execute(CHUNKS.insert().values(**values))
            except sa.exc.IntegrityError:
                raise ChunkAlreadyDone(
                    f"chunk {chunk.chunk_id} of run {run_id} is already done"
                ) from None
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(CHUNKS.insert().values(**values))
        except sa.exc.IntegrityError:
            pass  # recorded before (e.g. by the task's own transaction): idempotent


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()


def _check_same(run_id: str, recorded: dict, *, n_items: int, seed: int, params: dict) -> None:
    diffs = []
    if int(recorded["n_items"]) != int(n_items):
        diffs.append(f"items {recorded['n_items']} -> {n_items}")
    if int(recorded["seed"]) != int(seed):
        diffs.append(f"seed {recorded['seed']} -> {seed}")
    old = recorded["params"]
    for key in sorted(set(old) | set(params)):
        if old.get(key) != params.get(key):
            diffs.append(f"{key} {old.get(key)!r} -> {params.get(key)!r}")
    if diffs:
        raise ConfigError(
            f"cannot resume run {run_id!r}: its inputs changed ({'; '.join(diffs)}): "
            "rerun with the original settings, or start a new run with another --run-id"
        )
