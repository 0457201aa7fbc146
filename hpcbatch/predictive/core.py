"""The pure sampling core: one chunk of posterior predictive samples, in this process.

Mirrors :class:`pyro.infer.Predictive` with ``parallel=True`` call for call (it calls
Pyro's own ``_predictive``), so a chunk of ``n`` samples drawn with seed ``s`` is
bit-identical to ``pyro.set_rng_seed(s); Predictive(model, guide=guide, num_samples=n,
return_sites=..., parallel=True)(*args, **kwargs)``.  Where the data plate is drawn in
several blocks of rows (never bit-identical to one Predictive call anyway), each block is
one vectorised run (:func:`vectorized_draw`): Predictive would first run the model twice
more, unvectorised, on the block's rows to guess the plate nesting and the site shapes,
which :func:`inspect_model` found once for the whole job -- with observations and ``n``
samples per chunk that is ``2/n`` of the drawing done for nothing.

Also owns :func:`inspect_model`: one cheap test run of guide and model that names the
sites, their full output shapes, the data plate's axis in each site, and checks the
user's input (unknown return sites, a guide that does not match the model, a plate
holding local latents, split arguments that do not follow the plate).

No Dask, no files: see :mod:`hpcbatch.predictive.sampling` for the shell.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.predictive import _predictive
from pyro.poutine.util import prune_subsample_sites

from ..errors import ConfigError, DataError

# Rows of the split arguments used for the client's test run of the model.
PROBE_ROWS = 2


@dataclass(frozen=True)
class SiteLayout:
    """One returned site: its full output shape (samples first) and data-plate axis."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    plate_axis: int | None  # axis of the output indexed by the data plate, if any

    @property
    def per_sample_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Layout:
    """What one test run of the model says about the sampling job."""

    sites: tuple[SiteLayout, ...]
    plate_size: int | None
    split_positions: tuple[int, ...]
    split_names: tuple[str, ...]
    needs_blocks: bool  # a returned site lies in the data plate: run block by block
    guide_sites: tuple[str, ...]
    max_plate_nesting: int | None = None  # from the test run (None: let Pyro guess it)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(site.name for site in self.sites)

    def per_sample_bytes(self, *, in_plate: bool) -> int:
        """Output bytes of one sample: sites outside the plate, or per plate row inside it."""
        total = 0
        for site in self.sites:
            if (site.plate_axis is not None) != in_plate:
                continue
            size = site.per_sample_bytes
            if in_plate:
                size //= max(1, site.shape[site.plate_axis])
            total += size
        return total


# ------------------------------------------------------------------ draw ----


def predictive_draw(
    model: Callable,
    *,
    guide: Callable | None,
    posterior: Mapping[str, torch.Tensor] | None,
    num_samples: int,
    model_args: tuple,
    model_kwargs: dict,
    return_sites: Sequence[str] | None,
    guide_args: tuple | None = None,
    guide_kwargs: dict | None = None,
) -> dict[str, torch.Tensor]:
    """What ``Predictive(..., parallel=True).forward`` returns, from the current RNG state.

    With ``guide`` the posterior is drawn from it first (all its sites), as Predictive does.
    """
    posterior = dict(posterior or {})
    sites = list(return_sites) if return_sites else ()
    with torch.no_grad():
        if guide is not None:
            sites = sites or None
            posterior = _predictive(
                guide,
                posterior,
                num_samples,
                return_sites=None,
                parallel=True,
                model_args=model_args if guide_args is None else guide_args,
                model_kwargs=model_kwargs if guide_kwargs is None else guide_kwargs,
            ).samples
        return _predictive(
            model,
            posterior,
            num_samples,
            return_sites=sites,
            parallel=True,
            model_args=model_args,
            model_kwargs=model_kwargs,
        ).samples


def guide_draw(
    guide: Callable, num_samples: int, guide_args: tuple, guide_kwargs: dict
) -> dict[str, torch.Tensor]:
    """The guide's draws for a chunk: the global latents shared by every cell block."""
    with torch.no_grad():
        return _predictive(
            guide,
            {},
            num_samples,
            return_sites=None,
            parallel=True,
            model_args=guide_args,
            model_kwargs=guide_kwargs,
        ).samples


