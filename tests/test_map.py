"""``hpcbatch.map``: a user's function over a user's items, through the one pipeline.

Real LocalClusters (a module-wide one of two 1-GiB workers, and the planned one
``hpcbatch.map`` starts itself), real zarr / Parquet / SQLite outputs; each call of the
user function leaves a file, so the tests count what really ran.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

import hpcbatch
from hpcbatch.errors import ChunkFailedError, ConfigError
from hpcbatch.pipeline import load_settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "framework.md"
SMALL = {"per_item_bytes": 1024, "fixed_bytes": 64 * 1024**2}  # skips the measurement


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="1GiB", processes=True,
                     host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster) as c,
    ):  # fmt: skip
        c.wait_for_workers(2, timeout=60)
        yield c


@pytest.fixture
def quiet_settings():
    return load_settings(overrides={"retries": 0})


def square_logged(batch, *, log_dir: str, fail_from: int | None = None, oom_above: int = 0,
                  flag: str | None = None):  # fmt: skip
    """x * x for each item; logs the call's items to a file after success."""
    items = [int(x) for x in batch]
    if oom_above and len(items) > oom_above:
        raise MemoryError(f"{len(items)} items do not fit")
    if fail_from is not None and flag and Path(flag).exists() and max(items) >= fail_from:
        raise RuntimeError(f"item {max(items)} failed")
    Path(log_dir, f"{uuid.uuid4().hex}.json").write_text(json.dumps(items))
    return [x * x for x in items]


def calls(log_dir: Path) -> list[list[int]]:
    return [json.loads(p.read_text()) for p in log_dir.glob("*.json")]


def done_items(log_dir: Path) -> list[int]:
    return sorted(i for call in calls(log_dir) for i in call)


def logged(tmp_path: Path, **kwargs):
    log_dir = tmp_path / "calls"
    log_dir.mkdir(exist_ok=True)
    return functools.partial(square_logged, log_dir=str(log_dir), **kwargs), log_dir


# --------------------------------------------------------------- the doc ----


def doc_snippet() -> str:
    text = DOCS.read_text()
    found = re.search(r"<!-- map-snippet -->\n```python\n(.*?)```", text, re.S)
    assert found, "docs/framework.md has no <!-- map-snippet --> python block"
    return found.group(1)


def test_the_documented_snippet_runs_verbatim_in_at_most_15_lines(tmp_path):
    code = doc_snippet()
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    script = tmp_path / "snippet.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "10000 measured: __main__.norms in fresh processes" in done.stdout


# ---------------------------------------------------------- return values ----


def test_results_are_the_function_applied_to_each_item_in_order(client, tmp_path):
    fn, log_dir = logged(tmp_path)
    items = list(range(103))
    results = hpcbatch.map(fn, items, client=client, footprint=SMALL, chunk_size=10,
                           scratch=tmp_path, progress=False)  # fmt: skip
    assert results == [x * x for x in items]
    assert done_items(log_dir) == items
    assert results.report.status == "finished" and results.report.plan["chunk_size"] == 10
    assert not any((tmp_path / f"hpcbatch-map-{os.getuid()}").iterdir())  # staging removed


def test_array_items_reach_fn_as_array_chunks(client, tmp_path):
    vectors = np.arange(60.0).reshape(20, 3)
    seen = []

    def norms(batch):
        seen.append(type(batch).__name__)  # in the worker: not visible here
        assert isinstance(batch, np.ndarray) and batch.shape[1:] == (3,)
        return np.linalg.norm(batch, axis=1)

    results = hpcbatch.map(norms, vectors, client=client, footprint=SMALL, chunk_size=6,
                           scratch=tmp_path, progress=False)  # fmt: skip
    np.testing.assert_allclose(results, np.linalg.norm(vectors, axis=1))


def test_per_item_calls_fn_once_per_item(client, tmp_path):
    results = hpcbatch.map(str.upper, ["a", "b", "c"], per_item=True, client=client,
                           footprint=SMALL, scratch=tmp_path, progress=False)  # fmt: skip
    assert results == ["A", "B", "C"]


def test_memory_error_splits_until_chunks_fit_and_each_item_runs_once(client, tmp_path):
    fn, log_dir = logged(tmp_path, oom_above=3)
    items = list(range(40))
    results = hpcbatch.map(fn, items, client=client, footprint=SMALL, chunk_size=10,
                           scratch=tmp_path, progress=False)  # fmt: skip
    assert results == [x * x for x in items]
    assert done_items(log_dir) == items  # every item done exactly once
    assert max(len(c) for c in calls(log_dir)) <= 3
    assert results.report.chunks_split >= 4  # each 10 -> 5 -> 2 + 3


def test_resume_after_a_failed_run_runs_only_the_missing_chunks(client, tmp_path, quiet_settings):
    flag = tmp_path / "fail"
    flag.touch()
    fn, log_dir = logged(tmp_path, fail_from=30, flag=str(flag))
    items = list(range(50))
    kw = dict(client=client, footprint=SMALL, chunk_size=10, scratch=tmp_path,
              settings=quiet_settings, progress=False)  # fmt: skip
    with pytest.raises(ChunkFailedError):
        hpcbatch.map(fn, items, **kw)
    first = done_items(log_dir)
    assert set(first) <= set(range(30)) and first  # chunks 0-2 may be done, 3-4 failed
    flag.unlink()
    results = hpcbatch.map(fn, items, resume=True, **kw)
    assert results == [x * x for x in items]
    assert done_items(log_dir) == items  # the first run's chunks did not run again


