"""A run seen from outside: ``progress.json`` in its report directory, and reading it back.

:class:`ProgressFile` is a progress watcher (:attr:`hpcbatch.runner.RunOptions.watchers`)
that keeps ``<report-dir>/<run-id>/progress.json`` up to date while the run goes (at most
every ``every_s`` and once at the end), written atomically (a temporary file, then
``os.replace``): state (``running``, then ``finished``, ``failed`` or ``interrupted``),
counts, rate, ETA, the recent events, and who runs it (pid, host, SLURM job id, command).

:func:`read_run` and :func:`list_runs` read those files back (``hpcbatch status`` and
``hpcbatch runs``), from any shell that sees the report directory (a login node while the
job runs): a run still marked ``running`` whose process is gone (same host: its pid; another
host: ``squeue`` for its SLURM job, else how long since it last wrote) was killed without a
chance to say so (SIGKILL, a node failure) and shows as ``interrupted``.  A run directory
with only a ``report.json`` (written before this file existed) is read from that.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError
from .security import mask_url, scrub

PROGRESS_FILE = "progress.json"
WRITE_EVERY_S = 2.0
#: A ``running`` run on another host without SLURM to ask: no update for this long
#: (from progress.json or the ledger) and it counts as interrupted.
STALE_S = 120.0
ENDED = ("finished", "failed", "interrupted", "already-finished")


# ---------------------------------------------------------------- writing ----


def _process_started(pid: int) -> float | None:
    try:
        import psutil

        return round(psutil.Process(pid).create_time(), 2)
    except Exception:  # noqa: BLE001 (no psutil, no such process: unknown)
        return None


def who_runs() -> dict:
    """This process: pid (and its start time, against pid reuse), host, SLURM job, command."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    return {
        "pid": os.getpid(),
        "pid_started": _process_started(os.getpid()),
        "host": socket.gethostname(),
        "slurm_job_id": job or None,
        "slurm_nodes": os.environ.get("SLURM_JOB_NODELIST") or None,
        "command": scrub(" ".join(sys.argv)),  # a URL's password is never written
        "cwd": os.getcwd(),
    }


def write_json_atomic(path: Path, data: dict) -> None:
    """``data`` as JSON at ``path``: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


class ProgressFile:
    """A progress watcher writing ``progress.json`` in ``run_dir`` (see the module doc).

    ``ledger_url``: the run's ledger, recorded when it holds no password (a reader can
    then count the chunks done itself).  A write that fails (a full disk) is skipped:
    the run does not depend on this file.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        workload: str = "",
        ledger_url: str | None = None,
        every_s: float = WRITE_EVERY_S,
    ):
        self.path = Path(run_dir) / PROGRESS_FILE
        self.every_s = float(every_s)
        self.last = float("-inf")
        self.fixed = {"workload": workload, **who_runs()}
        if ledger_url and mask_url(ledger_url) == ledger_url:
            self.fixed["ledger"] = _absolute_sqlite(ledger_url)

    def __call__(self, snapshot: dict) -> None:
        now = time.monotonic()
        if not snapshot.get("final") and now - self.last < self.every_s:
            return
        self.last = now
        data = {**snapshot, **self.fixed, "updated": round(time.time(), 3)}
        if snapshot.get("final") and snapshot.get("state") == "running":
            data["state"] = "interrupted"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, data)
        except OSError:
            pass  # the run goes on; report.json says how it ended


