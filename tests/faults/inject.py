"""Fault injection for real hpcbatch runs: a Dask worker *preload* module.

Set ``DASK_DISTRIBUTED__WORKER__PRELOAD='["inject"]'`` (with this directory on
``PYTHONPATH``) and every worker of the run imports this module before its first
task; it wraps the workloads' chunk functions (``hpcbatch.stocks.task.predict_chunk``,
``hpcbatch.predictive.task.sample_chunk_task``), leaving hpcbatch's code untouched.
Faults, from environment variables (inherited by the workers):

- ``HPCBATCH_FAULT_DELAY_S``: sleep this long before each chunk (to stop a run half
  way by killing a worker or the driver);
- ``HPCBATCH_FAULT_MARK_DIR``: touch ``<dir>/<chunk_id>-<ns>`` when a chunk starts
  (count how many chunks ran, and which);
- ``HPCBATCH_FAULT_HOG_MB``: a chunk of more than ``HPCBATCH_FAULT_HOG_ABOVE`` items
  (default 0), and holding the item ``HPCBATCH_FAULT_HOG_ITEM`` if that is set,
  allocates and touches that many MB every time it runs: a chunk that exceeds its
  worker's memory limit, repeatedly (``ABOVE=1``: its halves fit; ``ABOVE=0`` with an
  item: it cannot fit even at the minimum size);
- ``HPCBATCH_FAULT_FAIL_ITEM``: a chunk holding this item raises ``RuntimeError``
  (a bug or bad row: retried, then the run fails naming the chunk).
"""

from __future__ import annotations

import functools
import importlib
import os
import time
from pathlib import Path

TARGETS = (
    ("hpcbatch.stocks.task", "predict_chunk"),  # PredictTask calls it from its own module
    ("hpcbatch.predictive.task", "sample_chunk_task"),
    ("hpcbatch.predictive.sampling", "sample_chunk_task"),
    ("hpcbatch.predictive.sample", "sample_chunk_task"),  # its name before the rename
)


def _hog(mb: int) -> None:
    import numpy as np

    block = np.ones(mb * 2**20 // 8)  # touched: resident, not just reserved
    time.sleep(2.0)  # hold it long enough for the nanny's memory monitor to see it
    del block


def _before_chunk(chunk) -> None:
    mark_dir = os.environ.get("HPCBATCH_FAULT_MARK_DIR")
    if mark_dir:
        Path(mark_dir).mkdir(parents=True, exist_ok=True)
        (Path(mark_dir) / f"{chunk.chunk_id}-{time.time_ns()}").touch()
    hog_mb = int(os.environ.get("HPCBATCH_FAULT_HOG_MB", "0") or 0)
    if hog_mb:
        above = int(os.environ.get("HPCBATCH_FAULT_HOG_ABOVE", "0") or 0)
        item = os.environ.get("HPCBATCH_FAULT_HOG_ITEM")
        if chunk.size > above and (not item or item in tuple(chunk.items)):
            _hog(hog_mb)
    fail = os.environ.get("HPCBATCH_FAULT_FAIL_ITEM")
    if fail and fail in tuple(chunk.items):
        raise RuntimeError(f"injected failure in chunk {chunk.chunk_id}")
    delay = float(os.environ.get("HPCBATCH_FAULT_DELAY_S", "0") or 0)
    if delay:
        time.sleep(delay)


def _wrap(func):
    if getattr(func, "_hpcbatch_fault", False):
        return func

    @functools.wraps(func)
    def wrapper(chunk, *args, **kwargs):
        _before_chunk(chunk)
        return func(chunk, *args, **kwargs)

    wrapper._hpcbatch_fault = True
    return wrapper


def install() -> None:
    for module_name, name in TARGETS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            setattr(module, name, _wrap(getattr(module, name)))


install()


def dask_setup(worker=None) -> None:
    """The preload hook (patching happened on import); with ``HPCBATCH_FAULT_ADDR_DIR``
    each worker records the scheduler address it connects to (tcp:// or tls://)."""
    install()
    addr_dir = os.environ.get("HPCBATCH_FAULT_ADDR_DIR")
    if addr_dir and worker is not None:
        Path(addr_dir).mkdir(parents=True, exist_ok=True)
        (Path(addr_dir) / f"worker-{os.getpid()}").write_text(str(worker.scheduler.address))
