"""``hpcbatch.predictive.sample``: Predictive(parallel=True) in planned chunks over Dask.

The shell around :mod:`hpcbatch.predictive.core`: checks the input, plans the chunk
size, writes large inputs once for memory-mapping (:mod:`~hpcbatch.predictive.shared`),
creates the zarr store, hands chunk tasks to :func:`hpcbatch.runner.run` and returns
the samples (a dict of numpy arrays, or the zarr group with ``out=``).

Seeds: chunk ``c`` (ids ``c000000``, ``c000001``, ...; halves of a split chunk
``c000003.0``/``c000003.1``) runs with ``pyro.set_rng_seed(chunk_seed(seed, c) % 2**32)``
(:func:`hpcbatch.runner.chunk_seed`), then exactly Pyro's Predictive code for its
samples.  So a one-chunk run equals ``pyro.set_rng_seed(chunk_seed(seed, "c000000") % 2**32);
Predictive(..., parallel=True)(*args, **kwargs)``, and any chunk can be reproduced
alone.  Results depend on the chunking, never on the number of workers.

Zarr layout: one array per site, shaped as Predictive's output; along the samples a
zarr chunk holds a divisor of the planned chunk size (at most 16 MiB; one cell block
along the data plate), so planned chunks never share a zarr chunk.  Only the two
halves of a chunk split after running out of memory can share one; they take an
``flock`` on it for their write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from ..errors import ChunkFailedError, ConfigError, HpcbatchError, RunInterrupted
from ..security import private_dir
from . import core, shared
from .footprint import auto_block, sampling_footprint

# Pyro keeps its handler stack and param store in module globals: one draw per process
# at a time (threads of one worker take turns; torch still uses all intra-op threads).
_PYRO_LOCK = threading.Lock()
# Largest zarr chunk written by one task (bigger sites get one sample per zarr chunk).
ZARR_CHUNK_BYTES = 16 * 1024**2
_JOBS: dict[str, SamplingJob] = {}
_ARRAYS: dict[tuple[str, str], Any] = {}
RESUME_HINT = "rerun the same command with --resume"


@dataclass(frozen=True)
class SamplingJob:
    """Everything a worker needs for any chunk; pickled once to a file, loaded once."""

    model: Callable
    guide: Callable | None
    posterior: dict
    model_args: tuple
    model_kwargs: dict
    layout: core.Layout
    data_plate: str | None
    block: int | None
    guide_param_state: dict | None = None


@dataclass
class SampleRun:
    """The result of :func:`run_sampling`: samples, the run report and the plan."""

    samples: Any
    report: Any
    plan: Any
    layout: core.Layout
    block: int | None


# -------------------------------------------------------------- worker side --


def _load_job(path: str) -> SamplingJob:
    job = _JOBS.get(path)
    if job is None:
        import cloudpickle

        with open(path, "rb") as handle:
            job = cloudpickle.load(handle)
        _JOBS.clear()  # one run's job per process at a time: drop the last run's maps
        shared.forget_open()
        _JOBS[path] = job
    return job


def _zarr_array(out: str, site: str):
    import zarr

    key = (out, site)
    array = _ARRAYS.get(key)
    if array is None:
        array = zarr.open_array(store=os.path.join(out, site), mode="r+")
        _ARRAYS[key] = array
    return array


def _write(out: str, site: core.SiteLayout, start: int, stop: int, value, rows=None) -> int:
    array = np.ascontiguousarray(value.detach().cpu().numpy() if torch.is_tensor(value) else value)
    region = [slice(start, stop)] + [slice(None)] * (len(site.shape) - 1)
    if rows is not None:
        region[site.plate_axis] = slice(*rows)
    target = tuple(len(range(*r.indices(n))) for r, n in zip(region, site.shape, strict=True))
    if array.shape != target:
        array = np.broadcast_to(array, target)
    zarr_array = _zarr_array(out, site.name)
    edges = _partial_chunks(start, stop, zarr_array.chunks[0], site.shape[0])
    with _chunk_locks(out, site.name, edges, rows):
        zarr_array[tuple(region)] = array.astype(site.dtype, copy=False)
    return int(array.nbytes)


def _partial_chunks(start: int, stop: int, z: int, n: int) -> list[int]:
    """Zarr chunks along samples that ``start:stop`` covers only in part."""
    edges = set()
    if start % z:
        edges.add(start // z)
    if stop % z and stop != n:
        edges.add((stop - 1) // z)
    return sorted(edges)


@contextmanager
def _chunk_locks(out: str, site: str, edges: list[int], rows) -> Iterator[None]:
    """Lock zarr chunks shared with another task (only halves of a split chunk do that).

    Planned chunks are whole zarr chunks (their length divides the chunk size), so
    this is a no-op except after an out-of-memory split; ``flock`` serialises the two
    halves' read-modify-write of the chunk they share.
    """
    if not edges:
        yield
        return
    import fcntl

    lock_dir = Path(out) / ".hpcbatch-locks"
    lock_dir.mkdir(exist_ok=True)
    handles = []
    try:
        for index in edges:
            tag = f"{site}.{index}" + (f".{rows[0]}" if rows else "")
            handle = open(lock_dir / tag, "w")  # noqa: SIM115  (held until the write is done)
            fcntl.flock(handle, fcntl.LOCK_EX)
            handles.append(handle)
        yield
    finally:
        for handle in handles:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def samples_per_zarr_chunk(per_sample_bytes: int, chunk_size: int) -> int:
    """Samples per zarr chunk: a divisor of the chunk size, at most ``ZARR_CHUNK_BYTES``."""
    z = max(1, min(chunk_size, ZARR_CHUNK_BYTES // max(1, per_sample_bytes)))
    while chunk_size % z:
        z -= 1
    return z


def pyro_seed(chunk_seed: int) -> int:
    """The ``pyro.set_rng_seed`` value of a chunk: its 63-bit seed folded to numpy's 32 bits."""
    return int(chunk_seed) % 2**32


