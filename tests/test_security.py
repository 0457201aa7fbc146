"""Security: TLS between client, scheduler and workers; dashboard on loopback; secrets.

- ``cluster.tls`` (``--tls``) gives a real local cluster on ``tls://`` that runs work,
  refuses plain-TCP and certificate-less clients; user-provided PEM files work too,
  bad ones are refused before anything starts; SLURM workers join over TLS;
- the dashboard listens on 127.0.0.1 only (checked on the listening socket);
- passwords: masked in URLs, read from ``$HPCBATCH_DB_URL`` or an owner-only file;
- model / posterior files: a crafted pickle is refused (``weights_only=True``) and its
  payload never runs;
- SQL: values only as bound parameters.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import psutil
import pytest

from hpcbatch import config as hb_config
from hpcbatch.cluster import open_cluster
from hpcbatch.errors import ConfigError
from hpcbatch.security import (
    cluster_security,
    database_url,
    mask_url,
    read_secret_file,
    scrub,
)

REPO = Path(__file__).resolve().parent.parent


def small_plan(n_items: int, chunk_size: int, *, memory_limit: int = 400_000_000):
    """A real plan of one worker with ``memory_limit`` for a tiny workload."""
    import dataclasses

    from hpcbatch.planner import Footprint, PlanSettings, make_plan
    from hpcbatch.resources import detect_resources

    footprint = Footprint(
        workload="test",
        item_name="item",
        n_items=n_items,
        per_item_bytes=1000,
        baseline_bytes=80_000_000,
    )
    resources = detect_resources(memory_bytes=memory_limit + 300_000_000, cpus=1)
    plan = make_plan(footprint, resources, PlanSettings(chunk_size=chunk_size))
    return dataclasses.replace(plan, memory_limit_bytes=memory_limit, n_workers=1)


def _settings(**cluster) -> dict:
    settings = hb_config.load()
    settings["cluster"].update({"dashboard-address": "127.0.0.1:0", **cluster})
    return settings


def _square(x: int) -> int:
    return x * x


# ----------------------------------------------------------------- TLS -----------


@pytest.fixture(scope="module")
def tls_client():
    plan = small_plan(10, 5)
    with open_cluster(plan, _settings(tls=True), quiet=True) as client:
        yield client


def test_tls_cluster_runs_tasks_on_tls_addresses(tls_client) -> None:
    address = tls_client.scheduler.address
    assert address.startswith("tls://")
    workers = tls_client.scheduler_info()["workers"]
    assert workers and all(addr.startswith("tls://") for addr in workers)
    assert tls_client.submit(_square, 7).result(timeout=30) == 49


def test_plain_tcp_and_certificateless_clients_are_refused(tls_client) -> None:
    from distributed import Client

    address = tls_client.scheduler.address
    with pytest.raises((OSError, TimeoutError)):
        Client(address.replace("tls://", "tcp://"), timeout="3s")
    with pytest.raises((OSError, TimeoutError, TypeError, ValueError)):
        Client(address, timeout="3s")  # TLS address but no certificate


def test_dashboard_listens_on_loopback_only(tls_client) -> None:
    from urllib.parse import urlparse

    link = tls_client.dashboard_link
    port = urlparse(link).port
    assert urlparse(link).hostname == "127.0.0.1"
    listening = [
        c
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert listening, f"nothing listens on the dashboard port {port}"
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_default_dashboard_address_is_loopback() -> None:
    assert hb_config.load()["cluster"]["dashboard-address"].startswith("127.0.0.1:")


def _write_pems(directory: Path) -> dict:
    """A CA, certificate and key (from Security.temporary) written as owner-only PEM files."""
    from distributed.security import Security

    temp = Security.temporary()
    paths = {}
    for key, text in (
        ("tls-ca-file", temp.tls_ca_file),
        ("tls-cert", temp.tls_client_cert),
        ("tls-key", temp.tls_client_key),
    ):
        path = directory / f"{key}.pem"
        path.write_text(text)
        path.chmod(0o600)
        paths[key] = str(path)
    return paths


def test_user_certificate_files_give_a_working_tls_cluster(tmp_path: Path) -> None:
    pems = _write_pems(tmp_path)
    security = cluster_security({"cluster": pems})
    assert security.require_encryption and security.tls_ca_file == pems["tls-ca-file"]
    plan = small_plan(4, 2)
    with open_cluster(plan, _settings(**pems), quiet=True) as client:
        assert client.scheduler.address.startswith("tls://")
        assert client.submit(_square, 3).result(timeout=30) == 9


def test_tls_off_by_default_is_plain_tcp() -> None:
    assert cluster_security(hb_config.load()) is None


@pytest.mark.parametrize(
    ("cluster", "phrase"),
    [
        ({"tls-cert": "CERT"}, "need all of"),
        ({"tls-ca-file": "/nonexistent/ca.pem", "tls-cert": "C", "tls-key": "K"}, "does not exist"),
        ({"tls-ca-file": "NOTPEM", "tls-cert": "C", "tls-key": "K"}, "not a PEM file"),
    ],
)
def test_bad_certificate_settings_are_refused_before_start(tmp_path, cluster, phrase) -> None:
    pems = _write_pems(tmp_path)
    notpem = tmp_path / "notpem.txt"
    notpem.write_text("hello\n")
    resolved = {
        k: pems.get(k) if v in ("C", "K", "CERT") else (str(notpem) if v == "NOTPEM" else v)
        for k, v in cluster.items()
    }
    with pytest.raises(ConfigError, match=phrase):
        cluster_security({"cluster": resolved})


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_slurm_workers_join_over_tls(slurm_env: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # dask-jobqueue writes the worker's certificate copy here
    settings = _settings(
        backend="slurm",
        tls=True,
        queue=slurm_env["partition"],
        walltime="00:10:00",
        interface="lo",
        **{"dashboard-address": ":0", "start-timeout": 90, "local-directory": str(tmp_path)},
    )
    plan = small_plan(4, 2, memory_limit=500_000_000)
    with open_cluster(plan, settings, backend="slurm", quiet=True) as client:
        assert client.scheduler.address.startswith("tls://")
        workers = client.scheduler_info()["workers"]
        assert workers and all(a.startswith("tls://") for a in workers)
        job = client.submit(lambda: os.environ.get("SLURM_JOB_ID")).result(timeout=60)
        assert job  # it ran inside a SLURM job
    certs = list(tmp_path.glob(".dask-jobqueue.worker.*"))
    assert all((p.stat().st_mode & 0o077) == 0 for p in certs)


# ------------------------------------------------------------- secrets -----------

SECRET = "Sup3rS3cret-xyzzy"


def test_mask_url_hides_the_password() -> None:
    url = f"postgresql+psycopg://alice:{SECRET}@db.example:5432/market"
    masked = mask_url(url)
    assert SECRET not in masked and "alice" in masked and "***" in masked
    assert SECRET not in mask_url(f"not a url but://bob:{SECRET}@host")
    assert SECRET not in scrub(f"error connecting to postgresql://bob:{SECRET}@h/db", SECRET)


def test_database_url_from_env_and_owner_only_password_file(tmp_path: Path) -> None:
    env = {"HPCBATCH_DB_URL": "postgresql+psycopg://alice@db/market"}
    assert database_url(None, env=env) == env["HPCBATCH_DB_URL"]
    assert database_url("sqlite:///x.db", env=env) == "sqlite:///x.db"  # the flag wins
    assert database_url(None, default="sqlite:///d.db", env={}) == "sqlite:///d.db"
    secret = tmp_path / "pw"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    url = database_url(None, env={**env, "HPCBATCH_DB_PASSWORD_FILE": str(secret)})
    from sqlalchemy.engine import make_url

    assert make_url(url).password == SECRET and make_url(url).username == "alice"
    # a file may hold the whole URL instead
    whole = tmp_path / "url"
    whole.write_text(f"postgresql+psycopg://bob:{SECRET}@db/market\n")
    whole.chmod(0o400)
    assert database_url(None, password_file=whole, env={}).startswith("postgresql+psycopg://bob:")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_password_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    secret = tmp_path / "pw"
    secret.write_text(SECRET)
    secret.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        database_url("postgresql+psycopg://alice@db/market", password_file=secret, env={})
    assert SECRET not in str(info.value)


def test_missing_or_empty_password_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_secret_file(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(ConfigError, match="empty"):
        read_secret_file(empty)


# --------------------------------------------------------------- SQL -------------

_SQL_CALLS = {"text", "execute", "exec_driver_sql", "executescript", "executemany"}
_SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT INTO|UPDATE|DELETE FROM|DROP TABLE|CREATE TABLE|WHERE)\b"
)


def _formatted(node: ast.AST) -> bool:
    """An f-string, ``"..." % x``, ``"..." + x`` or ``"...".format(x)`` expression."""
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
    )


def sql_formatting_offenders(source: str, name: str = "<src>") -> list[str]:
    """SQL built by string formatting: a formatted string handed to text()/execute(), or
    any f-string whose literal parts read like SQL."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in _SQL_CALLS and _formatted(node.args[0]):
                found.append(f"{name}:{node.lineno}: {fname}() of a formatted string")
        if isinstance(node, ast.JoinedStr):
            literal = "".join(
                v.value
                for v in node.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
            )
            if _SQL_WORDS.search(literal):
                found.append(f"{name}:{node.lineno}: f-string SQL {literal[:60]!r}")
    return found


