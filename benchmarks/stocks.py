"""Stock batch prediction: the naive way vs hpcbatch vs the model-only floor (prints JSON).

For each size (stocks x days in SQLite, --predict-days windows per stock) the script
generates the market once, saves a model of the chosen size (random weights, real
normalisation statistics: throughput and memory do not depend on the weights), then runs
every contender in a fresh Python process:

- ``naive``: one process reads all rows in one query, builds all features and all
  windows into one array, predicts them and upserts the predictions.
- ``hpcbatch``: ``hpcbatch.stocks.predict`` on a LocalCluster shaped by the plan.
- ``floor``: the same windows already in memory (built before the clock starts), through
  the model in one process: the most a pipeline could reach on this machine.

Memory is measured, never estimated: each process's peak RSS (VmHWM) and, for hpcbatch,
every worker process sampled every 0.1 s (per-process peaks and the peak of the sum over
the driver, nannies and workers).  Throughput is windows per second of wall time.

    python benchmarks/stocks.py --sizes 500,2000,5000 --days 400 --predict-days 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

MB = 1024**2


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class TreeSampler:
    """Samples RSS of this process and all its descendants every ``interval`` seconds."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peaks: dict[int, dict] = {}
        self.total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                    name = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                total += rss
                entry = self.peaks.setdefault(p.pid, {"peak": 0, "cmd": name[-200:]})
                entry["peak"] = max(entry["peak"], rss)
            self.total_peak = max(self.total_peak, total)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------ contenders ----


def _model_loaded(model_dir: str):
    from hpcbatch.stocks.model import load_model

    return load_model(model_dir)


def run_naive(db: str, model_dir: str, lookback: int, predict_days: int) -> dict:
    from hpcbatch.stocks.features import compute_features, min_rows
    from hpcbatch.stocks.model import predict_windows
    from hpcbatch.stocks.predict import prediction_rows
    from hpcbatch.stocks.schema import init_db, make_engine
    from hpcbatch.stocks.sink import bars_from_rows, bars_query, list_codes, upsert_predictions
    from hpcbatch.stocks.windows import prediction_windows

    t0 = time.perf_counter()
    engine = make_engine(db)
    init_db(engine)
    loaded = _model_loaded(model_dir)
    codes = list_codes(engine)
    with engine.connect() as conn:
        rows = conn.execute(bars_query(codes, lookback)).all()  # everything at once
    bars = bars_from_rows(rows)
    keep = np.flatnonzero(bars.n_rows >= min_rows(predict_days))
    features = compute_features(bars)[keep]
    windows = np.ascontiguousarray(prediction_windows(features, predict_days))  # one big array
    returns, conf, _ = predict_windows(loaded, windows, 256)
    dates = bars.dates[keep][:, -predict_days:]
    out = prediction_rows([bars.codes[i] for i in keep], dates, returns, conf, "naive", None)
    with engine.begin() as conn:
        upsert_predictions(conn, out)
    wall = time.perf_counter() - t0
    return {
        "windows": len(out),
        "wall_s": round(wall, 2),
        "windows_per_s": round(len(out) / wall, 1),
        "peak_rss_bytes": vm_hwm(),
        "array_bytes": {"features": int(features.nbytes), "windows": int(windows.nbytes)},
    }


def run_floor(db: str, model_dir: str, lookback: int, predict_days: int) -> dict:
    from hpcbatch.stocks.features import compute_features, min_rows
    from hpcbatch.stocks.model import predict_windows
    from hpcbatch.stocks.schema import make_engine
    from hpcbatch.stocks.sink import bars_from_rows, bars_query, list_codes
    from hpcbatch.stocks.windows import prediction_windows

    engine = make_engine(db)
    loaded = _model_loaded(model_dir)
    codes = list_codes(engine)
    with engine.connect() as conn:
        bars = bars_from_rows(conn.execute(bars_query(codes, lookback)).all())
    keep = np.flatnonzero(bars.n_rows >= min_rows(predict_days))
    windows = np.ascontiguousarray(
        prediction_windows(compute_features(bars)[keep], predict_days)
    )
    t0 = time.perf_counter()
    returns, _, _ = predict_windows(loaded, windows, 256)
    wall = time.perf_counter() - t0
    return {
        "windows": int(returns.size),
        "wall_s": round(wall, 2),
        "windows_per_s": round(returns.size / wall, 1),
        "peak_rss_bytes": vm_hwm(),
    }


