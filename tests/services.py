"""Throwaway real servers for the test suite: PostgreSQL and a single-node SLURM.

This module owns starting and stopping the servers; `tests/conftest.py` only wraps
them in pytest fixtures. Each server lives in its own temp directory
(`/tmp/hpcbatch-<kind>-*`) on free ports, so two pytest runs never collide. A
directory records the PID of the process that owns it (`owner.pid`); servers left
by a run that died are stopped and their directories removed by the next run.

The daemons run in the foreground as children of the pytest process with a
parent-death signal, so they stop even when pytest is killed with SIGKILL; a port
taken between picking and binding is retried with a fresh one.

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
        raise ServiceUnavailable(
            f"not installed and not root: apt-get install {' '.join(packages)}"
        )
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


def as_user(user: str | None, cmd: list[str], *, die_with_parent: bool = False) -> list[str]:
    """Prefix `cmd` so it runs as `user` (when we are root and a user is given).

    ``die_with_parent``: the daemon gets SIGTERM when the process that started it dies
    (set after the user switch, which would clear a parent-death signal set before it).
    """
    if user and is_root():
        death = ["--pdeathsig", "TERM"] if die_with_parent else []
        return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *death, *cmd]
    return cmd


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the pytest process dies, even by SIGKILL."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data(self) -> Path:
        assert self.dir is not None
        return self.dir / "data"

    def _run(self, cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            as_user(self.user, cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
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
        r = self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        if r.returncode != 0:
            err = r.stderr.strip().splitlines()[-1:] if r.stderr else []
            self.stop()
            raise ServiceUnavailable(f"initdb failed: {' '.join(err)}")
        last = ""
        for _ in range(3):  # a concurrent process may grab the port between pick and bind
            self.port = free_port()
            if self._start_postmaster():
                return self
            last = self.log_tail()
        self.stop()
        raise ServiceUnavailable(f"PostgreSQL did not start: {last}")

    def _start_postmaster(self, timeout: float = 60) -> bool:
        """The postmaster in the foreground, as our child: it gets SIGTERM (a smart
        shutdown) if pytest dies, even by SIGKILL; `stop()` uses pg_ctl as usual."""
        assert self.dir is not None and self.bindir is not None
        cmd = [
            str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
            "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]  # fmt: skip
        log = open(self.dir / "postgres.log", "ab")  # noqa: SIM115 (the server writes it)
        self.proc = subprocess.Popen(
            as_user(self.user, cmd, die_with_parent=True), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=str(self.dir), start_new_session=True,
            preexec_fn=None if self.user else _die_with_parent,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:  # line 8 of postmaster.pid is the server status
                lines = (self.data / "postmaster.pid").read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        stop_pid(self.proc.pid, timeout=5)
        return False

    def log_tail(self, n: int = 3) -> str:
        try:
            return " | ".join((self.dir / "postgres.log").read_text().strip().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.dir is None:
            return
        stop_postgres_dir(self.dir, self.bindir, self.user)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        self.dir = None


def stop_postgres_dir(d: Path, bindir: Path | None, user: str | None) -> None:
    """Fast-stop the server whose data dir is `d/data` (by its PID) and remove `d`."""
    pid = read_pid(d / "data" / "postmaster.pid")
    bindir = bindir or postgres_bindir()
    if pid and pid_alive(pid) and bindir is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                as_user(
                    user,
                    [
                        str(bindir / "pg_ctl"),
                        "-D",
                        str(d / "data"),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        "20",
                        "stop",
                    ],
                ),
                capture_output=True,
                timeout=30,
                cwd="/",
            )
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


# ---------------------------------------------------------------- SLURM

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged", "munge")
ACCOUNTING_BINARIES = ("mariadbd", "mariadb-install-db", "mariadb", "slurmdbd", "sacct", "sacctmgr")

SLURM_CONF_TEMPLATE = """\
# Test cluster written by tests/services.py; everything lives in {dir}
ClusterName={cluster}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}{cred_expire}
SlurmctldPort={ctld_port}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={def_mem_per_cpu}
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/jobcomp.log
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=3
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout={slurmd_timeout}
SchedulerParameters=sched_interval=2
{enforcement}
{accounting}
{nodes}
PartitionName={partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

NODE_LINE = (
    "NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
    "Sockets={sockets} CoresPerSocket={cores} ThreadsPerCore={threads} "
    "RealMemory={real_memory} State=UNKNOWN"
)

#: Memory enforcement: jobacct_gather polling (FAILED 0:9, works everywhere), or the
#: cgroup plugins (the kernel kills at --mem; SLURM's state is OUT_OF_MEMORY).
ENFORCEMENT = {
    False: "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
    "JobAcctGatherParams=OverMemoryKill",
    True: "ProctrackType=proctrack/cgroup\nTaskPlugin=task/cgroup",
}
CGROUP_CONF = """\
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=no
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
"""

MY_CNF = """\
[mariadbd]
datadir={dir}/data
socket={dir}/mysqld.sock
port={port}
bind-address=127.0.0.1
pid-file={dir}/mysqld.pid
log-error={dir}/error.log
user=root
skip-name-resolve
innodb_buffer_pool_size=64M
innodb_log_file_size=16M
innodb_flush_log_at_trx_commit=0
innodb_doublewrite=0
innodb_lock_wait_timeout=900
"""

SLURMDBD_CONF = """\
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
DebugLevel=info
LogFile={dir}/slurmdbd.log
PidFile={dir}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
"""


def slurmd_hardware() -> dict[str, int]:
    """CPUs, Sockets, CoresPerSocket, ThreadsPerCore and RealMemory from `slurmd -C`."""
    r = subprocess.run(
        [_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30
    )
    fields = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
    try:
        cpus = int(fields["CPUs"])
        sockets = int(fields.get("SocketsPerBoard", fields.get("Sockets", 1))) * int(
            fields.get("Boards", 1)
        )
        return {
            "cpus": cpus,
            "sockets": sockets,
            "cores": int(fields.get("CoresPerSocket", cpus)),
            "threads": int(fields.get("ThreadsPerCore", 1)),
            "memory_mb": int(fields.get("RealMemory", 0)),
        }
    except (KeyError, ValueError) as e:
        raise ServiceUnavailable(
            f"cannot read the node's hardware from 'slurmd -C': {r.stdout!r}"
        ) from e


def cgroup_v1_writable() -> bool:
    """Whether SLURM's cgroup plugins can work here (cgroup v1 memory + freezer, writable)."""
    return all(
        os.path.isdir(d) and os.access(d, os.W_OK)
        for d in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/freezer")
    )


class SlurmTestCluster:
    """munged + slurmctld + one or more slurmd in the foreground, in one temp dir on free ports.

    Nodes have unique names per instance (`slurmd -N NAME`, a `Port` each: several
    slurmd on this one host), their own munge socket and key, state and spool dirs, so
    concurrent instances do not see each other. ``accounting=True`` adds a private
    MariaDB and slurmdbd (so `sacct` works); ``cgroup=True`` enforces memory with the
    cgroup v1 plugins (a memory kill is OUT_OF_MEMORY) instead of jobacct_gather's
    OverMemoryKill (FAILED 0:9). `stop()` cancels the jobs, stops the daemons by PID and
    kills any process that still carries this instance's SLURM_CONF (job steps, Dask
    workers).
    """

    def __init__(
        self,
        real_memory_mb: int = 8000,
        partition: str = "debug",
        *,
        nodes: int = 1,
        accounting: bool = False,
        cgroup: bool = False,
        slurmd_timeout: int = 60,
    ) -> None:
        self.real_memory_mb = real_memory_mb
        self.partition = partition
        self.accounting = accounting
        self.cgroup = cgroup
        self.slurmd_timeout = slurmd_timeout
        self.dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.cluster = f"hb{uuid.uuid4().hex[:6]}"
        self.nodes = (
            [self.cluster] if nodes == 1 else [f"{self.cluster}n{i + 1}" for i in range(nodes)]
        )
        self.node = self.nodes[0]
        self.ports: dict[str, int] = {}
        self.host = socket.gethostname().split(".")[0]

    # paths
    @property
    def conf(self) -> Path:
        assert self.dir is not None
        return self.dir / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        assert self.dir is not None
        return self.dir / "munge" / "munge.socket"

    def env(self) -> dict[str, str]:
        """os.environ without any outer SLURM job's variables, plus this SLURM_CONF."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def info(self) -> dict:
        assert self.dir is not None
        return {
            "SLURM_CONF": str(self.conf),
            "env": self.env(),
            "dir": str(self.dir),
            "partition": self.partition,
            "node": self.node,
            "nodes": list(self.nodes),
            "cluster": self.cluster,
            "accounting": self.accounting,
            "cgroup": self.cgroup,
            "real_memory_mb": self.real_memory_mb,
            "cpus": self.hw["cpus"],
            "jobcomp": str(self.dir / "jobcomp.log"),
            "munge_socket": str(self.munge_socket),
            "pids": {name: p.pid for name, p in self.procs.items()},
            "cluster_obj": self,
        }

    def start(self) -> SlurmTestCluster:
        if not is_root():
            raise ServiceUnavailable("starting a test SLURM needs root (slurmd runs jobs as users)")
        apt_install(["slurm-wlm", "munge"], have_binaries(*SLURM_BINARIES))
        if self.accounting:
            apt_install(["mariadb-server", "slurmdbd"], have_binaries(*ACCOUNTING_BINARIES))
        if self.cgroup and not cgroup_v1_writable():
            raise ServiceUnavailable("cgroup v1 memory/freezer not writable here: use cgroup=False")
        try:
            pwd.getpwnam("munge")
        except KeyError as e:
            raise ServiceUnavailable("no 'munge' system user (package munge incomplete)") from e
        cleanup_stale_slurm()
        self.hw = slurmd_hardware()
        self.real_memory_mb = min(self.real_memory_mb, max(1000, self.hw["memory_mb"] // 2))
        self.dir = make_service_dir("slurm")
        (self.dir / "nodes").write_text("\n".join(self.nodes) + "\n")
        try:
            self._start_munge()
            if self.accounting:
                self._start_accounting()
            for attempt in range(3):  # another process may take a port between pick and bind
                self._write_conf()
                try:
                    self._start_slurm()
                    break
                except ServiceUnavailable:
                    if attempt == 2:
                        raise
                    self._stop_slurm_daemons()
        except BaseException:
            self.stop()
            raise
        return self

    def _stop_slurm_daemons(self) -> None:
        for name in [*(f"slurmd-{n}" for n in self.nodes), "slurmctld"]:
            p = self.procs.pop(name, None)
            if p is not None:
                stop_pid(p.pid, timeout=10)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=1)

    def _start_munge(self) -> None:
        assert self.dir is not None
        mdir = self.dir / "munge"
        mdir.mkdir(mode=0o755)  # munged wants o+x on its socket's directory
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        pw = pwd.getpwnam("munge")
        for p in (mdir, key):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        key.chmod(0o400)
        cmd = as_user(
            "munge",
            [
                _which("munged") or "munged",
                "-F",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={mdir / 'munged.log'}",
                f"--pid-file={mdir / 'munged.pid'}",
                f"--seed-file={mdir / 'munged.seed'}",
            ],
            die_with_parent=True,
        )
        self._spawn("munged", cmd)
        self._wait(
            lambda: self.munge_socket.exists(),
            15,
            "munged did not create its socket",
            "munged",
            mdir / "munged.log",
        )
        enc = subprocess.run(
            ["munge", "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=10
        )
        dec = subprocess.run(
            ["unmunge", "-S", str(self.munge_socket)],
            input=enc.stdout,
            capture_output=True,
            timeout=10,
        )
        if dec.returncode != 0:
            raise ServiceUnavailable(f"munge round trip failed: {dec.stderr.decode().strip()}")

    # -- accounting: a private MariaDB and slurmdbd ------------------------------------

    def _start_accounting(self) -> None:
        """mariadbd (own datadir, socket and port) + slurmdbd, and the cluster registered
        with `sacctmgr` before slurmctld starts (else its first jobs are not stored)."""
        assert self.dir is not None
        db = self.dir / "mysql"
        (db / "data").mkdir(parents=True)
        r = subprocess.run(
            [_which("mariadb-install-db") or "mariadb-install-db", "--no-defaults",
             f"--datadir={db / 'data'}", "--user=root",
             "--auth-root-authentication-method=socket", "--skip-test-db"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        if r.returncode != 0:
            tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
            raise ServiceUnavailable(f"mariadb-install-db failed: {tail}")
        for attempt in range(3):
            self.ports["db"] = free_port()
            (db / "my.cnf").write_text(MY_CNF.format(dir=db, port=self.ports["db"]))
            self._spawn("mariadbd", [_which("mariadbd") or "mariadbd",
                                     f"--defaults-file={db / 'my.cnf'}"])  # fmt: skip
            try:
                self._wait(self._db_ready, 60, "mariadbd did not answer", "mariadbd",
                           db / "error.log")  # fmt: skip
                break
            except ServiceUnavailable:
                self._stop_proc("mariadbd")
                if attempt == 2:
                    raise
        sql = ("CREATE DATABASE slurm_acct_db; "
               "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")  # fmt: skip
        r = self._mariadb("-e", sql)
        if r.returncode != 0:
            raise ServiceUnavailable(f"creating the accounting database failed: {r.stderr.strip()}")
        self._start_slurmdbd()

    def _mariadb(self, *args: str, client: str = "mariadb") -> subprocess.CompletedProcess:
        assert self.dir is not None
        return subprocess.run(
            [client, "--no-defaults", "-S", str(self.dir / "mysql" / "mysqld.sock"), "-uroot",
             *args], capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    def _db_ready(self) -> bool:
        return self._mariadb("ping", client="mariadb-admin").returncode == 0

    def _start_slurmdbd(self) -> None:
        assert self.dir is not None
        for attempt in range(3):
            self.ports["dbd"] = free_port({self.ports["db"]})
            conf = self.dir / "slurmdbd.conf"  # slurmdbd reads dirname($SLURM_CONF)/slurmdbd.conf
            conf.write_text(SLURMDBD_CONF.format(
                dir=self.dir, munge_socket=self.munge_socket, dbd_port=self.ports["dbd"],
                db_port=self.ports["db"]))  # fmt: skip
            conf.chmod(0o600)
            self._spawn("slurmdbd", [_which("slurmdbd") or "slurmdbd", "-D"])
            try:
                self._wait(lambda: _listening(self.ports["dbd"]), 60, "slurmdbd did not listen",
                           "slurmdbd", self.dir / "slurmdbd.log")  # fmt: skip
                break
            except ServiceUnavailable:
                self._stop_proc("slurmdbd")
                if attempt == 2:
                    raise
        self._write_conf()  # sacctmgr finds slurmdbd through slurm.conf
        r = self.run("sacctmgr", "-i", "add", "cluster", self.cluster, timeout=60)
        if r.returncode != 0:
            raise ServiceUnavailable(
                f"sacctmgr add cluster failed: {(r.stderr or r.stdout).strip()}"
            )

    # -- slurm.conf and the SLURM daemons ------------------------------------------

    def _write_conf(self) -> None:
        assert self.dir is not None
        for sub in ("state", "spool"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
            (self.dir / sub).mkdir()
        for node in self.nodes:
            (self.dir / "spool" / node).mkdir()
        taken = {self.ports[k] for k in ("db", "dbd") if k in self.ports}
        for name in ("ctld", *self.nodes):
            self.ports[name] = free_port(taken)
            taken.add(self.ports[name])
        hw = self.hw
        nodes = "\n".join(
            NODE_LINE.format(name=n, host=self.host, port=self.ports[n], cpus=hw["cpus"],
                             sockets=hw["sockets"], cores=hw["cores"], threads=hw["threads"],
                             real_memory=self.real_memory_mb)
            for n in self.nodes
        )  # fmt: skip
        accounting = "AccountingStorageType=accounting_storage/none"
        if self.accounting:
            accounting = (
                "AccountingStorageType=accounting_storage/slurmdbd\n"
                "AccountingStorageHost=127.0.0.1\n"
                f"AccountingStoragePort={self.ports['dbd']}\n"
                f"AccountingStoragePass={self.munge_socket}"  # slurmdbd connections' munge
            )
        if self.cgroup:
            (self.dir / "cgroup.conf").write_text(CGROUP_CONF)
        self.conf.write_text(
            SLURM_CONF_TEMPLATE.format(
                dir=self.dir,
                cluster=self.cluster,
                host=self.host,
                munge_socket=self.munge_socket,
                # a requeued job restarts cred_expire + 1 s later (120 s by default)
                cred_expire=",cred_expire=10" if len(self.nodes) > 1 else "",
                ctld_port=self.ports["ctld"],
                slurmd_timeout=self.slurmd_timeout,
                def_mem_per_cpu=min(1024, self.real_memory_mb // max(1, hw["cpus"])),
                enforcement=ENFORCEMENT[self.cgroup],
                accounting=accounting,
                nodes=nodes,
                partition=self.partition,
            )
        )

    def _start_slurm(self) -> None:
        assert self.dir is not None
        conf = str(self.conf)
        self._spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-i", "-f", conf])
        self._wait(
            lambda: self._scontrol_ping(),
            30,
            "slurmctld did not answer",
            "slurmctld",
            self.dir / "slurmctld.log",
        )
        for node in self.nodes:
            self.start_slurmd(node)

    def start_slurmd(self, node: str, timeout: float = 40) -> None:
        """Start (or restart) the slurmd of ``node``; wait until SLURM calls it usable."""
        assert self.dir is not None
        name = f"slurmd-{node}"
        self._spawn(name, [_which("slurmd") or "slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(
            lambda: self.node_state(node) in ("idle", "mixed", "allocated"),
            timeout,
            f"node {node} never became idle",
            name,
            self.dir / f"slurmd-{node}.log",
        )

    def kill_node(self, node: str) -> list[int]:
        """A node dies: SIGKILL its slurmd and every job step on it (slurmstepd and the
        processes under it), by PID. SLURM notices in 25-30 s (NOT_RESPONDING, then DOWN,
        its jobs NODE_FAIL). Returns the PIDs killed."""
        import psutil

        p = self.procs.pop(f"slurmd-{node}")
        victims = [p.pid]
        jobs = self.run("squeue", "-h", "-w", node, "-o", "%i").stdout.split()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if any(cmd.startswith(f"slurmstepd: [{j}.") for j in jobs):
                with contextlib.suppress(psutil.Error):
                    victims += [proc.pid, *(c.pid for c in proc.children(recursive=True))]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)
        return victims

    def _spawn(self, name: str, cmd: list[str]) -> None:
        assert self.dir is not None
        out = open(self.dir / f"{name}.stdout", "ab")  # noqa: SIM115 (lives with the daemon)
        self.procs[name] = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            cwd=str(self.dir),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        out.close()
        with open(self.dir / "pids", "a") as f:
            f.write(f"{name} {self.procs[name].pid}\n")

    def _stop_proc(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None:
            stop_pid(p.pid, timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1)

    def _wait(
        self, ok: Callable[[], bool], timeout: float, what: str, proc: str, log: Path
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.procs[proc].poll() is None:
            if ok():
                return
            time.sleep(0.2)
        code = self.procs[proc].poll()
        proc_state = "still running" if code is None else f"exited with {code}"
        tail = ""
        for f in (log, log.with_name(f"{proc}.stdout")):
            with contextlib.suppress(OSError):
                tail += " | ".join(f.read_text(errors="replace").strip().splitlines()[-3:])
        raise ServiceUnavailable(f"{what} ({proc} {proc_state}): {tail}")

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(
            list(args), env=self.env(), capture_output=True, text=True, timeout=timeout
        )

    def _scontrol_ping(self) -> bool:
        try:
            return "UP" in self.run("scontrol", "ping", timeout=10).stdout
        except subprocess.TimeoutExpired:
            return False

    def node_state(self, node: str | None = None) -> str:
        """The node's state in sinfo (``idle``, ``down`` ...; ``*`` etc. stripped)."""
        try:
            r = self.run("sinfo", "-h", "-N", "-n", node or self.node, "-o", "%T", timeout=10)
        except subprocess.TimeoutExpired:
            return ""
        return r.stdout.strip().rstrip("*~#")

    def stop(self) -> None:
        if self.dir is None:
            return
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self.run("scancel", "--full", f"--partition={self.partition}", timeout=10)
                deadline = time.monotonic() + 8
                while (
                    time.monotonic() < deadline
                    and self.run("squeue", "-h", "-o", "%i", timeout=10).stdout.strip()
                ):
                    time.sleep(0.3)
        for name in [*(f"slurmd-{n}" for n in self.nodes), "slurmctld", "slurmdbd", "mariadbd",
                     "munged"]:  # fmt: skip
            self._stop_proc(name)
        stop_slurm_dir(self.dir)
        self.dir = None


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_with_env(var: str, value: str) -> list[int]:
    """PIDs whose environment has var=value exactly (job steps and workers of a cluster)."""
    needle = f"{var}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _remove_node_cgroups(nodes: list[str]) -> None:
    """The cgroup plugins leave /sys/fs/cgroup/<controller>/slurm_<node>: remove them."""
    for node in nodes:
        for top in glob.glob(f"/sys/fs/cgroup/*/slurm_{node}"):
            for sub, _dirs, _files in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
                with contextlib.suppress(OSError):
                    os.rmdir(sub)


def stop_slurm_dir(d: Path) -> None:
    """Stop every process of the instance in `d` (daemons by recorded PID, then its jobs)."""
    with contextlib.suppress(OSError):
        for line in (d / "pids").read_text().splitlines():
            name, pid = line.split()
            stop_pid(int(pid), timeout=10)
    for pid in processes_with_env("SLURM_CONF", str(d / "slurm.conf")):
        stop_pid(pid, timeout=3)
    with contextlib.suppress(OSError):
        _remove_node_cgroups((d / "nodes").read_text().split())
    shutil.rmtree(d, ignore_errors=True)


def cleanup_stale_slurm() -> None:
    for d in stale_service_dirs("slurm"):
        stop_slurm_dir(d)
