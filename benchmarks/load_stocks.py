"""Load: 20,000 stocks in PostgreSQL, per-worker memory flat, nothing lost (prints JSON).

The script starts a throwaway PostgreSQL (``tests/services.py``'s ``PostgresServer``;
or uses ``--db URL``), bulk-loads ``--stocks`` x ``--days`` bars made by the project's
generator (``hpcbatch.stocks.generate.simulate_block``, the same blocks, seed and values
as ``hpcbatch stocks generate``) with ``COPY``, and checks a prefix of them against
``generate_market`` itself (same rows, same checksum; its ``executemany`` rate is
recorded too).  It then runs the real prediction job (``hpcbatch.stocks.predict.predict``,
the code path of ``hpcbatch stocks predict --limit N``: planner, LocalCluster of the
plan's workers with the plan's per-worker memory limit, ledger, run report) for
increasing numbers of stocks, each size with its own ``model_version`` so the outputs
can be checked separately.

Memory is measured, never estimated: each worker process's RSS is sampled every 0.2 s
with psutil (a timeline per worker) and compared with the run report's nanny-plugin
peaks and the planner's predicted per-worker peak.  Nothing lost: for every size the
prediction rows equal (stocks with enough history) x ``--predict-days``, each
(stock, day) exactly once and exactly the stock's last ``--predict-days`` trading days,
no stock outside the selection, and the ledger holds every chunk once, run finished.

    nice -n 5 python benchmarks/load_stocks.py            # 20,000 stocks, ~10-20 min
    python benchmarks/load_stocks.py --quick              # 1,000 stocks, ~1-2 min
    python benchmarks/load_stocks.py --quick --sqlite     # no PostgreSQL needed

Writes ``benchmarks/results-load-stocks.json`` and ``docs/load-stocks.png`` (``--out``,
``--plot``; ``--quick`` writes to /tmp unless they are given).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MIB = 1024**2


# ------------------------------------------------------------------ database ----


@contextlib.contextmanager
def database(args: argparse.Namespace, workdir: Path):
    """Yield (SQLAlchemy URL, description); a server started here is stopped on exit."""
    if args.db:
        yield args.db, {"backend": args.db.split(":", 1)[0], "server": "given by --db"}
        return
    if args.sqlite:
        yield f"sqlite:///{workdir / 'market.db'}", {"backend": "sqlite", "server": "file"}
        return
    sys.path.insert(0, str(REPO / "tests"))
    from services import PostgresServer, create_database  # the test suite's throwaway server

    server = PostgresServer()
    try:
        server.start()
        _, url = create_database(server.url, "hpcbatch_load")
        yield url, {
            "backend": "postgresql",
            "server": f"throwaway PostgreSQL ({server.bindir}), fsync off",
        }
    finally:
        server.stop()


def _blocks(stocks: int, days: int, seed: int):
    """The generator's blocks: (codes, dates, bars) exactly as ``generate_market`` makes them."""
    from hpcbatch.stocks import generate as gen

    calendar = gen.trading_calendar(days)
    dates = [str(x).replace("-", "") for x in calendar]
    codes = gen.stock_codes(stocks)
    market = gen._market_returns(np.random.default_rng([seed, 10**6]), days)
    for block, start in enumerate(range(0, stocks, gen.BLOCK_STOCKS)):
        block_codes = codes[start : start + gen.BLOCK_STOCKS]
        yield block_codes, dates, gen.simulate_block(block_codes, calendar, market, seed, block)


