"""``hpcbatch.map``: run your own function over your items, as hpcbatch runs its workloads.

::

    import hpcbatch

    def embed(batch):                      # one chunk of items in, one result per item out
        return [len(text) for text in batch]

    lengths = hpcbatch.map(embed, texts)   # planned, split on MemoryError, resumable

``fn`` receives one chunk of ``items``: a list, or a numpy array (the chunk's rows) when
``items`` is a numpy array; it returns one result per item (a list, an array, or a dict
of equally long columns).  With ``per_item=True`` it is called once per item instead.

The run is a :class:`~hpcbatch.workload.Job` of the built-in :class:`FunctionWorkload`
handed to :func:`hpcbatch.pipeline.run_job`: the same planning, cluster, bounded
submission, split-and-retry on memory errors, ledger, resume and report as ``hpcbatch
run``.  Without ``footprint=`` the memory ``fn`` needs is measured first: ``fn`` (pickled
with cloudpickle, so it may live in ``__main__`` or a notebook) runs on two small chunks
in fresh processes and a line through their peak RSS gives the fixed and per-item bytes
(the plan's footprint source says ``measured: ...``).

Where results go: see :mod:`hpcbatch.sinks` (returned, zarr, Parquet, SQL).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import config as hb_config
from .calibrate import calibrate
from .errors import CalibrationError, ConfigError
from .pipeline import ClusterChoice, RunRequest, load_settings, run_job
from .planner import Footprint, Plan
from .runner import Chunk, TaskContext
from .security import private_dir
from .sinks import MapSink, sink_for
from .workload import Job, RunContext, RunIdentity, Workload

log = logging.getLogger(__name__)

PROBE = "hpcbatch.api:_function_probe"
PROBE_SIZES = (4, 16)
_SAMPLE_MAX = 256  # items shipped to the probe (its sizes may grow to 16 x the second)


class FunctionWorkload(Workload):
    """The workload of :func:`map`: a user's function over a user's items."""

    name = "map"
    help = "A Python function over a list or array of items (hpcbatch.map)."
    probe = PROBE
    probe_sizes = PROBE_SIZES


FUNCTION_WORKLOAD = FunctionWorkload()


class Results(list):
    """The returned values of :func:`map`, in item order; ``report`` is the run's report."""

    report: Any = None


@dataclass(frozen=True)
class MapTask:
    """The worker's task: ``fn`` on the chunk's items, the results to the sink."""

    fn: Callable
    sink: MapSink
    per_item: bool
    as_array: bool

    def __call__(self, chunk: Chunk, ctx: TaskContext) -> dict:
        batch: Any = list(chunk.items)
        if self.as_array:
            import numpy as np

            batch = np.stack(batch) if batch else np.empty(0)
        results = [self.fn(x) for x in batch] if self.per_item else self.fn(batch)
        results = as_results(results, chunk.size)
        return {"items": chunk.size, **self.sink.write(chunk, results, ctx.run_id)}


def as_results(results: Any, n: int) -> Sequence:
    """``fn``'s return value as one result per item (a dict of columns becomes rows)."""
    if isinstance(results, Mapping):
        columns = {k: list(v) for k, v in results.items()}
        results = [
            dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)
        ]
    if results is None or not hasattr(results, "__len__") or len(results) != n:
        got = "None" if results is None else f"{len(results) if hasattr(results, '__len__') else 1}"
        raise TypeError(f"fn returned {got} results for a chunk of {n} items: return one per item")
    return results


class MapJob(Job):
    """One :func:`map` run: the items, the sink, the measured or given footprint."""

    def __init__(self, items: Sequence, task: MapTask, footprint: Footprint, identity: RunIdentity,
                 chunk_size: int | None, sample: Any, resume: bool):  # fmt: skip
        self.workload = FUNCTION_WORKLOAD
        self.items, self.map_task, self.footprint = items, task, footprint
        self.identity, self.chunk_size, self.sample = identity, chunk_size, sample
        self.sink = task.sink.workload_sink()
        self.resume = resume

    def plan_overrides(self) -> dict:
        return {"chunk_size": self.chunk_size}

    def task(self, plan: Plan, run: RunContext) -> MapTask:
        sink = self.map_task.sink
        sample = self.sample
        if sink.needs_sample and sample is None:
            sample = sample_result(self.map_task, self.items)
        sink.open(run.run_id, self.n_items, plan.chunk_size, sample, self.resume)
        return self.map_task

    def finish(self, report: Any) -> Any:
        value = self.map_task.sink.finish(report.run_id, self.n_items)
        if value is None:
            return report
        results = Results(value)
        results.report = report
        return results


