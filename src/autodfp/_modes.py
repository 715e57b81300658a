"""Eval mode for the length of a block, leaving every module's own train/eval flag as it was.

Restoring only the root's flag with ``model.train(was_training)`` is not enough: ``train()``
recurses, so it overwrites the flag of every submodule, and a wrapper that shares its submodules
with another model (``env.MaskedModel`` wraps the original network) would switch that network to
training mode. A network left in training mode normalises with batch statistics and overwrites
its BN running statistics at the next forward pass, silently changing the model being pruned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn as nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; afterwards each submodule gets back its own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
