"""Analytic memory footprint of posterior predictive sampling (per sample, per worker).

The true cost drivers (REFERENCE.md, section 2): with the likelihood present a
vectorised draw materialises about 4-6 x S x N x T x 4 bytes; without it, the latent
sites and the guide's draws, O(S x C x T).  hpcbatch never runs the likelihood over all
cells at once: latent-only sampling runs it on one cell, sampling observations runs it
block by block of cells, so one sample's cost is bounded by the block.  Constants were
measured with :func:`hpcbatch.predictive.probe.probe`; ``--calibrate`` measures them
again for the run at hand.
"""

from __future__ import annotations

from ..planner import Footprint

FLOAT = 4
# Where the analytic constants below come from (issue 15 item 6): measured, on one
# machine, not on the machine at hand; --calibrate measures them again for the run.
SOURCE = "analytic, constants measured 2026-11-23 on the build machine; --calibrate measures them here"
PROVENANCE = (
    "measured 2026-11-23 on the project's 2-core x86_64 Linux build "
    "machine (torch 2.x CPU, pyro 1.9, distributed 2026.x) by hpcbatch.predictive.probe "
    "(technical model, N=5,000 x T=4,000: {detail}) and benchmarks/load_predictive.py "
    "(driver 345-356 MiB, results-load-predictive.json); not measured on this machine: "
    "--calibrate measures them here"
)
TECHNICAL_DETAIL = (
    "baseline 336 MiB = worker RSS 284-300 MiB at the smallest sizes (2026-12-06, "
    "benchmarks/calibration.py --quick) + 12 %; 22 floats per "
    "feature per sample for the latents; 6 copies per observed value with observations"
)
GENERIC_DETAIL = (
    "baseline 336 MiB as the technical model's; 4 copies of each returned latent byte and "
    "6 per data-plate byte, from the technical model's sites, not from this model"
)
# Interpreter + torch + Pyro + a Dask worker.  Was 400 MiB (the probe's 272 MiB at size
# 0 + a guess for the worker); measured per-worker peaks at the smallest sizes are
# 284-300 MiB (benchmarks/calibration.py --quick, 2026-12-06, torch 2.13 CPU, pyro
# 1.9.2, distributed 2026.8; issue 15's quiet run: 340 MiB with 44 MB of chunk), so
# 400 MiB over-predicted small runs by ~35 % (measured / predicted 0.71-0.74).
BASELINE_BYTES = 336 * 1024**2
# The driver: client + in-process scheduler, with torch and Pyro imported. Measured peak
# RSS 345-356 MiB (benchmarks/results-load-predictive.json, up to 340 chunks' worth).
DRIVER_BYTES = 416 * 1024**2
# Tensors alive per observed value during a vectorised NegativeBinomial draw: logits
# temporaries, the Gamma rate, the Poisson draw, the numpy/zarr copy.  Measured with
# the probe at N=5,000, T=4,000: 98 MB per sample for 1,048-cell blocks = 5.8 x
# block x T x 4 bytes.
OBS_COPIES = 6


# Workers forked from a forkserver that preloaded torch and Pyro (the default for a local
# cluster, ``worker_start="forkserver"``) hold less of their own: measured 239 vs 302 MiB
# per worker (benchmarks/predictive.py --cases smoke_obs, 2026-12-06, same machine); a
# caller's model through sample() measured 221-269 MiB per worker at three sizes
# (benchmarks/calibration.py, 2026-12-06), 0.80-0.89 of a 64 MiB saving's prediction:
# 80 MiB puts them at 0.85-0.94, still on the safe side.  The constants above are in
# spawned-worker terms (SLURM, an existing cluster); the pipeline takes this off the
# analytic footprint where it forks local workers (hpcbatch.workload.PreloadSaving).
FORKSERVER_SAVING_BYTES = 80 * 1024**2
FORKSERVER_MEASURED = "measured 221-269 MiB per worker against 336 MiB spawned, 2026-12-06"


# Bytes one sample may use per block of data-plate rows (the vectorised likelihood of
# all sites of one block): rows per block = this / (OBS_COPIES x row bytes).
BLOCK_TARGET_BYTES = 64 * 1024**2


