"""Benchmark: posterior predictive sampling of the built-in technical model; prints JSON.

Cases (REFERENCE.md section 2): latent sites only (alpha_y, mu_ntc, phi_y) at
N=5,000 x T=4,000 and N=20,000 x T=30,000 with S=1,000; with observations at
N=5,000 x T=4,000 with S=200; and two small cases (N=100 and N=300, T=4,000) where
``Predictive(parallel=True)`` fits under the cap, for the speed comparison.  Contenders, each in a fresh process whose whole process
tree is watched from outside (RSS summed every 0.1 s, killed above the cap):

- ``predictive_parallel``: ``Predictive(parallel=True)`` in one call;
- ``predictive_sequential``: ``Predictive(parallel=False)``;
- ``original_loop``: the original's loop, ``Predictive(parallel=True)`` over batches of 50;
- ``hpcbatch``: ``hpcbatch.predictive.sample`` on a local Dask cluster planned for the
  cap, writing zarr (client + scheduler + nannies + workers all counted);
- ``hpcbatch_sync``: the same, chunks in one process (``client="sync"``);
- ``floor``: the interpreter with torch and Pyro imported, the inputs, the outputs
  allocated, and the raw guide draws (their time is the floor for samples/s).

As in the original, the Predictive contenders get the observed counts as a model
argument for latent-only sampling (``return_sites`` only filters what is returned)
and ``counts=None`` when observations are drawn.  The posterior is an AutoNormal
guide initialised from the data's moments (no fit: fitting 20,000 x 30,000 takes far
longer than the benchmark, and draw cost does not depend on the fitted values).

Usage: ``python benchmarks/predictive.py [--cap-gb 8] [--cases a,b,c] [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "latent_5k_4k": dict(cells=5000, features=4000, samples=1000, observations=False),
    "latent_20k_30k": dict(cells=20000, features=30000, samples=1000, observations=False),
    "obs_5k_4k": dict(cells=5000, features=4000, samples=200, observations=True),
    # Small enough for Predictive(parallel=True) to fit under an 8 GB cap: the speed
    # comparison "wherever that one fits".
    "latent_100_4k": dict(cells=100, features=4000, samples=1000, observations=False),
    "obs_300_4k": dict(cells=300, features=4000, samples=200, observations=True),
}
CONTENDERS = (
    "floor",
    "hpcbatch",
    "hpcbatch_sync",
    "predictive_parallel",
    "original_loop",
    "predictive_sequential",
)


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


def _child(contender: str, data_dir: Path, samples: int, observations: bool, cap: int) -> dict:
    import numpy as np
    import pyro
    from pyro.infer import Predictive

    from hpcbatch.predictive import technical

    data, guide, mu_mean, mu_sd = technical.load_fit(data_dir)
    sites = list(technical.LATENT_SITES) + (["y"] if observations else [])
    args, kwargs = technical.model_inputs(data, mu_mean, mu_sd, with_counts=not observations)
    pyro.set_rng_seed(0)
    t0 = time.perf_counter()
    result: dict = {}
    if contender == "floor":
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
        result["outputs_allocated"] = held
        t0 = time.perf_counter()
        from hpcbatch.predictive.core import guide_draw

        one_cell = tuple(a[:1] if a is not None else None for a in args)
        draws = guide_draw(guide, samples, one_cell, kwargs)  # the raw guide draws
        result["guide_draw_s"] = time.perf_counter() - t0
        del draws
        result["output_bytes"] = output_bytes
        del outputs
        result["input_bytes"] = int(data.counts.nbytes + data.group.nbytes + data.sum_factor.nbytes)
    elif contender == "predictive_parallel":
        out = Predictive(
            technical.technical_model,
            guide=guide,
            num_samples=samples,
            return_sites=sites,
            parallel=True,
        )(*args, **kwargs)
        result["shapes"] = {k: list(v.shape) for k, v in out.items()}
    elif contender == "predictive_sequential":
        out = Predictive(
            technical.technical_model,
            guide=guide,
            num_samples=samples,
            return_sites=sites,
            parallel=False,
        )(*args, **kwargs)
        result["shapes"] = {k: list(v.shape) for k, v in out.items()}
    elif contender == "original_loop":
        parts: dict[str, list] = {name: [] for name in sites}
        for start in range(0, samples, 50):
            n = min(50, samples - start)
            out = Predictive(
                technical.technical_model,
                guide=guide,
                num_samples=n,
                return_sites=sites,
                parallel=True,
            )(*args, **kwargs)
            for name in sites:
                parts[name].append(out[name].numpy())
            del out
        merged = {name: np.concatenate(v) for name, v in parts.items()}
        result["shapes"] = {k: list(v.shape) for k, v in merged.items()}
    elif contender in ("hpcbatch", "hpcbatch_sync"):
        from hpcbatch import config as hb_config
        from hpcbatch.predictive.cli import sample_data_dir

        settings = hb_config.load(overrides={"report-dir": str(data_dir / "reports")})
        run = sample_data_dir(
            data_dir,
            samples=samples,
            with_observations=observations,
            chunk_size="auto",
            cell_block="auto",
            settings=settings,
            out=data_dir / f"samples-{contender}.zarr",
            overwrite=True,
            sync=contender == "hpcbatch_sync",
            mem=str(cap),
            cpus=2,
            progress=False,
        )
        report = run.report
        result.update(
            chunk_size=run.plan.chunk_size,
            n_workers=run.plan.n_workers,
            cell_block=run.block,
            predicted_peak_per_worker=report.predicted_peak_bytes,
            measured_peak_per_worker=report.measured_peak_bytes,
            runner_wall_s=report.wall_time_s,
            shapes={s.name: list(s.shape) for s in run.layout.sites},
        )
    else:
        raise SystemExit(f"unknown contender {contender}")
    result["wall_s"] = time.perf_counter() - t0
    result["samples_per_s"] = samples / result["wall_s"]
    return result


# ---------------------------------------------------------- parent side ----


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def _kill_tree(proc) -> None:
    import psutil

    try:
        procs = proc.children(recursive=True) + [proc]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def run_contender(contender, data_dir, case, cap, timeout_s) -> dict:
    import psutil

    cmd = [
        sys.executable,
        __file__,
        "--child",
        contender,
        "--dir",
        str(data_dir),
        "--samples",
        str(case["samples"]),
        "--cap",
        str(cap),
    ]
    if case["observations"]:
        cmd.append("--observations")
    t0 = time.time()
    popen = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    proc = psutil.Process(popen.pid)
    peak, status = 0, None
    while popen.poll() is None:
        rss = _tree_rss(proc)
        peak = max(peak, rss)
        if rss > cap:
            status = "out of memory at cap"
            _kill_tree(proc)
            break
        if time.time() - t0 > timeout_s:
            status = f"timeout after {timeout_s:.0f} s"
            _kill_tree(proc)
            break
        time.sleep(0.1)
    stdout, stderr = popen.communicate()
    row = {"contender": contender, "peak_rss_bytes": peak, "elapsed_s": time.time() - t0}
    if status:
        row["status"] = status
        return row
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if popen.returncode != 0 or not lines:
        tail = stderr.strip().splitlines()[-1:] or ["(no output)"]
        memory = any(k in stderr for k in ("can't allocate memory", "MemoryError", "out of memory"))
        row["status"] = "out of memory (allocation failed)" if memory else "failed"
        row["error"] = tail[0][:300]
        return row
    row["status"] = "ok"
    row.update(json.loads(lines[-1][len("RESULT ") :]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", default=None)
    parser.add_argument("--dir", default="/tmp/hpcbatch-bench-predictive")
    parser.add_argument("--samples", type=int, default=0)
    parser.add_argument("--observations", action="store_true")
    parser.add_argument("--cap", type=int, default=0)
    parser.add_argument("--cap-gb", type=float, default=8.0)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--timeout-s", type=float, default=1200)
    parser.add_argument(
        "--override-samples", type=int, default=None, help="Replace S in every chosen case."
    )
    opts = parser.parse_args()
    if opts.child:
        result = _child(opts.child, Path(opts.dir), opts.samples, opts.observations, opts.cap)
        print("RESULT " + json.dumps(result), flush=True)
        return
    cap = int(opts.cap_gb * 1e9)
    out = {"cap_bytes": cap, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "cases": {}}
    for name in opts.cases.split(","):
        case = dict(CASES[name])
        if opts.override_samples:
            case["samples"] = opts.override_samples
        data_dir = Path(opts.dir) / f"n{case['cells']}_t{case['features']}"
        t0 = time.time()
        _prepare(data_dir, case["cells"], case["features"])
        rows = []
        for contender in opts.contenders.split(","):
            row = run_contender(contender, data_dir, case, cap, opts.timeout_s)
            print(json.dumps({"case": name, **row}), file=sys.stderr, flush=True)
            rows.append(row)
        out["cases"][name] = {**case, "prepare_s": time.time() - t0, "contenders": rows}
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
