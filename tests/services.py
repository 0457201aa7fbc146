"""Throwaway real servers for the test suite: PostgreSQL and a single-node SLURM.

This module owns starting and stopping the servers; `tests/conftest.py` only wraps
them in pytest fixtures. Each server lives in its own temp directory
(`/tmp/hpcbatch-<kind>-*`) on free ports, so two pytest runs never collide. A
directory records the PID of the process that owns it (`owner.pid`); servers left
by a run that died are stopped and their directories removed by the next run.

Missing Debian packages are installed with apt-get under a file lock (two
concurrent runs must not both run dpkg). Anything that cannot be installed or
started raises `ServiceUnavailable` with the reason, and the fixtures skip with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_ROOT = Path(tempfile.gettempdir())
APT_LOCK = TMP_ROOT / "hpcbatch-apt.lock"


class ServiceUnavailable(RuntimeError):
    """A test server cannot be installed or started here (the reason is the message)."""


# ---------------------------------------------------------------- generic helpers


def free_port(exclude: set[int] | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it)."""
    exclude = exclude or set()
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise ServiceUnavailable("no free TCP port found on 127.0.0.1")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return False
    except (OSError, IndexError):
        return False
    return True


def stop_pid(pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal one process by its PID and wait until it is gone (SIGKILL after timeout)."""
    if pid <= 0 or not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def is_root() -> bool:
    return os.geteuid() == 0


def apt_install(packages: list[str], present: Callable[[], bool]) -> None:
    """apt-get install `packages` unless `present()` already holds (root only, file-locked)."""
    if present():
        return
    if not is_root():
        raise ServiceUnavailable(f"not installed and not root: apt-get install {' '.join(packages)}")
    if not shutil.which("apt-get"):
        raise ServiceUnavailable(f"{' '.join(packages)} not installed and no apt-get here")
    with open(APT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if present():  # another run installed them while we waited for the lock
            return
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        ):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                raise ServiceUnavailable(f"{' '.join(cmd)} failed: {' | '.join(tail)}")
    if not present():
        raise ServiceUnavailable(f"apt-get installed {packages} but they are still not usable")


def have_binaries(*binaries: str) -> Callable[[], bool]:
    return lambda: all(_which(b) for b in binaries)


def _which(binary: str) -> str | None:
    if os.path.isabs(binary):
        return binary if os.access(binary, os.X_OK) else None
    return shutil.which(binary) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{binary}", os.X_OK)), None
    )


def make_service_dir(kind: str, owner_user: str | None = None) -> Path:
    """A fresh `/tmp/hpcbatch-<kind>-XXXX` dir owned by `owner_user`, recording our PID."""
    d = Path(tempfile.mkdtemp(prefix=f"hpcbatch-{kind}-", dir=TMP_ROOT))
    (d / "owner.pid").write_text(f"{os.getpid()}\n")
    if owner_user and is_root():
        pw = pwd.getpwnam(owner_user)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    d.chmod(0o755)
    return d


def stale_service_dirs(kind: str) -> Iterator[Path]:
    """Dirs of `kind` whose owning pytest process is gone (left by a crashed run)."""
    for p in glob.glob(str(TMP_ROOT / f"hpcbatch-{kind}-*")):
        d = Path(p)
        owner = read_pid(d / "owner.pid")
        if owner is None:
            # Just created by a concurrent run that has not written owner.pid yet?
            with contextlib.suppress(OSError):
                if time.time() - d.stat().st_mtime < 60:
                    continue
        elif pid_alive(owner):
            continue
        yield d


def as_user(user: str | None, cmd: list[str]) -> list[str]:
    """Prefix `cmd` so it runs as `user` (when we are root and a user is given)."""
    if user and is_root():
        return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *cmd]
    return cmd


# ---------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> Path | None:
    """The newest `/usr/lib/postgresql/<major>/bin` with initdb and pg_ctl, if any."""
    cands = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return Path(cands[-1]).parent if cands else None


class PostgresServer:
    """A PostgreSQL server in its own temp dir on a free 127.0.0.1 port.

    `start()` installs the Debian package if needed, runs initdb (as the `postgres`
    user when we are root: initdb refuses root) and starts the server with fsync off;
    `stop()` does a fast shutdown and removes the directory.
    """

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.port: int | None = None
        self.bindir: Path | None = None
        self.user = "postgres" if is_root() else None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data(self) -> Path:
        assert self.dir is not None
        return self.dir / "data"

    def _run(self, cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            as_user(self.user, cmd), capture_output=True, text=True, timeout=timeout,
            cwd=str(self.dir or "/"),
        )

    def start(self) -> PostgresServer:
        cleanup_stale_postgres()
        apt_install(["postgresql"], lambda: postgres_bindir() is not None)
        self.bindir = postgres_bindir()
        if self.bindir is None:
            raise ServiceUnavailable("PostgreSQL binaries not found under /usr/lib/postgresql")
        if self.user:
            try:
                pwd.getpwnam(self.user)
            except KeyError as e:
                raise ServiceUnavailable("no 'postgres' system user to run initdb as") from e
        self.dir = make_service_dir("pg", self.user)
        r = self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust",
                       "-U", "postgres", "-E", "UTF8", "--no-sync"])
        if r.returncode != 0:
            err = r.stderr.strip().splitlines()[-1:] if r.stderr else []
            self.stop()
            raise ServiceUnavailable(f"initdb failed: {' '.join(err)}")
        last = ""
        for _ in range(3):  # a concurrent process may grab the port between pick and bind
            self.port = free_port()
            opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                    "-c max_connections=200")
            r = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts,
                           "-l", str(self.dir / "postgres.log"), "-w", "-t", "60", "start"])
            if r.returncode == 0:
                return self
            last = self.log_tail()
        self.stop()
        raise ServiceUnavailable(f"PostgreSQL did not start: {last}")

    def log_tail(self, n: int = 3) -> str:
        try:
            return " | ".join((self.dir / "postgres.log").read_text().strip().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.dir is None:
            return
        stop_postgres_dir(self.dir, self.bindir, self.user)
        self.dir = None


def stop_postgres_dir(d: Path, bindir: Path | None, user: str | None) -> None:
    """Fast-stop the server whose data dir is `d/data` (by its PID) and remove `d`."""
    pid = read_pid(d / "data" / "postmaster.pid")
    bindir = bindir or postgres_bindir()
    if pid and pid_alive(pid) and bindir is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(as_user(user, [str(bindir / "pg_ctl"), "-D", str(d / "data"),
                                          "-m", "fast", "-w", "-t", "20", "stop"]),
                           capture_output=True, timeout=30, cwd="/")
    if pid:
        stop_pid(pid, timeout=5)  # no-op when pg_ctl already stopped it
    shutil.rmtree(d, ignore_errors=True)


def cleanup_stale_postgres() -> None:
    user = "postgres" if is_root() else None
    for d in stale_service_dirs("pg"):
        stop_postgres_dir(d, None, user)


def create_database(server_url: str, prefix: str = "hpcbatch_test") -> tuple[str, str]:
    """CREATE DATABASE with a unique name; returns (name, SQLAlchemy URL)."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, server_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(server_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(_libpq(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _libpq(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)
