"""Faults during a real posterior predictive run (``hpcbatch predictive sample``).

A worker is SIGKILLed half way (as the kernel OOM killer or SLURM would): the run
finishes and the zarr store equals an undisturbed run's, array for array and bit for
bit (every chunk's seed depends only on the run seed and the chunk id).  The driver is
stopped half way (SIGTERM at the walltime, or SIGKILL): ``--resume`` runs only the
chunks its ledger lacks and the store again equals the undisturbed run's.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from faultkit import (
    HPCBATCH,
    dask_workers,
    done_ids,
    fault_env,
    fitted_data,
    kill_tree,
    wait_until,
)

from hpcbatch.predictive.sampling import ledger_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
SITES = ("alpha_y", "mu_ntc", "phi_y", "y")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    return fitted_data(tmp_path_factory.mktemp("predictive-faults"), 60, 20)


N_CHUNKS = 12  # 48 samples in chunks of 4


def _sample(data: Path, out: Path, reports: Path, *extra: str, **faults) -> subprocess.Popen:
    args = ["predictive", "sample", str(data), "--samples", "48", "--with-observations",
            "--chunk-size", "4", "--cpus", "2", "--seed", "7", "--out", str(out),
            "--report-dir", str(reports), *extra]  # fmt: skip
    return subprocess.Popen(
        [HPCBATCH, *args],
        env=fault_env(**faults),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _arrays(store: Path) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(store=str(store), mode="r")
    return {name: np.asarray(group[name][...]) for name in SITES}


@pytest.fixture(scope="module")
def undisturbed(fitted, tmp_path_factory) -> dict[str, np.ndarray]:
    base = tmp_path_factory.mktemp("predictive-undisturbed")
    proc = _sample(fitted, base / "undisturbed.zarr", base / "reports")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return _arrays(base / "undisturbed.zarr")


def _done(store: Path) -> set[str]:
    """Chunk ids the run's ledger (``<store>.ledger.db``) records as done."""
    return done_ids(f"sqlite:///{ledger_path(store)}")


def _assert_same(store: Path, expected: dict[str, np.ndarray]) -> None:
    got = _arrays(store)
    for name in SITES:
        assert got[name].shape == expected[name].shape
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def _resume_runs_only_the_rest(fitted, store: Path, tmp_path: Path, undisturbed) -> None:
    done = _done(store)
    assert 0 < len(done) < N_CHUNKS, done
    marks = tmp_path / "marks-resume"
    proc = _sample(fitted, store, tmp_path / "reports", "--resume", "--json", mark_dir=marks)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["chunks_skipped"] == len(done)
    ran = {m.name.rsplit("-", 1)[0] for m in marks.iterdir()}
    assert len(list(marks.iterdir())) == N_CHUNKS - len(done)  # each missing chunk once
    assert not ran & done
    _assert_same(store, undisturbed)


def test_driver_sigterm_half_way_resumes_only_the_missing_chunks(
    fitted, undisturbed, tmp_path
) -> None:
    store = tmp_path / "s.zarr"
    proc = _sample(fitted, store, tmp_path / "reports", "--resume", delay_s=0.4)
    wait_until(lambda: len(_done(store)) >= 4, proc, what="4 chunks done")
    proc.send_signal(signal.SIGTERM)  # the SLURM walltime
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err  # RunInterrupted
    assert err.strip().splitlines()[-1].endswith("rerun the same command with --resume"), err
    assert store.exists()

    again = _sample(fitted, store, tmp_path / "reports")  # no --resume: refused, store kept
    _, err = again.communicate(timeout=120)
    assert again.returncode != 0 and "--resume" in err.splitlines()[-1], err

    _resume_runs_only_the_rest(fitted, store, tmp_path, undisturbed)

    marks = tmp_path / "marks-finished"
    proc = _sample(fitted, store, tmp_path / "reports", "--resume", mark_dir=marks)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "already finished" in err and "nothing to do" in err, err
    assert not marks.exists()
    _assert_same(store, undisturbed)


def test_driver_sigkilled_half_way_resumes_only_the_missing_chunks(
    fitted, undisturbed, tmp_path
) -> None:
    store = tmp_path / "s.zarr"
    proc = _sample(fitted, store, tmp_path / "reports", delay_s=0.4)
    wait_until(lambda: len(_done(store)) >= 4, proc, what="4 chunks done")
    kill_tree(proc)  # no handler runs: whatever the ledger holds is what is done
    proc.communicate(timeout=60)
    _resume_runs_only_the_rest(fitted, store, tmp_path, undisturbed)


def test_resume_with_other_parameters_is_refused(fitted, tmp_path) -> None:
    store = tmp_path / "s.zarr"
    proc = _sample(fitted, store, tmp_path / "reports", delay_s=0.4)
    wait_until(lambda: len(_done(store)) >= 2, proc, what="2 chunks done")
    kill_tree(proc)
    proc.communicate(timeout=60)
    before = _done(store)
    args = ["predictive", "sample", str(fitted), "--samples", "48", "--with-observations",
            "--chunk-size", "4", "--cpus", "2", "--seed", "8", "--out", str(store), "--resume"]  # fmt: skip
    done = subprocess.run([HPCBATCH, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "cannot resume" in last and "seed 7 -> 8" in last, done.stderr
    assert store.exists() and _done(store) == before  # nothing touched


def test_worker_sigkilled_half_way_gives_the_same_samples(fitted, undisturbed, tmp_path) -> None:

    marks = tmp_path / "marks"
    disturbed = tmp_path / "disturbed.zarr"
    proc = _sample(fitted, disturbed, tmp_path / "reports", delay_s=0.5, mark_dir=marks)
    wait_until(
        lambda: marks.exists() and len(list(marks.iterdir())) >= 5, proc, what="5 chunks started"
    )
    victims = dask_workers(proc.pid)
    assert victims, "no worker process found"
    victims[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "killed" in err.lower() or "died" in err.lower() or "memory" in err.lower(), err
    _assert_same(disturbed, undisturbed)
    assert len(list(marks.iterdir())) > 12  # some chunks ran twice: the kill was real
