"""hpcbatch's settings, registered with ``dask.config`` under ``hpcbatch``.

Defaults live in ``hpcbatch.yaml`` beside this module and are registered with
``dask.config.update_defaults`` when this module is imported; environment variables
work the Dask way (``DASK_HPCBATCH__MEMORY_FRACTION=0.5``).  ``dask config get
hpcbatch`` shows them because the package registers its CLI as a ``dask_cli`` entry
point, which makes the ``dask`` command import it.  Profiles (packaged in
``hpcbatch/profiles/``, linked from ``configs/``; or any file with ``--config``) are
merged on top.  Read once at the edge (CLI or public entry points) with :func:`load` and pass
the values down; nothing deeper calls ``dask.config.get``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.config
import yaml

from .errors import ConfigError

if TYPE_CHECKING:
    from .planner import PlanSettings

_DEFAULTS_FILE = Path(__file__).with_name("hpcbatch.yaml")
PROFILE_DIR = Path(__file__).with_name("profiles")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, e.g. 'hpcbatch: {{...}}'")
    return data


DEFAULTS: dict = _read_yaml(_DEFAULTS_FILE)
dask.config.update_defaults(DEFAULTS)


def register_section(name: str, defaults: Mapping[str, Any]) -> None:
    """Make a workload's config section ``hpcbatch.<name>`` known, with its defaults.

    Built-in workloads have theirs in ``hpcbatch.yaml``; a plugin workload declares its
    ``defaults`` and the pipeline registers them before settings are loaded, so
    ``DASK_HPCBATCH__<NAME>__...``, profiles and ``--config`` files may set them.
    """
    section = _normalise(defaults)
    known = DEFAULTS["hpcbatch"].get(name)
    if known == section:
        return
    if known is not None and not isinstance(known, dict):
        raise ConfigError(f"workload name {name!r} is an hpcbatch setting: choose another name")
    DEFAULTS["hpcbatch"][name] = section
    dask.config.update_defaults({"hpcbatch": {name: section}})


def _check_keys(given: Mapping, known: Mapping, where: str, prefix: str = "") -> None:
    for key, value in given.items():
        canonical = str(key).replace("_", "-")
        if canonical not in known:
            raise ConfigError(
                f"unknown setting '{prefix}{key}' in {where}: known settings at this level are "
                + ", ".join(sorted(known))
            )
        if isinstance(known[canonical], dict) and known[canonical] and isinstance(value, Mapping):
            _check_keys(value, known[canonical], where, f"{prefix}{canonical}.")


def _normalise(data: Mapping) -> dict:
    return {
        str(k).replace("_", "-"): _normalise(v) if isinstance(v, Mapping) else v
        for k, v in data.items()
    }


def read_file(path: str | Path) -> dict:
    """A config/profile file's ``hpcbatch`` settings, keys checked against the defaults."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist: check the path")
    data = _read_yaml(path)
    if set(data) != {"hpcbatch"}:
        bad = sorted(set(data) - {"hpcbatch"}) or ["(nothing)"]
        raise ConfigError(
            f"config file {path} must have one top-level key 'hpcbatch', found {bad[0]!r}"
        )
    section = data["hpcbatch"] or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"'hpcbatch' in {path} must be a mapping of settings")
    _check_keys(section, DEFAULTS["hpcbatch"], str(path))
    return _normalise(section)


def profiles() -> list[str]:
    """Names of the packaged profiles (``configs/`` at the repo top links to the same files)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_path(name: str) -> Path:
    """Where the named profile lives: the packaged ``hpcbatch/profiles/``, else ``./configs/``."""
    candidates = [PROFILE_DIR / f"{name}.yaml", Path.cwd() / "configs" / f"{name}.yaml"]
    for path in candidates:
        if path.exists():
            return path
    raise ConfigError(
        f"unknown profile {name!r}: choose one of {', '.join(profiles())} or pass --config FILE"
    )


def load(
    profile: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping | None = None,
) -> dict:
    """The effective ``hpcbatch`` settings: defaults < env/dask config < profile < file < overrides.

    ``overrides`` are flag values; ``None`` values are ignored so unset flags keep the
    configured value.
    """
    settings = copy.deepcopy(dask.config.get("hpcbatch"))
    settings = _normalise(settings)
    _check_keys(settings, DEFAULTS["hpcbatch"], "dask config (DASK_HPCBATCH__* or ~/.config/dask)")
    layers = []
    if profile:
        layers.append(read_file(profile_path(profile)))
    if config_file:
        layers.append(read_file(config_file))
    if overrides:
        layers.append(_normalise({k: v for k, v in overrides.items() if v is not None}))
    for layer in layers:
        settings = dask.config.merge(settings, layer)
    validate(settings)
    return settings


def validate(settings: Mapping[str, Any]) -> None:
    fraction = settings.get("memory-fraction")
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"memory-fraction must be a number in (0, 1), got {fraction!r}") from None
    if not 0 < fraction < 1:
        raise ConfigError(
            f"memory-fraction must be between 0 and 1 (exclusive), got {fraction}: e.g. 0.6"
        )
    backend = settings["cluster"]["backend"]
    if backend not in ("local", "slurm", "address"):
        raise ConfigError(f"unknown cluster backend {backend!r}: use local, slurm or address")


def require_positive(flag: str, value: Any) -> int:
    """``value`` if it is a positive whole number, else one line naming ``flag``."""
    if value is None or value <= 0:
        raise ConfigError(f"{flag} must be a positive whole number, got {value}")
    return value


def _number(settings: Mapping[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    value = settings[key]
    if value is None and optional:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = kind(value)
        if kind is int and number != float(value):
            raise ValueError
        return number
    except (TypeError, ValueError):
        raise ConfigError(
            f"setting {key} must be a {'whole ' if kind is int else ''}number, got {value!r}"
        ) from None


def plan_settings(settings: Mapping[str, Any], **overrides: Any) -> PlanSettings:
    """Build :class:`~hpcbatch.planner.PlanSettings` from loaded settings."""
    from .planner import PlanSettings
    from .units import parse_bytes

    values = dict(
        memory_fraction=_number(settings, "memory-fraction", float),
        reserve_bytes=0
        if settings["reserve"] in (0, "0")
        else parse_bytes(settings["reserve"], what="setting reserve"),
        threads_per_worker=_number(settings, "threads-per-worker", int),
        max_threads_per_worker=_number(settings, "max-threads-per-worker", int),
        max_workers=_number(settings, "max-workers", int, optional=True),
        min_chunk=_number(settings, "min-chunk", int),
        max_chunk=_number(settings, "max-chunk", int, optional=True),
        chunks_per_worker=_number(settings, "chunks-per-worker", int),
        gpu_memory_fraction=_number(settings, "gpu-memory-fraction", float),
        thresholds=dict(settings["thresholds"]),
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PlanSettings(**values)
