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
split it.  A SLURM worker job that ends under a run (``scancel``, the job's memory
kill, a failed node, the walltime) is noticed by :class:`WorkerJobWatch`, explained
from ``scontrol``/``sacct`` (:func:`hpcbatch.slurm.explain_job`) and replaced by a new
job, so the run keeps the number of jobs it asked for (dask-jobqueue alone never
resubmits a lost job).  On start it prints the dashboard link and, on a cluster node, the SSH
tunnel line to reach it from a laptop.  A cluster that cannot start, a queue that
gives no workers within ``cluster.start-timeout``, or an unreachable scheduler is a
:class:`ClusterStartError`, never a hang.  It does not plan (the planner does).
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

import dask.config

from .dashboard import page_url
from .errors import ClusterStartError, ConfigError
from .planner import Plan
from .report import preload_plotting
from .resources import Resources
from .security import cluster_security
from .units import format_bytes

BACKENDS = ("local", "slurm", "address")


def dask_memory_config(
    plan: Plan | None, *, allowed_failures: int | None = 1, worker_profile: bool = False
) -> dict[str, Any]:
    """The ``distributed.*`` settings that enforce the plan's memory thresholds."""
    thresholds = plan.thresholds if plan is not None else {}  # None: an existing cluster's own
    cfg: dict[str, Any] = {
        f"distributed.worker.memory.{name}": (False if value is False else float(value))
        for name, value in thresholds.items()
    }
    if allowed_failures is not None:
        cfg["distributed.scheduler.allowed-failures"] = int(allowed_failures)
        # one task per thread on a worker: when a worker is killed for memory, only the
        # tasks really running there are suspected (not an innocent one queued behind)
        cfg["distributed.scheduler.worker-saturation"] = 1.0
    # Dask's statistical profiler keeps a call tree per second for 1000 s on every worker:
    # worker RSS then grows through a long run (benchmarks/load_stocks.py: +14 % median
    # RSS over 200 chunks, flat without it). Off unless cluster.worker-profile is true;
    # off, the dashboard's Profile page stays empty.
    cfg["distributed.worker.profile.enabled"] = bool(worker_profile)
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
    plan: Plan | None,
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
    if plan is None and backend != "address":
        raise ConfigError(f"a {backend} cluster is shaped by a plan: pass one")
    cfg = dask_memory_config(
        plan,
        allowed_failures=allowed_failures,
        worker_profile=bool(cluster_cfg.get("worker-profile", False)),
    )
    if backend == "address":
        cfg.pop("distributed.scheduler.allowed-failures", None)  # not ours to change
        cfg.pop("distributed.scheduler.worker-saturation", None)

    if settings.get("report-dir"):  # a run's report draws memory.png at its end: the
        preload_plotting()  # plotting import overlaps the wait for the workers instead
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
        else:  # a quiet library call: the link in the log (hpcbatch.progress, INFO)
            logging.getLogger("hpcbatch.progress").info("dashboard: %s", client.dashboard_link)
        yield client


def check_main_guard() -> None:
    """Refuse, in one line, to start local worker processes from an unguarded script.

    Dask starts local workers with multiprocessing ``spawn`` (or ``forkserver``), which
    re-runs the ``__main__`` script in every worker process: a script whose top level
    calls ``hpcbatch.map`` (or any workload) without ``if __name__ == "__main__":``
    would start workers from each worker, ending in hundreds of lines of multiprocessing
    tracebacks.  Found here, before any worker starts: the ``__main__`` module's
    top-level frame on the stack is at a line outside such a guard.
    """
    method = dask.config.get("distributed.worker.multiprocessing-method", "spawn")
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if method not in ("spawn", "forkserver") or not path or not os.path.isfile(path):
        return  # fork re-runs nothing; python -c, a REPL or a notebook has no script
    frame, line = sys._getframe(1), None
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            line = frame.f_lineno
        frame = frame.f_back
    if line is None or _inside_main_guard(path, line):
        return
    raise ConfigError(
        f"{path} line {line} starts Dask worker processes at the script's top level: "
        f"Dask starts them with multiprocessing {method!r}, which re-runs the script in "
        "each worker; put the script's work under 'if __name__ == \"__main__\":'"
    )


