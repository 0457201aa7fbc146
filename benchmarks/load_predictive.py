"""Load benchmark: a predictive run whose sampled observations are larger than RAM.

Runs the real ``hpcbatch predictive sample --with-observations`` command (the
built-in technical model on simulated data, a local Dask cluster of 2 workers planned
by ``--mem`` / ``--cpus``) with the whole job -- driver, scheduler, nannies, workers --
confined to a memory cgroup (v1, ``memory.limit_in_bytes``) of the planned allocation,
at 2-3 output sizes, the largest (by default) bigger than the machine's RAM.

Measured per size: per-worker RSS over time (psutil, every 0.25 s, from outside the
job) and per-worker peak (the run report's nanny samplers, every 0.1 s), the driver's
RSS, the cgroup's ``memory.max_usage_in_bytes`` (which includes page cache),
``failcnt`` and OOM kills, wall time and throughput.  Nothing lost: the ledger holds
exactly the planned chunks and they cover every sample once, every zarr chunk file of
every site exists, and some chunks (first, middle, last) equal an in-process
reference drawn with the same chunk seed by the same per-chunk task the workers run
(``sample_chunk_task``, as the calibration probe runs it).

The fastest small run's throughput is used to extrapolate the largest before it is
launched: just over RAM, shrunk (never below 5x the allocation) to fit ``--budget-s``
and the free disk; ``--big-samples`` sets it (capped by the disk only).  Every store
is deleted afterwards; the JSON keeps each run's memory timelines (2 s peaks).

    nice -n 5 python benchmarks/load_predictive.py --big-samples 340   # ~35 min, 27 GB of y
    nice -n 5 python benchmarks/load_predictive.py    # the largest size from the throughput
    python benchmarks/load_predictive.py --quick      # ~1-2 min, small sizes
    python benchmarks/load_predictive.py --replot     # redraw the PNG from the JSON

Prints one JSON object; writes ``benchmarks/results-load-predictive.json`` and
``docs/load-predictive.png`` (``--quick``: the same names in the temp directory,
unless ``--results`` / ``--plot`` say otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
HPCBATCH = str(Path(sys.executable).with_name("hpcbatch"))
GIB = 1024**3
FULL = {
    "cells": 5000,
    "features": 4000,
    "allocation": "3GiB",
    "sizes": [24, 72],
    "big": "ram",
    "fit_steps": 10,
}
QUICK = {
    "cells": 600,
    "features": 500,
    "allocation": "2GiB",
    "sizes": [8, 32],
    "big": None,
    "fit_steps": 5,
}


# ----------------------------------------------------------------- cgroup ----


class MemoryCgroup:
    """A child memory cgroup (v1) of this process's own, with ``memory.limit_in_bytes``."""

    def __init__(self, path: Path, limit_bytes: int):
        self.path = path
        self.limit_bytes = limit_bytes

    @classmethod
    def create(cls, limit_bytes: int, name: str) -> MemoryCgroup:
        """Create it, or raise ``OSError`` saying why it cannot be done here."""
        own = None
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                own = path
        if own is None:
            raise OSError("no cgroup v1 memory controller in /proc/self/cgroup (cgroup v2 only?)")
        mount = None
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, super_opts = left.split(), right.split()
            if super_opts and super_opts[0] == "cgroup" and "memory" in super_opts[-1].split(","):
                root, mount = fields[3], fields[4]
                if root != "/" and own.startswith(root):
                    own = own[len(root) :] or "/"
                break
        if mount is None:
            raise OSError("the cgroup v1 memory controller is not mounted")
        path = Path(mount) / own.lstrip("/") / name
        path.mkdir()
        try:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            got = int((path / "memory.limit_in_bytes").read_text())
            if abs(got - limit_bytes) > 4096:
                raise OSError(f"memory.limit_in_bytes reads {got}, wrote {limit_bytes}")
        except OSError:
            path.rmdir()
            raise
        return cls(path, limit_bytes)

    def join(self) -> None:
        """Move the calling process into the cgroup (a ``preexec_fn``: the job's processes)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def stat(self) -> dict[str, int]:
        return {k: int(v) for k, v in (ln.split() for ln in self.read("memory.stat").splitlines())}

    def counters(self) -> dict:
        oom = dict(ln.split() for ln in self.read("memory.oom_control").splitlines())
        return {
            "limit_bytes": int(self.read("memory.limit_in_bytes")),
            "max_usage_bytes": int(self.read("memory.max_usage_in_bytes")),
            "failcnt": int(self.read("memory.failcnt")),
            "oom_kills": int(oom.get("oom_kill", 0)),
        }

    def pids(self) -> list[int]:
        return [int(p) for p in self.read("cgroup.procs").split()]

    def remove(self) -> None:
        """Remove it once its processes are gone (kills stragglers this benchmark started)."""
        deadline = time.time() + 30
        while self.pids() and time.time() < deadline:
            time.sleep(0.5)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        for _ in range(60):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.5)
        print(f"warning: could not remove {self.path}", file=sys.stderr)


# ---------------------------------------------------------------- monitor ----


class TreeMonitor(threading.Thread):
    """Samples the RSS of a process and its descendants, and the cgroup's usage."""

    def __init__(self, pid: int, cgroup: MemoryCgroup | None, interval_s: float = 0.25):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.cgroup = cgroup
        self.interval_s = interval_s
        self.t0 = time.time()
        self.procs: dict[int, dict] = {}
        self.cg: dict[str, list] = {"t": [], "usage": [], "rss": [], "cache": []}
        self.tree: dict[str, list] = {"t": [], "rss": []}
        self._halt = threading.Event()
        self._handles: dict[int, psutil.Process] = {}

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def _role(self, proc: psutil.Process) -> str:
        if proc.pid == self.root.pid:
            return "driver"
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            return "other"
        if "resource_tracker" in cmd:
            return "other"
        return "worker" if "spawn_main" in cmd or "multiprocessing" in cmd else "other"

    def run(self) -> None:
        while not self._halt.is_set():
            now = time.time() - self.t0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            total = 0
            for proc in procs:
                handle = self._handles.setdefault(proc.pid, proc)
                try:
                    rss = handle.memory_info().rss
                except psutil.Error:
                    continue
                entry = self.procs.get(proc.pid)
                if entry is None:
                    entry = self.procs[proc.pid] = {"role": self._role(handle), "t": [], "rss": []}
                entry["t"].append(round(now, 2))
                entry["rss"].append(rss)
                total += rss
            if procs:
                self.tree["t"].append(round(now, 2))
                self.tree["rss"].append(total)
            if self.cgroup is not None:
                with contextlib.suppress(OSError, ValueError):
                    stat = self.cgroup.stat()
                    self.cg["t"].append(round(now, 2))
                    self.cg["usage"].append(int(self.cgroup.read("memory.usage_in_bytes")))
                    self.cg["rss"].append(stat.get("total_rss", 0))
                    self.cg["cache"].append(stat.get("total_cache", 0))
            self._halt.wait(self.interval_s)

    def workers(self) -> list[dict]:
        found = [dict(pid=p, **e) for p, e in self.procs.items() if e["role"] == "worker"]
        return sorted((w for w in found if w["t"]), key=lambda w: w["t"][0])