def _absolute_sqlite(url: str) -> str:
    """A relative SQLite path made absolute (a reader may run elsewhere)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


def progress_watchers(report_dir: str | Path | None, run_id: str, workload: str,
                      ledger_url: str | None = None) -> tuple:  # fmt: skip
    """The watchers every run gets: its ``progress.json`` (none without a report dir)."""
    if report_dir is None:
        return ()
    run_dir = Path(report_dir) / run_id
    return (ProgressFile(run_dir, workload=workload, ledger_url=ledger_url),)


# ---------------------------------------------------------------- reading ----


@dataclass(frozen=True)
class RunView:
    """One run as ``hpcbatch status`` shows it."""

    run_id: str
    directory: str
    state: str
    workload: str = ""
    items_done: int = 0
    n_items: int | None = None
    chunks_done: int = 0
    n_chunks: int | None = None
    in_flight: int = 0
    retried: int = 0
    split: int = 0
    quarantined: int = 0
    failed: int = 0
    slurm_job_id: str | None = None
    host: str | None = None
    pid: int | None = None
    started: float | None = None
    duration_s: float | None = None
    updated: float | None = None
    rate: float | None = None
    eta_s: float | None = None
    item_name: str = "item"
    message: str = ""
    why: str = ""  # how an interrupted state was concluded
    source: str = PROGRESS_FILE
    events: tuple = ()

    @property
    def percent(self) -> float | None:
        return 100.0 * self.items_done / self.n_items if self.n_items else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["events"] = list(self.events)
        data["percent"] = round(self.percent, 1) if self.percent is not None else None
        return data


def read_run(directory: str | Path) -> RunView:
    """The run in ``directory`` (with ``progress.json`` or ``report.json``)."""
    directory = Path(directory)
    progress = _load(directory / PROGRESS_FILE)
    if progress is not None:
        return _from_progress(directory, progress)
    report = _load(directory / "report.json")
    if report is not None:
        return _from_report(directory, report)
    raise ConfigError(
        f"no run at {directory}: a run directory holds progress.json or report.json "
        "(see 'hpcbatch runs')"
    )


def list_runs(report_dir: str | Path) -> list[RunView]:
    """Every run under ``report_dir``, oldest first (by start time)."""
    base = Path(report_dir)
    if not base.is_dir():
        raise ConfigError(
            f"report directory {base} does not exist: pass the report-dir the runs wrote "
            "to (--report-dir), or run a job first"
        )
    runs = []
    for sub in sorted(p for p in base.iterdir() if p.is_dir()):
        if (sub / PROGRESS_FILE).is_file() or (sub / "report.json").is_file():
            try:
                runs.append(read_run(sub))
            except ConfigError:
                continue  # unreadable: not a run (or being replaced): skip it
    return sorted(runs, key=lambda r: (r.started or 0.0, r.run_id))


def find_run(report_dir: str | Path, run: str) -> RunView:
    """A run by directory, or by run id under ``report_dir``."""
    path = Path(run)
    if path.is_dir():
        return read_run(path)
    candidate = Path(report_dir) / run
    if candidate.is_dir():
        return read_run(candidate)
    matches = [r for r in list_runs(report_dir) if r.run_id.startswith(run)]
    if len(matches) == 1:
        return matches[0]
    what = "matches several runs" if matches else "is not a run directory or a run id"
    raise ConfigError(
        f"{run!r} {what} under {report_dir}: see 'hpcbatch runs' for the run ids, or pass "
        "the run's directory"
    )


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _from_progress(directory: Path, data: dict) -> RunView:
    c = data.get("counters") or {}
    state, why = data.get("state", "running"), ""
    live = _ledger_counts(data) if state == "running" else None
    updated = max(data.get("updated") or 0.0, (live or {}).get("last_done") or 0.0)
    if state == "running":
        state, why = _liveness(data, updated)
    items_done = max(int(data.get("items_done") or 0), int((live or {}).get("items") or 0))
    # the ledger counts whole chunks done before a resume too; progress.json this run's
    chunks_done = max(int(c.get("done") or 0) + int(c.get("skipped") or 0),
                      int((live or {}).get("chunks") or 0))  # fmt: skip
    started = data.get("started")
    end = time.time() if state == "running" else (data.get("updated") or started)
    return RunView(
        run_id=str(data.get("run_id") or directory.name), directory=str(directory),
        state=state, workload=data.get("workload") or "", items_done=items_done,
        n_items=data.get("n_items"), chunks_done=chunks_done, n_chunks=data.get("n_chunks"),
        in_flight=int(c.get("in_flight") or 0) if state == "running" else 0,
        retried=int(c.get("retried") or 0), split=int(c.get("split") or 0),
        quarantined=int(c.get("quarantined") or 0), failed=int(c.get("failed") or 0),
        slurm_job_id=data.get("slurm_job_id"), host=data.get("host"), pid=data.get("pid"),
        started=started, duration_s=round(end - started, 1) if started and end else None,
        updated=updated or None, rate=data.get("rate"), eta_s=data.get("eta_s"),
        item_name=data.get("item_name") or "item", message=data.get("message") or "",
        why=why, events=tuple(data.get("events") or ()),
    )  # fmt: skip


def _from_report(directory: Path, data: dict) -> RunView:
    """An older run (no progress.json): what its report.json says."""
    prov = data.get("provenance") or {}
    started = prov.get("started") or data.get("started")
    if not isinstance(started, (int, float)):
        started = None
    return RunView(
        run_id=str(data.get("run_id") or directory.name), directory=str(directory),
        state=data.get("status") or "?", workload=prov.get("workload") or "",
        items_done=int(data.get("items_done") or 0), n_items=data.get("n_items"),
        chunks_done=int(data.get("chunks_done") or 0), n_chunks=data.get("n_chunks"),
        retried=int(data.get("chunks_retried") or 0), split=int(data.get("chunks_split") or 0),
        quarantined=int(data.get("items_quarantined") or 0),
        failed=int(data.get("chunks_failed") or 0),
        slurm_job_id=prov.get("slurm_job_id"), host=prov.get("host"), started=started,
        duration_s=data.get("wall_time_s"), item_name=data.get("item_name") or "item",
        message=data.get("message") or "", source="report.json",
    )  # fmt: skip


# --------------------------------------------------------------- liveness ----


def _liveness(data: dict, updated: float) -> tuple[str, str]:
    """``running``, or ``interrupted`` and why, for a run whose file says ``running``."""
    pid, host = data.get("pid"), data.get("host")
    if host == socket.gethostname() and isinstance(pid, int):
        if _alive(pid, data.get("pid_started")):
            return "running", ""
        return (
            "interrupted",
            f"its process {pid} on {host} is gone: killed before it could record how it ended",
        )
    job = data.get("slurm_job_id")
    if job and (verdict := _slurm_job_state(str(job))) is not None:
        if verdict in ("RUNNING", "COMPLETING", "PENDING", "CONFIGURING", "SUSPENDED"):
            return "running", ""
        return "interrupted", f"its SLURM job {job} is {verdict.lower() or 'gone'}"
    age = time.time() - updated if updated else None
    if age is not None and age > STALE_S:
        return "interrupted", f"no update for {age:.0f} s (on {host}, not reachable from here)"
    return "running", ""


def _alive(pid: int, started: float | None) -> bool:
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except ImportError:  # pragma: no cover
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    except Exception:  # noqa: BLE001 (NoSuchProcess, AccessDenied: gone for our purpose)
        return False


def _slurm_job_state(job: str) -> str | None:
    """The job's state from ``squeue`` (``""``: no longer in the queue); None: no squeue."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        done = subprocess.run(
            [squeue, "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return "" if "Invalid job id" in done.stderr else None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""


def _ledger_counts(data: dict) -> dict | None:
    """Items recorded done and the last record's time, from the run's ledger (if known)."""
    url = data.get("ledger")
    if not url:
        return None
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        return None
    try:
        import sqlalchemy as sa

        from .ledger import CHUNKS

        kwargs = {"connect_args": {"connect_timeout": 5}} if url.startswith("postgres") else {}
        engine = sa.create_engine(url, **kwargs)
        try:
            with engine.connect() as conn:
                whole = sa.case((CHUNKS.c.chunk_id.contains("."), 0), else_=1)
                row = conn.execute(
                    sa.select(
                        sa.func.sum(CHUNKS.c.stop - CHUNKS.c.start),
                        sa.func.max(CHUNKS.c.done_at),
                        sa.func.sum(whole),
                    ).where(CHUNKS.c.run_id == data.get("run_id"))
                ).one()
        finally:
            engine.dispose()
    except Exception:  # noqa: BLE001 (unreachable, no table yet: progress.json alone)
        return None
    return {
        "items": int(row[0] or 0),
        "last_done": float(row[1] or 0.0),
        "chunks": int(row[2] or 0),
    }
