"""Benchmark: posterior predictive sampling of the built-in technical model; JSON out.

Cases (the table of issue 15; REFERENCE.md section 2), run by default in this order:

- ``latent_5k_4k``: latent sites only (alpha_y, mu_ntc, phi_y), N=5,000 x T=4,000, S=1,000;
- ``obs_2k_2k``: with observations y, N=2,000 x T=2,000, S=100 (Predictive fits);
- ``obs_5k_4k``: with observations, N=5,000 x T=4,000, S=40 (shrunk from S=200 so the
  whole default set runs in under 10 minutes on a quiet 2-core machine; ``--samples``
  restores it);
- optional (``--cases``): ``latent_20k_30k`` (the original's scale, slow to simulate).

A case without observations (a fraction of a second of drawing) runs every contender
``--short-rounds`` times (5), each time in a fresh process, the order rotated each round,
and shows each contender's median round (``rounds_wall_s``, ``rounds_peak_bytes``: all
of them): one cold call that short varies by +-20 % from run to run.

Contenders, each in a fresh process whose whole process tree is watched from outside:

- ``predictive_parallel``: ``Predictive(parallel=True)`` called as a knowledgeable user
  would: for latent sites, ``return_sites`` = the latents and the model run on one cell
  with that cell's observed counts (no likelihood over all cells, nothing drawn for y);
  with observations, every cell and ``counts=None``;
- ``original_loop``: the seed's loop, ``Predictive(parallel=True)`` over batches of 50,
  with the same arguments;
- ``predictive_sequential``: ``Predictive(parallel=False)`` (not in the default set: slow);
- ``hpcbatch``: the default call ``hpcbatch.predictive.sample(...)`` (``cluster="auto"``)
  planned for the cap and 2 CPUs: latent sites returned in memory (as Predictive
  returns them), observations written to zarr;
- ``hpcbatch_cluster``: the same with ``cluster="cluster"`` (always a 2-worker local
  Dask cluster, workers forked from a forkserver that imported torch and Pyro once, the
  default: client + scheduler + forkserver + nannies + workers all counted); skipped
  where the default call already ran on the cluster;
- ``hpcbatch_spawn``: as ``hpcbatch_cluster`` with ``worker_start="spawn"`` (Dask's own
  start method: each worker imports torch and Pyro);
- ``hpcbatch_inprocess`` (not in the default set): ``cluster="inprocess"``;
- ``floor``: the interpreter with torch and Pyro imported, the inputs, the outputs
  allocated, and the raw guide draws (their time is the floor for samples/s);
- ``raw_draw`` (once at the start, and for each case with observations right before
  and right after the default call, whose ``vs_raw_draw_rate_adjacent`` is against the
  mean of those two: the machine's speed drifts 10-20 % over minutes): torch's
  NegativeBinomial samples/s on one core (one torch thread), times the cores: the
  yardstick for drawing observations;
- ``case_draw`` (each case with observations): the same at the case's own parameters
  (the model's total_count and logits for 200 cells): the raw rate of exactly the draw
  the job makes (the rate depends on the counts' size).

Per worker (cluster runs): each worker's peak RSS (the runner's own sampling) against
what a worker must hold (issue 15 item 3): the runtime (the RSS of a fresh benchmark
process after importing torch, Pyro, distributed and hpcbatch, before any data), the
inputs it holds (every tensor argument but the memory-mapped counts) and one chunk's
outputs in flight (latent sites of the chunk, one block of rows of the plate sites).

The same yardstick for everyone: every contender's process tree is sampled every 0.1 s
(RSS summed, and each process's VmHWM, its own high-water mark, read at each sample);
``peak_bytes`` is the sum over the tree's processes of their last-read VmHWM (exact
for one process, an upper bound for a cluster), ``peak_rss_sampled_bytes`` the highest
summed RSS seen and ``peak_pss_sampled_bytes`` the highest summed PSS (pages shared
between processes, such as torch's libraries under a forkserver, counted once), read
every ``PSS_EVERY`` samples (1 s): ``smaps_rollup`` walks every page table, 33 ms of CPU
for a 5-process tree, which at every 0.1 s sample took ~30 % of a core from the
contender it measured (2026-12-07).  A tree above the cap is killed.  Imports and loading the fit happen
before the clock starts for every contender.  The posterior is an AutoNormal guide
initialised from the data's moments (no fit: draw cost does not depend on the values).

Usage: ``python benchmarks/predictive.py [--cap-gb 8] [--cases a,b] [--contenders a,b]
[--samples S] [--json-out FILE]``.  The JSON records the machine (cores, memory), the
versions and ``os.getloadavg()`` at the start and end of the run and of each case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "latent_5k_4k": dict(cells=5000, features=4000, samples=1000, observations=False),
    "obs_2k_2k": dict(cells=2000, features=2000, samples=100, observations=True),
    "obs_5k_4k": dict(cells=5000, features=4000, samples=40, observations=True),
    "latent_20k_30k": dict(cells=20000, features=30000, samples=1000, observations=False),
    # Seconds-long smoke cases (tests, development): not for timing claims.
    "smoke_latent": dict(cells=200, features=300, samples=100, observations=False),
    "smoke_obs": dict(cells=200, features=300, samples=20, observations=True),
}
DEFAULT_CASES = ("latent_5k_4k", "obs_2k_2k", "obs_5k_4k")
CONTENDERS = (
    "floor",
    "hpcbatch",
    "hpcbatch_cluster",  # skipped where the default call already ran on the cluster
    "hpcbatch_spawn",
    "predictive_parallel",
    "original_loop",
)
ALL_CONTENDERS = (*CONTENDERS, "hpcbatch_inprocess", "predictive_sequential")
SAMPLE_S = 0.1
PSS_EVERY = 10  # samples: PSS every 1 s (see the module docstring)


# ----------------------------------------------------------- child side ----


def _prepare(data_dir: Path, cells: int, features: int) -> None:
    """Simulated data and a sensibly initialised (unfitted) guide saved as a fit."""
    import numpy as np
    import torch

    from hpcbatch.predictive import technical

    if not (data_dir / "counts.npy").exists():
        technical.simulate(cells, features, 2, seed=0, out=data_dir)
    fit_dir = data_dir / "fit"
    if (fit_dir / "guide.pt").exists():
        return
    data = technical.load_data(data_dir)
    mu_mean, mu_sd = technical.prior_moments(data)
    guide = technical.setup_guide(
        technical.make_guide(mu_mean, data.n_groups), data, mu_mean, mu_sd
    )
    fit_dir.mkdir(exist_ok=True)
    torch.save(guide.state_dict(), fit_dir / "guide.pt")
    np.savez(fit_dir / "prior.npz", mu_mean=mu_mean, mu_sd=mu_sd)


def _vm_hwm(key: str = "VmHWM") -> int:
    """This process's ``key`` line of /proc/self/status (VmHWM: peak RSS; VmRSS: now)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _floor(guide, args, kwargs, data, samples: int, observations: bool, cap: int) -> dict:
    import numpy as np

    from hpcbatch.predictive.core import guide_draw

    shapes = {
        "alpha_y": (samples, data.n_groups, data.n_features),
        "mu_ntc": (samples, 1, data.n_features),
        "phi_y": (samples, 1, data.n_features),
    }
    if observations:
        shapes["y"] = (samples, data.n_cells, data.n_features)
    output_bytes = sum(int(np.prod(v)) * 4 for v in shapes.values())
    # Outputs held in memory (touched), as Predictive holds them, when they fit.
    held = output_bytes < cap // 2
    outputs = {k: np.ones(v, np.float32) for k, v in shapes.items()} if held else {}
    t0 = time.perf_counter()
    one_cell = tuple(a[:1] if a is not None else None for a in args)
    draws = guide_draw(guide, samples, one_cell, kwargs)  # the raw guide draws
    result = {"outputs_allocated": held, "guide_draw_s": time.perf_counter() - t0}
    del draws, outputs
    result["output_bytes"] = output_bytes
    result["input_bytes"] = int(data.counts.nbytes + data.group.nbytes + data.sum_factor.nbytes)
    return result


