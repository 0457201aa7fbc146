"""Where and how a run ran: versions, host, SLURM job, command line, start and end.

:func:`collect` returns a :class:`Provenance` (frozen); the runner puts its
:meth:`Provenance.to_dict` into ``report.json`` (``provenance``) and ``report.html``.
Versions are read from the installed distributions' metadata (nothing is imported, so a
run without torch does not pay for importing it); a package that is not installed is
left out.  The SLURM job id and node list come from the environment (``SLURM_JOB_ID``,
``SLURM_JOB_NODELIST``), as SLURM sets them in a batch job; outside SLURM they are None.
Timestamps are ISO 8601 in UTC (``2026-12-06T13:52:20.123+00:00``).
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata

from .security import scrub

#: the packages whose versions a report names: (label, distribution name)
PACKAGES = (
    ("hpcbatch", "hpcbatch"),
    ("dask", "dask"),
    ("distributed", "distributed"),
    ("torch", "torch"),
    ("pyro", "pyro-ppl"),
)


@dataclass(frozen=True)
class Provenance:
    """One run's provenance (see the module doc)."""

    run_id: str
    started_at: str  # ISO 8601, UTC
    ended_at: str | None  # None while the run is going
    host: str
    command_line: str
    versions: dict = field(default_factory=dict)  # label -> version, installed ones only
    python: str = ""
    slurm_job_id: str | None = None
    slurm_node_list: str | None = None
    slurm_array_task_id: str | None = None
    cwd: str = ""
    pid: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def iso_utc(epoch_s: float | None) -> str | None:
    """``epoch_s`` (seconds since the epoch) as ISO 8601 in UTC, to the millisecond."""
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat(timespec="milliseconds")


def versions(packages: Sequence[tuple[str, str]] = PACKAGES) -> dict[str, str]:
    """Installed version of each package (label -> version); missing ones are left out."""
    found = {}
    for label, dist in packages:
        try:
            found[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def collect(
    run_id: str,
    started: float,
    ended: float | None = None,
    *,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Provenance:
    """The provenance of run ``run_id`` that started and ended at these epoch times.

    ``argv`` defaults to ``sys.argv`` and ``env`` to ``os.environ`` (given in tests).
    """
    env = os.environ if env is None else env
    argv = list(sys.argv if argv is None else argv)
    return Provenance(
        run_id=str(run_id),
        started_at=iso_utc(started) or "",
        ended_at=iso_utc(ended),
        host=socket.gethostname(),  # not getfqdn: a DNS lookup can hang offline
        command_line=scrub(shlex.join(argv)) if argv else "",  # no URL password
        versions=versions(),
        python=sys.version.split()[0],
        slurm_job_id=env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or None,
        slurm_node_list=env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or None,
        slurm_array_task_id=env.get("SLURM_ARRAY_TASK_ID") or None,
        cwd=os.getcwd(),
        pid=os.getpid(),
    )
