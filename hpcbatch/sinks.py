"""Where :func:`hpcbatch.map` puts a chunk's results: returned values, zarr, Parquet or SQL.

Every sink is written by the workers, one chunk at a time, and is resumable:

- :class:`ReturnedSink` (``out=None``): each chunk's results are pickled to a file in a
  private scratch directory; the driver gathers them in item order when the run ends
  and removes the directory.  For small jobs (the results travel back to one process).
- :class:`ZarrSink` (``out="x.zarr"``): one array of shape ``(n_items, *item_shape)``;
  each chunk writes its own region (its zarr chunks follow the planned chunk size, so
  chunks never share one; the halves of a split chunk take a ``distributed.Lock`` on
  the edge they share).  Writing a region twice writes the same bytes.
- :class:`ParquetSink` (``out="dir.parquet"``): one file per chunk,
  ``part-<start>-<stop>.parquet``, written to a temporary name and renamed (atomic);
  when the run ends, files no recorded chunk owns (a chunk that was split after it
  wrote) are removed, so every row is there once.
- :class:`SQLSink` (``out="sqlite:///x.db", table="t"``, any SQLAlchemy URL): the
  chunk's rows and its ledger row commit in one transaction (exactly once).

File sinks keep their SQLite ledger beside the output, ``<out>.ledger.db``; the SQL sink
keeps it in its own database.  Rows (Parquet, SQL) carry the item's index in ``_index``;
a result that is a dict becomes its columns, anything else the column ``value``.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import sqlalchemy as sa

from .errors import ConfigError, DataError
from .ledger import CHUNKS, Ledger
from .security import mask_url, private_dir
from .workload import Sink

INDEX = "_index"
ZARR_CHUNK_BYTES = 64 * 1024**2  # a zarr chunk at most this big (rows divide the plan's chunk)


def ledger_path(out: str | os.PathLike) -> Path:
    """The SQLite ledger of the file output ``out``: ``<out>.ledger.db`` beside it."""
    path = Path(out)
    return path.with_name(path.name + ".ledger.db")


def done_ranges(ledger_url: str, run_id: str) -> list[tuple[int, int]]:
    """The ``(start, stop)`` of every chunk of ``run_id`` the ledger has, in item order."""
    with Ledger(ledger_url).engine.connect() as conn:
        rows = conn.execute(
            sa.select(CHUNKS.c.start, CHUNKS.c.stop).where(CHUNKS.c.run_id == run_id)
        )
        return sorted((int(a), int(b)) for a, b in rows)


def _part_name(start: int, stop: int, suffix: str) -> str:
    return f"part-{start:012d}-{stop:012d}{suffix}"


def _part_range(name: str) -> tuple[int, int] | None:
    parts = name.split(".")[0].split("-")
    if len(parts) != 3 or parts[0] != "part" or not (parts[1] + parts[2]).isdigit():
        return None
    return int(parts[1]), int(parts[2])


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_orphans(directory: Path, suffix: str, keep: set[tuple[int, int]]) -> int:
    removed = 0
    for path in directory.glob(f"part-*{suffix}"):
        if _part_range(path.name) not in keep:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _check_writable(directory: Path, what: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".hpcbatch-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{what} {directory} is not writable ({exc.strerror or exc}): choose another out"
        ) from None


def rows_of(results: Any, start: int) -> list[dict]:
    """One row per item: a dict result gives its columns, anything else ``value``."""
    rows = []
    for k, value in enumerate(results):
        row = dict(value) if isinstance(value, Mapping) else {"value": _plain(value)}
        row[INDEX] = start + k
        rows.append(row)
    return rows


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return value.tolist()  # numpy scalars and arrays -> Python values / lists
    return value


class MapSink:
    """What a sink of :func:`hpcbatch.map` does (driver: ``open``/``finish``; worker: ``write``)."""

    kind: ClassVar[str] = ""
    needs_sample: ClassVar[bool] = False  # open() needs one item's result (dtype, columns)

    def workload_sink(self) -> Sink:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def reset(self) -> None:
        """Before a run that is not resumed: drop what only this sink's staging holds."""

    def check(self) -> None:
        """Refuse an output that cannot be written (one ConfigError line)."""

    def open(self, run_id: str, n_items: int, chunk_size: int, sample: Any, resume: bool) -> None:
        """Create the output before the first chunk (kept when ``run_id`` is recorded)."""

    def write(self, chunk: Any, results: Sequence, run_id: str) -> dict:
        raise NotImplementedError

    def finish(self, run_id: str, n_items: int) -> Any:
        return None

    def _recorded(self, run_id: str) -> bool:
        url = self.workload_sink().ledger_url
        return bool(url) and Ledger(url).run_info(run_id) is not None


