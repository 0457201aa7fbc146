"""The third workload, from outside the package: ``examples/embed_workload``.

Installed into this interpreter through its entry point (as a user would:
``pip install -e examples/embed_workload``), then driven only through hpcbatch's
generic commands: ``plan embed``, ``slurm render embed``, ``run embed`` (local run, OOM
split-and-retry, a report), and a driver SIGKILLed mid-run then ``--resume``d.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "embed_workload"
HPCBATCH = [sys.executable, "-m", "hpcbatch.cli"]
N_ARRAYS = 3000
ALLOCATION = ["--cpus", "2", "--mem-gb", "4"]


def _installed() -> bool:
    eps = metadata.entry_points(group="hpcbatch.workloads")
    if not any(ep.name == "embed" for ep in eps):
        return False
    try:
        dist = metadata.distribution("hpcbatch-embed")
    except metadata.PackageNotFoundError:
        return False
    direct = dist.read_text("direct_url.json") or "{}"
    return json.loads(direct).get("url", "").rstrip("/").endswith(EXAMPLE.as_uri()[7:])


@pytest.fixture(scope="session")
def embed_plugin() -> Path:
    """The example package installed (editable, no network, once per environment)."""
    if not _installed():
        pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
               "-q", "-e", str(EXAMPLE)]  # fmt: skip
        # offline and fast with this interpreter's setuptools; a fresh venv's setuptools
        # without `wheel` cannot build an editable: then pip builds it in isolation
        done = subprocess.run([*pip, "--no-build-isolation"], capture_output=True, timeout=300)
        if done.returncode != 0:
            subprocess.run(pip, check=True, capture_output=True, timeout=600)
    src = str(EXAMPLE / "src")
    if src not in sys.path:  # this process started before the install's .pth existed
        sys.path.append(src)
    return EXAMPLE


def hb(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([*HPCBATCH, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, f"hpcbatch {' '.join(args)}:\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def inputs(embed_plugin, tmp_path_factory) -> Path:
    from hpcbatch_embed import make_inputs

    path = tmp_path_factory.mktemp("embed") / "arrays.zarr"
    make_inputs(str(path), N_ARRAYS, length=128, features=16)
    return path


@pytest.fixture(scope="module")
def reference(inputs) -> np.ndarray:
    """The embeddings computed here, in one process, without hpcbatch."""
    import zarr
    from hpcbatch_embed import Embedder

    return Embedder(16, 32, seed=0).embed(zarr.open_array(str(inputs), mode="r")[:])


@pytest.fixture(scope="module")
def clean_run(inputs, tmp_path_factory) -> tuple[Path, dict]:
    """A local run in which every chunk of more than 200 arrays raises MemoryError."""
    work = tmp_path_factory.mktemp("clean")
    out = work / "embeddings.zarr"
    done = hb("run", "embed", "--input", str(inputs), "--output", str(out), "--oom-above", "200",
              *ALLOCATION, "--report-dir", str(work / "reports"), "--json", cwd=work)  # fmt: skip
    return out, json.loads(done.stdout)


def read(out: Path) -> np.ndarray:
    import zarr

    return zarr.open_array(str(out), mode="r")[:]


def test_the_plugin_is_a_workload_of_the_generic_commands(embed_plugin, tmp_path):
    assert "embed " in hb("workloads", cwd=tmp_path).stdout
    plan = json.loads(hb("plan", "embed", "--arrays", "4000", *ALLOCATION, "--json",
                         cwd=tmp_path).stdout)  # fmt: skip
    assert plan["workload"] == "embed" and plan["n_items"] == 4000
    assert plan["item_name"] == "array" and plan["n_workers"] == 2
    assert plan["footprint"]["per_item_bytes"] == 2 * 128 * 16 * 4 + 32 * 4
    assert plan["chunk_size"] * plan["n_chunks"] >= 4000


def test_slurm_render_runs_the_plugin_s_command(embed_plugin, tmp_path):
    script = hb("slurm", "render", "embed", "--arrays", "4000", "--mem-gb", "8", "--cpus", "4",
                "--", "--input", "/scratch/a.zarr", "--output", "/scratch/e.zarr",
                cwd=tmp_path).stdout  # fmt: skip
    assert "#SBATCH --cpus-per-task=4" in script and "#SBATCH --mem=" in script
    assert "run embed --input /scratch/a.zarr --output /scratch/e.zarr --resume" in script
    assert "4000 arrays in" in script


def test_local_run_splits_on_memory_errors_and_reports(clean_run, reference):
    out, report = clean_run
    assert report["status"] == "finished" and report["items_done"] == N_ARRAYS
    assert report["chunks_split"] >= 1 and report["chunks_failed"] == 0
    assert Path(report["report_dir"], "report.json").exists()
    np.testing.assert_array_equal(read(out), reference)  # every array once, the same bits


def test_resume_after_the_driver_is_killed_runs_only_missing_chunks(inputs, clean_run, tmp_path):
    out = tmp_path / "embeddings.zarr"
    args = ["run", "embed", "--input", str(inputs), "--output", str(out), "--chunk-size", "100",
            "--delay", "0.4", *ALLOCATION, "--report-dir", str(tmp_path / "reports")]  # fmt: skip
    driver = subprocess.Popen([*HPCBATCH, *args], cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ledger = tmp_path / "embeddings.zarr.ledger.db"
    try:
        deadline = time.monotonic() + 180
        while _done_chunks(ledger) < 5:
            assert driver.poll() is None and time.monotonic() < deadline, "the run never got going"
            time.sleep(0.2)
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: the scheduler dies with it
        driver.wait(timeout=30)
    finally:
        _kill_group(driver.pid)  # its workers, orphaned
    before = _done_chunks(ledger)
    assert 5 <= before < 30
    done = hb(*args, "--resume", "--json", cwd=tmp_path)
    report = json.loads(done.stdout)
    assert report["status"] == "finished" and report["chunks_skipped"] == before
    assert report["tasks_done"] == 30 - before  # only the missing chunks ran
    assert read(out).tobytes() == read(clean_run[0]).tobytes()  # bit-identical


def _done_chunks(ledger: Path) -> int:
    if not ledger.exists():
        return 0
    try:
        with sqlite3.connect(ledger, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM hpcbatch_chunks").fetchone()[0]
    except sqlite3.OperationalError:  # tables not made yet
        return 0


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.mark.slurm
def test_rendered_embed_job_runs_on_real_slurm(slurm_env, inputs, reference, tmp_path):
    from hpcbatch import slurm

    out, script = tmp_path / "embeddings.zarr", tmp_path / "embed.sbatch"
    hb("slurm", "render", "embed", "--arrays", str(N_ARRAYS), "--mem-gb", "3", "--cpus", "2",
       "--walltime", "00:10:00", "--partition", slurm_env["partition"], "--python",
       sys.executable, "-o", str(script), "--", "--input", str(inputs), "--output", str(out),
       "--report-dir", str(tmp_path / "reports"), cwd=tmp_path)  # fmt: skip
    job = slurm.submit(script, sbatch_args=["--chdir", str(tmp_path)])
    info = slurm.wait_for_job(job, timeout=300)
    log = "".join(p.read_text() for p in tmp_path.glob(f"*{job}*.out"))
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert re.search(rf"run 'embed-\w+' finished: \d+ chunks \({N_ARRAYS} items", log), log
    np.testing.assert_array_equal(read(out), reference)


def test_the_package_does_not_know_the_example_workload():
    """Adding the embed workload needed no file under hpcbatch/: nothing there names it."""
    package = Path(__file__).resolve().parents[1] / "hpcbatch"
    naming = [
        str(p.relative_to(package.parent))
        for p in package.rglob("*")
        if p.is_file() and p.suffix in (".py", ".yaml", ".sbatch")
        and any(word in p.read_text() for word in ("hpcbatch_embed", "EmbedWorkload"))
    ]
    assert naming == []