def _predictive(mode: str, guide, args, kwargs, sites, samples: int) -> dict:
    import numpy as np
    from pyro.infer import Predictive

    from hpcbatch.predictive import technical

    def draw(n: int, parallel: bool = True) -> dict:
        return Predictive(technical.technical_model, guide=guide, num_samples=n,
                          return_sites=sites, parallel=parallel)(*args, **kwargs)  # fmt: skip

    if mode == "original_loop":
        parts: dict[str, list] = {name: [] for name in sites}
        for start in range(0, samples, 50):
            out = draw(min(50, samples - start))
            for name in sites:
                parts[name].append(out[name].numpy())
            del out
        out = {name: np.concatenate(v) for name, v in parts.items()}
    else:
        out = draw(samples, parallel=mode == "predictive_parallel")
    return {"shapes": {k: list(v.shape) for k, v in out.items()}}


def _hpcbatch(contender, data_dir, guide, args, kwargs, samples, observations, cap) -> dict:
    from hpcbatch import config as hb_config
    from hpcbatch.predictive import technical
    from hpcbatch.predictive.sampling import run_sampling
    from hpcbatch.resources import Resources

    sites = list(technical.LATENT_SITES) + (["y"] if observations else [])
    cluster = {"hpcbatch": "auto", "hpcbatch_cluster": "cluster",
               "hpcbatch_spawn": "cluster"}.get(contender, "inprocess")  # fmt: skip
    start = "spawn" if contender == "hpcbatch_spawn" else "forkserver"
    out = data_dir / f"samples-{contender}.zarr" if observations else None
    run = run_sampling(
        technical.technical_model, guide=guide, num_samples=samples, model_args=args,
        model_kwargs=kwargs, return_sites=sites, data_plate=technical.DATA_PLATE,
        split_args=technical.SPLIT_ARGS, out=out, overwrite=True, cluster=cluster,
        worker_start=start,
        resources=Resources(cap, "the benchmark's cap", 2, "the benchmark"),
        settings=hb_config.load(overrides={"report-dir": str(data_dir / "reports")}),
        report_dir=str(data_dir / "reports"), progress=False,
    )  # fmt: skip
    report = run.report
    layout, chunk = run.layout, run.plan.chunk_size
    plate_rows = layout.plate_size or 1
    in_flight = chunk * layout.per_sample_bytes(in_plate=False)
    if run.block:  # one block of rows of every plate site, all samples of the chunk
        in_flight += chunk * run.block * layout.per_sample_bytes(in_plate=True)
    # inputs a worker holds: every tensor argument but the counts matrix (memory-mapped,
    # shared: a worker touches the one row latent sampling runs the likelihood on)
    tensors = [a for a in (*args, *kwargs.values()) if hasattr(a, "nbytes")]
    inputs = sum(int(a.nbytes) for a in tensors if not (a.dim() == 2 and len(a) == plate_rows))
    return dict(
        outputs_in_flight_per_worker=in_flight,
        inputs_per_worker=inputs,
        # "cluster", or where it ran in-process and why; execution_reason: the decision
        # as cluster='auto' said it (its estimate of the drawing time included)
        execution=run.execution if run.execution.startswith("in-process") else "cluster",
        execution_reason=run.execution,
        chunk_size=run.plan.chunk_size,
        n_workers=run.plan.n_workers,
        cell_block=run.block,
        predicted_peak_per_worker=report.predicted_peak_bytes,
        measured_peak_per_worker=report.measured_peak_bytes,
        measured_peak_each_worker=report.measured_peak_per_worker,
        runner_wall_s=report.wall_time_s,
        shapes={s.name: list(s.shape) for s in run.layout.sites},
    )


