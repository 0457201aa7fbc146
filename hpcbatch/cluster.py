"""Open a Dask cluster for a :class:`~hpcbatch.planner.Plan` and hand back a client.

Owns :func:`open_cluster` with three backends:

- ``local``: a ``LocalCluster`` of the plan's worker processes, each with the plan's
  ``memory_limit`` (the default everywhere, and the right choice inside one
  single-node ``sbatch`` allocation);
- ``slurm``: a ``dask_jobqueue.SLURMCluster`` built by :func:`hpcbatch.slurm.slurm_cluster`
  from the plan, scaled to ``cluster.jobs`` jobs or adaptive up to ``cluster.adapt-maximum``;
- ``address``: an existing scheduler (``tcp://host:8786`` or a scheduler file).

Dask's memory thresholds (target/spill/pause/terminate) come from the plan (which
takes them from hpcbatch config) and are set before the scheduler and workers
start; ``distributed.scheduler.allowed-failures`` is lowered so a chunk that kills
its workers for memory comes back quickly as ``KilledWorker`` and the runner can
split it.  On start it prints the dashboard link and, on a cluster node, the SSH
tunnel line to reach it from a laptop.  A cluster that cannot start, a queue that
gives no workers within ``cluster.start-timeout``, or an unreachable scheduler is a
:class:`ClusterStartError`, never a hang.  It does not plan (the planner does).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

import dask.config

from .errors import ClusterStartError, ConfigError
from .planner import Plan
from .security import cluster_security

BACKENDS = ("local", "slurm", "address")


def dask_memory_config(plan: Plan, *, allowed_failures: int | None = 1) -> dict[str, Any]:
    """The ``distributed.*`` settings that enforce the plan's memory thresholds."""
    cfg: dict[str, Any] = {
        f"distributed.worker.memory.{name}": (False if value is False else float(value))
        for name, value in plan.thresholds.items()
    }
    if allowed_failures is not None:
        cfg["distributed.scheduler.allowed-failures"] = int(allowed_failures)
        # one task per thread on a worker: when a worker is killed for memory, only the
        # tasks really running there are suspected (not an innocent one queued behind)
        cfg["distributed.scheduler.worker-saturation"] = 1.0
    return cfg


def tunnel_hint(dashboard_link: str, env: dict | None = None) -> str | None:
    """The SSH line to run on a laptop to reach the dashboard, when on a SLURM node.

    A dashboard bound to the node's loopback is reached by jumping through the login
    node to the compute node; one bound to the node's address directly through the
    login node (``ssh -N -L 8787:NODE:8787 LOGIN``).
    """
    env = dict(os.environ if env is None else env)
    if not any(k in env for k in ("SLURM_JOB_ID", "SLURM_JOBID")):
        return None
    parsed = urlparse(dashboard_link)
    port = parsed.port or 8787
    host = parsed.hostname or "127.0.0.1"
    node = env.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    login = env.get("SLURM_SUBMIT_HOST") or "LOGIN"
    user = env.get("USER")
    login_at = f"{user}@{login}" if user and login != "LOGIN" else login
    if host in ("127.0.0.1", "localhost", "::1"):
        return f"ssh -N -L {port}:localhost:{port} -J {login_at} {node}"
    return f"ssh -N -L {port}:{node}:{port} {login_at}"


@contextmanager
def open_cluster(
    plan: Plan,
    settings: dict | None = None,
    *,
    backend: str | None = None,
    address: str | None = None,
    quiet: bool = False,
    start_timeout: float | None = None,
    allowed_failures: int | None = 1,
    out: TextIO | None = None,
) -> Iterator[Any]:
    """A ``distributed.Client`` on a cluster shaped by ``plan``; closed on exit.

    ``settings`` is the loaded hpcbatch config (:func:`hpcbatch.config.load`); its
    ``cluster`` section supplies the backend, address, start timeout and dashboard
    address unless given here.
    """
    if settings is None:
        from .config import load

        settings = load()
    cluster_cfg = dict(settings.get("cluster") or {})
    backend = backend or cluster_cfg.get("backend") or "local"
    if backend not in BACKENDS:
        raise ConfigError(f"unknown cluster backend {backend!r}: use local, slurm or address")
    timeout = float(
        start_timeout if start_timeout is not None else cluster_cfg.get("start-timeout", 120)
    )
    out = out or sys.stderr
    security = cluster_security(settings)  # None = plain TCP; else TLS for every role
    cfg = dask_memory_config(plan, allowed_failures=allowed_failures)
    if backend == "address":
        cfg.pop("distributed.scheduler.allowed-failures", None)  # not ours to change
        cfg.pop("distributed.scheduler.worker-saturation", None)

    with ExitStack() as stack:
        stack.enter_context(dask.config.set(cfg))
        if backend == "local":
            client = _local(plan, cluster_cfg, timeout, stack, security)
        elif backend == "slurm":
            client = _slurm(plan, settings, cluster_cfg, timeout, stack, out, quiet, security)
        else:
            client = _address(address or cluster_cfg.get("address"), timeout, stack, security)
        # how long the runner lets the cluster have no workers before failing the run
        # (the same patience as for the first workers: a SLURM job may sit in the queue)
        client.hpcbatch_start_timeout_s = timeout  # type: ignore[attr-defined]
        if not quiet:
            _announce(client, backend, plan, out)
        yield client


