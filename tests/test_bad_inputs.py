"""The catalogue of bad inputs: every one is refused with one clear line, and nothing is written.

Each case runs the real ``hpcbatch`` command in a fresh process (in a scratch
directory, with its own dask config dir) and checks:

- the exit code (2 for bad input; 1 for failures that are not the user's input);
- stderr is exactly ONE line, ``error: ...``, matching the case's key phrase;
- no traceback anywhere in the output;
- nothing was written: the scratch directory (files, sizes, mtimes) is unchanged,
  and for database cases the row counts of every table are unchanged.

With ``HPCBATCH_BAD_INPUT_TABLE=FILE`` each case appends its real message to FILE
(JSON lines), from which the table in docs/reliability.md is made.
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

Setup = Callable[[Path, dict], None]


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
    inproc: bool = True  # CliRunner on the real main group; False: a fresh process


# ------------------------------------------------------------- file setups ----


def _write(name: str, text: str, mode: int | None = None) -> Setup:
    def setup(work: Path, inputs: dict) -> None:
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if mode is not None:
            path.chmod(mode)

    return setup


def _sqlite(name: str, statements: tuple[str, ...] = ()) -> Setup:
    def setup(work: Path, inputs: dict) -> None:
        con = sqlite3.connect(work / name)
        for statement in statements:
            con.execute(statement)
        con.commit()
        con.close()

    return setup


def _stock_inputs(*, model: str = "model", db: str = "market.db") -> Setup:
    """Copy the prepared market database and model directory into the work dir."""

    def setup(work: Path, inputs: dict) -> None:
        shutil.copy(inputs["market"], work / db)
        shutil.copytree(inputs["model"], work / model)

    return setup


def _then(first: Setup, second: Setup) -> Setup:
    def setup(work: Path, inputs: dict) -> None:
        first(work, inputs)
        second(work, inputs)

    return setup


def _crafted_weights(path: str) -> Setup:
    """A weights file whose unpickling would create ``pwned`` in the work dir."""

    def setup(work: Path, inputs: dict) -> None:
        import torch

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {work / 'pwned'}",))

        torch.save({"w": Payload()}, work / path)

    return setup


def _bytes(name: str, data: bytes) -> Setup:
    def setup(work: Path, inputs: dict) -> None:
        (work / name).write_bytes(data)

    return setup


def _edit_json(name: str, key: str, value) -> Setup:
    def setup(work: Path, inputs: dict) -> None:
        import json

        path = work / name
        data = json.loads(path.read_text())
        data["config"][key] = value
        path.write_text(json.dumps(data))

    return setup


def _pickled_npy(path: str) -> Setup:
    """An object-array ``.npy`` whose unpickling would create ``pwned`` in the work dir."""

    def setup(work: Path, inputs: dict) -> None:
        import numpy as np

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {work / 'pwned'}",))

        np.save(work / path, np.array([Payload(), 1], dtype=object), allow_pickle=True)

    return setup


def _fitted(name: str = "data", *, fit: bool = True) -> Setup:
    def setup(work: Path, inputs: dict) -> None:
        shutil.copytree(inputs["fitted"], work / name)
        if not fit:
            shutil.rmtree(work / name / "fit")

    return setup


PLAN = ("plan", "stocks", "--stocks", "100")
RENDER = ("slurm", "render", "stocks", "--mem", "4G", "--cpus", "2", "--stocks", "100")
PREDICT = ("stocks", "predict", "--db", "sqlite:///market.db", "--model", "model")
SAMPLE = ("predictive", "sample", "data", "--samples", "4", "--out", "s.zarr")
STOCKS = _stock_inputs()
SECRET = "Pa55-w0rd-xyzzy"

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
        "zero-chunk-size", "cli", (*PLAN, "--chunk-size", "0"), r"--chunk-size must be a positive"
    ),
    Case(
        "zero-cells",
        "cli",
        ("plan", "predictive", "--cells", "0", "--features", "10"),
        r"--cells must be a positive",
    ),
    Case("negative-mem", "cli", (*PLAN, "--mem", "-4G"), r"--mem must be positive"),
    Case("memory-unit-12XB", "cli", (*PLAN, "--mem", "12XB"), r"unknown unit 'XB'"),
    Case("mem-zero", "cli", (*PLAN, "--mem", "0"), r"--mem '0' is zero"),
    Case("mem-words", "cli", (*PLAN, "--mem", "64 gigs"), r"--mem '64 gigs' has an unknown unit"),
    Case("mem-not-a-size", "cli", (*PLAN, "--mem", "lots"), r"--mem 'lots' is not a memory size"),
    Case("gpus-not-a-count", "cli", (*PLAN, "--gpus", "two"), r"--gpus 'two' is not a GPU count"),
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
        "mem-above-node",
        "cli",
        ("resources", "--mem", "1000G"),
        r"--mem 1000.00 GiB is more than",
    ),
    Case(
        "gpus-without-gpu", "cli", ("resources", "--gpus", "1"), r"--gpus 1 is more than the 0 GPUs"
    ),
    Case(
        "plan-infeasible",
        "cli",
        (*PLAN, "--mem", "10M", "--cpus", "1"),
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
        inproc=False,
    ),
    Case(
        "env-unknown-backend",
        "config",
        ("config",),
        r"unknown cluster backend 'cloud'",
        env={"DASK_HPCBATCH__CLUSTER__BACKEND": "cloud"},
        inproc=False,
    ),
    Case(
        "env-unknown-key",
        "config",
        ("config",),
        r"unknown setting 'bogus'",
        env={"DASK_HPCBATCH__BOGUS": "1"},
        inproc=False,
    ),
    # --- SLURM options --------------------------------------------------------------
    Case(
        "walltime-format",
        "slurm",
        (*RENDER, "--time", "25:99"),
        r"walltime '25:99' is not a SLURM time limit",
    ),
    Case(
        "walltime-words",
        "slurm",
        (*RENDER, "--time", "two hours"),
        r"walltime 'two hours' is not a SLURM time limit",
    ),
    Case("walltime-zero", "slurm", (*RENDER, "--time", "0"), r"walltime '0' is zero"),
    Case(
        "time-and-walltime",
        "slurm",
        (*RENDER, "--time", "10", "--walltime", "10"),
        r"give --time or --walltime, not both",
    ),
    Case(
        "gres-not-gpu-count",
        "slurm",
        (*RENDER, "--gres", "gpu:a100:x"),
        r"'gpu:a100:x' is not gpu\[:TYPE\]\[:N\]",
    ),
    Case(
        "gpus-and-gres", "slurm", (*RENDER, "--gpus", "1", "--gres", "gpu:1"), r"--gpus or --gres"
    ),
    Case(
        "gpus-driver-config-directives",
        "slurm",
        (*RENDER, "--gpus", "1", "--driver", "--config", "c.yaml"),
        r"--gpus/--gres with --driver, and the --config file sets cluster.job-extra-directives "
        r".*add '--gpus=1' to that list instead",
        setup=_write("c.yaml", "hpcbatch:\n  cluster:\n    job-extra-directives: ['--qos=a']\n"),
    ),
    Case(
        "gpus-shell-chars",
        "slurm",
        (*RENDER, "--gpus", "1;id"),
        r"--gpus '1;id' is not a GPU count",
    ),
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
        "render-without-size", "slurm", ("slurm", "render", "stocks"), r"--mem and --cpus needed"
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
        "render-zero-chunk-size",
        "slurm",
        (*RENDER, "--chunk-size", "0"),
        r"--chunk-size must be a positive",
    ),
    Case(
        "render-zero-samples",
        "slurm",
        (
            "slurm",
            "render",
            "predictive",
            "--mem",
            "4G",
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
        ("slurm", "render", "stocks", "--mem", "4G", "--cpus", "0"),
        r"--cpus must be positive",
    ),
    # --- database -------------------------------------------------------------------
    Case(
        "db-file-missing",
        "database",
        ("stocks", "predict", "--db", "sqlite:///nope.db", "--model", "model"),
        r"SQLite database nope.db does not exist",
        setup=STOCKS,
    ),
    Case(
        "db-missing-tables",
        "database",
        ("stocks", "predict", "--db", "sqlite:///empty.db", "--model", "model"),
        r"table stock_daily is missing",
        setup=_then(STOCKS, _sqlite("empty.db", ("CREATE TABLE other (x INTEGER)",))),
    ),
    Case(
        "db-unreachable",
        "database",
        (
            "stocks",
            "predict",
            "--db",
            f"postgresql+psycopg://alice:{SECRET}@127.0.0.1:1/market",
            "--model",
            "model",
        ),
        r"cannot connect to database postgresql\+psycopg://alice:\*\*\*@",
        setup=STOCKS,
    ),
    Case(
        "db-unsupported",
        "database",
        ("stocks", "predict", "--db", "mysql://a@b/c", "--model", "model"),
        r"unsupported database",
        setup=STOCKS,
    ),
    Case(
        "db-not-a-url",
        "database",
        ("stocks", "predict", "--db", "not a url", "--model", "model"),
        r"cannot parse the database URL",
        setup=STOCKS,
    ),
    Case(
        "db-unknown-role",
        "database",
        ("stocks", "predict", "--db", "{pg_nosuchuser}", "--model", "model"),
        r"cannot connect to database",
        setup=STOCKS,
        needs="postgres",
    ),
    Case(
        "db-missing-database",
        "database",
        ("stocks", "predict", "--db", "{pg_nosuchdb}", "--model", "model"),
        r"cannot connect to database",
        setup=STOCKS,
        needs="postgres",
    ),
    Case(
        "db-outage-timeout-zero",
        "config",
        (*PREDICT, "--config", "c.yaml"),
        r"database-outage-timeout must be a positive number of seconds, got 0",
        setup=_then(STOCKS, _write("c.yaml", "hpcbatch:\n  database-outage-timeout: 0\n")),
    ),
    Case(
        "generate-over-existing",
        "database",
        ("stocks", "generate", "--db", "sqlite:///market.db", "--stocks", "5", "--days", "100"),
        r"already holds \d+ rows",
        setup=STOCKS,
    ),
    Case(
        "offset-past-end",
        "cli",
        (*PREDICT, "--offset", "1000"),
        r"--offset 1000 is past the end",
        setup=STOCKS,
    ),
    Case(
        "use-gpu-without-gpu",
        "cli",
        (*PREDICT, "--use-gpu"),
        r"--use-gpu was given but no CUDA device",
        setup=STOCKS,
    ),
    Case(
        "concurrency-zero",
        "cli",
        (*PREDICT, "--concurrency", "0"),
        r"--concurrency must be a positive",
        setup=STOCKS,
    ),
    Case(
        "lookback-too-short",
        "cli",
        (*PREDICT, "--lookback-days", "50"),
        r"--lookback-days 50 .*too short",
        setup=STOCKS,
    ),
    Case(
        "cluster-unknown",
        "cli",
        (*PREDICT, "--cluster", "cloud"),
        r"--cluster 'cloud'",
        setup=STOCKS,
    ),
    Case(
        "predict-mem-above-node",
        "cli",
        (*PREDICT, "--mem", "1000G"),
        r"--mem 1000.00 GiB is more than",
        setup=STOCKS,
    ),
    Case(
        "password-file-world-readable",
        "database",
        ("stocks", "init-db"),
        r"password file .*pw is readable by others \(mode 0644\): run 'chmod 600",
        env={
            "HPCBATCH_DB_URL": "postgresql+psycopg://alice@127.0.0.1:1/market",
            "HPCBATCH_DB_PASSWORD_FILE": "{work}/pw",
        },
        setup=_write("pw", SECRET + "\n", mode=0o644),
        inproc=False,
    ),
    Case(
        "password-file-missing",
        "database",
        ("stocks", "init-db"),
        r"password file .*nope does not exist",
        env={
            "HPCBATCH_DB_URL": "postgresql+psycopg://alice@127.0.0.1:1/market",
            "HPCBATCH_DB_PASSWORD_FILE": "{work}/nope",
        },
        inproc=False,
    ),
    # --- model files -----------------------------------------------------------------
    Case(
        "model-dir-missing",
        "model",
        ("stocks", "predict", "--db", "sqlite:///market.db", "--model", "nosuch"),
        r"model directory nosuch does not exist",
        setup=STOCKS,
    ),
    Case(
        "model-is-a-file",
        "model",
        ("stocks", "predict", "--db", "sqlite:///market.db", "--model", "notamodel.txt"),
        r"notamodel.txt is a file, not a model directory",
        setup=_then(STOCKS, _write("notamodel.txt", "not a model\n")),
    ),
    Case(
        "model-config-corrupt",
        "model",
        PREDICT,
        r"config.json is not a valid model config",
        setup=_then(STOCKS, _bytes("model/config.json", b"{not json")),
    ),
    Case(
        "model-weights-corrupt",
        "model",
        PREDICT,
        r"weights.pt is corrupt or not a torch file",
        setup=_then(STOCKS, _bytes("model/weights.pt", b"\x00garbage" * 100)),
    ),
    Case(
        "model-crafted-pickle",
        "model",
        PREDICT,
        r"weights_only",
        setup=_then(STOCKS, _crafted_weights("model/weights.pt")),
    ),
    Case(
        "model-wrong-architecture",
        "model",
        PREDICT,
        r"do not fit the architecture",
        setup=_then(STOCKS, _edit_json("model/config.json", "d_model", 24)),
    ),
    Case(
        "guide-crafted-pickle",
        "model",
        SAMPLE,
        r"fitted guide .*guide.pt holds more than tensors",
        setup=_then(_fitted(), _crafted_weights("data/fit/guide.pt")),
    ),
    Case("guide-missing", "model", SAMPLE, r"has no fitted guide", setup=_fitted(fit=False)),
    Case(
        "data-pickled-object-array",
        "model",
        SAMPLE,
        r"group.npy is not a plain numeric .npy array \(it holds Python objects",
        setup=_then(_fitted(), _pickled_npy("data/group.npy")),
    ),
    Case(
        "data-dir-missing",
        "model",
        ("predictive", "sample", "nosuch", "--samples", "4", "--out", "s.zarr"),
        r"nosuch is not a predictive data directory",
    ),
    # --- Pyro / sampling arguments --------------------------------------------------
    Case(
        "samples-zero",
        "pyro",
        (*SAMPLE, "--samples", "0"),
        r"--samples must be a positive",
        setup=_fitted(),
    ),
    Case(
        "samples-negative",
        "pyro",
        (*SAMPLE, "--samples", "-3"),
        r"--samples must be a positive",
        setup=_fitted(),
    ),
    Case(
        "out-exists",
        "pyro",
        SAMPLE,
        r"output s.zarr already exists",
        setup=_then(_fitted(), _write("s.zarr/keep", "mine\n")),
    ),
    Case(
        "chunk-size-zero",
        "pyro",
        (*SAMPLE, "--chunk-size", "0"),
        r"--chunk-size must be at least 1",
        setup=_fitted(),
    ),
    Case(
        "chunk-size-word",
        "pyro",
        (*SAMPLE, "--chunk-size", "lots"),
        r"--chunk-size must be 'auto' or a whole number",
        setup=_fitted(),
    ),
    Case(
        "sample-mem-12XB", "pyro", (*SAMPLE, "--mem", "12XB"), r"unknown unit 'XB'", setup=_fitted()
    ),
    Case(
        "address-missing",
        "pyro",
        (*SAMPLE, "--cluster", "address"),
        r"backend 'address' needs a scheduler",
        setup=_fitted(),
    ),
    Case(
        "sample-cluster-unknown",
        "pyro",
        (*SAMPLE, "--cluster", "cloud"),
        r"--cluster 'cloud': use local, slurm",
        setup=_fitted(),
    ),
    Case(  # refused: fails in ~3 s, not after the 120 s start timeout (test_fail_fast.py)
        "address-refused",
        "pyro",
        (*SAMPLE, "--cluster", "tcp://127.0.0.1:1"),
        r"tcp://127.0.0.1:1: nothing listens there \(connection refused\)",
        code=1,
        setup=_fitted(),
    ),
    Case(
        "predict-cluster-refused",
        "cli",
        (*PREDICT, "--cluster", "tcp://127.0.0.1:1"),
        r"tcp://127.0.0.1:1: nothing listens there \(connection refused\)",
        code=1,
        setup=STOCKS,
    ),
    Case(
        "simulate-cells-zero",
        "pyro",
        ("predictive", "simulate", "--cells", "0", "--out", "d2"),
        r"--cells must be a positive",
    ),
    Case(
        "fit-steps-zero",
        "pyro",
        ("predictive", "fit", "data", "--steps", "0"),
        r"--steps must be at least 1",
        setup=_fitted(),
    ),
]


# ------------------------------------------------------------------ harness ----

_SIDE_FILES = ("-wal", "-shm", "-journal")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and directory under ``root`` (size, mtime); SQLite files by content."""
    state: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.startswith(".dask-config") or rel.endswith(_SIDE_FILES) or "__pycache__" in rel:
            continue
        if p.suffix == ".db":
            state[rel] = ("db", sqlite_state(p))
        elif p.is_file():
            state[rel] = (p.stat().st_size, p.stat().st_mtime_ns)
        else:
            state[rel] = ("dir",)
    return state


