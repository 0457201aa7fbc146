"""The predictive job and the task a worker runs for a chunk of samples.

:func:`prepare_job` checks a sampling request (counts, output, the model's layout from
one test run), chooses the block of data-plate rows, writes large inputs once for
memory-mapping (:mod:`~hpcbatch.predictive.shared`) and returns a :class:`PredictiveJob`:
a :class:`~hpcbatch.workload.Job` whose sink is the zarr store and the SQLite ledger
beside it (:func:`ledger_path`) and whose run identity (:func:`run_params`,
:func:`default_run_id`) lets ``--resume`` find the run again.  :func:`sample_chunk_task`
is what a worker runs for a chunk.

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

import copy
import hashlib
import json
import logging
import os
import shutil
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

from ..errors import ChunkFailedError, ConfigError, RunInterrupted
from ..ledger import Ledger
from ..planner import Footprint, Plan
from ..runner import Chunk, make_chunks
from ..security import private_dir
from ..workload import HeapTuning, Job, RunContext, RunIdentity, Sink, Workload
from . import core, shared
from .footprint import (
    WORKER_MMAP_THRESHOLD,
    WORKER_TRIM_THRESHOLD,
    auto_block,
    draw_rows,
    sampling_footprint,
)

log = logging.getLogger(__name__)

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
        # write_empty_chunks: no scan of every written chunk for all-fill values (a
        # chunk of zeros is stored like any other: the same values are read back);
        # open_array ignores a config for an existing array: with_config sets it
        array = zarr.open_array(store=os.path.join(out, site), mode="r+")
        array = array.with_config({"write_empty_chunks": True})
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
    array = array.astype(site.dtype, copy=False)
    with _chunk_locks(out, site.name, edges, rows):
        for a, b in _chunk_pieces(start, stop, zarr_array.chunks[0]):
            region[0] = slice(a, b)
            zarr_array[tuple(region)] = array[a - start : b - start]
    return int(array.nbytes)


def _chunk_pieces(start: int, stop: int, z: int) -> list[tuple[int, int]]:
    """``start:stop`` cut at the zarr chunk boundaries along samples (every ``z``).

    zarr stores a value of exactly one chunk's shape as it is; a value spanning several
    chunks is first copied into a fresh fill-valued buffer per chunk, so each whole chunk
    is written on its own.  With the empty-chunk scan off as well (``_zarr_array``):
    1.8-2.1 -> 0.4-0.6 CPU-s per 716 MB written, 8 samples x 1,398 rows x 2,000 per write
    (measured with Dask's worker MALLOC_TRIM_THRESHOLD_, 2026-12-06)."""
    cuts = [start, *range((start // z + 1) * z, stop, z), stop]
    return list(zip(cuts[:-1], cuts[1:], strict=False))


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


def draw_chunk(
    job: SamplingJob, start: int, stop: int, seed: int, emit, lean: bool = False
) -> None:
    """Draw samples ``start:stop`` with ``seed``; ``emit(site, value, rows)`` each piece.

    ``lean``: guide and model run vectorised only (:func:`core.vectorized_draw`), without
    Predictive's two unvectorised runs of each before: the same distribution and work
    per value, not Predictive's numbers (:func:`~hpcbatch.predictive.sampling.
    estimate_draw`'s timed test draws, whose values are thrown away)."""
    layout = job.layout
    lean = lean and layout.max_plate_nesting is not None
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
        if lean:
            if job.guide is not None:
                posterior = core.vectorized_guide_draw(job.guide, n, args, kwargs, layout)
            draws = core.vectorized_draw(
                job.model, posterior=posterior, num_samples=n, model_args=model_args,
                model_kwargs=model_kwargs, layout=layout, rows=None,
            )  # fmt: skip
        else:
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
        posterior = (
            core.vectorized_guide_draw(job.guide, n, args, kwargs, layout)
            if lean
            else core.guide_draw(job.guide, n, args, kwargs)
        )
    rows = draw_rows(layout.per_sample_bytes(in_plate=True), n, job.block)
    for row_start, row_stop, draws in core.draw_blocks(
        job.model, posterior=posterior, num_samples=n, model_args=args, model_kwargs=kwargs,
        layout=layout, block=job.block, draw_rows=rows, lean=lean,
    ):  # fmt: skip
        for name, value in draws.items():
            site = sites[name]
            if site.plate_axis is not None:
                emit(site, value, (row_start, row_stop))
            elif row_start == 0:
                emit(site, value, None)


def run_chunk(
    job: SamplingJob, chunk, seed: int, put: Callable[..., int], lean: bool = False
) -> dict:
    """Draw one chunk with ``seed``; ``put(site, start, stop, value, rows)`` stores each
    piece and returns its bytes.  Pyro's globals are guarded (see ``_PYRO_LOCK``).
    ``lean``: see :func:`draw_chunk`."""
    written = 0

    def emit(site, value, rows):
        nonlocal written
        written += put(site, chunk.start, chunk.stop, value, rows)

    # Argument validation is off inside chunks (it costs ~15 % and draws no random
    # numbers, so results are unchanged); the client's test run validated the model.
    with _PYRO_LOCK, pyro.get_param_store().scope(), pyro.validation_enabled(False):
        _restore_guide_params(job)
        try:
            draw_chunk(job, chunk.start, chunk.stop, seed, emit, lean)
        except RuntimeError as exc:
            # torch's CPU allocator failing is a memory failure: the runner halves the chunk.
            if "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
                raise MemoryError(core._describe(exc)) from exc
            raise
    return {"samples": chunk.stop - chunk.start, "bytes_written": written}


def sample_chunk_task(chunk, ctx, *, job_path: str, out: str) -> dict:
    """The runner's task: draw one chunk and write its zarr regions on the worker."""
    job = _load_job(job_path)
    plate = job.layout.plate_size
    if job.block and plate and job.block < plate:  # drawn a few rows at a time
        keep_freed_memory()
    return run_chunk(job, chunk, ctx.seed, partial(_write, out))


#: drawing workers keep freed memory for the next vectorised run (footprint.py says why)
DRAW_HEAP = HeapTuning(WORKER_MMAP_THRESHOLD, WORKER_TRIM_THRESHOLD)


def keep_freed_memory() -> bool:
    """Make this worker's glibc keep freed memory for the next vectorised run:
    allocations under ``WORKER_MMAP_THRESHOLD`` from the heap, up to
    ``WORKER_TRIM_THRESHOLD`` free bytes kept at its top (the footprint counts them).
    False where the C library is not glibc (nothing changed)."""
    return DRAW_HEAP.apply()


class MemorySink:
    """In-process samples kept in memory (no zarr): one array per site, shaped as
    Predictive's output.  A site drawn whole by one chunk keeps the drawn tensor itself
    (no copy); otherwise each chunk's piece is copied into its region once."""

    def __init__(self, layout: core.Layout):
        self.layout = layout
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, site: core.SiteLayout, start: int, stop: int, value, rows=None) -> int:
        value = value.detach() if torch.is_tensor(value) else torch.as_tensor(np.asarray(value))
        dtype = torch.from_numpy(np.empty(0, site.dtype)).dtype
        whole = rows is None and start == 0 and stop == site.shape[0]
        if whole and tuple(value.shape) == tuple(site.shape) and value.dtype == dtype:
            self.tensors[site.name] = value.contiguous()
            return int(value.nbytes)
        target = self.tensors.get(site.name)
        if target is None:
            target = torch.from_numpy(np.empty(site.shape, site.dtype))
            self.tensors[site.name] = target
        region = [slice(start, stop)] + [slice(None)] * (len(site.shape) - 1)
        if rows is not None:
            region[site.plate_axis] = slice(*rows)
        piece = target[tuple(region)]
        piece.copy_(value)  # broadcasts (e.g. a site constant over the rows) and casts
        return int(piece.nbytes)

    def samples(self, as_tensors: bool = False) -> dict:
        """The sites in layout order: tensors, or numpy arrays over the same memory."""
        out = {s.name: self.tensors[s.name] for s in self.layout.sites}
        return out if as_tensors else {k: v.cpu().numpy() for k, v in out.items()}


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
    if not ledger_path(out).exists():
        return 0
    ledger = Ledger(f"sqlite:///{ledger_path(out).absolute()}")
    try:
        return len(ledger.done_ids(run_id))
    except Exception:  # noqa: BLE001 (no tables yet: the run never started)
        return 0
    finally:
        ledger.engine.dispose()


def _check_out(out: str | os.PathLike | None, overwrite: bool, resume: bool = False) -> Path | None:
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


#: The store codecs ``compress=`` names.  "lz4" (the default): Blosc LZ4 over shuffled
#: bytes, lossless.  On real counts (the technical model's y, 5 x 699 x 4,000 float32 per
#: write, 2026-12-07) it wrote 56 MB in 0.044 s against 0.23 s uncompressed (the kernel's
#: page-cache writes of 2.6x the bytes cost more CPU than LZ4 does) and read back in
#: 0.026 s against 0.38 s; random floats cost no more than raw (1.07x smaller).  A worker
#: drawing 5 x 5,000 x 4,000 counts spent 0.74 s writing them instead of 1.85 s.
#: "zstd": zarr's own default, 4.1x smaller on those counts, 0.13 s a write.
STORE_CODECS = ("lz4", "zstd", "none")


def store_codec(compress: bool | str | None) -> str:
    """``compress=`` as one of :data:`STORE_CODECS` (True: "zstd"; False or None: "none")."""
    if compress is True:
        return "zstd"
    if compress is False or compress is None:
        return "none"
    if isinstance(compress, str) and compress.lower() in STORE_CODECS:
        return compress.lower()
    raise ConfigError(
        f"compress must be one of {', '.join(STORE_CODECS)} (or True/False), got {compress!r}"
    )


def _compressors(codec: str):
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec == "lz4":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
    if codec == "zstd":
        return (ZstdCodec(level=0),)
    return None


def _create_store(
    path: Path, layout: core.Layout, block: int | None, codec: str, attrs, chunk_size: int
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
        group.create_array(
            site.name,
            shape=site.shape,
            chunks=tuple(max(1, c) for c in chunks),
            dtype=site.dtype,
            fill_value=0,
            compressors=_compressors(codec),
        )
    group.attrs.update(attrs)
    return group


def _collect(store: Path, layout: core.Layout, load: bool):
    import zarr

    group = zarr.open_group(store=str(store), mode="r")
    if not load:
        return group
    return {site.name: np.asarray(group[site.name][...]) for site in layout.sites}


# ------------------------------------------------------------- the job ----


@dataclass(frozen=True)
class SampleRequest:
    """What to sample: the model, its guide or posterior samples, inputs and sites."""

    model: Callable
    num_samples: int
    guide: Callable | None = None
    posterior_samples: Mapping | None = None
    model_args: tuple = ()
    model_kwargs: Mapping | None = None
    return_sites: Sequence[str] | None = None
    data_plate: str | None = None
    split_args: Sequence | None = None


@dataclass(frozen=True)
class SampleOptions:
    """How and where samples go: chunking, the zarr store, the seed, the scratch space."""

    chunk_size: int | str | None = "auto"
    cell_block: int | str | None = "auto"
    out: str | os.PathLike | None = None
    overwrite: bool = False
    resume: bool = False
    seed: int = 0
    run_id: str | None = None
    shared_dir: str | os.PathLike | None = None
    compress: bool | str = "lz4"

    def checked_out(self, in_process: bool) -> Path | None:
        """The output store to write (None: samples are returned), checked."""
        store_codec(self.compress)  # a bad value fails before anything is written
        out = _check_out(self.out, self.overwrite, self.resume)
        if self.resume and out is None:
            raise ConfigError("resume=True needs out= (the zarr store of the run to continue)")
        if self.resume and in_process:
            raise ConfigError(
                "--resume needs a Dask cluster: in-process (sync) runs keep no ledger; "
                "drop --cluster sync or --resume"
            )
        size = self.chunk_size
        if size not in ("auto", None) and (
            isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1
        ):
            raise ConfigError(f"chunk_size must be 'auto' or a positive whole number, got {size!r}")
        return out


@dataclass
class SampleRun:
    """The result of a sampling run: samples, the run report and the plan."""

    samples: Any
    report: Any
    plan: Any
    layout: core.Layout
    block: int | None
    execution: str = ""  # where it ran and why (cluster='auto' in-process runs say so)

    def to_dict(self) -> dict:
        """The run report as a dict (``hpcbatch run predictive --json``)."""
        return self.report.to_dict()

    def summary(self, out: str | os.PathLike | None = None) -> str:
        """The report's summary, the plan and the sites written (to ``out``, if given)."""
        plan = f"plan: {self.plan.chunk_size} samples per chunk, {self.plan.n_workers} workers"
        lines = [self.report.summary(), plan]
        if self.execution:
            lines.append(self.execution)
        if self.block:
            lines.append(f"cells per model run: {self.block}")
        where = f"{out}/" if out is not None else ""
        lines += [
            f"  {where}{site.name}: {list(site.shape)} {site.dtype}" for site in self.layout.sites
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class Prepared:
    """A checked sampling run before any plan (what :func:`prepare_job` found)."""

    layout: core.Layout
    block: int | None
    sampling: SamplingJob  # its large inputs shared for memory-mapping, unless in-process
    out: Path | None
    scratch: Path  # this invocation's private directory: shared inputs, the job file
    params: dict | None  # what defines the samples, when the run keeps a ledger
    resuming: bool
    chunk_size: int | None  # fixed by the caller, or by the store being resumed
    seed: int
    codec: str  # the output store's (STORE_CODECS)
    in_process: bool

    @property
    def store(self) -> Path:
        return self.out or self.scratch / "samples.zarr"


class PredictiveJob(Job):
    """A checked posterior predictive sampling run: its layout and block, the inputs
    written once for memory-mapping, the zarr store + its SQLite ledger as the sink,
    and the run identity ``--resume`` finds again."""

    def __init__(self, workload: Workload, prep: Prepared, footprint: Footprint,
                 identity: RunIdentity):  # fmt: skip
        self.workload, self.prep = workload, prep
        self.footprint, self.identity = footprint, identity
        url = f"sqlite:///{ledger_path(prep.store).absolute()}" if prep.params else None
        self.sink = Sink(ledger_url=url, description=f"zarr store {prep.store}")
        self.probe_kwargs: Mapping[str, Any] = {}
        self.plan: Plan | None = None
        self.started = False  # the store was created for a run that keeps a ledger

    @property
    def layout(self) -> core.Layout:
        return self.prep.layout

    @property
    def resuming(self) -> bool:
        return self.prep.resuming

    def plan_overrides(self) -> dict:
        overrides: dict[str, Any] = {"chunk_size": self.prep.chunk_size}
        if self.prep.in_process:
            # One process, chunks in turn: no load balancing, the largest chunk that fits.
            overrides.update(n_workers=1, chunks_per_worker=1)
        return overrides

    def chunks(self, plan: Plan) -> list[Chunk]:
        return make_chunks(self.layout.sites[0].shape[0], plan.chunk_size)

    def open_store(self, plan: Plan, run_id: str | None = None) -> Path:
        """The zarr store for ``plan``: created afresh, or kept as it is when resuming
        (its zarr chunks follow the recorded chunk size)."""
        self.plan, prep = plan, self.prep
        if not prep.resuming:
            attrs = {"hpcbatch": {
                "run_id": run_id or self.identity.run_id, "seed": prep.seed,
                "num_samples": self.layout.sites[0].shape[0], "chunk_size": plan.chunk_size,
                "cell_block": prep.block, "sites": list(self.layout.names),
                "params": prep.params,
            }}  # fmt: skip
            # a scratch store is read back at once: the fastest codec both ways
            codec = prep.codec if prep.out is not None else "lz4"
            try:
                _create_store(prep.store, self.layout, prep.block, codec, attrs,
                              plan.chunk_size)  # fmt: skip
            except OSError as exc:
                raise ConfigError(f"cannot create {prep.store}: {exc.strerror}") from None
        self.started = prep.params is not None
        return prep.store

    def task(self, plan: Plan, run: RunContext) -> Callable:
        import cloudpickle

        if run.settings.seed != self.prep.seed:
            raise ConfigError(
                f"the predictive job was prepared with seed {self.prep.seed} but the run's "
                f"seed is {run.settings.seed}: prepare it with the run's seed setting"
            )
        if plan.threads_per_worker > 1:
            log.warning(
                "workers with %d threads: Pyro keeps its handler stack and param store in "
                "module globals (not thread-safe), so the threads of a worker draw one chunk "
                "at a time (a lock); start workers with --nthreads 1 (more processes) to use "
                "every core", plan.threads_per_worker,
            )  # fmt: skip
        store = self.open_store(plan, run.run_id)
        self.prep.scratch.mkdir(parents=True, exist_ok=True)
        job_path = self.prep.scratch / "job.pkl"
        with open(job_path, "wb") as handle:
            cloudpickle.dump(self.prep.sampling, handle)
        return partial(sample_chunk_task, job_path=str(job_path), out=str(store))

    def summary(self, run: SampleRun) -> str:
        """What ``hpcbatch run predictive`` prints (as ``hpcbatch predictive sample``)."""
        return run.summary(self.prep.out)

    def ledger(self) -> Ledger | None:
        return Ledger(self.sink.ledger_url) if self.sink.ledger_url else None

    def finished_before(self) -> bool:
        """Whether the ledger records this run as finished (a resume with nothing to do)."""
        if not self.resuming or not ledger_path(self.prep.store).exists():
            return False
        ledger = self.ledger()
        try:
            info = ledger.run_info(self.identity.run_id)
        finally:
            ledger.engine.dispose()
        return info is not None and info["status"] == "finished"

    def finish(self, report: Any) -> SampleRun:
        """The samples (numpy arrays, or the zarr group of ``out``) with the report."""
        samples = _collect(self.prep.store, self.layout, self.prep.out is None)
        shutil.rmtree(self.prep.scratch, ignore_errors=True)
        return SampleRun(samples, report, self.plan, self.layout, self.prep.block)

    def discard(self, exc: BaseException | None = None) -> None:
        """After a failed run: keep the store and ledger when chunks are recorded (for
        ``--resume``), else remove them; the scratch directory always goes."""
        out, run_id = self.prep.out, self.identity.run_id
        if out is not None and (self.resuming or (self.started and _n_done(out, run_id) > 0)):
            if not isinstance(exc, RunInterrupted):  # its message says how to resume
                log.warning("%s: the finished chunks are kept (ledger %s): fix the cause and %s",
                            out, ledger_path(out), RESUME_HINT)  # fmt: skip
        elif out is not None:
            shutil.rmtree(out, ignore_errors=True)
            _remove_ledger(out)
        shutil.rmtree(self.prep.scratch, ignore_errors=True)


def prepare_job(
    workload: Workload,
    request: SampleRequest,
    options: SampleOptions,
    *,
    in_process: bool = False,
    footprint: Footprint | Callable[[core.Layout, int | None], Footprint] | None = None,
) -> PredictiveJob:
    """Check ``request`` and ``options`` and prepare the job (nothing runs yet).

    ``footprint``: a Footprint, or ``f(layout, block)`` returning one (default: sized
    from the returned sites, :func:`~hpcbatch.predictive.footprint.sampling_footprint`).
    ``in_process``: chunks run in this process (no ledger, inputs not shared).
    """
    posterior = _check_counts(request.num_samples, request.posterior_samples, request.guide)
    out = options.checked_out(in_process)
    sites = request.return_sites
    layout = core.inspect_model(
        request.model, guide=request.guide, posterior=posterior,
        num_samples=request.num_samples, model_args=tuple(request.model_args),
        model_kwargs=dict(request.model_kwargs or {}),
        return_sites=[sites] if isinstance(sites, str) else sites,
        data_plate=request.data_plate, split_args=request.split_args,
    )  # fmt: skip
    block = choose_block(layout, options.cell_block)
    identity, params, resuming, chunk_size = _identity(
        request, options, posterior, layout, block, out, in_process
    )
    # per user and private: workers unpickle the job file written here; one directory
    # per invocation, so two drivers of the same run id never remove each other's inputs
    base = Path(options.shared_dir or tempfile.gettempdir()) / f"hpcbatch-shared-{os.getuid()}"
    scratch = private_dir(base) / f"{identity.run_id}-{uuid.uuid4().hex[:8]}"
    try:
        sampling = _sampling_job(request, posterior, layout, block, scratch, in_process)
        prep = Prepared(layout, block, sampling, out, scratch, params, resuming, chunk_size,
                        int(options.seed), store_codec(options.compress), in_process)  # fmt: skip
        job = PredictiveJob(workload, prep, _footprint(footprint, prep), identity)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if out is not None and not resuming:
        _remove_ledger(out)  # a fresh store: a stale ledger must not skip chunks
    return job


def _identity(request, options, posterior, layout, block, out, in_process):
    """The run identity, the params a ledger records, whether a store is resumed, and
    the fixed chunk size (the resumed store's, whose zarr chunks follow it)."""
    chunk_size = None if options.chunk_size in ("auto", None) else int(options.chunk_size)
    if out is None or in_process:  # no ledger: nothing to resume
        run_id = options.run_id or f"predictive-{uuid.uuid4().hex[:10]}"
        return RunIdentity(run_id), None, False, chunk_size
    params = run_params(
        request.model, request.guide, posterior, tuple(request.model_args),
        dict(request.model_kwargs or {}), layout, num_samples=request.num_samples,
        seed=options.seed, chunk_size=options.chunk_size, block=block,
        data_plate=request.data_plate,
    )  # fmt: skip
    run_id = options.run_id or default_run_id(params)
    resuming = bool(options.resume and out.exists())
    if resuming:
        chunk_size = int(_recorded(out, run_id, params)["chunk_size"])
    return RunIdentity(run_id, params), params, resuming, chunk_size


def _sampling_job(request, posterior, layout, block, scratch, in_process) -> SamplingJob:
    """What a worker needs for any chunk; large inputs written once to ``scratch``."""
    args, kwargs = tuple(request.model_args), dict(request.model_kwargs or {})
    guide = request.guide
    if not in_process:
        args, kwargs = shared.share_all(args, kwargs, scratch)
        posterior = dict(shared.share_all((), posterior, scratch)[1])
        guide = portable_guide(guide)
    return SamplingJob(
        model=request.model, guide=guide, posterior=posterior, model_args=args,
        model_kwargs=kwargs, layout=layout, data_plate=request.data_plate, block=block,
        guide_param_state=_guide_state(request.guide),
    )  # fmt: skip


def _footprint(footprint, prep: Prepared) -> Footprint:
    if callable(footprint):
        return footprint(prep.layout, prep.block)
    if footprint is not None:
        return footprint
    job = prep.sampling
    return sampling_footprint(
        prep.layout.sites[0].shape[0],
        latent_bytes_per_sample=prep.layout.per_sample_bytes(in_plate=False),
        row_bytes_per_sample=prep.layout.per_sample_bytes(in_plate=True),
        rows_per_block=prep.block or 0,
        shared_input_bytes=shared.shared_bytes(job.model_args, job.model_kwargs, job.posterior),
        plate_rows=prep.layout.plate_size or 0,
    )


def technical_job(
    workload: Workload, data_dir: str | os.PathLike, samples: int, with_observations: bool,
    options: SampleOptions, *, in_process: bool = False,
) -> PredictiveJob:  # fmt: skip
    """The job for the built-in technical model of a fitted data directory, planned with
    its analytic footprint (or, with ``--calibrate``, its probe at these sizes)."""
    from . import technical
    from .footprint import technical_footprint

    data, guide, mu_mean, mu_sd = technical.load_fit(data_dir)
    # Latent sites only: in this process the (memory-mapped) counts are passed as the
    # model's observations, so its one-row likelihood draws nothing (y is the last
    # site: the latents are the same numbers either way); on a cluster they stay None
    # (one row of y is drawn and dropped) rather than be rewritten for sharing.
    with_counts = in_process and not with_observations
    args, kwargs = technical.model_inputs(data, mu_mean, mu_sd, with_counts=with_counts)
    sites = [*technical.LATENT_SITES, *([technical.OBSERVED_SITE] if with_observations else [])]
    request = SampleRequest(
        technical.technical_model, samples, guide=guide, model_args=args, model_kwargs=kwargs,
        return_sites=sites, data_plate=technical.DATA_PLATE, split_args=technical.SPLIT_ARGS,
    )  # fmt: skip
    sizes = {"cells": data.n_cells, "features": data.n_features, "groups": data.n_groups,
             "with_observations": with_observations}  # fmt: skip

    def footprint(layout: core.Layout, block: int | None) -> Footprint:
        return technical_footprint(
            data.n_cells, data.n_features, data.n_groups, samples,
            with_observations=with_observations, cell_block=block,
        )  # fmt: skip

    job = prepare_job(workload, request, options, in_process=in_process, footprint=footprint)
    job.probe_kwargs = {**sizes, "cell_block": job.prep.block}
    return job
