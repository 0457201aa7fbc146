"""Fail fast and truthfully (issue 16): each mistake is named in one line, in seconds.

- a scheduler address where nothing listens fails at once (a refusal is known at once),
  while a scheduler that accepts but is slow to answer keeps the start timeout;
- a stale scheduler file (its scheduler has stopped) fails at once, naming the file;
- ``--model FILE`` says it is a file, not a model directory;
- a user script that starts local workers at its top level, without
  ``if __name__ == "__main__":``, is refused in one line naming the guard before any
  worker starts (no flood of multiprocessing tracebacks), for ``hpcbatch.map`` and
  ``hpcbatch.predictive.sample`` alike; the guarded script runs;
- a failing ``sbatch`` under ``--cluster slurm`` (a bad partition) is one line with
  sbatch's own message within 10 s, not tracebacks and the start timeout.

Real sockets, real scripts in real processes, the real SLURM of tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from hpcbatch.cluster import _address, _inside_main_guard
from hpcbatch.errors import ClusterStartError, DataError

GUARD = 'if __name__ == "__main__":'


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound by the kernel, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_address(address: str, timeout: float) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(ClusterStartError) as info, ExitStack() as stack:
        _address(address, timeout, stack)
    return str(info.value), time.monotonic() - t0


# ------------------------------------------------------------- scheduler address ----


def test_a_refused_scheduler_address_fails_within_10_s_not_the_start_timeout() -> None:
    port = closed_port()
    message, took = timed_address(f"tcp://127.0.0.1:{port}", timeout=120)
    assert took < 10, f"took {took:.1f} s"
    assert "\n" not in message
    assert f"tcp://127.0.0.1:{port}: nothing listens there (connection refused)" in message
    assert "start the scheduler" in message


def test_a_stale_scheduler_file_fails_within_10_s_naming_the_file(tmp_path: Path) -> None:
    port = closed_port()
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"address": f"tcp://127.0.0.1:{port}"}))
    message, took = timed_address(str(scheduler_file), timeout=120)
    assert took < 10, f"took {took:.1f} s"
    assert f"scheduler file {scheduler_file} names tcp://127.0.0.1:{port}" in message
    assert "connection refused" in message


def test_a_scheduler_that_accepts_but_does_not_answer_keeps_the_start_timeout() -> None:
    with socket.socket() as listener:  # the kernel accepts; nobody ever answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        message, took = timed_address(f"tcp://127.0.0.1:{port}", timeout=5)
    # the handshake is bounded too: before, a listener that never answered hung for ever
    assert 4.5 <= took < 10, f"gave up after {took:.1f} s (start timeout 5 s)"
    assert "refused" not in message
    assert "within 5 s" in message


# ------------------------------------------------------------------------ model ----


def test_a_model_path_that_is_a_file_is_named_as_a_file(tmp_path: Path) -> None:
    from hpcbatch.stocks.model import load_model

    path = tmp_path / "notamodel.txt"
    path.write_text("not a model\n")
    with pytest.raises(DataError, match=r"notamodel.txt is a file, not a model directory"):
        load_model(path)
    with pytest.raises(DataError, match=r"model directory .*nosuch does not exist"):
        load_model(tmp_path / "nosuch")


# -------------------------------------------------------------- __main__ guard ----


@pytest.mark.parametrize(
    ("source", "line", "inside"),
    [
        (f"import x\n{GUARD}\n    x.run()\n", 3, True),
        (
            "import x\nif '__main__' == __name__:\n    try:\n        x.run()\n    finally:\n        pass\n",
            4,
            True,
        ),
        ("import x\nx.run()\n", 2, False),
        (f"import x\nx.run()\n{GUARD}\n    pass\n", 2, False),
        ("import x\nif __name__ == '__main__':\n    pass\nelse:\n    x.run()\n", 5, False),
        ("import x\nif __name__ != '__main__':\n    x.run()\n", 3, False),
        ("def broken(:\n", 1, True),  # unparsable: never refuse on a guess
    ],
)
def test_the_guard_is_found_in_the_script_source(
    tmp_path: Path, source: str, line: int, inside: bool
) -> None:
    script = tmp_path / "s.py"
    script.write_text(source)
    assert _inside_main_guard(str(script), line) is inside


MAP_BODY = """
import hpcbatch


def square(x):
    return x * x


"""
MAP_CALL = "print('sum', sum(hpcbatch.map(square, range(20), per_item=True, progress=False)))\n"

SAMPLE_BODY = """
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal

import hpcbatch.predictive


def model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


