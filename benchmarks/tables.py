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


if __name__ == "__main__":
    print(runner_overhead_table())
