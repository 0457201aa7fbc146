"""Project-wide pytest fixtures: real throwaway servers (PostgreSQL, single-node SLURM).

The servers themselves are started and stopped by `tests/services.py`; here they
are session fixtures that skip, printing the reason, where the server truly cannot
be installed or started. Subdirectories may add their own conftest.py.

- `postgres_url`: SQLAlchemy URL of a running PostgreSQL (session). Set
  `HPCBATCH_TEST_POSTGRES_URL` to use an existing server instead of starting one.
- `postgres_db_url`: a fresh, empty database on that server per test (dropped after).
- `slurm_cluster_env`: a running munged + slurmctld + slurmd (session); a dict with
  `SLURM_CONF`, `env` (os.environ plus SLURM_CONF), `partition`, `dir`, `node`, ...
- `slurm_multinode_env`: 3 slurmd on this host plus accounting (slurmdbd + MariaDB),
  started the first time a test asks for it (session); `slurm_mn` sets its SLURM_CONF.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import services  # noqa: E402  (tests/ is not a package)
from browser import browser  # noqa: E402, F401  (the `browser` fixture, tests/browser.py)


def _skip_or_fail(reason: str) -> None:
    """Skip with the reason; fail instead when HPCBATCH_REQUIRE_SERVICES=1 (CI can demand them)."""
    if os.environ.get("HPCBATCH_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required test service unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """`postgresql+psycopg://postgres@127.0.0.1:PORT/postgres` of a throwaway server."""
    external = os.environ.get("HPCBATCH_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    server = services.PostgresServer()
    try:
        server.start()
    except (services.ServiceUnavailable, OSError, services.subprocess.SubprocessError) as e:
        print(f"\nPostgreSQL unavailable: {e}", file=sys.stderr)
        _skip_or_fail(f"PostgreSQL unavailable: {e}")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def postgres_db_url(postgres_url: str) -> Iterator[str]:
    """A fresh empty database (unique name) on the session server, dropped after the test."""
    name, url = services.create_database(postgres_url)
    try:
        yield url
    finally:
        services.drop_database(postgres_url, name)


@pytest.fixture(scope="session")
def slurm_cluster_env() -> Iterator[dict]:
    """A running single-node SLURM (munged, slurmctld, slurmd) for this session.

    Yields a dict: `SLURM_CONF` (path), `env` (os.environ without outer SLURM_* plus
    SLURM_CONF, for subprocess calls), `dir`, `partition`, `node`, `cpus`,
    `real_memory_mb`, `jobcomp` (the job completion file), `pids`. Client commands
    and dask-jobqueue need SLURM_CONF in os.environ: use the `slurm_env` fixture.
    """
    cluster = services.SlurmTestCluster(real_memory_mb=8000)
    try:
        cluster.start()
    except (services.ServiceUnavailable, OSError, services.subprocess.SubprocessError) as e:
        print(f"\nSLURM unavailable: {e}", file=sys.stderr)
        _skip_or_fail(f"SLURM unavailable: {e}")
    try:
        yield cluster.info()
    finally:
        cluster.stop()


@pytest.fixture
def slurm_env(slurm_cluster_env: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """`slurm_cluster_env` with SLURM_CONF set (and outer SLURM_* removed) in os.environ."""
    return _use_slurm(slurm_cluster_env, monkeypatch)


def _use_slurm(info: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_CONF", info["SLURM_CONF"])
    return info


@pytest.fixture(scope="session")
def slurm_multinode_env() -> Iterator[dict]:
    """A 3-node SLURM with accounting (munged, slurmctld, 3 slurmd on this host, slurmdbd
    and a private MariaDB) for this session: `sacct` works. Memory is enforced by the
    cgroup v1 plugins where they can work here (a memory kill is OUT_OF_MEMORY), else by
    jobacct_gather (FAILED 0:9); `cgroup` says which. Nodes of 2 CPUs (this host's) and
    6000 MB each, SlurmdTimeout=10 (a dead node is DOWN after 25-30 s).

    The dict is `slurm_cluster_env`'s plus `nodes` (their names), `cluster`, `accounting`,
    `cgroup` and `cluster_obj` (the :class:`services.SlurmTestCluster`: `kill_node(name)`,
    `start_slurmd(name)`, `node_state(name)`, `run(*argv)`).
    """
    cluster = services.SlurmTestCluster(
        real_memory_mb=6000,
        nodes=3,
        accounting=True,
        cgroup=services.cgroup_v1_writable(),
        slurmd_timeout=10,
    )
    try:
        cluster.start()
    except (services.ServiceUnavailable, OSError, services.subprocess.SubprocessError) as e:
        print(f"\nmulti-node SLURM unavailable: {e}", file=sys.stderr)
        _skip_or_fail(f"multi-node SLURM with accounting unavailable: {e}")
    try:
        yield cluster.info()
    finally:
        cluster.stop()


@pytest.fixture
def slurm_mn(slurm_multinode_env: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """`slurm_multinode_env` with its SLURM_CONF set (outer SLURM_* removed) in os.environ."""
    return _use_slurm(slurm_multinode_env, monkeypatch)


SUMMARY_MARKERS = ("slow", "slurm", "postgres", "gpu", "browser")
SUMMARY_OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Print how many tests of each marker ran, passed and skipped (CI never skips silently)."""
    counts = {m: dict.fromkeys(SUMMARY_OUTCOMES, 0) for m in (*SUMMARY_MARKERS, "unmarked")}
    for outcome in SUMMARY_OUTCOMES:
        seen: set[str] = set()
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if nodeid in seen or not hasattr(report, "keywords"):
                continue
            seen.add(nodeid)
            marks = [m for m in SUMMARY_MARKERS if m in report.keywords] or ["unmarked"]
            for mark in marks:
                counts[mark][outcome] += 1
    terminalreporter.section("tests per marker")
    for mark, by in counts.items():
        shown = ", ".join(f"{n} {o}" for o, n in by.items() if n or o in ("passed", "skipped"))
        terminalreporter.write_line(f"{mark}: {shown}")
    required = os.environ.get("HPCBATCH_REQUIRE_SERVICES") == "1"
    terminalreporter.write_line(
        "HPCBATCH_REQUIRE_SERVICES=1: a SLURM/PostgreSQL/tmpfs/browser fixture that can't start fails"
        if required
        else "HPCBATCH_REQUIRE_SERVICES unset: a service that cannot start skips its tests"
    )
