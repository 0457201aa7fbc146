"""Stocks on a GPU vs the CPU on the same model (issue 15 item 7; prints JSON).

One prepared check for a machine with a CUDA device (never part of CI):

1. generate ``--stocks`` synthetic stocks x ``--days`` trading days into SQLite,
2. train one model (``--model-size``, one short epoch: the weights only have to be the same
   for both runs, not good),
3. copy the database three times and run ``hpcbatch stocks predict`` on each copy, each in
   its own process with its own local cluster:
   - ``cpu``: ``--use-gpu false``,
   - ``gpu``: ``--use-gpu true`` (the GPU batch is chosen from the device's free memory),
   - ``gpu-oom``: ``--use-gpu true`` with every worker's CUDA allocator capped at
     ``--oom-fraction`` of the card (``torch.cuda.set_per_process_memory_fraction`` in a
     Dask worker preload) while the batch is still sized from the card's free memory, so
     inference runs out of GPU memory and must halve its batch until it fits,
4. compares the three prediction tables row by row (same keys; largest absolute difference
   of every float column, which must stay under ``--tolerance``) and reports windows/s of
   each run, the GPU batch the plan chose, its reason, and how many halvings happened.

Without a GPU (``--allow-cpu``, for testing the script itself) the GPU runs fall back to
``--use-gpu auto`` and the JSON says ``"cuda": false``.

    python benchmarks/gpu.py --stocks 3000 --out benchmarks/results-gpu.json
    bash benchmarks/gpu.sh          # the same on the lent GPU machine (installs wheels first)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOAT_COLUMNS = ("predicted_return", "confidence", "predicted_return_3d")
KEY = "ts_code, trade_date, model_version"


def hpcbatch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hpcbatch.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return done


def last_json(text: str) -> dict:
    start = text.find("{")
    return json.loads(text[start:]) if start >= 0 else {}


def predict(name: str, db: Path, model: Path, work: Path, use_gpu: str, env: dict) -> dict:
    t0 = time.perf_counter()
    done = hpcbatch(
        "stocks", "predict", "--db", f"sqlite:///{db}", "--model", str(model),
        "--use-gpu", use_gpu, "--json", "--run-id", name,
        "--report-dir", str(work / "reports"), env=env,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    report = last_json(done.stdout)
    meta = report.get("results_meta") or {}
    plan = report.get("plan") or {}
    windows = int(meta.get("windows", 0))
    return {
        "run": name,
        "use_gpu": use_gpu,
        "status": report.get("status"),
        "windows": windows,
        "run_wall_s": round(float(report.get("wall_time_s", 0.0)), 3),
        "process_wall_s": round(wall, 3),
        "windows_per_s": round(windows / report["wall_time_s"], 1) if report.get("wall_time_s") else None,
        "gpu_batch_planned": plan.get("gpu_batch_size"),
        "gpu_reasons": [r for r in plan.get("reasons", []) if "GPU" in str(r)],
        "inference_halvings": meta.get("inference_halvings"),
        "device": meta.get("device"),
    }


def compare(a: Path, b: Path) -> dict:
    con = sqlite3.connect(a)
    con.execute("ATTACH DATABASE ? AS other", (str(b),))
    n_a = con.execute("SELECT count(*) FROM stock_predictions").fetchone()[0]
    n_b = con.execute("SELECT count(*) FROM other.stock_predictions").fetchone()[0]
    joined = " JOIN other.stock_predictions o USING (ts_code, trade_date, model_version)"
    n_both = con.execute("SELECT count(*) FROM stock_predictions" + joined).fetchone()[0]
    diffs = {
        col: con.execute(
            f"SELECT max(abs(stock_predictions.{col} - o.{col})) FROM stock_predictions" + joined
        ).fetchone()[0]
        for col in FLOAT_COLUMNS
    }
    con.close()
    return {"rows": n_a, "rows_other": n_b, "rows_matched": n_both, "max_abs_diff": diffs}


def preload_capping(work: Path, fraction: float) -> Path:
    path = work / "cap_gpu_memory.py"
    path.write_text(
        "import torch\n"
        "if torch.cuda.is_available():\n"
        f"    torch.cuda.set_per_process_memory_fraction({fraction})\n"
    )
    return path


def machine() -> dict:
    info = {"host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_start": list(os.getloadavg())}  # fmt: skip
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            free, total = torch.cuda.mem_get_info()
            info.update(gpu=torch.cuda.get_device_name(0), gpu_free=free, gpu_total=total)
    except ImportError:
        info["cuda"] = False
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stocks", type=int, default=3000)
    ap.add_argument("--days", type=int, default=400)
    ap.add_argument("--model-size", default="small", choices=["tiny", "small", "full"])
    ap.add_argument("--oom-fraction", type=float, default=0.002)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--allow-cpu", action="store_true", help="Test the script without a GPU.")
    ap.add_argument("--work", default=None, help="Working directory (default: a temp dir).")
    ap.add_argument("--out", default=None, help="Also write the JSON here.")
    args = ap.parse_args()

    info = machine()
    if not info["cuda"] and not args.allow_cpu:
        raise SystemExit("no CUDA device visible (torch.cuda.is_available() is False): "
                         "run this on a GPU machine, or pass --allow-cpu to test the script")  # fmt: skip
    gpu_flag = "true" if info["cuda"] else "auto"
    work = Path(args.work or tempfile.mkdtemp(prefix="hpcbatch-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    base, model = work / "bars.db", work / "model"
    t0 = time.perf_counter()
    hpcbatch("stocks", "generate", "--db", f"sqlite:///{base}", "--stocks", str(args.stocks),
             "--days", str(args.days), "--replace")  # fmt: skip
    hpcbatch("stocks", "train", "--db", f"sqlite:///{base}", "--out", str(model), "--epochs", "1",
             "--max-stocks", "100", "--max-windows", "2000", "--model-size", args.model_size)  # fmt: skip
    setup_s = time.perf_counter() - t0

    env = dict(os.environ)
    oom_env = dict(env, DASK_DISTRIBUTED__WORKER__PRELOAD=json.dumps(
        [str(preload_capping(work, args.oom_fraction))]))  # fmt: skip
    runs, dbs = [], {}
    for name, flag, run_env in (("cpu", "false", env), ("gpu", gpu_flag, env),
                                ("gpu-oom", gpu_flag, oom_env)):  # fmt: skip
        dbs[name] = work / f"{name}.db"
        shutil.copyfile(base, dbs[name])
        runs.append(predict(name, dbs[name], model, work, flag, run_env))
    same = {name: compare(dbs["cpu"], dbs[name]) for name in ("gpu", "gpu-oom")}
    worst = max((d or 0.0) for c in same.values() for d in c["max_abs_diff"].values())
    result = {
        "benchmark": "stocks-gpu",
        "machine": dict(info, load_end=list(os.getloadavg())),
        "stocks": args.stocks, "days": args.days, "model_size": args.model_size,
        "setup_s": round(setup_s, 1),
        "runs": runs,
        "same_predictions": same,
        "max_abs_diff": worst,
        "within_tolerance": worst <= args.tolerance,
        "gpu_speedup": (round(runs[1]["windows_per_s"] / runs[0]["windows_per_s"], 2)
                        if runs[0]["windows_per_s"] and runs[1]["windows_per_s"] else None),
    }  # fmt: skip
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not result["within_tolerance"]:
        raise SystemExit(f"GPU and CPU predictions differ by {worst:g} > {args.tolerance:g}")


if __name__ == "__main__":
    main()
