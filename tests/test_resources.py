"""Allocation detection against fake SLURM environments and fake cgroup trees."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcbatch.errors import ResourceError
from hpcbatch.resources import (
    cgroup_cpus,
    cgroup_memory,
    detect_resources,
    host_cpus,
    slurm_cpus,
    slurm_memory,
)

GiB = 1024**3
MiB = 1024**2
V1_UNLIMITED = "9223372036854771712"


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def cgroup_v1(root: Path, path: str, limits: dict[str, str], cpu: dict[str, str] | None = None):
    """A v1 host: /proc/self/cgroup names ``path`` for memory and cpu; limits per level."""
    write(root, "proc/self/cgroup", f"4:memory:{path}\n1:cpu,cpuacct:{path}\n0::/")
    for rel, value in limits.items():
        write(root, f"sys/fs/cgroup/memory/{rel}/memory.limit_in_bytes".replace("//", "/"), value)
    for rel, quota in (cpu or {}).items():
        base = f"sys/fs/cgroup/cpu/{rel}".replace("//", "/").rstrip("/")
        write(root, f"{base}/cpu.cfs_quota_us", quota)
        write(root, f"{base}/cpu.cfs_period_us", "100000")


def cgroup_v2(root: Path, path: str, limits: dict[str, str], cpu: dict[str, str] | None = None):
    write(root, "proc/self/cgroup", f"0::{path}")
    write(root, "sys/fs/cgroup/cgroup.controllers", "cpu memory pids")
    for rel, value in limits.items():
        write(root, f"sys/fs/cgroup/{rel}/memory.max".replace("//", "/"), value)
    for rel, value in (cpu or {}).items():
        write(root, f"sys/fs/cgroup/{rel}/cpu.max".replace("//", "/"), value)


# ------------------------------------------------------------------ SLURM ----


def test_slurm_mem_per_node_is_mebibytes():
    lim = slurm_memory({"SLURM_MEM_PER_NODE": "12288"})
    assert lim.value == 12 * GiB
    assert "SLURM_MEM_PER_NODE" in lim.source


def test_slurm_mem_per_cpu_times_cpus_per_task():
    lim = slurm_memory({"SLURM_MEM_PER_CPU": "2048", "SLURM_CPUS_PER_TASK": "6"})
    assert lim.value == 12 * GiB
    assert "SLURM_MEM_PER_CPU" in lim.source and "6 CPUs" in lim.source


def test_slurm_mem_per_cpu_uses_this_nodes_share_of_job_cpus():
    env = {"SLURM_MEM_PER_CPU": "1000", "SLURM_JOB_CPUS_PER_NODE": "4(x2),2", "SLURM_NODEID": "2"}
    assert slurm_cpus(env).value == 2
    assert slurm_memory(env).value == 2 * 1000 * MiB


@pytest.mark.parametrize(
    ("text", "node", "expected"),
    [("4(x2)", None, 4), ("4(x2)", "1", 4), ("8", None, 8), ("2,16", "1", 16), ("3(x2),7", "2", 7)],
)
def test_slurm_job_cpus_per_node_lists(text, node, expected):
    env = {"SLURM_JOB_CPUS_PER_NODE": text}
    if node is not None:
        env["SLURM_NODEID"] = node
    lim = slurm_cpus(env)
    assert lim.value == expected
    assert "SLURM_JOB_CPUS_PER_NODE" in lim.source


def test_slurm_cpus_per_task_wins_over_node_count():
    env = {"SLURM_CPUS_PER_TASK": "3", "SLURM_JOB_CPUS_PER_NODE": "16"}
    assert slurm_cpus(env).value == 3


def test_slurm_mem_zero_means_no_slurm_limit():
    assert slurm_memory({"SLURM_MEM_PER_NODE": "0"}) is None


@pytest.mark.parametrize(
    "env",
    [{"SLURM_MEM_PER_NODE": "12G"}, {"SLURM_JOB_CPUS_PER_NODE": "four"}],
)
def test_malformed_slurm_variables_name_the_variable(env):
    with pytest.raises(ResourceError, match=next(iter(env))):
        detect_resources(env=env, root="/nonexistent", probe_gpus=False)


def test_detect_takes_the_tighter_of_slurm_and_host(tmp_path):
    env = {"SLURM_MEM_PER_NODE": "1024", "SLURM_CPUS_PER_TASK": "1"}
    res = detect_resources(env=env, root=tmp_path, probe_gpus=False)
    assert res.memory_bytes == GiB
    assert res.memory_source.startswith("SLURM_MEM_PER_NODE")
    assert res.cpus == 1 and res.cpus_source == "SLURM_CPUS_PER_TASK"


def test_slurm_bigger_than_host_loses_to_host(tmp_path):
    env = {"SLURM_MEM_PER_NODE": str(100 * 1024 * 1024)}  # 100 TiB
    res = detect_resources(env=env, root=tmp_path, probe_gpus=False)
    assert "SLURM" not in res.memory_source
    assert any("SLURM" in c.source for c in res.memory_candidates)


# ---------------------------------------------------------------- cgroups ----


def test_cgroup_v1_limit_deeper_than_root(tmp_path):
    cgroup_v1(
        tmp_path,
        "/slurm/uid_0/job_7/step_0",
        {
            "": V1_UNLIMITED,
            "slurm": V1_UNLIMITED,
            "slurm/uid_0": V1_UNLIMITED,
            "slurm/uid_0/job_7": str(3 * GiB),
            "slurm/uid_0/job_7/step_0": V1_UNLIMITED,
        },
    )
    lim = cgroup_memory(tmp_path)
    assert lim.value == 3 * GiB
    assert "cgroup v1" in lim.source and "job_7/memory.limit_in_bytes" in lim.source
    res = detect_resources(env={}, root=tmp_path, probe_gpus=False)
    assert res.memory_bytes == 3 * GiB


def test_cgroup_v1_tightest_level_wins(tmp_path):
    cgroup_v1(tmp_path, "/a/b", {"": V1_UNLIMITED, "a": str(2 * GiB), "a/b": str(5 * GiB)})
    assert cgroup_memory(tmp_path).value == 2 * GiB


def test_cgroup_v2_nested_limit(tmp_path):
    cgroup_v2(
        tmp_path,
        "/user.slice/job.scope/worker",
        {
            "user.slice": "max",
            "user.slice/job.scope": str(1536 * MiB),
            "user.slice/job.scope/worker": "max",
        },
    )
    lim = cgroup_memory(tmp_path)
    assert lim.value == 1536 * MiB
    assert lim.source.startswith("cgroup v2") and "job.scope/memory.max" in lim.source


def test_cgroup_unlimited_everywhere_gives_no_limit(tmp_path):
    cgroup_v2(tmp_path, "/a/b", {"a": "max", "a/b": "max"})
    assert cgroup_memory(tmp_path) is None
    cgroup_v1(tmp_path / "v1", "/a", {"": V1_UNLIMITED, "a": V1_UNLIMITED})
    assert cgroup_memory(tmp_path / "v1") is None
    res = detect_resources(env={}, root=tmp_path, probe_gpus=False)
    assert "cgroup" not in res.memory_source


def test_container_relative_path_without_cgroup_namespace(tmp_path):
    # /proc/self/cgroup names the host's path; only the container's own cgroup is mounted.
    write(tmp_path, "proc/self/cgroup", "0::/docker/abc123")
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "memory cpu")
    write(tmp_path, "sys/fs/cgroup/memory.max", str(768 * MiB))
    write(tmp_path, "sys/fs/cgroup/cpu.max", "150000 100000")
    assert cgroup_memory(tmp_path).value == 768 * MiB
    assert cgroup_cpus(tmp_path).value == 2


def test_mountinfo_subtree_mount(tmp_path):
    # A v1 hierarchy mounted from a subtree (the mount's root is /kubepods/pod1).
    write(
        tmp_path,
        "proc/self/mountinfo",
        "35 31 0:32 /kubepods/pod1 /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct",
    )
    write(
        tmp_path,
        "proc/self/cgroup",
        "4:memory:/kubepods/pod1/ctr\n1:cpu,cpuacct:/kubepods/pod1/ctr",
    )
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", str(4 * GiB))
    write(tmp_path, "sys/fs/cgroup/memory/ctr/memory.limit_in_bytes", V1_UNLIMITED)
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/cpu.cfs_quota_us", "250000")
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/cpu.cfs_period_us", "100000")
    assert cgroup_memory(tmp_path).value == 4 * GiB
    lim = cgroup_cpus(tmp_path)
    assert lim.value == 3  # 2.5 CPUs of quota: round up
    assert "cpu.cfs_quota_us" in lim.source


def test_cgroup_cpu_quota_v1_and_unlimited(tmp_path):
    cgroup_v1(tmp_path, "/job", {"": V1_UNLIMITED}, cpu={"": "-1", "job": "200000"})
    assert cgroup_cpus(tmp_path).value == 2
    cgroup_v1(tmp_path / "none", "/job", {"": V1_UNLIMITED}, cpu={"": "-1", "job": "-1"})
    assert cgroup_cpus(tmp_path / "none") is None


def test_cgroup_cpu_quota_v2_max_is_unlimited(tmp_path):
    cgroup_v2(tmp_path, "/a", {}, cpu={"": "max 100000", "a": "max 100000"})
    assert cgroup_cpus(tmp_path) is None
    cgroup_v2(tmp_path / "q", "/a", {}, cpu={"a": "50000 100000"})
    assert cgroup_cpus(tmp_path / "q").value == 1


def test_cgroup_cpu_quota_narrows_detected_cpus(tmp_path):
    cgroup_v2(tmp_path, "/a", {}, cpu={"a": "100000 100000"})
    res = detect_resources(env={}, root=tmp_path, probe_gpus=False)
    assert res.cpus == 1 and "quota" in res.cpus_source


def test_slurm_and_cgroup_tightest_wins(tmp_path):
    cgroup_v2(tmp_path, "/job", {"job": str(2 * GiB)})
    res = detect_resources(env={"SLURM_MEM_PER_NODE": "4096"}, root=tmp_path, probe_gpus=False)
    assert res.memory_bytes == 2 * GiB and "cgroup v2" in res.memory_source
    res = detect_resources(env={"SLURM_MEM_PER_NODE": "1024"}, root=tmp_path, probe_gpus=False)
    assert res.memory_bytes == GiB and "SLURM" in res.memory_source


def test_this_machine_detects_something():
    res = detect_resources(env={}, probe_gpus=False)
    assert res.memory_bytes > 0 and res.cpus >= 1
    assert res.memory_source and res.cpus_source


# -------------------------------------------------------------- overrides ----


def test_overrides_plan_ahead_may_exceed_machine(tmp_path):
    res = detect_resources(
        memory_bytes=500 * 10**9, cpus=64, gpus=2, env={}, root=tmp_path, plan_ahead=True
    )
    assert (res.memory_bytes, res.cpus, len(res.gpus)) == (500 * 10**9, 64, 2)
    assert res.planned_ahead and res.memory_source == "override (--mem-gb)"
    assert any("16 GiB" in n for n in res.notes)


def test_overrides_when_running_now_may_only_narrow(tmp_path):
    too_many = host_cpus().value + 1
    with pytest.raises(ResourceError, match="--cpus .* is more than"):
        detect_resources(cpus=too_many, env={}, root=tmp_path, probe_gpus=False)
    with pytest.raises(ResourceError, match="--mem-gb .* is more than"):
        detect_resources(memory_bytes=10**15, env={}, root=tmp_path, probe_gpus=False)
    res = detect_resources(memory_bytes=10**9, cpus=1, env={}, root=tmp_path, probe_gpus=False)
    assert res.memory_bytes == 10**9 and res.cpus == 1 and not res.planned_ahead


@pytest.mark.parametrize("kwargs", [{"memory_bytes": 0}, {"cpus": -2}, {"gpus": -1}])
def test_overrides_must_be_positive(tmp_path, kwargs):
    with pytest.raises(ResourceError, match="must be"):
        detect_resources(env={}, root=tmp_path, probe_gpus=False, plan_ahead=True, **kwargs)


# ----------------------------------------------------------------- psutil ----


def test_works_without_psutil_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    write(tmp_path, "proc/meminfo", "MemTotal: 16000000 kB\nMemAvailable: 8000000 kB")
    res = detect_resources(env={"SLURM_MEM_PER_NODE": "2048"}, root=tmp_path, probe_gpus=False)
    assert res.memory_bytes == 2 * GiB
    assert any("psutil is not installed" in n for n in res.notes)
    host = next(c for c in res.memory_candidates if "os.sysconf" in c.source)
    assert "psutil not installed" in host.source and host.value > 0
    assert res.available_memory_bytes == 8_000_000 * 1024
    assert res.available_memory_source == "/proc/meminfo MemAvailable"


def test_without_psutil_or_meminfo_available_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    res = detect_resources(env={}, root=tmp_path, probe_gpus=False)
    assert res.available_memory_bytes is None
    assert any("unknown" in n for n in res.notes)
    assert res.memory_bytes > 0


def test_no_gpu_driver_reports_why(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    res = detect_resources(env={}, root=tmp_path)
    assert res.gpus == () and "no GPU driver" in res.gpus_source
    assert res.to_dict()["gpus_source"] == res.gpus_source


def test_this_machines_own_cgroup_directory_is_checked():
    """On the real machine the process's own (possibly nested) cgroup is among those read."""
    from hpcbatch.resources import _cgroup_dirs, _own_cgroups

    own = _own_cgroups(Path("/"))
    path = own.get("memory") or own.get("v2")
    if not path or path == "/":
        pytest.skip("this process sits in the root cgroup: nothing nested to find")
    dirs = [d for d, _ in _cgroup_dirs(Path("/"), "memory")]
    if not dirs:
        pytest.skip("no cgroup filesystem mounted here")
    assert any(str(d).endswith(path.rstrip("/")) for d in dirs), (path, dirs)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["v1", "v2"]),
    st.lists(st.one_of(st.none(), st.integers(2**20, 2**40)), min_size=1, max_size=5),
)
def test_property_tightest_level_of_any_nesting_wins(version, levels):
    """Whatever level of a nested hierarchy carries a limit, the smallest one is found."""
    names = [f"l{i}" for i in range(len(levels))]
    unlimited = V1_UNLIMITED if version == "v1" else "max"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        limits = {
            "/".join(names[: i + 1]): unlimited if v is None else str(v)
            for i, v in enumerate(levels)
        }
        path = "/" + "/".join(names)
        if version == "v1":
            cgroup_v1(root, path, {"": V1_UNLIMITED, **limits})
        else:
            cgroup_v2(root, path, limits)
        found = cgroup_memory(root)
        real = [v for v in levels if v is not None]
        if not real:
            assert found is None
        else:
            assert found.value == min(real)
            assert found.source.startswith(f"cgroup {version}")