# -------------------------------------------------------------- the runs ----


def _cli(*args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([HPCBATCH, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"hpcbatch {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    if not quiet:
        print(proc.stdout.strip(), file=sys.stderr)
    return proc


def prepare_data(work: Path, cells: int, features: int, fit_steps: int) -> Path:
    data = work / "data"
    t0 = time.time()
    _cli("predictive", "simulate", "--cells", str(cells), "--features", str(features),
         "--groups", "2", "--seed", "0", "--out", str(data), quiet=False)  # fmt: skip
    _cli("predictive", "fit", str(data), "--steps", str(fit_steps), quiet=False)
    print(f"data ready in {time.time() - t0:.0f} s", file=sys.stderr)
    return data


def _parse_json(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(text[text.index("\n{") + 1 :] if not text.startswith("{") else text)


def run_size(
    data: Path, work: Path, samples: int, allocation: str, seed: int, use_cgroup: bool
) -> dict:
    """One ``hpcbatch predictive sample --with-observations`` run in its own cgroup."""
    from hpcbatch.units import parse_bytes

    limit = parse_bytes(allocation)
    store = work / f"s{samples}.zarr"
    cmd = [HPCBATCH, "predictive", "sample", str(data), "--samples", str(samples),
           "--with-observations", "--mem", allocation, "--cpus", "2", "--seed", str(seed),
           "--out", str(store), "--report-dir", str(work / "reports"), "--json"]  # fmt: skip
    cgroup, why_not = None, None
    if use_cgroup:
        try:
            cgroup = MemoryCgroup.create(limit, f"hpcbatch-load-{os.getpid()}-{samples}")
        except OSError as exc:
            why_not = f"{type(exc).__name__}: {exc}"
    print(f"run S={samples}: {' '.join(cmd[1:])}", file=sys.stderr)
    t0 = time.time()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=cgroup.join if cgroup else None,  # noqa: PLW1509 (only writes a file)
    )
    monitor = TreeMonitor(proc.pid, cgroup)
    monitor.start()
    try:
        out, err = proc.communicate()
    except BaseException:
        _kill_tree(proc.pid)
        raise
    finally:
        wall = time.time() - t0
        counters = None
        try:
            monitor.stop()
            if cgroup is not None:
                counters = cgroup.counters()
        finally:
            if cgroup is not None:
                cgroup.remove()
    if proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-15:])
        raise SystemExit(f"S={samples}: hpcbatch exited {proc.returncode}:\n{tail}")
    report = _parse_json(out)
    return {
        "samples": samples,
        "store": store,
        "wall_s": wall,
        "report": report,
        "monitor": monitor,
        "cgroup": counters,
        "cgroup_path": str(cgroup.path) if cgroup else None,
        "cgroup_unavailable": why_not,
        "allocation_bytes": limit,
    }


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


# ---------------------------------------------------------- nothing lost ----


def _zarr_meta(site_dir: Path) -> dict:
    return json.loads((site_dir / "zarr.json").read_text())


def check_store(store: Path, report: dict) -> dict:
    """Ledger == planned chunks, covering every sample once; every zarr chunk file there."""
    plan = report["plan"]
    group = json.loads((store / "zarr.json").read_text())
    attrs = group["attributes"]["hpcbatch"]
    samples = int(attrs["num_samples"])
    planned = math.ceil(samples / int(plan["chunk_size"]))
    ledger = store.with_name(store.name + ".ledger.db")
    con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT chunk_id, start, stop, meta FROM hpcbatch_chunks WHERE run_id = ?",
            (report["run_id"],),
        ).fetchall()
        status = con.execute(
            "SELECT status FROM hpcbatch_runs WHERE run_id = ?", (report["run_id"],)
        ).fetchone()
    finally:
        con.close()
    covered, contiguous = 0, True
    for _, start, stop, _ in sorted(rows, key=lambda r: r[1]):
        contiguous &= start == covered
        covered = max(covered, stop)
    written = sum(json.loads(r[3]).get("bytes_written", 0) for r in rows)
    files = {}
    for site in attrs["sites"]:
        meta = _zarr_meta(store / site)
        grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        expected = math.prod(math.ceil(n / c) for n, c in zip(meta["shape"], grid, strict=True))
        found = sum(1 for p in (store / site / "c").rglob("*") if p.is_file())
        files[site] = {"found": found, "expected": expected, "shape": meta["shape"]}
    y = _zarr_meta(store / "y")
    ok = (
        len(rows) == planned == report["n_chunks"] == report["chunks_done"]
        and len({r[0] for r in rows}) == len(rows)
        and contiguous
        and covered == samples
        and all(f["found"] == f["expected"] for f in files.values())
        and report["status"] == "finished"
        and report["chunks_failed"] == 0
    )
    return {
        "ok": bool(ok),
        "planned_chunks": planned,
        "ledger_chunks": len(rows),
        "ledger_run_status": status[0] if status else None,
        "ledger_covers_every_sample_once": bool(contiguous and covered == samples),
        "ledger_bytes_written": written,
        "zarr_chunk_files": files,
        "y_bytes": math.prod(y["shape"]) * 4,
    }


