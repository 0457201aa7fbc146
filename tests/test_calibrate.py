"""Calibration: measure a footprint in fresh processes and fit it."""

from __future__ import annotations

import textwrap

import pytest

from hpcbatch.calibrate import (
    WORKER_MARGIN,
    CalibrationError,
    calibrate,
    calibrated_footprint,
    measure,
)
from hpcbatch.errors import ConfigError
from hpcbatch.planner import Footprint

MiB = 1024**2

PROBE = """
import numpy as np

_kept = []

def probe(size, per_item_mib=4, fixed_mib=32):
    if size == 0:
        return
    _kept.append(np.ones(fixed_mib * 2**20, dtype=np.uint8))      # e.g. a model, once
    for _ in range(size):
        _kept.append(np.ones(per_item_mib * 2**20, dtype=np.uint8))  # the work per item

def shrinking(size):
    # Allocates less the more items it gets: the fit must clamp, and say so.
    _kept.append(np.ones(max(1, 200 - 10 * size) * 2**20, dtype=np.uint8))

def crash(size):
    raise RuntimeError("probe exploded")
"""


@pytest.fixture
def probe_module(tmp_path, monkeypatch):
    (tmp_path / "hb_test_probe.py").write_text(textwrap.dedent(PROBE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "hb_test_probe"


def test_calibrate_fits_known_bytes_per_item(probe_module):
    result = calibrate(
        f"{probe_module}:probe",
        sizes=(4, 16),
        probe_kwargs={"per_item_mib": 4, "fixed_mib": 32},
        import_distributed=False,
        margin=0.0,
    )
    assert result.per_item_bytes == pytest.approx(4 * MiB, rel=0.15)
    zero = result.measurements[0].peak_rss_bytes
    # Fixed bytes: the size-0 baseline plus the 32 MiB the probe loads once.
    assert result.fixed_bytes - zero == pytest.approx(32 * MiB, rel=0.2)
    assert [m.size for m in result.measurements] == [0, 4, 16]
    assert result.source.startswith("calibrated (probe sizes 4, 16; peak RSS ")
    assert result.gpu_per_item_bytes is None  # no CUDA here
    assert result.notes == ()


def test_calibrated_footprint_replaces_the_guess(probe_module):
    base = Footprint("w", "item", 100, per_item_bytes=1, baseline_bytes=1, shared_input_bytes=10)
    fp, result = calibrated_footprint(
        base, f"{probe_module}:probe", (2, 10), {"per_item_mib": 8}, import_distributed=False
    )
    assert fp.per_item_bytes == result.per_item_bytes == pytest.approx(8 * MiB, rel=0.15)
    assert fp.baseline_bytes == result.fixed_bytes
    assert fp.shared_input_bytes == 10 and fp.n_items == 100
    assert fp.source.startswith("calibrated")


def test_negative_slope_is_clamped_and_said(probe_module):
    result = calibrate(f"{probe_module}:shrinking", (2, 12), import_distributed=False)
    assert result.per_item_bytes == 0
    assert any("clamped to 0" in note for note in result.notes)


def test_probe_failure_is_one_clear_error(probe_module):
    with pytest.raises(CalibrationError, match="probe exploded"):
        measure(f"{probe_module}:crash", 1, import_distributed=False)


@pytest.mark.parametrize(
    ("probe", "sizes", "error"),
    [
        ("no_such_module_xyz:probe", (1, 2), CalibrationError),
        ("hpcbatch.units:no_such_function", (1, 2), CalibrationError),
        ("not-a-probe", (1, 2), ConfigError),
        ("hpcbatch.units:parse_bytes", (3, 3), ConfigError),
        ("hpcbatch.units:parse_bytes", (0, 3), ConfigError),
    ],
)
def test_bad_probe_or_sizes(probe, sizes, error):
    with pytest.raises(error):
        calibrate(probe, sizes)


def test_child_peak_is_not_inflated_by_a_big_parent(probe_module):
    # ru_maxrss survives exec on Linux, so a child started by a 300 MiB parent would
    # report >= 300 MiB; the probe's own peak (VmHWM) must not.
    import numpy as np

    ballast = np.ones(300 * MiB, dtype=np.uint8)
    zero = measure(f"{probe_module}:probe", 0, import_distributed=False)
    assert ballast.sum() == 300 * MiB
    assert zero.peak_rss_bytes < 200 * MiB


def test_too_little_growth_measures_again_at_bigger_sizes(probe_module):
    result = calibrate(
        f"{probe_module}:probe",
        (1, 2),
        {"per_item_mib": 1, "fixed_mib": 0},
        import_distributed=False,
    )
    assert result.sizes == (8, 32)  # (1, 2) -> (2, 8) -> (8, 32)
    assert [m.size for m in result.measurements] == [0, 8, 32]
    assert sum("measured again" in note for note in result.notes) == 2
    assert result.per_item_bytes == pytest.approx(MiB, rel=0.15)


def test_growth_retries_stop_at_max_size(probe_module):
    result = calibrate(
        f"{probe_module}:probe",
        (1, 2),
        {"per_item_mib": 1, "fixed_mib": 0},
        import_distributed=False,
        max_size=5,
    )
    assert result.sizes == (1, 2)
    assert any("mostly noise" in note for note in result.notes)


def test_fixed_bytes_get_the_worker_margin_and_the_source_says_so(probe_module):
    kwargs = {"per_item_mib": 4, "fixed_mib": 32}
    bare = calibrate(f"{probe_module}:probe", (4, 16), kwargs, import_distributed=False, margin=0)
    safe = calibrate(f"{probe_module}:probe", (4, 16), kwargs, import_distributed=False)
    assert safe.margin == WORKER_MARGIN > 0
    assert safe.fixed_bytes == pytest.approx(bare.fixed_bytes * (1 + WORKER_MARGIN), rel=0.05)
    assert safe.per_item_bytes == pytest.approx(bare.per_item_bytes, rel=0.15)
    assert f"fixed + {WORKER_MARGIN:.0%} for the Dask worker" in safe.source
    assert "for the Dask worker" not in bare.source


def _forkserver_probe(tmp_path) -> str:
    # In a fresh interpreter: a forkserver started in this session keeps its first
    # preload list (see tests/test_cluster's forkserver test).
    script = tmp_path / "forked.py"
    script.write_text(
        textwrap.dedent("""
        import json, multiprocessing, sys
        from hpcbatch.calibrate import measure

        if __name__ == "__main__":
            multiprocessing.set_forkserver_preload(["numpy", "hb_test_probe"])
            ballast = b"x" * (400 * 2**20)  # the driver's own memory: not the child's
            out = {}
            for start in ("forkserver", "spawn"):
                m = measure("hb_test_probe:probe", 2, {"per_item_mib": 8, "fixed_mib": 0},
                            import_distributed=False, start=start)
                out[start] = m.peak_rss_bytes
            try:
                measure("hb_test_probe:crash", 1, import_distributed=False, start="forkserver")
            except Exception as exc:
                out["crash"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps(out))
    """)
    )
    return str(script)


def test_probe_forked_from_the_forkserver_measures_its_own_peak(probe_module, tmp_path):
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, _forkserver_probe(tmp_path)], capture_output=True, text=True,
        timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # The child's peak: the 16 MiB it allocated over what it shares with the server, not
    # the driver's 400 MiB ballast (a fork of the driver would carry it).
    assert 16 * MiB < out["forkserver"] < 200 * MiB
    assert 16 * MiB < out["spawn"] < 200 * MiB
    assert out["crash"].startswith("CalibrationError: probe hb_test_probe:crash at size 1 failed")
    assert "probe exploded" in out["crash"]


def test_unknown_probe_start_is_refused(probe_module):
    with pytest.raises(ConfigError, match="probe start"):
        measure(f"{probe_module}:probe", 0, import_distributed=False, start="fork")