def slice_rows(
    args: tuple, kwargs: dict, positions: Sequence[int], names: Sequence[str], start: int, stop: int
) -> tuple[tuple, dict]:
    """The split arguments cut to rows ``start:stop`` of the data plate (views, no copy)."""
    args = tuple(
        a[start:stop] if i in positions and a is not None else a for i, a in enumerate(args)
    )
    kwargs = {k: v[start:stop] if k in names and v is not None else v for k, v in kwargs.items()}
    return args, kwargs


def draw_blocks(
    model: Callable,
    *,
    posterior: Mapping[str, torch.Tensor],
    num_samples: int,
    model_args: tuple,
    model_kwargs: dict,
    layout: Layout,
    block: int,
    draw_rows: int | None = None,
    lean: bool = False,
) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """Run the model conditioned on one set of global draws, block of rows by block.

    Yields ``(row_start, row_stop, samples)``; sites outside the data plate are the same
    in every block (they come from ``posterior``), so each sample's rows form one draw.
    With several blocks, each is drawn ``draw_rows`` rows at a time into the block's
    output (the likelihood's temporaries then stay those of ``draw_rows`` rows).
    ``lean``: vectorised runs even for a single block (not bit-identical to Predictive).
    """
    n_rows = layout.plate_size or 0
    lean = (lean or block < n_rows) and layout.max_plate_nesting is not None
    step = max(1, min(block, draw_rows or block))
    for start in range(0, n_rows, block):
        stop = min(n_rows, start + block)
        if lean:  # several blocks: vectorised runs only (see the module's docstring)
            draws = _lean_block(
                model, posterior, num_samples, model_args, model_kwargs, layout,
                (start, stop), step,
            )  # fmt: skip
        else:  # one block: Predictive's own call, bit-identical to it
            args, kwargs = slice_rows(
                model_args, model_kwargs, layout.split_positions, layout.split_names, start, stop
            )
            draws = predictive_draw(
                model, guide=None, posterior=posterior, num_samples=num_samples,
                model_args=args, model_kwargs=kwargs, return_sites=layout.names,
            )  # fmt: skip
        yield start, stop, draws


def _lean_block(model, posterior, num_samples, model_args, model_kwargs, layout, rows, step):
    """Rows ``rows[0]:rows[1]`` drawn ``step`` rows per vectorised run, into one output."""
    start, stop = rows
    out: dict[str, torch.Tensor] = {}
    for lo in range(start, stop, step):
        hi = min(stop, lo + step)
        args, kwargs = slice_rows(
            model_args, model_kwargs, layout.split_positions, layout.split_names, lo, hi
        )
        draws = vectorized_draw(
            model, posterior=posterior, num_samples=num_samples, model_args=args,
            model_kwargs=kwargs, layout=layout, rows=hi - lo,
        )  # fmt: skip
        if step >= stop - start:
            return draws
        for site in layout.sites:
            value = draws[site.name]
            if site.plate_axis is None:
                out.setdefault(site.name, value)
                continue
            if site.name not in out:
                shape = list(value.shape)
                shape[site.plate_axis] = stop - start
                out[site.name] = torch.empty(shape, dtype=value.dtype)
            index = [slice(None)] * value.dim()
            index[site.plate_axis] = slice(lo - start, hi - start)
            out[site.name][tuple(index)] = value
        del draws
    return out


# Predictive's name for the plate that vectorises over samples.
_SAMPLES_PLATE = "_num_predictive_samples"


def vectorized_draw(
    model: Callable,
    *,
    posterior: Mapping[str, torch.Tensor],
    num_samples: int,
    model_args: tuple,
    model_kwargs: dict,
    layout: Layout,
    rows: int | None,
) -> dict[str, torch.Tensor]:
    """The vectorised run of ``Predictive(parallel=True)`` alone, on ``rows`` rows of the
    data plate: ``layout`` (from :func:`inspect_model`) already knows the plate nesting and
    the shape of every returned site, which Predictive finds by running the model twice
    more, unvectorised, before every call.  Same draws as Predictive's vectorised run from
    the same RNG state (tests/predictive/test_predictive_core.py checks it)."""
    nesting = int(layout.max_plate_nesting or 0)
    reshaped = {
        name: value.reshape(
            (num_samples,) + (1,) * (nesting - (value.dim() - 1)) + tuple(value.shape[1:])
        )
        for name, value in posterior.items()
    }
    vectorize = pyro.plate(_SAMPLES_PLATE, num_samples, dim=-nesting - 1)
    run = poutine.condition(vectorize(poutine.mask(model, mask=False)), reshaped)
    with torch.no_grad():
        trace = poutine.trace(run).get_trace(*model_args, **model_kwargs)
    draws = {}
    for site in layout.sites:
        shape = [num_samples, *site.shape[1:]]
        if site.plate_axis is not None:
            shape[site.plate_axis] = rows
        value = trace.nodes[site.name]["value"]
        draws[site.name] = value.expand(shape) if value.numel() < np.prod(shape) else (
            value.reshape(shape)
        )
    return draws


