"""Runner overhead: N no-op chunks through ``hpcbatch.runner.run`` vs plain Dask.

Both paths run on the same ``LocalCluster`` (2 workers, 1 thread each): plain
``client.map`` + ``as_completed`` over N no-op tasks, and ``hpcbatch.runner.run`` over N
one-item chunks of a no-op task function (default options: the in-flight window,
memory sampler, task counter and queue witness; no ledger, no report dir, progress
off).  Each is run ``--repeat`` times alternately after a small warm-up; the JSON has
every wall time, the medians, their ratio (issue 11's goal: at most 1.5) and the load
average before and after (timings on a busy machine say little: check ``load_before``).

    python benchmarks/runner_overhead.py                  # 10,000 chunks, writes the JSON
    python benchmarks/runner_overhead.py --chunks 500 --no-write      # a smoke run
    python benchmarks/runner_overhead.py --chunks 2000 --profile      # + the runner's profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results-runner-overhead.json"


def noop(x):
    return {"items": 1}


def noop_chunk(chunk, ctx):
    return {"items": chunk.size}


def plain(client, n: int) -> float:
    from distributed import as_completed

    t0 = time.perf_counter()
    futures = client.map(noop, range(n), pure=False)
    done = 0
    for batch in as_completed(futures, with_results=True).batches():
        done += sum(r["items"] for _f, r in batch)
    wall = time.perf_counter() - t0
    assert done == n, done
    del futures
    return wall


def hpcbatch_run(client, n: int, tag: str) -> float:
    from hpcbatch.runner import make_chunks, run

    t0 = time.perf_counter()
    report = run(make_chunks(n, 1), noop_chunk, client, run_id=f"overhead-{tag}", progress=False)
    wall = time.perf_counter() - t0
    assert report.items_done == n and report.results_meta["items"] == n, report
    return wall


def _profile(client, n: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    hpcbatch_run(client, n, "profile")
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
    return text.getvalue()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only, keep the JSON file")
    ap.add_argument("--profile", action="store_true", help="cProfile one runner run (stderr)")
    args = ap.parse_args(argv)

    import dask
    from distributed import Client, LocalCluster

    load_before = os.getloadavg()
    plain_s: list[float] = []
    runner_s: list[float] = []
    with (
        dask.config.set({"distributed.worker.profile.enabled": False}),
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        plain(client, 200)  # warm-up: imports and connections on both paths
        hpcbatch_run(client, 200, "warm-up")
        for k in range(args.repeat):
            plain_s.append(plain(client, args.chunks))
            runner_s.append(hpcbatch_run(client, args.chunks, str(k)))
        if args.profile:
            print(_profile(client, args.chunks), file=sys.stderr)
    load_after = os.getloadavg()
    import distributed

    result = {
        "benchmark": "runner-overhead",
        "chunks": args.chunks,
        "workers": 2,
        "threads_per_worker": 1,
        "plain_client_map_s": [round(t, 3) for t in plain_s],
        "hpcbatch_runner_s": [round(t, 3) for t in runner_s],
        "plain_median_s": round(statistics.median(plain_s), 3),
        "runner_median_s": round(statistics.median(runner_s), 3),
        "ratio": round(statistics.median(runner_s) / statistics.median(plain_s), 3),
        "goal_ratio": 1.5,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "distributed": distributed.__version__,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(result, indent=2))
    if not args.no_write:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
