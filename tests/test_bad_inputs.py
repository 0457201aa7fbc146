"""The catalogue of bad inputs: every one is refused with one clear line, and nothing is written.

Each case runs the real ``hpcbatch`` command in a fresh process (in a scratch
directory, with its own dask config dir) and checks:

- the exit code (2 for bad input; 1 for failures that are not the user's input);
- stderr is exactly ONE line, ``error: ...``, matching the case's key phrase;
- no traceback anywhere in the output;
- nothing was written: the scratch directory (files, sizes, mtimes) is unchanged,
  and for database cases the row counts of every table are unchanged.

``python tests/test_bad_inputs.py`` prints the catalogue as a markdown table (the
real messages) for docs/reliability.md.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HPCBATCH = str(Path(sys.executable).with_name("hpcbatch"))
if not Path(HPCBATCH).exists():  # pragma: no cover - run from a source tree without the script
    HPCBATCH = shutil.which("hpcbatch") or "hpcbatch"

Setup = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    id: str
    area: str  # cli | config | slurm | database | model | pyro
    argv: tuple[str, ...]
    phrase: str  # a regular expression the one-line message must match
    code: int = 2
    env: dict = field(default_factory=dict)
    setup: Setup | None = None
    needs: str | None = None  # a fixture the case needs ("slurm", "postgres")


# ------------------------------------------------------------- file setups ----


def _write(name: str, text: str, mode: int | None = None) -> Setup:
    def setup(work: Path) -> None:
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if mode is not None:
            path.chmod(mode)

    return setup


def _sqlite(name: str, statements: tuple[str, ...] = ()) -> Setup:
    def setup(work: Path) -> None:
        con = sqlite3.connect(work / name)
        for statement in statements:
            con.execute(statement)
        con.commit()
        con.close()

    return setup


PLAN = ("plan", "stocks", "--stocks", "100")
RENDER = ("slurm", "render", "stocks", "--mem-gb", "4", "--cpus", "2", "--stocks", "100")

CASES: list[Case] = [
    # --- command line ------------------------------------------------------------
    Case("unknown-command", "cli", ("frobnicate",), r"No such command 'frobnicate'"),
    Case("unknown-option", "cli", (*PLAN, "--frob"), r"No such option '--frob'"),
    Case("missing-required", "cli", ("plan", "predictive", "--features", "3"), r"--cells"),
    Case(
        "not-an-integer",
        "cli",
        ("plan", "stocks", "--stocks", "many"),
        r"'many' is not a valid integer",
    ),
    Case(
        "negative-stocks",
        "cli",
        ("plan", "stocks", "--stocks", "-5"),
        r"--stocks must be a positive",
    ),
    Case(
        "zero-lookback",
        "cli",
        (*PLAN, "--lookback-days", "0"),
        r"--lookback-days must be a positive",
    ),
    Case(
        "zero-predict-days",
        "cli",
        (*PLAN, "--predict-days", "0"),
        r"--predict-days must be a positive",
    ),
    Case(
        "zero-batch-size", "cli", (*PLAN, "--batch-size", "0"), r"--batch-size must be a positive"
    ),
    Case(
        "zero-cells",
        "cli",
        ("plan", "predictive", "--cells", "0", "--features", "10"),
        r"--cells must be a positive",
    ),
    Case("negative-mem-gb", "cli", (*PLAN, "--mem-gb", "-4"), r"--mem-gb must be positive"),
    Case("memory-unit-12XB", "cli", (*PLAN, "--mem", "12XB"), r"unknown unit 'XB'"),
    Case(
        "mem-and-mem-gb",
        "cli",
        (*PLAN, "--mem", "12GB", "--mem-gb", "12"),
        r"--mem or --mem-gb, not both",
    ),
    Case(
        "fraction-above-1",
        "cli",
        (*PLAN, "--memory-fraction", "1.5"),
        r"memory-fraction must be between 0 and 1",
    ),
    Case(
        "fraction-zero",
        "cli",
        (*PLAN, "--memory-fraction", "0"),
        r"memory-fraction must be between 0 and 1",
    ),
    Case(
        "probe-sizes",
        "cli",
        (*PLAN, "--calibrate", "--probe-sizes", "4"),
        r"--probe-sizes '4' must be two",
    ),
    Case(
        "mem-gb-above-node",
        "cli",
        ("resources", "--mem-gb", "100000"),
        r"--mem-gb 100000 GB is more than",
    ),
    Case(
        "gpus-without-gpu", "cli", ("resources", "--gpus", "1"), r"--gpus 1 is more than the 0 GPUs"
    ),
    Case(
        "plan-infeasible",
        "cli",
        (*PLAN, "--mem-gb", "0.01", "--cpus", "1"),
        r"needs at least .* request --mem=",
    ),
    # --- config ---------------------------------------------------------------------
    Case("unknown-profile", "config", (*PLAN, "--profile", "nosuch"), r"unknown profile 'nosuch'"),
    Case(
        "config-missing",
        "config",
        (*PLAN, "--config", "nope.yaml"),
        r"config file nope.yaml does not exist",
    ),
    Case(
        "config-invalid-yaml",
        "config",
        (*PLAN, "--config", "bad.yaml"),
        r"not valid YAML at line",
        setup=_write("bad.yaml", "hpcbatch:\n  seed: [1, 2\n  retries: 3\n"),
    ),
    Case(
        "config-unknown-key",
        "config",
        (*PLAN, "--config", "c.yaml"),
        r"unknown setting 'memory-fractoin'",
        setup=_write("c.yaml", "hpcbatch:\n  memory-fractoin: 0.5\n"),
    ),
    Case(
        "config-unknown-nested-key",
        "config",
        (*PLAN, "--config", "c.yaml"),
        r"unknown setting 'cluster.walltme'",
        setup=_write("c.yaml", "hpcbatch:\n  cluster:\n    walltme: '01:00:00'\n"),
    ),
    Case(
        "config-wrong-top-level",
        "config",
        (*PLAN, "--config", "c.yaml"),
        r"one top-level key 'hpcbatch'",
        setup=_write("c.yaml", "memory-fraction: 0.5\n"),
    ),
    Case(
        "config-not-a-number",
        "config",
        (*PLAN, "--config", "c.yaml"),
        r"threads-per-worker must be a whole number",
        setup=_write("c.yaml", "hpcbatch:\n  threads-per-worker: two\n"),
    ),
    Case(
        "config-bad-reserve",
        "config",
        (*PLAN, "--config", "c.yaml"),
        r"reserve.*unit",
        setup=_write("c.yaml", "hpcbatch:\n  reserve: 12XB\n"),
    ),
    Case(
        "env-fraction-not-number",
        "config",
        ("config",),
        r"memory-fraction must be a number",
        env={"DASK_HPCBATCH__MEMORY_FRACTION": "abc"},
    ),
    Case(
        "env-unknown-backend",
        "config",
        ("config",),
        r"unknown cluster backend 'cloud'",
        env={"DASK_HPCBATCH__CLUSTER__BACKEND": "cloud"},
    ),
    Case(
        "env-unknown-key",
        "config",
        ("config",),
        r"unknown setting 'bogus'",
        env={"DASK_HPCBATCH__BOGUS": "1"},
    ),
    # --- SLURM options --------------------------------------------------------------
    Case(
        "walltime-format",
        "slurm",
        (*RENDER, "--walltime", "25:99"),
        r"walltime '25:99' is not a SLURM time limit",
    ),
    Case(
        "walltime-words",
        "slurm",
        (*RENDER, "--walltime", "two hours"),
        r"walltime 'two hours' is not a SLURM time limit",
    ),
    Case("walltime-zero", "slurm", (*RENDER, "--walltime", "0"), r"walltime '0' is zero"),
    Case(
        "partition-shell-chars",
        "slurm",
        (*RENDER, "--partition", "debug;rm -rf ~"),
        r"partition .* has characters",
    ),
    Case(
        "directive-not-option",
        "slurm",
        (*RENDER, "--directive", "qos=short"),
        r"directive 'qos=short' is not an option",
    ),
    Case(
        "render-without-size", "slurm", ("slurm", "render", "stocks"), r"--mem-gb and --cpus needed"
    ),
    Case(
        "render-unknown-workload",
        "slurm",
        ("slurm", "render", "weather"),
        r"No such command 'weather'",
    ),
    Case(
        "render-output-dir-missing",
        "slurm",
        (*RENDER, "-o", "no/such/dir/job.sbatch"),
        r"no/such/dir",
    ),
    Case(
        "render-zero-batch-size",
        "slurm",
        (*RENDER, "--batch-size", "0"),
        r"--batch-size must be a positive",
    ),
    Case(
        "render-zero-samples",
        "slurm",
        (
            "slurm",
            "render",
            "predictive",
            "--mem-gb",
            "4",
            "--cpus",
            "2",
            "--cells",
            "10",
            "--features",
            "5",
            "--samples",
            "0",
        ),
        r"--samples must be a positive",
    ),
    Case(
        "render-cpus-zero",
        "slurm",
        ("slurm", "render", "stocks", "--mem-gb", "4", "--cpus", "0"),
        r"--cpus must be positive",
    ),
]


# ------------------------------------------------------------------ harness ----


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime_ns)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_dir()
    }


def sqlite_counts(root: Path) -> dict[str, dict[str, int]]:
    """Row counts of every table of every SQLite file under ``root``."""
    counts = {}
    for db in sorted(root.rglob("*.db")):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = [
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            counts[db.name] = {
                t: con.execute('SELECT count(*) FROM "' + t.replace('"', '""') + '"').fetchone()[0]
                for t in tables
            }
        finally:
            con.close()
    return counts


def run_case(case: Case, work: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "HPCBATCH_", "SLURM_"))
    }
    env.update({"DASK_CONFIG": str(work / ".dask-config"), "PYTHONWARNINGS": "ignore"})
    env.update(extra_env or {})
    env.update({k: v.replace("{work}", str(work)) for k, v in case.env.items()})
    argv = [a.replace("{work}", str(work)) for a in case.argv]
    return subprocess.run(
        [HPCBATCH, *argv], cwd=work, env=env, capture_output=True, text=True, timeout=180
    )


def check(case: Case, work: Path, extra_env: dict | None = None) -> str:
    """Run the case and assert the contract; return the one-line message."""
    (work / ".dask-config").mkdir(exist_ok=True)
    if case.setup:
        case.setup(work)
    before, rows_before = snapshot(work), sqlite_counts(work)
    result = run_case(case, work, extra_env)
    lines = result.stderr.strip().splitlines()
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, shown
    assert result.returncode == case.code, shown
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert re.search(case.phrase, lines[0]), f"{case.phrase!r} not in {lines[0]!r}"
    assert snapshot(work) == before, "files were written or changed:\n" + shown
    assert sqlite_counts(work) == rows_before, "database rows changed"
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_one_line_and_nothing_written(
    case: Case, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    extra_env = {}
    if case.needs == "slurm":
        slurm = request.getfixturevalue("slurm_cluster_env")
        extra_env["SLURM_CONF"] = slurm["SLURM_CONF"]
    if case.needs == "postgres":
        extra_env["HPCBATCH_TEST_PG"] = request.getfixturevalue("postgres_url")
    work = tmp_path / "work"
    work.mkdir()
    check(case, work, extra_env)


def test_the_catalogue_is_big_enough_and_ids_are_unique() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


def markdown_table() -> str:  # pragma: no cover - documentation helper
    import tempfile

    rows = [
        "| # | area | input | message (real) | exit | nothing written |",
        "|---|---|---|---|---|---|",
    ]
    for i, case in enumerate(CASES, 1):
        if case.needs:
            message, code = "(needs the " + case.needs + " fixture: see the test)", case.code
        else:
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                result_line = check(case, work)
                message, code = result_line, case.code
        argv = " ".join(case.argv)
        env = " ".join(f"{k}={v}" for k, v in case.env.items())
        shown = (env + " " if env else "") + "hpcbatch " + argv
        written = "files + SQLite row counts unchanged"
        rows.append(
            f"| {i} | {case.area} | `{shown}` | {message.replace('|', '/')} | {code} | {written} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table())
