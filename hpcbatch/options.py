"""Command-line options every workload shares, and turning their values into objects.

The top-level CLI (``hpcbatch plan/run/slurm render W``) and a workload's own commands
(``hpcbatch stocks predict``, a plugin's group) take the same ``--profile``/``--config``,
allocation (``--mem``/``--cpus``/``--gpus``/``--gpu-mem``), ``--calibrate`` and run options
from here, so they read and behave the same everywhere.  Pure click and value checks: no
workload, no cluster.

One spelling per concept, sbatch's where sbatch has one: ``--mem`` (read exactly as
``sbatch --mem``: K/M/G/T are powers of 1024, a bare number is MiB), ``-c/--cpus``,
``--gpus``, ``-t/--time``, ``--chunk-size``, ``--cluster local|slurm|ADDRESS``.  An old
spelling (``--mem-gb``, ``--walltime``, ``--batch-size``, ``--address`` ...) is a hidden
:class:`RenamedOption`: it still works, and :func:`merge_renamed` prints one
``warning:`` line naming the new spelling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from .errors import ConfigError
from .resources import Resources, detect_resources
from .units import parse_mem


def _stack(*decorators: Callable) -> Callable:
    """One decorator applying ``decorators`` in order (the first is the outermost)."""

    def apply(func: Callable) -> Callable:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


def params_of(*decorators: Callable) -> list[click.Parameter]:
    """The click parameters a stack of option decorators declares (to build commands)."""

    @_stack(*decorators)
    def _none(**_: Any) -> None:
        return None

    return list(click.command()(_none).params)


# ------------------------------------------------------------ old spellings ----


class RenamedOption(click.Option):
    """A hidden old spelling of an option: its value goes to ``target`` (the new option's
    parameter name), converted by ``convert``; :func:`merge_renamed` does that and warns."""

    def __init__(self, param_decls: list[str], *, new: str, target: str, convert=None,
                 example: str = "", **kwargs: Any) -> None:  # fmt: skip
        kwargs.setdefault("help", f"Deprecated: use {new}.")
        kwargs.update(hidden=True, default=None)
        super().__init__(param_decls, **kwargs)
        self.old, self.new, self.target = param_decls[0], new, target
        self.convert = convert or (lambda value: value)
        self.example = example


def renamed_option(old: str, new: str, target: str, **kwargs: Any) -> RenamedOption:
    """The hidden old spelling ``old`` of the option ``new`` (parameter ``target``)."""
    name = "renamed_" + old.lstrip("-").replace("-", "_")
    return RenamedOption([old, name], new=new, target=target, **kwargs)


def renamed(old: str, new: str, target: str, **kwargs: Any) -> Callable:
    """:func:`renamed_option` as a decorator."""
    name = "renamed_" + old.lstrip("-").replace("-", "_")
    return click.option(old, name, cls=RenamedOption, new=new, target=target, **kwargs)


def deprecation_warning(old: str, new: str, example: str = "") -> None:
    """One ``warning:`` line on stderr: ``old`` is deprecated, use ``new``."""
    hint = f" ({example})" if example else ""
    click.echo(f"warning: {old} is deprecated, use {new}{hint}", err=True)


def merge_renamed(params: list[click.Parameter], values: dict) -> dict:
    """Move the values of old spellings in ``values`` (a command's keyword arguments) onto
    their new names, warning once for each one given; both spellings at once is an error."""
    for param in params:
        if not isinstance(param, RenamedOption) or param.name not in values:
            continue
        value = values.pop(param.name)
        if value is None:
            continue
        if values.get(param.target) is not None:
            raise ConfigError(
                f"give {param.new} or {param.old}, not both: {param.old} is the old name of {param.new}"
            )
        deprecation_warning(param.old, param.new, param.example)
        values[param.target] = param.convert(value)
    return values


def accepts_renamed(func: Callable) -> Callable:
    """For a click callback whose command has :class:`RenamedOption` parameters: the
    callback gets the new names only (put this right above ``def``)."""

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        ctx = click.get_current_context()
        return func(**merge_renamed(ctx.command.params, kwargs))

    return wrapper


def _gb_to_bytes(flag: str, new: str) -> Callable[[float], int]:
    """The old decimal-GB flags (``--mem-gb 12`` = 12e9 bytes) keep their meaning."""

    def convert(value: float) -> int:
        if not value > 0:
            raise ConfigError(f"{flag} must be positive, got {value:g}: e.g. {new} 12G")
        return int(value * 1e9)

    return convert


# ------------------------------------------------------------------ options ----

MEM_HELP = "as sbatch --mem: 64G, 500M, 1T (powers of 1024), a bare number is MiB"
GPUS_HELP = "GPUs, as sbatch --gpus: N or TYPE:N (e.g. a100:2)"

config_options = _stack(
    click.option(
        "--profile",
        default=None,
        help="A packaged profile: stocks-12gb, stocks-19gb, stocks-debug, predictive.",
    ),
    click.option("--config", "config_file", default=None, help="A YAML file of hpcbatch settings."),
)


def mem_option(help: str) -> Callable:
    """``--mem`` (sbatch's units) and its old spelling ``--mem-gb`` (decimal GB)."""
    return _stack(
        click.option("--mem", "mem", default=None, metavar="SIZE", help=f"{help}, {MEM_HELP}."),
        renamed("--mem-gb", "--mem", "mem", type=float, convert=_gb_to_bytes("--mem-gb", "--mem"),
                example="sbatch units: --mem 12G is 12 GiB; --mem-gb 12 was 12e9 bytes"),
    )  # fmt: skip


def cpus_option(help: str) -> Callable:
    """``-c``/``--cpus`` (sbatch's ``-c``/``--cpus-per-task`` is accepted too)."""
    return click.option("-c", "--cpus", "--cpus-per-task", "cpus", type=int, default=None,
                        metavar="N", help=help)


gpu_mem_option = _stack(
    click.option("--gpu-mem", default=None, metavar="SIZE",
                 help=f"Memory of each planned GPU, {MEM_HELP} (default 16G)."),
    renamed("--gpu-mem-gb", "--gpu-mem", "gpu_mem", type=float,
            convert=_gb_to_bytes("--gpu-mem-gb", "--gpu-mem"), example="e.g. --gpu-mem 80G"),
)  # fmt: skip

allocation_options = _stack(
    mem_option("Memory of the allocation"),
    cpus_option("CPUs of the allocation (sbatch -c, --cpus-per-task)."),
    click.option("--gpus", default=None, metavar="[TYPE:]N", help=f"{GPUS_HELP}."),
    gpu_mem_option,
)

calibration_options = _stack(
    click.option(
        "--calibrate/--no-calibrate",
        default=None,
        help="Measure the footprint with the workload's probe in fresh processes "
        "instead of the analytic estimate.",
    ),
    click.option("--probe-sizes", default=None, help="The two probe sizes, e.g. 4,16."),
)

CLUSTER_HELP = "local, slurm (worker jobs via dask-jobqueue), or a scheduler: tcp://HOST:8786 or FILE.json"

run_options = _stack(
    click.option("--cluster", "cluster", default=None, help=f"{CLUSTER_HELP}."),
    click.option("--resume", is_flag=True, help="Continue an interrupted run (same settings)."),
    click.option("--run-id", default=None, help="Name of the run in the ledger (default: derived)."),
    click.option("--report-dir", default=None, help="Where run reports go (hpcbatch-reports)."),
    mem_option("Use at most this much memory (with --cluster slurm: each worker job's)"),
    cpus_option("Use at most this many CPUs (with --cluster slurm: each worker job's)."),
    click.option("--json", "as_json", is_flag=True, help="Print the run report as JSON."),
    click.option("--tls/--no-tls", default=None, help="TLS between client, scheduler and workers."),
)  # fmt: skip


def json_option(func: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(func)


# ------------------------------------------------------------------- values ----


def memory_option_bytes(mem: str | int | None, flag: str = "--mem") -> int | None:
    """Bytes from ``--mem`` (sbatch's units; an int is bytes already, from ``--mem-gb``)."""
    if mem is None or isinstance(mem, int) and not isinstance(mem, bool):
        return mem
    return parse_mem(mem, what=flag)


def gpu_count(text: str | int | None, flag: str = "--gpus") -> int | None:
    """``--gpus N`` or ``--gpus TYPE:N`` (sbatch's forms) -> N."""
    if text is None or isinstance(text, int):
        return text
    count = str(text).rsplit(":", 1)[-1].strip()
    if not count.isdigit():
        raise ConfigError(f"{flag} {text!r} is not a GPU count: write N or TYPE:N, e.g. {flag} 2 or {flag} a100:2")
    return int(count)


def gres_gpu_count(text: str) -> int:
    """The GPUs an sbatch ``--gres`` asks for: ``gpu``, ``gpu:2``, ``gpu:a100:2``, and
    ``gpu:2,shard:1`` (other resources are passed on, not planned for)."""
    total = 0
    for entry in str(text).split(","):
        name, _, rest = entry.strip().partition(":")
        if name != "gpu":
            continue
        count = rest.rsplit(":", 1)[-1] if rest else "1"
        if not count.isdigit() and rest.count(":") == 0:
            count = "1"  # gpu:a100 is one GPU of that type
        if not count.isdigit():
            raise ConfigError(
                f"--gres {text!r}: {entry.strip()!r} is not gpu[:TYPE][:N]: e.g. --gres gpu:2 "
                "or --gres gpu:a100:2"
            )
        total += int(count)
    return total


def render_gpus(gpus: str | None, gres: str | None) -> int | None:
    """The GPUs a rendered job asks for, from ``--gpus`` or ``--gres`` (not both)."""
    if gpus is not None and gres is not None:
        raise ConfigError("give --gpus or --gres, not both: e.g. --gpus 2 or --gres gpu:2")
    if gres is not None:
        return gres_gpu_count(gres) or None
    return gpu_count(gpus)


def resources_from_options(
    mem: str | int | None = None,
    cpus: int | None = None,
    gpus: str | int | None = None,
    gpu_mem: str | int | None = None,
    *,
    plan_ahead: bool,
) -> Resources:
    """The allocation, from detection narrowed (or, planning ahead, replaced) by the flags."""
    if cpus is not None and cpus <= 0:
        raise ConfigError(f"--cpus must be positive, got {cpus}")
    return detect_resources(
        memory_bytes=memory_option_bytes(mem),
        cpus=cpus,
        gpus=gpu_count(gpus),
        gpu_memory_bytes=memory_option_bytes(gpu_mem, "--gpu-mem"),
        plan_ahead=plan_ahead,
        memory_flag="--mem",
    )


def run_resources(mem: str | int | None, cpus: int | None, backend: str) -> Resources:
    """The allocation a run plans for.  With SLURM workers (``backend == "slurm"``) the
    flags size each worker job, a new allocation: planned ahead, not checked against this
    process's (a small driver job's) own allocation."""
    return resources_from_options(mem, cpus, plan_ahead=backend == "slurm")


def probe_sizes(text: str | None, default: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """``--probe-sizes 4,16`` as a pair of different positive whole numbers."""
    if text is None:
        return default
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--probe-sizes {text!r} must be two whole numbers, e.g. 4,16") from None
    if a < 1 or b < 1 or a == b:
        raise ConfigError(f"--probe-sizes must be two different positive numbers, got {text}")
    return a, b

