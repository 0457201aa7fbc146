"""A stocks driver for the fault tests: ``hpcbatch.stocks.predict`` with fixed small settings.

``python drive_stocks.py DB_URL MODEL_DIR REPORT_DIR [--resume]``; prints the run
report as JSON on stdout; an HpcbatchError is one ``error:`` line and its exit code,
as the CLI does.  ``HPCBATCH_FAULT_DRIVER_MEMORY`` (bytes, default 3 GB) is the
allocation planned for (2 CPUs), which sets the workers' memory limit.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    from hpcbatch import config
    from hpcbatch.errors import HpcbatchError
    from hpcbatch.resources import detect_resources
    from hpcbatch.stocks.predict import PredictOptions, predict

    db_url, model_dir, report_dir = argv[:3]
    settings = config.load(overrides={"report-dir": report_dir})
    settings["cluster"]["dashboard-address"] = "127.0.0.1:0"
    opts = PredictOptions.from_settings(
        settings["stocks"], lookback_days=180, predict_days=5, batch_size=2, use_gpu="false"
    )
    memory = int(os.environ.get("HPCBATCH_FAULT_DRIVER_MEMORY", 3_000_000_000))
    try:
        report = predict(
            db_url,
            model_dir,
            settings=settings,
            options=opts,
            resources=detect_resources(memory_bytes=memory, cpus=2, plan_ahead=True),
            progress=False,
            quiet=True,
            resume="--resume" in argv,
        )
    except HpcbatchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    print(json.dumps(report.to_dict(), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
