"""Shared fixtures. The asset mirror (``../shared/assets`` beside the repo) is required, not optional:
tests that silently skip without it would report green on a machine that checked nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = (REPO_ROOT / ".." / "shared" / "assets").resolve()

# Set before any test imports autodfp, so the hub and data resolvers see the mirror.
os.environ.setdefault("AUTODFP_ASSETS", str(DEFAULT_ASSETS))
# Before torch loads: OpenMP threads that spin-wait (the default) make small ops ~100x slower when
# the cores are shared with other processes (busy CI runners); sleeping waits cost little otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The suite checks behaviour, not accuracy: every run, CLI subprocesses included, takes the `fast`
# preset (no distillation) unless a test names another; tests/test_effort.py covers the presets.
os.environ.setdefault("AUTODFP_EFFORT", "fast")


@pytest.fixture(scope="session")
def assets() -> Path:
    """The asset mirror root (``$AUTODFP_ASSETS``); fails loudly if it is missing."""
    path = Path(os.environ["AUTODFP_ASSETS"]).expanduser()
    if not (path / "weights").is_dir():
        pytest.fail(
            f"asset mirror not found at {path} (from $AUTODFP_ASSETS): point AUTODFP_ASSETS at a copy of "
            f"shared/assets, or place it at {DEFAULT_ASSETS}",
            pytrace=False,
        )
    return path


@pytest.fixture()
def tiny_cnn():
    """A two-conv BN network (3×16×16 → 4 classes) whose BN statistics come from forward passes."""
    return make_tiny_cnn()


def make_tiny_cnn():
    """:func:`tiny_cnn` as a plain function, for module-scoped fixtures that cannot take it."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, 3, 16, 16))
    return net.eval()


def bn_statistics_from_noise(model, shape, batches: int = 3, n: int = 16, reset: bool = False):
    """Give a random-init model BatchNorm statistics from train-mode passes over noise (seed 0).

    A trained model's running statistics are not the initial zeros and ones; tests of structure
    (identity, masked = physical, exact duplicates) need statistics that are not a special case.
    Cumulative averages (``momentum=None``); ``reset`` starts them from scratch first.
    """
    import torch
    import torch.nn as nn

    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            if reset:
                bn.reset_running_stats()
            bn.momentum = None
    model.train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(n, *shape, generator=g))
    return model.eval()


#: synthesis cut to the bone: structure tests need a batch, not a good one
CHEAP = {"synth_steps": 2, "calibration_inputs": 8, "refine_inputs": 8, "reward_inputs": 8}


def _tensors(out) -> list:
    """A model output as a list of tensors (a detector returns a tuple of heads)."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def max_abs_diff(a, b) -> float:
    """max |a − b| over every output tensor; outputs of different structure or shape fail."""
    pairs = list(zip(_tensors(a), _tensors(b), strict=True))
    assert all(u.shape == v.shape for u, v in pairs), [(u.shape, v.shape) for u, v in pairs]
    return max((u - v).abs().max().item() for u, v in pairs)


def zero_ratio_max_diff(net, shape, x) -> float:
    """max |Δ| on ``x`` between ``net`` and its prune at preserved ratio 1 (the default pipeline)."""
    import torch

    import autodfp

    with torch.no_grad():
        ref = net(x)
        res = autodfp.prune(net, input_shape=shape, uniform=1.0, config=autodfp.Config(**CHEAP), progress=False)
        return max_abs_diff(res.model(x), ref)


def physical_and_masked(pruner, plan, decisions, x):
    """The physically pruned model and its max |Δ| on ``x`` from the masked fast path (same decisions)."""
    import torch
    from torch.func import functional_call

    pruned = pruner.apply(plan, decisions).model
    with torch.no_grad():
        diff = max_abs_diff(pruned(x), functional_call(pruner.model, pruner.masked_state(decisions), (x,)))
    return pruned, diff


def duplicate_removal_errors(pruner, group: str, kept: list[int], ratio: float, x, params: dict):
    """max |Δ| from the unpruned output on ``x`` after removing all but ``kept`` of ``group``:
    with ``lsq`` (``params``), relative to ``1 + max |output|``, and with no compensation (absolute,
    to show the channels mattered)."""
    import torch

    from autodfp.compress.plan import Plan

    with torch.no_grad():
        ref = pruner.model(x)
        out = pruner.apply(Plan({group: ratio}, strategy="lsq", keep={group: kept}, params=params)).model(x)
        dropped = pruner.apply(Plan({group: ratio}, strategy="none", keep={group: kept})).model(x)
    scale = 1 + max(t.abs().max().item() for t in _tensors(ref))
    return max_abs_diff(out, ref) / scale, max_abs_diff(dropped, ref)
