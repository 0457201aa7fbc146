"""Flags as sbatch users know them (issue 16, item 6).

- ``--mem`` reads exactly as ``sbatch --mem`` (SLURM's ``str_to_mbytes``): K/M/G/T are
  powers of 1024 and may end in B, a bare number is MiB, K rounds up to a whole MiB;
- one spelling per concept on every command; an old spelling still works, hidden, with
  one ``warning:`` line naming the new one (both at once is an error);
- ``-t/--time`` in sbatch's formats; ``slurm render --gpus/--gres`` into the script and
  the plan;
- docs/slurm.md's table names every flag of every command.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hpcbatch.cli import main
from hpcbatch.errors import ConfigError
from hpcbatch.options import RenamedOption
from hpcbatch.units import format_mem, parse_mem
from hpcbatch.workload import workloads

ROOT = Path(__file__).resolve().parents[1]
MiB, GiB, TiB = 2**20, 2**30, 2**40


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


# ------------------------------------------------------------------ --mem ----


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        # what sbatch --mem accepts, and what it makes of it (MB = MiB)
        ("64G", 64 * 1024),
        ("64g", 64 * 1024),
        ("64GB", 64 * 1024),  # sbatch reads the first letter: 64GB is 64G, not 64e9 bytes
        ("1000", 1000),  # a bare number is MB
        ("1000M", 1000),
        ("1000mb", 1000),
        ("512K", 1),  # K rounds up to a whole MB, as sbatch does
        ("2048K", 2),
        ("2049K", 3),
        ("1T", 1024 * 1024),
        ("1tb", 1024 * 1024),
        # beyond sbatch: the planner's own units, and decimals (rounded up to whole MiB)
        ("2GiB", 2048),
        ("512MiB", 512),
        ("1.5G", 1536),
        ("0.3G", 308),
        (" 8G ", 8192),
    ],
)
def test_mem_parses_as_sbatch_does(text: str, mib: int) -> None:
    assert parse_mem(text) == mib * MiB


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("12XB", "unknown unit 'XB'"),
        ("64GG", "unknown unit 'GG'"),
        ("12P", "unknown unit 'P'"),  # sbatch has no P either
        ("64 gigs", "unknown unit 'gigs'"),
        ("lots", "is not a memory size"),
        ("G", "is not a memory size"),
        ("1.5.G", "is not a memory size"),
        ("0", "is zero"),  # sbatch's 'all the memory of the node' cannot be planned for
        ("0G", "is zero"),
        ("-4G", "must be positive"),
    ],
)
def test_bad_mem_is_one_line_naming_the_units(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        parse_mem(text)
    text_of = str(caught.value)
    assert "\n" not in text_of
    if "unit" in message or "not a memory size" in message:
        assert "powers of 1024, as sbatch --mem" in text_of


@pytest.mark.parametrize("n_bytes", [1, MiB, MiB + 1, 3 * GiB, 12 * 10**9, 2 * TiB, 1536 * MiB])
def test_format_mem_reads_back_as_at_least_the_bytes(n_bytes: int) -> None:
    text = format_mem(n_bytes)
    assert re.fullmatch(r"\d+[MGT]", text)
    assert n_bytes <= parse_mem(text) < n_bytes + MiB


def test_mem_flag_is_sbatch_s_on_plan_and_resources() -> None:
    plan = invoke("plan", "stocks", "--mem", "64G", "--cpus", "8", "--json")
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["resources"]["memory_bytes"] == 64 * GiB
    res = invoke("resources", "--mem", "1000", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["memory_bytes"] == 1000 * MiB


# ------------------------------------------------------------ old spellings ----


def _warned(stderr: str, old: str, new: str) -> bool:
    return f"warning: {old} is deprecated, use {new}" in stderr


def test_old_mem_gb_still_works_and_warns() -> None:
    result = invoke("plan", "stocks", "--mem-gb", "12", "--cpus", "4", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resources"]["memory_bytes"] == 12 * 10**9  # its old GB
    assert _warned(result.stderr, "--mem-gb", "--mem")
    assert len(result.stderr.strip().splitlines()) == 1


def test_old_gpu_mem_gb_and_batch_size_still_work_and_warn() -> None:
    result = invoke("plan", "stocks", "--mem", "12G", "--cpus", "4", "--gpus", "1",
                    "--gpu-mem-gb", "8", "--batch-size", "7", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["chunk_size"] == 7
    assert data["resources"]["gpus"][0]["total_bytes"] == 8 * 10**9
    assert _warned(result.stderr, "--gpu-mem-gb", "--gpu-mem")
    assert _warned(result.stderr, "--batch-size", "--chunk-size")


def test_old_walltime_still_works_and_warns() -> None:
    result = invoke("slurm", "render", "stocks", "--mem", "4G", "--cpus", "2", "--stocks",
                    "10", "--walltime", "90")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "#SBATCH --time=01:30:00" in result.stdout
    assert _warned(result.stderr, "--walltime", "--time")


def test_old_spellings_reach_a_workload_run_command(tmp_path: Path) -> None:
    """`stocks predict` (a run command) parses --mem-gb and --batch-size, warns, then
    stops at the missing database as it would with the new spellings."""
    result = invoke("stocks", "predict", "--db", f"sqlite:///{tmp_path / 'nope.db'}",
                    "--model", str(tmp_path), "--mem-gb", "1", "--batch-size", "3")  # fmt: skip
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert _warned(result.stderr, "--mem-gb", "--mem")
    assert _warned(result.stderr, "--batch-size", "--chunk-size")
    assert lines[-1].startswith("error: ") and "nope.db does not exist" in lines[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "stocks", "--mem", "12G", "--mem-gb", "12"], "give --mem or --mem-gb, not both"),
        (["plan", "stocks", "--chunk-size", "5", "--batch-size", "5"],
         "give --chunk-size or --batch-size, not both"),
        (["slurm", "render", "stocks", "--mem", "4G", "--cpus", "2", "-t", "10", "--walltime",
          "10"], "give --time or --walltime, not both"),
    ],
)  # fmt: skip
def test_both_spellings_at_once_is_one_error_line(argv: list[str], message: str) -> None:
    result = invoke(*argv)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr


def test_predictive_sample_address_still_works_and_warns(tmp_path: Path) -> None:
    """The old `--cluster address --address ADDR` is `--cluster ADDR` now: same refusal."""
    from hpcbatch.predictive.technical import fit, simulate

    simulate(20, 4, 2, seed=0, out=tmp_path / "d")
    fit(tmp_path / "d", steps=3, seed=0)
    base = ["predictive", "sample", str(tmp_path / "d"), "--samples", "2"]
    old = invoke(*base, "--out", str(tmp_path / "a.zarr"), "--cluster", "address",
                 "--address", "tcp://127.0.0.1:1")  # fmt: skip
    new = invoke(*base, "--out", str(tmp_path / "b.zarr"), "--cluster", "tcp://127.0.0.1:1")
    assert old.exit_code == new.exit_code == 1, old.output + new.output
    assert _warned(old.stderr, "--address", "--cluster ADDRESS")
    assert "--cluster tcp://127.0.0.1:1" in old.stderr
    assert old.stderr.strip().splitlines()[-1] == new.stderr.strip()
    assert "tcp://127.0.0.1:1: nothing listens there" in new.stderr


def test_predictive_sample_compress_picks_the_store_codec(tmp_path: Path) -> None:
    """--compress zstd writes a zstd store (LZ4 without it); an unknown codec is refused."""
    import zarr

    from hpcbatch.predictive.technical import fit, simulate

    simulate(20, 4, 2, seed=0, out=tmp_path / "d")
    fit(tmp_path / "d", steps=3, seed=0)
    base = ["predictive", "sample", str(tmp_path / "d"), "--samples", "2", "--cluster", "sync",
            "--with-observations", "--report-dir", str(tmp_path / "r")]  # fmt: skip
    codecs = {}
    for name, extra in (("default", []), ("zstd", ["--compress", "zstd"])):
        result = invoke(*base, "--out", str(tmp_path / f"{name}.zarr"), *extra)
        assert result.exit_code == 0, result.output
        (codec,) = zarr.open_array(store=str(tmp_path / f"{name}.zarr" / "y"), mode="r").compressors
        codecs[name] = type(codec).__name__
    # the generic runner takes it too (a local cluster)
    run = invoke("run", "predictive", str(tmp_path / "d"), "--samples", "2", "--cpus", "1",
                 "--out", str(tmp_path / "run.zarr"), "--compress", "none",
                 "--report-dir", str(tmp_path / "r"))  # fmt: skip
    assert run.exit_code == 0, run.output
    codecs["run none"] = zarr.open_array(store=str(tmp_path / "run.zarr" / "mu_ntc"), mode="r").compressors
    assert codecs == {"default": "BloscCodec", "zstd": "ZstdCodec", "run none": ()}
    bad = invoke(*base, "--out", str(tmp_path / "bad.zarr"), "--compress", "gzip")
    assert bad.exit_code == 2
    assert "'gzip' is not one of 'lz4', 'zstd', 'none'" in bad.stderr
    assert not (tmp_path / "bad.zarr").exists()


def test_old_spellings_are_hidden_from_help() -> None:
    for argv in (["plan", "stocks"], ["slurm", "render", "stocks"], ["stocks", "predict"],
                 ["predictive", "sample"], ["resources"]):  # fmt: skip
        text = invoke(*argv, "--help").stdout
        assert "--mem " in text or "--mem TEXT" in text, argv
        for old in ("--mem-gb", "--gpu-mem-gb", "--walltime", "--batch-size", "--address"):
            assert old not in text, (argv, old)


# ------------------------------------------------------------------- --time ----


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("90", "01:30:00"),  # MM
        ("30:15", "00:30:15"),  # MM:SS
        ("02:00:00", "02:00:00"),  # HH:MM:SS
        ("1-12", "1-12:00:00"),  # D-HH
        ("1-12:30", "1-12:30:00"),  # D-HH:MM
        ("2-00:00:05", "2-00:00:05"),  # D-HH:MM:SS
    ],
)
def test_time_takes_sbatch_s_formats(text: str, limit: str) -> None:
    for flag in ("--time", "-t"):
        result = invoke("slurm", "render", "stocks", "--mem", "4G", "-c", "2", "--stocks", "10",
                        flag, text)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"#SBATCH --time={limit}\n" in result.stdout
        assert result.stderr == ""


def test_sbatch_short_options_render_the_same_script() -> None:
    long = invoke("slurm", "render", "stocks", "--mem", "4G", "--cpus", "2", "--stocks", "10",
                  "--time", "10", "--partition", "short", "--account", "lab", "--job-name", "x")
    short = invoke("slurm", "render", "stocks", "--mem", "4G", "-c", "2", "--stocks", "10",
                   "-t", "10", "-p", "short", "-A", "lab", "-J", "x")
    sbatch = invoke("slurm", "render", "stocks", "--mem", "4096", "--cpus-per-task", "2",
                    "--stocks", "10", "-t", "10", "-p", "short", "-A", "lab", "-J", "x")  # fmt: skip
    assert long.exit_code == short.exit_code == sbatch.exit_code == 0, long.output + short.output
    assert long.stdout == short.stdout == sbatch.stdout
    assert "#SBATCH --partition=short" in long.stdout and "#SBATCH --job-name=x\n" in long.stdout


# ------------------------------------------------------------- --gpus/--gres ----


@pytest.mark.parametrize(
    ("flags", "line", "n"),
    [
        (["--gpus", "2"], "#SBATCH --gpus=2", 2),
        (["--gpus", "a100:1"], "#SBATCH --gpus=a100:1", 1),
        (["--gres", "gpu:2"], "#SBATCH --gres=gpu:2", 2),
        (["--gres", "gpu:a100:4"], "#SBATCH --gres=gpu:a100:4", 4),
        (["--gres", "gpu:1,shard:2"], "#SBATCH --gres=gpu:1,shard:2", 1),
    ],
)
def test_render_gpus_go_into_the_script_and_the_plan(flags: list[str], line: str, n: int) -> None:
    result = invoke("slurm", "render", "stocks", "--mem", "16G", "-c", "4", "--stocks", "200",
                    "--use-gpu", "--gpu-mem", "40G", *flags)  # fmt: skip
    assert result.exit_code == 0, result.output
    script = result.stdout
    assert f"\n{line}\n" in script
    lines = script.splitlines()
    first_cmd = next(i for i, x in enumerate(lines[1:], 1) if x and not x.startswith("#"))
    assert lines.index(line) < first_cmd  # sbatch reads #SBATCH lines before any command only
    gpus = f"{n} GPU{'s' if n > 1 else ''} (40.00 GiB each)"
    assert re.search(rf"from the plan for [\d.]+ GiB, 4 CPUs, {re.escape(gpus)}:", script)
    assert re.search(r"#   GPU batch: \d+ stocks per inference batch", script)


def test_plan_shows_the_gpus_it_planned_for() -> None:
    text = invoke("plan", "stocks", "--mem", "16G", "-c", "4", "--gpus", "a100:2",
                  "--gpu-mem", "80G", "--use-gpu").stdout  # fmt: skip
    assert re.search(r"^gpus +2 x 80.00 GiB \(override \(--gpus\)\)$", text, re.M), text
    assert re.search(r"^GPU batch +\d+$", text, re.M), text


def test_render_without_gpus_has_no_gpu_line() -> None:
    script = invoke("slurm", "render", "stocks", "--mem", "4G", "-c", "2", "--stocks", "9").stdout
    assert "--gpus" not in script and "--gres" not in script and "GPU" not in script


def test_render_gpu_mistakes_are_one_line() -> None:
    base = ["slurm", "render", "stocks", "--mem", "4G", "-c", "2", "--stocks", "9"]
    for extra, message in (
        (["--gpus", "1", "--gres", "gpu:1"], "give --gpus or --gres, not both"),
        (["--gpus", "x"], "--gpus 'x' is not a GPU count"),
        (["--gres", "gpu:a:b:c"], "is not gpu[:TYPE][:N]"),
        (["--gpus", "1;id"], "--gpus '1;id' is not a GPU count"),
    ):
        result = invoke(*base, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_driver_gpus_go_on_the_worker_jobs_not_the_driver(monkeypatch, tmp_path: Path) -> None:
    """--driver --gpus: the driver job asks for no GPU; the worker jobs dask-jobqueue
    submits get it through cluster.job-extra-directives exported in the driver script."""
    import shlex

    import dask

    from hpcbatch import config as hb_config
    from hpcbatch import slurm
    from hpcbatch.planner import make_plan
    from hpcbatch.resources import detect_resources
    from hpcbatch.stocks.footprint import stocks_footprint

    result = invoke("slurm", "render", "stocks", "--driver", "--mem", "16G", "-c", "4",
                    "--stocks", "100", "--gres", "gpu:a100:2")  # fmt: skip
    assert result.exit_code == 0, result.output
    script = result.stdout
    assert "#SBATCH --gres" not in script and "#SBATCH --gpus" not in script
    assert "from the plan for 16.00 GiB, 4 CPUs, 2 GPUs (16.00 GiB each)" in script
    export = re.search(r"^export DASK_HPCBATCH__CLUSTER__JOB_EXTRA_DIRECTIVES=(.*)$", script, re.M)
    assert export, script
    # what the driver's settings become with that environment (as the shell sets it)
    value = shlex.split(export.group(1))[0]
    monkeypatch.setenv("DASK_HPCBATCH__CLUSTER__JOB_EXTRA_DIRECTIVES", value)
    dask.config.refresh()
    try:
        settings = hb_config.load()
        assert settings["cluster"]["job-extra-directives"] == ["--gres=gpu:a100:2"]
        res = detect_resources(memory_bytes=16 * GiB, cpus=4, gpus=2, plan_ahead=True)
        plan = make_plan(stocks_footprint(100, 400, 10), res, hb_config.plan_settings(settings))
        kwargs = slurm.slurm_cluster_kwargs(plan, settings).kwargs
        assert kwargs["job_extra_directives"] == ["--gres=gpu:a100:2"]  # on each worker job
    finally:
        monkeypatch.delenv("DASK_HPCBATCH__CLUSTER__JOB_EXTRA_DIRECTIVES")
        dask.config.refresh()
    # a --config file that sets the list itself would replace the GPUs: refused, with the fix
    config = tmp_path / "c.yaml"
    config.write_text("hpcbatch:\n  cluster:\n    job-extra-directives: ['--qos=gpu']\n")
    refused = invoke("slurm", "render", "stocks", "--driver", "--mem", "16G", "-c", "4",
                     "--stocks", "100", "--gpus", "2", "--config", str(config))  # fmt: skip
    assert refused.exit_code == 2
    assert "add '--gpus=2' to that list instead" in refused.stderr


# ------------------------------------------------------- the driver's --mem ----


def test_driver_passes_the_allocation_in_sbatch_units() -> None:
    for mem, passed in (("19G", "19G"), ("12000", "12000M"), ("1.5G", "1536M")):
        script = invoke("slurm", "render", "stocks", "--driver", "--mem", mem, "-c", "8",
                        "--stocks", "100").stdout  # fmt: skip
        assert f"--cluster slurm --mem {passed} --cpus 8" in script, script


# ------------------------------------------------------------- the docs table ----


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    plugins = {name for name, w in workloads().items()
               if not type(w).__module__.startswith("hpcbatch.")}  # fmt: skip
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        elif not (path and path[0] in ("plan", "run", "slurm") and name in plugins):
            yield (*path, name), cmd


def _flag_table() -> str:
    text = (ROOT / "docs" / "slurm.md").read_text()
    found = re.search(r"\n## Flags\b.*?(?=\n## )", text, re.S)
    assert found, "docs/slurm.md has no '## Flags' section"
    return found.group(0)


def test_docs_table_lists_every_flag_of_every_command() -> None:
    table = _flag_table()
    missing = []
    for path, cmd in _commands(main):
        for param in cmd.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            for flag in (*param.opts, *param.secondary_opts):
                if flag.startswith("--") and f"`{flag}`" not in table:
                    missing.append(f"{' '.join(path)} {flag}")
    assert not missing, "flags missing from docs/slurm.md's table: " + ", ".join(missing)


def test_docs_table_lists_every_old_spelling_with_its_new_one() -> None:
    table = _flag_table()
    for path, cmd in _commands(main):
        for param in cmd.params:
            if isinstance(param, RenamedOption):
                row = re.search(rf"^\| `{re.escape(param.old)}`.*$", table, re.M)
                assert row and param.new.split()[0] in row.group(0), (path, param.old)


# ------------------------------------------------------ against a real sbatch ----


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_mem_is_what_a_real_sbatch_allocates(slurm_env: dict, tmp_path: Path) -> None:
    """Each --mem text, given to the real sbatch, gives the job SLURM_MEM_PER_NODE MiB
    equal to what hpcbatch reads from the same text."""
    from hpcbatch import slurm

    script = tmp_path / "mem.sbatch"
    script.write_text("#!/bin/bash\necho \"MEM=$SLURM_MEM_PER_NODE\"\n")
    texts = ("1000", "1000M", "512K", "2049K", "2G", "2GB", "1g", "1500mb")
    jobs = {
        text: slurm.submit(script, sbatch_args=[
            f"--mem={text}", "--partition", slurm_env["partition"], "--chdir", str(tmp_path),
            f"--output=mem-{i}-%j.out"])  # fmt: skip
        for i, text in enumerate(texts)
    }
    for i, (text, job_id) in enumerate(jobs.items()):
        info = slurm.wait_for_job(job_id, timeout=120)
        out = (tmp_path / f"mem-{i}-{job_id}.out").read_text()
        assert info["JobState"] == "COMPLETED", out
        mib = int(re.search(r"MEM=(\d+)", out).group(1))
        assert mib * MiB == parse_mem(text), (text, mib)


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_time_is_what_a_real_sbatch_sets(slurm_env: dict, tmp_path: Path) -> None:
    """Each --time text, given to the real sbatch, gives the job the TimeLimit hpcbatch
    reads from it (and renders as #SBATCH --time), but for SLURM's whole minutes: it rounds
    seconds up (30:15 is 31 minutes); hpcbatch keeps the seconds, so its SIGTERM warning
    and worker lifetimes come from the limit as written, at most 59 s early."""
    from hpcbatch import slurm

    script = tmp_path / "t.sbatch"
    script.write_text("#!/bin/bash\ntrue\n")
    texts = ("90", "30:15", "02:00:00", "1-12", "1-12:30", "2-00:00:05")
    for text in texts:
        job_id = slurm.submit(script, sbatch_args=[
            f"--time={text}", "--partition", slurm_env["partition"], "--chdir", str(tmp_path)])  # fmt: skip
        info = slurm.wait_for_job(job_id, timeout=120)
        seconds = slurm.parse_walltime(text)
        assert info["TimeLimit"] == slurm.format_walltime(-(-seconds // 60) * 60), text
