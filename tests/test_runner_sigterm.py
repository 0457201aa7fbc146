"""SIGTERM when the cluster has no workers left: an interrupted run, not a failed one.

SLURM sends SIGTERM at walltime to the driver and, in the same breath, ends the worker
jobs; a run stopped that way must say "interrupted" (exit code 3, "resume with ...")
exactly like an ordinary SIGTERM, not "failed" because the no-worker watchdog fired
while the driver waited for chunks that could no longer finish.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import runtime_helpers as rh

from hpcbatch.cluster import open_cluster
from hpcbatch.errors import RunInterrupted

pytestmark = pytest.mark.timeout(180)


def test_sigterm_with_no_workers_left_is_interrupted_not_failed(tmp_path):
    plan, settings, ledger = rh.slow_run_setup(tmp_path)
    # a SIGTERM arriving after run() restored its handler must not kill pytest
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with open_cluster(plan, settings, quiet=True) as c:

            def walltime():  # the workers' jobs end, then the driver gets SIGTERM
                deadline = rh.wait_done(ledger, "walltime", 3)
                c.cluster.scale(0)
                while time.monotonic() < deadline and c.scheduler_info(n_workers=1)["workers"]:
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGTERM)

            killer = threading.Thread(target=walltime, daemon=True)
            killer.start()
            t0 = time.monotonic()
            with pytest.raises(RunInterrupted) as err:
                rh.run_slow(
                    c,
                    ledger,
                    tmp_path,
                    "walltime",
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