def sqlite_state(db: Path) -> dict[str, int]:
    """Tables of a SQLite file and their row counts."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {
            t: con.execute('SELECT count(*) FROM "' + t.replace('"', '""') + '"').fetchone()[0]
            for t in tables
        }
    finally:
        con.close()


def _argv(case: Case, subst: dict) -> list[str]:
    out = []
    for arg in case.argv:
        for key, value in subst.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out


def run_in_process(argv: list[str], work: Path) -> tuple[int, str, str, BaseException | None]:
    from click.testing import CliRunner

    from hpcbatch.cli import main

    old = Path.cwd()
    os.chdir(work)
    try:
        result = CliRunner().invoke(main, argv, catch_exceptions=True)
    finally:
        os.chdir(old)
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.stdout, result.stderr, exc


def run_in_subprocess(case: Case, argv: list[str], work: Path) -> tuple[int, str, str, None]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "HPCBATCH_", "SLURM_"))
    }
    env.update({"DASK_CONFIG": str(work / ".dask-config"), "PYTHONWARNINGS": "ignore"})
    env.update({k: v.replace("{work}", str(work)) for k, v in case.env.items()})
    result = subprocess.run(
        [HPCBATCH, *argv], cwd=work, env=env, capture_output=True, text=True, timeout=180
    )
    return result.returncode, result.stdout, result.stderr, None


def check(case: Case, work: Path, inputs: dict | None = None, subst: dict | None = None) -> str:
    """Run the case and assert the contract; return the one-line message."""
    (work / ".dask-config").mkdir(exist_ok=True)
    if case.setup:
        case.setup(work, inputs or {})
    before = snapshot(work)
    argv = _argv(case, {"work": str(work), **(subst or {})})
    if case.inproc:
        code, out, err, exc = run_in_process(argv, work)
    else:
        code, out, err, exc = run_in_subprocess(case, argv, work)
    lines = err.strip().splitlines()
    shown = f"exit {code}\nstdout:\n{out}\nstderr:\n{err}\nexception: {exc!r}"
    assert exc is None, shown  # an exception escaping the CLI = a traceback for the user
    assert "Traceback" not in err + out, shown
    assert code == case.code, shown
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert re.search(case.phrase, lines[0]), f"{case.phrase!r} not in {lines[0]!r}"
    assert SECRET not in err + out, "a password was printed"
    assert snapshot(work) == before, "files or database rows were written or changed:\n" + shown
    return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Valid inputs to break one at a time: a market database, a model, a fitted data dir."""
    import numpy as np
    import torch

    from hpcbatch.predictive.technical import fit, simulate
    from hpcbatch.stocks.generate import generate_market
    from hpcbatch.stocks.model import SIZES, StockModel, save_model
    from hpcbatch.stocks.schema import make_engine

    base = tmp_path_factory.mktemp("bad-input-sources")
    engine = make_engine(f"sqlite:///{base / 'market.db'}", create=True)
    generate_market(engine, 6, 150, seed=0)
    engine.dispose()
    torch.manual_seed(0)
    config = SIZES["tiny"]
    zeros, ones = np.zeros(config.n_features, "f4"), np.ones(config.n_features, "f4")
    save_model(StockModel(config), base / "model", zeros, ones, {})
    simulate(30, 5, 2, seed=0, out=base / "fitted")
    fit(base / "fitted", steps=5, seed=0)
    return {"market": base / "market.db", "model": base / "model", "fitted": base / "fitted"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_one_line_and_nothing_written(
    case: Case, tmp_path: Path, request: pytest.FixtureRequest, inputs: dict
) -> None:
    subst = {}
    if case.needs == "postgres":
        from sqlalchemy.engine import make_url

        url = make_url(request.getfixturevalue("postgres_url"))
        subst["pg_nosuchuser"] = url.set(username="nosuchuser").render_as_string(False)
        subst["pg_nosuchdb"] = url.set(database="nosuchdb").render_as_string(False)
    work = tmp_path / "work"
    work.mkdir()
    message = check(case, work, inputs, subst)
    assert not (work / "pwned").exists()
    table = os.environ.get("HPCBATCH_BAD_INPUT_TABLE")
    if table:  # collect the real messages for docs/reliability.md
        import json

        row = {"id": case.id, "area": case.area, "argv": list(case.argv), "env": case.env}
        row.update({"message": message, "code": case.code})
        with open(table, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def test_the_catalogue_is_big_enough_and_ids_are_unique() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


def test_the_nothing_written_check_sees_new_files_and_rows(tmp_path: Path) -> None:
    _sqlite("x.db", ("CREATE TABLE t (a INTEGER)",))(tmp_path, {})
    before = snapshot(tmp_path)
    con = sqlite3.connect(tmp_path / "x.db")
    con.execute("INSERT INTO t VALUES (1)")
    con.commit()
    con.close()
    assert snapshot(tmp_path) != before
    before = snapshot(tmp_path)
    (tmp_path / "out.zarr").mkdir()
    assert snapshot(tmp_path) != before
