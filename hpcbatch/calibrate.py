"""Measure a :class:`~hpcbatch.planner.Footprint` instead of guessing it.

Owns calibration only: a *probe* (``"module:function"``, called as
``probe(size, **kwargs)``, doing the real per-worker work for ``size`` items) runs
in a child process at size 0 and at two sizes ``a < b``, started the way the run's
workers are (``start``): a fresh interpreter (``"spawn"``: workers started by Dask's
default, by SLURM or by another cluster), or a fork of this process's multiprocessing
forkserver (``"forkserver"``: local workers forked from a server that preloaded the
workload's modules, see :func:`hpcbatch.cluster.forkserver_workers`; such workers
share the server's pages and hold ~50-60 MiB less than fresh ones).  Each child
reports its peak RSS (``VmHWM`` from ``/proc/self/status``; ``ru_maxrss`` where that
is missing, see :func:`_vm_hwm` for why not always ``ru_maxrss``) and, when
torch has a CUDA device, its peak CUDA memory, as one JSON line on stdout.  A
straight line through the two sized runs gives the bytes per item (slope) and the
fixed bytes per worker (intercept); negative fits are clamped and the result says
so.  The probe should not load the workload's shared input or memory-mapped model:
the planner counts those from their exact sizes (loading them anyway only makes the
plan more cautious).

Does not plan: the returned footprint goes to :func:`hpcbatch.planner.make_plan`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .errors import CalibrationError, ConfigError
from .planner import Footprint
from .units import format_bytes

_MARK = "HPCBATCH_CALIBRATE "
# Below this growth between the two probe sizes the slope is mostly noise.
_MIN_GROWTH_BYTES = 8 * 1024**2
#: How a probe child starts: as the run's workers start (see the module's docstring).
STARTS = ("spawn", "forkserver")
#: A Dask worker holds more than the probe's child: its own state and comms (an idle
#: forkserver worker 189 MiB vs 184 for a bare fork of the same server), the database or
#: zarr clients of real chunks and heap growth over many chunks.  Measured 2026-12-06 on
#: the project's 2-core build machine with forkserver workers: real per-worker peaks
#: were 1.00-1.07 x the forked probe's fit (stocks, 300 days, small model: 279-297 MiB
#: vs 279-281 MiB; predictive 2,000 x 2,000: 229-233 vs 230 MiB), so the fitted fixed
#: bytes get this margin, on the safe side: with 10 % benchmarks/calibration.py measured
#: 0.92-0.96 x the calibrated prediction, and longer runs peak a little higher (stocks
#: workers +2-5 MiB from 1,000 to 5,000 stocks).
WORKER_MARGIN = 0.12

__all__ = ["Calibration", "CalibrationError", "Measurement", "calibrate", "calibrated_footprint"]


@dataclass(frozen=True)
class Measurement:
    size: int
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    wall_s: float


@dataclass(frozen=True)
class Calibration:
    probe: str
    sizes: tuple[int, int]
    measurements: tuple[Measurement, ...]  # size 0, a, b
    fixed_bytes: int  # the fit's fixed bytes + ``margin`` of them
    per_item_bytes: int
    gpu_fixed_bytes: int | None
    gpu_per_item_bytes: int | None
    notes: tuple[str, ...]
    margin: float = 0.0  # added to the fitted fixed bytes for the Dask worker around it
    start: str = "spawn"

    @property
    def source(self) -> str:
        rss = ", ".join(f"{format_bytes(m.peak_rss_bytes)} at {m.size}" for m in self.measurements)
        forked = "; forked from the workers' forkserver" if self.start == "forkserver" else ""
        extra = f"; fixed + {self.margin:.0%} for the Dask worker" if self.margin else ""
        return f"calibrated (probe sizes {self.sizes[0]}, {self.sizes[1]}; peak RSS {rss}{forked}{extra})"

    def apply(self, base: Footprint) -> Footprint:
        """``base`` (usually the analytic footprint) with the measured bytes."""
        values: dict[str, Any] = {
            "per_item_bytes": self.per_item_bytes,
            "baseline_bytes": self.fixed_bytes,
            "source": self.source,
            "constants": "",  # measured here: the analytic constants no longer apply
        }
        if self.gpu_per_item_bytes is not None and self.gpu_fixed_bytes is not None:
            values["gpu_per_item_bytes"] = self.gpu_per_item_bytes
            values["gpu_fixed_bytes"] = self.gpu_fixed_bytes
        return replace(base, **values)

    def to_dict(self) -> dict:
        return {
            "probe": self.probe,
            "sizes": list(self.sizes),
            "measurements": [m.__dict__ for m in self.measurements],
            "fixed_bytes": self.fixed_bytes,
            "per_item_bytes": self.per_item_bytes,
            "gpu_fixed_bytes": self.gpu_fixed_bytes,
            "gpu_per_item_bytes": self.gpu_per_item_bytes,
            "notes": list(self.notes),
            "margin": self.margin,
            "start": self.start,
            "source": self.source,
        }


def _split_probe(probe: str) -> tuple[str, str]:
    module, sep, function = probe.partition(":")
    if not sep or not module or not function:
        raise ConfigError(f"probe {probe!r} must look like 'package.module:function'")
    return module, function


def check_probe(probe: str) -> None:
    """Raise :class:`CalibrationError` unless ``probe`` can be imported (in this process)."""
    module, function = _split_probe(probe)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise CalibrationError(
            f"calibration probe {probe} is not available ({exc}): run without --calibrate "
            "to use the analytic footprint"
        ) from None
    if not callable(getattr(mod, function, None)):
        raise CalibrationError(f"calibration probe {probe}: {module} has no function {function}")


def measure(
    probe: str,
    size: int,
    probe_kwargs: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = 600,
    import_distributed: bool = True,
    start: str = "spawn",
) -> Measurement:
    """Run ``probe(size, **probe_kwargs)`` in a child process started as ``start`` says
    (a fresh interpreter, or a fork of this process's forkserver); return its peaks."""
    _split_probe(probe)
    if start not in STARTS:
        raise ConfigError(f"probe start {start!r} is not one of {', '.join(STARTS)}")
    if start == "forkserver":
        report = _run_forked(probe, size, dict(probe_kwargs or {}), timeout_s, import_distributed)
        return _measurement(size, report)
    args = [
        sys.executable,
        "-m",
        "hpcbatch.calibrate",
        probe,
        str(int(size)),
        json.dumps(dict(probe_kwargs or {})),
        "1" if import_distributed else "0",
    ]
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ)
        )
    except subprocess.TimeoutExpired:
        raise CalibrationError(
            f"probe {probe} at size {size} ran longer than {timeout_s:g} s: use smaller probe sizes"
        ) from None
    lines = [line for line in done.stdout.splitlines() if line.startswith(_MARK)]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        how = f"was killed by signal {-done.returncode}" if done.returncode < 0 else "failed"
        raise CalibrationError(f"probe {probe} at size {size} {how}: {last}")
    return _measurement(size, json.loads(lines[-1][len(_MARK) :]))


