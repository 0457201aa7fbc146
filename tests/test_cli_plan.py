"""`hpcbatch resources`, `hpcbatch plan ...` and `hpcbatch config`: output and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcbatch import cli
from hpcbatch.resources import host_cpus
from hpcbatch.workload import get_workload

PLAN_KEYS = {
    "n_workers",
    "threads_per_worker",
    "memory_limit_bytes",
    "chunk_size",
    "predicted_peak_bytes",
    "memory_fraction",
    "footprint_source",
    "reasons",
}
SEED = ["--cells", "21761", "--features", "31467", "--groups", "2", "--samples", "1000"]


def invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def test_plan_stocks_json_has_the_keys():
    result = invoke("plan", "stocks", "--mem", "12G", "--cpus", "4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= PLAN_KEYS
    assert data["footprint_source"].startswith("analytic, constants measured 2026-12-06 on")
    assert data["predicted_peak_bytes"] <= data["memory_fraction"] * data["memory_limit_bytes"]
    assert data["resources"]["memory_bytes"] == 12 * 1024**3  # sbatch's G is GiB
    assert data["n_workers"] * data["memory_limit_bytes"] <= 12 * 1024**3
    assert isinstance(data["reasons"], list) and data["reasons"]


def test_plan_predictive_seed_case_json():
    copied = invoke(
        "plan", "predictive", *SEED, "--mem", "100G", "--cpus", "32", "--copy-input", "--json"
    )
    mmap = invoke("plan", "predictive", *SEED, "--mem", "100G", "--cpus", "32", "--json")
    assert copied.exit_code == 0 and mmap.exit_code == 0, copied.output + mmap.output
    c, m = json.loads(copied.stdout), json.loads(mmap.stdout)
    assert set(c) >= PLAN_KEYS and set(m) >= PLAN_KEYS
    assert c["n_workers"] < 32 and c["binding"] == "memory (per-worker copies)"
    assert m["n_workers"] == 32


def test_plan_plain_output_is_a_table_and_reasons():
    result = invoke("plan", "stocks", "--mem", "19G", "--cpus", "8", "--profile", "stocks-19gb")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.splitlines()[0].startswith("workers")
    assert "chunk size                 100 stocks" in out  # the profile's batch size
    assert "footprint                  analytic, constants measured 2026-12-06 on" in out
    assert "\nwhy:\n  - allocation:" in out


def test_profile_limit_caps_the_stocks():
    result = invoke(
        "plan", "stocks", "--mem", "4G", "--cpus", "2", "--profile", "stocks-debug", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["n_items"] == 50 and data["chunk_size"] == 10


def test_infeasible_plan_says_what_to_request():
    # Every worker needs its own 2.55 GiB copy of the input: 2 GB cannot hold one.
    result = invoke("plan", "predictive", *SEED, "--copy-input", "--mem", "2G", "--cpus", "4")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: predictive needs at least ")
    assert "request --mem=" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "override (--mem)" in result.stderr


def test_infeasible_stocks_plan_suggests_a_mem_that_covers_the_need():
    """Issue 14: 'needs at least 2.1 GB ... request --mem=2G' read as too little. The need
    is also given in GiB, the units of SLURM's --mem=NG, and N GiB covers it."""
    result = invoke("plan", "stocks", "--mem", "1000M", "--chunk-size", "400")
    assert result.exit_code == 2
    message = result.stderr
    need_gb = float(message.split("needs at least ")[1].split(" GB")[0])
    need_gib = float(message.split(" GB (")[1].split(" GiB")[0])
    requested_gib = int(message.split("request --mem=")[1].split("G")[0])
    assert need_gb * 1e9 > 1000 * 2**20 and abs(need_gib * 1024**3 - need_gb * 1e9) < 0.1e9
    assert requested_gib >= need_gib and requested_gib * 1024**3 >= need_gb * 1e9 - 0.1e9
    assert "SLURM's G is GiB" in message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "stocks", "--stocks", "0"], "--stocks must be a positive whole number"),
        (["plan", "stocks", "--stocks", "-5"], "--stocks must be a positive whole number"),
        (["plan", "stocks", "--lookback-days", "-1"], "--lookback-days must be"),
        (["plan", "stocks", "--chunk-size", "0"], "--chunk-size must be"),
        (["plan", "stocks", "--mem", "-12G"], "--mem must be positive"),
        (["plan", "stocks", "--mem", "12XB"], "--mem '12XB' has an unknown unit 'XB'"),
        (["plan", "stocks", "--mem", "lots"], "--mem 'lots' is not a memory size"),
        (["plan", "stocks", "--mem", "0GB"], "--mem '0GB' is zero"),
        (["plan", "stocks", "--mem", "1.5.G"], "--mem '1.5.G' is not a memory size"),
        (["plan", "stocks", "--cpus", "0", "--mem", "4G"], "--cpus must be positive"),
        (["plan", "stocks", "--cpus", "abc"], "Invalid value for '-c' / '--cpus'"),
        (["plan", "stocks", "--memory-fraction", "1.5"], "memory-fraction must be between 0 and 1"),
        (["plan", "stocks", "--memory-fraction", "0"], "memory-fraction must be between 0 and 1"),
        (
            ["plan", "stocks", "--memory-fraction", "-0.2"],
            "memory-fraction must be between 0 and 1",
        ),
        (["plan", "stocks", "--profile", "nope"], "unknown profile 'nope'"),
        (["plan", "predictive", *SEED[:2]], "Missing option '--features'"),
        (["plan", "predictive", *SEED[:-1], "0"], "--samples must be a positive whole number"),
        (["plan", "stocks", "--probe-sizes", "4", "--calibrate"], "--probe-sizes '4' must be two"),
        (["plan", "stocks", "--frobnicate"], "No such option '--frobnicate'"),
        (["resources", "--mem", "12XB"], "unknown unit"),
        (["resources", "--gpus", "-1"], "--gpus '-1' is not a GPU count"),
        (["resources", "--gpus", "99"], "--gpus 99 is more than the"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert message in err
    assert "Traceback" not in result.output


def test_bad_config_file_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hpcbatch:\n  stocks:\n    batchsize: 30\n")
    result = invoke("plan", "stocks", "--config", str(bad))
    assert result.exit_code == 2
    assert "unknown setting 'stocks.batchsize'" in result.stderr
    bad.write_text("hpcbatch: [unclosed\n")
    result = invoke("plan", "stocks", "--config", str(bad))
    assert result.exit_code == 2 and "is not valid YAML" in result.stderr


def test_resources_refuses_more_cpus_than_exist():
    too_many = host_cpus().value + 1
    result = invoke("resources", "--cpus", str(too_many))
    assert result.exit_code == 2
    assert f"--cpus {too_many} is more than" in result.stderr
    # Planning ahead for a bigger node is what `plan` is for.
    result = invoke("plan", "stocks", "--cpus", "64", "--mem", "500G", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["n_workers"] == 64


def test_resources_output():
    result = invoke("resources", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["memory_bytes"] > 0 and data["cpus"] >= 1 and data["memory_source"]
    plain = invoke("resources")
    assert plain.stdout.startswith("memory ") and "memory limit considered" in plain.stdout


def test_config_command_prints_effective_settings():
    result = invoke("config", "--profile", "stocks-12gb")
    assert result.exit_code == 0
    assert "batch-size: 30" in result.stdout and result.stdout.startswith("hpcbatch:")


def test_calibrate_without_a_probe_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(type(get_workload("stocks")), "probe", "hpcbatch_no_such_probe:probe")
    result = invoke("plan", "stocks", "--mem", "12G", "--cpus", "2", "--calibrate")
    assert result.exit_code == 2
    assert "calibration probe hpcbatch_no_such_probe:probe is not available" in result.stderr


def test_calibrate_flag_measures_the_footprint(tmp_path, monkeypatch):
    (tmp_path / "hb_cli_probe.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            _kept = []
            def probe(size, lookback_days, predict_days):
                for _ in range(size):
                    _kept.append(np.ones(2 * 2**20, dtype=np.uint8))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(type(get_workload("stocks")), "probe", "hb_cli_probe:probe")
    result = invoke(
        "plan",
        "stocks",
        "--mem",
        "12G",
        "--cpus",
        "2",
        "--calibrate",
        "--probe-sizes",
        "5,25",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["footprint_source"].startswith("calibrated (probe sizes 5, 25; peak RSS ")
    assert data["footprint"]["per_item_bytes"] == pytest.approx(2 * 2**20, rel=0.15)
    assert [m["size"] for m in data["calibration"]["measurements"]] == [0, 5, 25]


def test_console_script_error_has_no_traceback():
    exe = Path(sys.executable).parent / "hpcbatch"
    done = subprocess.run(
        [str(exe), "plan", "stocks", "--mem", "12XB"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: --mem '12XB'") and "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("args", [[], ["plan"]])
def test_no_command_prints_the_help(args):
    result = invoke(*args)
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: ") and "Commands:" in result.stdout