def test_no_sql_is_built_by_string_formatting() -> None:
    offenders = []
    for path in sorted((REPO / "hpcbatch").rglob("*.py")):
        offenders += sql_formatting_offenders(path.read_text(), str(path.relative_to(REPO)))
    assert not offenders, "SQL built with string formatting:\n" + "\n".join(offenders)


def test_the_sql_formatting_check_catches_formatted_sql() -> None:
    assert sql_formatting_offenders("conn.execute(text(f\"SELECT * FROM t WHERE c = '{x}'\"))")
    assert sql_formatting_offenders('conn.exec_driver_sql("DROP TABLE %s" % name)')
    assert sql_formatting_offenders('q = f"DELETE FROM stock_daily WHERE ts_code = {code}"')
    assert sql_formatting_offenders('conn.execute("SELECT {}".format(x))')
    assert not sql_formatting_offenders("conn.execute(sa.select(t).where(t.c.x == x))")
    assert not sql_formatting_offenders('raise DataError(f"table {name} is missing")')


# ------------------------------------------------------- crafted pickles ---------


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a malicious model file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"linear.weight": _Payload(marker)}, path)
    return path


def test_the_crafted_file_really_runs_its_payload_when_loaded_unsafely(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "pwned"
    evil = _crafted(tmp_path / "evil.pt", marker)
    torch.load(evil, weights_only=False)  # what hpcbatch must never do
    assert marker.exists()


def _tiny_stock_model_dir(directory: Path) -> Path:
    import numpy as np

    from hpcbatch.stocks.model import SIZES, StockModel, save_model

    model = StockModel(SIZES["tiny"])
    n = SIZES["tiny"].n_features
    save_model(model, directory, np.zeros(n, np.float32), np.ones(n, np.float32), {})
    return directory


def test_stock_model_loader_refuses_a_crafted_pickle(tmp_path: Path) -> None:
    from hpcbatch.errors import DataError
    from hpcbatch.stocks.model import WEIGHTS_FILE, load_model

    model_dir = _tiny_stock_model_dir(tmp_path / "model")
    assert load_model(model_dir).config.d_model == 16  # the honest directory loads
    marker = tmp_path / "pwned"
    _crafted(model_dir / WEIGHTS_FILE, marker)
    with pytest.raises(DataError, match="weights_only|not a plain state dict") as info:
        load_model(model_dir)
    assert len(str(info.value).splitlines()) == 1
    assert not marker.exists()


def test_posterior_guide_loader_refuses_a_crafted_pickle(tmp_path: Path) -> None:
    import numpy as np

    from hpcbatch.errors import HpcbatchError
    from hpcbatch.predictive.technical import load_fit, simulate

    data_dir = tmp_path / "data"
    simulate(6, 4, 2, seed=0, out=data_dir)
    (data_dir / "fit").mkdir()
    np.savez(data_dir / "fit" / "prior.npz", mu_mean=np.ones(4, "f4"), mu_sd=np.ones(4, "f4"))
    marker = tmp_path / "pwned"
    _crafted(data_dir / "fit" / "guide.pt", marker)
    with pytest.raises(HpcbatchError, match="guide.pt") as info:
        load_fit(data_dir)
    assert len(str(info.value).splitlines()) == 1
    assert not marker.exists()


def test_every_torch_load_in_hpcbatch_is_weights_only() -> None:
    offenders = []
    for path in sorted((REPO / "hpcbatch").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and getattr(node.func.value, "id", "") == "torch"
            ):
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, "torch.load without weights_only=True: " + ", ".join(offenders)


def test_numpy_inputs_refuse_pickled_object_arrays(tmp_path: Path) -> None:
    import numpy as np

    from hpcbatch.predictive.technical import load_data, simulate

    data_dir = tmp_path / "data"
    simulate(6, 4, 2, seed=0, out=data_dir)
    marker = tmp_path / "pwned"
    np.save(data_dir / "group.npy", np.array([_Payload(marker)] * 6, dtype=object))
    with pytest.raises(Exception, match="allow_pickle|[Oo]bject arrays|group"):
        load_data(data_dir)
    assert not marker.exists()


# ------------------------------------------------- no password anywhere ---------

LEAK = "Leak-Me-Not-7f3a9"


def _cli(args: list[str], cwd: Path, **env_extra: str):
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCBATCH_", "SLURM_"))}
    env.update(
        PYTHONPATH=str(REPO / "tests" / "faults"),
        DASK_DISTRIBUTED__WORKER__PRELOAD='["inject"]',
        DASK_HPCBATCH__CLUSTER__DASHBOARD_ADDRESS="127.0.0.1:0",
        PYTHONWARNINGS="ignore",
        **env_extra,
    )
    hpcbatch = str(Path(sys.executable).with_name("hpcbatch"))
    return subprocess.run(
        [hpcbatch, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _tiny_model(directory: Path) -> Path:
    import numpy as np
    import torch

    from hpcbatch.stocks.model import SIZES, StockModel, save_model

    torch.manual_seed(0)
    config = SIZES["tiny"]
    zeros, ones = np.zeros(config.n_features, "f4"), np.ones(config.n_features, "f4")
    return save_model(StockModel(config), directory, zeros, ones, {})


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_database_password_never_appears_in_outputs_files_reports_or_reprs(
    postgres_db_url: str, tmp_path: Path
) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(postgres_db_url).set(password=LEAK).render_as_string(hide_password=False)
    bad_url = make_url(url).set(port=1).render_as_string(hide_password=False)
    model = _tiny_model(tmp_path / "model")
    reports = tmp_path / "reports"
    common = ["--lookback-days", "140", "--predict-days", "3", "--batch-size", "3"]
    runs = {
        "generate": _cli(
            ["stocks", "generate", "--db", url, "--stocks", "6", "--days", "150"], tmp_path
        ),
        "predict-json": _cli(
            [
                "stocks",
                "predict",
                "--db",
                url,
                "--model",
                str(model),
                "--report-dir",
                str(reports),
                "--cpus",
                "1",
                "--json",
                "--model-version",
                "v2",
                *common,
            ],
            tmp_path,
        ),
        # a chunk that fails on the worker: Dask logs the task and its arguments
        "predict-failing-chunk": _cli(
            [
                "stocks",
                "predict",
                "--db",
                url,
                "--model",
                str(model),
                "--report-dir",
                str(reports),
                "--cpus",
                "1",
                "--model-version",
                "v3",
                *common,
            ],
            tmp_path,
            HPCBATCH_FAULT_FAIL_ITEM="000001.SZ",
            DASK_HPCBATCH__RETRIES="0",
        ),
        "unreachable": _cli(
            ["stocks", "predict", "--db", bad_url, "--model", str(model)], tmp_path
        ),
        "render": _cli(
            [
                "slurm",
                "render",
                "stocks",
                "--mem-gb",
                "4",
                "--cpus",
                "2",
                "--stocks",
                "6",
                "-o",
                str(tmp_path / "job.sbatch"),
                "--",
                "--db",
                url,
            ],
            tmp_path,
        ),
        "render-stdout": _cli(
            ["slurm", "render", "stocks", "--mem-gb", "4", "--cpus", "2", "--", "--db", url],
            tmp_path,
        ),
    }
    assert runs["generate"].returncode == 0, runs["generate"].stderr
    assert runs["predict-json"].returncode == 0, runs["predict-json"].stderr
    assert runs["predict-failing-chunk"].returncode != 0
    assert "000001.SZ" in runs["predict-failing-chunk"].stderr or "c0000" in (
        runs["predict-failing-chunk"].stderr
    )
    assert runs["unreachable"].returncode == 2
    assert runs["render"].returncode == 0, runs["render"].stderr
    assert "HPCBATCH_DB_URL" in (tmp_path / "job.sbatch").read_text()
    for name, result in runs.items():
        assert LEAK not in result.stdout + result.stderr, f"password printed by {name}"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "report.json" for p in written)
    for path in written:
        assert LEAK.encode() not in path.read_bytes(), f"password written to {path}"
    # what the database itself records about the runs
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        params = " ".join(conn.execute(sa.text("SELECT params FROM hpcbatch_runs")).scalars())
        run_ids = " ".join(
            str(x)
            for x in conn.execute(
                sa.text("SELECT DISTINCT run_id FROM stock_predictions")
            ).scalars()
        )
    engine.dispose()
    assert params and LEAK not in params and LEAK not in run_ids
    # reprs of what travels to the workers
    from hpcbatch.ledger import Ledger
    from hpcbatch.stocks.predict import PredictTask

    assert LEAK not in repr(Ledger(url))
    assert LEAK not in repr(PredictTask(db_url=url, model_dir=str(model)))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hostile_codes_and_versions_are_data_not_sql(tmp_path: Path) -> None:
    import sqlite3

    from hpcbatch.stocks.generate import generate_market
    from hpcbatch.stocks.schema import make_engine

    db = tmp_path / "market.db"
    engine = make_engine(f"sqlite:///{db}", create=True)
    generate_market(engine, 3, 150, seed=0)
    engine.dispose()
    hostile = "x'); DROP TABLE stock_daily;--"
    con = sqlite3.connect(db)
    columns = [r[1] for r in con.execute("PRAGMA table_info(stock_daily)")]
    rows = con.execute(
        "SELECT * FROM stock_daily WHERE ts_code = (SELECT min(ts_code) FROM stock_daily)"
    ).fetchall()
    code_at = columns.index("ts_code")
    con.executemany(
        f"INSERT INTO stock_daily VALUES ({', '.join('?' * len(columns))})",
        [tuple(hostile if i == code_at else v for i, v in enumerate(r)) for r in rows],
    )
    con.commit()
    n_bars = con.execute("SELECT count(*) FROM stock_daily").fetchone()[0]
    con.close()
    version = "v1'; DROP TABLE stock_predictions;--"
    model = _tiny_model(tmp_path / "model")
    result = _cli(
        [
            "stocks",
            "predict",
            "--db",
            f"sqlite:///{db}",
            "--model",
            str(model),
            "--cpus",
            "1",
            "--lookback-days",
            "140",
            "--predict-days",
            "2",
            "--model-version",
            version,
            "--report-dir",
            str(tmp_path / "reports"),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM stock_daily").fetchone()[0] == n_bars
    predicted = con.execute(
        "SELECT ts_code, model_version, count(*) FROM stock_predictions GROUP BY 1, 2"
    ).fetchall()
    con.close()
    assert (hostile, version, 2) in predicted
    assert len(predicted) == 4 and {p[2] for p in predicted} == {2}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_tls_flag_and_db_url_from_the_environment(tmp_path: Path) -> None:
    from hpcbatch.stocks.generate import generate_market
    from hpcbatch.stocks.schema import make_engine

    db = tmp_path / "market.db"
    engine = make_engine(f"sqlite:///{db}", create=True)
    generate_market(engine, 2, 140, seed=0)
    engine.dispose()
    model = _tiny_model(tmp_path / "model")
    result = _cli(
        [
            "stocks",
            "predict",
            "--tls",
            "--model",
            str(model),
            "--cpus",
            "1",
            "--lookback-days",
            "130",
            "--predict-days",
            "1",
            "--report-dir",
            str(tmp_path / "r"),
        ],
        tmp_path,
        HPCBATCH_DB_URL=f"sqlite:///{db}",  # no --db: the URL comes from the environment
        HPCBATCH_FAULT_ADDR_DIR=str(tmp_path / "addr"),
    )
    assert result.returncode == 0, result.stderr
    addresses = [p.read_text() for p in (tmp_path / "addr").glob("worker-*")]
    assert addresses and all(a.startswith("tls://") for a in addresses)
    import sqlite3

    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM stock_predictions").fetchone()[0] == 2
    con.close()


def test_slurm_scheduler_dashboard_stays_on_loopback_by_default() -> None:
    from hpcbatch.slurm import slurm_cluster_kwargs

    settings = hb_config.load()
    spec = slurm_cluster_kwargs(small_plan(4, 2), settings)
    assert spec.kwargs["scheduler_options"]["dashboard_address"].startswith("127.0.0.1:")


def test_scratch_for_pickled_jobs_is_private(tmp_path: Path) -> None:
    from hpcbatch.security import private_dir

    made = private_dir(tmp_path / "shared" / "hpcbatch-shared-0")
    assert (made.stat().st_mode & 0o777) == 0o700
    assert private_dir(made) == made  # existing and private: fine
    opened = tmp_path / "opened"
    opened.mkdir()
    opened.chmod(0o777)  # e.g. made world-writable by someone else in /tmp
    with pytest.raises(ConfigError, match="open to others"):
        private_dir(opened)
    link = tmp_path / "link"
    link.symlink_to(made)
    with pytest.raises(ConfigError, match="not a plain directory"):
        private_dir(link)