def run_hpcbatch(db: str, model_dir: str, lookback: int, predict_days: int) -> dict:
    from hpcbatch import config as hb_config
    from hpcbatch.stocks.predict import PredictOptions, predict

    settings = hb_config.load()
    settings["cluster"]["dashboard-address"] = "127.0.0.1:0"
    opts = PredictOptions(lookback_days=lookback, predict_days=predict_days, use_gpu="false")
    t0 = time.perf_counter()
    with TreeSampler() as sampler:
        report = predict(
            db, model_dir, settings=settings, options=opts, run_id=f"bench-{time.time():.0f}",
            report_dir=None, progress=False, quiet=True,
        )
    wall = time.perf_counter() - t0
    me = os.getpid()
    workers = {
        pid: e
        for pid, e in sampler.peaks.items()
        if pid != me and ("spawn_main" in e["cmd"] or "distributed.cli" in e["cmd"])
    }
    others = {pid: e for pid, e in sampler.peaks.items() if pid != me and pid not in workers}
    windows = int(report.results_meta.get("windows", 0))
    plan = report.plan or {}
    worker_peaks = sorted(e["peak"] for e in workers.values())
    return {
        "windows": windows,
        "wall_s": round(wall, 2),
        "run_wall_s": report.wall_time_s,
        "windows_per_s": round(windows / wall, 1),
        "windows_per_s_excluding_startup": round(windows / max(report.wall_time_s, 1e-9), 1),
        "driver_peak_rss_bytes": vm_hwm(),
        "worker_peak_rss_bytes": worker_peaks,
        "worker_peak_rss_bytes_runner": report.measured_peak_bytes,
        "other_process_peaks_bytes": sorted(e["peak"] for e in others.values()),
        "total_peak_rss_bytes": sampler.total_peak,
        "planned": {
            "n_workers": plan.get("n_workers"),
            "chunk_size": plan.get("chunk_size"),
            "n_chunks": plan.get("n_chunks"),
            "memory_limit_bytes": plan.get("memory_limit_bytes"),
            "predicted_peak_bytes": plan.get("predicted_peak_bytes"),
        },
        "measured_over_predicted": round(max(worker_peaks) / plan["predicted_peak_bytes"], 3)
        if worker_peaks and plan.get("predicted_peak_bytes")
        else None,
        "status": report.status,
    }


CONTENDERS = {"naive": run_naive, "hpcbatch": run_hpcbatch, "floor": run_floor}


# ------------------------------------------------------------------ setup ----


def prepare(workdir: Path, stocks: int, days: int, model_size: str, seed: int) -> tuple[str, str]:
    from hpcbatch.stocks.features import WARMUP_DAYS, compute_features
    from hpcbatch.stocks.generate import generate_market
    from hpcbatch.stocks.model import StockModel, model_config, save_model
    from hpcbatch.stocks.schema import make_engine
    from hpcbatch.stocks.sink import list_codes, read_bars

    workdir.mkdir(parents=True, exist_ok=True)
    db_path = workdir / f"market-{stocks}x{days}-s{seed}.db"
    url = f"sqlite:///{db_path}"
    if not db_path.exists():
        engine = make_engine(url, create=True)
        generate_market(engine, stocks, days, seed)
        engine.dispose()
    model_dir = workdir / f"model-{model_size}"
    if not (model_dir / "weights.pt").exists():
        import torch

        engine = make_engine(url)
        with engine.connect() as conn:
            bars = read_bars(conn, list_codes(engine)[:50], days)
        feats = compute_features(bars)[:, WARMUP_DAYS:].reshape(-1, 105).astype(np.float64)
        std = np.where(feats.std(0) < 1e-3, 1.0, feats.std(0))
        torch.manual_seed(seed)
        save_model(StockModel(model_config(model_size)), model_dir, feats.mean(0), std, {})
    return url, str(model_dir)


