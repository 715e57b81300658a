"""User-facing errors.

Anything a user can cause (a bad path, a corrupt checkpoint, an impossible budget) is raised as
:class:`AutoDFPError`, whose message is one self-contained line. The CLI prints it without a
traceback; library callers can catch it as one type.
"""

from __future__ import annotations


class AutoDFPError(Exception):
    """An error caused by user input, reported as one line without a traceback."""


class WeightsError(AutoDFPError):
    """A weight file is missing, corrupt, unsafe to load or fails its hash check."""


class DataError(AutoDFPError):
    """A dataset is missing, empty or laid out in a way the reader does not understand."""


class ModelError(AutoDFPError):
    """An unknown model name, an unsupported layer, or an architecture/state-dict mismatch."""


class PlanError(AutoDFPError):
    """A pruning plan that cannot be applied: unknown group, ratio out of range, impossible budget."""


class CheckpointError(AutoDFPError):
    """A search checkpoint that is damaged, foreign, unsafe to load, or from another configuration."""


class CacheWarning(UserWarning):
    """The cache directory cannot be used; work goes on without caching (one line, no traceback)."""