def _child(contender: str, data_dir: Path, samples: int, observations: bool, cap: int) -> dict:
    import pyro

    import hpcbatch.predictive.sampling  # noqa: F401  (imports before the clock, as Pyro's)
    from hpcbatch.predictive import technical

    runtime = _vm_hwm("VmRSS")  # interpreter + torch + Pyro + distributed + hpcbatch, no data yet
    if contender == "case_draw":
        return _case_draw(data_dir)
    data, guide, mu_mean, mu_sd = technical.load_fit(data_dir)
    sites = list(technical.LATENT_SITES) + (["y"] if observations else [])
    # Latent sites: the observed counts are passed (y is not drawn); a knowledgeable
    # Predictive user runs the model on one cell; hpcbatch gets every cell and its
    # data plate (it runs the model on one row itself).  Observations: counts=None.
    args, kwargs = technical.model_inputs(data, mu_mean, mu_sd, with_counts=not observations)
    pyro.set_rng_seed(0)
    t0 = time.perf_counter()
    if contender == "floor":
        result = _floor(guide, args, kwargs, data, samples, observations, cap)
    elif contender in ("predictive_parallel", "predictive_sequential", "original_loop"):
        if not observations:
            args = tuple(a[:1] for a in args)
        result = _predictive(contender, guide, args, kwargs, sites, samples)
    elif contender.startswith("hpcbatch"):
        result = _hpcbatch(contender, data_dir, guide, args, kwargs, samples, observations, cap)
    else:
        raise SystemExit(f"unknown contender {contender}")
    result["wall_s"] = time.perf_counter() - t0
    result["samples_per_s"] = samples / result["wall_s"]
    if observations and contender != "floor":
        result["values_per_s"] = samples * data.n_cells * data.n_features / result["wall_s"]
    result["child_vm_hwm_bytes"] = _vm_hwm()
    result["runtime_rss_bytes"] = runtime
    return result


