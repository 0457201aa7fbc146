"""Fault-injection scenarios on real runs; prints one JSON table.

Each scenario runs the stock prediction workload (a synthetic market in SQLite, or in a
throwaway PostgreSQL for the database faults) with a fault injected, then compares the
result with an undisturbed run of the same seed: rows lost, rows duplicated, checksum
equal, chunks re-run on resume, wall time.  The fault machinery is the test suite's
(``tests/faults``: a Dask worker preload that delays chunks, marks them, allocates
memory or fails them), so the scenarios here are the tests' heavier variants:
more stocks, every chunk over its memory limit, the database gone for good.

    python benchmarks/faults.py [--stocks 48] [--only worker-sigkill,db-gone] > faults.json
    python benchmarks/faults.py --slurm --only slurm-scancel   # the SLURM rows (or all: --slurm)

Needs root for the disk-full scenario (a small tmpfs) and PostgreSQL binaries for the
database ones; a scenario that cannot run says why instead of a result.

``--slurm`` adds the SLURM scenarios (``slurm-*``): a throwaway single-node SLURM
(``tests/services.py``) runs the workers as jobs submitted by ``stocks predict
--cluster slurm``; the worker job is ``scancel``ed half way (one job of 2 workers, so
nothing runs until hpcbatch's replacement job is up; and 2 jobs of 1 worker, where the
survivor keeps going), or one worker process in it is SIGKILLed.  Each row has the time
to finish after the fault, rows lost / duplicated against the undisturbed run, the
chunks the ledger recorded (once each), the reason the report gives and how long the
replacement job took (``replacement_wait_s``: from hpcbatch noticing the job's end to
its replacement's first worker; ``work_resumed_after_s``: from the fault to the first
chunk started after it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests" / "faults"), str(REPO / "tests")]

import faultkit as fx  # noqa: E402  (tests/faults/faultkit.py: the fault helpers)


def _reproduce(test: str) -> str:
    return f"pytest {test}"


class Bench:
    def __init__(self, base: Path, n_stocks: int, batch: int):
        self.base = base
        self.n_stocks = n_stocks
        self.batch = batch
        self.n_chunks = -(-n_stocks // batch)
        self.inputs = self._inputs()
        self.baseline = None

    # ------------------------------------------------------------------ inputs --

    def _inputs(self) -> dict:
        return fx.make_stock_inputs(self.base, self.n_stocks, fx.DAYS)

    def fresh(self, name: str) -> tuple[str, Path]:
        work = self.base / name
        return fx.fresh_db(self.inputs, work), work

    def start(self, url: str, work: Path, *extra: str, **faults) -> subprocess.Popen:
        return fx.start_stocks(url, self.inputs["model"], work / "reports", *extra, **faults)

    # ----------------------------------------------------------------- compare --

    def compare(self, url: str) -> dict:
        rows = fx.prediction_rows(url)
        keys = [r[:3] for r in rows]
        base = self.baseline["rows"]
        base_keys = {r[:3] for r in base}
        return {
            "rows": len(rows),
            "rows_expected": len(base),
            "lost": len(base_keys - set(keys)),
            "duplicated": len(keys) - len(set(keys)),
            "equal_to_undisturbed": fx.checksum(rows) == self.baseline["checksum"],
        }

    # --------------------------------------------------------------- scenarios --

    def undisturbed(self) -> dict:
        url, work = self.fresh("undisturbed")
        t0 = time.monotonic()
        proc = self.start(url, work)
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err
        rows = fx.prediction_rows(url)
        self.baseline = {"rows": rows, "checksum": fx.checksum(rows)}
        return {
            "fault": "none (the reference run)",
            "exit_code": 0,
            "wall_s": round(time.monotonic() - t0, 1),
            "rows": len(rows),
        }

    def worker_sigkill(self) -> dict:
        url, work = self.fresh("worker-sigkill")
        t0 = time.monotonic()
        proc = self.start(url, work, delay_s=0.5)
        fx.wait_until(lambda: fx.done_chunks(url) >= self.n_chunks // 2, proc, 900, "half")
        killed = 0
        for victim in fx.dask_workers(proc.pid):  # every worker, one after the other
            with contextlib.suppress(Exception):
                victim.send_signal(signal.SIGKILL)
                killed += 1
            time.sleep(1.0)
        out, err = proc.communicate(timeout=1800)
        report = json.loads(out.splitlines()[-1]) if proc.returncode == 0 else {}
        return {
            "fault": f"SIGKILL all {killed} workers half way, one by one",
            "exit_code": proc.returncode,
            "wall_s": round(time.monotonic() - t0, 1),
            "worker_deaths": len(report.get("worker_deaths", [])),
            **self.compare(url),
            "reproduce": _reproduce("tests/faults/test_stocks_faults.py -k worker_sigkilled"),
        }

    def driver_stop(self, sig: signal.Signals) -> dict:
        url, work = self.fresh(f"driver-{sig.name}")
        marks = work / "marks"
        t0 = time.monotonic()
        proc = self.start(url, work, delay_s=0.5, mark_dir=marks)
        fx.wait_until(lambda: fx.done_chunks(url) >= self.n_chunks // 2, proc, 900, "half")
        if sig == signal.SIGKILL:
            fx.kill_tree(proc)
            proc.communicate(timeout=120)
            first_line = "(killed: no output)"
        else:
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=300)
            first_line = err.strip().splitlines()[-1]
        first_code = proc.returncode
        committed = fx.done_ids(url)
        again = work / "marks-resume"
        proc = self.start(url, work, "--resume", mark_dir=again)
        out, err = proc.communicate(timeout=1800)
        report = json.loads(out.splitlines()[-1]) if proc.returncode == 0 else {}
        ran = len(list(again.iterdir())) if again.exists() else 0
        return {
            "fault": f"{sig.name} to the driver half way, then --resume",
            "exit_code_stopped": first_code,
            "message": first_line[:200],
            "chunks_committed_before": len(committed),
            "chunks_run_on_resume": ran,
            "chunks_missing_before": self.n_chunks - len(committed),
            "chunks_skipped_on_resume": report.get("chunks_skipped"),
            "exit_code": proc.returncode,
            "wall_s": round(time.monotonic() - t0, 1),
            **self.compare(url),
            "reproduce": _reproduce(
                f"tests/faults/test_stocks_faults.py -k 'driver_stopped and {sig.name}'"
            ),
        }

    def memory_every_chunk(self) -> dict:
        url, work = self.fresh("memory-split")
        t0 = time.monotonic()
        proc = self.start(url, work, driver_memory="1700000000", hog_mb=600, hog_above=1)
        out, err = proc.communicate(timeout=3600)
        report = json.loads(out.splitlines()[-1]) if proc.returncode == 0 else {}
        deaths = report.get("worker_deaths", [])
        return {
            "fault": "every chunk of more than 1 stock allocates 600 MB over a ~620 MiB limit",
            "exit_code": proc.returncode,
            "wall_s": round(time.monotonic() - t0, 1),
            "chunks_split": report.get("chunks_split"),
            "worker_deaths": len(deaths),
            "death_reasons": sorted({d["reason"] for d in deaths}),
            **self.compare(url),
            "reproduce": _reproduce("tests/faults/test_stocks_faults.py -k over_its_memory"),
        }

    def memory_min_size(self) -> dict:
        url, work = self.fresh("memory-min")
        codes = sorted({r[0] for r in self.baseline["rows"]})
        item = codes[len(codes) // 2]
        t0 = time.monotonic()
        proc = self.start(
            url, work, driver_memory="1700000000", hog_mb=600, hog_above=0, hog_item=item
        )
        out, err = proc.communicate(timeout=1800)
        rows = fx.prediction_rows(url)
        expected = [r for r in self.baseline["rows"] if r[0] != item]
        return {
            "fault": f"the chunk of {item} is over the limit even at 1 stock",
            "exit_code": proc.returncode,
            "message": err.strip().splitlines()[-1][:240],
            "wall_s": round(time.monotonic() - t0, 1),
            "rows": len(rows),
            "rows_expected_without_that_stock": len(expected),
            "everything_else_committed": rows == expected,
            "reproduce": _reproduce("tests/faults/test_stocks_faults.py -k minimum_size"),
        }

    def _postgres(self):
        import services

        server = services.PostgresServer()
        server.start()
        from hpcbatch.stocks.generate import generate_market
        from hpcbatch.stocks.schema import make_engine

        engine = make_engine(server.url)
        generate_market(engine, self.n_stocks, fx.DAYS, seed=1)
        engine.dispose()
        return server

    def db_restart(self, outage_s: float = 5.0) -> dict:
        server = self._postgres()
        try:
            url, work = server.url, self.base / "db-restart"
            t0 = time.monotonic()
            proc = self.start(url, work, delay_s=0.5)
            fx.wait_until(lambda: fx.done_chunks(url) >= self.n_chunks // 3, proc, 900, "a third")
            server.proc.send_signal(signal.SIGINT)
            server.proc.wait(timeout=60)
            time.sleep(outage_s)
            assert server._start_postmaster(), server.log_tail()
            out, err = proc.communicate(timeout=1800)
            retries = err.count("retry ")
            return {
                "fault": f"PostgreSQL stopped (fast shutdown) for {outage_s:.0f} s mid-run",
                "exit_code": proc.returncode,
                "wall_s": round(time.monotonic() - t0, 1),
                "backoff_retries_logged": retries,
                **self.compare(url),
                "reproduce": _reproduce("tests/faults/test_db_faults.py -k restarted"),
            }
        finally:
            server.stop()

    def db_gone(self) -> dict:
        server = self._postgres()
        try:
            url, work = server.url, self.base / "db-gone"
            proc = self.start(url, work, delay_s=0.5)
            fx.wait_until(lambda: fx.done_chunks(url) >= self.n_chunks // 3, proc, 900, "a third")
            t0 = time.monotonic()  # from the database's stop to the driver's exit
            server.proc.send_signal(signal.SIGINT)
            server.proc.wait(timeout=60)
            out, err = proc.communicate(timeout=3600)
            failed_after = round(time.monotonic() - t0, 1)
            message = err.strip().splitlines()[-1][:240] if err.strip() else ""
            assert server._start_postmaster(), server.log_tail()
            committed = fx.done_ids(url)
            rows = fx.prediction_rows(url)
            consistent = {r[0] for r in rows} and len({r[0] for r in rows}) <= (
                len(committed) * self.batch
            )
            resume = self.start(url, work, "--resume")
            out2, err2 = resume.communicate(timeout=1800)
            return {
                "fault": "PostgreSQL stopped for good mid-run; restarted later, then --resume",
                "exit_code_while_gone": proc.returncode,
                "message": message,
                "failed_after_stop_s": failed_after,
                "traceback_shown": "Traceback" in err,
                "ledger_consistent_with_rows": bool(consistent),
                "exit_code": resume.returncode,
                **self.compare(url),
                "reproduce": "python benchmarks/faults.py --only db-gone",
            }
        finally:
            server.stop()

    def disk_full(self) -> dict:
        point = self.base / "smallfs"
        point.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            return {"fault": "disk full", "skipped": r.stderr.strip()}
        try:
            shutil.copy(self.inputs["db"], point / "stocks.db")
            url, work = f"sqlite:///{point / 'stocks.db'}", self.base / "disk-full"
            t0 = time.monotonic()
            proc = self.start(url, work, delay_s=0.5)
            fx.wait_until(lambda: fx.done_chunks(url) >= self.n_chunks // 3, proc, 900, "a third")
            filler = point / "filler"
            with open(filler, "wb", buffering=0) as handle:
                for size in (2**16, 2**12, 2**9):
                    with contextlib.suppress(OSError):
                        while True:
                            handle.write(b"\0" * size)
            _, err = proc.communicate(timeout=1800)
            message = err.strip().splitlines()[-1][:240]
            filler.unlink()
            committed = fx.done_ids(url)
            stocks_stored = {r[0] for r in fx.prediction_rows(url)}
            resume = self.start(url, work, "--resume")
            resume.communicate(timeout=1800)
            return {
                "fault": "the database's file system fills up mid-run; space freed, --resume",
                "exit_code_when_full": proc.returncode,
                "message": message,
                "traceback_shown": 'Traceback (most recent call last):\n  File "' in err
                and "drive_stocks.py" in err,
                "rows_only_of_committed_chunks": len(stocks_stored) <= len(committed) * self.batch,
                "exit_code": resume.returncode,
                "wall_s": round(time.monotonic() - t0, 1),
                **self.compare(url),
                "reproduce": _reproduce("tests/faults/test_output_faults.py -k disk_full_mid"),
            }
        finally:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


class SlurmBench:
    """The SLURM rows: a throwaway single-node SLURM, workers as jobs of ``--cluster slurm``."""

    def __init__(self, bench: Bench):
        import services

        self.bench = bench
        self.cluster = services.SlurmTestCluster(real_memory_mb=8000).start()
        self.services = services

    def close(self) -> None:
        self.cluster.stop()

    def _config(self, work: Path, jobs: int, walltime: str = "00:30:00", extra: str = "") -> Path:
        work.mkdir(parents=True, exist_ok=True)
        path = work / "slurm.yaml"
        path.write_text(
            "hpcbatch:\n  cluster:\n"
            f"    queue: {self.cluster.partition}\n"
            f'    walltime: "{walltime}"\n    interface: lo\n'
            '    dashboard-address: "127.0.0.1:0"\n    start-timeout: 120\n'
            f"    jobs: {jobs}\n    local-directory: {work / 'dask'}\n" + extra
        )
        return path

    def start(
        self, url: str, work: Path, jobs: int, walltime: str = "00:30:00", extra: str = "", **faults
    ) -> subprocess.Popen:
        cpus, mem = ("2", "3") if jobs == 1 else ("1", "1.5")  # 2 workers/job, or 1
        cmd = [fx.HPCBATCH, "stocks", "predict",
               "--cluster", "slurm", "--db", url, "--model", str(self.bench.inputs["model"]),
               "--batch-size", str(self.bench.batch), "--lookback-days", "180",
               "--predict-days", "5", "--use-gpu", "false", "--mem-gb", mem, "--cpus", cpus,
               "--report-dir", str(work / "reports"), "--config", str(self._config(work, jobs, walltime, extra))]  # fmt: skip
        env = fx.fault_env(**faults)
        env["SLURM_CONF"] = str(self.cluster.conf)
        return subprocess.Popen(
            cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def _running_jobs(self) -> list[str]:
        return self.cluster.run("squeue", "-h", "-t", "RUNNING", "-o", "%i").stdout.split()

    def _ledger(self, url: str) -> dict:
        ids = [r[0] for r in fx.query(url, "SELECT chunk_id FROM hpcbatch_chunks")]
        roots = {i.split(".")[0] for i in ids}  # a split chunk is recorded as its halves
        return {
            "chunks_in_ledger": len(ids),
            "chunks_expected": self.bench.n_chunks,
            "chunks_lost": len({f"c{i:06d}" for i in range(self.bench.n_chunks)} - roots),
            "chunks_duplicated": len(ids) - len(set(ids)),
        }

    def run(self, scenario: str, fault: str, jobs: int = 1) -> dict:
        """``fault``: none, scancel, SIGKILL, or walltime (a 1-minute job walltime: its
        workers retire at their lifetime, about 45 s, and the job ends mid-run)."""
        import psutil

        url, work = self.bench.fresh(scenario)
        marks = work / "marks"
        t0 = time.monotonic()
        if fault == "walltime":
            proc = self.start(url, work, jobs, "00:01:00", mark_dir=marks, delay_s=4.0)
        elif fault == "memory":  # job --mem 1200M < 2 workers' limits; Dask's terminate off
            codes = sorted({r[0] for r in self.bench.baseline["rows"]})
            row_item = codes[len(codes) // 2]
            extra = (
                '    job-extra-directives: ["--mem=1200M"]\n  thresholds:\n    terminate: false\n'
            )
            proc = self.start(url, work, jobs, extra=extra, mark_dir=marks, delay_s=0.5,
                              hog_mb=900, hog_above=1, hog_item=row_item)  # fmt: skip
        else:
            proc = self.start(url, work, jobs, mark_dir=marks, delay_s=0.5)
        row: dict = {}
        t_fault = None
        if fault == "walltime":
            row["fault"] = "worker job walltime 00:01:00 (workers retire at ~45 s) mid-run"
        elif fault == "memory":
            row["fault"] = (
                f"the chunk of {row_item} takes 900 MB: SLURM kills the whole job (--mem=1200M)"
            )
        elif fault != "none":
            half = self.bench.n_chunks // 2
            fx.wait_until(lambda: fx.done_chunks(url) >= half, proc, 900, "half")
            victims = self._running_jobs()
            job_id = victims[0]
            t_fault, t_fault_ns = time.monotonic(), time.time_ns()
            if fault == "scancel":
                self.cluster.run("scancel", job_id)
                row["fault"] = f"scancel worker job {job_id} (1 of {jobs} job(s)) half way"
            else:
                pids = self.services.processes_with_env("SLURM_JOB_ID", job_id)
                procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
                workers = [p for p in procs if "spawn_main" in " ".join(p.cmdline())]
                workers[0].send_signal(signal.SIGKILL)
                row["fault"] = f"SIGKILL one worker process inside job {job_id} half way"
            row["chunks_done_at_fault"] = fx.done_chunks(url)
        else:
            row["fault"] = f"none (undisturbed, {jobs} SLURM job(s))"
        out, err = proc.communicate(timeout=1800)
        end = time.monotonic()
        row.update({"exit_code": proc.returncode, "wall_s": round(end - t0, 1)})
        if t_fault is not None:
            row["finished_after_fault_s"] = round(end - t_fault, 1)
            later = sorted(int(m.name.rsplit("-", 1)[1]) for m in marks.iterdir())
            later = [ns for ns in later if ns > t_fault_ns]
            if later:
                row["work_resumed_after_s"] = round((later[0] - t_fault_ns) / 1e9, 1)
        reports = list((work / "reports").rglob("report.json"))
        if reports:
            report = json.loads(reports[0].read_text())
            deaths = report.get("worker_deaths", [])
            row["death_reasons"] = sorted({d["reason"] for d in deaths})
            row["death_job_ids"] = sorted(
                {d["slurm_job_id"] for d in deaths if "slurm_job_id" in d}
            )
            waits = {d["replacement_wait_s"] for d in deaths if "replacement_wait_s" in d}
            if waits:
                row["replacement_wait_s"] = max(waits)
                row["replacement_job_ids"] = sorted({d["replacement_job_id"] for d in deaths})
        replaced = [ln.strip() for ln in err.splitlines() if ln.startswith("SLURM worker job")]
        if replaced:
            row["message"] = replaced[0][:240]
        if reports:
            row["chunks_split"] = report.get("chunks_split")
        row.update(self._ledger(url))
        row.update(self.bench.compare(url))
        row["reproduce"] = f"python benchmarks/faults.py --slurm --only {scenario}"
        if jobs == 1 and fault in ("scancel", "SIGKILL", "memory"):
            row["test"] = f"pytest tests/faults/test_slurm_faults.py -k 'stocks and {fault}'"
        return row


SLURM_SCENARIOS = {
    "slurm-none": lambda s: s.run("slurm-none", "none"),
    "slurm-scancel": lambda s: s.run("slurm-scancel", "scancel"),
    "slurm-scancel-2jobs": lambda s: s.run("slurm-scancel-2jobs", "scancel", jobs=2),
    "slurm-sigkill": lambda s: s.run("slurm-sigkill", "SIGKILL"),
    "slurm-walltime": lambda s: s.run("slurm-walltime", "walltime"),
    "slurm-job-memory": lambda s: s.run("slurm-job-memory", "memory"),
}

SCENARIOS = {
    "worker-sigkill": lambda b: b.worker_sigkill(),
    "driver-sigkill": lambda b: b.driver_stop(signal.SIGKILL),
    "driver-sigterm": lambda b: b.driver_stop(signal.SIGTERM),
    "memory-every-chunk": lambda b: b.memory_every_chunk(),
    "memory-min-size": lambda b: b.memory_min_size(),
    "db-restart": lambda b: b.db_restart(),
    "db-gone": lambda b: b.db_gone(),
    "disk-full": lambda b: b.disk_full(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stocks", type=int, default=48)
    parser.add_argument("--only", default=None, help="comma-separated scenario names")
    parser.add_argument(
        "--slurm", action="store_true", help="also the SLURM scenarios (a throwaway SLURM; root)"
    )
    args = parser.parse_args()
    known = {**SCENARIOS, **SLURM_SCENARIOS}
    if args.only:
        names = args.only.split(",")
    else:
        names = list(SCENARIOS) + (list(SLURM_SCENARIOS) if args.slurm else [])
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}: choose from {', '.join(known)}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="hpcbatch-faults-") as tmp:
        bench = Bench(Path(tmp), args.stocks, 2)  # tests/faults/drive_stocks.py: 2 per chunk
        results["undisturbed"] = bench.undisturbed()
        print(json.dumps({"undisturbed": results["undisturbed"]}), file=sys.stderr, flush=True)
        slurm: SlurmBench | str | None = None
        try:
            for name in names:
                try:
                    if name in SLURM_SCENARIOS:
                        if slurm is None:
                            try:
                                slurm = SlurmBench(bench)
                            except Exception as exc:  # noqa: BLE001 (no root, no slurm packages)
                                slurm = f"SLURM unavailable: {type(exc).__name__}: {exc}"
                        if isinstance(slurm, str):
                            results[name] = {"skipped": slurm[:300]}
                        else:
                            results[name] = SLURM_SCENARIOS[name](slurm)
                    else:
                        results[name] = SCENARIOS[name](bench)
                except Exception as exc:  # noqa: BLE001 (report and go on to the next)
                    results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
        finally:
            if isinstance(slurm, SlurmBench):
                slurm.close()
    print(
        json.dumps(
            {"stocks": args.stocks, "stocks_per_chunk": 2, "scenarios": results},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
