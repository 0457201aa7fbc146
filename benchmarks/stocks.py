"""Stock batch prediction: the naive way vs hpcbatch vs the model-only floor (prints JSON).

For each model and size (stocks x days in SQLite, ``predict_days`` windows per stock) the
script generates the market once, saves a model of that size (random weights, real
normalisation statistics: throughput and memory do not depend on the weights), then runs
every contender in a fresh Python process:

- ``naive``: one process reads all rows in one query, builds all features and all
  windows into one array, predicts them and upserts the predictions.
- ``hpcbatch``: ``hpcbatch.stocks.predict`` on a LocalCluster shaped by the plan.
- ``floor``: the same windows already in memory (built before the clock starts), through
  the model in one process at the task's inference batch: the most a pipeline could
  reach on this machine.

Throughput is windows per second of wall time (hpcbatch: from the call to ``predict``
to its return, cluster start and stop included).  Memory is measured the same way for
every contender, from this (parent) process: every 0.1 s it reads ``/proc/PID/status``
of the contender and of all its descendants (the list refreshed every 0.5 s): VmHWM per
process (its exact peak) and the sum of VmRSS over the tree (the peak of that sum).
CPU is measured the same way for every contender too: its own process's user + system
time inside the clock (``getrusage``), plus, from ``/proc/PID/stat`` at the same samples,
the CPU time of every process it started (hpcbatch: the workers' forkserver and the
workers).  Their sum over the machine's cores is the shortest wall time that work could
take, so ``hpcbatch_cpu_bound_over_floor`` is the most hpcbatch could reach against the
floor here with the CPU it spent (the workers' and the driver's, the forkserver's imports).
hpcbatch's run also reports its own per-chunk split (read, features, inference, write)
summed over the chunks, and the idle share of the workers (startup, dispatch, tail).

The machine's load average is recorded at the start and end of every contender:
compare runs only where it stayed low.  The machine's own speed drifts too (the same
floor run took 9.8 and 15.6 s within 20 minutes on 2026-12-06), so every contender
runs ``--repeats`` rounds (2), the order rotated each round; the best round of each is
kept and every round's paired ratios are listed (``ratios_by_round``).  The whole set,
one command, ~16-22 minutes on a quiet 2-core machine::

    python benchmarks/stocks.py --out-dir benchmarks

It writes ``results-stocks-small.json`` (small model, 500 / 2,000 / 5,000 stocks x
10 prediction days) and ``results-stocks-full.json`` (full model, the same sizes x 2
prediction days: the full model is ~12x slower per window, so two windows per stock keep
the set under 12 minutes); 500 stocks is the per-worker-peak reference (flatness = the
largest worker peak at 5,000 over that at 500).  Smoke test::

    python benchmarks/stocks.py --models tiny:2 --sizes 60,120 --out-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

MB = 1024**2
SAMPLE_S = 0.1  # the memory sampling period, the same for every contender
REFRESH_S = 0.5  # how often the contender's process tree is listed again
DEFAULT_MODELS = "small:10,full:2"


# ----------------------------------------------------------------- memory ----


def _status(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes of ``pid`` (0, 0 once it is gone)."""
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, hwm


def _stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state first; the name
    may hold spaces and parentheses, so it is cut at the last ')')."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _descendants(root: int) -> dict[int, int]:
    """pid -> parent pid of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat(entry.name)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {root: 0}, [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            found[child] = pid
            todo.append(child)
    return found


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (0.0 once it is gone)."""
    try:
        fields = _stat(pid)  # utime and stime, in clock ticks
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return 0.0