@dataclass(frozen=True)
class ReturnedSink(MapSink):
    """Results returned to the caller, staged as one pickle file per chunk in ``directory``."""

    directory: str
    kind: ClassVar[str] = "returned"

    @classmethod
    def for_run(cls, run_id: str, scratch: str | os.PathLike | None) -> ReturnedSink:
        """The staging directory of ``run_id`` (stable, so ``resume=True`` finds it)."""
        base = Path(scratch) if scratch else Path(tempfile.gettempdir())
        base = private_dir(base / f"hpcbatch-map-{os.getuid()}")
        return cls(str(base / run_id))

    def workload_sink(self) -> Sink:
        url = f"sqlite:///{Path(self.directory) / 'ledger.db'}"
        return Sink(ledger_url=url, description="returned values")

    def describe(self) -> str:
        return "returned"

    def reset(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def check(self) -> None:
        _check_writable(Path(self.directory), "scratch directory")

    def write(self, chunk: Any, results: Sequence, run_id: str) -> dict:
        path = Path(self.directory) / _part_name(chunk.start, chunk.stop, ".pkl")
        data = pickle.dumps(list(results), protocol=pickle.HIGHEST_PROTOCOL)
        _write_atomic(path, lambda tmp: tmp.write_bytes(data))
        return {"bytes": len(data)}

    def finish(self, run_id: str, n_items: int) -> list:
        out: list = []
        url = self.workload_sink().ledger_url
        for start, stop in done_ranges(url, run_id):
            if start != len(out):
                raise DataError(f"results of items {len(out)}..{start - 1} are missing")
            path = Path(self.directory) / _part_name(start, stop, ".pkl")
            out.extend(pickle.loads(path.read_bytes()))
        if len(out) != n_items:
            raise DataError(f"{len(out)} results for {n_items} items: rerun with resume=True")
        shutil.rmtree(self.directory, ignore_errors=True)
        return out


@dataclass(frozen=True)
class ParquetSink(MapSink):
    """One Parquet file per chunk in the directory ``path`` (needs ``pyarrow``)."""

    path: str
    kind: ClassVar[str] = "parquet"

    def workload_sink(self) -> Sink:
        return Sink(ledger_url=f"sqlite:///{ledger_path(self.path)}", description=self.path)

    def describe(self) -> str:
        return f"parquet:{Path(self.path).resolve()}"

    def check(self) -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"out={self.path!r} needs pyarrow: pip install 'hpcbatch[parquet]'"
            ) from None
        _check_writable(Path(self.path), "Parquet directory")

    def open(self, run_id: str, n_items: int, chunk_size: int, sample: Any, resume: bool) -> None:
        if not self._recorded(run_id):  # a fresh run: no parts of an earlier run stay
            _remove_orphans(Path(self.path), ".parquet", set())

    def write(self, chunk: Any, results: Sequence, run_id: str) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows_of(results, chunk.start))
        path = Path(self.path) / _part_name(chunk.start, chunk.stop, ".parquet")
        _write_atomic(path, lambda tmp: pq.write_table(table, tmp))
        return {"rows": table.num_rows}

    def finish(self, run_id: str, n_items: int) -> None:
        keep = set(done_ranges(self.workload_sink().ledger_url, run_id))
        _remove_orphans(Path(self.path), ".parquet", keep)