x = torch.zeros(3)
guide = AutoNormal(model)
guide(x)
"""
# cluster="cluster": this small job would otherwise run in-process (cluster="auto"), where
# no worker starts and no guard is needed (test_a_small_unguarded_sample_runs_in_process)
SAMPLE_CALL = (
    "draws = hpcbatch.predictive.sample(model, guide=guide, num_samples=8, model_args=(x,),"
    " return_sites=['mu'], cluster='cluster')\n"
)


def run_script(tmp_path: Path, text: str, timeout: float = 240) -> tuple[int, str, float]:
    script = tmp_path / "user_script.py"
    script.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "HPCBATCH_"))}
    env.update({"DASK_CONFIG": str(tmp_path / ".dask-config"), "PYTHONWARNINGS": "ignore"})
    t0 = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.returncode, result.stdout + result.stderr, time.monotonic() - t0


@pytest.mark.parametrize(
    ("body", "call"),
    [(MAP_BODY, MAP_CALL), (SAMPLE_BODY, SAMPLE_CALL)],
    ids=["hpcbatch.map", "predictive.sample"],
)
def test_an_unguarded_script_is_refused_in_one_line_naming_the_guard(
    tmp_path: Path, body: str, call: str
) -> None:
    code, output, took = run_script(tmp_path, textwrap.dedent(body) + call)
    lines = output.strip().splitlines()
    assert code != 0, output
    assert took < 60, f"took {took:.1f} s"
    last = lines[-1]
    assert last.startswith("hpcbatch.errors.ConfigError: "), output
    assert "user_script.py line " in last and GUARD in last, last
    assert "'spawn'" in last or "'forkserver'" in last, last
    # the user's own traceback only: no worker started, so no multiprocessing flood
    assert len(lines) < 50, output
    for noise in ("bootstrapping", "Nanny", "multiprocessing/spawn.py", "--max-workers"):
        assert noise not in output, output


def test_a_small_unguarded_sample_runs_in_process(tmp_path: Path) -> None:
    call = SAMPLE_CALL.replace(", cluster='cluster'", "") + "print('mu', tuple(draws['mu'].shape))\n"
    code, output, took = run_script(tmp_path, textwrap.dedent(SAMPLE_BODY) + call)
    assert code == 0, output
    assert "mu (8" in output, output
    assert "bootstrapping" not in output and "Nanny" not in output, output


@pytest.mark.slow
def test_the_same_script_with_the_guard_runs(tmp_path: Path) -> None:
    code, output, _ = run_script(tmp_path, textwrap.dedent(MAP_BODY) + GUARD + "\n    " + MAP_CALL)
    assert code == 0, output
    assert "sum 2470" in output


# ------------------------------------------------------------------------ sbatch ----


@pytest.mark.slurm
def test_a_failing_sbatch_is_one_line_with_sbatchs_message_within_10_s(
    slurm_env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpcbatch import config as hb_config
    from hpcbatch.cluster import open_cluster
    from hpcbatch.planner import Footprint, make_plan
    from hpcbatch.resources import detect_resources

    monkeypatch.chdir(tmp_path)
    settings = hb_config.load()
    settings["cluster"].update(
        {"queue": "nosuchpartition", "interface": "lo", "dashboard-address": ":0"}
    )
    footprint = Footprint(
        workload="sbatchtest",
        item_name="item",
        n_items=8,
        per_item_bytes=2**20,
        baseline_bytes=150 * 2**20,
    )
    res = detect_resources(memory_bytes=600 * 10**6, cpus=1, plan_ahead=True)
    plan = make_plan(footprint, res, hb_config.plan_settings(settings, chunk_size=4))
    t0 = time.monotonic()
    with (
        pytest.raises(ClusterStartError) as info,
        open_cluster(plan, settings, backend="slurm", quiet=True, start_timeout=120),
    ):
        pass
    took = time.monotonic() - t0
    message = str(info.value)
    assert took < 10, f"took {took:.1f} s"
    assert "\n" not in message
    assert message.startswith("sbatch refused the SLURM worker job (")
    assert "invalid partition" in message.lower(), message  # sbatch's own words
    assert "is the queue full" not in message


@pytest.mark.slurm
def test_a_failing_sbatch_in_the_cli_is_one_error_line_within_10_s(
    slurm_env: dict, tmp_path: Path
) -> None:
    from hpcbatch.predictive.technical import fit, simulate

    simulate(30, 5, 2, seed=0, out=tmp_path / "data")
    fit(tmp_path / "data", steps=5, seed=0)
    (tmp_path / "c.yaml").write_text(
        "hpcbatch:\n  cluster:\n    queue: nosuchpartition\n    interface: lo\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "HPCBATCH_"))}
    env.update({"DASK_CONFIG": str(tmp_path / ".dask-config"), "PYTHONWARNINGS": "ignore"})
    env.update(slurm_env["env"])
    hpcbatch = str(Path(sys.executable).with_name("hpcbatch"))
    argv = [hpcbatch, "predictive", "sample", "data", "--samples", "4", "--out", "s.zarr"]
    argv += ["--cluster", "slurm", "--config", "c.yaml", "--mem", "2GiB", "--cpus", "1"]
    t0 = time.monotonic()
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    lines = r.stderr.strip().splitlines()
    shown = f"exit {r.returncode} after {took:.1f} s\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.returncode == 1, shown
    assert took < 10, shown
    assert "Traceback" not in r.stdout + r.stderr, shown
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], shown
    assert "sbatch refused the SLURM worker job" in errors[0], shown
    assert "invalid partition" in errors[0].lower(), shown