def auto_block(n_rows: int, row_bytes_per_sample: int) -> int:
    """Rows of the data plate per block (one zarr chunk along the plate, one write)."""
    per_row = max(1, OBS_COPIES * row_bytes_per_sample)
    return max(1, min(n_rows, BLOCK_TARGET_BYTES // per_row))


# With several blocks, a block is drawn a few rows at a time into its output: the
# likelihood's temporaries (OBS_COPIES per value) stay under this for the whole chunk,
# whatever its samples, so a worker holds its runtime, the block's output (the outputs
# in flight) and this (issue 15 item 3).  16 MiB: a vectorised run then draws ~0.7 M
# values (~0.08 s), so a run's fixed cost (~3 ms) is ~4 % of it; each temporary (a
# sixth of it) stays under the workers' mmap threshold below.
DRAW_TARGET_BYTES = 16 * 1024**2
# Workers drawing keep freed memory for the next vectorised run instead of handing it
# back to the OS after each (Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536,
# which makes glibc map and fault in every temporary afresh): allocations under
# WORKER_MMAP_THRESHOLD come from the heap, and up to WORKER_TRIM_THRESHOLD free bytes
# at its top are kept (``task.keep_freed_memory``, for jobs drawn in several blocks,
# whose temporaries DRAW_TARGET_BYTES bounds).  Measured on the technical model,
# 5 samples x 34 rows x 4,000 features per run, one process, 2026-12-06: 6.2-6.4 M
# values per CPU-s with Dask's setting, 7.7-7.9 with these; peak RSS 315 -> 345 MiB.
WORKER_MMAP_THRESHOLD = 8 * 1024**2
WORKER_TRIM_THRESHOLD = 32 * 1024**2
# Fixed bytes of drawing a chunk in several blocks: the temporaries and what the
# worker's heap keeps.
DRAW_FIXED_BYTES = DRAW_TARGET_BYTES + WORKER_TRIM_THRESHOLD
# Copies of a block's output alive at once: the output itself and the transient copy
# of one zarr chunk while it is written.
OUTPUT_COPIES = 2


def draw_rows(row_bytes_per_sample: int, samples: int, block: int) -> int:
    """Rows of the data plate per vectorised model run in a chunk of ``samples``."""
    per_row = max(1, OBS_COPIES * row_bytes_per_sample * max(1, samples))
    return max(1, min(block, DRAW_TARGET_BYTES // per_row))


def observation_bytes(row_bytes_per_sample: int, rows: int, block: int) -> tuple[int, int]:
    """(fixed, per sample) bytes of drawing observations in blocks of ``block`` of ``rows``
    rows: one block is one vectorised run (OBS_COPIES per value); several are drawn a few
    rows at a time into the block's output (DRAW_TARGET_BYTES, at least one row, and
    the freed memory such a worker keeps: DRAW_FIXED_BYTES)."""
    if block >= rows:
        return 0, OBS_COPIES * block * row_bytes_per_sample
    per_sample = (OUTPUT_COPIES * block + OBS_COPIES) * row_bytes_per_sample
    return DRAW_FIXED_BYTES, per_sample


# Latent tensors alive per feature per sample: guide draws (unconstrained and
# constrained), alpha [C], mu, o, phi, log2_alpha [C-1], their zarr copies and
# temporaries.  Measured with the probe at T=4,000, C=2: 350 KB per sample = 22 floats
# per feature.
def _latent_floats_per_feature(groups: int) -> int:
    return 5 * groups + 12


def technical_footprint(
    cells: int,
    features: int,
    groups: int,
    samples: int,
    *,
    with_observations: bool = False,
    cell_block: int | None = None,
    shared_input_mmap: bool = True,
) -> Footprint:
    """Per-sample bytes for the built-in negative-binomial technical model.

    With observations, one item is one sample over a block of ``cell_block`` cells
    (by default :func:`auto_block`, as ``hpcbatch.predictive.sample`` chooses): the
    planner's chunk of samples then runs block by block.
    """
    latent = _latent_floats_per_feature(groups) * features * FLOAT
    per_item, fixed = latent, 0
    block = cell_block or auto_block(cells, features * FLOAT)
    if with_observations:
        fixed, per_sample = observation_bytes(features * FLOAT, cells, block)
        per_item += per_sample
    counts = cells * features * FLOAT
    return Footprint(
        workload="predictive",
        item_name="sample",
        n_items=samples,
        per_item_bytes=per_item,
        baseline_bytes=BASELINE_BYTES + 2 * cells * FLOAT + fixed,
        shared_input_bytes=counts,
        shared_input_mmap=shared_input_mmap,
        driver_bytes=DRIVER_BYTES,
        source=SOURCE,
        constants=PROVENANCE.format(detail=TECHNICAL_DETAIL),
        details=(
            ("latent sites per sample", latent),
            ("observations per sample", per_item - latent),
            ("counts matrix (shared input)", counts),
        ),
        shrink_hints=("lower --samples or sample without --with-observations",)
        if with_observations
        else ("lower --samples",),
    )


# Bytes alive per output byte while a vectorised chunk is drawn: the guide's draw, the
# model's value, the conversion to numpy and the zarr write buffer.
LATENT_COPIES = 4
GENERIC_BASELINE_BYTES = BASELINE_BYTES


def sampling_footprint(
    samples: int,
    *,
    latent_bytes_per_sample: int,
    row_bytes_per_sample: int = 0,
    rows_per_block: int = 0,
    shared_input_bytes: int = 0,
    plate_rows: int = 0,
) -> Footprint:
    """Per-sample bytes of any model, from the sizes of its returned sites.

    ``row_bytes_per_sample`` is the output of one data-plate row for one sample; a block
    of ``rows_per_block`` rows is drawn at a time and costs about ``OBS_COPIES`` times its
    output (the vectorised likelihood's temporaries).
    """
    latent = LATENT_COPIES * latent_bytes_per_sample
    fixed, rows = 0, 0
    if row_bytes_per_sample and rows_per_block:
        fixed, rows = observation_bytes(row_bytes_per_sample, plate_rows or rows_per_block,
                                        rows_per_block)  # fmt: skip
    return Footprint(
        workload="predictive",
        item_name="sample",
        n_items=samples,
        per_item_bytes=max(1, latent + rows),
        baseline_bytes=GENERIC_BASELINE_BYTES + fixed,
        shared_input_bytes=shared_input_bytes,
        shared_input_mmap=True,
        driver_bytes=DRIVER_BYTES,
        source=SOURCE,
        constants=PROVENANCE.format(detail=GENERIC_DETAIL),
        details=(
            ("returned sites outside the data plate, per sample", latent),
            ("one block of data-plate rows, per sample", rows),
            ("shared inputs (memory-mapped)", shared_input_bytes),
        ),
        shrink_hints=("use a smaller cell_block",) if rows else ("lower num_samples",),
    )
