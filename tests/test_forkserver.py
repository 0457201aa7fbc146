"""A job's ``worker_preload``: local workers forked from one server that imported it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# In a fresh interpreter: a forkserver keeps the preload list it started with, and the
# test session may have started one already (predictive and stocks runs do).
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from distributed import Client, LocalCluster
    from hpcbatch.cluster import forkserver_workers

    PRELOAD = "xml.dom.minidom"  # imported by nothing else a worker runs

    def state():
        return {"preloaded": PRELOAD in sys.modules, "ppid": os.getppid()}

    if __name__ == "__main__":
        with forkserver_workers([PRELOAD]), LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster, Client(cluster) as client:
            states = list(client.run(state).values())
        import dask
        after = dask.config.get("distributed.worker.multiprocessing-method")
        print("RESULT " + json.dumps({"states": states, "me": os.getpid(), "after": after}))
    """
)


def test_local_workers_fork_from_a_server_that_imported_the_preload(tmp_path) -> None:
    script = tmp_path / "fork.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)  # fmt: skip
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr
    result = json.loads(lines[-1][len("RESULT ") :])
    states = result["states"]
    assert len(states) == 2
    assert all(s["preloaded"] for s in states), states
    # forked by one forkserver, not spawned by this process's nannies
    assert all(s["ppid"] != result["me"] for s in states), states
    assert len({s["ppid"] for s in states}) == 1, states
    # outside the block, workers start as Dask starts them
    assert result["after"] == "spawn"


WARM = textwrap.dedent(
    """
    import json, sys
    from multiprocessing import forkserver
    from hpcbatch.pipeline import ClusterChoice, warm_workers
    from hpcbatch.workload import Workload

    class Heavy(Workload):
        name = "heavy"
        worker_preload = ("xml.dom.minidom",)

    def server():
        pid = forkserver._forkserver._forkserver_pid
        if pid is None:
            return None
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")

    seen = {}
    for backend in ("slurm", "address"):  # workers not forked here: nothing started
        warm_workers(Heavy(), ClusterChoice(backend, "tcp://127.0.0.1:1"))
        seen[backend] = server()
    warm_workers(Heavy(), ClusterChoice("local"), client=object())
    seen["client"] = server()
    warm_workers(Heavy(), ClusterChoice("local"))
    seen["local"] = server()
    seen["imported here"] = "xml.dom.minidom" in sys.modules
    print("RESULT " + json.dumps(seen))
    """
)


def test_a_local_run_starts_its_workers_forkserver_before_the_job_is_prepared() -> None:
    out = subprocess.run([sys.executable, "-c", WARM], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert seen["slurm"] is None and seen["address"] is None and seen["client"] is None
    # started, importing the workload's preload in its own process, not in the driver's
    assert seen["local"] is not None and "xml.dom.minidom" in seen["local"]
    assert seen["imported here"] is False
