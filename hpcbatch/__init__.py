"""hpcbatch: run big batch jobs on HPC clusters without running out of memory.

The way through: ``Resources`` + ``Footprint`` -> ``Plan`` -> cluster -> chunk tasks
-> runner -> sink -> ``RunReport``.
"""

from .errors import (
    ChunkFailedError,
    ClusterStartError,
    ConfigError,
    DataError,
    HpcbatchError,
    PlanInfeasibleError,
    ResourceError,
    RunInterrupted,
)
from .planner import Footprint, Plan, PlanSettings, make_plan
from .resources import Resources, detect_resources

__version__ = "0.1.0"

# The framework API, imported on first use (``import hpcbatch`` stays light for the CLI):
# ``hpcbatch.map`` (shadows the builtin only as this attribute), the Workload contract
# and the sinks of ``map``.
_LAZY = {
    "map": "api",
    "FunctionWorkload": "api",
    "Results": "api",
    "Workload": "workload",
    "Job": "workload",
    "Sink": "workload",
    "RunIdentity": "workload",
    "RunContext": "workload",
    "RunSettings": "workload",
    "Invocation": "workload",
    "JobSizes": "workload",
    "typed_settings": "workload",
    "MapSink": "sinks",
    "ReturnedSink": "sinks",
    "ZarrSink": "sinks",
    "ParquetSink": "sinks",
    "SQLSink": "sinks",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hpcbatch' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "ChunkFailedError",
    "ClusterStartError",
    "ConfigError",
    "DataError",
    "Footprint",
    "HpcbatchError",
    "Plan",
    "PlanInfeasibleError",
    "PlanSettings",
    "ResourceError",
    "Resources",
    "RunInterrupted",
    "detect_resources",
    "make_plan",
]
