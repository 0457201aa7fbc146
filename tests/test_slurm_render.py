"""Unit tests of hpcbatch.slurm without a SLURM: walltimes, job sizes, rendered scripts
(golden files), SLURMCluster keyword arguments and why a job died (scheduler output
captured from the real test SLURM, fed through a fake command layer).

Regenerate the golden scripts after an intended change with
``HPCBATCH_REGEN_GOLDEN=1 pytest tests/test_slurm_render.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from hpcbatch import config as hb_config
from hpcbatch import slurm
from hpcbatch.cli import job_cli, main
from hpcbatch.errors import ClusterStartError, ConfigError, HpcbatchError
from hpcbatch.planner import Footprint, Plan, make_plan
from hpcbatch.resources import Resources, detect_resources
from hpcbatch.stocks.footprint import stocks_footprint
from hpcbatch.units import parse_mem

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("HPCBATCH_REGEN_GOLDEN") == "1"
PY = "/opt/hpcbatch/venv/bin/python"


# ------------------------------------------------------------------ walltime ----


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90 * 60),
        ("5:30", 5 * 60 + 30),
        ("02:00:00", 7200),
        ("48:00:00", 48 * 3600),
        ("1-00", 86400),
        ("1-12:30", 86400 + 12 * 3600 + 30 * 60),
        ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
        (" 0:01:00 ", 60),
        (30, 30 * 60),
    ],
)
def test_parse_walltime_accepts_slurm_formats(text, seconds) -> None:
    assert slurm.parse_walltime(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2h",
        "1:2:3:4",
        "00:61:00",
        "1:00:60",
        "1-24:00:00",
        "1-",
        "-1",
        "1.5",
        "01:00:00 extra",
        "UNLIMITED",
        "infinite",
    ],
)
def test_parse_walltime_rejects_bad_text_with_the_fix(text) -> None:
    with pytest.raises(ConfigError, match=r"not a SLURM time limit: use .*HH:MM:SS.*--time"):
        slurm.parse_walltime(text)


def test_zero_walltime_is_refused() -> None:
    with pytest.raises(ConfigError, match="zero"):
        slurm.parse_walltime("00:00:00")


@given(st.integers(min_value=1, max_value=40 * 86400))
def test_format_walltime_round_trips(seconds: int) -> None:
    text = slurm.format_walltime(seconds)
    assert re.fullmatch(r"(\d+-)?\d\d:\d\d:\d\d", text)
    assert slurm.parse_walltime(text) == seconds


@given(st.integers(min_value=60, max_value=40 * 86400))
def test_worker_lifetime_always_ends_before_the_walltime(walltime: int) -> None:
    lifetime, stagger = slurm.worker_lifetime(walltime)
    assert 0 < lifetime < walltime
    assert lifetime + stagger < walltime
    assert walltime - lifetime <= 300 and stagger <= 120


def test_worker_lifetime_for_an_hour() -> None:
    assert slurm.worker_lifetime(3600) == (3300, 120)


# ------------------------------------------------------------------ job size ----


def _plan(mem_gib: float = 12, cpus: int = 4, n_stocks: int = 5000):
    """The plan ``--mem {mem_gib}G --cpus {cpus}`` gives (sbatch's G is GiB)."""
    settings = hb_config.load()
    res = detect_resources(memory_bytes=int(mem_gib * 1024**3), cpus=cpus, plan_ahead=True)
    return make_plan(
        stocks_footprint(n_stocks, 400, 10), res, hb_config.plan_settings(settings)
    ), settings


def test_job_size_adds_workers_shared_and_reserve_rounded_up_to_mib() -> None:
    plan, _ = _plan()
    # the plan's reserve: the stocks driver's measured size, above the 256 MiB setting
    assert plan.reserve_bytes == plan.footprint.driver_bytes > 256 * 2**20
    size = slurm.job_size(plan, reserve_bytes=plan.reserve_bytes)
    expected = (
        plan.n_workers * plan.memory_limit_bytes
        + plan.footprint.node_shared_bytes
        + plan.reserve_bytes
    )
    assert size.mem_bytes == expected
    assert size.cpus == plan.n_workers * plan.threads_per_worker
    assert (size.mem_mb - 1) * 2**20 < expected <= size.mem_mb * 2**20
    # the allocation SLURM grants (whole MiB) is never below what the plan used
    assert size.mem_mb * 2**20 >= plan.resources.memory_bytes


def test_sbatch_mem_uses_gigabytes_only_when_exact() -> None:
    assert slurm.JobSize(1, 4 * 2**30, 0, 0, 0).sbatch_mem == "4G"
    assert slurm.JobSize(1, 4 * 2**30 + 1, 0, 0, 0).sbatch_mem == "4097M"


# ------------------------------------------------------------------ secrets -----


def test_mask_url_hides_the_password() -> None:
    masked = slurm.mask_url("postgresql+psycopg://alice:s3cr3t@db.example:5432/stocks")
    assert "s3cr3t" not in masked and "alice" in masked and "***" in masked


def test_scrub_args_replaces_urls_with_passwords_by_the_env_var() -> None:
    args, replaced = slurm.scrub_args(
        ["--db", "postgresql://bob:pw@h/x", "--out=sqlite:///a.db", "--url=mysql://u:p@h/d"]
    )
    assert replaced
    assert args[0] == "--db" and args[1].startswith("${HPCBATCH_DB_URL:?")
    assert args[2] == "--out=sqlite:///a.db"
    assert args[3].startswith("--url=${HPCBATCH_DB_URL")
    assert slurm.scrub_args(["--db", "postgresql://bob@h/x"]) == (
        ["--db", "postgresql://bob@h/x"],
        False,
    )


# ------------------------------------------------------------------ rendering ---

CLI_CASES = {
    "stocks_local": [
        "render",
        "stocks",
        "--mem",
        "12G",
        "--cpus",
        "4",
        "--time",
        "02:00:00",
        "--partition",
        "short",
        "--account",
        "lab42",
        "--stocks",
        "5000",
    ],
    "stocks_driver_secret": [
        "render",
        "stocks",
        "--mem",
        "19G",
        "--cpus",
        "8",
        "--time",
        "1-00:00:00",
        "--driver",
        "--directive=--qos=long",
        "--",
        "--db",
        "postgresql+psycopg://alice:s3cr3t@db.example/stocks",
    ],
    "predictive_local": [
        "render",
        "predictive",
        "--cells",
        "21761",
        "--features",
        "31467",
        "--samples",
        "1000",
        "--mem",
        "64G",
        "--cpus",
        "8",
        "--time",
        "240",
        "--",
        "fitted/",
        "--out",
        "posterior.zarr",
    ],
    "predictive_driver": [
        "render",
        "predictive",
        "--cells",
        "2000",
        "--features",
        "500",
        "--mem",
        "8G",
        "--cpus",
        "2",
        "--time",
        "00:30:00",
        "--driver",
        "--partition",
        "debug",
        "--job-name",
        "pp-small",
        "--",
        "fitted/",
        "--out",
        "posterior.zarr",
    ],
}


def _render(argv: list[str]) -> str:
    result = CliRunner().invoke(main, ["slurm", *argv[:2], "--python", PY, *argv[2:]])
    assert result.exit_code == 0, result.output
    return result.stdout  # the script; warnings go to stderr


def _fixed_plan(workload: str, n_workers: int, threads: int, limit: int, shared: int) -> Plan:
    """A hand-built plan, so the golden files pin the templates, not the footprint models
    (which their owners tune) or the planner."""
    item, n_items, chunk = {"stocks": ("stock", 5000, 50), "predictive": ("sample", 1000, 25)}[
        workload
    ]
    footprint = Footprint(
        workload=workload, item_name=item, n_items=n_items, per_item_bytes=2 * 2**20,
        baseline_bytes=400 * 2**20, shared_input_bytes=shared, shared_input_mmap=True,
    )  # fmt: skip
    cpus = n_workers * threads
    node = n_workers * limit + shared + 256 * 2**20
    resources = Resources(memory_bytes=node, memory_source="--mem-gb", cpus=cpus,
                          cpus_source="--cpus", planned_ahead=True)  # fmt: skip
    return Plan(
        n_workers=n_workers, threads_per_worker=threads, memory_limit_bytes=limit,
        chunk_size=chunk, n_chunks=-(-n_items // chunk), predicted_peak_bytes=limit // 2,
        memory_fraction=0.6, binding="cpus", reasons=("fixed for the golden files",),
        footprint=footprint, resources=resources,
    )  # fmt: skip


GOLDEN_SETTINGS = {"reserve": "256MiB", "cluster": {"walltime": "01:00:00", "queue": None,
                   "account": None, "job-extra-directives": []}}  # fmt: skip

GOLDEN_RENDERS = {
    "stocks_local": (
        ("stocks", 4, 1, 2800 * 2**20, 36 * 2**20),
        dict(walltime="02:00:00", partition="short", account="lab42"),
    ),
    "stocks_driver_secret": (
        ("stocks", 8, 1, 2200 * 2**20, 36 * 2**20),
        dict(
            walltime="1-00:00:00",
            driver=True,
            extra=["--qos=long"],
            profile="stocks-19gb",
            args=["--db", "postgresql+psycopg://alice:s3cr3t@db.example/stocks"],
        ),
    ),  # fmt: skip
    "predictive_local": (
        ("predictive", 8, 1, 7 * 2**30, 2737 * 2**20),
        dict(walltime="240", args=["fitted/", "--out", "posterior.zarr"]),
    ),
    "predictive_driver": (
        ("predictive", 2, 2, 3 * 2**30, 0),
        dict(
            walltime="00:30:00",
            driver=True,
            partition="debug",
            job_name="pp-small",
            config_file="my settings.yaml",
        ),
    ),  # fmt: skip
}


# The workload CLIs' options as the golden files assume them: both have --resume and take
# --mem in sbatch's units.
GOLDEN_COMMANDS = {"stocks": ("stocks", "predict"), "predictive": ("predictive", "sample")}
GOLDEN_OPTIONS = {
    "stocks": {"--profile", "--config", "--cluster", "--mem", "--cpus", "--resume"},
    "predictive": {"--profile", "--config", "--cluster", "--mem", "--cpus", "--resume"},
}


@pytest.mark.parametrize("case", sorted(GOLDEN_RENDERS))
def test_rendered_scripts_match_golden_files(case: str) -> None:
    plan_args, kwargs = GOLDEN_RENDERS[case]
    text = slurm.render_sbatch(
        plan_args[0], _fixed_plan(*plan_args), GOLDEN_SETTINGS, python=PY,
        command=GOLDEN_COMMANDS[plan_args[0]],
        command_options=GOLDEN_OPTIONS[plan_args[0]], check_command=False, **kwargs,
    )  # fmt: skip
    path = GOLDEN / f"{case}.sbatch"
    if REGEN:
        path.write_text(text)
    assert path.exists(), f"missing {path}: run HPCBATCH_REGEN_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text(), (
        f"{path.name} changed; if intended, regenerate with HPCBATCH_REGEN_GOLDEN=1 and review"
    )


def test_golden_local_script_adds_up() -> None:
    text = (GOLDEN / "stocks_local.sbatch").read_text()
    # 4 x 2800 MiB + 36 MiB shared + 256 MiB reserve = 11492 MiB
    assert "#SBATCH --mem=11492M" in text and "#SBATCH --cpus-per-task=4" in text
    text = (GOLDEN / "predictive_driver.sbatch").read_text()
    # workers: 2 x 3 GiB, no reserve in worker jobs = 6 GiB exactly; 2 workers x 2 threads
    assert "--cpus-per-task=4 --mem=6G" in text
    assert "--config 'my settings.yaml'" in text  # shell-quoted


def _directive(text: str, name: str) -> str:
    m = re.search(rf"^#SBATCH --{name}=(\S+)$", text, flags=re.M)
    assert m, f"no --{name} in script"
    return m.group(1)


def test_local_script_mem_and_cpus_come_from_the_plan() -> None:
    plan, settings = _plan(12, 4)
    text = _render(CLI_CASES["stocks_local"])
    size = slurm.job_size(plan, plan.reserve_bytes)
    # sbatch reads it back as exactly the plan's whole MiB (NG when a whole GiB)
    assert parse_mem(_directive(text, "mem")) == size.mem_mb * 2**20
    assert _directive(text, "cpus-per-task") == str(plan.n_workers * plan.threads_per_worker)
    assert _directive(text, "time") == "02:00:00"
    assert _directive(text, "partition") == "short"
    assert _directive(text, "account") == "lab42"
    assert text.rstrip().endswith("-m hpcbatch.cli stocks predict --resume")
    # every #SBATCH line comes before the first command, or sbatch ignores it
    lines = text.splitlines()
    first_cmd = next(i for i, line in enumerate(lines[1:], 1) if line and not line.startswith("#"))
    assert all(i < first_cmd for i, line in enumerate(lines) if line.startswith("#SBATCH"))


def test_driver_script_is_small_and_passes_the_worker_allocation() -> None:
    text = _render(CLI_CASES["stocks_driver_secret"])
    assert _directive(text, "cpus-per-task") == "1"
    assert _directive(text, "mem") == "2G"
    assert _directive(text, "qos") == "long"
    assert "--cluster slurm --mem 19G --cpus 8" in text
    assert "export DASK_HPCBATCH__CLUSTER__WALLTIME=1-00:00:00" in text


def test_password_never_reaches_the_script() -> None:
    text = _render(CLI_CASES["stocks_driver_secret"])
    assert "s3cr3t" not in text and "alice" not in text
    assert '--db "${HPCBATCH_DB_URL:?export HPCBATCH_DB_URL before sbatch}"' in text


def test_render_writes_a_file_with_output_option(tmp_path) -> None:
    out = tmp_path / "job.sbatch"
    result = CliRunner().invoke(
        main,
        [
            "slurm",
            "render",
            "stocks",
            "--mem",
            "12G",
            "--cpus",
            "4",
            "--python",
            PY,
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.read_text() == _render(["render", "stocks", "--mem", "12G", "--cpus", "4"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--time", "2h"], "walltime '2h' is not a SLURM time limit"),
        (["--partition", "a b;rm"], "partition 'a b;rm' has characters"),
        (["--directive", "qos=long"], "is not an option: write it like --constraint"),
        (["--directive", "--qos=x\nrm -rf ~"], "has a line break: give one option"),
        (["--python", '/opt/py"; rm -rf ~; "'], "has characters that cannot go into the script"),
        (["--python", "/opt/$(id)/python"], "has characters that cannot go into the script"),
    ],
)
def test_render_bad_input_is_one_line_and_exit_2(argv, message) -> None:
    result = CliRunner().invoke(
        main, ["slurm", "render", "stocks", "--mem", "12G", "--cpus", "4", *argv]
    )
    assert result.exit_code == 2
    assert message in result.output
    assert "#SBATCH" not in result.output  # nothing half-written


def test_render_outside_slurm_needs_the_allocation(monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    result = CliRunner().invoke(main, ["slurm", "render", "stocks", "--cpus", "4"])
    assert result.exit_code == 2
    assert "--mem needed to size the job" in result.output


def test_render_infeasible_plan_says_what_to_request() -> None:
    result = CliRunner().invoke(
        main,
        [
            "slurm",
            "render",
            "predictive",
            "--cells",
            "21761",
            "--features",
            "31467",
            "--mem",
            "1G",
            "--cpus",
            "2",
            "--copy-input",
        ],
    )
    assert result.exit_code == 2
    assert "request --mem=" in result.output


def test_missing_template_dir_is_a_config_error(tmp_path) -> None:
    plan, settings = _plan()
    with pytest.raises(ConfigError, match="HPCBATCH_SLURM_TEMPLATES"):
        slurm.render_sbatch("stocks", plan, settings, template_dir=tmp_path)


# ------------------------------------------------------------- SLURMCluster kwargs


def test_slurm_cluster_kwargs_follow_the_plan() -> None:
    plan, settings = _plan(12, 4)
    settings = {
        **settings,
        "cluster": {
            **settings["cluster"],
            "walltime": "02:00:00",
            "queue": "short",
            "account": "lab42",
            "interface": "ib0",
            "local-directory": "/scratch/x",
            "job-extra-directives": ["--qos=long"],
        },
    }
    spec = slurm.slurm_cluster_kwargs(plan, settings, python="/x/python")
    kw = spec.kwargs
    n, limit = plan.n_workers, plan.memory_limit_bytes
    assert kw["cores"] == n * plan.threads_per_worker and kw["processes"] == n
    total = n * limit + plan.footprint.node_shared_bytes
    assert kw["memory"] == f"{total}B"
    assert kw["job_mem"] == f"{-(-total // 2**20)}M"
    assert (kw["walltime"], kw["queue"], kw["account"]) == ("02:00:00", "short", "lab42")
    assert (kw["interface"], kw["local_directory"], kw["python"]) == (
        "ib0",
        "/scratch/x",
        "/x/python",
    )
    assert kw["job_extra_directives"] == ["--qos=long"]
    args = kw["worker_extra_args"]
    assert args[args.index("--memory-limit") + 1] == str(limit)
    assert args[args.index("--lifetime") + 1] == "6900s"
    assert args[args.index("--lifetime-stagger") + 1] == "120s"
    assert "export DASK_DISTRIBUTED__WORKER__MEMORY__SPILL=0.7" in kw["job_script_prologue"]
    assert spec.memory_limit == limit
    # dask-jobqueue alone rounds memory/processes to 3 significant figures
    assert (
        spec.derived_memory_limit != limit and abs(spec.derived_memory_limit - limit) < 0.01 * limit
    )
    assert "pinned to the plan's" in spec.notes[0]


def test_slurm_cluster_job_script_carries_exact_limit_and_mem() -> None:
    pytest.importorskip("dask_jobqueue")
    plan, settings = _plan(12, 4)
    settings = {**settings, "cluster": {**settings["cluster"], "dashboard-address": ":0"}}
    cluster = slurm.slurm_cluster(plan, settings)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    total = plan.n_workers * plan.memory_limit_bytes + plan.footprint.node_shared_bytes
    assert f"#SBATCH --mem={-(-total // 2**20)}M" in script
    assert f"#SBATCH --cpus-per-task={plan.n_workers}" in script
    # the last --memory-limit wins on the worker command line: the plan's exact bytes
    limits = re.findall(r"--memory-limit (\S+)", script)
    assert limits[-1] == str(plan.memory_limit_bytes)
    assert "--lifetime 3300s" in script


def test_thresholds_false_is_exported_as_false() -> None:
    lines = slurm.threshold_exports(
        {"target": False, "spill": 0.7, "pause": 0.8, "terminate": 0.95}
    )
    assert lines[0] == "export DASK_DISTRIBUTED__WORKER__MEMORY__TARGET=False"


# ------------------------------------------------------------- death reasons ----

# Captured from the test SLURM (tests/services.py): a job with --mem=200M that
# touched 600 MB, and a job cancelled with scancel.
MEM_KILLED = (
    "JobId=1 JobName=hog.sh UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901759 "
    "Nice=0 Account=(null) QOS=(null) JobState=FAILED Reason=JobLaunchFailure Dependency=(null) "
    "Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:9 RunTime=00:00:02 TimeLimit=UNLIMITED "
    "TimeMin=N/A SubmitTime=2026-11-23T11:32:48 Partition=debug AllocNode:Sid=localhost:2618 "
    "NodeList=hb92a3c2 BatchHost=hb92a3c2 NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=200M,node=1,billing=1 Socks/Node=* MinMemoryNode=200M "
    "Command=/tmp/x/hog.sh WorkDir=/work/main StdErr={out} StdIn=/dev/null StdOut={out} Power= "
)
MEM_OUTPUT = (
    "slurmstepd-hb92a3c2: error: StepId=1.batch exceeded memory limit (276066304 > 209715200), "
    "being killed\n"
    "slurmstepd-hb92a3c2: error: Exceeded job memory limit\n"
    "slurmstepd-hb92a3c2: error: *** JOB 1 ON hb92a3c2 CANCELLED AT 2026-11-23T11:32:52 ***\n"
)
JOBCOMP = (
    "JobId=2 UserId=root(0) GroupId=root(0) Name=sl.sh JobState=CANCELLED Partition=debug "
    "TimeLimit=UNLIMITED StartTime=2026-11-23T11:32:50 EndTime=2026-11-23T11:32:51 "
    "NodeList=hb92a3c2 NodeCnt=1 ProcCnt=1 WorkDir=/work/main ReservationName= "
    "Tres=cpu=1,mem=100M,node=1,billing=1 Account= QOS= WcKey= Cluster=unknown "
    "SubmitTime=2026-11-23T11:32:48 EligibleTime=2026-11-23T11:32:48 DerivedExitCode=0:0 "
    "ExitCode=0:0 \n"
)


class FakeScheduler:
    """The command layer: answers scontrol from a table, records every call."""

    def __init__(self, jobs: dict[str, list[str]], sacct: dict[str, str] | None = None):
        self.jobs = {k: list(v) for k, v in jobs.items()}
        self.sacct = sacct
        self.calls: list[list[str]] = []

    def __call__(self, argv):
        self.calls.append(list(argv))
        if argv[:3] == ["scontrol", "show", "job"]:
            states = self.jobs.get(argv[-1])
            if not states:
                return 1, "", "slurm_load_jobs error: Invalid job id specified\n"
            return 0, (states.pop(0) if len(states) > 1 else states[0]), ""
        if argv[0] == "sacct":
            if self.sacct is None:
                return 1, "", "sacct: error: Slurm accounting storage is disabled\n"
            return 0, self.sacct.get(argv[2], ""), ""
        if argv[0] == "sbatch":
            return 0, "77;cluster\n", ""
        return 127, "", "unexpected"


def _with_state(line: str, state: str, exit_code: str = "0:0", reason: str = "None") -> str:
    line = re.sub(r"JobState=\S+", f"JobState={state}", line)
    line = re.sub(r"ExitCode=\S+", f"ExitCode={exit_code}", line)
    return re.sub(r"Reason=\S+", f"Reason={reason}", line)


def test_parse_scontrol_keeps_values_with_equals_and_colons() -> None:
    f = slurm.parse_scontrol(MEM_KILLED.format(out="/o"))
    assert f["JobState"] == "FAILED" and f["ExitCode"] == "0:9"
    assert f["TRES"] == "cpu=1,mem=200M,node=1,billing=1"
    assert f["AllocNode:Sid"] == "localhost:2618" and f["CPUs/Task"] == "1"
    assert f["Power"] == "" and f["StdOut"] == "/o"


def test_memory_kill_is_read_from_the_job_output(tmp_path) -> None:
    out = tmp_path / "hog-1.out"
    out.write_text(MEM_OUTPUT)
    run = FakeScheduler({"1": [MEM_KILLED.format(out=out)]})
    death = slurm.explain_job("1", run=run)
    assert (death.reason, death.state, death.exit_code) == ("memory", "FAILED", "0:9")
    assert "exceeded memory limit (276066304 > 209715200)" in death.detail
    assert run.calls == [["scontrol", "show", "job", "-o", "1"]]


def test_same_failure_without_the_memory_lines_is_other(tmp_path) -> None:
    out = tmp_path / "o.out"
    out.write_text("Traceback ...\nValueError: boom\n")
    death = slurm.explain_job("1", run=FakeScheduler({"1": [MEM_KILLED.format(out=out)]}))
    assert death.reason == "other" and "exit code 0:9" in death.detail


@pytest.mark.parametrize(
    ("state", "output", "reason"),
    [
        ("OUT_OF_MEMORY", "", "memory"),
        (
            "TIMEOUT",
            "slurmstepd: error: *** JOB 1 ON n1 CANCELLED AT 2026-01-01T00:00:00 DUE TO "
            "TIME LIMIT ***\n",
            "walltime",
        ),
        ("TIMEOUT", "", "walltime"),
        ("NODE_FAIL", "", "node"),
        (
            "CANCELLED",
            "slurmstepd: error: *** JOB 1 ON n1 CANCELLED AT 2026-01-01 DUE TO NODE "
            "FAILURE, SEE SLURMCTLD LOG FOR DETAILS ***\n",
            "node",
        ),
        ("PREEMPTED", "", "preempted"),
        ("CANCELLED", "", "cancelled"),
        ("COMPLETED", "done\n", "completed"),
        ("FAILED", "error: oom-kill event(s) in StepId=1.batch\n", "memory"),
    ],
)
def test_death_reasons(tmp_path, state, output, reason) -> None:
    out = tmp_path / "job.out"
    out.write_text(output)
    line = _with_state(MEM_KILLED.format(out=out), state)
    assert slurm.explain_job("1", run=FakeScheduler({"1": [line]})).reason == reason


def test_forgotten_job_falls_back_to_the_jobcomp_file(tmp_path) -> None:
    comp = tmp_path / "jobcomp.log"
    comp.write_text(JOBCOMP)
    death = slurm.explain_job("2", run=FakeScheduler({}), jobcomp=comp)
    assert (death.state, death.reason) == ("CANCELLED", "cancelled")
    with pytest.raises(HpcbatchError, match="no record of job 3"):
        slurm.explain_job("3", run=FakeScheduler({}), jobcomp=comp)


def test_wait_for_job_polls_until_finished() -> None:
    done = MEM_KILLED.format(out="/nonexistent")
    run = FakeScheduler({"1": [_with_state(done, "PENDING"), _with_state(done, "RUNNING"), done]})
    sleeps: list[float] = []
    info = slurm.wait_for_job("1", run=run, poll=0.5, sleep=sleeps.append)
    assert info["JobState"] == "FAILED" and sleeps == [0.5, 0.5]


def test_wait_for_job_times_out_with_the_command_to_check() -> None:
    run = FakeScheduler({"1": [_with_state(MEM_KILLED.format(out="/x"), "PENDING")]})
    with pytest.raises(HpcbatchError, match="still PENDING after 0 s: check squeue -j 1"):
        slurm.wait_for_job("1", run=run, timeout=0, sleep=lambda s: None)


def test_submit_returns_the_job_id_and_reports_sbatch_errors() -> None:
    assert slurm.submit("job.sh", run=FakeScheduler({})) == "77"
    with pytest.raises(HpcbatchError, match="sbatch failed: sbatch: error: invalid partition"):
        slurm.submit("job.sh", run=lambda argv: (1, "", "sbatch: error: invalid partition\n"))


def test_why_cli_prints_the_reason(tmp_path, monkeypatch) -> None:
    out = tmp_path / "hog-1.out"
    out.write_text(MEM_OUTPUT)
    fake = FakeScheduler({"1": [MEM_KILLED.format(out=out)]})
    monkeypatch.setattr(slurm, "subprocess_runner", fake)
    result = CliRunner().invoke(main, ["slurm", "why", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("job 1: FAILED -> memory: ")


def test_cancelled_job_detail_quotes_the_output_or_says_scancel(tmp_path) -> None:
    out = tmp_path / "job.out"
    out.write_text("slurmstepd-n1: error: *** JOB 2 ON n1 CANCELLED AT 2026-11-23T11:32:51 ***\n")
    line = _with_state(MEM_KILLED.format(out=out), "CANCELLED", "0:15")
    death = slurm.explain_job("1", run=FakeScheduler({"1": [line]}))
    assert death.reason == "cancelled" and "CANCELLED AT 2026-11-23T11:32:51" in death.detail
    out.write_text("")
    death = slurm.explain_job("1", run=FakeScheduler({"1": [line]}))
    assert death.detail.startswith("cancelled by scancel") and "None" not in death.detail


def test_unknown_interface_is_a_config_error_before_anything_starts() -> None:
    plan, settings = _plan()
    settings = {**settings, "cluster": {**settings["cluster"], "interface": "nosuch0"}}
    with pytest.raises(ConfigError, match="network interface 'nosuch0' does not exist.*\\blo\\b"):
        slurm.slurm_cluster(plan, settings)


STOPPED = (
    "run 'int1' interrupted: 3 chunks (3 items, 3 tasks) in 1.6 s, 0 skipped, 0 retried\n"
    "error: run 'int1' stopped by SIGTERM with 3 of 40 items done: rerun the same command "
    "with --resume\n"
)


@pytest.mark.parametrize(
    ("run_time", "time_limit", "reason"),
    [
        ("00:09:50", "00:10:00", "walltime"),  # SIGTERM from --signal=B:TERM@60
        ("1-23:55:00", "2-00:00:00", "walltime"),
        ("00:00:12", "00:10:00", "interrupted"),  # scancel --signal=TERM long before
        ("00:00:12", "UNLIMITED", "interrupted"),
    ],
)
def test_hpcbatch_stop_on_sigterm_is_walltime_only_near_the_limit(
    tmp_path, run_time, time_limit, reason
) -> None:
    out = tmp_path / "job.out"
    out.write_text(STOPPED)
    line = _with_state(MEM_KILLED.format(out=out), "FAILED", "3:0")
    line = line.replace("RunTime=00:00:02", f"RunTime={run_time}")
    line = line.replace("TimeLimit=UNLIMITED", f"TimeLimit={time_limit}")
    death = slurm.explain_job("1", run=FakeScheduler({"1": [line]}))
    assert death.reason == reason
    assert "stopped by SIGTERM with 3 of 40 items done" in death.detail


def test_exit_3_without_hpcbatchs_message_is_other(tmp_path) -> None:
    out = tmp_path / "job.out"
    out.write_text("something else exited 3\n")
    line = _with_state(MEM_KILLED.format(out=out), "FAILED", "3:0")
    assert slurm.explain_job("1", run=FakeScheduler({"1": [line]})).reason == "other"


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_every_cli_case_renders_a_command_the_workload_cli_accepts(case: str) -> None:
    text = _render(CLI_CASES[case])
    line = text.rstrip().splitlines()[-1]
    assert line.startswith('exec "$PYTHON" -m hpcbatch.cli ')
    import shlex

    argv = shlex.split(line.split("-m hpcbatch.cli ", 1)[1])
    command, command_cli = job_cli(argv[0])
    assert tuple(argv[: len(command)]) == command
    # raises if the job would fail at once
    slurm.check_workload_args(command_cli, command, argv[len(command) :])
    if "--resume" in slurm.workload_options(command_cli):
        assert argv[-1] == "--resume"
    else:
        assert "has no --resume: resubmitting starts again" in text


def test_predictive_driver_passes_the_allocation_the_way_its_cli_takes_it() -> None:
    text = _render(CLI_CASES["predictive_driver"])
    assert "--mem" in slurm.workload_options(job_cli("predictive")[1])
    assert "--cluster slurm --mem 8G --cpus 2" in text


def test_render_refuses_workload_args_the_job_would_reject() -> None:
    base = ["slurm", "render", "predictive", "--cells", "2000", "--features", "500",
            "--mem", "8G", "--cpus", "2"]  # fmt: skip
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 2
    assert "the job would fail at once: 'hpcbatch predictive sample' says: Missing argument" in (
        result.output
    )
    result = CliRunner().invoke(main, [*base, "--", "fitted/", "--out", "p.zarr", "--bogus"])
    assert result.exit_code == 2 and "No such option '--bogus'" in result.output
    assert "#SBATCH" not in result.output


def test_render_inside_a_job_sizes_from_that_job(monkeypatch) -> None:
    for key, value in {"SLURM_JOB_ID": "5", "SLURM_MEM_PER_NODE": "4000",
                       "SLURM_CPUS_PER_TASK": "2"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    text = _render(["render", "stocks", "--stocks", "100"])
    # the plan never asks for more than the job it was made in
    assert 3990 <= int(_directive(text, "mem").rstrip("M")) <= 4000
    assert int(_directive(text, "cpus-per-task")) <= 2


def test_job_script_memory_limit_takes_the_last_one() -> None:
    script = "python -m distributed.cli.dask_worker --memory-limit 2.73GiB --nanny --memory-limit 2923809174 --lifetime 1s"
    assert slurm.job_script_memory_limit(script) == 2923809174
    assert slurm.job_script_memory_limit("--memory-limit 1GiB") == 2**30
    assert slurm.job_script_memory_limit("no limit here") is None


def test_slurm_cluster_refuses_a_job_script_without_the_plans_limit(monkeypatch) -> None:
    pytest.importorskip("dask_jobqueue")
    plan, settings = _plan(12, 4)
    settings = {**settings, "cluster": {**settings["cluster"], "dashboard-address": ":0"}}
    real = slurm.slurm_cluster_kwargs

    def without_pin(*args, **kwargs):  # as if dask-jobqueue put our argument first
        spec = real(*args, **kwargs)
        extra = [a for a in spec.kwargs["worker_extra_args"]]
        i = extra.index("--memory-limit")
        del extra[i : i + 2]
        return slurm.SlurmClusterSpec(
            {**spec.kwargs, "worker_extra_args": extra},
            spec.derived_memory_limit,
            spec.memory_limit,
            spec.notes,
        )

    monkeypatch.setattr(slurm, "slurm_cluster_kwargs", without_pin)
    with pytest.raises(
        ClusterStartError, match=r"would give each worker \d+ bytes, not the plan.s \d+"
    ):
        slurm.slurm_cluster(plan, settings)


def test_driver_scales_adaptively_up_to_jobs() -> None:
    text = _render([*CLI_CASES["stocks_driver_secret"][:2], "--jobs", "3",
                    *CLI_CASES["stocks_driver_secret"][2:]])  # fmt: skip
    # adaptive: dask-jobqueue replaces workers retiring at --lifetime only in adapt mode
    assert "export DASK_HPCBATCH__CLUSTER__ADAPT_MAXIMUM=3" in text
    assert "Up to 3 such job(s), adaptively" in text
    result = CliRunner().invoke(main, ["slurm", "render", "stocks", "--mem", "12G", "--cpus",
                                       "4", "--driver", "--jobs", "0"])  # fmt: skip
    assert result.exit_code == 2 and "--jobs must be at least 1, got 0" in result.output


# sacct -n -P -o JobID,State,ExitCode,Timelimit,Elapsed,NodeList, as on a cluster with
# accounting (the test SLURM has none): cgroup memory kill, and a time limit.
SACCT_OOM = (
    "812|OUT_OF_MEMORY|0:125|02:00:00|00:41:07|node17\n"
    "812.batch|OUT_OF_MEMORY|0:125||00:41:07|node17\n"
    "812.extern|COMPLETED|0:0||00:41:07|node17\n"
)
SACCT_TIMEOUT = (
    "813|TIMEOUT|0:0|01:00:00|01:00:12|node03\n813.batch|CANCELLED|0:15||01:00:13|node03\n"
)


def test_forgotten_job_is_read_from_sacct() -> None:
    run = FakeScheduler({}, sacct={"812": SACCT_OOM, "813": SACCT_TIMEOUT, "814": ""})
    death = slurm.explain_job("812", run=run)
    assert (death.reason, death.state, death.exit_code) == ("memory", "OUT_OF_MEMORY", "0:125")
    assert ["sacct", "-j", "812", "-n", "-P", "-o",
            "JobID,State,ExitCode,Timelimit,Elapsed,NodeList"] in run.calls  # fmt: skip
    death = slurm.explain_job("813", run=run)
    assert death.reason == "walltime" and "01:00:00" in death.detail
    with pytest.raises(HpcbatchError, match="no record of job 814"):
        slurm.explain_job("814", run=run)


def test_a_job_still_completing_gets_its_final_state_from_sacct(tmp_path) -> None:
    # scontrol still says COMPLETING (its steps being cleaned up) while sacct already
    # has TIMEOUT: `slurm why` right after the time limit says TIMEOUT, not COMPLETING
    out = tmp_path / "o.out"
    out.write_text("slurmstepd: error: *** JOB 813 ON node03 CANCELLED AT 2026-12-07T00:23:42 "
                   "DUE TO TIME LIMIT ***\n")  # fmt: skip
    line = _with_state(MEM_KILLED.format(out=out), "COMPLETING", "0:0", "TimeLimit")
    run = FakeScheduler({"813": [line]}, sacct={"813": SACCT_TIMEOUT})
    death = slurm.explain_job("813", run=run)
    assert (death.state, death.reason) == ("TIMEOUT", "walltime"), death
    # no final state in accounting yet: scontrol's word stands
    run = FakeScheduler({"813": [line]}, sacct={"813": "813|RUNNING|0:0|01:00:00|01:00:12|n\n"})
    assert slurm.explain_job("813", run=run).state == "COMPLETING"


def test_sacct_memory_kill_seen_only_on_a_step() -> None:
    sacct = "9|FAILED|0:9|UNLIMITED|00:00:02|n1\n9.batch|OUT_OF_MEMORY|0:125||00:00:02|n1\n"
    fields = slurm.sacct_record("9", run=FakeScheduler({}, sacct={"9": sacct}))
    assert fields["JobState"] == "OUT_OF_MEMORY" and fields["ExitCode"] == "0:9"


def test_no_accounting_no_record_says_what_to_pass() -> None:
    with pytest.raises(HpcbatchError, match="sacct has nothing .*: pass --jobcomp FILE"):
        slurm.explain_job("77", run=FakeScheduler({}))


def test_worker_directives_go_on_worker_jobs_not_on_the_driver() -> None:
    plan, settings = _plan()
    settings = {
        **settings,
        "cluster": {**settings["cluster"], "job-extra-directives": ["--gres=gpu:1"]},
    }
    command, command_cli = job_cli("stocks")
    kw = {"command": command, "command_cli": command_cli}
    local = slurm.render_sbatch("stocks", plan, settings, extra=["--qos=long"], **kw)
    assert "#SBATCH --gres=gpu:1" in local and "#SBATCH --qos=long" in local
    driver = slurm.render_sbatch(
        "stocks", plan, settings, extra=["--qos=long"], driver=True, **kw
    )
    assert "#SBATCH --gres=gpu:1" not in driver and "#SBATCH --qos=long" in driver
    assert slurm.slurm_cluster_kwargs(plan, settings).kwargs["job_extra_directives"] == [
        "--gres=gpu:1"
    ]


@pytest.mark.parametrize(
    "workload_args",
    [
        ["stocks", "--stocks", "5000"],
        ["stocks", "--stocks", "300", "--chunk-size", "7"],
        ["predictive", "--cells", "21761", "--features", "31467"],
    ],
)
def test_rendered_plan_is_the_plan_command_s(workload_args) -> None:
    """`slurm render` sizes the job from the same plan `hpcbatch plan` shows."""
    alloc = ["--mem", "12G", "--cpus", "4"]
    extra = ["--", "fitted/", "--out", "p.zarr"] if workload_args[0] == "predictive" else []
    text = _render(["render", *workload_args, *alloc, *extra])
    shown = CliRunner().invoke(main, ["plan", *workload_args, *alloc, "--json"])
    assert shown.exit_code == 0, shown.output
    plan = json.loads(shown.output)
    m = re.search(r"#   (\d+) worker\(s\) x (\d+) thread.*\n.*\n.*\n#   \d+ \w+s in (\d+) chunks of (\d+)",
                  text)  # fmt: skip
    assert m, text
    assert [int(g) for g in m.groups()] == [plan["n_workers"], plan["threads_per_worker"],
                                            plan["n_chunks"], plan["chunk_size"]]  # fmt: skip
    size = -(-(plan["n_workers"] * plan["memory_limit_bytes"]
               + plan["footprint"]["shared_input_bytes"] * plan["footprint"]["shared_input_mmap"]
               + plan["footprint"]["model_bytes"] * plan["footprint"]["model_mmap"]
               + plan["reserve_bytes"]) // 2**20)  # fmt: skip
    assert parse_mem(_directive(text, "mem")) == size * 2**20


def test_wait_for_job_finds_a_forgotten_job_in_sacct() -> None:
    run = FakeScheduler({}, sacct={"813": SACCT_TIMEOUT})
    assert slurm.wait_for_job("813", run=run, sleep=lambda s: None)["JobState"] == "TIMEOUT"
    with pytest.raises(HpcbatchError, match="SLURM does not know job 5"):
        slurm.wait_for_job("5", run=FakeScheduler({}), sleep=lambda s: None)


def test_a_job_accounting_has_no_state_for_yet_is_waited_for_not_a_crash() -> None:
    """slurmdbd lags behind slurmctld: sacct may print the job with an empty State
    before its final one (and an empty JobState must not crash classification)."""
    empty = "814||0:0|01:00:00|00:00:01|node03\n"
    calls = iter([empty, empty, SACCT_TIMEOUT.replace("813", "814")])
    run = FakeScheduler({}, sacct={"814": empty})
    sleeps: list[float] = []

    def lagging(argv):
        if argv[0] == "sacct":
            run.sacct["814"] = next(calls)
        return run(argv)

    info = slurm.wait_for_job("814", run=lagging, poll=0.5, sleep=sleeps.append)
    assert info["JobState"] == "TIMEOUT" and sleeps == [0.5, 0.5]
    assert slurm.job_state({"JobState": ""}) == "UNKNOWN"
    assert slurm.classify_job({"JobState": "", "ExitCode": "0:9"})[0]


def test_templates_ship_inside_the_package() -> None:
    """A non-editable install has no checkout: the templates must be package data."""
    import fnmatch

    import hpcbatch

    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")

    package = Path(hpcbatch.__file__).resolve().parent
    assert slurm.TEMPLATE_DIR.resolve().is_relative_to(package) or os.environ.get(
        "HPCBATCH_SLURM_TEMPLATES"
    )
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["hpcbatch"]
    shipped = sorted((package / "sbatch").glob("*.sbatch"))
    assert {p.name for p in shipped} >= {"local.sbatch", "driver.sbatch"}
    for path in shipped:
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data"
    # the repository's slurm/ shows the very same files
    for path in shipped:
        assert (package.parent / "slurm" / path.name).read_text() == path.read_text()


# ------------------------------------------------- the driver's worker-job size ----


def test_worker_job_size_is_not_checked_against_the_driver_allocation(monkeypatch) -> None:
    """What `stocks predict` / `run W` plan for inside a 2 GB job (SLURM_MEM_PER_NODE)."""
    from hpcbatch.errors import ResourceError
    from hpcbatch.options import run_resources

    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "2048")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    # locally the workers share this 2 GiB allocation: 3.5 GiB is refused, as before
    with pytest.raises(ResourceError, match="--mem 3.50 GiB is more than the 2.00 GiB this"):
        run_resources("3584M", 1, "local")
    # with SLURM workers it is each worker job's size, a new allocation: planned ahead
    res = run_resources("3584M", 2, "slurm")
    assert (res.memory_bytes, res.cpus, res.planned_ahead) == (3584 * 2**20, 2, True)
    # the old --mem-gb reaches here as exact bytes
    assert run_resources(3_500_000_000, None, "slurm").memory_bytes == 3_500_000_000


# ----------------------------------------------------------- the stock count ----


@pytest.fixture(scope="module")
def seven_stock_db(tmp_path_factory) -> str:
    from hpcbatch.stocks.generate import generate_market
    from hpcbatch.stocks.schema import make_engine

    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 's.db'}"
    engine = make_engine(url, create=True)
    generate_market(engine, 7, 30, seed=1)
    engine.dispose()
    return url


def _rendered_count(*argv: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        main, ["slurm", "render", "stocks", "--mem", "12G", "--cpus", "4", *argv]
    )
    assert result.exit_code == 0, result.output
    n = int(re.search(r"^#   (\d+) stocks in \d+ chunks", result.stdout, re.M).group(1))
    return n, result.stdout, result.stderr


def test_render_plans_for_the_stocks_in_the_db(seven_stock_db: str) -> None:
    n, script, _ = _rendered_count("--", "--db", seven_stock_db)
    assert n == 7
    assert "the stock count was read from the --db database" in script
    assert "assumed" not in script
    # --offset/--limit choose the stocks as `stocks predict` does; --db=URL is read too
    assert _rendered_count("--", f"--db={seven_stock_db}", "--offset", "2")[0] == 5
    assert _rendered_count("--", "--db", seven_stock_db, "--limit", "3")[0] == 3
    # --stocks wins
    n, script, _ = _rendered_count("--stocks", "40", "--", "--db", seven_stock_db)
    assert n == 40 and "read from the --db" not in script


def test_render_says_the_stock_count_is_assumed(tmp_path) -> None:
    n, script, _ = _rendered_count()
    assert n == 5000
    assert "#   5000 stocks assumed (no --db after -- to count them)" in script
    n, script, err = _rendered_count("--", "--db", f"sqlite:///{tmp_path / 'missing.db'}")
    assert n == 5000
    assert "#   5000 stocks assumed: the --db database could not be read" in script
    assert "could not count the stocks in --db" in err and "missing.db does not exist" in err


# ------------------------------------------------------------------ dashboard ----


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("127.0.0.1:8787", "127.0.0.1"),
        ("127.0.0.1:0", "127.0.0.1"),
        ("[::1]:8787", "::1"),
        ("node7:9000", "node7"),
        (":8787", None),
        ("0.0.0.0:8787", None),
        ("8787", None),
        (None, None),
    ],
)
def test_dashboard_host(address, host) -> None:
    assert slurm.dashboard_host(address) == host


@pytest.mark.parametrize("configured", [None, "", "127.0.0.1:8787"])
def test_slurm_dashboard_listens_on_loopback_unless_configured(configured) -> None:
    plan, settings = _plan()
    settings = {**settings, "cluster": {**settings["cluster"], "dashboard-address": configured}}
    kw = slurm.slurm_cluster_kwargs(plan, settings).kwargs
    assert kw["scheduler_options"] == {"dashboard_address": "127.0.0.1:8787"}
    settings["cluster"]["dashboard-address"] = ":9999"  # asked for every interface
    kw = slurm.slurm_cluster_kwargs(plan, settings).kwargs
    assert kw["scheduler_options"] == {"dashboard_address": ":9999"}


def test_slurm_dashboard_link_names_the_loopback_it_listens_on() -> None:
    import psutil

    pytest.importorskip("dask_jobqueue")
    plan, settings = _plan()
    settings = {**settings, "cluster": {**settings["cluster"], "dashboard-address": "127.0.0.1:0"}}
    cluster = slurm.slurm_cluster(plan, settings)  # no interface: the scheduler on every one
    try:
        port = cluster.scheduler_info["services"]["dashboard"]
        listening = {
            c.laddr.port: c.laddr.ip
            for c in psutil.Process().net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening[port] == "127.0.0.1"
        assert cluster.dashboard_link == f"http://127.0.0.1:{port}/status"
    finally:
        cluster.close()