def _inside_main_guard(path: str, line: int) -> bool:
    """Whether ``line`` of the Python file ``path`` is in an ``if __name__ == "__main__":``
    body (True also when the file cannot be read or parsed: then nothing is refused)."""
    import ast

    try:
        tree = ast.parse(Path(path).read_bytes(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return True

    def side(e: ast.expr) -> str | None:
        if isinstance(e, ast.Name) and e.id == "__name__":
            return "name"
        return "main" if isinstance(e, ast.Constant) and e.value == "__main__" else None

    def is_main(test: ast.expr) -> bool:
        if not (isinstance(test, ast.Compare) and isinstance(test.ops[0], ast.Eq)):
            return False
        return len(test.ops) == 1 and {side(test.left), side(test.comparators[0])} == {
            "name",
            "main",
        }

    return any(
        isinstance(node, ast.If)
        and is_main(node.test)
        and node.body[0].lineno <= line <= (node.body[-1].end_lineno or node.body[-1].lineno)
        for node in ast.walk(tree)
    )


def _local(plan: Plan, cluster_cfg: dict, timeout: float, stack: ExitStack, security=None):
    from distributed import Client, LocalCluster

    check_main_guard()
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
            "check memory and the local-directory, or lower max-workers in the config"
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
    _sbatch_test_only(cluster.job_script())
    adapt_max = cluster_cfg.get("adapt-maximum")
    jobs = int(cluster_cfg.get("jobs") or 1)
    try:
        if adapt_max:
            # At least adapt_max jobs: Dask's adaptive target counts the tasks the
            # scheduler holds, and the runner keeps only 2 x the present workers' threads
            # in flight, so from one job it never asked for a second (a 3-job driver ran
            # on one). Adaptive still resubmits jobs whose workers retire at --lifetime.
            cluster.adapt(minimum_jobs=int(adapt_max), maximum_jobs=int(adapt_max))
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
    watch = WorkerJobWatch(cluster, out=out)
    watch.start()
    stack.callback(watch.stop)  # stops before the client and the cluster close
    client.hpcbatch_job_watch = watch  # type: ignore[attr-defined]
    return client


def _sbatch_test_only(job_script: str, timeout_s: float = 20.0) -> None:
    """``sbatch --test-only`` of the worker job script: sbatch's own refusal (a bad
    partition, account or limit) in one line at once, instead of dask-jobqueue's
    tracebacks and the start timeout.  Submits nothing; a slurmctld too busy to answer
    within ``timeout_s`` leaves it to the real submission."""
    import shutil
    import subprocess
    import tempfile

    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ClusterStartError(
            "sbatch is not on PATH: run on a SLURM login node (or load its module), "
            "or use --cluster local"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="hpcbatch-worker-") as f:
        f.write(job_script)
        f.flush()
        try:
            r = subprocess.run(
                [sbatch, "--test-only", f.name], capture_output=True, text=True, timeout=timeout_s
            )
        except (subprocess.TimeoutExpired, OSError):
            return
    if r.returncode == 0:
        return
    said = [line.strip() for line in (r.stderr + "\n" + r.stdout).splitlines() if line.strip()]
    why = "; ".join(dict.fromkeys(said[-2:])) or f"exit code {r.returncode}"
    raise ClusterStartError(
        f"sbatch refused the SLURM worker job ({why}): fix the partition, account or "
        "limits (cluster.queue, cluster.account, --mem, --time) or see "
        "'hpcbatch slurm render'"
    )


class WorkerJobWatch:
    """Keeps a dask-jobqueue SLURM cluster at its jobs: a worker job that ended under
    the run is explained and replaced.

    Every ``every_s`` seconds (in a daemon thread) it maps the scheduler's workers to
    their jobs (worker name = job name + group suffix) and, for a job with fewer
    workers than it should have, asks SLURM (:func:`hpcbatch.slurm.job_info`, else
    ``sacct``) whether the job still exists: at once when the job has just lost
    workers, at most every ``ask_every_s`` while it waits in the queue.  A job that has
    ended is explained with :func:`hpcbatch.slurm.explain_job` (``cancelled`` /
    ``memory`` / ``walltime`` / ``node`` ...) and recorded in :attr:`lost`; if its
    workers had connected, a job of a new name is submitted in its place
    (``cluster.scale``): dask-jobqueue on its own keeps the dead job in its spec and
    never resubmits it, so a run whose only job was cancelled would wait for workers
    that never come.  A job that ends before any of its workers connected (a broken
    job script) is replaced at most ``max_failed_starts`` times in a row.
    :meth:`job_of` tells the run report which job a dead worker belonged to.
    """

    def __init__(
        self,
        cluster,
        *,
        every_s: float = 1.0,
        ask_every_s: float = 10.0,
        max_failed_starts: int = 3,
        out: TextIO | None = None,
        node_check_s: float = 600.0,
    ) -> None:
        self.cluster = cluster
        self.node_check_s = node_check_s
        self.every_s = every_s
        self.ask_every_s = ask_every_s
        self.max_failed_starts = max_failed_starts
        self.out = out or sys.stderr
        self.lost: list[dict] = []  # one dict per ended job, in the order found
        self._by_job: dict[str, dict] = {}  # job id -> its entry in lost (handled)
        self._explained: dict[str, dict] = {}  # job id -> explain_job's answer
        self._addresses: dict[str, tuple[str, str | None]] = {}  # address -> (job name, id)
        self._had_workers: set[str] = set()
        self._seen: dict[str, str] = {}  # job id -> job name, of jobs whose workers came
        self._unknown: dict[str, int] = {}
        self._present: dict[str, int] = {}  # job name -> its workers at the last look
        self._asked: dict[str, float] = {}  # job id -> when SLURM was last asked about it
        self._failed_starts = 0
        self._names_used: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hpcbatch-job-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 (a watcher must never take the run down)
                logging.getLogger(__name__).debug("job watch: %s", exc)

    # -- what the cluster has ---------------------------------------------------

    def _snapshot(self) -> tuple[dict, dict, dict]:
        for _ in range(5):  # the cluster's loop may change these dicts as we copy them
            try:
                jobs = dict(self.cluster.workers)
                spec = {k: dict(v) for k, v in self.cluster.worker_spec.items()}
                workers = dict(self.cluster.scheduler_info.get("workers", {}))
                return jobs, spec, workers
            except RuntimeError:
                time.sleep(0.01)
        return {}, {}, {}

    def poll(self) -> None:
        """One look: record which job each worker runs in; find and replace ended jobs."""
        from .slurm import FINISHED_STATES

        with self._lock:
            checking = [e for e in self.lost if "node_check_until" in e]
        for entry in checking:
            self._node_check(entry)
        jobs, spec, workers = self._snapshot()
        job_of_worker = {
            f"{name}{suffix}": name for name, s in spec.items() for suffix in s.get("group", [""])
        }
        present: dict[str, int] = {}
        now = time.time()
        for address, info in workers.items():
            name = job_of_worker.get(str(info.get("name")))
            if name is None:
                continue
            present[name] = present.get(name, 0) + 1
            job_id = getattr(jobs.get(name), "job_id", None)
            with self._lock:
                self._addresses[address] = (name, job_id)
                self._had_workers.add(name)
                if job_id:
                    self._seen[str(job_id)] = name
                for entry in self.lost:
                    if entry.get("replacement") == name and entry.get("replacement_ready") is None:
                        entry["replacement_job_id"] = job_id
                        entry["replacement_ready"] = now
                        entry["replacement_wait_s"] = round(now - entry["time"], 2)
        for name, job in jobs.items():
            job_id = getattr(job, "job_id", None)
            if name not in spec or not job_id or job_id in self._by_job:
                continue
            have, before = present.get(name, 0), self._present.get(name, 0)
            self._present[name] = have
            if have >= len(spec[name].get("group", [""])):
                self._unknown.pop(job_id, None)
                continue
            # a job that just lost workers is asked about at once; one waiting in the
            # queue (or restarting a worker) at most every ask_every_s: spare slurmctld
            if (
                have >= before
                and time.monotonic() - self._asked.get(job_id, -1e9) < self.ask_every_s
            ):
                continue
            self._asked[job_id] = time.monotonic()
            state = _job_state(job_id)
            if state is None:  # forgotten, or slurmctld busy: believe it after three looks
                self._unknown[job_id] = self._unknown.get(job_id, 0) + 1
                if self._unknown[job_id] < 3:
                    continue
                state = "UNKNOWN"
            elif state not in FINISHED_STATES:
                continue
            self._ended(name, job, str(job_id), state)
        self._dropped(jobs, spec)

    def _dropped(self, jobs: dict, spec: dict) -> None:
        """Jobs SpecCluster dropped while their name stays in its spec: their workers were
        lost for ``distributed.deploy.lost-worker-timeout`` (a dead node, a killed job),
        so it cancelled the job and submits the name again; explain them once ended."""
        from .slurm import FINISHED_STATES

        current = {str(getattr(j, "job_id", None)) for j in jobs.values()}
        for job_id, name in list(self._seen.items()):
            if job_id in current:
                continue
            if job_id in self._by_job or name not in spec:  # handled, or scaled down
                del self._seen[job_id]
                continue
            if time.monotonic() - self._asked.get(job_id, -1e9) < 2.0:
                continue
            self._asked[job_id] = time.monotonic()
            state = _job_state(job_id)
            if state is None:
                self._unknown[job_id] = self._unknown.get(job_id, 0) + 1
                if self._unknown[job_id] < 3:
                    continue
                state = "UNKNOWN"
            elif state not in FINISHED_STATES:  # Dask's scancel has not landed yet
                continue
            del self._seen[job_id]
            self._ended(name, None, job_id, state, by_dask=True)

    def _explain(self, job_id: str, state: str) -> dict:
        """Why the ended job ``job_id`` ended (asked once, then remembered)."""
        from .errors import HpcbatchError
        from .slurm import explain_job

        known = self._explained.get(job_id)
        if known is not None:
            return dict(known)
        try:
            death = explain_job(job_id)
            known = {"state": death.state, "reason": death.reason, "detail": death.detail}
        except HpcbatchError as exc:
            known = {"state": state, "reason": "other", "detail": str(exc)}
        self._explained[job_id] = known
        return dict(known)

    def _ended(self, name: str, job, job_id: str, state: str, *, by_dask: bool = False) -> None:
        entry = {
            "job_id": job_id,
            "name": name,
            "time": time.time(),
            **self._explain(job_id, state),
        }
        had_workers = name in self._had_workers
        entry["had_workers"] = had_workers
        if had_workers and entry["reason"] == "cancelled":
            # Dask cancels a job whose workers stayed lost (lost-worker-timeout, 15 s)
            # before SLURM calls a dead node DOWN: watch the node a while (_node_check)
            entry["node_check_until"] = time.monotonic() + self.node_check_s
        with self._lock:
            self.lost.append(entry)
            self._by_job[job_id] = entry
        self._node_check(entry)
        if self._stop.is_set():
            return
        if had_workers:
            self._failed_starts = 0
        else:
            self._failed_starts += 1
            if self._failed_starts > self.max_failed_starts:
                print(
                    f"SLURM worker job {job_id} ended before its workers connected "
                    f"({entry['state']}: {entry['detail']}); not replacing it "
                    f"({self.max_failed_starts} such jobs in a row): see its output file",
                    file=self.out,
                    flush=True,
                )
                return
        why = f"{entry['state']} -> {entry['reason']}: {entry['detail']}"
        if entry["reason"] == "completed":  # its workers retired: Dask's lifetime option
            why = f"{entry['state']}: its workers retired at their lifetime, before the walltime"
        if by_dask:  # SpecCluster submits the same name again: that job is the replacement
            with self._lock:
                entry["replacement"], entry["replacement_ready"] = name, None
            print(f"\nSLURM worker job {job_id} ended ({why}) after its workers were lost: "
                  "Dask submitted a replacement job", file=self.out, flush=True)  # fmt: skip
            return
        print(
            f"\nSLURM worker job {job_id} ended ({why}): submitting a replacement job",
            file=self.out,
            flush=True,
        )
        self.cluster.loop.add_callback(self._replace, name, job, entry)

    def _node_check(self, entry: dict) -> None:
        """A cancelled job that had lost its workers: if SLURM now calls its node down or
        not responding, the reason is ``node`` (the entry and the explanation change)."""
        from .slurm import job_info, node_trouble, sacct_record

        until = entry.get("node_check_until")
        if until is None or time.monotonic() - entry.get("node_checked", -1e9) < 2.0:
            return
        entry["node_checked"] = time.monotonic()
        if "nodes" not in entry:
            fields = job_info(entry["job_id"]) or sacct_record(entry["job_id"]) or {}
            entry["nodes"] = fields.get("NodeList", "")
        trouble = node_trouble(entry["nodes"])
        if trouble is None:
            if time.monotonic() > until:
                entry.pop("node_check_until", None)
            return
        detail = (
            f"node {trouble}: its workers were lost, then Dask cancelled the job "
            "(distributed.deploy.lost-worker-timeout)"
        )
        with self._lock:
            entry.update(reason="node", detail=detail)
            entry.pop("node_check_until", None)
            self._explained[entry["job_id"]] = {
                "state": entry["state"], "reason": "node", "detail": detail
            }  # fmt: skip
        print(f"SLURM worker job {entry['job_id']} was lost with its {detail}", file=self.out,
              flush=True)  # fmt: skip

    def _replace(self, name: str, job, entry: dict) -> None:
        """On the cluster's event loop: drop the dead job from the spec, scale back up."""
        from distributed.core import Status

        cluster = self.cluster
        if cluster.status != Status.running or cluster.workers.get(name) is not job:
            return
        if name not in cluster.worker_spec:
            return  # scaled down on purpose (adaptive)
        n_jobs = len(cluster.worker_spec)
        self._names_used.update(cluster.worker_spec)
        del cluster.worker_spec[name]
        del cluster.workers[name]
        # a name never used before: SpecCluster would reuse the dead job's, and its own
        # lost-worker timer for that name could then cancel the replacement
        i = 0
        while (new := cluster._new_worker_name(i)) in self._names_used:
            i += 1
        self._names_used.add(new)
        cluster.worker_spec[new] = copy.deepcopy(cluster.new_spec)
        entry["replacement"] = new
        entry["replacement_ready"] = None
        cluster.scale(jobs=n_jobs)  # submits the job now in the spec but not running

    def waiting_replacements(self) -> str | None:
        """One phrase on ended jobs whose replacement has no worker yet, else None."""
        with self._lock:
            waiting = [e for e in self.lost if e.get("replacement_ready", 0) is None]
        if not waiting:
            return None
        ended = ", ".join(f"{e['job_id']} {e['reason']}" for e in waiting)
        return (
            f"SLURM worker job(s) {ended}; the replacement job(s) submitted for them "
            "have not started"
        )

    # -- for the run report ----------------------------------------------------

    def job_of(self, address: str) -> dict | None:
        """The ended SLURM job a (dead) worker ran in: ``job_id``, ``state``, ``reason``,
        ``detail`` (and the replacement's job id and wait); None if the worker's job is
        unknown or still running."""
        from .slurm import FINISHED_STATES

        with self._lock:
            name, job_id = self._addresses.get(address, (None, None))
            entry = self._by_job.get(str(job_id)) if job_id else None
        if job_id is None:
            return None
        if entry is None:  # before the next look (the watch replaces it then): ask now
            if str(job_id) not in self._explained and _job_state(job_id) not in FINISHED_STATES:
                return None
            entry = {"job_id": str(job_id), "name": name, "time": time.time()}
            entry.update(self._explain(str(job_id), ""))
        return dict(entry)


def _job_state(job_id) -> str | None:
    """SLURM's state of a job (``scontrol``, else ``sacct``), e.g. ``CANCELLED``; None if
    SLURM does not know it (or cannot be asked)."""
    from .slurm import job_info, job_state, sacct_record

    fields = job_info(job_id) or sacct_record(job_id)
    return None if fields is None else job_state(fields)


def _address(address: str | None, timeout: float, stack: ExitStack, security=None):
    from distributed import Client

    if not address:
        raise ConfigError(
            "backend 'address' needs a scheduler: pass --cluster tcp://HOST:8786 or a "
            "scheduler file (cluster.address in the config)"
        )
    is_file = not address.startswith(("tcp://", "tls://", "ws://", "wss://", "inproc://", "ucx://"))
    if is_file and not Path(address).is_file():
        raise ConfigError(
            f"scheduler address {address!r} is neither tcp://HOST:PORT nor an existing "
            "scheduler file: check the path"
        )
    _fail_if_refused(address, is_file, min(timeout, REFUSED_GRACE_S), security)
    where = {"scheduler_file": address} if is_file else {"address": address}
    try:
        client = _within(timeout, lambda: Client(**where, timeout=timeout, security=security))
    except Exception as exc:  # noqa: BLE001 (OSError, TimeoutError, ...)
        raise ClusterStartError(
            f"cannot reach the Dask scheduler at {address} within {timeout:.0f} s "
            f"({type(exc).__name__}): check that it is running and the address/port"
        ) from None
    stack.callback(_close_quietly, client)
    _wait(client, 1, timeout, f"workers on the scheduler at {address}")
    return client


def _within(timeout: float, make: Callable[[], Any]) -> Any:
    """``make()``, or TimeoutError when it has not returned after ``timeout`` (+2 s).

    Dask's connect bounds the TCP connect by the timeout but not the handshake after
    it: a scheduler that accepts and never answers (stopped, or not a scheduler) would
    hang the client for ever.  ``make`` runs in a daemon thread, abandoned on timeout.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = make()
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            box["error"] = exc

    thread = threading.Thread(target=target, name="hpcbatch-connect", daemon=True)
    thread.start()
    thread.join(timeout + 2.0)
    if thread.is_alive():
        raise TimeoutError(f"no answer to the Dask handshake within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


REFUSED_GRACE_S = 3.0  # a scheduler just started in the same script may not listen yet


def _fail_if_refused(address: str, is_file: bool, grace_s: float, security=None) -> None:
    """Fail at once (after ``grace_s``) when nothing listens at the scheduler's address.

    Dask's own connect retries a refused connection until the start timeout (120 s);
    a refusal is known at once.  A scheduler that accepts the connection, or is merely
    slow to (no answer within ``grace_s``), is left to the client and the start timeout.
    """
    where = address
    if is_file:  # a stale scheduler file names a scheduler that has stopped
        try:
            import json

            address = str(json.loads(Path(address).read_text())["address"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # not readable yet, or not JSON: the client reports it
    parsed = urlparse(address)
    if parsed.scheme not in ("tcp", "tls") or not parsed.hostname or not parsed.port:
        return
    deadline = time.monotonic() + grace_s
    while True:
        cause = _connect_once(parsed.hostname, parsed.port, grace_s, parsed.scheme, security)
        if cause is None or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    if cause is None:
        return
    named = f"the scheduler file {where} names {address}, where" if is_file else address + ":"
    raise ClusterStartError(
        f"cannot reach the Dask scheduler: {named} {cause}: start the scheduler "
        "(dask scheduler) or check the host and port"
    )


def _connect_once(host: str, port: int, timeout_s: float, scheme: str, security) -> str | None:
    """Why a TCP connection to ``host:port`` is refused at once; None if it is not."""
    try:
        sock = socket.create_connection((host, port), timeout=max(timeout_s, 0.5))
    except ConnectionRefusedError:
        return "nothing listens there (connection refused)"
    except socket.gaierror as exc:
        return f"the host name is unknown ({exc.strerror or exc})"
    except OSError as exc:  # a timeout (slow or filtered) is the start timeout's business
        if isinstance(exc, TimeoutError) or exc.errno is None:
            return None
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return f"the host is unreachable ({exc.strerror})"
        return None
    with sock, suppress(Exception):
        args = security.get_connection_args("client") if security is not None else {}
        ctx = (args or {}).get("ssl_context")
        if scheme == "tls" and ctx is not None:  # complete the handshake: no warning there
            ctx.wrap_socket(sock, server_hostname=host if ctx.check_hostname else None).close()
    return None


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


@contextmanager
def forkserver_workers(preload: Sequence[str]) -> Iterator[None]:
    """Local workers forked from one server that imported ``preload`` (e.g. torch) once.

    Inside the block a LocalCluster starts its workers with multiprocessing
    ``forkserver``: each worker is a fork of a process that already imported the
    workload's heavy modules, so it neither pays for the imports on its first chunk nor
    holds private copies of their pages. The server starts once per driver process, with
    Dask's pre-spawn environment (``OMP_NUM_THREADS=1``, ``MALLOC_TRIM_THRESHOLD_``...),
    which a nanny could not give a forked worker; the driver's environment is restored
    after it started. A server already running keeps its first preload list.
    """
    from multiprocessing import forkserver

    import dask
    from distributed.utils import get_mp_context

    method = {"distributed.worker.multiprocessing-method": "forkserver"}
    with dask.config.set(method):
        get_mp_context().set_forkserver_preload(["distributed", *preload])
        environ = dask.config.get("distributed.nanny.pre-spawn-environ")
        env = {k: str(v) for k, v in environ.items()}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            forkserver.ensure_running()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        yield


def start_forkserver(preload: Sequence[str]) -> None:
    """Start :func:`forkserver_workers`'s server now: it imports ``preload`` in its own
    process while this one goes on (e.g. checks a job's inputs); the cluster started
    later forks its workers from it.  A server already running is left as it is."""
    with forkserver_workers(preload):
        pass


def cluster_resources(client, *, detect: Callable[[], Resources] | None = None) -> Resources:
    """The allocation an existing cluster really gives: its workers, as its scheduler
    reports them (count, threads, each worker's memory limit, the GPU a worker reports).

    The plan made from these keeps the workers' count, threads and memory limit
    (:func:`hpcbatch.planner.make_plan` reads ``Resources.workers``).  Where a worker has
    no memory limit, the memory is ``detect()``'s (this machine's, by default
    :func:`~hpcbatch.resources.detect_resources` without probing GPUs), and the source
    says so.  A cluster without workers is a :class:`ConfigError`.
    """
    import inspect

    try:
        all_workers = "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        all_workers = False
    # n_workers=-1: some Dask versions list only the first 5 workers by default
    info = client.scheduler_info(n_workers=-1) if all_workers else client.scheduler_info()
    return workers_resources(info, detect=detect)


def workers_resources(info: dict, *, detect: Callable[[], Resources] | None = None) -> Resources:
    """:func:`cluster_resources` from a ``scheduler_info()`` dict."""
    from .planner import plural
    from .resources import Limit, Worker, detect_resources

    where = f"scheduler {info.get('address') or '?'}"
    found = info.get("workers") or {}
    if not found:
        raise ConfigError(
            f"the Dask cluster has no workers to plan for ({where}): start workers first "
            "(dask worker SCHEDULER) or use --cluster local"
        )
    workers = tuple(
        Worker(
            address=address,
            name=str(address if w.get("name") is None else w["name"]),
            memory_limit_bytes=int(w.get("memory_limit") or 0),
            threads=int(w.get("nthreads") or 1),
        )
        for address, w in sorted(found.items())
    )
    them = f"the cluster's {plural(len(workers), 'worker')} ({where})"
    limits = sorted({w.memory_limit_bytes for w in workers})
    notes: list[str] = []
    if limits[0] > 0:
        each = " to ".join(format_bytes(x) for x in {limits[0]: 0, limits[-1]: 0})
        memory = sum(w.memory_limit_bytes for w in workers)
        memory_source = f"memory_limit of {them}: {each} each"
    else:
        mine = (detect or (lambda: detect_resources(probe_gpus=False)))()
        unlimited = sum(1 for w in workers if not w.memory_limit_bytes)
        memory = mine.memory_bytes
        memory_source = f"{mine.memory_source}: {unlimited} of {them} have no memory limit"
        notes.append(
            f"{unlimited} of {them} have no memory limit: planned with this machine's "
            "memory; start workers with --memory-limit to plan for theirs"
        )
    gpus, gpus_source = _worker_gpus(found, them)
    return Resources(
        memory_bytes=memory,
        memory_source=memory_source,
        cpus=sum(w.threads for w in workers),
        cpus_source=f"threads of {them}",
        gpus=gpus,
        gpus_source=gpus_source,
        memory_candidates=tuple(
            Limit(w.memory_limit_bytes, f"memory_limit of worker {w.address}") for w in workers
        ),
        cpu_candidates=tuple(Limit(w.threads, f"nthreads of worker {w.address}") for w in workers),
        notes=tuple(notes),
        workers=workers,
    )


def _worker_gpus(found: dict, them: str) -> tuple[tuple, str]:
    """The GPU each worker reports (Dask's ``gpu`` startup information, with pynvml)."""
    from .resources import GPU

    gpus = []
    for address, w in sorted(found.items()):
        gpu = w.get("gpu") or {}
        total = int(gpu.get("memory-total") or 0)
        if not total:
            continue
        used = int(((w.get("metrics") or {}).get("gpu") or {}).get("memory-used") or 0)
        name = str(gpu.get("name") or "GPU")
        gpus.append(GPU(len(gpus), name, total - used, total, f"worker {address} (pynvml)"))
    if not gpus:
        return (), f"none reported by {them} (a worker reports its GPU when pynvml finds one)"
    return tuple(gpus), f"reported by {len(gpus)} of {them} (pynvml)"


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
    print(f"hpcbatch page: {page_url(link)}", file=out, flush=True)
    hint = tunnel_hint(link)
    if hint:
        print(
            f"from your laptop: {hint}  then open http://localhost:{urlparse(link).port or 8787}/status",
            file=out,
            flush=True,
        )


def _fmt(n: int) -> str:
    return format_bytes(n) if n else "none"


def _close_quietly(obj) -> None:
    with suppress(Exception):  # closing must not hide the run's own error
        obj.close()
