"""Eval mode for the length of a block, leaving every module's own train/eval flag as it was.

Restoring only the root's flag with ``model.train(was_training)`` is not enough: ``train()``
recurses, so it overwrites the flag of every submodule, and a wrapper that shares its submodules
with another model (``env.MaskedModel`` wraps the original network) would switch that network to
training mode. A network left in training mode normalises with batch statistics and overwrites
its BN running statistics at the next forward pass, silently changing the model being pruned.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

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


P = ParamSpec("P")
R = TypeVar("R")


def keeps_modes(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a public function so that every module passed to it keeps its train/eval flags.

    The pipeline needs eval mode (graph tracing, BN folding and scoring all read running
    statistics), and many internal steps switch it on; rather than trusting each of them to switch
    back, the public entry points restore every submodule's own flag on the way out, success or
    error. The caller's model therefore leaves :func:`autodfp.prune` as it came in.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        flags = [(m, m.training) for a in (*args, *kwargs.values()) if isinstance(a, nn.Module) for m in a.modules()]
        try:
            return fn(*args, **kwargs)
        finally:
            for m, flag in flags:
                m.training = flag

    return wrapper
