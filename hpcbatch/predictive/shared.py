"""Shared read-only inputs: large arrays written once per node, memory-mapped by workers.

A model argument (numpy array or torch tensor) of at least ``min_bytes`` is replaced
in the task description by a :class:`SharedArray` (a path, a shape, a dtype).  Each
worker process opens it with ``np.load(mmap_mode="r")`` and wraps it with
``torch.from_numpy`` (no copy; a numpy argument stays the memmap), once per process:
the node holds one page-cache copy
however many workers read it.  An array that is already memory-mapped from an
``.npy`` file (``np.load(path, mmap_mode="r")``) is used in place, not rewritten.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

DEFAULT_MIN_BYTES = 1 << 20

_OPEN: dict[str, torch.Tensor] = {}


@dataclass(frozen=True)
class SharedArray:
    """A placeholder for a large argument: where its ``.npy`` is, and what it holds."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    as_tensor: bool = True  # the argument was a tensor (else a numpy array: a memmap)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def open(self):
        """A tensor (or, for a numpy argument, the memmap) over the file, once per process."""
        key = f"{self.path}|{self.as_tensor}"
        value = _OPEN.get(key)
        if value is None:
            array = np.load(self.path, mmap_mode="r")
            value = readonly_tensor(array) if self.as_tensor else array
            _OPEN[key] = value
        return value


def forget_open() -> None:
    """Drop this process's memory maps of earlier runs (their files may be gone)."""
    _OPEN.clear()


def readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` over a read-only array, without the not-writable warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _npy_backing(value) -> str | None:
    """The ``.npy`` file an array is memory-mapped from, if it maps the whole file."""
    base = value
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    if not isinstance(base, np.memmap) or base.filename is None:
        return None
    path = str(base.filename)
    if not path.endswith(".npy"):
        return None
    try:
        whole = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    same = whole.shape == value.shape and whole.dtype == value.dtype
    return path if same and value.flags.c_contiguous and whole.offset == base.offset else None


def share(value, directory: Path, label: str, min_bytes: int = DEFAULT_MIN_BYTES):
    """``value`` itself if small or not an array, else a :class:`SharedArray` for it."""
    if isinstance(value, torch.Tensor):
        if value.numel() * value.element_size() < min_bytes:
            return value
        array = value.detach().cpu().numpy()
    elif isinstance(value, np.ndarray):
        if value.nbytes < min_bytes:
            return value
        array = value
    else:
        return value
    path = _npy_backing(array)
    if path is None:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"{label}-{uuid.uuid4().hex[:12]}.npy"
        try:
            np.save(target, np.ascontiguousarray(array))
        except OSError as exc:
            raise ConfigError(
                f"cannot write the shared input {label} to {directory} ({exc.strerror}): "
                "pass shared_dir= a writable node-local directory"
            ) from None
        path = str(target)
    return SharedArray(
        path, tuple(int(n) for n in array.shape), str(array.dtype), isinstance(value, torch.Tensor)
    )


def share_all(args: tuple, kwargs: Mapping, directory: Path, min_bytes: int = DEFAULT_MIN_BYTES):
    """Replace every large array among ``args``/``kwargs`` by a :class:`SharedArray`."""
    new_args = tuple(share(a, directory, f"arg{i}", min_bytes) for i, a in enumerate(args))
    new_kwargs = {k: share(v, directory, f"kw-{k}", min_bytes) for k, v in kwargs.items()}
    return new_args, new_kwargs


def resolve(value):
    return value.open() if isinstance(value, SharedArray) else value


def resolve_all(args: tuple, kwargs: Mapping) -> tuple[tuple, dict]:
    """Open the shared arrays: each argument comes back as the type it was given."""
    return tuple(resolve(a) for a in args), {k: resolve(v) for k, v in kwargs.items()}


def shared_bytes(*collections) -> int:
    """Bytes of the distinct shared arrays among the given args/kwargs/dicts."""
    seen = {}
    for collection in collections:
        values = collection.values() if isinstance(collection, Mapping) else collection
        for value in values:
            if isinstance(value, SharedArray):
                seen[value.path] = value.nbytes
    return sum(seen.values())
