"""Settings: defaults in dask.config, env variables, profiles, config files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask.config
import pytest

from hpcbatch import config as hb_config
from hpcbatch.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(args: list[str], env: dict | None = None, cwd: Path | None = None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=120)


def test_defaults_are_registered_with_dask():
    assert dask.config.get("hpcbatch.memory-fraction") == 0.6
    assert dask.config.get("hpcbatch.thresholds.terminate") == 0.95
    settings = hb_config.load()
    assert settings["memory-fraction"] == 0.6
    assert settings["stocks"]["lookback-days"] == 400


def test_env_variable_sets_memory_fraction_in_a_fresh_process():
    code = "import hpcbatch.config as c; print(c.load()['memory-fraction'])"
    done = run([sys.executable, "-c", code], env={"DASK_HPCBATCH__MEMORY_FRACTION": "0.5"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0.5"
    plan = run(
        [str(BIN / "hpcbatch"), "plan", "stocks", "--mem", "12G", "--cpus", "4", "--json"],
        env={"DASK_HPCBATCH__MEMORY_FRACTION": "0.5"},
    )
    assert plan.returncode == 0, plan.stderr
    data = json.loads(plan.stdout)
    assert data["memory_fraction"] == 0.5
    assert data["predicted_peak_bytes"] <= 0.5 * data["memory_limit_bytes"]


def test_bad_env_variable_is_a_config_error():
    done = run(
        [str(BIN / "hpcbatch"), "plan", "stocks", "--mem", "12G", "--cpus", "2"],
        env={"DASK_HPCBATCH__MEMORY_FRACTION": "1.5"},
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: memory-fraction must be between 0 and 1")


def test_dask_config_get_shows_the_defaults():
    dask_cli = BIN / "dask"
    if not dask_cli.exists():
        pytest.skip("no dask command next to this Python")
    done = run([str(dask_cli), "config", "get", "hpcbatch"])
    assert done.returncode == 0, done.stderr
    assert "memory-fraction: 0.6" in done.stdout
    assert "terminate: 0.95" in done.stdout


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("stocks-12gb", {"batch-size": 30, "concurrency": 8, "lookback-days": 180}),
        ("stocks-19gb", {"batch-size": 100, "concurrency": 16, "lookback-days": 400}),
        ("stocks-debug", {"batch-size": 10, "concurrency": 2, "lookback-days": 130, "limit": 50}),
    ],
)
def test_stock_profiles_have_the_reference_values(name, expected):
    stocks = hb_config.load(profile=name)["stocks"]
    assert {k: stocks[k] for k in expected} == expected


def test_predictive_profile_and_profile_list():
    settings = hb_config.load(profile="predictive")
    assert settings["threads-per-worker"] == 1
    assert settings["predictive"]["with-observations"] is False
    assert hb_config.profiles() == ["predictive", "stocks-12gb", "stocks-19gb", "stocks-debug"]


def test_configs_dir_is_the_packaged_profiles():
    for name in hb_config.profiles():
        top = REPO / "configs" / f"{name}.yaml"
        assert top.exists(), f"configs/{name}.yaml missing"
        assert top.resolve() == (hb_config.PROFILE_DIR / f"{name}.yaml").resolve()


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(
        ConfigError, match="unknown profile 'stocks-99gb': choose one of predictive"
    ):
        hb_config.load(profile="stocks-99gb")


def test_precedence_defaults_profile_file_flags(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("hpcbatch:\n  memory-fraction: 0.55\n  stocks:\n    concurrency: 3\n")
    settings = hb_config.load("stocks-12gb", path, {"memory-fraction": None})
    assert settings["memory-fraction"] == 0.55  # file over default; unset flag ignored
    assert settings["stocks"]["concurrency"] == 3  # file over profile
    assert settings["stocks"]["batch-size"] == 30  # profile over default
    assert settings["stocks"]["predict-days"] == 10  # default kept
    settings = hb_config.load("stocks-12gb", path, {"memory-fraction": 0.4})
    assert settings["memory-fraction"] == 0.4  # flag over everything


def test_underscores_are_accepted_as_dashes(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_text("hpcbatch:\n  memory_fraction: 0.5\n  stocks:\n    batch_size: 7\n")
    settings = hb_config.load(config_file=path)
    assert settings["memory-fraction"] == 0.5 and settings["stocks"]["batch-size"] == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hpcbatch:\n  memory-fraction: [0.5\n", "is not valid YAML at line"),
        ("hpcbatch:\n  stocks:\n    batchsize: 30\n", "unknown setting 'stocks.batchsize'"),
        ("hpcbatch:\n  memry-fraction: 0.5\n", "unknown setting 'memry-fraction'"),
        ("hpcbatch:\n  thresholds:\n    targte: 0.5\n", "unknown setting 'thresholds.targte'"),
        ("stocks:\n  batch-size: 30\n", "must have one top-level key 'hpcbatch', found 'stocks'"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("hpcbatch:\n  memory-fraction: 1.2\n", "memory-fraction must be between 0 and 1"),
        ("hpcbatch:\n  memory-fraction: lots\n", "memory-fraction must be a number"),
        ("hpcbatch:\n  cluster:\n    backend: kubernetes\n", "unknown cluster backend"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        hb_config.load(config_file=path)
    assert "\n" not in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        hb_config.load(config_file="/nonexistent/hpcbatch.yaml")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("threads-per-worker", "two", "threads-per-worker must be a whole number"),
        ("min-chunk", 1.5, "min-chunk must be a whole number"),
        ("reserve", "12XB", "unknown unit"),
        ("max-workers", 0, "max-workers must be at least 1"),
    ],
)
def test_plan_settings_reject_bad_values(key, value, message):
    settings = hb_config.load()
    settings[key] = value
    with pytest.raises(ConfigError, match=message):
        hb_config.plan_settings(settings)


def test_non_editable_install_finds_profiles(tmp_path):
    """A wheel (not the source tree) carries the defaults and the profiles."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    src = tmp_path / "src"
    shutil.copytree(
        REPO / "hpcbatch", src / "hpcbatch", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    wheel = run(
        [
            *pip,
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "w"),
            str(src),
        ]
    )
    assert wheel.returncode == 0, wheel.stderr
    (whl,) = (tmp_path / "w").glob("hpcbatch-*.whl")
    site = tmp_path / "site"
    inst = run([*pip, "install", "-q", "--no-deps", "--target", str(site), str(whl)])
    assert inst.returncode == 0, inst.stderr
    code = (
        "import hpcbatch, hpcbatch.config as c; print(hpcbatch.__file__); "
        "print(c.load(profile='stocks-debug')['stocks']['limit'])"
    )
    done = run([sys.executable, "-c", code], env={"PYTHONPATH": str(site)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    where, limit = done.stdout.split()
    assert where.startswith(str(site)) and limit == "50"


def test_ci_runs_readmes_test_command():
    """.ci/run installs and tests exactly as README.md tells a new user to."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_command = (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    )
    assert test_command in readme
    assert (
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/hpcbatch stocks demo"
        in readme
    )
    for part in (
        "python3 -m venv .venv",
        ".venv/bin/pip install -e '.[test]'",
        ".venv/bin/python -m pytest",
    ):
        assert part in ci
    assert os.access(REPO / ".ci" / "run", os.X_OK)


def test_plan_settings_carry_the_configured_values():
    settings = hb_config.load(overrides={"max-threads-per-worker": 3, "min-chunk": 2})
    plan = hb_config.plan_settings(settings, chunk_size=5)
    assert (plan.max_threads_per_worker, plan.min_chunk, plan.chunk_size) == (3, 2, 5)
    assert plan.memory_fraction == 0.6 and plan.reserve_bytes == 256 * 2**20