def sample_result(task: MapTask, items: Sequence) -> Any:
    """``fn`` on the first item, in this process (the sink's dtype or columns)."""
    batch = items[:1] if task.as_array else list(items[:1])
    out = [task.fn(x) for x in batch] if task.per_item else task.fn(batch)
    return as_results(out, 1)


# --------------------------------------------------------------- checks ----


def _check_items(fn: Any, items: Any) -> tuple[Sequence, bool]:
    if not callable(fn):
        raise ConfigError(f"fn must be callable, got {type(fn).__name__}: pass a function")
    as_array = hasattr(items, "shape") and hasattr(items, "dtype")
    if as_array and getattr(items, "ndim", 0) < 1:
        raise ConfigError("items is a 0-d array: give an array with one row per item")
    if not as_array:
        if isinstance(items, (str, bytes, Mapping)) or not hasattr(items, "__iter__"):
            raise ConfigError(
                f"items must be a list, tuple, range or array, got {type(items).__name__}"
            )
        items = items if isinstance(items, (list, tuple, range)) else list(items)
    if len(items) == 0:
        raise ConfigError("items is empty: nothing to run")
    return items, as_array


def _fn_name(fn: Callable) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def items_hash(items: Sequence, as_array: bool) -> str:
    """A hash of the items (an array's buffer, or the pickled list)."""
    h = hashlib.blake2b(digest_size=10)
    if as_array:
        import numpy as np

        array = np.ascontiguousarray(items)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(memoryview(array).cast("B"))
    else:
        try:
            h.update(pickle.dumps(list(items), protocol=4))
        except Exception:  # noqa: BLE001 (objects pickle's default cannot take)
            import cloudpickle

            h.update(cloudpickle.dumps(list(items)))
    return h.hexdigest()


def run_identity(fn: Callable, items_key: str, out: Any, table: Any, chunk_size: Any,
                 per_item: bool) -> RunIdentity:  # fmt: skip
    """The run id: the function's name + a hash of the items, the output and the chunking."""
    params = {"function": _fn_name(fn), "items": items_key, "per_item": per_item,
              "out": None if out is None else str(out), "table": table,
              "chunk_size": chunk_size}  # fmt: skip
    digest = hashlib.blake2b(repr(sorted(params.items())).encode(), digest_size=6).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9_]+", "-", getattr(fn, "__name__", "fn"))[:40].strip("-")
    return RunIdentity(f"map-{slug or 'fn'}-{digest}", params)


# ------------------------------------------------------------ footprint ----


def given_footprint(footprint: Any, n_items: int) -> Footprint:
    """``footprint=`` as a Footprint: one already, or ``{"per_item_bytes", "fixed_bytes"}``."""
    if isinstance(footprint, Footprint):
        return replace(footprint, n_items=n_items)
    if not isinstance(footprint, Mapping):
        raise ConfigError("footprint= must be a hpcbatch.Footprint or a dict of per_item_bytes, "
                          "fixed_bytes")  # fmt: skip
    unknown = set(footprint) - {"per_item_bytes", "fixed_bytes"}
    if unknown or "per_item_bytes" not in footprint:
        raise ConfigError(
            f"footprint={dict(footprint)!r}: give per_item_bytes and optionally fixed_bytes"
        )
    return Footprint(
        workload="map", item_name="item", n_items=n_items,
        per_item_bytes=int(footprint["per_item_bytes"]),
        baseline_bytes=int(footprint.get("fixed_bytes", 0)), source="given (footprint=)",
    )  # fmt: skip


def measure_footprint(
    task: MapTask, items: Sequence, sizes: tuple[int, int]
) -> tuple[Footprint, Any]:
    """Run ``fn`` on two small chunks in fresh processes; fit fixed + per-item bytes.

    Returns the footprint (source ``measured: ...``) and one item's result (from the
    probe, so the sink learns its dtype or columns without running ``fn`` here).
    """
    import cloudpickle

    base = private_dir(Path(tempfile.gettempdir()) / f"hpcbatch-map-{os.getuid()}")
    fd, path = tempfile.mkstemp(prefix="probe-", suffix=".pkl", dir=base)
    sample = items[: min(len(items), _SAMPLE_MAX)]
    try:
        with os.fdopen(fd, "wb") as f:  # the driver's sys.path first: fn's module may need it
            pickle.dump(list(sys.path), f)
            cloudpickle.dump((task.fn, list(sample), task.per_item, task.as_array), f)
        try:
            cal = calibrate(PROBE, sizes, {"path": path}, max_size=len(items))
        except CalibrationError as exc:
            raise ConfigError(
                f"measuring {_fn_name(task.fn)}'s memory failed ({exc}): fix fn, or give "
                "footprint={'per_item_bytes': ..., 'fixed_bytes': ...}"
            ) from None
        result_path = Path(path + ".result")
        first = pickle.loads(result_path.read_bytes()) if result_path.exists() else None
    finally:
        Path(path).unlink(missing_ok=True)
        Path(path + ".result").unlink(missing_ok=True)
    source = cal.source.replace(
        "calibrated (", f"measured: {_fn_name(task.fn)} in fresh processes ("
    )
    fp = Footprint(workload="map", item_name="item", n_items=len(items),
                   per_item_bytes=cal.per_item_bytes, baseline_bytes=cal.fixed_bytes,
                   source=source, shrink_hints=cal.notes)  # fmt: skip
    log.info("footprint of %s: %s", _fn_name(task.fn), source)
    return fp, first


