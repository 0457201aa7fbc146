"""The memory planner: ``Footprint`` + ``Resources`` + settings -> ``Plan``.

Pure functions and frozen dataclasses only: no I/O, no config reads, nothing
started.  The planner picks the number of Dask workers, threads per worker, the
``memory_limit`` of each worker and the chunk size (items of work per task) so
that each worker's predicted peak stays under ``memory_fraction`` of its limit.

The memory model of one worker process::

    peak = baseline                      # interpreter + torch/Pyro, per process
         + copied shared input           # a copy per worker (pickled/scattered)
         + copied model weights
         + threads x chunk x per_item    # the work in flight

A memory-mapped input (or memory-mapped weights) is one page-cache copy per node:
it is taken off the node's memory once instead of off every worker's budget.

Preference order: as many workers as CPUs (one thread each) while the
per-worker copies still leave room for at least ``min_chunk`` items; the chunk
shrinks before the worker count drops; fewer workers only when the fixed
per-worker copies dominate.  Every choice is explained in ``Plan.reasons``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .errors import ConfigError, PlanInfeasibleError
from .resources import Resources
from .units import format_bytes

DEFAULT_THRESHOLDS = {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}


@dataclass(frozen=True)
class Footprint:
    """What one worker holds regardless of work, and what one item of work costs."""

    workload: str
    item_name: str
    n_items: int
    per_item_bytes: int
    baseline_bytes: int
    model_bytes: int = 0
    model_mmap: bool = False
    shared_input_bytes: int = 0
    shared_input_mmap: bool = True
    gpu_per_item_bytes: int = 0
    gpu_fixed_bytes: int = 0
    #: the driver process (client + in-process scheduler, with the workload's imports):
    #: the allocation keeps at least this much off the workers (see ``reserve_bytes``)
    driver_bytes: int = 0
    source: str = "analytic (uncalibrated)"
    #: where the analytic constants came from (machine, versions, which runs fitted
    #: them): said once in the plan's reasons; dropped when a probe measured the footprint
    constants: str = ""
    details: tuple[tuple[str, int], ...] = ()
    shrink_hints: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n_items <= 0:
            raise ConfigError(
                f"the number of {self.item_name}s must be positive, got {self.n_items}"
            )
        for name in (
            "per_item_bytes",
            "baseline_bytes",
            "model_bytes",
            "shared_input_bytes",
            "driver_bytes",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"footprint {name} must not be negative")

    @property
    def fixed_bytes(self) -> int:
        """Bytes every worker process holds before any item of work."""
        return (
            self.baseline_bytes
            + (0 if self.shared_input_mmap else self.shared_input_bytes)
            + (0 if self.model_mmap else self.model_bytes)
        )

    @property
    def node_shared_bytes(self) -> int:
        """Bytes held once per node (memory-mapped inputs and weights)."""
        return (self.shared_input_bytes if self.shared_input_mmap else 0) + (
            self.model_bytes if self.model_mmap else 0
        )


@dataclass(frozen=True)
class PlanSettings:
    memory_fraction: float = 0.6
    min_chunk: int = 1
    max_chunk: int | None = None
    chunk_size: int | None = None
    max_workers: int | None = None
    n_workers: int | None = None
    #: each worker's memory limit, fixed (an existing cluster's workers); None: the planner
    #: shares the allocation out
    memory_limit_bytes: int | None = None
    threads_per_worker: int = 1
    max_threads_per_worker: int = 1
    reserve_bytes: int = 256 * 1024**2
    chunks_per_worker: int = 4
    use_gpu: bool = False
    gpu_memory_fraction: float = 0.8
    thresholds: dict = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))

    def __post_init__(self) -> None:
        if not 0 < self.memory_fraction < 1:
            raise ConfigError(
                f"memory fraction must be between 0 and 1 (exclusive), got {self.memory_fraction}: "
                "e.g. --memory-fraction 0.6"
            )
        if not 0 < self.gpu_memory_fraction < 1:
            raise ConfigError(
                f"GPU memory fraction must be between 0 and 1 (exclusive), got {self.gpu_memory_fraction}"
            )
        for name in (
            "min_chunk",
            "threads_per_worker",
            "max_threads_per_worker",
            "chunks_per_worker",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        for name in ("max_chunk", "chunk_size", "max_workers", "n_workers", "memory_limit_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if self.chunk_size is not None and self.chunk_size < self.min_chunk:
            raise ConfigError(f"chunk size {self.chunk_size} is below min-chunk {self.min_chunk}")
        if self.max_chunk is not None and self.max_chunk < self.min_chunk:
            raise ConfigError(f"max-chunk {self.max_chunk} is below min-chunk {self.min_chunk}")
        if self.reserve_bytes < 0:
            raise ConfigError("reserve-bytes must not be negative")
        if set(self.thresholds) != set(DEFAULT_THRESHOLDS):
            raise ConfigError(f"thresholds must name exactly {sorted(DEFAULT_THRESHOLDS)}")
        for name, value in self.thresholds.items():
            if value is not False and not 0 < float(value) <= 1:
                raise ConfigError(f"threshold {name} must be in (0, 1] or false, got {value}")
        terminate = self.thresholds["terminate"]
        if terminate is not False and self.memory_fraction >= float(terminate):
            raise ConfigError(
                f"memory fraction {self.memory_fraction} is not below the terminate threshold "
                f"{terminate}: Dask would restart every worker at its predicted peak; use e.g. 0.6"
            )


@dataclass(frozen=True)
class Plan:
    n_workers: int
    threads_per_worker: int
    memory_limit_bytes: int
    chunk_size: int
    n_chunks: int
    predicted_peak_bytes: int
    memory_fraction: float
    binding: str
    reasons: tuple[str, ...]
    footprint: Footprint
    resources: Resources
    gpu_batch_size: int | None = None
    thresholds: dict = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    #: kept off the allocation for the driver: max(the reserve setting, footprint.driver_bytes)
    reserve_bytes: int = 256 * 1024**2

    @property
    def predicted_node_bytes(self) -> int:
        return self.n_workers * self.memory_limit_bytes + self.footprint.node_shared_bytes

    def to_dict(self) -> dict:
        return {
            "workload": self.footprint.workload,
            "n_workers": self.n_workers,
            "threads_per_worker": self.threads_per_worker,
            "memory_limit_bytes": self.memory_limit_bytes,
            "chunk_size": self.chunk_size,
            "n_chunks": self.n_chunks,
            "item_name": self.footprint.item_name,
            "n_items": self.footprint.n_items,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "memory_fraction": self.memory_fraction,
            "footprint_source": self.footprint.source,
            "footprint_constants": self.footprint.constants,
            "binding": self.binding,
            "gpu_batch_size": self.gpu_batch_size,
            "thresholds": dict(self.thresholds),
            "reserve_bytes": self.reserve_bytes,
            "reasons": list(self.reasons),
            "footprint": asdict(self.footprint),
            "resources": self.resources.to_dict(),
        }


# --------------------------------------------------------------- helpers ----


def plural(n: int, noun: str) -> str:
    """``plural(1, "sample") == "1 sample"``, ``plural(8, "sample") == "8 samples"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def chunk_capacity(budget_bytes: float, per_item_bytes: int, threads: int) -> int:
    """How many items fit in ``budget_bytes`` when ``threads`` chunks run at once."""
    if budget_bytes < 0:
        return 0
    if per_item_bytes <= 0:
        return 2**62
    return int(budget_bytes // (per_item_bytes * threads))


def gpu_batch_size(free_bytes: int, fixed_bytes: int, per_item_bytes: int, fraction: float) -> int:
    """Items per GPU batch that fit in ``fraction`` of the free device memory (0 if none)."""
    if per_item_bytes <= 0:
        raise ConfigError("GPU per-item bytes must be positive to size a GPU batch")
    return max(0, int((free_bytes * fraction - fixed_bytes) // per_item_bytes))


def _smallest_chunk(footprint: Footprint, settings: PlanSettings) -> int:
    """The chunk every worker must fit: the requested size, else min-chunk; never above all items."""
    return min(settings.chunk_size or settings.min_chunk, footprint.n_items)


def _worker_budget(footprint: Footprint, settings: PlanSettings, limit: int) -> int:
    """Items one thread may hold in a worker with memory limit ``limit``."""
    budget = settings.memory_fraction * limit - footprint.fixed_bytes
    return chunk_capacity(budget, footprint.per_item_bytes, settings.threads_per_worker)


def reserve_bytes(footprint: Footprint, settings: PlanSettings) -> int:
    """Bytes kept off the workers for the driver: the ``reserve`` setting, or the
    workload's measured driver if that is larger (a torch/Pyro driver is ~350 MiB).
    A reserve of 0 stays 0: the allocation does not hold the driver (e.g. the workers
    of an existing cluster, whose memory is just the sum of their limits)."""
    if settings.reserve_bytes == 0:
        return 0
    return max(settings.reserve_bytes, footprint.driver_bytes)


def _usable(footprint: Footprint, settings: PlanSettings, memory_bytes: int) -> int:
    """What the workers may share: the allocation less the reserve and node-shared bytes."""
    return memory_bytes - reserve_bytes(footprint, settings) - footprint.node_shared_bytes


def _limit(footprint: Footprint, settings: PlanSettings, memory_bytes: int, n: int) -> int:
    """Each of ``n`` workers' memory limit: the fixed one, else an equal share."""
    if settings.memory_limit_bytes is not None:
        return settings.memory_limit_bytes
    return _usable(footprint, settings, memory_bytes) // n


def _for_workers(resources: Resources, settings: PlanSettings) -> PlanSettings:
    """An existing cluster's workers (``resources.workers``) fix the count, the threads and,
    when they have one, each worker's memory limit (the smallest); its scheduler and client
    are not in the workers' memory, so nothing is reserved for them."""
    if not resources.workers:
        return settings
    threads = min(w.threads for w in resources.workers)
    smallest = min(w.memory_limit_bytes for w in resources.workers)
    return replace(
        settings,
        n_workers=len(resources.workers),
        threads_per_worker=threads,
        max_threads_per_worker=threads,
        reserve_bytes=0,
        memory_limit_bytes=smallest if smallest > 0 else settings.memory_limit_bytes,
    )


def min_memory_bytes(
    footprint: Footprint, settings: PlanSettings, chunk: int | None = None, n_workers: int = 1
) -> int:
    """The smallest allocation on which ``n_workers`` workers each run a chunk of ``chunk`` items.

    Checked against the planner's own arithmetic, so planning with exactly this much
    memory succeeds.  A fixed per-worker limit in ``settings`` is ignored here.
    """
    settings = replace(settings, memory_limit_bytes=None)
    chunk = chunk or _smallest_chunk(footprint, settings)
    worker = (
        footprint.fixed_bytes + chunk * footprint.per_item_bytes * settings.threads_per_worker
    ) / settings.memory_fraction
    worker = max(1, math.ceil(worker))
    need = n_workers * worker + reserve_bytes(footprint, settings) + footprint.node_shared_bytes
    # Float rounding in fraction x limit may cost a byte or two: step up until it fits.
    while not _fits(footprint, settings, need, n_workers, chunk):
        need += n_workers
    return need


def _fits(footprint: Footprint, settings: PlanSettings, memory: int, n: int, chunk: int) -> bool:
    """Whether ``n`` workers each running ``chunk`` items fit in ``memory`` bytes."""
    usable = _usable(footprint, settings, memory)
    limit = _limit(footprint, settings, memory, n)
    return usable >= n and _worker_budget(footprint, settings, limit) >= chunk


def _gb_up(n: int) -> str:
    """Decimal GB rounded *up* to 0.1, so 'at least' is never an understatement."""
    return f"{-(-n // 10**8) / 10:.1f} GB"


def _gib_up(n: int) -> str:
    """GiB rounded *up* to 0.01."""
    return f"{-(-n * 100 // 1024**3) / 100:.2f} GiB"


def _gb_down(n: int) -> str:
    """Decimal GB rounded *down* to 0.1, so 'has' is never an overstatement."""
    return f"{n // 10**8 / 10:.1f} GB"


def slurm_mem(need_bytes: int) -> str:
    """SLURM's ``--mem`` value for at least ``need_bytes``: whole ``G`` (SLURM's G is GiB,
    1024**3 bytes), rounded up; at least ``1G``."""
    return f"{max(1, -(-need_bytes // 1024**3))}G"


def min_worker_limit(footprint: Footprint, settings: PlanSettings, chunk: int) -> int:
    """The smallest memory limit of a worker whose threads each run ``chunk`` items."""
    work = footprint.fixed_bytes + chunk * footprint.per_item_bytes * settings.threads_per_worker
    limit = max(1, math.ceil(work / settings.memory_fraction))
    while _worker_budget(footprint, settings, limit) < chunk:  # float rounding: a byte or two
        limit += 1
    return limit


def _holds(footprint: Footprint, settings: PlanSettings, per_worker: int) -> str:
    """'; each worker holds X before any work' when those fixed bytes weigh in; else ''."""
    if footprint.fixed_bytes >= 0.5 * settings.memory_fraction * per_worker:
        return f"; each worker holds {format_bytes(footprint.fixed_bytes)} before any work"
    return ""


def _infeasible(
    footprint: Footprint, resources: Resources, settings: PlanSettings
) -> PlanInfeasibleError:
    if settings.memory_limit_bytes is not None:
        return _infeasible_on_workers(footprint, resources, settings)
    n = settings.n_workers or 1
    need = min_memory_bytes(footprint, settings, settings.chunk_size, n)
    hints = [f"request --mem={slurm_mem(need)} (SLURM's G is GiB)"]
    if settings.n_workers and settings.n_workers > 1:
        hints.append("use fewer workers")
    if settings.chunk_size and settings.chunk_size > settings.min_chunk:
        hints.append(f"lower the chunk size below {settings.chunk_size}")
    hints += list(footprint.shrink_hints)
    per_worker = (need - reserve_bytes(footprint, settings) - footprint.node_shared_bytes) // n
    copies = _holds(footprint, settings, per_worker)
    workers = f" for {n} workers" if n > 1 else ""
    return PlanInfeasibleError(
        f"{footprint.workload} needs at least {_gb_up(need)}{workers} ({_gib_up(need)}{copies}) "
        f"but the allocation has {_gb_down(resources.memory_bytes)} ({resources.memory_source}): "
        + ", or ".join(hints),
        min_memory_bytes=need,
    )


def _infeasible_on_workers(
    footprint: Footprint, resources: Resources, settings: PlanSettings
) -> PlanInfeasibleError:
    """Workers of a fixed memory limit (an existing cluster's) too small for one chunk."""
    chunk = _smallest_chunk(footprint, settings)
    need = min_worker_limit(footprint, settings, chunk)
    need_mib = -(-need // 1024**2)
    hints = [f"start the workers with --memory-limit {need_mib}MiB or more"]
    if chunk > settings.min_chunk:
        hints.append(f"lower the chunk size below {chunk}")
    hints += list(footprint.shrink_hints)
    limit = settings.memory_limit_bytes or 0
    return PlanInfeasibleError(
        f"{footprint.workload} needs workers with a memory limit of at least {need_mib} MiB for "
        f"chunks of {plural(chunk, footprint.item_name)} ({format_bytes(need)}"
        f"{_holds(footprint, settings, need)}) but the workers have {format_bytes(limit)} ({resources.memory_source}): "
        + ", or ".join(hints),
        min_memory_bytes=need * (settings.n_workers or 1),
    )


def _worker_options(
    footprint: Footprint, resources: Resources, settings: PlanSettings
) -> tuple[int, str]:
    """The most workers worth trying and the constraint that caps them."""
    if resources.workers:
        return len(resources.workers), "existing workers"
    if settings.n_workers is not None:
        return settings.n_workers, "n_workers set"
    by_cpu = max(1, resources.cpus // settings.threads_per_worker)
    cap, why = by_cpu, "cpus"
    if settings.max_workers is not None and settings.max_workers < cap:
        cap, why = settings.max_workers, "max_workers"
    min_items = _smallest_chunk(footprint, settings)
    by_items = max(1, math.ceil(footprint.n_items / min_items))
    if by_items < cap:
        cap, why = by_items, "items"
    return cap, why


def _memory_binding(footprint: Footprint, settings: PlanSettings) -> str:
    """Which part of a worker's memory dominates: its fixed copies or its work in flight."""
    work = _smallest_chunk(footprint, settings) * footprint.per_item_bytes
    work *= settings.threads_per_worker
    return "memory (per-worker copies)" if footprint.fixed_bytes >= work else "memory (item size)"


# ------------------------------------------------------------------ plan ----


def make_plan(
    footprint: Footprint, resources: Resources, settings: PlanSettings | None = None
) -> Plan:
    """Choose workers, threads, memory limit and chunk size; raise if nothing fits.

    Invariants: ``predicted_peak_bytes <= memory_fraction x memory_limit_bytes`` and
    ``n_workers x memory_limit_bytes + node-shared bytes + reserve <= memory``.
    """
    settings = _for_workers(resources, settings or PlanSettings())
    notes = []
    if settings.threads_per_worker > resources.cpus:
        notes.append(
            f"threads per worker: {resources.cpus}, not {settings.threads_per_worker}: "
            f"only {resources.cpus} CPUs"
        )
        settings = replace(settings, threads_per_worker=resources.cpus)
    found = _most_workers(footprint, resources, settings)
    if found is None:
        raise _infeasible(footprint, resources, settings)
    n, top, cap_reason = found
    settings, n, top, cap_reason = _fill_cpus_with_threads(
        footprint, resources, settings, (n, top, cap_reason), notes
    )
    threads = settings.threads_per_worker
    fraction = settings.memory_fraction
    limit = _limit(footprint, settings, resources.memory_bytes, n)
    capacity = _worker_budget(footprint, settings, limit)

    chunk, chunk_reason = _choose_chunk(footprint, settings, n, capacity)
    peak = footprint.fixed_bytes + threads * chunk * footprint.per_item_bytes
    if n < top:
        binding = _memory_binding(footprint, settings)
    elif chunk_reason.startswith("memory"):
        binding = "memory (chunk size)"
    else:
        binding = cap_reason

    reasons = _reasons(
        footprint, resources, settings, n, top, cap_reason, limit, chunk, chunk_reason, peak
    )
    reasons += notes
    reasons.append(f"binding constraint: {binding}")
    gpu_batch = _plan_gpu(footprint, resources, settings, n)
    if gpu_batch is not None:
        reasons.append(gpu_batch[1])
    elif settings.use_gpu and not resources.gpus:
        where = f" ({resources.gpus_source})" if resources.gpus_source else ""
        reasons.append(f"GPU asked for but none found{where}: inference runs on the CPUs")
    return Plan(
        n_workers=n,
        threads_per_worker=threads,
        memory_limit_bytes=int(limit),
        chunk_size=int(chunk),
        n_chunks=math.ceil(footprint.n_items / chunk),
        predicted_peak_bytes=int(peak),
        memory_fraction=fraction,
        binding=binding,
        reasons=tuple(reasons),
        footprint=footprint,
        resources=resources,
        gpu_batch_size=gpu_batch[0] if gpu_batch else None,
        thresholds=dict(settings.thresholds),
        reserve_bytes=reserve_bytes(footprint, settings),
    )


def _most_workers(
    footprint: Footprint, resources: Resources, settings: PlanSettings
) -> tuple[int, int, str] | None:
    """(workers that fit, the most worth trying, what caps those) at the settings' threads."""
    top, cap_reason = _worker_options(footprint, resources, settings)
    need = _smallest_chunk(footprint, settings)
    for n in range(top, 0, -1):
        if _fits(footprint, settings, resources.memory_bytes, n, need):
            return n, top, cap_reason
        if settings.n_workers is not None:
            break
    return None


def _fill_cpus_with_threads(
    footprint: Footprint,
    resources: Resources,
    settings: PlanSettings,
    found: tuple[int, int, str],
    notes: list[str],
) -> tuple[PlanSettings, int, int, str]:
    """When per-worker memory leaves CPUs idle, more threads per worker may use them.

    Threads of one worker share its copies.  Only up to ``max_threads_per_worker``
    (1 by default: a workload must be thread-safe, e.g. not Pyro's global handler
    stack); the plan keeping the most CPUs busy wins, with fewer threads on a tie.
    """
    n, top, cap_reason = found
    threads = settings.threads_per_worker
    limit = min(settings.max_threads_per_worker, resources.cpus)
    if settings.n_workers is not None or limit <= threads or n * threads >= resources.cpus:
        return settings, n, top, cap_reason
    best = (n * threads, -threads, settings, found)
    for t in range(threads + 1, limit + 1):
        trial = replace(settings, threads_per_worker=t)
        got = _most_workers(footprint, resources, trial)
        if got is not None and (got[0] * t, -t) > best[:2]:
            best = (got[0] * t, -t, trial, got)
    if best[2] is settings:
        return settings, n, top, cap_reason
    chosen, (m, m_top, m_reason) = best[2], best[3]
    t = chosen.threads_per_worker
    notes.append(
        f"threads: {m} workers x {t} threads keep {m * t} CPUs busy, against {n * threads} with "
        f"{n} worker(s) x {threads}: a worker's threads share its "
        f"{format_bytes(footprint.fixed_bytes)} of fixed bytes (max-threads-per-worker {limit})"
    )
    return chosen, m, m_top, m_reason


def _choose_chunk(
    footprint: Footprint, settings: PlanSettings, n: int, capacity: int
) -> tuple[int, str]:
    item = footprint.item_name
    if settings.chunk_size is not None:
        chunk = min(settings.chunk_size, footprint.n_items)
        return chunk, f"{plural(chunk, item)} per chunk as requested"
    balance = max(
        settings.min_chunk, math.ceil(footprint.n_items / (n * settings.chunks_per_worker))
    )
    options = [
        (capacity, f"memory: the most {item}s whose working set fits under the target"),
        (balance, f"load balance: about {settings.chunks_per_worker} chunks per worker"),
    ]
    if settings.max_chunk is not None:
        options.append((settings.max_chunk, "max-chunk setting"))
    options.append((footprint.n_items, f"all {plural(footprint.n_items, item)} in one chunk"))
    chunk, reason = min(options, key=lambda option: option[0])
    slots = n * settings.threads_per_worker
    even = _even_tail(footprint.n_items, chunk, slots, settings.min_chunk)
    if even != chunk:
        n_items = footprint.n_items
        reason += (
            f"; {math.ceil(n_items / even)} chunks of {even}, not {math.ceil(n_items / chunk)} "
            f"of {chunk}, share out evenly: at most {plural(_span(n_items, even, slots), item)} "
            f"per {'thread' if settings.threads_per_worker > 1 else 'worker'}, "
            f"not {_span(n_items, chunk, slots)}"
        )
    return even, reason


def _span(n_items: int, chunk: int, slots: int) -> int:
    """Items on the busiest of ``slots`` when chunks of ``chunk`` go to whichever is free
    (all items taking the same time): the full chunks dealt round, the short last one to
    a least-loaded slot."""
    full, rest = divmod(n_items, chunk)
    if full % slots:
        return math.ceil(full / slots) * chunk
    return full // slots * chunk + rest


def _even_tail(n_items: int, chunk: int, slots: int, min_chunk: int) -> int:
    """The chunk, at most ``chunk`` and at least ``min_chunk``, that leaves the shortest
    tail: 20 items on 2 workers go as 10 chunks of 2 (10 items each), not 7 of 3 (one
    worker drawing 11 while the other waits after 9).  Tried: the same number of rounds
    of chunks over the slots, or one more round; a smaller chunk (more chunks, each with
    its own overhead) must shorten the busiest slot by at least 1 % (and one item)."""
    if n_items <= chunk * slots:
        return chunk  # one round: every slot takes at most one chunk
    rounds = math.ceil(math.ceil(n_items / chunk) / slots)
    best, best_span = chunk, _span(n_items, chunk, slots)
    for r in (rounds, rounds + 1):
        trial = max(min_chunk, math.ceil(n_items / (r * slots)))
        span = _span(n_items, trial, slots)
        if trial < chunk and span <= best_span - max(1, best_span // 100):
            best, best_span = trial, span
    return best


def _reasons(
    footprint: Footprint,
    resources: Resources,
    settings: PlanSettings,
    n: int,
    top: int,
    cap_reason: str,
    limit: int,
    chunk: int,
    chunk_reason: str,
    peak: int,
) -> list[str]:
    fb = format_bytes
    item = footprint.item_name
    reserve = reserve_bytes(footprint, settings)
    kept = f"{fb(reserve)} kept for scheduler and client"
    if reserve > settings.reserve_bytes:
        kept += f" (the {footprint.workload} driver's measured size; reserve setting {fb(settings.reserve_bytes)})"
    if resources.workers:
        kept = "the scheduler and client are not in the workers' limits"
    reasons = [
        f"allocation: {resources.memory_bytes / 1e9:.1f} GB = {fb(resources.memory_bytes)} "
        f"({resources.memory_source}), {resources.cpus} CPUs ({resources.cpus_source}); {kept}",
    ]
    if footprint.shared_input_bytes:
        how = (
            "memory-mapped: one page-cache copy per node"
            if footprint.shared_input_mmap
            else "copied into every worker"
        )
        reasons.append(f"shared input {fb(footprint.shared_input_bytes)} is {how}")
    if footprint.model_bytes:
        how = "memory-mapped once per node" if footprint.model_mmap else "loaded into every worker"
        reasons.append(f"model weights {fb(footprint.model_bytes)} are {how}")
    cap_text = {
        "cpus": (
            f"one worker per CPU ({resources.cpus} CPUs)"
            if settings.threads_per_worker == 1
            else f"{resources.cpus} CPUs / {settings.threads_per_worker} threads per worker"
        ),
        "max_workers": f"max-workers caps at {settings.max_workers}",
        "items": f"only {plural(footprint.n_items, item)} to share out",
        "n_workers set": f"{settings.n_workers} workers as requested",
        "existing workers": f"planned for the existing cluster's {plural(n, 'worker')} of {fb(limit)} each"
        + ("" if settings.memory_limit_bytes else " (no memory limit on them: an equal share)"),
    }[cap_reason]
    if n == top:
        reasons.append(f"workers: {n}, {cap_text}")
    else:
        what = (
            f"the fixed per-worker bytes ({fb(footprint.fixed_bytes)}: runtime and copies)"
            if _memory_binding(footprint, settings) == "memory (per-worker copies)"
            else f"{fb(footprint.fixed_bytes)} fixed per worker"
        )
        reasons.append(
            f"workers: {n}, not {top} ({cap_text}): with {n + 1} workers each limit would be "
            f"{fb(_usable(footprint, settings, resources.memory_bytes) // (n + 1))} and {what} "
            f"would leave no room for {plural(_smallest_chunk(footprint, settings), item)} of "
            f"{fb(footprint.per_item_bytes)} under {settings.memory_fraction:.0%}"
        )
        idle = resources.cpus - n * settings.threads_per_worker
        if idle > 0:
            fix = (
                "memory-map the shared input (counted once per node) or request more memory"
                if footprint.shared_input_bytes and not footprint.shared_input_mmap
                else "request more memory or shrink the work per item"
            )
            if settings.max_threads_per_worker <= settings.threads_per_worker:
                fix += ", or allow threads (max-threads-per-worker) if the work is thread-safe"
            reasons.append(f"{idle} of {resources.cpus} CPUs stay idle: to use them, {fix}")
    reasons.append(
        f"chunk: {plural(chunk, item)} at {fb(footprint.per_item_bytes)} each ({chunk_reason})"
    )
    return reasons + _peak_reasons(footprint, settings, chunk, peak, limit)


def _peak_reasons(
    footprint: Footprint, settings: PlanSettings, chunk: int, peak: int, limit: int
) -> list[str]:
    """The predicted peak, and where the footprint's constants came from."""
    fb = format_bytes
    peak_line = (
        f"predicted peak per worker: {fb(peak)} = {fb(footprint.fixed_bytes)} fixed + "
        f"{settings.threads_per_worker} x {chunk} x {fb(footprint.per_item_bytes)}; "
        f"{peak / limit:.0%} of the {fb(limit)} memory limit (memory fraction {settings.memory_fraction:.0%}); "
        f"footprint {footprint.source}"
    )
    constants = [f"footprint constants: {footprint.constants}"] if footprint.constants else []
    return [peak_line, *constants]


def _plan_gpu(
    footprint: Footprint, resources: Resources, settings: PlanSettings, n_workers: int
) -> tuple[int, str] | None:
    if not settings.use_gpu or not resources.gpus or footprint.gpu_per_item_bytes <= 0:
        return None
    sharing = math.ceil(n_workers / len(resources.gpus))
    free = min(gpu.free_bytes for gpu in resources.gpus) // sharing
    batch = gpu_batch_size(
        free, footprint.gpu_fixed_bytes, footprint.gpu_per_item_bytes, settings.gpu_memory_fraction
    )
    if batch < 1:
        raise PlanInfeasibleError(
            f"the GPU has {format_bytes(free)} free per worker, less than the "
            f"{format_bytes(footprint.gpu_fixed_bytes + footprint.gpu_per_item_bytes)} one item needs: "
            "free the GPU or run without --use-gpu"
        )
    return batch, (
        f"GPU batch: {batch} items = {settings.gpu_memory_fraction:.0%} of {format_bytes(free)} free per worker, "
        f"less {format_bytes(footprint.gpu_fixed_bytes)} fixed, at {format_bytes(footprint.gpu_per_item_bytes)} each"
    )


def with_source(footprint: Footprint, source: str) -> Footprint:
    return replace(footprint, source=source)
