"""Faults during a real posterior predictive run (``hpcbatch predictive sample``).

A worker is SIGKILLed half way (as the kernel OOM killer or SLURM would): the run
finishes and the zarr store equals an undisturbed run's, array for array and bit for
bit (every chunk's seed depends only on the run seed and the chunk id).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import dask_workers, fault_env, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
HPCBATCH = str(Path(sys.executable).with_name("hpcbatch"))
SITES = ("alpha_y", "mu_ntc", "phi_y", "y")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    from hpcbatch.predictive.technical import fit, simulate

    data = tmp_path_factory.mktemp("predictive-faults") / "data"
    simulate(60, 20, 2, seed=0, out=data)
    fit(data, steps=20, seed=0)
    return data


def _sample(data: Path, out: Path, reports: Path, **faults) -> subprocess.Popen:
    args = ["predictive", "sample", str(data), "--samples", "48", "--with-observations",
            "--chunk-size", "4", "--cpus", "2", "--seed", "7", "--out", str(out),
            "--report-dir", str(reports)]  # fmt: skip
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


def test_worker_sigkilled_half_way_gives_the_same_samples(fitted, tmp_path) -> None:
    undisturbed = tmp_path / "undisturbed.zarr"
    proc = _sample(fitted, undisturbed, tmp_path / "reports")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

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
    expected, got = _arrays(undisturbed), _arrays(disturbed)
    for name in SITES:
        assert got[name].shape == expected[name].shape
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert len(list(marks.iterdir())) > 12  # some chunks ran twice: the kill was real
