"""README tables generated from the committed benchmark JSON.

``python benchmarks/tables.py`` prints them; ``tests/test_readme.py`` checks README.md
holds exactly these lines, so a rerun benchmark (new JSON) must also refresh README.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def runner_overhead_table(path: Path = HERE / "results-runner-overhead.json") -> str:
    r = json.loads(path.read_text())
    runs = ", ".join(f"{x:.1f}" for x in r["hpcbatch_runner_s"])
    plain = ", ".join(f"{x:.1f}" for x in r["plain_client_map_s"])
    load = f"{r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}"
    return "\n".join([
        "| contender (same LocalCluster, 2 workers x 1 thread) | wall time, median of 3 | runs | ratio |",
        "|---|---|---|---|",
        f"| plain `client.map` + `as_completed`, {r['chunks']:,} no-op tasks | {r['plain_median_s']:.1f} s | {plain} | 1.00 |",
        f"| `hpcbatch.runner.run`, {r['chunks']:,} no-op chunks (default options, no ledger) | {r['runner_median_s']:.1f} s | {runs} | **{r['ratio']:.2f}x** (goal <= {r['goal_ratio']}x) |",
        "",
        f"Measured {r['when']}, load average (1 min) {load} during the run, distributed {r['distributed']}.",
    ])  # fmt: skip


MiB = 1024**2


def _mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


def stocks_table(paths: tuple[Path, ...] = (HERE / "results-stocks-small.json",
                                            HERE / "results-stocks-full.json")) -> str:
    rows = [
        "| stocks, model (prediction days) | naive windows/s | hpcbatch windows/s | model-only floor windows/s | hpcbatch / naive | hpcbatch / floor | naive peak | hpcbatch per-worker peak (predicted) | hpcbatch total (driver + 2 workers) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for path in paths:
        r = json.loads(path.read_text())
        for stocks, e in r["sizes"].items():
            n, h, f, q = e["naive"], e["hpcbatch"], e["floor"], e["ratios"]
            worker = max(h["worker_peak_rss_bytes"])
            rows.append(
                f"| {int(stocks):,}, {r['model_size']} ({r['predict_days']}) | {n['windows_per_s']:,.0f} "
                f"| {h['windows_per_s']:,.0f} | {f['windows_per_s']:,.0f} "
                f"| **{q['hpcbatch_over_naive_throughput']:.2f}x** | {q['hpcbatch_over_floor_throughput']:.2f}x "
                f"| {_mib(n['peak_rss_bytes'])} | {_mib(worker)} ({_mib(h['planned']['predicted_peak_bytes'])}) "
                f"| {_mib(h['total_peak_rss_bytes'])} |"
            )
        flat = r["flatness"]
        notes.append(
            f"{r['model_size']} model: per-worker peak {flat['largest_over_smallest_size']:.3f}x from "
            f"{min(flat['worker_peak_by_size'], key=int)} to {max(flat['worker_peak_by_size'], key=int)} stocks; "
            f"load average (1 min) {r['load_avg_start'][0]:.2f} -> {r['load_avg_end'][0]:.2f} "
            f"during the set ({r['machine']['cpus']} cores, torch {r['machine']['torch']}, "
            f"distributed {r['machine']['distributed']})"
        )
        if "speed_probe_end" in r:  # the machine's one-thread speed, before and after
            a, b = r["speed_probe_start"], r["speed_probe_end"]
            notes[-1] += (f"; speed probe, one thread: Python loop {a['python_loop_s']:.3f} -> "
                          f"{b['python_loop_s']:.3f} s, matmul {a['matmul_s']:.3f} -> "
                          f"{b['matmul_s']:.3f} s ({r['machine']['cpu_model']})")  # fmt: skip
    return "\n".join(rows + [""] + [f"- {x}." for x in notes])


def stocks_cpu_table(paths: tuple[Path, ...] = (HERE / "results-stocks-small.json",
                                                HERE / "results-stocks-full.json")) -> str:
    """Where hpcbatch's CPU went in the stocks table's rounds, and the most it could reach
    against the floor with that CPU on the machine's cores."""
    rows = [
        "| stocks, model | hpcbatch wall | CPU-s: driver | forkserver (+ tracker) | workers | total | floor wall (CPU-s) | hpcbatch / floor | most it could reach with that CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cores = set()
    for path in paths:
        r = json.loads(path.read_text())
        cores.add(r["machine"].get("cores", r["machine"]["cpus"]))
        for stocks, e in r["sizes"].items():
            h, f, q = e["hpcbatch"], e["floor"], e["ratios"]
            rows.append(
                f"| {int(stocks):,}, {r['model_size']} | {h['wall_s']:.2f} s | {h['cpu_s']:.2f} "
                f"| {h['other_process_cpu_s']:.2f} | {h['worker_cpu_s']:.2f} | {h['total_cpu_s']:.2f} "
                f"| {f['wall_s']:.2f} s ({f['cpu_s']:.2f}) | {q['hpcbatch_over_floor_throughput']:.2f}x "
                f"| {q['hpcbatch_cpu_bound_over_floor']:.2f}x |"
            )
    n = "/".join(str(c) for c in sorted(cores))
    return "\n".join(rows + ["", f"The last column is the floor's wall time over hpcbatch's total CPU seconds / {n} cores: "
                              "hpcbatch's work spread perfectly over every core, with nothing waiting."])  # fmt: skip


def _cell(row: dict | None) -> str:
    if row is None or row.get("status", "").startswith("skipped"):
        return "(= default call)" if row else "-"
    if row["status"] != "ok":
        return row["status"]
    return f"{row['elapsed_s']:.1f} s, {_mib(row['peak_bytes'])}"


def _ratio(name: str, value: float) -> str:
    return f"{name} {_mib(value)}" if name.endswith("_bytes") else f"{name} {value:.2f}"


def predictive_table(path: Path = HERE / "results-predictive.json") -> str:
    r = json.loads(path.read_text())
    names = [("predictive_parallel", "Predictive(parallel=True)"),
             ("original_loop", "original loop (batches of 50)"),
             ("hpcbatch", "`hpcbatch.predictive.sample` (default call)"),
             ("hpcbatch_cluster", "hpcbatch, 2-worker cluster (forkserver)"),
             ("hpcbatch_spawn", "hpcbatch, 2-worker cluster (spawn)"),
             ("floor", "floor (inputs + outputs + raw guide draws)")]  # fmt: skip
    rows = ["| case | " + " | ".join(label for _, label in names) + " |",
            "|---" * (len(names) + 1) + "|"]  # fmt: skip
    notes = []
    for case in r["cases"].values():
        by = {row["contender"]: row for row in case["contenders"]}
        what = "observations" if case["observations"] else "latent sites"
        rows.append(
            f"| {what}, {case['cells']:,} x {case['features']:,}, S = {case['samples']:,} | "
            + " | ".join(_cell(by.get(name)) for name, _ in names) + " |"
        )
        where = (by.get("hpcbatch") or {}).get("execution", "")
        where = "on a 2-worker cluster" if where == "cluster" else where.split(":")[0]
        notes.append(f"{what} {case['cells']:,} x {case['features']:,}: the default call ran "
                     f"{where}; " + "; ".join(
                         f"{k}: " + ", ".join(_ratio(m, v) for m, v in ratios.items())
                         for k, ratios in case["ratios"].items()))  # fmt: skip
        rounds = len((by.get("hpcbatch") or {}).get("rounds_wall_s") or [])
        if rounds > 1:
            walls = ", ".join(f"{x:.2f}" for x in by["hpcbatch"]["rounds_wall_s"] if x)
            peer = ", ".join(f"{x:.2f}" for x in
                             (by.get("predictive_parallel") or {}).get("rounds_wall_s") or [] if x)  # fmt: skip
            notes[-1] += (f"; each contender's median of {rounds} rounds, each in a fresh "
                          f"process (the default call's timed call {walls} s; "
                          f"Predictive(parallel=True)'s {peer} s)")  # fmt: skip
        draw = (case.get("case_draw") or {}).get("per_core_values_per_s")
        if draw:
            notes[-1] += (f"; raw draw rate at this case's own parameters {draw / 1e6:.1f}M "
                          "values/s per core")  # fmt: skip
    raw = r.get("raw_draw") or {}
    load = f"{r['load_avg_start'][0]:.2f} -> {r['load_avg_end'][0]:.2f}"
    return "\n".join(rows + [""] + [f"- {x}." for x in notes] + [
        f"- Raw draw rate (torch NegativeBinomial, one thread): {raw.get('per_core_values_per_s', 0) / 1e6:.1f}M "
        f"values/s per core x {raw.get('cores', 0)} cores; {r['cap_bytes'] / 1e9:.0f} GB cap; "
        f"load average (1 min) {load}; measured {r['started']}."])


def calibration_table(path: Path = HERE / "results-calibration.json") -> str:
    r = json.loads(path.read_text())
    rows = ["| workload | size | plan | predicted per worker | measured per worker | measured / predicted |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for x in r["rows"]:
        size = ", ".join(f"{k} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else
                         (k if v is True else f"no {k}" if v is False else f"{k} {v}")
                         for k, v in x["size"].items())  # fmt: skip
        ratio = x.get("measured_over_predicted")
        mark = "" if x.get("ok") else " (outside)"
        rows.append(
            f"| {x['workload']} | {size} | {x['plan']} | {_mib(x['predicted_peak_per_worker_bytes'])} "
            f"| {_mib(x['measured_peak_per_worker_bytes'])} | {ratio:.2f}{mark} |"
        )
    load = f"{r['load_avg_start'][0]:.2f} -> {r['load_avg_end'][0]:.2f}"
    return "\n".join(rows + ["", f"Goal {r['goal']} (within 20 %, on the safe side); "
                              f"{r['mem_gb']:g} GB and {r['cpus']} CPUs planned, 2 workers; load "
                              f"average (1 min) {load}; measured {r['started']}."])  # fmt: skip


if __name__ == "__main__":
    print(runner_overhead_table())
    print()
    print(stocks_table())
    print()
    print(stocks_cpu_table())
    print()
    print(predictive_table())
    print()
    print(calibration_table())
