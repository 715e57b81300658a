"""Training-time branches folded into one conv before pruning (RepVGG, MobileOne, FastViT's convs).

A re-parameterisable block trains as parallel branches (a 3x3 conv + BN, a 1x1 conv + BN, an
identity BN) whose outputs are added; at inference they are one 3x3 conv. Added branches couple
every channel of the block's output to its neighbours' through the sum, so the group finder sees
no prunable group at all. The blocks say how to fold themselves: timm's ``reparameterize()`` and
the original RepVGG's ``switch_to_deploy()`` replace the branches in place with the equivalent
single conv. We call those, on a copy, and check that the copy computes what the original did
before anything is pruned.

Deliberately *not* called: ``fuse()`` (timm's conv + BN folding), which would remove the BatchNorm
statistics that the data-free synthesis reads.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn

from autodfp._modes import eval_mode
from autodfp.errors import ModelError

#: the in-place folding methods, in the order timm's ``reparameterize_model`` tries them
METHODS = ("reparameterize", "switch_to_deploy")

#: the folded copy's outputs may differ from the original's by this share of their spread (float
#: rounding of the folded sums), no more
TOLERANCE = 1e-3


def reparameterizable(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that can fold themselves (:data:`METHODS`), outermost
    first; the model itself is named ``""``.

    :param model: any module
    """
    return [n for n, m in model.named_modules() if any(callable(getattr(m, k, None)) for k in METHODS)]


def _fold(module: nn.Module) -> None:
    for child in list(module.children()):
        method = next((getattr(child, k) for k in METHODS if callable(getattr(child, k, None))), None)
        if method is not None:
            method()
        _fold(child)


def reparameterize(model: nn.Module, input_shape: Sequence[int]) -> nn.Module:
    """A copy of ``model`` with every re-parameterisable block folded, checked to compute the same.

    :param model: the network (not modified)
    :param input_shape: (C, H, W) of one input, for the check
    :return: the folded copy, in eval mode
    :raises ModelError: when the model has nothing to fold, when folding fails, or when the folded
        copy's outputs differ from the original's (a block whose folding is not exact)
    """
    if not reparameterizable(model):
        raise ModelError("reparameterize: the model has no module with a reparameterize() or switch_to_deploy() method")
    folded = copy.deepcopy(model).eval()
    try:
        _fold(folded)
    except Exception as exc:  # a third-party method: any failure is the model's, said in one line
        raise ModelError(f"reparameterize: folding the model's branches failed ({type(exc).__name__}: {exc})") from None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, *(int(s) for s in input_shape)), generator=gen)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model), torch.no_grad():
        ref = model(x.to(device))
        out = folded.to(device)(x.to(device))
    if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor):
        from autodfp._outputs import flat_outputs

        pairs = list(zip(flat_outputs(ref), flat_outputs(out)))
    else:
        pairs = [(ref, out)]
    for r, o in pairs:
        err = float((o.float() - r.float()).abs().max())
        scale = max(float(r.float().std()), 1e-6)
        if r.shape != o.shape or not err <= TOLERANCE * scale:
            raise ModelError(
                f"reparameterize: the folded model does not compute what the original does "
                f"(largest difference {err:.3g} against a spread of {scale:.3g}); not pruned"
            )
    return folded


__all__ = ["METHODS", "TOLERANCE", "reparameterizable", "reparameterize"]
