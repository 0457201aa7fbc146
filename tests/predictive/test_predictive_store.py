"""Writing draws into the zarr store: whole chunks at a time, every value lands."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from hpcbatch.predictive import core, task


@pytest.mark.parametrize(
    "start, stop, z, expected",
    [
        (0, 8, 1, [(i, i + 1) for i in range(8)]),
        (3, 11, 4, [(3, 4), (4, 8), (8, 11)]),
        (0, 8, 8, [(0, 8)]),
        (5, 6, 8, [(5, 6)]),
        (0, 5, 2, [(0, 2), (2, 4), (4, 5)]),
    ],
)
def test_pieces_cut_at_zarr_chunk_boundaries(start, stop, z, expected):
    assert task._chunk_pieces(start, stop, z) == expected


def test_write_spanning_chunks_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    shape, chunks = (12, 10, 7), (3, 4, 7)
    group = zarr.open_group(store=str(tmp_path / "s"), mode="w")
    group.create_array("y", shape=shape, chunks=chunks, dtype="float32", fill_value=0,
                       compressors=None)  # fmt: skip
    site = core.SiteLayout(name="y", shape=shape, dtype="float32", plate_axis=1)
    expected = np.zeros(shape, np.float32)
    task._ARRAYS.clear()
    # unaligned samples, a block of rows that ends inside the array's last chunk, a block
    # of zeros (an all-fill chunk is stored and read back as zeros)
    for start, stop, rows, zero in [(1, 8, (0, 4), False), (8, 12, (0, 4), True),
                                    (0, 1, (0, 4), False), (0, 12, (4, 10), False)]:  # fmt: skip
        value = np.zeros((stop - start, rows[1] - rows[0], 7), np.float32)
        if not zero:
            value = rng.poisson(5, value.shape).astype(np.float32)
        written = task._write(str(tmp_path / "s"), site, start, stop, value, rows=rows)
        assert written == value.nbytes
        expected[start:stop, rows[0] : rows[1]] = value
    task._ARRAYS.clear()
    got = zarr.open_array(store=str(tmp_path / "s" / "y"), mode="r")[:]
    np.testing.assert_array_equal(got, expected)


def test_worker_arrays_skip_the_empty_chunk_scan(tmp_path):
    """Workers open the store's arrays writing every chunk (no all-fill scan per chunk)."""
    group = zarr.open_group(store=str(tmp_path / "s"), mode="w")
    group.create_array("y", shape=(2, 3), chunks=(1, 3), dtype="float32", fill_value=0)
    task._ARRAYS.clear()
    array = task._zarr_array(str(tmp_path / "s"), "y")
    task._ARRAYS.clear()
    assert array.config.write_empty_chunks is True
