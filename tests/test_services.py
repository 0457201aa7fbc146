"""The project's real test servers start, work and stop cleanly (fixture smoke tests)."""

from __future__ import annotations

import subprocess

import pytest
import sqlalchemy as sa


@pytest.mark.postgres
def test_postgres_db_url_is_a_fresh_writable_database(
    postgres_url: str, postgres_db_url: str
) -> None:
    engine = sa.create_engine(postgres_db_url)
    try:
        with engine.begin() as conn:
            name = conn.execute(sa.text("select current_database()")).scalar()
            assert name.startswith("hpcbatch_test_")
            tables = conn.execute(
                sa.text(
                    "select count(*) from information_schema.tables where table_schema='public'"
                )
            ).scalar()
            assert tables == 0
            conn.execute(sa.text("create table t (x int)"))
            conn.execute(sa.text("insert into t values (41), (1)"))
            assert conn.execute(sa.text("select sum(x) from t")).scalar() == 42
    finally:
        engine.dispose()
    server = sa.create_engine(postgres_url)
    with server.connect() as conn:
        assert conn.execute(sa.text("show fsync")).scalar() == "off"
        assert conn.execute(sa.text("show listen_addresses")).scalar() == "127.0.0.1"
    server.dispose()


@pytest.mark.slurm
def test_slurm_cluster_runs_a_batch_job_with_its_mem(slurm_env: dict, tmp_path) -> None:
    from hpcbatch.slurm import submit, wait_for_job

    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/sh\n#SBATCH --output=job.out\necho mem=$SLURM_MEM_PER_NODE node=$SLURMD_NODENAME\n"
    )
    job_id = submit(script, sbatch_args=["--mem=300M", "--chdir", str(tmp_path)])
    assert wait_for_job(job_id, timeout=60)["JobState"] == "COMPLETED"
    assert (tmp_path / "job.out").read_text().strip() == f"mem=300 node={slurm_env['node']}"
    info = subprocess.run(["sinfo", "-h", "-o", "%P %m %c"], capture_output=True, text=True)
    assert info.stdout.split() == [f"{slurm_env['partition']}*", "8000", str(slurm_env["cpus"])]