def vectorized_guide_draw(
    guide: Callable, num_samples: int, guide_args: tuple, guide_kwargs: dict, layout: Layout
) -> dict[str, torch.Tensor]:
    """The guide's vectorised run alone (its latent draws for ``num_samples`` samples, as
    :func:`vectorized_draw` conditions the model on them), without the two unvectorised
    runs Predictive makes first: the same distribution, not Predictive's numbers."""
    nesting = int(layout.max_plate_nesting or 0)
    vectorize = pyro.plate(_SAMPLES_PLATE, num_samples, dim=-nesting - 1)
    with torch.no_grad():
        trace = poutine.trace(vectorize(guide)).get_trace(*guide_args, **guide_kwargs)
    trace = prune_subsample_sites(trace)  # the plates' own index sites
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


# --------------------------------------------------------------- inspect ----


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run something that draws random numbers without moving the caller's RNG."""
    state = pyro.util.get_rng_state()
    try:
        yield
    finally:
        pyro.util.set_rng_state(state)


def normalise_split_args(
    model: Callable, model_args: tuple, model_kwargs: dict, split_args: Sequence | None
) -> tuple[tuple[int, ...], tuple[str, ...], int]:
    """Positions and keyword names of the split arguments, and their common leading size."""
    if not split_args:
        raise ConfigError(
            "data_plate needs split_args: name the model arguments indexed by the plate, "
            "e.g. split_args=('counts',)"
        )
    try:
        params = list(inspect.signature(model).parameters)
    except (TypeError, ValueError):
        params = []
    positions, names, sizes = [], [], {}
    for arg in split_args:
        if isinstance(arg, int):
            if not 0 <= arg < len(model_args):
                raise ConfigError(
                    f"split_args position {arg} is out of range: the model got "
                    f"{len(model_args)} positional arguments"
                )
            positions.append(arg)
            value, label = model_args[arg], f"argument {arg}"
        elif arg in model_kwargs:
            names.append(arg)
            value, label = model_kwargs[arg], arg
        elif arg in params and params.index(arg) < len(model_args):
            positions.append(params.index(arg))
            value, label = model_args[params.index(arg)], arg
        else:
            given = params[: len(model_args)] + list(model_kwargs)
            raise ConfigError(
                f"split_args names {arg!r}, which is not an argument passed to the model: "
                f"choose from {', '.join(map(str, given)) or '(none)'}"
            )
        if value is None:
            continue
        if not hasattr(value, "shape") or len(value.shape) == 0:
            raise ConfigError(f"split argument {label} must be an array with the plate first")
        sizes[label] = int(value.shape[0])
    if not sizes:
        raise ConfigError("every split argument is None: pass at least one array")
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ConfigError(
            f"split_args have different leading dimensions ({listing}): each must have one "
            "row per element of the data plate"
        )
    return tuple(positions), tuple(names), next(iter(sizes.values()))


def _site_shape(site: dict, max_plate_nesting: int) -> tuple[int, ...]:
    append = max_plate_nesting - len(site["fn"].batch_shape)
    return (1,) * append + tuple(site["value"].shape)


def _raw_trace(model, args, kwargs):
    """The model's trace, the plates' own index sites included."""
    with poutine.block(), torch.no_grad():
        return poutine.trace(model).get_trace(*args, **kwargs)


def _model_trace(model, args, kwargs):
    """The model's trace without the plates' index sites."""
    return prune_subsample_sites(_raw_trace(model, args, kwargs))


