"""A model's outputs as a flat list of tensors, whatever their structure.

Classifiers return one logit tensor; detectors return tuples, lists or dicts of them. Comparing an
original with its pruned copy (distillation, the competition term of synthesis) needs both in
one order, so dict entries are taken by sorted key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from autodfp.errors import PlanError


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of ``out`` (a tensor, or nested sequences and mappings of them), depth first."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for k in sorted(out) for t in flat_outputs(out[k])]
    if isinstance(out, Sequence):
        return [t for o in out for t in flat_outputs(o)]
    raise PlanError(f"expected tensor outputs, got {type(out).__name__}")