def _case_draw(data_dir: Path, samples: int = 5, rows: int = 200, seconds: float = 3.0) -> dict:
    """torch's NegativeBinomial samples/s on one core at this case's own parameters
    (the model's total_count and logits for ``rows`` cells and ``samples`` draws of the
    guide): the raw draw rate of exactly the draw the job has to make."""
    import pyro
    import pyro.poutine as poutine
    import torch

    from hpcbatch.predictive import core, technical

    torch.set_num_threads(1)
    data, guide, mu_mean, mu_sd = technical.load_fit(data_dir)
    args, kwargs = technical.model_inputs(data, mu_mean, mu_sd, with_counts=False)
    args = tuple(a[:rows] if a is not None else None for a in args)
    posterior = core.guide_draw(guide, samples, args, kwargs)
    nest = 2  # the technical model's plates: cells x features
    shaped = {k: v.reshape((samples,) + (1,) * (nest - v.dim() + 1) + tuple(v.shape[1:]))
              for k, v in posterior.items()}  # fmt: skip
    vectorized = pyro.plate("samples", samples, dim=-nest - 1)(technical.technical_model)
    trace = poutine.trace(poutine.condition(vectorized, shaped)).get_trace(*args, **kwargs)
    fn = trace.nodes[technical.OBSERVED_SITE]["fn"]
    fn = getattr(fn, "base_dist", fn)
    dist = torch.distributions.NegativeBinomial(
        total_count=fn.total_count.expand(fn.logits.shape).contiguous(), logits=fn.logits,
        validate_args=False,
    )  # fmt: skip
    dist.sample()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += dist.sample().numel()
    per_core = n / (time.perf_counter() - t0)
    cores = len(os.sched_getaffinity(0))
    return {"per_core_values_per_s": per_core, "cores": cores,
            "machine_values_per_s": per_core * cores, "torch_threads": 1,
            "draw_shape": list(fn.logits.shape)}  # fmt: skip


