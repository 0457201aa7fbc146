"""What the allocation really gives this process: memory, CPUs and GPUs.

Owns detection only.  Every figure records where it came from (SLURM environment,
this process's own cgroup, psutil, CUDA, or a user override), and when several
limits apply the tightest one wins.  Dask's ``memory_limit='auto'`` reads the
root cgroup; here the cgroup of *this* process is found through
``/proc/self/cgroup`` and every ancestor up to the root is checked, so a limit set
deeper in a nested hierarchy is not missed.

Does not plan: see :mod:`hpcbatch.planner`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ResourceError
from .units import format_bytes

# cgroup v1 writes "no limit" as a huge page-aligned number.
_UNLIMITED_V1 = 2**62


@dataclass(frozen=True)
class Limit:
    """One candidate limit and where it came from."""

    value: int
    source: str


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    free_bytes: int
    total_bytes: int
    source: str = "torch.cuda.mem_get_info"


@dataclass(frozen=True)
class Worker:
    """One worker of an existing Dask cluster, as its scheduler reports it."""

    address: str
    name: str
    memory_limit_bytes: int  # 0: the worker has no memory limit
    threads: int


@dataclass(frozen=True)
class Resources:
    """The allocation: the tightest memory and CPU limits, and the GPUs.

    ``workers``: the workers of an existing cluster (:func:`hpcbatch.cluster.cluster_resources`);
    the planner then keeps their count, threads and memory limit instead of choosing them.
    """

    memory_bytes: int
    memory_source: str
    cpus: int
    cpus_source: str
    gpus: tuple[GPU, ...] = ()
    gpus_source: str = ""
    available_memory_bytes: int | None = None
    available_memory_source: str = ""
    planned_ahead: bool = False
    memory_candidates: tuple[Limit, ...] = ()
    cpu_candidates: tuple[Limit, ...] = ()
    notes: tuple[str, ...] = field(default=())
    workers: tuple[Worker, ...] = ()

    def summary_rows(self) -> list[tuple[str, str, str]]:
        rows = [
            ("memory", format_bytes(self.memory_bytes), self.memory_source),
            ("cpus", str(self.cpus), self.cpus_source),
        ]
        if self.available_memory_bytes is not None:
            rows.append(
                (
                    "memory available now",
                    format_bytes(self.available_memory_bytes),
                    self.available_memory_source,
                )
            )
        if not self.gpus:
            rows.append(("gpus", "0", self.gpus_source))
        for gpu in self.gpus:
            rows.append(
                (
                    f"gpu {gpu.index}",
                    f"{gpu.name}: {format_bytes(gpu.free_bytes)} free of {format_bytes(gpu.total_bytes)}",
                    gpu.source,
                )
            )
        return rows

    def to_dict(self) -> dict:
        return {
            "memory_bytes": self.memory_bytes,
            "memory_source": self.memory_source,
            "cpus": self.cpus,
            "cpus_source": self.cpus_source,
            "available_memory_bytes": self.available_memory_bytes,
            "available_memory_source": self.available_memory_source,
            "gpus": [gpu.__dict__ for gpu in self.gpus],
            "gpus_source": self.gpus_source,
            "planned_ahead": self.planned_ahead,
            "memory_candidates": [c.__dict__ for c in self.memory_candidates],
            "cpu_candidates": [c.__dict__ for c in self.cpu_candidates],
            "notes": list(self.notes),
            "workers": [worker.__dict__ for worker in self.workers],
        }


# ---------------------------------------------------------------- SLURM ----


def _expand_slurm_counts(text: str) -> list[int]:
    """SLURM per-node lists: ``"4(x2),2"`` -> ``[4, 4, 2]``."""
    counts: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(text)
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _slurm_int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ResourceError(
            f"{name}={text!r} is not a whole number: fix or unset it in the job environment"
        ) from None


def slurm_cpus(env: Mapping[str, str]) -> Limit | None:
    """CPUs SLURM gave this task: ``SLURM_CPUS_PER_TASK``, else this node's share.

    The node's share is ``SLURM_CPUS_ON_NODE`` or this node's entry (``SLURM_NODEID``)
    of ``SLURM_JOB_CPUS_PER_NODE`` (``"4(x2),2"``).
    """
    per_task = _slurm_int(env, "SLURM_CPUS_PER_TASK")
    if per_task:
        return Limit(per_task, "SLURM_CPUS_PER_TASK")
    on_node = _slurm_int(env, "SLURM_CPUS_ON_NODE")
    if on_node:
        return Limit(on_node, "SLURM_CPUS_ON_NODE")
    text = env.get("SLURM_JOB_CPUS_PER_NODE")
    if text:
        try:
            counts = _expand_slurm_counts(text)
        except ValueError:
            raise ResourceError(
                f"SLURM_JOB_CPUS_PER_NODE={text!r} is not a SLURM CPU list like '4(x2),2': "
                "fix or unset it"
            ) from None
        node = _slurm_int(env, "SLURM_NODEID") or 0
        node = node if node < len(counts) else 0
        return Limit(counts[node], f"SLURM_JOB_CPUS_PER_NODE[{node}] ({text})")
    return None


def slurm_memory(env: Mapping[str, str]) -> Limit | None:
    """``SLURM_MEM_PER_NODE`` (MB) or ``SLURM_MEM_PER_CPU`` (MB) x CPUs on this node.

    SLURM's MB are MiB.  A value of 0 ("all the node's memory") is no limit here:
    the host and cgroup figures then decide.
    """
    per_node = _slurm_int(env, "SLURM_MEM_PER_NODE")
    if per_node:
        return Limit(per_node * 1024**2, f"SLURM_MEM_PER_NODE ({per_node} MB)")
    per_cpu = _slurm_int(env, "SLURM_MEM_PER_CPU")
    if per_cpu:
        cpus = slurm_cpus(env)
        n = cpus.value if cpus else 1
        where = cpus.source if cpus else "1 CPU, no SLURM CPU count"
        return Limit(
            per_cpu * 1024**2 * n, f"SLURM_MEM_PER_CPU ({per_cpu} MB) x {n} CPUs ({where})"
        )
    return None


def slurm_nodes_note(env: Mapping[str, str]) -> str | None:
    """A note when the job spans several nodes: the figures are this node's share."""
    n = _slurm_int(env, "SLURM_JOB_NUM_NODES") or _slurm_int(env, "SLURM_NNODES") or 1
    if n < 2:
        return None
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "?"
    here = env.get("SLURMD_NODENAME") or "?"
    return (
        f"this job has {n} nodes ({nodes}): the figures above are this node's ({here}) "
        "share, and a local Dask cluster uses this node only; start one hpcbatch per node "
        "with srun, or use --cluster slurm for worker jobs on other nodes"
    )


