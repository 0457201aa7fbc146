"""``sample(..., out=..., resume=True)``: the ledger beside the store, the run id,
resuming only the chunks the ledger lacks, and the refusals around it."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from predictive_models import hierarchical_model, hierarchical_setup

from hpcbatch.errors import ConfigError
from hpcbatch.ledger import Ledger
from hpcbatch.predictive.sampling import ledger_path, run_sampling


@pytest.fixture(scope="module")
def hier():
    return hierarchical_setup()


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            dashboard_address=None,
            memory_limit="2GiB",
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _run(hier, out, client, **extra):
    guide, args = hier
    options = dict(
        guide=guide, num_samples=24, model_args=args, chunk_size=4, seed=3, out=out,
        client=client, progress=False,
    )  # fmt: skip
    options.update(extra)
    return run_sampling(hierarchical_model, **options)


def _arrays(out) -> dict[str, np.ndarray]:
    group = zarr.open_group(store=str(out), mode="r")
    return {name: np.asarray(group[name][...]) for name in group.array_keys()}


def test_resume_runs_only_the_chunks_missing_from_the_ledger(hier, client, tmp_path):
    out = tmp_path / "s.zarr"
    first = _run(hier, out, client)
    assert first.report.status == "finished" and ledger_path(out).exists()
    expected = _arrays(out)
    run_id = first.report.run_id
    # The state a killed run leaves: three chunks not recorded and their regions unwritten.
    ledger = Ledger(f"sqlite:///{ledger_path(out)}")
    with ledger.engine.begin() as conn:
        conn.exec_driver_sql(
            "DELETE FROM hpcbatch_chunks WHERE chunk_id IN ('c000001', 'c000003', 'c000005')"
        )
    ledger.finish_run(run_id, "interrupted")
    ledger.engine.dispose()
    group = zarr.open_group(store=str(out), mode="r+")
    for name in group.array_keys():
        for c in (1, 3, 5):
            group[name][c * 4 : (c + 1) * 4] = 0

    resumed = _run(hier, out, client, resume=True)
    assert resumed.report.run_id == run_id  # same inputs, same run id
    assert resumed.report.chunks_skipped == 3
    assert resumed.report.chunks_done == 3
    for name, value in _arrays(out).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)

    again = _run(hier, out, client, resume=True)
    assert again.report.status == "already-finished"
    assert again.report.chunks_done == 0


def test_existing_store_with_ledger_asks_for_resume_or_overwrite(hier, client, tmp_path):
    out = tmp_path / "s.zarr"
    _run(hier, out, client)
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        _run(hier, out, client)
    with pytest.raises(ConfigError, match=r"cannot resume .*seed 3 -> 4"):
        _run(hier, out, client, resume=True, seed=4)
    assert _run(hier, out, client, overwrite=True, seed=4).report.status == "finished"


def test_resume_of_a_missing_store_starts_the_run(hier, client, tmp_path):
    out = tmp_path / "s.zarr"
    run = _run(hier, out, client, resume=True)
    assert run.report.status == "finished" and run.report.chunks_skipped == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"client": "sync"}, "--resume needs a Dask cluster"),
        ({"out": None}, "resume=True needs out="),
        ({"overwrite": True}, "either resume=True"),
    ],
)
def test_resume_refusals(hier, client, tmp_path, extra, message):
    options = {"out": tmp_path / "s.zarr", "client": client, "resume": True, **extra}
    with pytest.raises(ConfigError, match=message):
        _run(hier, **options)
    assert not (tmp_path / "s.zarr").exists()


def test_ledger_sits_beside_the_store_which_zarr_opens(hier, client, tmp_path):
    out = tmp_path / "s.zarr"
    run = _run(hier, out, client)
    assert ledger_path(out) == tmp_path / "s.zarr.ledger.db"
    group = zarr.open_group(store=str(out), mode="r")
    assert set(group.array_keys()) == {s.name for s in run.layout.sites}
    assert group.attrs["hpcbatch"]["run_id"] == run.report.run_id


def test_a_store_written_without_a_ledger_is_not_resumed(hier, client, tmp_path):
    out = tmp_path / "s.zarr"
    _run(hier, out, "sync")
    assert not ledger_path(out).exists()
    with pytest.raises(ConfigError, match="written without a ledger"):
        _run(hier, out, client, resume=True)
    assert out.exists()
