"""Benchmark: is the planner honest?  Predicted vs measured per-worker peak (JSON out).

For both workloads at three sizes, and for a user's model through
``hpcbatch.predictive.sample``, every case runs twice on a fresh 2-worker local Dask
cluster planned for ``--mem`` / ``--cpus``:

- ``analytic``: planned with the workload's analytic footprint (its reasons say where
  each constant came from);
- ``calibrated``: planned after ``--calibrate`` (the workload's probe at size 0 and two
  sizes, in child processes started as the run's workers are: forked from the same
  forkserver, which preloaded the workload's modules; the fitted fixed bytes get
  ``hpcbatch.calibrate.WORKER_MARGIN`` for the Dask worker around the work;
  ``hpcbatch run stocks ... --calibrate`` and ``hpcbatch predictive sample ...
  --calibrate`` do the same).  A user's model has no probe: only its analytic footprint
  (sized from its returned sites) is checked.
- stocks also ``analytic, spawned workers``: the same job on a cluster whose workers are
  spawned, fresh processes as SLURM's and an existing cluster's are (a LocalCluster with
  multiprocessing ``spawn``, as many workers, threads and memory as the local analytic
  plan, given as ``client=``): planned for the workers there with the analytic footprint
  in spawned-worker terms, without the forkserver's saving
  (``hpcbatch.workload.PreloadSaving``) that the local rows' plans take off.

For each run the JSON has the plan's predicted per-worker peak, the highest per-worker
peak the runner measured (each worker's RSS sampled every 0.1 s by its nanny) and
``measured / predicted``.  The goal (issue 15 item 6): within 20 % on the safe side,
i.e. 0.8 <= measured / predicted <= 1.0 (``ok``).

Cases (small enough for ~10 minutes on a quiet 2-core machine):

- stocks: 200, 500 and 1,000 stocks x 300 days (SQLite), small model, 10 prediction days;
- predictive (built-in model): latent sites N=2,000 x T=2,000, S=400; with
  observations N=1,000 x T=2,000, S=40 and N=2,000 x T=4,000, S=10;
- user model: a regression with a data plate of 20,000 rows, S=200, observations drawn.

Usage: ``python benchmarks/calibration.py [--mem-gb 4] [--cpus 2] [--workloads
stocks,predictive,user] [--json-out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
STOCK_SIZES = (200, 500, 1000)
STOCK_DAYS = 300
PREDICTIVE_CASES = (
    dict(cells=2000, features=2000, samples=400, observations=False),
    dict(cells=1000, features=2000, samples=40, observations=True),
    dict(cells=2000, features=4000, samples=10, observations=True),
)
USER_ROWS, USER_FEATURES, USER_SAMPLES = 20000, 8, 200


def _row(kind: str, report, wall_s: float, plan_source: str) -> dict:
    plan = report.plan or {}
    predicted = plan.get("predicted_peak_bytes") or report.predicted_peak_bytes
    measured = report.measured_peak_bytes
    ratio = measured / predicted if measured and predicted else None
    return {
        "plan": kind, "status": report.status, "wall_s": round(wall_s, 2),
        "n_workers": plan.get("n_workers"), "chunk_size": plan.get("chunk_size"),
        "predicted_peak_per_worker_bytes": predicted,
        "measured_peak_per_worker_bytes": measured,
        "measured_each_worker_bytes": report.measured_peak_per_worker,
        "measured_over_predicted": round(ratio, 3) if ratio else None,
        "ok": ratio is not None and 0.8 <= ratio <= 1.0,
        "footprint_source": plan_source,
    }  # fmt: skip


def _settings(work: Path) -> dict:
    from hpcbatch import config as hb_config

    settings = hb_config.load(overrides={"report-dir": None})
    settings["cluster"]["dashboard-address"] = "127.0.0.1:0"
    return settings


def _resources(mem_gb: float, cpus: int):
    from hpcbatch.resources import Resources

    memory = int(mem_gb * 1024**3)
    return Resources(memory, "the benchmark's --mem-gb", cpus, "the benchmark's --cpus")


def stocks_cases(work: Path, mem: float, cpus: int) -> list[dict]:
    sys.path.insert(0, str(HERE))
    import stocks as bench_stocks

    from hpcbatch.stocks.predict import PredictOptions, predict

    rows = []
    for n in STOCK_SIZES:
        url, model_dir = bench_stocks.prepare(work / "stocks", n, STOCK_DAYS, "small", 0)
        opts = PredictOptions(lookback_days=STOCK_DAYS, predict_days=10, use_gpu="false")
        local_plan: dict = {}
        for kind in ("analytic", "calibrated", SPAWNED):
            bench_stocks.clear_predictions(url)
            kw = dict(settings=_settings(work), options=opts, progress=False, quiet=True,
                      run_id=f"calibration-{n}-{kind.replace(', ', '-').replace(' ', '-')}-{time.time():.0f}")  # fmt: skip
            t0 = time.perf_counter()
            if kind == SPAWNED:
                with _spawned_client(local_plan) as client:
                    report = predict(url, model_dir, client=client, calibrate=False, **kw)
            else:
                report = predict(url, model_dir, resources=_resources(mem, cpus),
                                 backend="local", calibrate=kind == "calibrated", **kw)  # fmt: skip
            local_plan = local_plan or (report.plan or {})
            source = next((r for r in (report.plan or {}).get("reasons", [])
                           if "footprint" in r), "")  # fmt: skip
            rows.append({"workload": "stocks", "size": {"stocks": n, "days": STOCK_DAYS},
                         **_row(kind, report, time.perf_counter() - t0, source)})  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


SPAWNED = "analytic, spawned workers"


@contextmanager
def _spawned_client(plan: dict):
    """A client of spawned workers (as SLURM's and an existing cluster's are), as many
    and as large as the local analytic ``plan``'s."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}), \
            LocalCluster(n_workers=plan.get("n_workers") or 2, processes=True,
                         threads_per_worker=plan.get("threads_per_worker") or 1,
                         memory_limit=plan.get("memory_limit_bytes") or "2GiB",
                         dashboard_address=None) as cluster, Client(cluster) as client:  # fmt: skip
        yield client


