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
class Resources:
    """The allocation: the tightest memory and CPU limits, and the GPUs."""

    memory_bytes: int
    memory_source: str
    cpus: int
    cpus_source: str
    gpus: tuple[GPU, ...] = ()
    available_memory_bytes: int | None = None
    planned_ahead: bool = False
    memory_candidates: tuple[Limit, ...] = ()
    cpu_candidates: tuple[Limit, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def summary_rows(self) -> list[tuple[str, str, str]]:
        rows = [
            ("memory", format_bytes(self.memory_bytes), self.memory_source),
            ("cpus", str(self.cpus), self.cpus_source),
        ]
        if self.available_memory_bytes is not None:
            rows.append(
                ("memory available now", format_bytes(self.available_memory_bytes), "psutil")
            )
        if not self.gpus:
            rows.append(("gpus", "0", "torch.cuda (no CUDA device)"))
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
            "gpus": [gpu.__dict__ for gpu in self.gpus],
            "planned_ahead": self.planned_ahead,
            "memory_candidates": [c.__dict__ for c in self.memory_candidates],
            "cpu_candidates": [c.__dict__ for c in self.cpu_candidates],
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------- SLURM ----


def _first_int(text: str) -> int:
    """SLURM lists like ``"4(x2),2"``: the first node's count."""
    head = text.split(",")[0].split("(")[0]
    return int(head)


def slurm_memory(env: Mapping[str, str]) -> Limit | None:
    """``SLURM_MEM_PER_NODE`` (MB) or ``SLURM_MEM_PER_CPU`` (MB) x CPUs on this node."""
    if env.get("SLURM_MEM_PER_NODE"):
        return Limit(int(env["SLURM_MEM_PER_NODE"]) * 1024**2, "SLURM_MEM_PER_NODE")
    if env.get("SLURM_MEM_PER_CPU"):
        cpus = slurm_cpus(env)
        n = cpus.value if cpus else 1
        return Limit(
            int(env["SLURM_MEM_PER_CPU"]) * 1024**2 * n,
            f"SLURM_MEM_PER_CPU x {n} CPUs",
        )
    return None


def slurm_cpus(env: Mapping[str, str]) -> Limit | None:
    if env.get("SLURM_CPUS_PER_TASK"):
        return Limit(int(env["SLURM_CPUS_PER_TASK"]), "SLURM_CPUS_PER_TASK")
    if env.get("SLURM_JOB_CPUS_PER_NODE"):
        return Limit(_first_int(env["SLURM_JOB_CPUS_PER_NODE"]), "SLURM_JOB_CPUS_PER_NODE")
    return None


# --------------------------------------------------------------- cgroups ----


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroups(root: Path) -> dict[str, str]:
    """Controller -> path of this process, from ``/proc/self/cgroup`` (``""`` = v2)."""
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


def _ancestors(base: Path, cgroup_path: str) -> list[Path]:
    """The cgroup directory and each parent up to the mount root.

    Inside a container the path in ``/proc/self/cgroup`` may be relative to a root
    that is not mounted; then the longest suffix that exists is used.
    """
    parts = [p for p in cgroup_path.strip("/").split("/") if p]
    start = parts
    for i in range(len(parts) + 1):
        if (base.joinpath(*parts[i:])).is_dir():
            start = parts[i:]
            break
    dirs = [base.joinpath(*start[:k]) for k in range(len(start), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def cgroup_memory(root: Path = Path("/")) -> Limit | None:
    """The tightest ``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1) of this process."""
    own = _own_cgroups(root)
    best: Limit | None = None
    candidates: list[tuple[Path, str, str]] = []
    if "memory" in own:
        base = root / "sys/fs/cgroup/memory"
        candidates += [
            (d, "memory.limit_in_bytes", "cgroup v1") for d in _ancestors(base, own["memory"])
        ]
    if "v2" in own:
        for base in (root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified"):
            if (base / "cgroup.controllers").exists():
                candidates += [(d, "memory.max", "cgroup v2") for d in _ancestors(base, own["v2"])]
                break
    for directory, name, kind in candidates:
        text = _read(directory / name)
        if not text or text == "max":
            continue
        value = int(text)
        if value >= _UNLIMITED_V1:
            continue
        if best is None or value < best.value:
            best = Limit(value, f"{kind} {directory / name}")
    return best


def cgroup_cpus(root: Path = Path("/")) -> Limit | None:
    """CPU quota: v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us / cpu.cfs_period_us`` (rounded up)."""
    own = _own_cgroups(root)
    best: Limit | None = None

    def consider(quota: int, period: int, where: Path) -> None:
        nonlocal best
        if quota <= 0 or period <= 0:
            return
        n = max(1, -(-quota // period))
        if best is None or n < best.value:
            best = Limit(n, f"cgroup quota {where}")

    if "v2" in own:
        for base in (root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified"):
            if (base / "cgroup.controllers").exists():
                for d in _ancestors(base, own["v2"]):
                    text = _read(d / "cpu.max")
                    if text and not text.startswith("max"):
                        quota, period = text.split()
                        consider(int(quota), int(period), d / "cpu.max")
                break
    if "cpu" in own:
        base = root / "sys/fs/cgroup/cpu"
        for d in _ancestors(base, own["cpu"]):
            quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if quota and period:
                consider(int(quota), int(period), d / "cpu.cfs_quota_us")
    return best


# --------------------------------------------------------- host figures ----


def host_memory() -> tuple[Limit, int | None, str | None]:
    """Physical memory and what is available now; works without psutil."""
    try:
        import psutil
    except ImportError:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return (
            Limit(pages, "os.sysconf (psutil not installed)"),
            None,
            "psutil is not installed: total memory from os.sysconf, available memory unknown",
        )
    vm = psutil.virtual_memory()
    return Limit(int(vm.total), "psutil.virtual_memory().total"), int(vm.available), None


def host_cpus() -> Limit:
    if hasattr(os, "sched_getaffinity"):
        return Limit(len(os.sched_getaffinity(0)), "CPU affinity (os.sched_getaffinity)")
    return Limit(os.cpu_count() or 1, "os.cpu_count")


def detect_gpus() -> tuple[GPU, ...]:
    """Free/total memory of each CUDA device; none when CUDA is absent."""
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(GPU(i, torch.cuda.get_device_name(i), int(free), int(total)))
    return tuple(gpus)


# ---------------------------------------------------------------- public ----


def _tightest(limits: list[Limit]) -> Limit:
    return min(limits, key=lambda lim: lim.value)


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
) -> Resources:
    """Read the allocation of this process.

    ``memory_bytes``/``cpus``/``gpus`` override detection, for planning a job that is
    not submitted yet (``plan_ahead=True``): then they may exceed this machine; when
    running now they may only narrow it.  Without overrides, the tightest of SLURM,
    cgroup and host limits wins.
    """
    env = os.environ if env is None else env
    root = Path(root)
    notes: list[str] = []

    host_mem, available, note = host_memory()
    if note:
        notes.append(note)
    mem_candidates = [host_mem]
    for found in (slurm_memory(env), cgroup_memory(root)):
        if found:
            mem_candidates.append(found)
    cpu_candidates = [host_cpus()]
    for found in (slurm_cpus(env), cgroup_cpus(root)):
        if found:
            cpu_candidates.append(found)

    planned_ahead = plan_ahead and (
        memory_bytes is not None or cpus is not None or gpus is not None
    )
    if memory_bytes is not None:
        if memory_bytes <= 0:
            raise ResourceError("--mem-gb must be positive")
        detected_mem = _tightest(mem_candidates)
        if memory_bytes > detected_mem.value and not plan_ahead:
            raise ResourceError(
                f"--mem-gb {memory_bytes / 1e9:g} is more than the {detected_mem.value / 1e9:.1f} GB "
                f"this allocation has ({detected_mem.source}): lower --mem-gb, or use 'hpcbatch plan' "
                "to plan for a bigger node"
            )
        memory = Limit(int(memory_bytes), "override (--mem-gb)")
    else:
        memory = _tightest(mem_candidates)
    if cpus is not None:
        if cpus <= 0:
            raise ResourceError("--cpus must be a positive whole number")
        detected = _tightest(cpu_candidates)
        if cpus > detected.value and not plan_ahead:
            raise ResourceError(
                f"--cpus {cpus} is more than the {detected.value} CPUs this allocation has "
                f"({detected.source}): lower --cpus, or use 'hpcbatch plan' to plan for a bigger node"
            )
        cpu = Limit(int(cpus), "override (--cpus)")
    else:
        cpu = _tightest(cpu_candidates)

    if gpus is not None:
        if gpus < 0:
            raise ResourceError("--gpus must be zero or more")
        per_gpu = gpu_memory_bytes or 16 * 1024**3
        if gpu_memory_bytes is None and gpus:
            notes.append(
                "planning ahead for GPUs of assumed 16 GiB each: pass --gpu-mem-gb to change"
            )
        gpu_list = tuple(
            GPU(i, "planned", per_gpu, per_gpu, "override (--gpus)") for i in range(gpus)
        )
    else:
        gpu_list = detect_gpus() if probe_gpus else ()

    return Resources(
        memory_bytes=memory.value,
        memory_source=memory.source,
        cpus=cpu.value,
        cpus_source=cpu.source,
        gpus=gpu_list,
        available_memory_bytes=available,
        planned_ahead=planned_ahead,
        memory_candidates=tuple(mem_candidates),
        cpu_candidates=tuple(cpu_candidates),
        notes=tuple(notes),
    )
