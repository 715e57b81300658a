"""Argument checks shared by the library's entry points, run before any expensive work."""

from __future__ import annotations

import numbers
from typing import Any

from autodfp.errors import PlanError

SEED_LIMIT = 2**32


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, 2**32)``, or a PlanError naming ``name``.

    numpy and stable-baselines3 accept no larger seed, and they are reached only after minutes of
    synthesis; checking at the entry point turns a late crash into an immediate one-line error.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise PlanError(f"{name} must be an integer in [0, 2**32), got {seed!r}")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise PlanError(f"{name} must be in [0, 2**32), got {int(seed)}")
    return int(seed)