def draw_chunk(job: SamplingJob, start: int, stop: int, seed: int, emit) -> None:
    """Draw samples ``start:stop`` with ``seed``; ``emit(site, value, rows)`` each piece."""
    layout = job.layout
    n = stop - start
    args, kwargs = shared.resolve_all(job.model_args, job.model_kwargs)
    posterior = {k: shared.resolve(v)[start:stop] for k, v in job.posterior.items()}
    pyro.set_rng_seed(pyro_seed(seed))
    sites = {s.name: s for s in layout.sites}
    if not layout.needs_blocks:
        model_args, model_kwargs = args, kwargs
        if job.data_plate is not None:
            # No returned site lies in the plate: one row keeps the likelihood tiny.
            model_args, model_kwargs = core.slice_rows(
                args, kwargs, layout.split_positions, layout.split_names, 0, 1
            )
        draws = core.predictive_draw(
            job.model,
            guide=job.guide,
            posterior=posterior,
            num_samples=n,
            model_args=model_args,
            model_kwargs=model_kwargs,
            return_sites=layout.names,
            guide_args=args,
            guide_kwargs=kwargs,
        )
        for name, value in draws.items():
            emit(sites[name], value, None)
        return
    if job.guide is not None:
        posterior = core.guide_draw(job.guide, n, args, kwargs)
    for row_start, row_stop, draws in core.draw_blocks(
        job.model,
        posterior=posterior,
        num_samples=n,
        model_args=args,
        model_kwargs=kwargs,
        layout=layout,
        block=job.block,
    ):
        for name, value in draws.items():
            site = sites[name]
            if site.plate_axis is not None:
                emit(site, value, (row_start, row_stop))
            elif row_start == 0:
                emit(site, value, None)


def sample_chunk_task(chunk, ctx, *, job_path: str, out: str) -> dict:
    """The runner's task: draw one chunk and write its zarr regions on the worker."""
    job = _load_job(job_path)
    written = 0

    def emit(site, value, rows):
        nonlocal written
        written += _write(out, site, chunk.start, chunk.stop, value, rows)

    # Argument validation is off inside chunks (it costs ~15 % and draws no random
    # numbers, so results are unchanged); the client's test run validated the model.
    with _PYRO_LOCK, pyro.get_param_store().scope(), pyro.validation_enabled(False):
        _restore_guide_params(job)
        try:
            draw_chunk(job, chunk.start, chunk.stop, ctx.seed, emit)
        except RuntimeError as exc:
            # torch's CPU allocator failing is a memory failure: the runner halves the chunk.
            if "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
                raise MemoryError(core._describe(exc)) from exc
            raise
    return {"samples": chunk.stop - chunk.start, "bytes_written": written}