def _local(plan: Plan, cluster_cfg: dict, timeout: float, stack: ExitStack, security=None):
    from distributed import Client, LocalCluster

    dashboard = cluster_cfg.get("dashboard-address") or "127.0.0.1:8787"
    try:
        cluster = LocalCluster(
            n_workers=plan.n_workers,
            threads_per_worker=plan.threads_per_worker,
            memory_limit=plan.memory_limit_bytes,
            processes=True,
            host="127.0.0.1",
            dashboard_address=dashboard,
            silence_logs=logging.ERROR,
            local_directory=cluster_cfg.get("local-directory"),
            security=security,
        )
    except Exception as exc:  # noqa: BLE001 (anything that stops the cluster starting)
        raise ClusterStartError(
            f"the local Dask cluster ({plan.n_workers} workers x "
            f"{plan.threads_per_worker} threads) did not start: {type(exc).__name__}: {exc}: "
            "check memory and the local-directory, or lower --max-workers"
        ) from None
    stack.callback(_close_quietly, cluster)
    client = Client(cluster, timeout=timeout, security=security)
    stack.callback(_close_quietly, client)
    _wait(client, plan.n_workers, timeout, "the local workers")
    return client


def _slurm(
    plan: Plan,
    settings: dict,
    cluster_cfg: dict,
    timeout: float,
    stack: ExitStack,
    out: TextIO,
    quiet: bool,
    security=None,
):
    from distributed import Client

    try:
        from .slurm import slurm_cluster
    except ImportError as exc:
        raise ClusterStartError(
            f"the SLURM backend is not available ({exc}): install dask-jobqueue"
        ) from None
    try:
        cluster = slurm_cluster(plan, settings, security=security)
    except ClusterStartError:
        raise
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ClusterStartError(
            f"could not create the SLURM cluster: {type(exc).__name__}: {exc}: "
            "check the queue, account and that sbatch works here"
        ) from None
    stack.callback(_close_quietly, cluster)
    adapt_max = cluster_cfg.get("adapt-maximum")
    jobs = int(cluster_cfg.get("jobs") or 1)
    try:
        if adapt_max:
            cluster.adapt(minimum_jobs=1, maximum_jobs=int(adapt_max))
        else:
            cluster.scale(jobs=jobs)
    except Exception as exc:  # noqa: BLE001
        raise ClusterStartError(
            f"could not submit SLURM worker jobs: {type(exc).__name__}: {exc}: "
            "run the printed job script with sbatch by hand to see why"
        ) from None
    if not quiet:
        print(
            f"submitted {'up to ' + str(adapt_max) if adapt_max else jobs} SLURM job(s) of "
            f"{plan.n_workers} workers; waiting up to {timeout:.0f} s for the first worker",
            file=out,
            flush=True,
        )
    client = Client(cluster, timeout=timeout, security=security)
    stack.callback(_close_quietly, client)
    _wait(client, 1, timeout, "SLURM workers (is the queue full? see squeue)")
    return client


def _address(address: str | None, timeout: float, stack: ExitStack, security=None):
    from distributed import Client

    if not address:
        raise ConfigError(
            "backend 'address' needs a scheduler: pass --address tcp://HOST:8786 or a "
            "scheduler file (cluster.address in the config)"
        )
    is_file = not address.startswith(("tcp://", "tls://", "ws://", "wss://", "inproc://", "ucx://"))
    if is_file and not Path(address).is_file():
        raise ConfigError(
            f"scheduler address {address!r} is neither tcp://HOST:PORT nor an existing "
            "scheduler file: check the path"
        )
    try:
        if is_file:
            client = Client(scheduler_file=address, timeout=timeout, security=security)
        else:
            client = Client(address, timeout=timeout, security=security)
    except Exception as exc:  # noqa: BLE001 (OSError, TimeoutError, ...)
        raise ClusterStartError(
            f"cannot reach the Dask scheduler at {address} within {timeout:.0f} s "
            f"({type(exc).__name__}): check that it is running and the address/port"
        ) from None
    stack.callback(_close_quietly, client)
    _wait(client, 1, timeout, f"workers on the scheduler at {address}")
    return client


def _wait(client, n: int, timeout: float, what: str) -> None:
    try:
        client.wait_for_workers(n, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 (TimeoutError, or the cluster failing)
        have = len(client.scheduler_info().get("workers", {})) if client.status == "running" else 0
        raise ClusterStartError(
            f"only {have} of {n} {what} arrived within {timeout:.0f} s "
            f"({type(exc).__name__}): raise cluster.start-timeout or check why workers do "
            "not start (logs, memory)"
        ) from None


def _announce(client, backend: str, plan: Plan, out: TextIO) -> None:
    link = client.dashboard_link
    workers = client.scheduler_info().get("workers", {})
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    limits = {w.get("memory_limit") for w in workers.values()}
    print(
        f"dask {backend} cluster: {len(workers)} workers, {threads} threads, memory limit "
        + ", ".join(_fmt(limit) for limit in sorted(x or 0 for x in limits))
        + " per worker; thresholds "
        + (
            "as configured on the existing workers"
            if backend == "address"
            else ", ".join(f"{k} {v}" for k, v in plan.thresholds.items())
        ),
        file=out,
        flush=True,
    )
    print(f"dashboard: {link}", file=out, flush=True)
    hint = tunnel_hint(link)
    if hint:
        print(
            f"from your laptop: {hint}  then open http://localhost:{urlparse(link).port or 8787}/status",
            file=out,
            flush=True,
        )


def _fmt(n: int) -> str:
    from .units import format_bytes

    return format_bytes(n) if n else "none"


def _close_quietly(obj) -> None:
    with suppress(Exception):  # closing must not hide the run's own error
        obj.close()
