"""Stock batch prediction as a :class:`~hpcbatch.workload.Workload`.

``stocks``: SQL bars -> 105 features -> 60-day windows -> the torch model -> predictions
upserted back into the same database, each chunk's rows and its ledger row in one
transaction (exactly once).  Registered through the ``hpcbatch.workloads`` entry point
like any plugin; its job runs ``hpcbatch stocks predict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import click

from ..config import require_positive
from ..errors import ConfigError
from ..options import renamed_option
from ..planner import Footprint, Plan
from ..report import quarantine_line
from ..security import database_url
from ..workload import (
    Invocation,
    Job,
    JobSizes,
    PreloadSaving,
    RunContext,
    RunIdentity,
    Sink,
    Workload,
    typed_settings,
)
from .footprint import (
    FORKSERVER_MEASURED,
    FORKSERVER_SAVING_BYTES,
    MAX_CHUNK_STOCKS,
    SOURCE,
    WORKER_HEAP,
    stocks_footprint,
)
from .schema import make_engine, masked
from .sink import list_codes, select_codes
from .task import PredictOptions, PredictTask, Prepared, default_run_id, prepare, run_params

# A local cluster's workers are forked from a server that imported these once: no torch
# import on each worker's first chunk (~1.2 s on the 2-core machine), pages shared.
WORKER_PRELOAD = ("numpy", "torch", "sqlalchemy", "hpcbatch.stocks.model", "hpcbatch.stocks.task")
# What those forked workers hold less than spawned ones (SLURM, an existing cluster):
# the pipeline takes it off the analytic footprint where it forks them.
FORKSERVER_SAVING = PreloadSaving(FORKSERVER_SAVING_BYTES, SOURCE, FORKSERVER_MEASURED)

PROBE = "hpcbatch.stocks.probe:probe"
#: Stocks planned for when neither --stocks nor a readable --db after -- says how many.
ASSUMED_STOCKS = 5000


@dataclass(frozen=True)
class StocksSettings:
    """The ``stocks`` config section, typed."""

    db: str
    model_dir: str
    batch_size: int | None
    concurrency: int
    lookback_days: int
    predict_days: int
    use_gpu: Any
    limit: int | None
    offset: int
    model_version: str
    upsert_rows: int
    strict: bool = False

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> StocksSettings:
        return typed_settings(cls, section)

    def section(self) -> dict:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


class StocksJob(Job):
    """A checked stocks run: the codes to predict, the model, the database."""

    def __init__(self, workload: Workload, db_url: str, model_dir: str, opts: PredictOptions,
                 prep: Prepared):  # fmt: skip
        self.workload = workload
        self.db_url, self.model_dir, self.opts, self.prep = db_url, model_dir, opts, prep
        self.footprint = prep.footprint
        self.items = prep.codes
        self.worker_preload = WORKER_PRELOAD
        self.preload_saving = FORKSERVER_SAVING
        self.worker_heap = WORKER_HEAP
        self.sink = Sink(ledger_url=str(db_url), commit_on_worker=True, database=str(db_url),
                         description="table stock_predictions")  # fmt: skip
        self.identity = RunIdentity(
            default_run_id(db_url, model_dir, opts, prep.inputs),
            run_params(db_url, model_dir, opts, prep.inputs),
        )
        self.probe_kwargs = {
            "lookback_days": opts.lookback_days,
            "predict_days": opts.predict_days,
            "model_config": asdict(prep.model_config),
        }
        self.probe_sizes = (32, 96)

    def plan_overrides(self) -> dict:
        return {
            "chunk_size": self.opts.batch_size,
            "use_gpu": self.prep.device != "cpu",
        }

    def summary(self, report: Any) -> str:
        """How many predictions landed where (what ``stocks predict`` prints)."""
        meta = report.results_meta or {}
        if report.status == "already-finished":
            return (
                f"nothing new to predict: run {report.run_id} finished earlier with the same "
                f"bars, model and settings; its predictions are in stock_predictions of "
                f"{masked(self.db_url)} (give --run-id NAME to run again anyway)"
            )
        text = (
            f"predictions: {meta.get('predictions', 0)} rows upserted into stock_predictions of "
            f"{masked(self.db_url)} ({meta.get('stocks_predicted', 0)} stocks predicted, "
            f"{meta.get('stocks_skipped_short', 0)} skipped with too few rows, "
            f"{meta.get('stocks_missing', 0)} without rows, "
            f"{len(report.quarantined)} quarantined)"
        )
        if report.quarantined:
            text += "\n" + quarantine_line(report.quarantined, "stock")
        if meta.get("stocks_flagged_jump"):
            text += f"\n{meta['stocks_flagged_jump']} stock(s) with a 10x price jump: kept"
        return text + (f"\nreport: {report.report_dir}" if report.report_dir else "")

    def task(self, plan: Plan, run: RunContext) -> PredictTask:
        from distributed import Semaphore  # parallel database reads capped at --concurrency

        from .model import plan_threads  # torch: imported when a run starts, not by `plan`

        sem = Semaphore(max_leases=self.opts.concurrency, name=f"hpcbatch-db-reads-{run.run_id}")
        return replace(
            self.prep.task,
            run_id=run.run_id,
            planned_gpu_batch=plan.gpu_batch_size,
            db_outage_s=run.settings.db_outage_s,
            gpu_memory_fraction=run.settings.gpu_memory_fraction,
            read_semaphore=sem,
            torch_threads=plan_threads(plan.resources.cpus, plan.n_workers, plan.threads_per_worker),
        )


def _size_options() -> list:
    return [
        click.Option(["--stocks", "n_stocks"], type=int, default=None,
                     help=f"Stocks to plan for (default: counted in the job's --db when "
                     f"rendering a script, else {ASSUMED_STOCKS})."),
        click.Option(["--lookback-days"], type=int, default=None,
                     help="Days fetched per stock (default 400)."),
        click.Option(["--predict-days"], type=int, default=None,
                     help="Trading days predicted per stock (default 10)."),
        click.Option(["--chunk-size", "batch_size"], type=int, default=None,
                     help="Fix the stocks per chunk."),
        renamed_option("--batch-size", "--chunk-size", "batch_size", type=int),
        click.Option(["--use-gpu"], is_flag=True, help="Size the GPU inference batch too."),
    ]  # fmt: skip


def _run_options() -> list:
    return [
        click.Option(["--db", "db_url"], default=None,
                     help="SQLAlchemy URL: sqlite:///FILE or postgresql+psycopg://user@host/db "
                     "(default: $HPCBATCH_DB_URL, else config; password from "
                     "$HPCBATCH_DB_PASSWORD_FILE, mode 600)."),
        click.Option(["--model", "model_dir"], default=None, help="Model directory."),
        click.Option(["--chunk-size", "batch_size"], type=int, default=None,
                     help="Stocks per chunk (default: planned)."),
        renamed_option("--batch-size", "--chunk-size", "batch_size", type=int),
        click.Option(["--concurrency"], type=int, default=None,
                     help="Parallel database reads (default 4)."),
        click.Option(["--lookback-days"], type=int, default=None,
                     help="Rows fetched per stock (400)."),
        click.Option(["--predict-days"], type=int, default=None,
                     help="Last trading days predicted (10)."),
        click.Option(["--use-gpu"], default=None, is_flag=False, flag_value="true",
                     help="--use-gpu (require a GPU), --use-gpu auto, --use-gpu false."),
        click.Option(["--limit"], type=int, default=None, help="Predict at most this many stocks."),
        click.Option(["--offset"], type=int, default=None, help="Skip this many stocks."),
        click.Option(["--model-version"], default=None, help="Stored with the predictions (v1)."),
        click.Option(["--strict"], is_flag=True, default=None,
                     help="Refuse bad bars (NaN/inf/zero/negative price, high < low, duplicate "
                     "rows) before starting, instead of quarantining their stocks."),
    ]  # fmt: skip


class StocksWorkload(Workload):
    """Stock batch prediction (``hpcbatch stocks predict``)."""

    name = "stocks"
    help = "Stock batch prediction: SQL bars -> features -> windows -> model -> SQL."
    item_name = "stock"
    settings_type = StocksSettings
    probe = PROBE
    probe_sizes = (4, 16)
    max_chunk = MAX_CHUNK_STOCKS
    worker_preload = WORKER_PRELOAD
    command = ("stocks", "predict")
    cli_group = "hpcbatch.stocks.cli:stocks"

    def size_options(self) -> list:
        return _size_options()

    def sizes(self, settings: StocksSettings, values: Mapping[str, Any]) -> dict:
        lookback = values.get("lookback_days") or settings.lookback_days
        predict = values.get("predict_days") or settings.predict_days
        n_stocks = values.get("n_stocks") or ASSUMED_STOCKS
        for flag, value in (("--stocks", values.get("n_stocks", n_stocks)),
                            ("--lookback-days", values.get("lookback_days", lookback)),
                            ("--predict-days", values.get("predict_days", predict))):  # fmt: skip
            if value is not None:
                require_positive(flag, value)
        if settings.limit:
            n_stocks = min(n_stocks, int(settings.limit))
        batch = values.get("batch_size")
        batch = settings.batch_size if batch is None else batch
        if batch is not None:
            require_positive("--chunk-size", batch)
        return {"n_stocks": n_stocks, "lookback_days": lookback, "predict_days": predict,
                "batch_size": batch, "use_gpu": bool(values.get("use_gpu"))}  # fmt: skip

    def job_sizes(self, settings: StocksSettings, values: Mapping[str, Any],
                  job_args: Sequence[str]) -> JobSizes:  # fmt: skip
        """``--stocks``; else the stocks in the job's ``--db`` (after ``--``), chosen by its
        --offset/--limit as ``stocks predict`` does; else :data:`ASSUMED_STOCKS`, said."""
        if values.get("n_stocks") is not None:
            return JobSizes(self.sizes(settings, values))
        count, note, warning = _count_stocks(job_args, settings.db)
        return JobSizes(self.sizes(settings, {**values, "n_stocks": count}), note, warning)

    def footprint(self, sizes: Mapping[str, Any], settings: StocksSettings) -> Footprint:
        return stocks_footprint(sizes["n_stocks"], sizes["lookback_days"], sizes["predict_days"])

    def plan_overrides(self, sizes: Mapping[str, Any], settings: StocksSettings) -> dict:
        return {"chunk_size": sizes["batch_size"], "use_gpu": sizes["use_gpu"] or None}

    def probe_kwargs(self, sizes: Mapping[str, Any], settings: StocksSettings) -> dict:
        return {"lookback_days": sizes["lookback_days"], "predict_days": sizes["predict_days"]}

    def run_options(self) -> list:
        return _run_options()

    def prepare(self, settings: StocksSettings, values: Mapping[str, Any],
                invocation: Invocation = Invocation()) -> StocksJob:  # fmt: skip
        opts = options_from(settings, values)
        url = database_url(values.get("db_url"), default=settings.db)
        model_dir = values.get("model_dir") or settings.model_dir
        return self.prepare_options(url, model_dir, opts)

    def prepare_options(self, db_url: str, model_dir: str, opts: PredictOptions) -> StocksJob:
        """The job for explicit options (the Python API, :func:`hpcbatch.stocks.predict.predict`)."""
        return StocksJob(self, db_url, model_dir, opts, prepare(db_url, model_dir, opts))


def options_from(settings: StocksSettings, values: Mapping[str, Any]) -> PredictOptions:
    """:class:`PredictOptions` from the typed settings and flag values (None keeps a setting)."""
    names = ("batch_size", "concurrency", "lookback_days", "predict_days", "use_gpu", "limit",
             "offset", "model_version", "strict")  # fmt: skip
    unknown = set(values) - set(names) - {"db_url", "model_dir"}
    if unknown:
        raise ConfigError(f"unknown stocks option(s): {', '.join(sorted(unknown))}")
    return PredictOptions.from_settings(
        settings.section(), **{k: values.get(k) for k in names}
    )


def _arg_value(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` (``--db URL`` or ``--db=URL``) among the job's arguments."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _count_stocks(args: Sequence[str], default_db: str) -> tuple[int, str, str]:
    """(stocks, the script's note, a warning) for the job's ``--db``/--offset/--limit."""
    url = _arg_value(args, "--db")
    if url is None:
        note = f"{ASSUMED_STOCKS} stocks assumed (no --db after -- to count them): give --stocks N for your count"
        return ASSUMED_STOCKS, note, ""
    try:
        engine = make_engine(database_url(url, default=default_db))
        try:
            codes = list_codes(engine)
        finally:
            engine.dispose()
        offset, limit = _arg_value(args, "--offset"), _arg_value(args, "--limit")
        count = len(select_codes(codes, int(offset or 0), None if limit is None else int(limit)))
    except Exception as exc:  # noqa: BLE001 (any reason the database cannot be counted)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        return ASSUMED_STOCKS, (
            f"{ASSUMED_STOCKS} stocks assumed: the --db database could not be read when "
            "rendered; give --stocks N for your count"
        ), f"could not count the stocks in --db ({reason}): planning for {ASSUMED_STOCKS}; give --stocks N"
    return count, "the stock count was read from the --db database when rendered", ""


WORKLOAD = StocksWorkload()
