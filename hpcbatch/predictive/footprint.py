"""Analytic memory footprint of posterior predictive sampling (per sample, per worker).

The true cost drivers (REFERENCE.md, section 2): with the likelihood present a
vectorised draw materialises about 4 x S x N x T x 4 bytes; without it, the latent
sites and the guide's draws, O(S x C x T).  Replaced by a measured footprint with
``--calibrate``.
"""

from __future__ import annotations

from ..planner import Footprint

FLOAT = 4
# Interpreter + torch + Pyro + a Dask worker.
BASELINE_BYTES = 450 * 1024**2
# Tensors alive per observed value during a vectorised NegativeBinomial draw.
OBS_COPIES = 4


# Latent tensors alive per feature per sample: guide loc/scale draws, alpha [C],
# mu, o, phi, log2_alpha [C-1], plus temporaries.
def _latent_floats_per_feature(groups: int) -> int:
    return 3 * groups + 8


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
    (all cells by default): the planner's chunk of samples then runs block by block.
    """
    latent = _latent_floats_per_feature(groups) * features * FLOAT
    per_item = latent
    block = cell_block or cells
    if with_observations:
        per_item += OBS_COPIES * block * features * FLOAT
    counts = cells * features * FLOAT
    return Footprint(
        workload="predictive",
        item_name="sample",
        n_items=samples,
        per_item_bytes=per_item,
        baseline_bytes=BASELINE_BYTES + 2 * cells * FLOAT,
        shared_input_bytes=counts,
        shared_input_mmap=shared_input_mmap,
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
) -> Footprint:
    """Per-sample bytes of any model, from the sizes of its returned sites.

    ``row_bytes_per_sample`` is the output of one data-plate row for one sample; a block
    of ``rows_per_block`` rows is drawn at a time and costs about ``OBS_COPIES`` times its
    output (the vectorised likelihood's temporaries).
    """
    latent = LATENT_COPIES * latent_bytes_per_sample
    rows = OBS_COPIES * row_bytes_per_sample * rows_per_block
    return Footprint(
        workload="predictive",
        item_name="sample",
        n_items=samples,
        per_item_bytes=max(1, latent + rows),
        baseline_bytes=GENERIC_BASELINE_BYTES,
        shared_input_bytes=shared_input_bytes,
        shared_input_mmap=True,
        details=(
            ("returned sites outside the data plate, per sample", latent),
            ("one block of data-plate rows, per sample", rows),
            ("shared inputs (memory-mapped)", shared_input_bytes),
        ),
        shrink_hints=("use a smaller cell_block",) if rows else ("lower num_samples",),
    )