def _own_cpu() -> float:
    """This process's user + system CPU seconds (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cmdline(pid: int) -> str:
    try:
        # the head: a forkserver's command line ends in a long preload list and sys.path
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:300]
    except OSError:
        return ""


class TreeSampler:
    """VmHWM of every process of ``root``'s tree, the peak of the tree's summed VmRSS and
    each process's CPU seconds at its last sample (a process sampled every 0.1 s: at most
    0.1 s of its CPU time, at its very end, is missed)."""

    def __init__(self, root: int):
        self.root = root
        self.peaks: dict[int, dict] = {}
        self.total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids: dict[int, int] = {}
        listed = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - listed >= REFRESH_S:
                pids, listed = _descendants(self.root), now
            total = 0
            for pid in pids:
                rss, hwm = _status(pid)
                if not rss:
                    continue
                total += rss
                entry = self.peaks.setdefault(
                    pid, {"peak": 0, "cmd": _cmdline(pid), "parent": pids[pid]}
                )
                entry["peak"] = max(entry["peak"], hwm, rss)
                entry["cpu_s"] = max(entry.get("cpu_s", 0.0), _cpu(pid))
            self.total_peak = max(self.total_peak, total)
            self._stop.wait(SAMPLE_S)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def split(self) -> dict:
        """The root's peak, the Dask workers' peaks and the others' (nannies run in the
        root: LocalCluster keeps them in the driver's process)."""
        def is_worker(e: dict) -> bool:  # spawned, dask-worker, or forked by a forkserver
            # (the forkserver the root started: a process a forked worker forks in turn
            # carries the same command line, but its parent is that worker)
            parent = self.peaks.get(e["parent"], {})
            return any(k in e["cmd"] for k in ("spawn_main", "distributed.cli")) or (
                "forkserver" in e["cmd"] and "forkserver" in parent.get("cmd", "")
                and parent.get("parent") == self.root
            )

        workers: list[dict] = []
        others: list[dict] = []
        for pid, e in self.peaks.items():
            if pid != self.root:
                (workers if is_worker(e) else others).append(e)
        return {
            "peak_rss_bytes": self.peaks.get(self.root, {}).get("peak", 0),
            "worker_peak_rss_bytes": sorted(e["peak"] for e in workers),
            "other_process_peaks_bytes": sorted(e["peak"] for e in others),
            "total_peak_rss_bytes": self.total_peak,
            # the root's own CPU inside the clock comes from the contender (getrusage)
            "worker_cpu_s": round(sum(e.get("cpu_s", 0.0) for e in workers), 2),
            "other_process_cpu_s": round(sum(e.get("cpu_s", 0.0) for e in others), 2),
        }


# ------------------------------------------------------------ contenders ----


def _model_loaded(model_dir: str):
    from hpcbatch.stocks.model import load_model

    return load_model(model_dir)


def run_naive(db: str, model_dir: str, lookback: int, predict_days: int) -> dict:
    from hpcbatch.stocks.features import compute_features, min_rows
    from hpcbatch.stocks.model import predict_windows
    from hpcbatch.stocks.predict import cpu_batch, prediction_rows
    from hpcbatch.stocks.schema import init_db, make_engine
    from hpcbatch.stocks.sink import bars_from_rows, bars_query, list_codes, upsert_predictions
    from hpcbatch.stocks.windows import prediction_windows

    t0, cpu0 = time.perf_counter(), _own_cpu()
    engine = make_engine(db)
    init_db(engine)
    loaded = _model_loaded(model_dir)
    codes = list_codes(engine)
    with engine.connect() as conn:
        rows = conn.execute(bars_query(codes, lookback)).all()  # everything at once
    bars = bars_from_rows(rows)
    del rows
    keep = np.flatnonzero(bars.n_rows >= min_rows(predict_days))
    features = compute_features(bars)[keep]
    windows = np.ascontiguousarray(prediction_windows(features, predict_days))  # one big array
    returns, conf, _ = predict_windows(loaded, windows, cpu_batch(loaded.config))
    dates = bars.dates[keep][:, -predict_days:]
    out = prediction_rows([bars.codes[i] for i in keep], dates, returns, conf, "naive", None)
    with engine.begin() as conn:
        upsert_predictions(conn, out)
    wall = time.perf_counter() - t0
    return {
        "windows": len(out),
        "wall_s": round(wall, 2),
        "cpu_s": round(_own_cpu() - cpu0, 2),
        "windows_per_s": round(len(out) / wall, 1),
        "array_bytes": {"features": int(features.nbytes), "windows": int(windows.nbytes)},
    }


def run_floor(db: str, model_dir: str, lookback: int, predict_days: int) -> dict:
    from hpcbatch.stocks.features import compute_features, min_rows
    from hpcbatch.stocks.model import predict_windows
    from hpcbatch.stocks.predict import cpu_batch
    from hpcbatch.stocks.schema import make_engine
    from hpcbatch.stocks.sink import list_codes, read_bars
    from hpcbatch.stocks.windows import prediction_windows

    engine = make_engine(db)
    loaded = _model_loaded(model_dir)
    with engine.connect() as conn:
        bars = read_bars(conn, list_codes(engine), lookback)
    keep = np.flatnonzero(bars.n_rows >= min_rows(predict_days))
    windows = np.ascontiguousarray(
        prediction_windows(compute_features(bars)[keep], predict_days)
    )
    del bars
    t0, cpu0 = time.perf_counter(), _own_cpu()
    returns, _, _ = predict_windows(loaded, windows, cpu_batch(loaded.config))
    wall = time.perf_counter() - t0
    return {
        "windows": int(returns.size),
        "wall_s": round(wall, 2),
        "cpu_s": round(_own_cpu() - cpu0, 2),
        "windows_per_s": round(returns.size / wall, 1),
    }