def spot_check(data: Path, store: Path, n_check: int = 3) -> list[dict]:
    """Chunks first/middle/last re-drawn in this process (same seed, same task) == the store."""
    import numpy as np
    import zarr

    from hpcbatch.predictive import core, technical
    from hpcbatch.predictive.sampling import (
        _ARRAYS,
        _JOBS,
        SamplingJob,
        _create_store,
        _guide_state,
        sample_chunk_task,
    )
    from hpcbatch.runner import TaskContext, chunk_seed, make_chunks

    got = zarr.open_group(store=str(store), mode="r")
    attrs = dict(got.attrs)["hpcbatch"]
    data_, guide, mu_mean, mu_sd = technical.load_fit(data)
    args, kwargs = technical.model_inputs(data_, mu_mean, mu_sd, with_counts=False)
    layout = core.inspect_model(
        technical.technical_model, guide=guide, posterior={},
        num_samples=int(attrs["num_samples"]), model_args=args, model_kwargs=kwargs,
        return_sites=attrs["sites"], data_plate=technical.DATA_PLATE,
        split_args=technical.SPLIT_ARGS,
    )  # fmt: skip
    block = attrs["cell_block"]
    job = SamplingJob(
        technical.technical_model, guide, {}, args, kwargs, layout, technical.DATA_PLATE,
        block, guide_param_state=_guide_state(guide),
    )  # fmt: skip
    chunks = make_chunks(int(attrs["num_samples"]), int(attrs["chunk_size"]))
    picks = sorted({0, len(chunks) // 2, len(chunks) - 1})[:n_check]
    scratch = Path(tempfile.mkdtemp(prefix="hpcbatch-load-ref-", dir=store.parent))
    ref_path = scratch / "ref.zarr"
    key = f"load-ref-{scratch.name}"
    results = []
    try:
        _create_store(ref_path, layout, block, False, {}, int(attrs["chunk_size"]))
        _JOBS[key] = job
        ref = zarr.open_group(store=str(ref_path), mode="r")
        for i in picks:
            chunk = chunks[i]
            ctx = TaskContext(attrs["run_id"], chunk_seed(int(attrs["seed"]), chunk.chunk_id), 0)
            sample_chunk_task(chunk, ctx, job_path=key, out=str(ref_path))
            equal = {
                site: bool(
                    np.array_equal(
                        np.asarray(ref[site][chunk.start : chunk.stop]),
                        np.asarray(got[site][chunk.start : chunk.stop]),
                    )
                )
                for site in attrs["sites"]
            }
            results.append(
                {"chunk": chunk.chunk_id, "samples": [chunk.start, chunk.stop], "equal": equal}
            )
    finally:
        _JOBS.pop(key, None)
        for k in [k for k in _ARRAYS if k[0] == str(ref_path)]:
            _ARRAYS.pop(k, None)
        shutil.rmtree(scratch, ignore_errors=True)
    return results


# ----------------------------------------------------------- summarising ----


def _drift(t: list[float], rss: list[int], window_s: float = 60.0) -> dict | None:
    """Does a worker's RSS creep?  The trend of its per-window peaks (1.0 = flat).

    The worker's life is cut into ``window_s`` windows (the first, start-up, dropped);
    a least-squares line through the windows' peak RSS gives the creep per minute and
    the change over the run relative to the first window's peak.
    """
    import numpy as np

    if not t or t[-1] - t[0] < 4 * window_s:
        return None
    tt, rr = np.asarray(t), np.asarray(rss, dtype=float)
    edges = np.arange(tt[0] + window_s, tt[-1] - window_s / 2, window_s)
    mids, peaks = [], []
    for lo in edges:
        sel = (tt >= lo) & (tt < lo + window_s)
        if sel.any():
            mids.append(lo + window_s / 2)
            peaks.append(rr[sel].max())
    slope, icpt = np.polyfit(mids, peaks, 1)
    fitted_first, fitted_last = icpt + slope * mids[0], icpt + slope * mids[-1]
    return {
        "windows": len(peaks),
        "window_peak_slope_mib_per_min": round(float(slope) * 60 / 2**20, 3),
        "fitted_last_over_first": round(float(fitted_last / fitted_first), 3),
        "peak_second_half_over_first_half": round(
            float(max(peaks[len(peaks) // 2 :]) / max(peaks[: len(peaks) // 2])), 3
        ),
    }


def _binned(t: list[float], values: list[int], bin_s: float = 2.0) -> dict:
    """A timeline reduced to the maximum of each ``bin_s`` bin (peaks kept), for the JSON."""
    out: dict[str, list] = {"t": [], "v": []}
    for ti, vi in zip(t, values, strict=True):
        b = round(ti // bin_s * bin_s, 1)
        if out["t"] and out["t"][-1] == b:
            out["v"][-1] = max(out["v"][-1], vi)
        else:
            out["t"].append(b)
            out["v"].append(vi)
    return out


def timelines(mon: TreeMonitor) -> dict:
    """The run's memory timelines (2 s peaks): workers, driver, cgroup RSS and usage."""
    return {
        "workers": [{"pid": w["pid"], **_binned(w["t"], w["rss"])} for w in mon.workers()],
        "driver": [_binned(e["t"], e["rss"]) for e in mon.procs.values() if e["role"] == "driver"],
        "cgroup_rss": _binned(mon.cg["t"], mon.cg["rss"]),
        "cgroup_usage": _binned(mon.cg["t"], mon.cg["usage"]),
    }


def summarise(run: dict, checks: dict, spot: list[dict], ram: int) -> dict:
    report = run["report"]
    plan = report["plan"]
    mon: TreeMonitor = run["monitor"]
    workers = mon.workers()
    drivers = [e for e in mon.procs.values() if e["role"] == "driver"]
    y_bytes = checks["y_bytes"]
    runner_wall = report["wall_time_s"]
    return {
        "samples": run["samples"],
        "y_bytes": y_bytes,
        "y_gib": round(y_bytes / GIB, 2),
        "y_over_allocation": round(y_bytes / run["allocation_bytes"], 2),
        "y_over_ram": round(y_bytes / ram, 3),
        "wall_s": round(run["wall_s"], 1),
        "runner_wall_s": runner_wall,
        "samples_per_s": round(run["samples"] / runner_wall, 3),
        "y_mb_per_s": round(y_bytes / runner_wall / 1e6, 1),
        "plan": {
            "workers": plan["n_workers"],
            "memory_limit_bytes": plan["memory_limit_bytes"],
            "chunk_size": plan["chunk_size"],
            "predicted_peak_bytes": plan["predicted_peak_bytes"],
            "cell_block": json.loads((run["store"] / "zarr.json").read_text())["attributes"][
                "hpcbatch"
            ]["cell_block"],
        },
        "status": report["status"],
        "chunks": {
            k: report[k]
            for k in ("n_chunks", "chunks_done", "chunks_retried", "chunks_split", "chunks_failed")
        },
        "worker_deaths": report["worker_deaths"],
        "per_worker_peak_bytes_nanny": report["measured_peak_per_worker"],
        "per_worker_peak_bytes_psutil": [max(w["rss"]) for w in workers],
        "worker_processes_seen": len(workers),
        "per_worker_rss_creep": [_drift(w["t"], w["rss"]) for w in workers],
        "driver_peak_bytes": max((max(d["rss"]) for d in drivers), default=None),
        "job_tree_peak_bytes": max(mon.tree["rss"], default=None),
        "cgroup": None
        if run["cgroup"] is None
        else {
            **run["cgroup"],
            "path": run["cgroup_path"],
            "max_sampled_rss_bytes": max(mon.cg["rss"], default=None),
            "max_sampled_cache_bytes": max(mon.cg["cache"], default=None),
        },
        "cgroup_unavailable": run["cgroup_unavailable"],
        "timeline": timelines(mon),
        "nothing_lost": {
            **checks,
            "spot_check": spot,
            "ok": checks["ok"] and all(all(s["equal"].values()) for s in spot),
        },  # fmt: skip
    }


def flatness(runs: list[dict]) -> dict:
    """Per-worker peak against output size, among runs planned with the same chunk size.

    A worker's memory depends on its chunk (samples x cell block), which the planner may
    make smaller for a short run (several chunks per worker); at one chunk size, flat
    means the peak does not follow the number of samples written.
    """
    largest = max(runs, key=lambda r: r["y_bytes"])
    same = [r for r in runs if r["plan"]["chunk_size"] == largest["plan"]["chunk_size"]]
    smallest = min(same, key=lambda r: r["y_bytes"])

    def peak(r: dict) -> int:
        return max(r["per_worker_peak_bytes_nanny"].values())

    return {
        "chunk_size": largest["plan"]["chunk_size"],
        "runs_compared_samples": [r["samples"] for r in same],
        "y_largest_over_smallest": round(largest["y_bytes"] / smallest["y_bytes"], 2),
        "worker_peak_smallest_bytes": peak(smallest),
        "worker_peak_largest_bytes": peak(largest),
        "peak_largest_over_smallest": round(peak(largest) / peak(smallest), 3),
        "measured_over_predicted": {
            r["samples"]: round(peak(r) / r["plan"]["predicted_peak_bytes"], 3) for r in runs
        },
        "max_worker_peak_over_limit": round(
            max(peak(r) / r["plan"]["memory_limit_bytes"] for r in runs), 3
        ),
    }


def plot(runs: list[dict], path: Path, allocation: int, ram: int) -> None:
    """Left: the largest run's memory over time; right: per-worker peak vs output size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    big = max(runs, key=lambda r: r["y_bytes"])
    tl = big["timeline"]
    limit = big["plan"]["memory_limit_bytes"] / GIB
    predicted = big["plan"]["predicted_peak_bytes"] / GIB
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 5.8), dpi=110, width_ratios=[1.7, 1])
    if tl["cgroup_usage"]["t"]:
        ax.plot(tl["cgroup_usage"]["t"], [v / GIB for v in tl["cgroup_usage"]["v"]], lw=0.8,
                color="tab:red", alpha=0.5, label="cgroup usage (RSS + page cache)")  # fmt: skip
        ax.plot(tl["cgroup_rss"]["t"], [v / GIB for v in tl["cgroup_rss"]["v"]], lw=0.8,
                color="purple", alpha=0.6, label="cgroup RSS (all job processes, anonymous)")  # fmt: skip
    for i, w in enumerate(tl["workers"]):
        ax.plot(w["t"], [v / GIB for v in w["v"]], lw=0.9, label=f"worker {i} RSS")
    for d in tl["driver"]:
        ax.plot(d["t"], [v / GIB for v in d["v"]], lw=1.0, color="grey",
                label="driver RSS (client + scheduler + nannies)")  # fmt: skip
    ax.axhline(limit, color="black", lw=1.4, label=f"worker memory limit (planner) {limit:.2f} GiB")
    ax.axhline(predicted, color="tab:blue", ls="-.", lw=1.2,
               label=f"predicted peak per worker (planner) {predicted:.2f} GiB")  # fmt: skip
    if big["cgroup"]:
        ax.axhline(allocation / GIB, color="tab:red", ls="--", lw=1.2,
                   label=f"job cgroup limit {allocation / GIB:.1f} GiB")  # fmt: skip
    top = max(allocation / GIB, limit) * 1.35
    ax.set_ylim(0, top)
    ax.set_xlabel("time since the command started (s)")
    ax.set_ylabel("GiB (peak of each 2 s, sampled every 0.25 s)")
    ax.set_title(
        f"S={big['samples']}: {big['y_gib']:.1f} GiB of observations written in "
        f"{big['runner_wall_s']:,.0f} s ({big['y_over_allocation']:.1f}x the job's "
        f"memory, {big['y_over_ram']:.2f}x RAM)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", ncol=2)
    xs = [r["y_bytes"] / GIB for r in runs]
    for k, (r, x) in enumerate(zip(runs, xs, strict=True)):
        peaks = list(r["per_worker_peak_bytes_nanny"].values())
        bx.scatter([x] * len(peaks), [p / GIB for p in peaks], color="tab:orange", zorder=3,
                   label="per-worker peak (run report)" if k == 0 else None)  # fmt: skip
        bx.annotate(f"S={r['samples']}, chunk {r['plan']['chunk_size']}", (x, max(peaks) / GIB),
                    textcoords="offset points", xytext=(-20, -16), fontsize=7.5)  # fmt: skip
        if r["cgroup"]:
            bx.scatter([x], [r["cgroup"]["max_sampled_rss_bytes"] / GIB], marker="s",
                       color="tab:purple", zorder=3,
                       label="cgroup RSS, max sampled" if k == 0 else None)  # fmt: skip
    bx.plot(xs, [r["plan"]["predicted_peak_bytes"] / GIB for r in runs], "-.",
            color="tab:blue", label="predicted peak per worker")  # fmt: skip
    bx.plot(xs, [r["plan"]["memory_limit_bytes"] / GIB for r in runs], "-",
            color="black", label="worker memory limit")  # fmt: skip
    bx.axhline(allocation / GIB, color="tab:red", ls="--", lw=1, label="job cgroup limit")
    bx.axvline(allocation / GIB, color="tab:red", ls=":", lw=1, label="output = job memory")
    bx.axvline(
        ram / GIB, color="tab:green", ls="--", lw=1, label=f"output = RAM {ram / GIB:.1f} GiB"
    )
    bx.set_xscale("log")
    bx.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    bx.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    bx.set_xticks([v for v in (0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 50) if min(xs) / 1.5 <= v])
    bx.set_xlim(min(xs) / 1.5, max(max(xs), ram / GIB) * 1.5)
    bx.set_xlabel("observations written, y (GiB, log scale)")
    bx.set_ylabel("GiB")
    bx.set_ylim(0, top)
    bx.set_title("peak memory vs output size", fontsize=10)
    bx.grid(alpha=0.3, which="both")
    bx.legend(fontsize=7.5, loc="upper left", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------ main ----


def choose_big(
    rate_samples_s: float,
    startup_s: float,
    per_sample: int,
    allocation: int,
    ram: int,
    budget_s: float,
    disk_free: int,
    requested: int | None,
) -> tuple[int, dict]:
    """The largest size: just over RAM, or what the time budget and the disk allow.

    An explicit ``requested`` size is only capped by the disk (15 GB kept free).
    """
    want = requested or math.ceil(ram * 1.07 / per_sample)
    by_time = int((budget_s - startup_s) * rate_samples_s)
    by_disk = int((disk_free - 15e9) / per_sample)
    floor = math.ceil(5 * allocation / per_sample)
    samples = min(requested, by_disk) if requested else max(floor, min(want, by_time, by_disk))
    return samples, {
        "wanted": want,
        "fits_time_budget": by_time,
        "fits_disk": by_disk,
        "at_least_5x_allocation": floor,
        "chosen": samples,
        "predicted_runner_s": round(samples / rate_samples_s, 0),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes (~1-2 min).")
    parser.add_argument("--cells", type=int)
    parser.add_argument("--features", type=int)
    parser.add_argument("--allocation", help="Job memory (--mem and the cgroup limit), e.g. 3GiB.")
    parser.add_argument("--sizes", help="Comma-separated sample counts of the small runs.")
    parser.add_argument("--big-samples", type=int, help="Samples of the largest run.")
    parser.add_argument("--no-big", action="store_true", help="Only the small sizes.")
    parser.add_argument("--budget-s", type=float, default=1500, help="Time for the largest run.")
    parser.add_argument("--no-cgroup", action="store_true", help="Only Dask's per-worker limits.")
    parser.add_argument("--workdir", help="Where data and stores go (default: a temp dir).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", help="JSON output path.")
    parser.add_argument("--plot", help="PNG output path.")
    parser.add_argument("--replot", action="store_true", help="Redraw the PNG from --results.")
    a = parser.parse_args(argv)
    from hpcbatch.units import parse_bytes

    cfg = dict(QUICK if a.quick else FULL)
    for key in ("cells", "features", "allocation"):
        if getattr(a, key):
            cfg[key] = getattr(a, key)
    if a.sizes:
        cfg["sizes"] = [int(s) for s in a.sizes.split(",")]
    if a.no_big:
        cfg["big"] = None
    # --quick leaves the committed figures alone: its files go to the temp directory
    base = Path(tempfile.gettempdir()) if a.quick else None
    results_path = Path(a.results or (base or ROOT / "benchmarks") / "results-load-predictive.json")
    plot_path = Path(a.plot or (base or ROOT / "docs") / "load-predictive.png")
    allocation = parse_bytes(cfg["allocation"])
    if a.replot:
        saved = json.loads(results_path.read_text())
        plot(saved["runs"], plot_path, saved["allocation_bytes"], saved["machine"]["ram_bytes"])
        return saved
    ram = psutil.virtual_memory().total
    per_sample = cfg["cells"] * cfg["features"] * 4
    work = Path(a.workdir or tempfile.mkdtemp(prefix="hpcbatch-load-predictive-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    runs: list[dict] = []
    try:
        data = prepare_data(work, cfg["cells"], cfg["features"], cfg["fit_steps"])
        sizes = list(cfg["sizes"])
        extrapolation = None
        i = 0
        while i < len(sizes):
            run = run_size(data, work, sizes[i], cfg["allocation"], a.seed, not a.no_cgroup)
            checks = check_store(run["store"], run["report"])
            spot = spot_check(data, run["store"])
            run["summary"] = summarise(run, checks, spot, ram)
            shutil.rmtree(run["store"], ignore_errors=True)
            s = run["summary"]
            print(
                f"  S={s['samples']}: y {s['y_gib']} GiB in {s['runner_wall_s']:.0f} s, "
                f"worker peaks {[round(p / GIB, 2) for p in s['per_worker_peak_bytes_nanny'].values()]}"
                f" GiB, nothing lost: {s['nothing_lost']['ok']}",
                file=sys.stderr,
            )
            runs.append(run)
            if i == len(cfg["sizes"]) - 1 and (cfg["big"] or a.big_samples):
                # the fastest small run: other jobs' load on a shared machine comes and goes
                rate = max(r["summary"]["samples_per_s"] for r in runs)
                big, extrapolation = choose_big(
                    rate, s["wall_s"] - s["runner_wall_s"], per_sample, allocation, ram,
                    a.budget_s, shutil.disk_usage(work).free, a.big_samples,
                )  # fmt: skip
                print(f"  largest run: {extrapolation}", file=sys.stderr)
                sizes.append(big)
            i += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plot([r["summary"] for r in runs], plot_path, allocation, ram)
    result = {
        "benchmark": "load-predictive",
        "mode": "quick" if a.quick else "full",
        "command": " ".join(
            [
                "nice -n 5 python benchmarks/load_predictive.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"ram_bytes": ram, "cpus": psutil.cpu_count(), "load_avg": os.getloadavg()},
        "data": {
            "cells": cfg["cells"],
            "features": cfg["features"],
            "groups": 2,
            "y_bytes_per_sample": per_sample,
            "fit_steps": cfg["fit_steps"],
        },  # fmt: skip
        "allocation_bytes": allocation,
        "largest_run_choice": extrapolation,
        "runs": [r["summary"] for r in runs],
        "flat": flatness([r["summary"] for r in runs]),
        "nothing_lost": all(r["summary"]["nothing_lost"]["ok"] for r in runs),
        "total_wall_s": round(time.time() - t_start, 1),
        "plot": str(plot_path.relative_to(ROOT))
        if plot_path.is_relative_to(ROOT)
        else str(plot_path),
    }
    results_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