def _chunk_error(chunk, exc: BaseException) -> ChunkFailedError:
    return ChunkFailedError(
        f"chunk {chunk.chunk_id} (samples {chunk.start}-{chunk.stop - 1}) failed: "
        f"{core._describe(exc)}: fix the model, or reproduce it alone with its seed",
        chunk_id=chunk.chunk_id,
    )


def _restore_guide_params(job: SamplingJob) -> None:
    """Put a guide's params into the (scoped, empty) param store of this process."""
    if not job.guide_param_state:
        return
    pyro.get_param_store().set_state(job.guide_param_state)


# -------------------------------------------------------------- client side --


def ledger_path(out: str | os.PathLike) -> Path:
    """The SQLite run ledger of the zarr store ``out``: ``<out>.ledger.db`` beside it."""
    path = Path(out)
    return path.with_name(path.name + ".ledger.db")


def _remove_ledger(out: Path) -> None:
    base = ledger_path(out)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(base) + suffix).unlink(missing_ok=True)


def _n_done(out: Path, run_id: str) -> int:
    """Chunks of ``run_id`` recorded in the ledger beside ``out`` (0 if none or unreadable)."""
    from ..ledger import Ledger

    if not ledger_path(out).exists():
        return 0
    ledger = Ledger(f"sqlite:///{ledger_path(out).absolute()}")
    try:
        return len(ledger.done_ids(run_id))
    except Exception:  # noqa: BLE001 (no tables yet: the run never started)
        return 0
    finally:
        ledger.engine.dispose()


def _check_out(
    out: str | os.PathLike | None, overwrite: bool, resume: bool = False
) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if resume and overwrite:
        raise ConfigError("pass either resume=True (--resume) or overwrite=True (--overwrite)")
    if path.exists() and not overwrite and not resume:
        if ledger_path(path).exists():
            raise ConfigError(
                f"output {path} already exists with a run ledger: pass resume=True (--resume) "
                "to continue or confirm it, or overwrite=True (--overwrite) to start again"
            )
        raise ConfigError(
            f"output {path} already exists: choose another path or pass overwrite=True "
            "(--overwrite)"
        )
    parent = path.absolute().parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {path}: directory {parent} is not writable")
    return path


def _check_counts(num_samples, posterior_samples, guide) -> dict:
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise ConfigError(f"num_samples must be a whole number, got {num_samples!r}")
    if num_samples <= 0:
        raise ConfigError(f"num_samples must be positive, got {num_samples}")
    if guide is not None and posterior_samples:
        raise ConfigError("pass either guide or posterior_samples, not both")
    posterior = {}
    for name, value in (posterior_samples or {}).items():
        tensor = value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))
        if tensor.ndim == 0 or tensor.shape[0] != num_samples:
            raise ConfigError(
                f"posterior_samples[{name!r}] has {tensor.shape[0] if tensor.ndim else 0} "
                f"samples but num_samples is {num_samples}: they must agree"
            )
        posterior[name] = tensor
    return posterior


def portable_guide(guide):
    """The guide without the data its prototype trace holds, for pickling to workers.

    An autoguide keeps the trace of the model run it was built on: the observed data
    (``_INPUT`` args, observed values, likelihood parameters) of that run, often the
    whole counts matrix.  Only its latent sites are needed to draw; everything else is
    dropped (a shallow copy; the caller's guide is unchanged) and latent values that
    are views of larger tensors are cut to their own size.
    """
    trace = getattr(guide, "prototype_trace", None)
    if trace is None or not isinstance(guide, torch.nn.Module):
        return guide
    slim = trace.copy()
    for name, site in list(slim.nodes.items()):
        if site["type"] != "sample" or site["is_observed"]:
            slim.remove_node(name)
            continue
        site = dict(site)
        site["value"] = site["value"].detach().clone()
        site.pop("args", None)
        site.pop("kwargs", None)
        slim.nodes[name] = site
    import copy

    light = copy.copy(guide)
    light.__dict__["prototype_trace"] = slim
    return light


