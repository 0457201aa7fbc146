"""Time from "PostgreSQL stopped for good" to the stocks driver's exit, then the resume.

``python tests/faults/measure_db_gone.py WORK_DIR [--resume]`` (from the repository
root): a throwaway PostgreSQL with the fault suite's market (24 stocks, 12 chunks), a
driver started with a 0.7 s delay per chunk, the server fast-stopped once 3 chunks are
committed and never started again; prints JSON (``seconds_stop_to_exit``, exit code)
and the last lines of the driver's stderr.  With ``--resume`` the server is then
started again and the run resumed: chunks skipped / run, rows, checksum.  Uses the
configured ``database-outage-timeout`` (``DASK_HPCBATCH__DATABASE_OUTAGE_TIMEOUT``).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # services.py
sys.path.insert(0, str(HERE))  # the fault suite's helpers (faultkit)

import services  # noqa: E402
from faultkit import (  # noqa: E402
    DAYS,
    N_STOCKS,
    checksum,
    done_chunks,
    make_stock_inputs,
    prediction_rows,
    start_stocks,
    wait_until,
)


def main(base: Path, resume: bool) -> None:
    server = services.PostgresServer().start()
    try:
        make_stock_inputs(base, N_STOCKS, DAYS, url=server.url)
        proc = start_stocks(server.url, base / "model", base / "reports", delay_s=0.7)
        wait_until(lambda: done_chunks(server.url) >= 3, proc, what="3 chunks")
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(60)
        t0 = time.monotonic()
        _out, err = proc.communicate(timeout=3600)
        took = round(time.monotonic() - t0, 1)
        print(json.dumps({"seconds_stop_to_exit": took, "rc": proc.returncode}), flush=True)
        print("stderr tail:\n" + "\n".join(err.splitlines()[-4:]), flush=True)
        if not resume:
            return
        assert server._start_postmaster(), server.log_tail()
        committed = done_chunks(server.url)
        t1 = time.monotonic()
        proc = start_stocks(server.url, base / "model", base / "reports", "--resume")
        out, err = proc.communicate(timeout=3600)
        report = json.loads(out.splitlines()[-1]) if proc.returncode == 0 else {}
        rows = prediction_rows(server.url)
        print(json.dumps({
            "committed_before_resume": committed, "resume_rc": proc.returncode,
            "resume_s": round(time.monotonic() - t1, 1),
            "chunks_skipped": report.get("chunks_skipped"),
            "chunks_run": report.get("chunks_done"),
            "rows": len(rows), "checksum": checksum(rows), "done_after": done_chunks(server.url),
        }), flush=True)  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--resume" in sys.argv[2:])
