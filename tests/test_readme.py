"""README.md stays true: its framework snippet is the tested one, its tables are the JSON's."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _snippet(text: str) -> str:
    found = re.search(r"<!-- map-snippet -->\n```python\n(.*?)```", text, re.S)
    assert found, "no <!-- map-snippet --> python block"
    return found.group(1)


def test_readme_map_snippet_is_the_one_tests_run_and_at_most_15_lines():
    # tests/test_map.py runs docs/framework.md's snippet verbatim
    snippet = _snippet(README)
    assert snippet == _snippet((ROOT / "docs" / "framework.md").read_text())
    assert len([line for line in snippet.splitlines() if line.strip()]) <= 15
    assert "hpcbatch.map(" in snippet


TABLES = ["runner_overhead_table", "stocks_table", "stocks_cpu_table", "predictive_table", "calibration_table"]


def _tables():
    spec = importlib.util.spec_from_file_location("tables", ROOT / "benchmarks" / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    return tables


@pytest.mark.parametrize("name", TABLES)
def test_readme_benchmark_tables_are_generated_from_the_committed_json(name: str):
    table = getattr(_tables(), name)()
    assert table in README, (
        f"README's table from benchmarks/tables.py:{name} differs from the committed JSON: "
        "paste the output of 'python benchmarks/tables.py'"
    )