def _measurement(size: int, report: Mapping[str, Any]) -> Measurement:
    return Measurement(
        size=int(size),
        peak_rss_bytes=int(report["peak_rss_bytes"]),
        peak_cuda_bytes=report.get("peak_cuda_bytes"),
        wall_s=float(report["wall_s"]),
    )


def _run_forked(
    probe: str, size: int, kwargs: dict, timeout_s: float, import_distributed: bool
) -> dict:
    """The probe's report from a child forked by this process's forkserver (the server
    local Dask workers are forked from: same preloaded modules, same environment).  A
    server not running yet starts with multiprocessing's defaults."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_forked_child,
        args=(probe, int(size), kwargs, import_distributed, writer),
        name=f"hpcbatch-calibrate-{size}",
        daemon=True,
    )
    child.start()
    writer.close()
    try:
        report = reader.recv() if reader.poll(timeout_s) else None
    except EOFError:  # the child died without a word (killed, e.g. out of memory)
        report = {}
    finally:
        reader.close()
    if report is None:
        child.kill()
        child.join()
        raise CalibrationError(
            f"probe {probe} at size {size} ran longer than {timeout_s:g} s: use smaller probe sizes"
        )
    child.join()
    if "error" in report or "peak_rss_bytes" not in report:
        code = child.exitcode or 0
        how = f"was killed by signal {-code}" if code < 0 else "failed"
        raise CalibrationError(f"probe {probe} at size {size} {how}: {report.get('error', '')}")
    return report


def _fit(
    x0: int, y0: int, x1: int, y1: int, baseline: int, what: str, notes: list[str]
) -> tuple[int, int]:
    """Line through (x0, y0), (x1, y1): (fixed, per item), clamped at 0 with a note."""
    slope = (y1 - y0) / (x1 - x0)
    if slope < 0:
        notes.append(
            f"{what} fell from {format_bytes(y0)} at {x0} to {format_bytes(y1)} at {x1}: "
            "per-item bytes clamped to 0; use bigger probe sizes"
        )
        slope = 0.0
    elif y1 - y0 < _MIN_GROWTH_BYTES:
        notes.append(
            f"{what} grew only {format_bytes(y1 - y0)} between sizes {x0} and {x1}: "
            "the per-item figure is mostly noise; use bigger probe sizes"
        )
    fixed = y0 - slope * x0
    if fixed < 0:
        notes.append(
            f"{what} fit gave negative fixed bytes ({format_bytes(fixed)}): "
            f"clamped to the size-0 baseline {format_bytes(baseline)}"
        )
        fixed = baseline
    return int(round(fixed)), int(round(slope))


def calibrate(
    probe: str,
    sizes: Sequence[int] = (4, 16),
    probe_kwargs: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = 600,
    import_distributed: bool = True,
    max_size: int | None = None,
    max_retries: int = 2,
    start: str = "spawn",
    margin: float = WORKER_MARGIN,
) -> Calibration:
    """Measure ``probe`` at size 0 and the two ``sizes``; fit fixed and per-item bytes.

    ``import_distributed`` makes each child import ``distributed`` first, so the
    fixed bytes include what a Dask worker process loads before any task.  ``start``:
    how each child starts, as the run's workers do (``"spawn"``, ``"forkserver"``).
    ``margin``: the fraction added to the fitted fixed bytes for what a Dask worker holds
    beyond the probe (:data:`WORKER_MARGIN`; 0 for the bare fit).  When the
    peak grows by less than 8 MiB between the sizes (noise would dominate the
    slope), the sizes move up to ``(b, 4 b)``, at most ``max_retries`` times and not
    beyond ``max_size`` (e.g. the number of items of the real run); notes say so.
    """
    if len(sizes) != 2:
        raise ConfigError(f"give two probe sizes, e.g. 4,16; got {list(sizes)}")
    a, b = sorted(int(s) for s in sizes)
    if a < 1 or a == b:
        raise ConfigError(f"probe sizes must be two different positive numbers, got {a}, {b}")
    check_probe(probe)

    def run(size: int) -> Measurement:
        return measure(
            probe, size, probe_kwargs, timeout_s=timeout_s,
            import_distributed=import_distributed, start=start,
        )  # fmt: skip

    zero, first, second = run(0), run(a), run(b)
    notes: list[str] = []
    for _ in range(max_retries):
        growth = second.peak_rss_bytes - first.peak_rss_bytes
        small = 0 <= growth < _MIN_GROWTH_BYTES  # a fall is not noise: report it as is
        if not small or (max_size is not None and 4 * b > max_size):
            break
        notes.append(
            f"peak RSS grew only {format_bytes(growth)} between sizes {a} and {b}: "
            f"measured again at {4 * b}"
        )
        a, b, first, second = b, 4 * b, second, run(4 * b)
    runs = (zero, first, second)
    fixed, per_item = _fit(
        a, first.peak_rss_bytes, b, second.peak_rss_bytes, zero.peak_rss_bytes, "peak RSS", notes
    )
    gpu_fixed = gpu_per_item = None
    if all(m.peak_cuda_bytes is not None for m in runs):
        gpu_fixed, gpu_per_item = _fit(
            a,
            first.peak_cuda_bytes,
            b,
            second.peak_cuda_bytes,
            zero.peak_cuda_bytes,
            "peak CUDA memory",
            notes,
        )
    return Calibration(
        probe=probe,
        sizes=(a, b),
        measurements=runs,
        fixed_bytes=int(round(fixed * (1 + margin))),
        per_item_bytes=per_item,
        gpu_fixed_bytes=gpu_fixed,
        gpu_per_item_bytes=gpu_per_item,
        notes=tuple(notes),
        margin=margin,
        start=start,
    )


def calibrated_footprint(
    base: Footprint,
    probe: str,
    sizes: Sequence[int] = (4, 16),
    probe_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Footprint, Calibration]:
    """``base`` with per-item and fixed bytes measured by ``probe``."""
    result = calibrate(probe, sizes, probe_kwargs, **kwargs)
    return result.apply(base), result


# ------------------------------------------------------ the child process ----


def _child(probe: str, size: int, kwargs: dict, import_distributed: bool) -> dict:
    import resource
    import time

    if import_distributed:
        import distributed  # noqa: F401  (what a Dask worker holds before any task)
    module, function = _split_probe(probe)
    fn = getattr(importlib.import_module(module), function)
    start = time.perf_counter()
    fn(size, **kwargs)
    wall = time.perf_counter() - start
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss = maxrss if sys.platform == "darwin" else maxrss * 1024  # KiB on Linux
    hwm = _vm_hwm()
    cuda = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        cuda = int(torch.cuda.max_memory_allocated())
    return {
        "peak_rss_bytes": hwm if hwm is not None else maxrss,
        "ru_maxrss_bytes": maxrss,
        "peak_cuda_bytes": cuda,
        "wall_s": wall,
    }


def _forked_child(probe: str, size: int, kwargs: dict, import_distributed: bool, conn) -> None:
    """The child forked by the forkserver: its report (or its error) down ``conn``."""
    try:
        report: dict = _child(probe, size, kwargs, import_distributed)
    except BaseException as exc:  # noqa: BLE001 (said to the parent, in one line)
        report = {"error": f"{type(exc).__name__}: {exc}"}
    conn.send(report)
    conn.close()


def _vm_hwm() -> int | None:
    """Peak RSS of this process image (``VmHWM``), or None off Linux.

    Preferred over ``ru_maxrss``: Linux carries ``ru_maxrss`` across ``execve``, and
    ``subprocess`` starts the child with vfork, so a child's ``ru_maxrss`` is at least
    the *parent's* peak RSS (measured: 65 MB for a 28 MB probe under pytest).
    ``VmHWM`` belongs to the new memory map and starts afresh at exec.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


if __name__ == "__main__":
    _probe, _size, _kwargs, _dist = sys.argv[1:5]
    _report = _child(_probe, int(_size), json.loads(_kwargs), _dist == "1")
    sys.stdout.flush()
    print(_MARK + json.dumps(_report), flush=True)