def _raw_draw(seconds: float = 3.0) -> dict:
    """torch's NegativeBinomial samples/s on one core (one torch thread), x the cores."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = (50, 1000, 2000)  # 100 M values per draw would be too big: 50 x 1,000 x 2,000
    total_count = torch.full(shape[1:], 5.0)
    logits = torch.randn(shape[1:]) * 0.5
    dist = torch.distributions.NegativeBinomial(total_count=total_count, logits=logits)
    dist.sample((1,))  # warm up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        dist.sample((shape[0],))
        n += shape[0] * shape[1] * shape[2]
    per_core = n / (time.perf_counter() - t0)
    cores = len(os.sched_getaffinity(0))
    return {"per_core_values_per_s": per_core, "cores": cores,
            "machine_values_per_s": per_core * cores, "torch_threads": 1}  # fmt: skip


# ---------------------------------------------------------- parent side ----


def _hwm(proc) -> int:
    """A process's VmHWM (its own peak RSS so far), 0 if gone."""
    try:
        with open(f"/proc/{proc.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _pss(proc) -> int:
    """A process's proportional set size (shared pages split between their users)."""
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _sample_tree(proc, hwm: dict[int, int], with_pss: bool = True) -> tuple[int, int]:
    """Summed RSS (and PSS, ``with_pss``; else 0) of the tree now; each process's VmHWM
    recorded in ``hwm``."""
    import psutil

    total, pss = 0, 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
            pss += _pss(p) if with_pss else 0
            hwm[p.pid] = max(hwm.get(p.pid, 0), _hwm(p))
    return total, pss


def _kill_tree(proc) -> None:
    import psutil

    try:
        procs = proc.children(recursive=True) + [proc]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def _watch(cmd: list[str], cap: int, timeout_s: float) -> tuple[dict, str, str, int]:
    """Run ``cmd`` in a fresh session; the same yardstick for every contender."""
    import psutil

    t0 = time.time()
    popen = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    proc = psutil.Process(popen.pid)
    peak, peak_pss, hwm, status, n = 0, 0, {}, None, 0
    while popen.poll() is None:
        rss, pss = _sample_tree(proc, hwm, with_pss=n % PSS_EVERY == 0)
        n += 1
        peak, peak_pss = max(peak, rss), max(peak_pss, pss)
        if rss > cap:
            status = "out of memory at cap"
            _kill_tree(proc)
            break
        if time.time() - t0 > timeout_s:
            status = f"timeout after {timeout_s:.0f} s"
            _kill_tree(proc)
            break
        time.sleep(SAMPLE_S)
    stdout, stderr = popen.communicate()
    row = {"peak_rss_sampled_bytes": peak, "peak_pss_sampled_bytes": peak_pss,
           "peak_bytes": sum(hwm.values()),
           "processes": len(hwm), "elapsed_s": time.time() - t0}  # fmt: skip
    if status:
        row["status"] = status
    return row, stdout, stderr, popen.returncode


def run_contender(contender, data_dir, case, cap, timeout_s) -> dict:
    cmd = [sys.executable, __file__, "--child", contender, "--dir", str(data_dir),
           "--samples", str(case["samples"]), "--cap", str(cap)]  # fmt: skip
    if case["observations"]:
        cmd.append("--observations")
    watched, stdout, stderr, code = _watch(cmd, cap, timeout_s)
    row = {"contender": contender, **watched}
    if "status" in row:
        return row
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if code != 0 or not lines:
        tail = stderr.strip().splitlines()[-1:] or ["(no output)"]
        memory = any(k in stderr for k in ("can't allocate memory", "MemoryError", "out of memory"))
        row["status"] = "out of memory (allocation failed)" if memory else "failed"
        row["error"] = tail[0][:300]
        return row
    row["status"] = "ok"
    row.update(json.loads(lines[-1][len("RESULT ") :]))
    # The in-process run's own VmHWM is exact: never below the sampled figure.
    row["peak_bytes"] = max(row["peak_bytes"], row.get("child_vm_hwm_bytes", 0))
    return row


def _rounds(name: str, contenders: list[str], data_dir, case, cap, opts) -> list[dict]:
    """Each contender ``opts.short_rounds`` times, each time in a fresh process, the order
    rotated every round: one cold call of a fraction of a second varies by +-20 % from
    run to run.  Each contender's row is its median round (by the timed call's wall
    time), with every round's wall time and peak."""
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for r in range(max(1, opts.short_rounds)):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for contender in order:
            row = run_contender(contender, data_dir, case, cap, opts.timeout_s)
            print(json.dumps({"case": name, "round": r, **row}), file=sys.stderr, flush=True)
            runs[contender].append(row)
    rows = []
    for contender in contenders:
        done = sorted((x for x in runs[contender] if x.get("status") == "ok"),
                      key=lambda x: x["wall_s"])  # fmt: skip
        row = dict(done[len(done) // 2]) if done else runs[contender][-1]
        row["rounds_wall_s"] = [x.get("wall_s") for x in runs[contender]]
        row["rounds_peak_bytes"] = [x.get("peak_bytes") for x in runs[contender]]
        rows.append(row)
    return rows


def measure_raw_draw(cap: int) -> dict | None:
    """torch's raw NegativeBinomial rate, measured in a fresh process (``--child raw_draw``)."""
    _watched, stdout, _, _ = _watch([sys.executable, __file__, "--child", "raw_draw"], cap, 120)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else None


def _observation_rows(name: str, contenders: list[str], data_dir, case, cap, opts):
    """Each contender once (a case with observations runs for minutes), and the raw draw
    rate right before and after the default call: the machine's speed drifts by 10-20 %
    over minutes, and that rate is the call's yardstick.  (rows, the adjacent rates)"""
    rows, adjacent = [], []
    for contender in contenders:
        default = next((r for r in rows if r["contender"] == "hpcbatch"), {})
        if contender == "hpcbatch_cluster" and default.get("execution") == "cluster":
            rows.append({"contender": contender, "status": "skipped: = hpcbatch"})
            continue
        paired = contender == "hpcbatch"
        if paired:
            adjacent.append(measure_raw_draw(cap))
        row = run_contender(contender, data_dir, case, cap, opts.timeout_s)
        if paired:
            adjacent.append(measure_raw_draw(cap))
        print(json.dumps({"case": name, **row}), file=sys.stderr, flush=True)
        rows.append(row)
    return rows, adjacent


def _machine() -> dict:
    import psutil
    import pyro
    import torch

    import hpcbatch

    return {"host": platform.node(), "cpus": os.cpu_count(),
            "cores": len(os.sched_getaffinity(0)), "memory_bytes": psutil.virtual_memory().total,
            "python": platform.python_version(), "torch": torch.__version__,
            "pyro": pyro.__version__, "hpcbatch": getattr(hpcbatch, "__version__", "dev")}  # fmt: skip


def _per_worker(row: dict, floor: dict) -> dict:
    """A worker's peak against what it must hold: the runtime (the floor process's RSS
    after importing torch, Pyro and distributed), its inputs and one chunk's outputs in
    flight (issue 15 item 3's floor per worker)."""
    need = floor["runtime_rss_bytes"] + row["inputs_per_worker"]
    need += row["outputs_in_flight_per_worker"]
    peak = max(row["measured_peak_each_worker"].values())
    return {"worker_floor_bytes": need, "worker_peak_bytes": peak,
            "worker_peak_vs_worker_floor": peak / need}  # fmt: skip


def _ratios(rows: list[dict], raw: dict | None, observations: bool,
            case_draw: dict | None = None, adjacent: list[dict] | None = None) -> dict:  # fmt: skip
    """Each hpcbatch contender against Predictive(parallel=True), the floor (the whole
    tree, and per worker) and the raw draw rates (generic, and at the case's parameters);
    ``adjacent``: the raw rate measured right before and after the default call (their
    mean is its ``vs_raw_draw_rate_adjacent``)."""
    adjacent_rate = (
        sum(a["machine_values_per_s"] for a in adjacent) / len(adjacent) if adjacent else None
    )
    by = {r["contender"]: r for r in rows if r.get("status") == "ok"}
    ratios = {}
    peer, floor = by.get("predictive_parallel"), by.get("floor")
    for name, row in by.items():
        if not name.startswith("hpcbatch"):
            continue
        entry = {}
        if peer:
            entry["speed_vs_predictive_parallel"] = row["samples_per_s"] / peer["samples_per_s"]
            entry["peak_vs_predictive_parallel"] = row["peak_bytes"] / peer["peak_bytes"]
        if floor:  # the floor: runtime + inputs + outputs (held when they fit)
            entry["peak_vs_floor"] = row["peak_bytes"] / floor["peak_bytes"]
            entry["pss_vs_floor"] = row["peak_pss_sampled_bytes"] / floor["peak_pss_sampled_bytes"]
        if observations and raw:
            entry["vs_raw_draw_rate"] = row["values_per_s"] / raw["machine_values_per_s"]
        if observations and adjacent_rate and name == "hpcbatch":
            entry["vs_raw_draw_rate_adjacent"] = row["values_per_s"] / adjacent_rate
        if observations and case_draw:
            entry["vs_case_draw_rate"] = row["values_per_s"] / case_draw["machine_values_per_s"]
        if floor and row.get("execution") == "cluster":
            entry.update(_per_worker(row, floor))
        ratios[name] = entry
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", default=None)
    parser.add_argument("--dir", default="/tmp/hpcbatch-bench-predictive")
    parser.add_argument("--samples", type=int, default=0, help="Replace S in every chosen case.")
    parser.add_argument("--observations", action="store_true")
    parser.add_argument("--cap", type=int, default=0)
    parser.add_argument("--cap-gb", type=float, default=8.0)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES))
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--json-out", default=None, help="Also write the JSON to this file.")
    parser.add_argument("--short-rounds", type=int, default=5,
                        help="Rounds of each contender in the cases without observations "
                             "(a fraction of a second each): the median round is shown.")  # fmt: skip
    opts = parser.parse_args()
    if opts.child == "raw_draw":
        print("RESULT " + json.dumps(_raw_draw()), flush=True)
        return
    if opts.child:
        result = _child(opts.child, Path(opts.dir), opts.samples, opts.observations, opts.cap)
        print("RESULT " + json.dumps(result), flush=True)
        return
    cap = int(opts.cap_gb * 1e9)
    out = {"benchmark": "predictive", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": " ".join(sys.argv), "machine": _machine(), "cap_bytes": cap,
           "sample_interval_s": SAMPLE_S, "load_avg_start": os.getloadavg(), "cases": {}}  # fmt: skip
    raw = None
    if any(CASES[name]["observations"] for name in opts.cases.split(",")):
        raw = out["raw_draw"] = measure_raw_draw(cap)
        print(json.dumps({"raw_draw": raw}), file=sys.stderr, flush=True)
    for name in opts.cases.split(","):
        case = dict(CASES[name])
        if opts.samples:
            case["samples"] = opts.samples
        data_dir = Path(opts.dir) / f"n{case['cells']}_t{case['features']}"
        t0, load0 = time.time(), os.getloadavg()
        _prepare(data_dir, case["cells"], case["features"])
        contenders = opts.contenders.split(",")
        if case["observations"]:
            rows, adjacent = _observation_rows(name, contenders, data_dir, case, cap, opts)
            case_draw = run_contender("case_draw", data_dir, case, cap, opts.timeout_s)
        else:
            rows, adjacent = _rounds(name, contenders, data_dir, case, cap, opts), []
            case_draw = None
        adjacent = [a for a in adjacent if a]
        out["cases"][name] = {**case, "prepare_s": time.time() - t0, "load_avg_start": load0,
                              "load_avg_end": os.getloadavg(), "contenders": rows,
                              "case_draw": case_draw, "raw_draw_adjacent": adjacent or None,
                              "ratios": _ratios(rows, raw, case["observations"],
                                                case_draw if (case_draw or {}).get("status") == "ok"
                                                else None, adjacent)}  # fmt: skip
    out["load_avg_end"] = os.getloadavg()
    text = json.dumps(out, indent=2)
    if opts.json_out:
        Path(opts.json_out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
