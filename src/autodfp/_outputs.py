"""A model's outputs as a flat list of tensors, whatever their structure, and how far two differ.

Classifiers return one logit tensor; detectors return tuples, lists or dicts of them. Comparing an
original with its pruned copy (distillation, the competition term of synthesis) needs both in
one order, so dict entries are taken by sorted key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

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


def normalised_mse(student_out: Any, teacher_out: Any) -> torch.Tensor:
    """Mean over output tensors of the squared error over the teacher's variance: outputs of any
    structure and scale (box offsets, heatmaps) weigh alike.

    :raises PlanError: when the two do not match in number or shape of tensors
    """
    s_list, t_list = flat_outputs(student_out), flat_outputs(teacher_out)
    if len(s_list) != len(t_list) or any(a.shape != b.shape for a, b in zip(s_list, t_list)):
        raise PlanError("the pruned model's outputs do not match the original's in number or shape")
    losses = [F.mse_loss(a.float(), b.float()) / b.float().var().clamp_min(1e-12) for a, b in zip(s_list, t_list)]
    return torch.stack(losses).mean()
