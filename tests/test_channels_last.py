"""Channels-last MLP blocks without BatchNorm (ConvNeXt): the hidden Linear layer is a group.

A tiny ConvNeXt block: depthwise 7×7 → permute to (N, H, W, C) → LayerNorm → ``pw1`` (Linear,
C → 4C) → GELU → ``pw2`` (Linear, 4C → C) → permute back → + input. torch-pruning traces each
Linear on a 4-D input as view → addmm → view; neither the view nor the ``addmm`` ties channels, so
``pw1``'s outputs are an ordinary inner group, measured channels-last on the calibration batch
(there is no BN to model them).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autodfp
from autodfp.analysis.graph import find_groups
from autodfp.compress.plan import Plan, n_keep
from autodfp.compress.refine import Refiner
from autodfp.compress.surgery import Pruner
from autodfp.eval.metrics import profile
from autodfp.search.budget import MacsModel
from conftest import CHEAP, duplicate_removal_errors, physical_and_masked, zero_ratio_max_diff

SHAPE = (3, 16, 16)
C, HID = 8, 32
PW1 = "block.pw1"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(C, C, 7, padding=3, groups=C)
        self.norm = nn.LayerNorm(C)
        self.pw1 = nn.Linear(C, HID)
        self.pw2 = nn.Linear(HID, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.pw2(F.gelu(self.pw1(y)))
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 2, stride=2)
        self.block = Block()
        self.head_norm = nn.LayerNorm(C)
        self.fc = nn.Linear(C, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.stem(x))
        return self.fc(self.head_norm(y.mean((2, 3))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return TinyConvNeXt().eval()


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_the_hidden_linear_layer_is_an_inner_group():
    g = find_groups(_net(), SHAPE).get(PW1)
    assert g.prunable and not g.coupled and g.kind == "linear" and g.activation == "gelu"
    assert g.consumers == ["block.pw2"] and g.producer.bn is None


@pytest.mark.parametrize("strategy", ["none", "lsq", "mean", "autodfp"])
def test_pruned_hidden_layer_equals_the_masked_path_and_the_analytic_macs(strategy):
    net = _net()
    calib = _x(16, 1)
    pruner = Pruner(net, SHAPE, calibration=calib)
    plan = Plan({PW1: 0.5}, strategy=strategy)
    decisions = pruner.decide(plan)
    x = _x(3, 2)
    for decs in (decisions, Refiner(pruner, calib)(decisions)):
        if decs is not decisions:  # refinement read the channels-last input and fitted the consumer
            fit = decs[PW1].for_consumer("block.pw2")
            assert fit is not None and fit.A.abs().sum() > 0
        pruned, diff = physical_and_masked(pruner, plan, decs, x)
        assert diff <= 1e-5
        assert pruned.block.pw1.out_features == pruned.block.pw2.in_features == n_keep(HID, 0.5)
    mm = MacsModel(net, pruner.graph, SHAPE)
    # pw1 and pw2 each run 8·8 positions × 8 × kept
    removed = (HID - n_keep(HID, 0.5)) * 2 * 8 * 8 * C
    assert profile(pruned, SHAPE).total_macs == mm.macs_for_plan(plan) == mm.total_macs - removed


def test_an_exact_duplicate_hidden_unit_is_removed_output_identically_with_lsq():
    net = _net()
    p, k = 9, 3
    with torch.no_grad():
        net.block.pw1.weight[p] = net.block.pw1.weight[k]
        net.block.pw1.bias[p] = net.block.pw1.bias[k]
    pruner = Pruner(net, SHAPE, calibration=_x(64, 1))
    kept = [c for c in range(HID) if c != p]
    lsq, none = duplicate_removal_errors(pruner, PW1, kept, 31 / 32, _x(3, 2), {"ridge": 0.0})
    assert lsq <= 1e-5 and none > 1e-4  # exact, and the unit mattered


def test_zero_ratio_identity_and_the_budget_without_batchnorm():
    net = _net()
    assert zero_ratio_max_diff(net, SHAPE, _x(3, 2)) == 0.0
    cfg = autodfp.Config(**CHEAP)
    res = autodfp.prune(net, input_shape=SHAPE, macs_ratio=0.8, search="uniform", config=cfg, progress=False)
    assert abs(res.report["macs_ratio_achieved"] - 0.8) <= 0.01
    assert res.model.block.pw1.out_features < HID
