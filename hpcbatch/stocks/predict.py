"""``hpcbatch.stocks.predict.predict``: stock batch prediction from Python.

A thin entry over the pipeline: the settings are read once here, the
:class:`~hpcbatch.stocks.workload.StocksWorkload` prepares the job (database, data and
model checked before anything starts) and :func:`hpcbatch.pipeline.run_job` plans it,
opens the cluster and runs it.  The per-chunk task lives in :mod:`hpcbatch.stocks.task`
(re-exported here).

Convention: a prediction row's ``trade_date`` is the last day of its window (the day the
prediction is made on); ``predicted_return`` is the model's next-trading-day close-to-close
return as a fraction (0.012 = +1.2 %), de-normalised from the model's units.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import config as hb_config
from ..pipeline import ClusterChoice, RunRequest, run_job, warm_workers
from ..report import RunReport
from .footprint import cpu_batch
from .task import (
    PredictOptions,
    PredictTask,
    compute_chunk,
    default_run_id,
    inference_batch,
    input_fingerprint,
    predict_chunk,
    prediction_rows,
    prepare,
    run_params,
)
from .workload import WORKLOAD

__all__ = [
    "PredictOptions",
    "PredictTask",
    "compute_chunk",
    "cpu_batch",
    "default_run_id",
    "inference_batch",
    "input_fingerprint",
    "predict",
    "predict_chunk",
    "prediction_rows",
    "prepare",
    "run_params",
]


def predict(
    db_url: str,
    model_dir: str,
    *,
    settings: Mapping[str, Any] | None = None,
    options: PredictOptions | None = None,
    resources: Any = None,
    backend: str | None = None,
    address: str | None = None,
    client: Any = None,
    resume: bool = False,
    run_id: str | None = None,
    report_dir: str | None = None,
    progress: bool = True,
    quiet: bool = False,
    calibrate: bool | None = None,
    probe_sizes: tuple[int, int] | None = None,
) -> RunReport:
    """Predict every selected stock and write the predictions; returns the RunReport.

    ``backend``/``address``: ``local``, ``slurm``, or ``address`` with a scheduler
    address or file (planned for the workers there); ``client``: run on this client's
    cluster (planned for its workers).
    """
    settings = dict(settings) if settings is not None else hb_config.load()
    opts = options or PredictOptions.from_settings(settings["stocks"])
    cluster = settings["cluster"]
    choice = ClusterChoice(backend or cluster["backend"], address or cluster["address"])
    warm_workers(WORKLOAD, choice, client)  # the workers' imports overlap the checks
    job = WORKLOAD.prepare_options(str(db_url), str(model_dir), opts)
    request = RunRequest(
        cluster=choice, resources=resources, client=client, resume=resume, run_id=run_id,
        report_dir=report_dir, progress=progress, quiet=quiet, calibrate=calibrate,
        probe_sizes=probe_sizes,
    )  # fmt: skip
    return run_job(job, settings, request)