SPLIT_KEYS = ("read_s", "features_s", "inference_s", "write_s")


def run_hpcbatch(db: str, model_dir: str, lookback: int, predict_days: int) -> dict:
    import hpcbatch.stocks.model  # noqa: F401  (torch imported before the clock, as for the others)
    from hpcbatch import config as hb_config
    from hpcbatch.stocks.predict import PredictOptions, predict

    settings = hb_config.load()
    settings["cluster"]["dashboard-address"] = "127.0.0.1:0"
    opts = PredictOptions(lookback_days=lookback, predict_days=predict_days, use_gpu="false")
    t0, cpu0 = time.perf_counter(), _own_cpu()
    report = predict(
        db, model_dir, settings=settings, options=opts, run_id=f"bench-{time.time():.0f}",
        report_dir=None, progress=False, quiet=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    cpu = _own_cpu() - cpu0
    meta = report.results_meta or {}
    windows = int(meta.get("windows", 0))
    plan = report.plan or {}
    busy = float(meta.get("seconds", 0.0))
    n_workers = plan.get("n_workers") or 1
    return {
        "windows": windows,
        "wall_s": round(wall, 2),
        "run_wall_s": report.wall_time_s,
        "cpu_s": round(cpu, 2),  # the driver (scheduler, nannies, runner, report)
        "windows_per_s": round(windows / wall, 1),
        "windows_per_s_excluding_startup": round(windows / max(report.wall_time_s, 1e-9), 1),
        "worker_peak_rss_bytes_runner": report.measured_peak_bytes,
        # where the workers' time went: each chunk's steps summed over the chunks, and the
        # share of n_workers x wall with no chunk running (startup, dispatch, tail, stop)
        "worker_seconds": {k: round(float(meta.get(k, 0.0)), 2) for k in (*SPLIT_KEYS, "seconds")},
        "worker_split": {
            k[:-2]: round(float(meta.get(k, 0.0)) / busy, 3) if busy else None for k in SPLIT_KEYS
        },
        "worker_idle_share": round(1 - busy / (n_workers * wall), 3) if wall else None,
        "planned": {
            "n_workers": plan.get("n_workers"),
            "threads_per_worker": plan.get("threads_per_worker"),
            "chunk_size": plan.get("chunk_size"),
            "n_chunks": plan.get("n_chunks"),
            "memory_limit_bytes": plan.get("memory_limit_bytes"),
            "predicted_peak_bytes": plan.get("predicted_peak_bytes"),
            "footprint_source": plan.get("footprint_source"),
        },
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
        tmp = db_path.with_suffix(".tmp.db")
        tmp.unlink(missing_ok=True)
        engine = make_engine(f"sqlite:///{tmp}", create=True)
        generate_market(engine, stocks, days, seed)
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        engine.dispose()
        os.replace(tmp, db_path)
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


def run_contender(name: str, url: str, model_dir: str, days: int, predict_days: int) -> dict:
    """One contender in a fresh process, its process tree sampled from here."""
    cmd = [
        sys.executable, __file__, "--contender", name, "--db", url, "--model", model_dir,
        "--days", str(days), "--predict-days", str(predict_days),
    ]  # fmt: skip
    load_start = os.getloadavg()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid).start()
    out, err = proc.communicate()
    sampler.stop()
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        result: dict = {"error": (err.strip().splitlines() or ["?"])[-1]}
    else:
        result = json.loads(lines[-1][len("RESULT ") :])
    memory = sampler.split()
    if name != "hpcbatch":
        memory.pop("worker_peak_rss_bytes")
        memory.pop("worker_cpu_s")
    result.update(memory)
    if "cpu_s" in result:  # the contender's own CPU inside the clock + its children's
        result["total_cpu_s"] = round(
            result["cpu_s"] + memory.get("worker_cpu_s", 0.0) + memory["other_process_cpu_s"], 2
        )
    result["load_avg"] = {"start": [round(x, 2) for x in load_start],
                          "end": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def speed_probe() -> dict:
    """The machine's speed right now, one thread, best of 3: a pure-Python loop (reading
    rows and Dask's own work are Python) and a 512 x 512 float32 matmul (inference).  A
    virtual machine's speed drifts from day to day and hour to hour (on 2026-12-07 one
    Python loop took 1.3-2.8 s within minutes, and this probe's loop 0.236 s at the start
    of a set, 0.149 s at its end): compare sets only where these agree."""
    import torch

    def loop() -> float:
        t0, total = time.perf_counter(), 0
        for i in range(5_000_000):
            total += i
        return time.perf_counter() - t0

    def matmul() -> float:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        t0 = time.perf_counter()
        for _ in range(200):
            a @ b
        return time.perf_counter() - t0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"python_loop_s": round(min(loop() for _ in range(3)), 3),
                "matmul_s": round(min(matmul() for _ in range(3)), 3)}  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def machine() -> dict:
    import distributed
    import sqlalchemy
    import torch

    return {
        "host": platform.node(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "sqlalchemy": sqlalchemy.__version__,
        "distributed": distributed.__version__,
        "memory_sampling": f"/proc/PID/status of each contender's process tree every {SAMPLE_S} s "
                           "from the parent: VmHWM per process, peak of the summed VmRSS",
        "cpu_sampling": "getrusage of the contender's own process inside the clock, plus "
                        f"/proc/PID/stat utime + stime of the processes it started, every {SAMPLE_S} s",
        "cores": len(os.sched_getaffinity(0)),
    }  # fmt: skip


def run_model(args: argparse.Namespace, model_size: str, predict_days: int) -> dict:
    results: dict = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "days": args.days,
        "predict_days": predict_days,
        "model_size": model_size,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "speed_probe_start": speed_probe(),
        "sizes": {},
    }
    out = Path(args.out_dir) / f"results-stocks-{model_size}.json" if args.out_dir else None
    for stocks in [int(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        url, model_dir = prepare(Path(args.workdir), stocks, args.days, model_size, args.seed)
        entry: dict = {"setup_s": round(time.perf_counter() - t0, 1)}
        names = args.contenders.split(",")
        runs: dict[str, list[dict]] = {name: [] for name in names}
        paired = []
        for rep in range(args.repeats):
            # every contender once per round, the order rotated: a slow spell of the
            # machine hits each contender in turn
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                clear_predictions(url)
                row = run_contender(name, url, model_dir, args.days, predict_days)
                runs[name].append(row)
                print(f"# {model_size} {stocks} stocks, round {rep + 1}, {name}: "
                      f"{json.dumps(row)}", file=sys.stderr, flush=True)  # fmt: skip
            paired.append(_ratios({name: runs[name][-1] for name in names}))
        for name in names:  # the best round of each: noise only slows a run down
            entry[name] = max(runs[name], key=lambda r: r.get("windows_per_s", 0))
            entry[name]["rounds_windows_per_s"] = [r.get("windows_per_s") for r in runs[name]]
        entry["ratios"] = _ratios(entry)
        entry["ratios_by_round"] = paired
        results["sizes"][str(stocks)] = entry
        results["flatness"] = _flatness(results["sizes"])
        results["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        _save(out, results)  # after every size: a set cut short keeps what it measured
    results["speed_probe_end"] = speed_probe()
    _save(out, results)
    return results


def _save(out: Path | None, results: dict) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help="SIZE:PREDICT_DAYS,... (default small:10,full:2)")  # fmt: skip
    ap.add_argument("--sizes", default="500,2000,5000")
    ap.add_argument("--days", type=int, default=400)
    ap.add_argument("--contenders", default="naive,hpcbatch,floor")
    ap.add_argument("--workdir", default="/tmp/hpcbatch-bench-stocks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2,
                    help="Rounds of every contender per size (best round kept, each "
                         "round's ratios listed): the machine's speed drifts.")  # fmt: skip
    ap.add_argument("--out-dir", default=None,
                    help="Write results-stocks-MODEL.json here (updated after every size).")  # fmt: skip
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--model-size", default=None,
                    help="One model only (the earlier interface): --models SIZE:PREDICT_DAYS")  # fmt: skip
    ap.add_argument("--predict-days", type=int, default=10,
                    help="With --model-size: prediction days per stock (10).")  # fmt: skip
    args = ap.parse_args()
    if args.contender:
        child(args)
        return
    if args.model_size:
        args.models = f"{args.model_size}:{args.predict_days}"
    t0 = time.perf_counter()
    everything = {}
    for spec in args.models.split(","):
        size, _, days = spec.partition(":")
        everything[size] = run_model(args, size, int(days or 10))
    everything["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(everything, indent=2))


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
    if f.get("windows_per_s") and h.get("total_cpu_s") and h.get("windows"):
        # hpcbatch's CPU work spread perfectly over every core: its shortest possible wall
        cores = len(os.sched_getaffinity(0))
        out["hpcbatch_cpu_bound_over_floor"] = round(
            h["windows"] / (h["total_cpu_s"] / cores) / f["windows_per_s"], 3
        )
    if n.get("peak_rss_bytes") and h.get("total_peak_rss_bytes"):
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
    first, last = peaks[min(peaks, key=int)], peaks[max(peaks, key=int)]
    return {
        "worker_peak_by_size": peaks,
        "largest_over_smallest_size": round(last / first, 3),
        "goal": "<= 1.15",
    }


if __name__ == "__main__":
    main()
