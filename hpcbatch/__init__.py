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

__all__ = [
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