def copy_market(url: str, stocks: int, days: int, seed: int) -> int:
    """Bulk-load the generator's bars into PostgreSQL with COPY (one transaction)."""
    from hpcbatch.stocks.schema import BAR_COLUMNS, init_db, make_engine

    engine = make_engine(url)
    init_db(engine)
    columns = ", ".join(["ts_code", "trade_date", *[f'"{c}"' for c in BAR_COLUMNS]])
    raw = engine.raw_connection()
    rows = 0
    try:
        with raw.cursor() as cur, cur.copy(f"COPY stock_daily ({columns}) FROM STDIN") as copy:
            for codes, dates, bars in _blocks(stocks, days, seed):
                ri, ci = np.nonzero(bars["present"])
                values = [bars[name][ri, ci].tolist() for name in BAR_COLUMNS]
                code_col = np.asarray(codes, dtype=object)[ri].tolist()
                date_col = np.asarray(dates, dtype=object)[ci].tolist()
                for row in zip(code_col, date_col, *values, strict=True):
                    copy.write_row(row)
                rows += len(ri)
        raw.commit()
    finally:
        raw.close()
    with engine.begin() as conn:  # committed: a rolled-back ANALYZE leaves no statistics
        conn.exec_driver_sql("ANALYZE stock_daily")
    engine.dispose()
    return rows


