"""The project's real test servers start, work and stop cleanly (fixture smoke tests)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa


@pytest.mark.postgres
def test_postgres_db_url_is_a_fresh_writable_database(postgres_url: str, postgres_db_url: str) -> None:
    engine = sa.create_engine(postgres_db_url)
    try:
        with engine.begin() as conn:
            name = conn.execute(sa.text("select current_database()")).scalar()
            assert name.startswith("hpcbatch_test_")
            tables = conn.execute(sa.text(
                "select count(*) from information_schema.tables where table_schema='public'"
            )).scalar()
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