# ------------------------------------------------------------------ sinks ----


def test_zarr_sink_writes_each_region_once_and_resumes(client, tmp_path, quiet_settings):
    import zarr

    flag = tmp_path / "fail"
    flag.touch()
    fn, log_dir = logged(tmp_path, fail_from=25, flag=str(flag), oom_above=4)
    out = tmp_path / "squares.zarr"
    kw = dict(out=str(out), client=client, footprint=SMALL, chunk_size=8,
              settings=quiet_settings, progress=False)  # fmt: skip
    with pytest.raises(ChunkFailedError):
        hpcbatch.map(fn, range(37), **kw)
    flag.unlink()
    report = hpcbatch.map(fn, range(37), resume=True, **kw)
    assert report.status == "finished"
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[:], np.arange(37) ** 2)
    # footprint given: fn ran once on item 0 in the driver per run (the array's dtype)
    runs = [c for c in calls(log_dir) if c != [0]]
    assert sorted(i for c in runs for i in c) == list(range(37))
    assert (tmp_path / "squares.zarr.ledger.db").exists()


def test_parquet_sink_has_every_row_once(client, tmp_path):
    import pyarrow.parquet as pq

    fn, log_dir = logged(tmp_path, oom_above=5)
    out = tmp_path / "squares.parquet"
    report = hpcbatch.map(fn, list(range(64)), out=str(out), client=client, footprint=SMALL,
                          chunk_size=16, progress=False)  # fmt: skip
    table = pq.read_table(out).sort_by("_index")
    assert table.column("_index").to_pylist() == list(range(64))
    assert table.column("value").to_pylist() == [x * x for x in range(64)]
    assert report.chunks_split >= 4 and not list(out.glob(".*.tmp"))


def test_sql_sink_commits_rows_with_their_ledger_row(client, tmp_path):
    db = tmp_path / "results.db"
    url = f"sqlite:///{db}"

    def describe(batch):
        return {"word": [str(x) for x in batch], "length": [len(str(x)) for x in batch]}

    report = hpcbatch.map(describe, list(range(0, 2000, 7)), out=url, table="words",
                          client=client, footprint=SMALL, chunk_size=50, progress=False)  # fmt: skip
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT _index, word, length, run_id FROM words ORDER BY _index")
        rows = rows.fetchall()
        ledger = conn.execute("SELECT count(*) FROM hpcbatch_chunks WHERE run_id = ?",
                              (report.run_id,)).fetchone()[0]  # fmt: skip
    assert [r[0] for r in rows] == list(range(286))
    assert [r[1] for r in rows] == [str(x) for x in range(0, 2000, 7)]
    assert {r[3] for r in rows} == {report.run_id} and ledger == report.n_chunks == 6


# -------------------------------------------------------------- footprint ----


def hold_4mib_per_item(batch):
    held = [np.ones(512 * 1024) for _ in batch]  # 4 MiB per item, held together
    return [float(a[0]) for a in held]


def test_measured_footprint_is_used_and_named_in_the_plan(client, tmp_path):
    # (map starting its own local cluster, measured footprint included, is the snippet test)
    results = hpcbatch.map(hold_4mib_per_item, list(range(120)), client=client,
                           probe_sizes=(4, 16), scratch=tmp_path, progress=False)  # fmt: skip
    assert results == [1.0] * 120
    plan = results.report.plan
    assert plan["footprint_source"].startswith(
        "measured: test_map.hold_4mib_per_item in fresh processes (probe sizes 4, 16"
    )
    per_item = plan["footprint"]["per_item_bytes"]
    assert 3.5 * 1024**2 < per_item < 5 * 1024**2  # 4 MiB measured, not guessed
    assert plan["chunk_size"] * per_item <= plan["memory_limit_bytes"]


# ------------------------------------------------------------ bad inputs ----


@pytest.mark.parametrize(
    "call, says",
    [
        (lambda tmp: hpcbatch.map(42, [1]), "fn must be callable"),
        (lambda tmp: hpcbatch.map(abs, []), "items is empty"),
        (lambda tmp: hpcbatch.map(abs, "abc"), "items must be a list"),
        (
            lambda tmp: hpcbatch.map(
                abs, [1], out=str(tmp / "afile" / "x.parquet"), footprint=SMALL
            ),
            "is not writable",
        ),  # fmt: skip
        (lambda tmp: hpcbatch.map(abs, [1], out=str(tmp / "x.csv")), "end it in .zarr"),
        (lambda tmp: hpcbatch.map(abs, [1], out="sqlite:///x.db"), "needs table="),
        (lambda tmp: hpcbatch.map(abs, [1], client="sync"), "client='sync' is not supported"),
        (lambda tmp: hpcbatch.map(abs, [1], footprint={"bytes": 1}), "give per_item_bytes"),
    ],
)
def test_bad_input_is_one_config_error_line(tmp_path, call, says):
    (tmp_path / "afile").write_text("a file, not a directory")
    with pytest.raises(ConfigError) as err:
        call(tmp_path)
    assert says in str(err.value) and "\n" not in str(err.value)