def chunk_query_plan(url: str, n_codes: int = 50) -> list[str]:
    """The scan nodes of PostgreSQL's plan for one chunk's bars query (index, not seq)."""
    import sqlalchemy as sa

    from hpcbatch.stocks.schema import make_engine
    from hpcbatch.stocks.sink import bars_query, list_codes

    engine = make_engine(url)
    codes = list_codes(engine)
    middle = codes[len(codes) // 2 : len(codes) // 2 + n_codes]
    query = bars_query(middle, 400).compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        plan = [r[0] for r in conn.execute(sa.text(f"EXPLAIN {query}"))]
    engine.dispose()
    return [line.strip() for line in plan if "Scan" in line]


def _check_database(url: str, backend: str, workdir: Path) -> tuple[str, Callable[[], None]]:
    """A second, empty database for generate_market: same PostgreSQL server if possible."""
    if backend == "postgresql":
        sys.path.insert(0, str(REPO / "tests"))
        from services import create_database, drop_database

        server = url.rsplit("/", 1)[0] + "/postgres"
        with contextlib.suppress(Exception):
            name, check_url = create_database(server, "hpcbatch_check")
            return check_url, lambda: drop_database(server, name)
    return f"sqlite:///{workdir / 'check.db'}", lambda: None


def load_market(url: str, backend: str, args: argparse.Namespace, workdir: Path) -> dict:
    from hpcbatch.stocks.generate import generate_market, stock_codes
    from hpcbatch.stocks.schema import make_engine

    t0 = time.perf_counter()
    if backend == "postgresql":
        rows = copy_market(url, args.stocks, args.days, args.seed)
        method = "COPY (psycopg), rows from hpcbatch.stocks.generate.simulate_block"
    else:
        engine = make_engine(url, create=True)
        rows = generate_market(engine, args.stocks, args.days, args.seed).rows
        engine.dispose()
        method = "hpcbatch.stocks.generate.generate_market (executemany per 256 stocks)"
    load_s = time.perf_counter() - t0
    out = {
        "stocks": args.stocks, "days": args.days, "rows": rows, "method": method,
        "load_s": round(load_s, 1), "rows_per_s": round(rows / load_s),
    }
    if backend == "postgresql" and args.check_stocks:
        # The same first stocks through generate_market (executemany) in a second table
        # set: identical rows and checksums prove COPY loaded the generator's market.
        n = min(args.check_stocks, args.stocks)
        check_url, drop = _check_database(url, backend, workdir)
        try:
            engine = make_engine(check_url, create=True)
            t1 = time.perf_counter()
            gm_rows = generate_market(engine, n, args.days, args.seed).rows
            engine.dispose()
            gm_s = time.perf_counter() - t1
            # stock_codes(n) is a prefix of stock_codes(N) (blocks and seeds are fixed), but
            # the ts_code order interleaves boards, so compare exactly those codes.
            a = _checksum_of(url, stock_codes(n))
            b = _checksum_of(check_url, None)
        finally:
            drop()
        out["generate_market_check"] = {
            "stocks": n, "database": check_url.split(":", 1)[0], "copy": a,
            "generate_market": b, "equal": a == b, "generate_market_s": round(gm_s, 1),
            "generate_market_rows_per_s": round(gm_rows / gm_s),
        }
    if backend == "postgresql":
        out["chunk_query_scans"] = chunk_query_plan(url)
    return out


def _checksum_of(url: str, codes: list[str] | None) -> dict:
    """Rows, sums of close and vol, and the last ts_code of the bars of ``codes`` (all)."""
    import sqlalchemy as sa

    from hpcbatch.stocks.schema import make_engine, stock_daily

    t = stock_daily.c
    q = sa.select(
        sa.func.count(), sa.func.sum(t.close), sa.func.sum(t.vol), sa.func.max(t.ts_code)
    )
    if codes is not None:
        q = q.where(t.ts_code.in_(codes))
    engine = make_engine(url)
    with engine.connect() as conn:
        n, close, vol, last = conn.execute(q).one()
    engine.dispose()
    return {"rows": int(n), "sum_close": round(float(close), 2), "sum_vol": round(float(vol), 0),
            "last_code": last}


def save_random_model(url: str, model_dir: Path, size: str, days: int, seed: int) -> None:
    """A model of ``size`` with random weights and real normalisation statistics
    (throughput and memory do not depend on the weights)."""
    import torch

    from hpcbatch.stocks.features import N_FEATURES, WARMUP_DAYS, compute_features
    from hpcbatch.stocks.model import StockModel, model_config, save_model
    from hpcbatch.stocks.schema import make_engine
    from hpcbatch.stocks.sink import list_codes, read_bars

    engine = make_engine(url)
    with engine.connect() as conn:
        bars = read_bars(conn, list_codes(engine)[:50], days)
    engine.dispose()
    feats = compute_features(bars)[:, WARMUP_DAYS:].reshape(-1, N_FEATURES).astype(np.float64)
    std = np.where(feats.std(0) < 1e-3, 1.0, feats.std(0))
    torch.manual_seed(seed)
    save_model(StockModel(model_config(size)), model_dir, feats.mean(0), std, {})


# ------------------------------------------------------------------- sampling ----


def _is_worker(p, me: int) -> bool:
    """A nanny's worker process: spawned by this process, or forked by the forkserver
    this process started.  Not a process a worker forks in turn (a forked worker's
    command line is the forkserver's, so its own children look alike by name)."""
    parent = p.parent()
    if parent is None:
        return False
    if parent.pid == me:
        return "spawn_main" in " ".join(p.cmdline())
    return parent.ppid() == me and "multiprocessing.forkserver" in " ".join(parent.cmdline())


class WorkerSampler:
    """RSS of every Dask worker process (children of this process) every ``interval`` s."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.t0 = time.time()
        self.samples: dict[int, list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            now = time.time()
            # the nannies' worker processes: spawned by this process, or forked by the
            # forkserver it started (stocks workers are; not the server itself)
            for p in self.me.children(recursive=True):
                try:
                    if p.pid not in self.samples and not _is_worker(p, self.me.pid):
                        continue  # not a worker process (e.g. the resource tracker)
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                self.samples.setdefault(p.pid, []).append((now, rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> WorkerSampler:
        self.t0 = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def timelines(self) -> list[dict]:
        out = []
        for i, (pid, s) in enumerate(sorted(self.samples.items())):
            out.append({
                "worker": i, "pid": pid,
                "t": [round(t - self.t0, 2) for t, _ in s],
                "rss": [int(r) for _, r in s],
            })
        return out


def steady_growth(tl: dict, chunk_times: tuple[float, float] | None) -> dict:
    """Median RSS in the first and last fifth of the busy period (growth = last / first)."""
    t, rss = np.asarray(tl["t"]), np.asarray(tl["rss"], dtype=float)
    if chunk_times:
        keep = (t >= chunk_times[0]) & (t <= chunk_times[1])
        t, rss = t[keep], rss[keep]
    if rss.size < 10:
        return {}
    k = max(1, rss.size // 5)
    first, last = float(np.median(rss[:k])), float(np.median(rss[-k:]))
    return {"median_first_fifth_bytes": int(first), "median_last_fifth_bytes": int(last),
            "last_over_first": round(last / first, 3)}


# ------------------------------------------------------------------ one size ----


def run_size(url: str, model_dir: Path, n: int, args: argparse.Namespace, report_root: Path) -> dict:
    from hpcbatch import config as hb_config
    from hpcbatch.resources import detect_resources
    from hpcbatch.stocks.predict import PredictOptions, predict

    settings = hb_config.load()
    settings["cluster"]["dashboard-address"] = "127.0.0.1:0"
    opts = PredictOptions(
        lookback_days=args.days, predict_days=args.predict_days, use_gpu="false", limit=n,
        model_version=f"load-{n}",
    )
    resources = detect_resources(
        memory_bytes=int(args.mem_gb * 1e9) if args.mem_gb else None, plan_ahead=False
    )
    run_id = f"load-{n}-{int(time.time())}"
    t0 = time.perf_counter()
    with WorkerSampler(args.sample_interval) as sampler:
        report = predict(
            url, str(model_dir), settings=settings, options=opts, resources=resources,
            run_id=run_id, report_dir=str(report_root), progress=False, quiet=True,
        )
    wall = time.perf_counter() - t0
    data = json.loads((Path(report.report_dir) / "report.json").read_text())
    plan = data.get("plan") or {}
    timelines = sampler.timelines()
    peaks = [max(tl["rss"]) for tl in timelines if tl["rss"]]
    meta = data.get("results_meta") or {}
    predicted = data.get("predicted_peak_bytes")
    busy = _busy_window(url, run_id, sampler.t0)
    return {
        "stocks": n,
        "run_id": run_id,
        "status": data["status"],
        "wall_s": round(wall, 1),
        "run_wall_s": data.get("wall_time_s"),
        "windows": meta.get("windows"),
        "windows_per_s": round((meta.get("windows") or 0) / max(data.get("wall_time_s") or wall, 1e-9), 1),
        "plan": {k: plan.get(k) for k in (
            "n_workers", "threads_per_worker", "chunk_size", "n_chunks", "memory_limit_bytes",
            "predicted_peak_bytes")},
        "memory_limit_bytes": data.get("memory_limit_bytes"),
        "predicted_peak_bytes": predicted,
        "worker_peak_rss_bytes_psutil": peaks,
        "worker_peak_rss_bytes_report": data.get("measured_peak_per_worker"),
        "measured_over_predicted": round(max(peaks) / predicted, 3) if peaks and predicted else None,
        "growth_during_run": [steady_growth(tl, busy) for tl in timelines],
        "worker_deaths": len(data.get("worker_deaths") or []),
        "chunks": {k: data.get(k) for k in (
            "n_chunks", "chunks_done", "chunks_retried", "chunks_split", "chunks_failed")},
        "results_meta": meta,
        "checks": check_outputs(url, run_id, n, args.predict_days, f"load-{n}", data),
        "timelines": timelines,
    }


def _busy_window(url: str, run_id: str, t0: float) -> tuple[float, float] | None:
    """From the first to the last chunk's ledger time, relative to the sampler's start."""
    import sqlalchemy as sa

    from hpcbatch.ledger import CHUNKS
    from hpcbatch.stocks.schema import make_engine

    engine = make_engine(url)
    with engine.connect() as conn:
        lo, hi = conn.execute(
            sa.select(sa.func.min(CHUNKS.c.done_at), sa.func.max(CHUNKS.c.done_at)).where(
                CHUNKS.c.run_id == run_id
            )
        ).one()
    engine.dispose()
    return (lo - t0, hi - t0) if lo is not None else None


# ------------------------------------------------------------------- checks ----


def check_outputs(url: str, run_id: str, n: int, predict_days: int, version: str, report: dict) -> dict:
    """Nothing lost, nothing duplicated, nothing extra; the ledger agrees."""
    import sqlalchemy as sa

    from hpcbatch.ledger import CHUNKS, RUNS
    from hpcbatch.stocks.features import min_rows
    from hpcbatch.stocks.schema import make_engine, stock_daily, stock_predictions
    from hpcbatch.stocks.sink import list_codes

    engine = make_engine(url)
    codes = list_codes(engine)[:n]
    last_code = codes[-1]
    d, p = stock_daily.c, stock_predictions.c
    with engine.connect() as conn:
        per_stock = (
            sa.select(d.ts_code, sa.func.count().label("n"))
            .where(d.ts_code <= last_code)
            .group_by(d.ts_code)
            .subquery()
        )
        eligible = conn.execute(
            sa.select(sa.func.count()).where(per_stock.c.n >= min_rows(predict_days))
        ).scalar_one()
        rows, distinct_keys, distinct_codes, max_code = conn.execute(
            sa.select(
                sa.func.count(),
                sa.func.count(sa.distinct(p.ts_code + "|" + p.trade_date)),
                sa.func.count(sa.distinct(p.ts_code)),
                sa.func.max(p.ts_code),
            ).where(p.model_version == version)
        ).one()
        # Each prediction must be on one of its stock's last `predict_days` trading days.
        rn = sa.func.row_number().over(partition_by=d.ts_code, order_by=d.trade_date.desc())
        last_days = (
            sa.select(d.ts_code, d.trade_date, rn.label("rn"))
            .where(d.ts_code <= last_code)
            .subquery()
        )
        on_last_days = conn.execute(
            sa.select(sa.func.count())
            .select_from(stock_predictions)
            .join(
                last_days,
                sa.and_(last_days.c.ts_code == p.ts_code, last_days.c.trade_date == p.trade_date),
            )
            .where(p.model_version == version, last_days.c.rn <= predict_days)
        ).scalar_one()
        ledger_rows, ledger_ids = conn.execute(
            sa.select(sa.func.count(), sa.func.count(sa.distinct(CHUNKS.c.chunk_id))).where(
                CHUNKS.c.run_id == run_id
            )
        ).one()
        metas = conn.execute(sa.select(CHUNKS.c.meta).where(CHUNKS.c.run_id == run_id)).scalars()
        ledger_predictions = sum(int(json.loads(m).get("predictions", 0)) for m in metas)
        run_status = conn.execute(
            sa.select(RUNS.c.status).where(RUNS.c.run_id == run_id)
        ).scalar_one_or_none()
    engine.dispose()
    expected = eligible * predict_days
    n_chunks = report.get("n_chunks")
    out = {
        "stocks_selected": len(codes),
        "stocks_with_enough_history": int(eligible),
        "expected_rows": int(expected),
        "prediction_rows": int(rows),
        "distinct_stock_days": int(distinct_keys),
        "distinct_stocks": int(distinct_codes),
        "rows_on_last_trading_days": int(on_last_days),
        "no_stock_outside_selection": max_code is None or max_code <= last_code,
        "ledger_chunks": int(ledger_rows),
        "ledger_distinct_chunks": int(ledger_ids),
        "ledger_predictions": ledger_predictions,
        "ledger_run_status": run_status,
        "report_chunks": n_chunks,
    }
    out["ok"] = bool(
        rows == expected == distinct_keys == on_last_days == ledger_predictions
        and distinct_codes == eligible
        and out["no_stock_outside_selection"]
        and ledger_rows == ledger_ids == n_chunks == report.get("chunks_done")
        and run_status == "finished"
        and report.get("status") == "finished"
        and not report.get("chunks_failed")
    )
    return out


# --------------------------------------------------------------------- plot ----


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    largest = sizes[max(sizes, key=int)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.2), dpi=110,
                                 gridspec_kw={"width_ratios": [1.6, 1]})
    for tl in largest["timelines"]:
        ax.plot(tl["t"], np.asarray(tl["rss"]) / MIB, lw=1.0, label=f"worker {tl['worker']} (pid {tl['pid']})")
    limit, predicted = largest["memory_limit_bytes"], largest["predicted_peak_bytes"]
    if limit:
        ax.axhline(limit / MIB, color="black", lw=1.5, label=f"memory limit {limit / MIB:,.0f} MiB")
    if predicted:
        ax.axhline(predicted / MIB, color="tab:red", ls="-.", lw=1.2,
                   label=f"planner's predicted peak {predicted / MIB:,.0f} MiB")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the job started (cluster start-up included)")
    ax.set_ylabel(f"worker RSS (MiB), sampled every {results['sample_interval_s']:.1f} s")
    ax.set_title(f"{int(largest['stocks']):,} stocks in {results['database']['backend']}: "
                 f"{largest['plan']['n_chunks']} chunks of {largest['plan']['chunk_size']} stocks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")

    ns = sorted(int(k) for k in sizes)
    for w in range(max(len(sizes[str(k)]["worker_peak_rss_bytes_psutil"]) for k in ns)):
        ys = [sizes[str(k)]["worker_peak_rss_bytes_psutil"][w] / MIB
              if w < len(sizes[str(k)]["worker_peak_rss_bytes_psutil"]) else np.nan for k in ns]
        bx.plot(ns, ys, "o-", label=f"worker {w} peak (measured)")
    bx.plot(ns, [sizes[str(k)]["predicted_peak_bytes"] / MIB for k in ns], "s--",
            color="tab:red", label="planner's predicted peak")
    lims = [sizes[str(k)]["memory_limit_bytes"] for k in ns]
    if all(lims):
        bx.plot(ns, [x / MIB for x in lims], "-", color="black", label="memory limit")
    bx.set_xscale("log")
    bx.set_xticks(ns)
    bx.set_xticklabels([f"{k:,}" for k in ns])
    bx.minorticks_off()
    bx.set_ylim(bottom=0)
    bx.set_xlabel("stocks predicted (log scale)")
    bx.set_ylabel("per-worker peak RSS (MiB)")
    bx.set_title("Per-worker peak vs number of stocks")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8, loc="center right")
    fig.suptitle(f"hpcbatch stocks predict: {results['model_size']} model, "
                 f"{results['predict_days']} prediction days, {results['days']}-day lookback, "
                 f"LocalCluster on {results['machine']['cpus']} cores", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------- main ----


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 stocks, sizes 500,1000.")
    ap.add_argument("--stocks", type=int, default=None, help="Stocks in the database (20000).")
    ap.add_argument("--sizes", default=None, help="Stocks predicted per run (2500,...,20000).")
    ap.add_argument("--days", type=int, default=400)
    ap.add_argument("--predict-days", type=int, default=None, help="Windows per stock (10).")
    ap.add_argument("--model-size", default="small", choices=("tiny", "small", "full"))
    ap.add_argument("--mem-gb", type=float, default=4.0,
                    help="Memory the planner may use (GB), as --mem-gb of the CLI; 0 = all.")
    ap.add_argument("--db", default=None, help="Use this database (empty, or holding exactly this market).")
    ap.add_argument("--sqlite", action="store_true", help="A SQLite file instead of PostgreSQL.")
    ap.add_argument("--check-stocks", type=int, default=512,
                    help="Stocks reloaded with generate_market to check the COPY load (0: skip).")
    ap.add_argument("--sample-interval", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.stocks = args.stocks or 1000
        args.sizes = args.sizes or "500,1000"
        args.predict_days = args.predict_days or 3
        args.check_stocks = min(args.check_stocks, 256)
        tmp = Path(tempfile.gettempdir())
        args.out = args.out or str(tmp / "results-load-stocks-quick.json")
        args.plot = args.plot or str(tmp / "load-stocks-quick.png")
    args.stocks = args.stocks or 20_000
    args.sizes = args.sizes or "2500,5000,10000,20000"
    args.predict_days = args.predict_days or 10
    args.out = args.out or str(REPO / "benchmarks" / "results-load-stocks.json")
    args.plot = args.plot or str(REPO / "docs" / "load-stocks.png")
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) > args.stocks:
        ap.error(f"--sizes up to {max(sizes)} need --stocks >= {max(sizes)}")

    started = time.perf_counter()
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0],
                    "note": "shared 2-core machine (other benchmarks and tests ran at the same time)"},
        "command": "python benchmarks/load_stocks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "days": args.days, "predict_days": args.predict_days, "model_size": args.model_size,
        "mem_gb": args.mem_gb, "sample_interval_s": args.sample_interval, "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="hpcbatch-load-stocks-") as tmpdir:
        workdir = Path(tmpdir)
        with database(args, workdir) as (url, db_info):
            results["database"] = db_info
            _log(f"database {db_info['backend']}: loading {args.stocks} x {args.days} bars")
            results["load"] = load_market(url, db_info["backend"], args, workdir)
            _log(f"load: {json.dumps(results['load'])}")
            model_dir = workdir / "model"
            save_random_model(url, model_dir, args.model_size, args.days, args.seed)
            for n in sizes:
                entry = run_size(url, model_dir, n, args, workdir / "reports")
                results["sizes"][str(n)] = entry
                _log(f"{n} stocks: " + json.dumps({k: v for k, v in entry.items() if k != "timelines"}))
    results["flatness"] = flatness(results["sizes"])
    results["all_checks_ok"] = all(e["checks"]["ok"] for e in results["sizes"].values()) and (
        results["load"].get("generate_market_check", {}).get("equal", True)
    )
    results["total_wall_s"] = round(time.perf_counter() - started, 1)
    plot(results, Path(args.plot))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(_thin(results), indent=1))
    print(json.dumps(_without_timelines(results), indent=2))
    return results


def flatness(sizes: dict) -> dict:
    ns = sorted(int(k) for k in sizes)
    peaks = {str(k): max(sizes[str(k)]["worker_peak_rss_bytes_psutil"]) for k in ns}
    lo, hi = min(peaks.values()), max(peaks.values())
    slope = None
    if len(ns) >= 2:
        slope = float(np.polyfit(ns, [peaks[str(k)] for k in ns], 1)[0])
    return {
        "max_worker_peak_by_size_bytes": peaks,
        "max_over_min": round(hi / lo, 3),
        "fit_bytes_per_extra_stock": round(slope, 1) if slope is not None else None,
        "stocks_ratio": round(ns[-1] / ns[0], 1),
    }


def _thin(results: dict, max_points: int = 1500) -> dict:
    """Keep the largest run's timelines (thinned, every peak kept), drop the others."""
    out = json.loads(json.dumps(results))
    largest = max(out["sizes"], key=int)
    for k, e in out["sizes"].items():
        if k != largest:
            e.pop("timelines", None)
            continue
        for tl in e["timelines"]:
            step = -(-len(tl["t"]) // max_points)
            if step > 1:
                tl["t"] = tl["t"][::step]
                tl["rss"] = [max(tl["rss"][i : i + step]) for i in range(0, len(tl["rss"]), step)]
    return out


def _without_timelines(results: dict) -> dict:
    out = json.loads(json.dumps(results))
    for e in out["sizes"].values():
        e.pop("timelines", None)
    return out


def _log(msg: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
