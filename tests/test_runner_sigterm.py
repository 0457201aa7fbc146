"""SIGTERM when the cluster has no workers left: an interrupted run, not a failed one.

SLURM sends SIGTERM at walltime to the driver and, in the same breath, ends the worker
jobs; a run stopped that way must say "interrupted" (exit code 3, "resume with ...")
exactly like an ordinary SIGTERM, not "failed" because the no-worker watchdog fired
while the driver waited for chunks that could no longer finish.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time

import pytest
import runtime_helpers as rh

from hpcbatch.cluster import open_cluster
from hpcbatch.config import load
from hpcbatch.errors import RunInterrupted
from hpcbatch.ledger import Ledger
from hpcbatch.runner import make_chunks, run

pytestmark = pytest.mark.timeout(180)


def test_sigterm_with_no_workers_left_is_interrupted_not_failed(tmp_path):
    plan = rh.small_plan(200, 2)
    settings = load(overrides={"cluster": {"dashboard-address": "127.0.0.1:0"}})
    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    task = functools.partial(rh.slow_logged, base=str(tmp_path))
    # a SIGTERM arriving after run() restored its handler must not kill pytest
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with open_cluster(plan, settings, quiet=True) as c:

            def walltime():  # the workers' jobs end, then the driver gets SIGTERM
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and len(ledger.done_ids("walltime")) < 3:
                    time.sleep(0.05)
                c.cluster.scale(0)
                while time.monotonic() < deadline and c.scheduler_info(n_workers=1)["workers"]:
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGTERM)

            killer = threading.Thread(target=walltime, daemon=True)
            killer.start()
            t0 = time.monotonic()
            with pytest.raises(RunInterrupted) as err:
                run(
                    make_chunks(200, 2),
                    task,
                    c,
                    run_id="walltime",
                    ledger=ledger,
                    progress=False,
                    report_dir=tmp_path,
                    no_worker_timeout_s=3,
                    grace_period_s=60,
                    resume_hint="resume with --resume",
                )
            waited = time.monotonic() - t0
            killer.join(5)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert err.value.exit_code == 3
    message = str(err.value)
    assert "\n" not in message and "SIGTERM" in message
    assert message.endswith("resume with --resume")
    done = ledger.done_ids("walltime")
    assert 3 <= len(done) < 100
    assert f"{len(done) * 2} of 200 items done" in message
    saved = json.loads((tmp_path / "walltime" / "report.json").read_text())
    assert saved["status"] == "interrupted"
    assert ledger.run_info("walltime")["status"] == "interrupted"
    # no chunk could finish without workers: the driver did not sit out the grace period
    assert waited < 45