def _plate_nesting(raw_trace) -> int:
    """The plate nesting Pyro's ``_guess_max_plate_nesting`` finds from the same run."""
    dims = [
        frame.dim
        for site in raw_trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def inspect_model(
    model: Callable,
    *,
    guide: Callable | None,
    posterior: Mapping[str, torch.Tensor] | None,
    num_samples: int,
    model_args: tuple,
    model_kwargs: dict,
    return_sites: Sequence[str] | None,
    data_plate: str | None = None,
    split_args: Sequence | None = None,
) -> Layout:
    """One unvectorised run of guide and model (on a few rows when splitting); check inputs."""
    positions, names, plate_size = (), (), None
    probe_args, probe_kwargs = model_args, model_kwargs
    if data_plate is not None:
        positions, names, plate_size = normalise_split_args(
            model, model_args, model_kwargs, split_args
        )
        rows = min(PROBE_ROWS, plate_size)
        probe_args, probe_kwargs = slice_rows(model_args, model_kwargs, positions, names, 0, rows)
    with preserved_rng():
        guide_trace = None
        if guide is not None:
            try:
                guide_trace = _model_trace(guide, model_args, model_kwargs)
            except Exception as exc:
                raise ConfigError(
                    f"the guide raised on the model's arguments ({_describe(exc)}): pass the guide "
                    "fitted to this model"
                ) from exc
        latent_values = _guide_values(guide_trace, posterior)
        if data_plate is not None and posterior:
            _check_posterior_locals(model, probe_args, probe_kwargs, data_plate, posterior)
        if data_plate is not None and guide_trace is not None:
            for name, site in guide_trace.nodes.items():
                in_plate = any(f.name == data_plate for f in site.get("cond_indep_stack", ()))
                if site["type"] == "sample" and in_plate and name in latent_values:
                    raise _local_latent(data_plate, name, True)
        try:
            raw = _raw_trace(poutine.condition(model, latent_values), probe_args, probe_kwargs)
        except Exception as exc:
            where = (
                f" on {min(PROBE_ROWS, plate_size)} rows of '{data_plate}'" if data_plate else ""
            )
            raise _model_error(exc, where, latent_values, data_plate, plate_size) from exc
    trace = prune_subsample_sites(raw)
    sample_sites = {name: site for name, site in trace.nodes.items() if site["type"] == "sample"}
    _check_guide(sample_sites, latent_values, guide is not None)
    max_nesting = _plate_nesting(raw)  # as Predictive guesses it, from this same run
    chosen = _choose_sites(sample_sites, trace, return_sites, latent_values, guide is not None)
    layouts = []
    for name in chosen:
        site = sample_sites[name]
        shape = _site_shape(site, max_nesting)
        axis = None
        if data_plate is not None:
            frames = [f for f in site["cond_indep_stack"] if f.name == data_plate]
            if frames:
                frame = frames[0]
                if frame.size != min(PROBE_ROWS, plate_size):
                    raise _plate_mismatch(data_plate, frame.size, plate_size)
                axis = 1 + max_nesting + frame.dim
                shape = shape[: axis - 1] + (plate_size,) + shape[axis:]
                if name in latent_values:
                    raise _local_latent(data_plate, name, guide is not None)
        layouts.append(SiteLayout(name, (num_samples, *shape), _dtype_name(site["value"]), axis))
    if data_plate is not None:
        _check_plate(sample_sites, data_plate, latent_values, plate_size, guide is not None)
    return Layout(
        sites=tuple(layouts),
        plate_size=plate_size,
        split_positions=positions,
        split_names=names,
        needs_blocks=any(s.plate_axis is not None for s in layouts),
        guide_sites=tuple(latent_values),
        max_plate_nesting=max_nesting,
    )


def _guide_values(guide_trace, posterior) -> dict[str, torch.Tensor]:
    if guide_trace is not None:
        return {
            name: site["value"]
            for name, site in guide_trace.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and not site["infer"].get("is_auxiliary")
        }
    return {name: value[0] for name, value in (posterior or {}).items()}


def _check_posterior_locals(model, args, kwargs, plate, posterior) -> None:
    """A posterior_samples entry for a site inside the data plate cannot be split."""
    try:
        prior = _model_trace(model, args, kwargs)
    except Exception:  # noqa: BLE001  (the conditioned run below reports it)
        return
    for name, site in prior.nodes.items():
        in_plate = any(f.name == plate for f in site.get("cond_indep_stack", ()))
        if site["type"] == "sample" and in_plate and name in posterior:
            raise _local_latent(plate, name, False)


def _model_error(exc, where, latent_values, data_plate, plate_size=None) -> Exception:
    text = _describe(exc)
    if data_plate is not None:
        mismatch = re.search(
            rf"inside plate\('{re.escape(data_plate)}'\) at site .* (\d+) vs (\d+)", text
        )
        if mismatch:
            return _plate_mismatch(data_plate, int(mismatch.group(1)), plate_size)
    if latent_values and ("shape" in text.lower() or "size" in text.lower()):
        return ConfigError(
            f"the model failed when conditioned on the guide's draws{where} ({text}): the "
            "guide (or posterior_samples) does not match the model; pass the one fitted to it"
        )
    if data_plate is not None:
        return ConfigError(
            f"the model raised{where} ({text}): check that the size of plate '{data_plate}' "
            "comes from the split arguments"
        )
    return DataError(f"the model raised on a test run ({text}): fix the model or its arguments")


def _check_guide(sample_sites, latent_values, from_guide: bool) -> None:
    source = "guide" if from_guide else "posterior_samples"
    for name, value in latent_values.items():
        site = sample_sites.get(name)
        if site is None:
            raise ConfigError(
                f"the {source} has a site {name!r} that the model does not sample (model sites: "
                f"{', '.join(sorted(sample_sites))}): pass the {source} fitted to this model"
            )
        if site["is_observed"] and not site["infer"].get("_deterministic"):
            continue
        expected = _strip_ones(tuple(site["fn"].shape()))
        if _strip_ones(tuple(value.shape)) != expected:
            raise ConfigError(
                f"the {source}'s site {name!r} has shape {tuple(value.shape)} but the model's has "
                f"{expected}: the {source} was fitted to another model or other data"
            )


def _strip_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def _choose_sites(sample_sites, trace, return_sites, latent_values, from_guide) -> list[str]:
    if return_sites:
        return_sites = list(return_sites)
        unknown = [name for name in return_sites if name not in sample_sites]
        if "_RETURN" in unknown:
            raise ConfigError("return_sites '_RETURN' is not supported: return a site instead")
        if unknown:
            raise ConfigError(
                f"unknown return site{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}: the model's sites are "
                + ", ".join(sorted(sample_sites))
            )
        return list(dict.fromkeys(return_sites))
    # Predictive's defaults: every site with a guide, else those not in the posterior.
    return [name for name in sample_sites if from_guide or name not in latent_values]


def _dtype_name(value: torch.Tensor) -> str:
    return str(torch.empty((), dtype=value.dtype).numpy().dtype)


def _plate_mismatch(plate: str, model_size: int, split_size: int) -> ConfigError:
    if model_size != split_size:
        return ConfigError(
            f"split_args have {split_size} rows but the model's plate '{plate}' has size "
            f"{model_size}: pass arguments with one row per element of the plate"
        )
    return ConfigError(
        f"the model's plate '{plate}' keeps size {model_size} when the split arguments are "
        "cut to fewer rows: take the plate size from a split argument (e.g. counts.shape[0])"
    )


def _local_latent(plate: str, name: str, from_guide: bool) -> ConfigError:
    source = "guide" if from_guide else "posterior_samples"
    return ConfigError(
        f"plate '{plate}' holds the local latent variable {name!r} (drawn by the {source}), so "
        "it cannot be split into blocks: sample without data_plate, or drop the local latent"
    )


def _check_plate(sample_sites, plate, latent_values, plate_size, from_guide) -> None:
    found = False
    for name, site in sample_sites.items():
        frames = [f for f in site["cond_indep_stack"] if f.name == plate]
        if not frames:
            continue
        found = True
        if frames[0].size != min(PROBE_ROWS, plate_size):
            raise _plate_mismatch(plate, frames[0].size, plate_size)
        if name in latent_values:
            raise _local_latent(plate, name, from_guide)
    if not found:
        plates = sorted(
            {f.name for s in sample_sites.values() for f in s["cond_indep_stack"] if f.vectorized}
        )
        raise ConfigError(
            f"the model has no plate named '{plate}' around a sample site: data_plate must be "
            f"one of {', '.join(plates) or '(no plates)'}"
        )
