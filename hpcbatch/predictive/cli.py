"""`hpcbatch predictive ...` commands: thin wrappers over the hpcbatch.predictive API.

Reads settings once (``--profile`` / ``--config`` / flags) and passes values down.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .. import config as hb_config
from ..errors import ConfigError
from ..options import CLUSTER_HELP, accepts_renamed, cpus_option, deprecation_warning, mem_option
from ..units import format_bytes
from .workload import WORKLOAD, auto_or_int


def _config_options(func):
    func = click.option("--config", "config_file", default=None, help="A YAML settings file.")(func)
    return click.option("--profile", default=None, help="A profile, e.g. predictive.")(func)


@click.group("predictive")
def predictive() -> None:
    """Posterior predictive sampling: simulate, fit, sample, demo."""


@predictive.command()
@click.option("--cells", type=int, default=2000, show_default=True, help="N, cells.")
@click.option("--features", type=int, default=200, show_default=True, help="T, features.")
@click.option("--groups", type=int, default=2, show_default=True, help="C, technical groups.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", required=True, help="Data directory to write.")
def simulate(cells, features, groups, seed, out_dir) -> None:
    """Simulate counts from the technical model with known true parameters."""
    from .technical import simulate as simulate_data

    t0 = time.perf_counter()
    data = simulate_data(cells, features, groups, seed=seed, out=out_dir)
    click.echo(
        f"{out_dir}: {data.n_cells} cells x {data.n_features} features, {data.n_groups} groups "
        f"(counts {format_bytes(data.counts.nbytes)}, truth in truth.npz) in "
        f"{time.perf_counter() - t0:.1f} s"
    )


@predictive.command()
@click.argument("data_dir")
@click.option("--steps", type=int, default=1500, show_default=True, help="SVI step budget.")
@click.option("--max-lr", type=float, default=0.05, show_default=True, help="One-cycle peak LR.")
@click.option("--seed", type=int, default=0, show_default=True)
def fit(data_dir, steps, max_lr, seed) -> None:
    """Fit the technical model (SVI, AutoNormal, Adam with a one-cycle learning rate)."""
    from .technical import fit as fit_model

    every = max(1, steps // 10)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == steps:
            click.echo(f"step {step}/{steps}  -ELBO {loss:,.0f}", err=True)

    result = fit_model(data_dir, steps=steps, max_lr=max_lr, seed=seed, progress=progress)
    click.echo(
        f"fitted in {result.wall_time_s:.1f} s, final -ELBO {result.final_elbo_loss:,.0f}; "
        f"guide {result.path / 'guide.pt'}, ELBO curve {result.path / 'elbo.png'}"
    )
    truth = Path(data_dir) / "truth.npz"
    if truth.exists():
        from .technical import recovery

        for name, row in recovery(data_dir).items():
            click.echo(
                f"  {name}: correlation with truth {row['correlation']:.3f}, "
                f"95% interval coverage {row['coverage']:.0%}"
            )


@predictive.command("sample")
@click.argument("data_dir")
@click.option("--samples", type=int, default=None, help="S, posterior samples (default 1000).")
@click.option("--with-observations", is_flag=True, default=None, help="Also draw the counts y.")
@click.option("--chunk-size", default=None, help="Samples per chunk: auto (planned) or a number.")
@click.option("--cell-block", default=None, help="Cells per model run with observations.")
@click.option(
    "--cluster",
    "backend",
    default=None,
    help=f"{CLUSTER_HELP}; sync: in this process, no Dask.",
)
@click.option("--address", default=None, hidden=True, help="Deprecated: use --cluster ADDRESS.")
@click.option("--calibrate/--no-calibrate", default=None, help="Measure the footprint first.")
@click.option("--probe-sizes", default=None, help="The two probe sizes, e.g. 2,8.")
@click.option("--memory-fraction", type=float, default=None,
              help="Share of each worker's memory limit the plan may fill (0-1).")
@mem_option("Plan for this much memory (with --cluster slurm: each worker job's)")
@cpus_option("Plan for this many CPUs (with --cluster slurm: each worker job's).")
@click.option("--seed", type=int, default=None, help="Run seed (chunk seeds derive from it).")
@click.option("--out", "out_path", required=True, help="The zarr store to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--compress", type=click.Choice(["lz4", "zstd", "none"]), default="lz4",
              show_default=True, help="The store's codec: lz4 (fast), zstd (smaller), none.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run into --out: only chunks not in its ledger run.",
)
@click.option("--report-dir", default=None, help="Where the run report goes.")
@click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON.")
@click.option("--tls/--no-tls", default=None, help="TLS between client, scheduler and workers.")
@_config_options
@accepts_renamed
def sample_cmd(
    data_dir,
    samples,
    with_observations,
    chunk_size,
    cell_block,
    backend,
    address,
    calibrate,
    probe_sizes,
    memory_fraction,
    mem,
    cpus,
    seed,
    out_path,
    overwrite,
    compress,
    resume,
    report_dir,
    as_json,
    tls,
    profile,
    config_file,
) -> None:
    """Draw posterior predictive samples of a fitted data directory into a zarr store."""
    settings = hb_config.load(
        profile,
        config_file,
        {"memory-fraction": memory_fraction, "seed": seed, "report-dir": report_dir},
    )
    backend = _cluster(backend, address, settings)
    if tls is not None:
        settings["cluster"]["tls"] = tls
    cfg = WORKLOAD.settings(settings["predictive"])
    run = sample_data_dir(
        data_dir,
        samples=cfg.samples if samples is None else samples,
        with_observations=cfg.with_observations if with_observations is None else with_observations,
        chunk_size=auto_or_int("--chunk-size", chunk_size or cfg.chunk_size),
        cell_block=auto_or_int("--cell-block", cell_block or cfg.cell_block),
        settings=settings,
        out=out_path,
        overwrite=overwrite,
        compress=compress,
        resume=resume,
        sync=backend == "sync",
        calibrate=calibrate,
        probe_sizes=probe_sizes,
        mem=mem,
        cpus=cpus,
    )
    _echo_run(run, out_path, as_json)


def _cluster(value: str | None, address: str | None, settings: dict) -> str | None:
    """``--cluster local|slurm|sync|ADDRESS`` into ``settings``; the old ``--cluster
    address --address ADDRESS`` still works, with a warning."""
    from ..pipeline import ClusterChoice

    if address is not None:
        deprecation_warning("--address", "--cluster ADDRESS", f"--cluster {address}")
        if value not in (None, "address"):
            raise ConfigError(f"give --cluster {value} or --address {address}, not both")
        value = address
    if value in (None, "sync"):
        return value
    if value == "address":  # the scheduler of cluster.address in the config
        settings["cluster"]["backend"] = "address"
        return value
    choice = ClusterChoice.parse(value, settings)
    settings["cluster"]["backend"] = choice.backend
    if choice.address:
        settings["cluster"]["address"] = choice.address
    return choice.backend


def sample_data_dir(
    data_dir,
    *,
    samples: int,
    with_observations: bool,
    chunk_size,
    cell_block,
    settings: dict,
    out,
    overwrite: bool = False,
    compress: str = "lz4",
    resume: bool = False,
    sync: bool = False,
    calibrate: bool | None = None,
    probe_sizes: str | None = None,
    mem: str | int | None = None,
    cpus: int | None = None,
    progress: bool = True,
):
    """Sample the built-in model of a fitted data directory; planned with its footprint
    (measured by its probe with ``calibrate``, else as the ``calibrate`` setting says)."""
    from ..options import probe_sizes as probe_pair
    from ..workload import RunSettings
    from .sampling import Calibrate, Execution, SampleOptions, sample_technical

    hb_config.require_positive("--samples", samples)
    resources = None
    if mem is not None or cpus is not None:
        from ..options import resources_from_options

        # With SLURM workers, --mem/--cpus size each worker job, a new allocation: planned
        # ahead, not checked against this process's (a small driver job's) own allocation.
        worker_jobs = settings["cluster"]["backend"] == "slurm"
        resources = resources_from_options(mem, cpus, plan_ahead=worker_jobs)
    if settings["calibrate"] if calibrate is None else calibrate:
        click.echo("calibrating: running the probe in fresh processes ...", err=True)
    options = SampleOptions(
        chunk_size=chunk_size, cell_block=cell_block, out=out, overwrite=overwrite,
        resume=resume, seed=RunSettings.from_config(settings).seed, compress=compress,
    )  # fmt: skip
    # The CLI keeps its cluster (and ledger, for --resume) unless --cluster sync:
    # cluster="auto" (in-process when one chunk holds the job) is the Python default.
    execution = Execution(
        client="sync" if sync else None, resources=resources, settings=settings,
        report_dir=settings["report-dir"], progress=progress,
        cluster="inprocess" if sync else "cluster",
    )  # fmt: skip
    return sample_technical(
        data_dir, samples=samples, with_observations=with_observations, options=options,
        execution=execution, calibrate=Calibrate(calibrate, probe_pair(probe_sizes)),
    )  # fmt: skip


def _echo_run(run, out_path, as_json: bool) -> None:
    report = run.report
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
        return
    click.echo(report.summary())
    click.echo(f"plan: {run.plan.chunk_size} samples per chunk, {run.plan.n_workers} workers")
    if run.block:
        click.echo(f"cells per model run: {run.block}")
    for site in run.layout.sites:
        click.echo(f"  {out_path}/{site.name}: {list(site.shape)} {site.dtype}")


@predictive.command()
@click.option("--dir", "work_dir", default="hpcbatch-demo/predictive", show_default=True)
@click.option("--cells", type=int, default=2000, show_default=True)
@click.option("--features", type=int, default=200, show_default=True)
@click.option("--samples", type=int, default=400, show_default=True)
@click.option("--steps", type=int, default=600, show_default=True)
@click.option("--cluster", "backend", type=click.Choice(["local", "sync"]), default="local")
@_config_options
def demo(work_dir, cells, features, samples, steps, backend, profile, config_file) -> None:
    """Simulate, fit and sample the built-in model end to end (a few minutes)."""
    from .technical import fit as fit_model
    from .technical import recovery
    from .technical import simulate as simulate_data

    settings = hb_config.load(profile, config_file)
    work = Path(work_dir)
    click.echo(f"1/3 simulate {cells} cells x {features} features -> {work}", err=True)
    simulate_data(cells, features, 2, seed=0, out=work)
    click.echo(f"2/3 fit: {steps} SVI steps", err=True)
    every = max(1, steps // 5)

    def progress(step: int, loss: float) -> None:
        if step % every == 0:
            click.echo(f"  step {step}/{steps}  -ELBO {loss:,.0f}", err=True)

    result = fit_model(work, steps=steps, progress=progress)
    for name, row in recovery(work).items():
        click.echo(
            f"  {name}: correlation with truth {row['correlation']:.3f}, "
            f"95% interval coverage {row['coverage']:.0%}"
        )
    click.echo(f"  ELBO curve: {result.path / 'elbo.png'}")
    out = work / "samples.zarr"
    click.echo(
        f"3/3 sample {samples} posterior predictive draws with observations -> {out}", err=True
    )
    run = sample_data_dir(
        work,
        samples=samples,
        with_observations=True,
        chunk_size="auto",
        cell_block="auto",
        settings=settings,
        out=out,
        overwrite=True,
        sync=backend == "sync",
    )
    _echo_run(run, out, False)
