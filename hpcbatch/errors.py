"""The small error hierarchy of hpcbatch.

Every error a user can cause or fix is an :class:`HpcbatchError`.  Its message is
one line that names the problem and the fix; the CLI prints it (no traceback) and
exits with :attr:`HpcbatchError.exit_code`.
"""

from __future__ import annotations


class HpcbatchError(Exception):
    """Base class: a failure with a one-line explanation for the user."""

    exit_code = 1


class ConfigError(HpcbatchError):
    """Bad input: a setting, flag, profile or config file that cannot be used."""

    exit_code = 2


class ResourceError(HpcbatchError):
    """The allocation cannot be read, or asks for more than exists."""

    exit_code = 2


class PlanInfeasibleError(HpcbatchError):
    """No plan fits the allocation; the message says the minimum to request."""

    exit_code = 2

    def __init__(self, message: str, *, min_memory_bytes: int | None = None):
        super().__init__(message)
        self.min_memory_bytes = min_memory_bytes


class CalibrationError(HpcbatchError):
    """A calibration probe could not be run or measured."""

    exit_code = 2


class ClusterStartError(HpcbatchError):
    """A Dask cluster could not be started or reached."""


class ChunkFailedError(HpcbatchError):
    """A chunk failed for good (after retries and splits)."""

    def __init__(self, message: str, *, chunk_id: str | None = None):
        super().__init__(message)
        self.chunk_id = chunk_id


class DataError(HpcbatchError):
    """Input data (database rows, arrays, model files) is missing or malformed."""

    exit_code = 2


class RunInterrupted(HpcbatchError):
    """The driver was asked to stop (SIGTERM at walltime); resume later."""

    exit_code = 3