def clear_predictions(url: str) -> None:
    import sqlalchemy as sa

    from hpcbatch.stocks.schema import make_engine

    engine = make_engine(url)
    existing = set(sa.inspect(engine).get_table_names())
    with engine.begin() as conn:
        for table in ("stock_predictions", "hpcbatch_chunks", "hpcbatch_runs"):
            if table in existing:
                conn.exec_driver_sql(f"DELETE FROM {table}")
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()


def child(args: argparse.Namespace) -> None:
    result = CONTENDERS[args.contender](args.db, args.model, args.days, args.predict_days)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500,2000,5000")
    ap.add_argument("--days", type=int, default=400)
    ap.add_argument("--predict-days", type=int, default=10)
    ap.add_argument("--model-size", default="full")
    ap.add_argument("--contenders", default="naive,hpcbatch,floor")
    ap.add_argument("--workdir", default="/tmp/hpcbatch-bench-stocks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="Also write the JSON here (updated per size).")
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.contender:
        child(args)
        return

    results = {
        "machine": {"cpus": os.cpu_count(), "note": "shared 2-core machine: compare ratios"},
        "days": args.days,
        "predict_days": args.predict_days,
        "model_size": args.model_size,
        "sizes": {},
    }
    for stocks in [int(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        url, model_dir = prepare(Path(args.workdir), stocks, args.days, args.model_size, args.seed)
        entry: dict = {"setup_s": round(time.perf_counter() - t0, 1)}
        for name in args.contenders.split(","):
            clear_predictions(url)
            cmd = [
                sys.executable, __file__, "--contender", name, "--db", url, "--model", model_dir,
                "--days", str(args.days), "--predict-days", str(args.predict_days),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                entry[name] = {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
            else:
                entry[name] = json.loads(lines[-1][len("RESULT ") :])
            print(f"# {stocks} stocks, {name}: {json.dumps(entry[name])}", file=sys.stderr, flush=True)
        entry["ratios"] = _ratios(entry)
        results["sizes"][str(stocks)] = entry
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    results["flatness"] = _flatness(results["sizes"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def _ratios(entry: dict) -> dict:
    n, h, f = entry.get("naive", {}), entry.get("hpcbatch", {}), entry.get("floor", {})
    out = {}
    if "windows_per_s" in n and "windows_per_s" in h:
        out["hpcbatch_over_naive_throughput"] = round(h["windows_per_s"] / n["windows_per_s"], 3)
    if "windows_per_s" in f and "windows_per_s" in h:
        out["hpcbatch_over_floor_throughput"] = round(h["windows_per_s"] / f["windows_per_s"], 3)
        out["hpcbatch_over_floor_excluding_startup"] = round(
            h["windows_per_s_excluding_startup"] / f["windows_per_s"], 3
        )
    if "peak_rss_bytes" in n and "total_peak_rss_bytes" in h:
        out["hpcbatch_total_over_naive_peak"] = round(
            h["total_peak_rss_bytes"] / n["peak_rss_bytes"], 3
        )
    return out


def _flatness(sizes: dict) -> dict | None:
    peaks = {
        k: max(v["hpcbatch"]["worker_peak_rss_bytes"])
        for k, v in sizes.items()
        if v.get("hpcbatch", {}).get("worker_peak_rss_bytes")
    }
    if len(peaks) < 2:
        return None
    lo, hi = min(peaks.values()), max(peaks.values())
    return {"worker_peak_by_size": peaks, "max_over_min": round(hi / lo, 3)}


if __name__ == "__main__":
    main()