def _guide_state(guide) -> dict | None:
    """The param-store entries a guide reads (a plain callable guide's ``pyro.param`` s)."""
    if guide is None or isinstance(guide, torch.nn.Module):
        return None
    state = pyro.get_param_store().get_state()
    return state if state["params"] else None


def choose_block(layout: core.Layout, cell_block: int | str | None) -> int | None:
    """Rows of the data plate per model run (only when a returned site lies in it)."""
    if not layout.needs_blocks:
        return None
    n_rows = layout.plate_size or 1
    if cell_block not in (None, "auto"):
        block = int(cell_block)
        if block < 1:
            raise ConfigError(f"cell_block must be at least 1, got {cell_block}")
        return min(block, n_rows)
    return auto_block(n_rows, layout.per_sample_bytes(in_plate=True))


def _digest(obj: Any, h) -> None:
    """Feed ``obj`` (tensors, arrays, containers, scalars) into the hash ``h``."""
    obj = shared.resolve(obj)
    if torch.is_tensor(obj):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        h.update(f"a{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj))  # the buffer itself: no copy of a memmap
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=str):
            h.update(repr(key).encode())
            _digest(obj[key], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _digest(item, h)
        h.update(b"]")
    elif obj is None or isinstance(obj, (bool, int, float, str, np.generic)):
        h.update(repr(obj).encode())
    else:
        h.update(_qualname(obj).encode())


def _qualname(obj: Any) -> str:
    if obj is None:
        return "None"
    target = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"


def run_params(
    model: Callable,
    guide: Callable | None,
    posterior: Mapping,
    model_args: tuple,
    model_kwargs: Mapping,
    layout: core.Layout,
    *,
    num_samples: int,
    seed: int,
    chunk_size: int | str | None,
    block: int | None,
    data_plate: str | None,
) -> dict:
    """What defines a run's samples (recorded in the ledger and the store; resume must match).

    The model and guide by name, a digest of the inputs, the posterior samples and a
    guide's parameters, the samples, seed, requested chunking and returned sites.
    """
    h = hashlib.sha1()
    _digest((model_args, dict(model_kwargs), dict(posterior)), h)
    if isinstance(guide, torch.nn.Module):
        _digest(dict(guide.state_dict()), h)
    state = _guide_state(guide)
    if state:
        _digest(dict(state["params"]), h)
    return {
        "model": _qualname(model),
        "guide": _qualname(guide),
        "inputs": h.hexdigest()[:16],
        "num_samples": int(num_samples),
        "seed": int(seed),
        "chunk_size": "auto" if chunk_size in ("auto", None) else int(chunk_size),
        "cell_block": block,
        "data_plate": data_plate,
        "sites": {s.name: [list(s.shape), str(s.dtype)] for s in layout.sites},
    }


def default_run_id(params: Mapping) -> str:
    """Same inputs and settings -> same run id, so ``--resume`` finds the earlier run."""
    key = json.dumps(params, sort_keys=True, default=str)
    return "predictive-" + hashlib.sha1(key.encode()).hexdigest()[:12]


def _recorded(path: Path, run_id: str, params: Mapping) -> dict:
    """The hpcbatch attributes of an existing store to resume; refuse another run's store."""
    import zarr

    try:
        recorded = dict(zarr.open_group(store=str(path), mode="r").attrs.get("hpcbatch") or {})
    except Exception:  # noqa: BLE001 (not a zarr group at all)
        recorded = {}
    if not recorded:
        raise ConfigError(
            f"cannot resume {path}: it is not an hpcbatch predictive store: "
            "choose another --out or pass --overwrite"
        )
    if recorded.get("run_id") != run_id and recorded.get("params") is None:
        raise ConfigError(
            f"cannot resume {path}: it was written without a ledger (an in-process or "
            "in-memory run): choose another --out or pass --overwrite"
        )
    if recorded.get("run_id") != run_id:
        old = recorded.get("params") or {}
        diffs = [
            f"{k} {old.get(k)!r} -> {params.get(k)!r}"
            for k in sorted(set(old) | set(params))
            if json.dumps(old.get(k), default=str) != json.dumps(params.get(k), default=str)
        ]
        what = "; ".join(diffs) if diffs else f"run {recorded.get('run_id')!r}"
        raise ConfigError(
            f"cannot resume {path}: it was written with other parameters ({what}): "
            "rerun with the original settings, or pass --overwrite to start again"
        )
    return recorded


def _create_store(
    path: Path, layout: core.Layout, block: int | None, compress: bool, attrs, chunk_size: int
):
    import zarr

    if path.exists():
        shutil.rmtree(path)
    group = zarr.open_group(store=str(path), mode="w")
    for site in layout.sites:
        chunks = [1] + list(site.shape[1:])
        per_sample = site.per_sample_bytes
        if site.plate_axis is not None and block:
            chunks[site.plate_axis] = block
            per_sample = per_sample // max(1, site.shape[site.plate_axis]) * block
        chunks[0] = samples_per_zarr_chunk(per_sample, chunk_size)
        # Uncompressed by default: zstd costs ~15 % of the sampling time with
        # observations (measured, N=300 x T=4,000) and float draws barely compress;
        # compress=True shrinks stores of counts.
        options = {} if compress else {"compressors": None}
        group.create_array(
            site.name,
            shape=site.shape,
            chunks=tuple(max(1, c) for c in chunks),
            dtype=site.dtype,
            fill_value=0,
            **options,
        )
    group.attrs.update(attrs)
    return group


def _resources_of(client, detect):
    from ..resources import Resources

    info = (
        client.scheduler_info(n_workers=-1)
        if _accepts_n_workers(client)
        else client.scheduler_info()
    )
    workers = info.get("workers", {})
    if not workers:
        raise ConfigError("the Dask client has no workers: start workers or pass client=None")
    limits = [w.get("memory_limit") or 0 for w in workers.values()]
    threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
    if min(limits) <= 0:
        return detect(), len(workers)
    return (
        Resources(
            memory_bytes=int(sum(limits)),
            memory_source=f"memory_limit of {len(workers)} Dask workers",
            cpus=threads,
            cpus_source="threads of the Dask workers",
        ),
        len(workers),
    )


def _accepts_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def _plan(footprint, client, settings, chunk_size, memory_fraction, resources=None):
    from .. import config as hb_config
    from ..planner import make_plan
    from ..resources import detect_resources

    overrides = {"chunk_size": chunk_size}
    if memory_fraction is not None:
        overrides["memory_fraction"] = memory_fraction
    if client is not None and client != "sync":
        resources, n_workers = _resources_of(client, detect_resources)
        overrides["n_workers"] = n_workers
        overrides["reserve_bytes"] = 0
        overrides["threads_per_worker"] = 1
    else:
        resources = resources or detect_resources()
        if client == "sync":
            # One process, chunks in turn: no load balancing, the largest chunk that fits.
            overrides["n_workers"] = 1
            overrides["chunks_per_worker"] = 1
    plan_settings = hb_config.plan_settings(settings, **overrides)
    return make_plan(footprint, resources, plan_settings)


@dataclass
class _Request:
    """One sampling run as checked by :func:`run_sampling`, handed down whole."""

    model: Callable
    guide: Callable | None
    posterior: Mapping | None
    model_args: tuple
    model_kwargs: dict
    layout: core.Layout
    block: int | None
    data_plate: str | None
    num_samples: int
    seed: int
    client: Any
    settings: dict
    chunk_size: int | str | None
    memory_fraction: float | None
    resources: Any
    footprint: Any
    scratch: Path
    out_path: Path | None
    compress: bool
    run_id: str
    report_dir: str | os.PathLike | None
    progress: bool
    cluster_backend: str | None
    params: dict | None = None  # set when the run keeps a ledger (out= on a cluster)
    resuming: bool = False
    started: bool = False

    @property
    def in_process(self) -> bool:
        return self.client == "sync"


def run_sampling(
    model: Callable,
    *,
    guide: Callable | None = None,
    posterior_samples: Mapping | None = None,
    num_samples: int,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    return_sites: Sequence[str] | None = None,
    data_plate: str | None = None,
    split_args: Sequence | None = None,
    chunk_size: int | str = "auto",
    client: Any = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    memory_fraction: float | None = None,
    overwrite: bool = False,
    cell_block: int | str | None = "auto",
    footprint=None,
    resources=None,
    settings: Mapping | None = None,
    cluster_backend: str | None = None,
    shared_dir: str | os.PathLike | None = None,
    compress: bool = False,
    run_id: str | None = None,
    report_dir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = False,
) -> SampleRun:
    """:func:`sample` with everything around it: the plan, the run report, notes.

    With ``out`` and a Dask cluster the run is recorded in a SQLite ledger beside the
    store (:func:`ledger_path`) under a run id derived from :func:`run_params`; a
    failed or interrupted run keeps its store and ledger, and ``resume=True`` runs
    only the chunks not yet recorded (``client="sync"`` cannot resume).

    ``footprint``: a :class:`~hpcbatch.planner.Footprint`, or ``f(layout, block)``
    returning one (default: sized from the returned sites); ``resources``: the
    allocation to plan for (default: detected; a given ``client``'s workers).
    """
    from .. import config as hb_config

    model_kwargs = dict(model_kwargs or {})
    model_args = tuple(model_args)
    posterior = _check_counts(num_samples, posterior_samples, guide)
    out_path = _check_out(out, overwrite, resume)
    if resume and out_path is None:
        raise ConfigError("resume=True needs out= (the zarr store of the run to continue)")
    if resume and client == "sync":
        raise ConfigError(
            "--resume needs a Dask cluster: in-process (sync) runs keep no ledger; "
            "drop --cluster sync or --resume"
        )
    if chunk_size not in ("auto", None) and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ConfigError(
            f"chunk_size must be 'auto' or a positive whole number, got {chunk_size!r}"
        )
    if return_sites is not None and isinstance(return_sites, str):
        return_sites = [return_sites]
    settings = dict(settings) if settings is not None else hb_config.load()

    layout = core.inspect_model(
        model,
        guide=guide,
        posterior=posterior,
        num_samples=num_samples,
        model_args=model_args,
        model_kwargs=model_kwargs,
        return_sites=return_sites,
        data_plate=data_plate,
        split_args=split_args,
    )
    block = choose_block(layout, cell_block)
    params = None
    resuming = False
    if out_path is not None and client != "sync":
        params = run_params(
            model, guide, posterior, model_args, model_kwargs, layout,
            num_samples=num_samples, seed=seed, chunk_size=chunk_size, block=block,
            data_plate=data_plate,
        )  # fmt: skip
        run_id = run_id or default_run_id(params)
        if resume and out_path.exists():
            recorded = _recorded(out_path, run_id, params)
            resuming = True
            chunk_size = int(recorded["chunk_size"])  # the store's zarr chunks follow it
    run_id = run_id or f"predictive-{uuid.uuid4().hex[:10]}"
    # per user and private: workers unpickle the job file written here; one directory
    # per invocation, so two drivers of the same run id never remove each other's inputs
    base = private_dir(Path(shared_dir or tempfile.gettempdir()) / f"hpcbatch-shared-{os.getuid()}")
    scratch = base / f"{run_id}-{uuid.uuid4().hex[:8]}"
    request = _Request(
        model=model,
        guide=guide,
        posterior=posterior,
        model_args=model_args,
        model_kwargs=model_kwargs,
        layout=layout,
        block=block,
        data_plate=data_plate,
        num_samples=num_samples,
        seed=seed,
        client=client,
        settings=settings,
        chunk_size=chunk_size,
        memory_fraction=memory_fraction,
        resources=resources,
        footprint=footprint,
        scratch=scratch,
        out_path=out_path,
        compress=compress,
        run_id=run_id,
        report_dir=report_dir,
        progress=progress,
        cluster_backend=cluster_backend,
        params=params,
        resuming=resuming,
    )
    try:
        plan, store, report = _prepare_and_execute(request)
    except BaseException as exc:
        if out_path is not None and (
            request.resuming or (request.started and _n_done(out_path, run_id) > 0)
        ):
            # Chunks recorded in the ledger: keep them for --resume.
            if not isinstance(exc, RunInterrupted):
                print(
                    f"{out_path}: the finished chunks are kept (ledger {ledger_path(out_path)}):"
                    f" fix the cause and {RESUME_HINT}",
                    file=sys.stderr,
                    flush=True,
                )
        elif out_path is not None:
            shutil.rmtree(out_path, ignore_errors=True)
            _remove_ledger(out_path)
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    samples = _collect(store, layout, out_path is None)
    shutil.rmtree(scratch, ignore_errors=True)
    return SampleRun(samples, report, plan, layout, block)


def _prepare_and_execute(r: _Request):
    """Share the inputs, plan, create the store and run the chunks."""
    if r.in_process:
        job_args, job_kwargs, job_posterior = r.model_args, r.model_kwargs, r.posterior
    else:
        job_args, job_kwargs = shared.share_all(r.model_args, r.model_kwargs, r.scratch)
        job_posterior = dict(shared.share_all((), r.posterior, r.scratch)[1])
    node_shared = shared.shared_bytes(job_args, job_kwargs, job_posterior)
    layout, block = r.layout, r.block
    footprint = r.footprint
    if footprint is None:
        footprint = sampling_footprint(
            r.num_samples,
            latent_bytes_per_sample=layout.per_sample_bytes(in_plate=False),
            row_bytes_per_sample=layout.per_sample_bytes(in_plate=True),
            rows_per_block=block or 0,
            shared_input_bytes=node_shared,
        )
    elif callable(footprint):
        footprint = footprint(layout, block)
    fixed = None if r.chunk_size in ("auto", None) else int(r.chunk_size)
    plan = _plan(footprint, r.client, r.settings, fixed, r.memory_fraction, r.resources)
    job = SamplingJob(
        model=r.model,
        guide=r.guide if r.in_process else portable_guide(r.guide),
        posterior=job_posterior,
        model_args=job_args,
        model_kwargs=job_kwargs,
        layout=layout,
        data_plate=r.data_plate,
        block=block,
        guide_param_state=_guide_state(r.guide),
    )
    store = r.out_path or r.scratch / "samples.zarr"
    # a scratch store is read back at once: never compressed
    compress = r.compress and r.out_path is not None
    attrs = {
        "hpcbatch": {
            "run_id": r.run_id,
            "seed": r.seed,
            "num_samples": r.num_samples,
            "chunk_size": plan.chunk_size,
            "cell_block": block,
            "sites": list(layout.names),
            "params": r.params,
        }
    }
    if not r.resuming:
        if r.out_path is not None:
            _remove_ledger(r.out_path)  # a fresh store: a stale ledger must not skip chunks
        try:
            _create_store(store, layout, block, compress, attrs, plan.chunk_size)
        except OSError as exc:
            raise ConfigError(f"cannot create {store}: {exc.strerror}") from None
    r.started = r.params is not None
    return plan, store, _execute(job, plan, r, store)


def _collect(store: Path, layout: core.Layout, load: bool):
    import zarr

    group = zarr.open_group(store=str(store), mode="r")
    if not load:
        return group
    return {site.name: np.asarray(group[site.name][...]) for site in layout.sites}


def _execute(job: SamplingJob, plan, r: _Request, store: Path):
    from .. import runner
    from ..ledger import Ledger

    chunks = runner.make_chunks(job.layout.sites[0].shape[0], plan.chunk_size)
    if r.in_process:
        return _run_in_process(job, chunks, store, r.run_id, r.seed, plan)
    ledger_kwargs: dict[str, Any] = {}
    if r.params is not None:
        ledger = Ledger(f"sqlite:///{ledger_path(store).absolute()}")
        ledger_kwargs = dict(
            ledger=ledger,
            params=r.params,
            resume=r.resuming,
            resume_hint=RESUME_HINT,
        )
        info = ledger.run_info(r.run_id)
        if info is not None and info["status"] == "finished":
            # Nothing to run: the runner says so without a cluster.
            return runner.run(
                chunks, sample_chunk_task, None, run_id=r.run_id, seed=r.seed, plan=plan,
                progress=r.progress, **ledger_kwargs,
            )  # fmt: skip
    r.scratch.mkdir(parents=True, exist_ok=True)
    job_path = r.scratch / "job.pkl"
    import cloudpickle

    with open(job_path, "wb") as handle:
        cloudpickle.dump(job, handle)
    task = partial(sample_chunk_task, job_path=str(job_path), out=str(store))
    kwargs = dict(
        run_id=r.run_id,
        seed=r.seed,
        plan=plan,
        report_dir=r.report_dir,
        commit_on_worker=False,
        progress=r.progress,
        retries=int(r.settings.get("retries", 2)),
        min_chunk=1,
        **ledger_kwargs,
    )
    if r.client is not None:
        return runner.run(chunks, task, r.client, **kwargs)
    from ..cluster import open_cluster

    with open_cluster(
        plan,
        dict(r.settings),
        backend=r.cluster_backend or r.settings["cluster"]["backend"],
        address=r.settings["cluster"].get("address"),
        quiet=not r.progress,
    ) as own:
        return runner.run(chunks, task, own, **kwargs)


def _run_in_process(job, chunks, store, run_id, seed, plan):
    """``client="sync"``: every chunk in this process, one after another (no Dask)."""
    import resource
    import time

    from .. import runner
    from ..chunkstate import ChunkStates, Policy
    from ..report import RunReport

    key = f"sync-{uuid.uuid4().hex}"
    _JOBS[key] = job
    t0 = time.time()
    # the runner's own state machine: out of memory -> halved and retried, else fails
    states = ChunkStates(chunks, Policy(retries=0, min_chunk=1))
    try:
        while attempts := states.take(1):
            chunk = attempts[0].chunk
            ctx = runner.TaskContext(run_id, runner.chunk_seed(seed, chunk.chunk_id), 0)
            try:
                meta = sample_chunk_task(chunk, ctx, job_path=key, out=str(store))
            except HpcbatchError:
                raise
            except Exception as exc:
                if runner.is_memory_error(exc):
                    verdict = states.memory_failure(attempts[0], type(exc).__name__)
                    if verdict.action == "split":
                        continue
                raise _chunk_error(chunk, exc) from exc
            states.succeeded(attempts[0], meta)
    finally:
        _JOBS.pop(key, None)
        for cache_key in [k for k in _ARRAYS if k[0] == str(store)]:
            _ARRAYS.pop(cache_key, None)
    total = {"samples": 0, "bytes_written": 0, **states.counters.meta}
    from ..calibrate import _vm_hwm

    # VmHWM, not ru_maxrss: the latter carries the parent's peak across exec.
    peak = _vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return RunReport(
        run_id=run_id,
        status="finished",
        n_chunks=len(chunks),
        chunks_done=len(chunks),
        chunks_split=states.counters.split,
        items_done=total["samples"],
        wall_time_s=time.time() - t0,
        plan=plan.to_dict(),
        predicted_peak_bytes=plan.predicted_peak_bytes,
        measured_peak_bytes=peak,
        measured_peak_per_worker={"this process (sync)": peak},
        memory_limit_bytes=plan.memory_limit_bytes,
        results_meta=total,
    )


def sample(
    model: Callable,
    *,
    guide: Callable | None = None,
    posterior_samples: Mapping | None = None,
    num_samples: int,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    return_sites: Sequence[str] | None = None,
    data_plate: str | None = None,
    split_args: Sequence | None = None,
    chunk_size: int | str = "auto",
    client: Any = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    memory_fraction: float | None = None,
    overwrite: bool = False,
    **options: Any,
):
    """Draw what ``pyro.infer.Predictive(model, guide=..., parallel=True)`` draws, in chunks.

    The chunk size comes from the memory planner (or ``chunk_size``); chunks run on the
    Dask workers of ``client`` (a local cluster from the plan when ``None``; ``"sync"``
    runs them in this process).  Returns a dict of numpy arrays shaped as Predictive's
    output, or with ``out="x.zarr"`` the zarr group the workers wrote.

    With ``data_plate`` and ``split_args``, the model runs block by block of that
    plate's rows for each chunk of samples, conditioned on one draw of the global
    latents, so observations far larger than memory are drawn consistently.  Further
    ``options`` (``cell_block``, ``footprint``, ``settings``, ``shared_dir``,
    ``compress``, ``run_id``, ``report_dir``, ``progress``) go to :func:`run_sampling`.
    """
    return run_sampling(
        model,
        guide=guide,
        posterior_samples=posterior_samples,
        num_samples=num_samples,
        model_args=model_args,
        model_kwargs=model_kwargs,
        return_sites=return_sites,
        data_plate=data_plate,
        split_args=split_args,
        chunk_size=chunk_size,
        client=client,
        out=out,
        seed=seed,
        memory_fraction=memory_fraction,
        overwrite=overwrite,
        **options,
    ).samples


__all__ = ["SampleRun", "SamplingJob", "draw_chunk", "run_sampling", "sample"]