# --------------------------------------------------------------- cgroups ----


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroups(root: Path) -> dict[str, str]:
    """Controller -> path of this process, from ``/proc/self/cgroup`` (``"v2"`` = unified)."""
    text = _read(root / "proc/self/cgroup") or ""
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            found["v2"] = path
        for name in controllers.split(","):
            if name:
                found[name] = path
    return found


@dataclass(frozen=True)
class _Mount:
    kind: str  # the v1 controller name, or "v2"
    point: Path  # where it is mounted (under ``root``)
    root: str  # which cgroup directory is mounted there ("/" unless a container)


def _cgroup_mounts(root: Path) -> list[_Mount]:
    """cgroup mounts from ``/proc/self/mountinfo``; the usual places when it is absent."""
    mounts: list[_Mount] = []
    for line in (_read(root / "proc/self/mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        point = root / fields[4].lstrip("/")
        if tail[0] == "cgroup2":
            mounts.append(_Mount("v2", point, fields[3]))
        elif tail[0] == "cgroup":
            for option in tail[2].split(","):
                if option in ("memory", "cpu"):
                    mounts.append(_Mount(option, point, fields[3]))
    if mounts:
        return mounts
    base = root / "sys/fs/cgroup"
    for name in ("memory", "cpu", "cpu,cpuacct"):
        if (base / name).is_dir():
            mounts.append(_Mount(name.split(",")[0], base / name, "/"))
    for point in (base, base / "unified"):
        if (point / "cgroup.controllers").exists():
            mounts.append(_Mount("v2", point, "/"))
            break
    return mounts


def _ancestors(mount: _Mount, cgroup_path: str) -> list[Path]:
    """This process's cgroup directory under ``mount`` and each parent up to the mount.

    The path in ``/proc/self/cgroup`` is relative to the hierarchy's root; the mount
    may show only a subtree (``mount.root``, e.g. inside a container).  When the path
    is not under the mounted subtree (a container without a cgroup namespace), the
    longest suffix of it that exists under the mount is used, else the mount itself.
    """
    parts = [p for p in cgroup_path.strip("/").split("/") if p]
    mounted = [p for p in mount.root.strip("/").split("/") if p]
    if parts[: len(mounted)] == mounted:
        start = parts[len(mounted) :]
    else:
        start = next(
            (parts[i:] for i in range(len(parts) + 1) if mount.point.joinpath(*parts[i:]).is_dir()),
            [],
        )
    dirs = [mount.point.joinpath(*start[:k]) for k in range(len(start), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _cgroup_dirs(root: Path, kind: str) -> list[tuple[Path, str]]:
    """(directory, "cgroup v1"/"cgroup v2") for every level of this process's cgroups."""
    own = _own_cgroups(root)
    found: list[tuple[Path, str]] = []
    for mount in _cgroup_mounts(root):
        if mount.kind == "v2" and "v2" in own:
            found += [(d, "cgroup v2") for d in _ancestors(mount, own["v2"])]
        elif mount.kind == kind and kind in own:
            found += [(d, "cgroup v1") for d in _ancestors(mount, own[kind])]
    return found


def _cgroup_int(text: str | None) -> int | None:
    """A cgroup limit as a number; ``None`` for unset, ``max`` or v1's huge "unlimited"."""
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value <= 0 or value >= _UNLIMITED_V1 else value


def cgroup_memory(root: Path = Path("/")) -> Limit | None:
    """The tightest ``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1) of this process.

    Every level from this process's cgroup up to the root counts: a limit set on a
    parent binds its children.
    """
    best: Limit | None = None
    for directory, kind in _cgroup_dirs(root, "memory"):
        name = "memory.max" if kind == "cgroup v2" else "memory.limit_in_bytes"
        value = _cgroup_int(_read(directory / name))
        if value is not None and (best is None or value < best.value):
            best = Limit(value, f"{kind} {directory / name}")
    return best


def cgroup_cpus(root: Path = Path("/")) -> Limit | None:
    """CPU quota: v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us`` (rounded up)."""
    best: Limit | None = None
    for directory, kind in _cgroup_dirs(root, "cpu"):
        if kind == "cgroup v2":
            fields = (_read(directory / "cpu.max") or "max").split()
            quota = _cgroup_int(fields[0])
            period = _cgroup_int(fields[1]) if len(fields) > 1 else 100_000
            where = directory / "cpu.max"
        else:
            quota = _cgroup_int(_read(directory / "cpu.cfs_quota_us"))
            period = _cgroup_int(_read(directory / "cpu.cfs_period_us"))
            where = directory / "cpu.cfs_quota_us"
        if quota is None or not period:
            continue
        n = max(1, -(-quota // period))
        if best is None or n < best.value:
            best = Limit(n, f"{kind} quota {where} ({quota}/{period})")
    return best


# --------------------------------------------------------- host figures ----


def _meminfo_available(root: Path) -> int | None:
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def host_memory(root: Path = Path("/")) -> tuple[Limit, Limit | None, str | None]:
    """Physical memory, what is available now, and a note; works without psutil (says so)."""
    try:
        import psutil
    except ImportError:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        free = _meminfo_available(root)
        available = None if free is None else Limit(free, "/proc/meminfo MemAvailable")
        where = "/proc/meminfo" if available else "nowhere (no /proc/meminfo): unknown"
        return (
            Limit(total, "os.sysconf (psutil not installed)"),
            available,
            f"psutil is not installed: total memory from os.sysconf, available memory from {where}",
        )
    vm = psutil.virtual_memory()
    return (
        Limit(int(vm.total), "psutil.virtual_memory().total"),
        Limit(int(vm.available), "psutil.virtual_memory().available"),
        None,
    )


def host_cpus() -> Limit:
    if hasattr(os, "sched_getaffinity"):
        return Limit(len(os.sched_getaffinity(0)), "CPU affinity (os.sched_getaffinity)")
    return Limit(os.cpu_count() or 1, "os.cpu_count")


_GPU_DEVICE_FILES = ("dev/nvidia0", "proc/driver/nvidia", "dev/kfd")


def detect_gpus(root: Path = Path("/")) -> tuple[tuple[GPU, ...], str]:
    """Free/total memory of each CUDA device, and where that came from.

    torch is imported only when a GPU driver is present (importing it costs seconds
    and hundreds of MB), or when it is imported already.
    """
    if "torch" not in sys.modules and not any((root / p).exists() for p in _GPU_DEVICE_FILES):
        return (), "no GPU driver (/dev/nvidia0, /proc/driver/nvidia, /dev/kfd absent)"
    try:
        import torch
    except ImportError:
        return (), "torch not installed"
    if not torch.cuda.is_available():
        return (), "torch.cuda.is_available() is False"
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(GPU(i, torch.cuda.get_device_name(i), int(free), int(total)))
    return tuple(gpus), "torch.cuda.mem_get_info"


# ---------------------------------------------------------------- public ----


def _tightest(limits: list[Limit]) -> Limit:
    """The smallest limit; on a tie the most specific source: the host's (first) loses
    to SLURM's and the cgroup's (a 2-CPU job on a 2-CPU node is SLURM's 2 CPUs)."""
    host = limits[0]
    return min(limits, key=lambda lim: (lim.value, lim is host))


def _override(value: int | None, detected: Limit, flag: str, unit: str, plan_ahead: bool) -> Limit:
    """A user's figure instead of the detected one; running now, it may only narrow it."""
    if value is None:
        return detected
    if value <= 0:
        raise ResourceError(f"{flag} must be positive, got {value}")
    if value > detected.value and not plan_ahead:
        shown = (
            (format_bytes(value), format_bytes(detected.value))
            if unit == "bytes"
            else (str(value), f"{detected.value} CPUs")
        )
        raise ResourceError(
            f"{flag} {shown[0]} is more than the {shown[1]} this allocation has "
            f"({detected.source}): lower {flag}, or use 'hpcbatch plan' to plan for a bigger node"
        )
    return Limit(int(value), f"override ({flag})")


def detect_resources(
    *,
    memory_bytes: int | None = None,
    cpus: int | None = None,
    gpus: int | None = None,
    gpu_memory_bytes: int | None = None,
    env: Mapping[str, str] | None = None,
    root: Path | str = "/",
    probe_gpus: bool = True,
    plan_ahead: bool = False,
    memory_flag: str = "--mem-gb",
) -> Resources:
    """Read the allocation of this process.

    ``memory_bytes``/``cpus``/``gpus`` override detection, for planning a job that is
    not submitted yet (``plan_ahead=True``): then they may exceed this machine; when
    running now they may only narrow it (else :class:`ResourceError`).  Without
    overrides the tightest of SLURM, cgroup and host limits wins.  ``env`` and ``root``
    (the filesystem root holding ``proc/`` and ``sys/fs/cgroup``) are for tests;
    ``memory_flag`` names the option in messages and sources.
    """
    env = os.environ if env is None else env
    root = Path(root)
    notes: list[str] = []

    host_mem, available, note = host_memory(root)
    notes += [n for n in (note, slurm_nodes_note(env)) if n]
    mem_candidates = [host_mem]
    mem_candidates += [m for m in (slurm_memory(env), cgroup_memory(root)) if m]
    cpu_candidates = [host_cpus()]
    cpu_candidates += [c for c in (slurm_cpus(env), cgroup_cpus(root)) if c]

    memory = _override(memory_bytes, _tightest(mem_candidates), memory_flag, "bytes", plan_ahead)
    cpu = _override(cpus, _tightest(cpu_candidates), "--cpus", "cpus", plan_ahead)
    if (
        memory_bytes is None
        and available is not None
        and available.value < 0.5 * memory.value
        and memory.value == host_mem.value
    ):
        notes.append(
            f"only {format_bytes(available.value)} of {format_bytes(memory.value)} is available now: "
            "other processes share this machine; pass --mem to plan for less"
        )

    gpu_list, gpus_source = _gpus(gpus, gpu_memory_bytes, root, probe_gpus, plan_ahead, notes)
    return Resources(
        memory_bytes=memory.value,
        memory_source=memory.source,
        cpus=cpu.value,
        cpus_source=cpu.source,
        gpus=gpu_list,
        gpus_source=gpus_source,
        available_memory_bytes=available.value if available else None,
        available_memory_source=available.source if available else "",
        planned_ahead=plan_ahead and any(v is not None for v in (memory_bytes, cpus, gpus)),
        memory_candidates=tuple(mem_candidates),
        cpu_candidates=tuple(cpu_candidates),
        notes=tuple(notes),
    )


def _gpus(
    gpus: int | None,
    gpu_memory_bytes: int | None,
    root: Path,
    probe: bool,
    plan_ahead: bool,
    notes: list[str],
) -> tuple[tuple[GPU, ...], str]:
    """The GPUs to plan for and their source: planned ahead, detected (narrowed by
    ``--gpus``), or not probed."""
    if gpus is not None and gpus < 0:
        raise ResourceError(f"--gpus must be zero or more, got {gpus}")
    if gpus is not None and plan_ahead:
        per_gpu = gpu_memory_bytes or 16 * 1024**3
        if gpu_memory_bytes is None and gpus:
            notes.append(
                "planning ahead for GPUs of assumed 16 GiB each: pass --gpu-mem to change"
            )
        gpu_list = tuple(
            GPU(i, "planned", per_gpu, per_gpu, "override (--gpus)") for i in range(gpus)
        )
        gpus_source = "override (--gpus)"
    elif probe or gpus is not None:
        gpu_list, gpus_source = detect_gpus(root)
        if gpus is not None:
            if gpus > len(gpu_list):
                raise ResourceError(
                    f"--gpus {gpus} is more than the {len(gpu_list)} GPUs here ({gpus_source}): "
                    "lower --gpus, or use 'hpcbatch plan' to plan for a GPU node"
                )
            gpu_list, gpus_source = gpu_list[:gpus], f"{gpus_source}, first {gpus} (--gpus)"
    else:
        gpu_list, gpus_source = (), "not probed"

    return gpu_list, gpus_source