def _function_probe(size: int, path: str) -> None:
    """The calibration probe: unpickle ``fn`` and its sample, run it on ``size`` items."""
    import cloudpickle

    with open(path, "rb") as f:
        sys.path.extend(p for p in pickle.load(f) if p not in sys.path)
        fn, sample, per_item, as_array = cloudpickle.load(f)
    if size == 0:
        return
    batch: Any = list(itertools.islice(itertools.cycle(sample), size))
    if as_array:
        import numpy as np

        batch = np.stack(batch)
    out = [fn(x) for x in batch] if per_item else fn(batch)
    results = as_results(out, size)
    first = Path(path + ".result")
    if not first.exists():
        first.write_bytes(pickle.dumps(list(results[:1])))


# ------------------------------------------------------------------ map ----


def _terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def map(  # noqa: A001 (hpcbatch.map, like the builtin, over a user's function)
    fn: Callable,
    items: Sequence,
    *,
    out: Any = None,
    table: str | None = None,
    resume: bool = False,
    client: Any = None,
    cluster: str | None = None,
    footprint: Footprint | Mapping[str, int] | None = None,
    chunk_size: int | None = None,
    per_item: bool = False,
    run_id: str | None = None,
    report_dir: str | None = None,
    settings: Mapping[str, Any] | None = None,
    resources: Any = None,
    probe_sizes: tuple[int, int] = PROBE_SIZES,
    scratch: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> Any:
    """Run ``fn`` over ``items`` in planned chunks; see the module docstring.

    Returns the results in item order (a list with ``.report``) when ``out`` is None,
    else the :class:`~hpcbatch.report.RunReport` (results are in ``out``).

    ``out``: ``"x.zarr"``, ``"dir.parquet"`` or a database URL with ``table=``.
    ``resume``: run only the chunks a failed or interrupted run did not finish.
    ``client``: a ``distributed.Client`` to run on (planned for its workers);
    ``cluster``: ``local``, ``slurm`` or a scheduler address (default from config).
    ``footprint``: skip the measurement (``{"per_item_bytes": .., "fixed_bytes": ..}``).
    ``chunk_size``: fix the items per chunk (default: planned).
    ``scratch``: where returned values wait for the driver (a shared directory on SLURM).
    ``progress``: print the cluster's dashboard line and progress on stderr (default
    ``None``: only when stderr is a terminal); the progress lines are logged on the
    ``hpcbatch.progress`` logger (INFO) either way.
    """
    items, as_array = _check_items(fn, items)
    if isinstance(client, str):
        raise ConfigError(
            f"client={client!r} is not supported by hpcbatch.map yet: leave client=None "
            "(a planned local cluster), pass cluster='slurm', or a distributed.Client"
        )
    if chunk_size is not None:
        hb_config.require_positive("chunk_size", chunk_size)
    settings = dict(settings) if settings is not None else load_settings()
    identity = run_identity(fn, items_hash(items, as_array), out, table, chunk_size, per_item)
    sink = sink_for(out, table, run_id or identity.run_id, scratch)
    if not resume:
        sink.reset()
    sink.check()
    task = MapTask(fn, sink, per_item, as_array)
    sample = None
    if footprint is None:
        fp, sample = measure_footprint(task, items, probe_sizes)
    else:
        fp = given_footprint(footprint, len(items))
    job = MapJob(items, task, fp, identity, chunk_size, sample, resume)
    request = RunRequest(
        cluster=ClusterChoice.parse(cluster, settings), resources=resources, client=client,
        resume=resume, run_id=run_id, report_dir=report_dir, progress=progress,
        quiet=not (progress or (progress is None and _terminal())), calibrate=False,
    )  # fmt: skip
    return run_job(job, settings, request)