@dataclass(frozen=True)
class ZarrSink(MapSink):
    """A zarr array ``(n_items, *item_shape)`` at ``path``; each chunk writes its region."""

    path: str
    kind: ClassVar[str] = "zarr"
    needs_sample: ClassVar[bool] = True

    def workload_sink(self) -> Sink:
        return Sink(ledger_url=f"sqlite:///{ledger_path(self.path)}", description=self.path)

    def describe(self) -> str:
        return f"zarr:{Path(self.path).resolve()}"

    def check(self) -> None:
        _check_writable(Path(self.path).parent, "output directory")

    def open(self, run_id: str, n_items: int, chunk_size: int, sample: Any, resume: bool) -> None:
        import numpy as np
        import zarr

        item = np.asarray(sample)[0]
        shape = (n_items, *item.shape)
        if self._recorded(run_id) and Path(self.path).exists():
            array = zarr.open_array(store=self.path, mode="r")
            if array.shape != shape or array.dtype != item.dtype:
                raise ConfigError(
                    f"{self.path} holds {array.shape} {array.dtype}, this run writes {shape} "
                    f"{item.dtype}: remove it or choose another out"
                )
            return
        rows = zarr_rows(chunk_size, max(1, item.nbytes))
        zarr.create_array(store=self.path, shape=shape, chunks=(rows, *item.shape),
                          dtype=item.dtype, fill_value=0, overwrite=True)  # fmt: skip

    def write(self, chunk: Any, results: Sequence, run_id: str) -> dict:
        import numpy as np
        import zarr

        array = zarr.open_array(store=self.path, mode="r+")
        values = np.asarray(results, dtype=array.dtype)
        rows = array.chunks[0]
        for start, stop, shared in _regions(chunk.start, chunk.stop, rows, array.shape[0]):
            part = values[start - chunk.start : stop - chunk.start]
            if shared:  # the halves of a split chunk share this zarr chunk: one at a time
                with _zarr_lock(self.path, start // rows):
                    array[start:stop] = part
            else:
                array[start:stop] = part
        return {"bytes": int(values.nbytes)}


def zarr_rows(chunk_size: int, item_bytes: int) -> int:
    """Rows per zarr chunk: the largest divisor of ``chunk_size`` within 64 MiB."""
    most = max(1, ZARR_CHUNK_BYTES // item_bytes)
    if chunk_size <= most:
        return chunk_size
    return max(d for d in range(1, most + 1) if chunk_size % d == 0)


def _regions(start: int, stop: int, rows: int, n: int) -> list[tuple[int, int, bool]]:
    """``start..stop`` cut at zarr chunk edges; ``shared`` marks a partly covered zarr chunk."""
    out = []
    for k in range(start // rows, math.ceil(stop / rows)):
        lo, hi = k * rows, min(n, (k + 1) * rows)
        a, b = max(lo, start), min(hi, stop)
        out.append((a, b, (a, b) != (lo, hi)))
    return out


def _zarr_lock(path: str, k: int) -> Any:
    from distributed import Lock

    key = hashlib.blake2b(str(Path(path).resolve()).encode(), digest_size=6).hexdigest()
    return Lock(f"hpcbatch-zarr-{key}-{k}")


_ENGINES: dict[str, sa.Engine] = {}


def _engine(url: str) -> sa.Engine:
    if url not in _ENGINES:
        _ENGINES[url] = Ledger(url).engine  # the ledger's engine: its pragmas, its tables
    return _ENGINES[url]


_TYPES = ((bool, sa.Boolean), (int, sa.BigInteger), (float, sa.Float), (str, sa.Text),
          (bytes, sa.LargeBinary))  # fmt: skip


def _column_type(name: str, value: Any) -> Any:
    for python, sql in _TYPES:
        if isinstance(value, python):
            return sql
    raise ConfigError(
        f"result column {name!r} holds {type(value).__name__}: SQL results must be "
        "bool, int, float, str or bytes (or a dict of them) per item"
    )


@dataclass(frozen=True)
class SQLSink(MapSink):
    """Rows in ``table`` of the database ``url``, committed with the chunk's ledger row."""

    url: str
    table: str
    kind: ClassVar[str] = "sql"
    needs_sample: ClassVar[bool] = True

    def workload_sink(self) -> Sink:
        return Sink(ledger_url=self.url, commit_on_worker=True, database=self.url,
                    description=f"table {self.table}")  # fmt: skip

    def describe(self) -> str:
        return f"sql:{mask_url(self.url)}#{self.table}"

    def check(self) -> None:
        if not self.table or not self.table.replace("_", "").isalnum():
            raise ConfigError(
                f"out={mask_url(self.url)!r} needs table='name' (letters, digits, '_')"
            )
        try:
            _engine(self.url)
        except sa.exc.SQLAlchemyError as exc:
            raise ConfigError(f"cannot open {mask_url(self.url)}: {exc}") from None

    def open(self, run_id: str, n_items: int, chunk_size: int, sample: Any, resume: bool) -> None:
        engine = _engine(self.url)
        if sa.inspect(engine).has_table(self.table):
            return
        row = rows_of(list(sample)[:1], 0)[0]
        columns = [sa.Column("run_id", sa.String(200), primary_key=True),
                   sa.Column(INDEX, sa.BigInteger, primary_key=True)]  # fmt: skip
        columns += [sa.Column(k, _column_type(k, v)) for k, v in row.items() if k != INDEX]
        sa.Table(self.table, sa.MetaData(), *columns).create(engine, checkfirst=True)

    def write(self, chunk: Any, results: Sequence, run_id: str) -> dict:
        engine = _engine(self.url)
        table = sa.Table(self.table, sa.MetaData(), autoload_with=engine)
        rows = [{**row, "run_id": run_id} for row in rows_of(results, chunk.start)]
        with engine.begin() as conn:  # the rows and the ledger row: one transaction
            conn.execute(table.insert(), rows)
            Ledger(self.url).mark_done(run_id, chunk, {"rows": len(rows)}, connection=conn)
        return {"rows": len(rows)}


def sink_for(out: Any, table: str | None, run_id: str, scratch: Any) -> MapSink:
    """The sink ``out`` names: None, ``*.zarr``, ``*.parquet``, a database URL, or a sink."""
    if isinstance(out, MapSink):
        return out
    if out is None:
        if table is not None:
            raise ConfigError("table= needs out= a database URL, e.g. out='sqlite:///x.db'")
        return ReturnedSink.for_run(run_id, scratch)
    text = os.fspath(out) if isinstance(out, (str, os.PathLike)) else None
    if text is None:
        raise ConfigError(
            f"out={out!r}: give a path ending in .zarr or .parquet, or a database URL"
        )
    if "://" in text:
        return SQLSink(text, table or "")
    if table is not None:
        raise ConfigError(f"table= is for a database out, not {text!r}")
    if text.rstrip("/").endswith(".zarr"):
        return ZarrSink(text)
    if text.rstrip("/").endswith(".parquet"):
        return ParquetSink(text)
    raise ConfigError(
        f"out={text!r}: end it in .zarr (an array) or .parquet (a directory of files), "
        "or give a database URL such as sqlite:///results.db with table='name'"
    )
