"""The ``embed`` workload: what hpcbatch needs to know to plan, run and resume it.

Everything here is hpcbatch's public API (``hpcbatch.Workload``, ``Job``, ``RunIdentity``,
``Footprint``, ``ZarrSink``, ``typed_settings``); hpcbatch itself knows nothing of it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

import hpcbatch
from hpcbatch import (
    ConfigError,
    Footprint,
    Invocation,
    Job,
    RunIdentity,
    Workload,
    ZarrSink,
    typed_settings,
)

MiB = 1024**2
WORKER_BASE_BYTES = 400 * MiB  # a Dask worker with torch imported and the model built


@dataclass(frozen=True)
class EmbedSettings:
    """The ``embed`` config section (``hpcbatch.embed`` in a profile or --config file)."""

    input: str | None
    output: str | None
    dim: int
    seed: int
    chunk_size: int | None
    oom_above: int | None  # a chunk of more arrays raises MemoryError (to see the split)
    delay: float  # seconds each chunk sleeps (a slow model, to watch or interrupt a run)

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> EmbedSettings:
        return typed_settings(cls, section)


DEFAULTS = {"input": None, "output": None, "dim": 32, "seed": 0, "chunk-size": None,
            "oom-above": None, "delay": 0.0}  # fmt: skip

_MODELS: dict[tuple, Any] = {}


@dataclass(frozen=True)
class EmbedTask:
    """What a worker runs for one chunk: read its arrays, embed them, write its region."""

    input: str
    sink: ZarrSink
    features: int
    dim: int
    seed: int
    oom_above: int | None
    delay: float

    def __call__(self, chunk, ctx) -> dict:
        import zarr

        from .model import Embedder

        if self.oom_above and chunk.size > self.oom_above:
            raise MemoryError(f"{chunk.size} arrays > oom-above {self.oom_above}")
        time.sleep(self.delay)
        key = (self.features, self.dim, self.seed)
        if key not in _MODELS:  # one model per worker process
            _MODELS[key] = Embedder(*key)
        arrays = zarr.open_array(store=self.input, mode="r")[chunk.start : chunk.stop]
        embeddings = _MODELS[key].embed(arrays)
        return {"arrays": chunk.size, **self.sink.write(chunk, embeddings, ctx.run_id)}


def embed_footprint(n_arrays: int, length: int, features: int, dim: int) -> Footprint:
    """Per array: its input read twice over (zarr's buffer and ours) and its embedding."""
    per_item = 2 * length * features * 4 + dim * 4
    return Footprint(
        workload="embed", item_name="array", n_items=n_arrays, per_item_bytes=per_item,
        baseline_bytes=WORKER_BASE_BYTES, source="analytic (embed: input + output per array)",
        details=(("input per array", length * features * 4), ("embedding", dim * 4)),
    )  # fmt: skip


class EmbedJob(Job):
    def __init__(self, workload: Workload, settings: EmbedSettings, inp: str, out: str,
                 shape: tuple[int, ...]):  # fmt: skip
        n, length, features = shape
        self.workload, self.settings, self.shape = workload, settings, shape
        self.footprint = embed_footprint(n, length, features, settings.dim)
        self.out_sink = ZarrSink(out)
        self.sink = self.out_sink.workload_sink()  # the ledger: <output>.ledger.db
        params = {"input": inp, "shape": list(shape), "output": str(Path(out).resolve()),
                  "dim": settings.dim, "seed": settings.seed}  # fmt: skip
        digest = hashlib.blake2b(json.dumps(params, sort_keys=True).encode(), digest_size=6)
        self.identity = RunIdentity(f"embed-{digest.hexdigest()}", params)
        self.task_fn = EmbedTask(inp, self.out_sink, features, settings.dim, settings.seed,
                                 settings.oom_above, float(settings.delay))  # fmt: skip

    def plan_overrides(self) -> dict:
        return {"chunk_size": self.settings.chunk_size}

    def task(self, plan, run) -> EmbedTask:
        import numpy as np

        sample = np.zeros((1, self.settings.dim), dtype=np.float32)
        self.out_sink.open(run.run_id, self.n_items, plan.chunk_size, sample, False)
        return self.task_fn


def _size_options() -> list:
    return [
        click.Option(["--arrays", "n_arrays"], type=int, default=4000, show_default=True,
                     help="Arrays to plan for."),
        click.Option(["--length"], type=int, default=128, show_default=True,
                     help="Time steps per array."),
        click.Option(["--features"], type=int, default=16, show_default=True,
                     help="Features per time step."),
        click.Option(["--dim"], type=int, default=None, help="Embedding size (default 32)."),
        click.Option(["--chunk-size"], type=int, default=None, help="Fix the arrays per chunk."),
    ]  # fmt: skip


def _run_options() -> list:
    return [
        click.Option(["--input"], default=None, help="zarr array (n, length, features) to embed."),
        click.Option(["--output"], default=None, help="zarr array (n, dim) to write."),
        click.Option(["--dim"], type=int, default=None, help="Embedding size (default 32)."),
        click.Option(["--seed"], type=int, default=None, help="Model weights seed (default 0)."),
        click.Option(["--chunk-size"], type=int, default=None,
                     help="Arrays per chunk (default: planned)."),
        click.Option(["--oom-above"], type=int, default=None,
                     help="Chunks of more arrays raise MemoryError (to see the split)."),
        click.Option(["--delay"], type=float, default=None, help="Seconds each chunk sleeps."),
    ]  # fmt: skip


def _positive(flag: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ConfigError(f"{flag} must be a positive whole number, got {value}")


class EmbedWorkload(Workload):
    """Embed arrays from a zarr store with a small torch model into a zarr store."""

    name = "embed"
    help = "Embed arrays (zarr) with a small torch model into zarr (example plugin)."
    item_name = "array"
    settings_type = EmbedSettings
    defaults = DEFAULTS

    def size_options(self) -> list:
        return _size_options()

    def sizes(self, settings: EmbedSettings, values: Mapping[str, Any]) -> dict:
        sizes = {"n_arrays": values.get("n_arrays") or 4000, "length": values.get("length") or 128,
                 "features": values.get("features") or 16,
                 "dim": values.get("dim") or settings.dim,
                 "chunk_size": values.get("chunk_size") or settings.chunk_size}  # fmt: skip
        for key, value in sizes.items():
            _positive(f"--{key.replace('_', '-')}", value)
        return sizes

    def footprint(self, sizes: Mapping[str, Any], settings: EmbedSettings) -> Footprint:
        return embed_footprint(sizes["n_arrays"], sizes["length"], sizes["features"], sizes["dim"])

    def plan_overrides(self, sizes: Mapping[str, Any], settings: EmbedSettings) -> dict:
        return {"chunk_size": sizes["chunk_size"]}

    def run_options(self) -> list:
        return _run_options()

    def prepare(self, settings: EmbedSettings, values: Mapping[str, Any],
                invocation: Invocation = Invocation()) -> EmbedJob:  # fmt: skip
        given = {k: v for k, v in values.items() if v is not None}
        settings = EmbedSettings(**{**settings.__dict__, **given})
        for flag in ("dim", "chunk_size", "oom_above"):
            _positive(f"--{flag.replace('_', '-')}", getattr(settings, flag))
        if not settings.input or not settings.output:
            raise ConfigError("embed needs --input ARRAYS.zarr and --output EMBEDDINGS.zarr")
        shape = _input_shape(settings.input)
        return EmbedJob(self, settings, str(Path(settings.input).resolve()), settings.output, shape)


def _input_shape(path: str) -> tuple[int, int, int]:
    import zarr

    try:
        array = zarr.open_array(store=path, mode="r")
    except Exception as exc:  # noqa: BLE001 (missing, not zarr, a group)
        raise ConfigError(f"--input {path}: not a zarr array ({type(exc).__name__})") from None
    if array.ndim != 3 or array.shape[0] < 1:
        raise ConfigError(f"--input {path}: shape {array.shape}, expected (n, length, features)")
    return tuple(int(s) for s in array.shape)  # type: ignore[return-value]


WORKLOAD = EmbedWorkload()
__all__ = ["WORKLOAD", "EmbedWorkload", "EmbedSettings", "EmbedJob", "EmbedTask", "hpcbatch"]