def predictive_cases(work: Path, mem: float, cpus: int) -> list[dict]:
    sys.path.insert(0, str(HERE))
    import predictive as bench_predictive

    from hpcbatch.predictive.sampling import Calibrate, Execution, SampleOptions, sample_technical

    rows = []
    for case in PREDICTIVE_CASES:
        data_dir = work / "predictive" / f"n{case['cells']}_t{case['features']}"
        bench_predictive._prepare(data_dir, case["cells"], case["features"])
        for kind in ("analytic", "calibrated"):
            execution = Execution(resources=_resources(mem, cpus), settings=_settings(work),
                                  progress=False, cluster="cluster")  # fmt: skip
            options = SampleOptions(out=work / "predictive" / "samples.zarr", overwrite=True)
            t0 = time.perf_counter()
            run = sample_technical(data_dir, samples=case["samples"],
                                   with_observations=case["observations"], options=options,
                                   execution=execution,
                                   calibrate=Calibrate(kind == "calibrated"))  # fmt: skip
            rows.append({"workload": "predictive", "size": case,
                         **_row(kind, run.report, time.perf_counter() - t0,
                                run.plan.footprint.source)})  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _user_model(x, y=None):
    import pyro
    import pyro.distributions as dist

    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    mean = (x * w.unsqueeze(-2)).sum(-1)
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("y", dist.Normal(mean, sigma), obs=y)


def user_cases(work: Path, mem: float, cpus: int) -> list[dict]:
    import pyro
    import torch
    from pyro.infer.autoguide import AutoNormal

    from hpcbatch.predictive.sampling import run_sampling

    torch.manual_seed(0)
    x = torch.randn(USER_ROWS, USER_FEATURES)
    y = x @ torch.randn(USER_FEATURES) + 0.5 * torch.randn(USER_ROWS)
    pyro.clear_param_store()
    guide = AutoNormal(_user_model)
    guide(x, y)  # built with y observed (unfitted: draw cost does not depend on values)
    t0 = time.perf_counter()
    run = run_sampling(_user_model, guide=guide, num_samples=USER_SAMPLES, model_args=(x,),
                       return_sites=["w", "sigma", "y"], data_plate="data", split_args=(0,),
                       out=work / "user.zarr", overwrite=True, cluster="cluster",
                       resources=_resources(mem, cpus), settings=_settings(work),
                       progress=False)  # fmt: skip
    size = {"rows": USER_ROWS, "features": USER_FEATURES, "samples": USER_SAMPLES}
    row = {"workload": "user model (sample())", "size": size,
           **_row("analytic", run.report, time.perf_counter() - t0, run.plan.footprint.source),
           "calibrated": "n/a: a caller's model has no probe"}  # fmt: skip
    print(json.dumps(row), file=sys.stderr, flush=True)
    return [row]


def _shrink() -> None:
    global STOCK_SIZES, STOCK_DAYS, PREDICTIVE_CASES, USER_ROWS, USER_SAMPLES
    STOCK_SIZES, STOCK_DAYS = (20, 40, 60), 150
    PREDICTIVE_CASES = (dict(cells=100, features=200, samples=40, observations=False),
                        dict(cells=100, features=200, samples=8, observations=True),
                        dict(cells=200, features=200, samples=8, observations=True))
    USER_ROWS, USER_SAMPLES = 2000, 20


def _machine() -> dict:
    import distributed
    import psutil
    import pyro
    import torch

    return {"host": platform.node(), "cores": len(os.sched_getaffinity(0)),
            "memory_bytes": psutil.virtual_memory().total, "python": platform.python_version(),
            "torch": torch.__version__, "pyro": pyro.__version__,
            "distributed": distributed.__version__}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mem-gb", type=float, default=4.0, help="Plan for this many GiB.")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--workloads", default="stocks,predictive,user")
    parser.add_argument("--dir", default="/tmp/hpcbatch-bench-calibration")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke test only.")
    opts = parser.parse_args()
    if opts.quick:
        _shrink()
    work = Path(opts.dir)
    work.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "calibration", "command": " ".join(sys.argv),
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": _machine(), "mem_gb": opts.mem_gb, "cpus": opts.cpus, "quick": opts.quick,
           "goal": "0.8 <= measured / predicted <= 1.0", "load_avg_start": os.getloadavg()}  # fmt: skip
    runs = {"stocks": stocks_cases, "predictive": predictive_cases, "user": user_cases}
    rows: list[dict] = []
    t0 = time.time()
    for name in opts.workloads.split(","):
        rows += runs[name](work, opts.mem_gb, opts.cpus)
    out.update(rows=rows, all_ok=all(r["ok"] for r in rows), total_wall_s=time.time() - t0,
               load_avg_end=os.getloadavg())  # fmt: skip
    text = json.dumps(out, indent=2, default=str)
    if opts.json_out:
        Path(opts.json_out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
