"""Parallel depthwise branches (a detector's source layers): found, identity, masked = physical, MACs.

A tiny SSD-style net: a pointwise ``source`` conv (BN, ReLU) whose channels feed, in parallel, the
next block's depthwise conv (BN, ReLU, then a pointwise conv) and a head's separable conv
(depthwise with bias, ReLU, pointwise to the output), plus a second head reading the source
directly. Each consumer reads a different value, so the group is ``kind == "dw_branches"``,
compensated per consumer from its measured input. BN statistics come from train-mode passes over
noise.
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
from conftest import CHEAP, bn_statistics_from_noise, duplicate_removal_errors, physical_and_masked, zero_ratio_max_diff

SHAPE = (3, 16, 16)
SOURCE = "source"


def _dw(c: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(c))
    return nn.Sequential(*layers, nn.ReLU())


class TinySSD(nn.Module):
    def __init__(self, direct_head: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.source = nn.Conv2d(8, 16, 1, bias=False)
        self.source_bn = nn.BatchNorm2d(16)
        self.next_dw = _dw(16, bn=True)
        self.next_pw = nn.Conv2d(16, 24, 1, bias=False)
        self.next_bn = nn.BatchNorm2d(24)
        self.head_dw = _dw(16, bn=False)
        self.head_pw = nn.Conv2d(16, 6, 1)
        self.direct = nn.Conv2d(16, 4, 3, padding=1) if direct_head else None
        self.last = nn.Conv2d(24, 6, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = F.relu(self.source_bn(self.source(self.stem(x))))
        y = F.relu(self.next_bn(self.next_pw(self.next_dw(s))))
        outs = [self.head_pw(self.head_dw(s)).flatten(1), self.last(y).flatten(1)]
        if self.direct is not None:
            outs.append(self.direct(s).flatten(1))
        return tuple(outs)


def _net(direct_head: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return bn_statistics_from_noise(TinySSD(direct_head), SHAPE)


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("direct_head", [True, False])
def test_parallel_depthwise_branches_are_one_prunable_group(direct_head):
    graph = find_groups(_net(direct_head), SHAPE)
    g = graph.get(SOURCE)
    assert g.prunable and g.kind == "dw_branches" and g.coupled and g.reason == ""
    assert [s.conv for s in g.passthrough] == ["next_dw.0", "head_dw.0"]
    assert g.consumers == ["next_pw", "head_pw"] + (["direct"] if direct_head else [])
    assert g.activation == "identity"  # each consumer's input is measured
    # the head's inputs are intermediate features (they also feed next_pw), so pruning them is
    # allowed; the block behind them is a plain conv group, and the heads are the model's output
    assert graph.get("next_pw").kind == "conv" and graph.get("next_pw").reason == "feeds the classifier"
    assert graph.get("head_pw").reason == "model output"


def test_a_single_depthwise_chain_stays_a_chain():
    """MobileNet's pointwise → depthwise → pointwise: one branch, one modelled activation."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        nn.ReLU(),
        nn.Conv2d(6, 4, 1),
        nn.Flatten(),
    ).eval()
    g = find_groups(net, SHAPE).get("0")
    assert g.kind == "dw_chain" and not g.coupled and g.prunable and g.activation == "relu"
    assert [s.conv for s in g.passthrough] == ["3", "6"]


def test_zero_ratio_prune_is_output_identical():
    assert zero_ratio_max_diff(_net(), SHAPE, _x(3, 2)) == 0.0


@pytest.mark.parametrize("strategy", ["none", "lsq", "mean", "autodfp"])
def test_pruned_branches_equal_the_masked_path_and_the_analytic_macs(strategy):
    net = _net()
    calib = _x(16, 1)
    pruner = Pruner(net, SHAPE, calibration=calib)
    plan = Plan({SOURCE: 0.5}, strategy=strategy)
    decisions = pruner.decide(plan)
    k = n_keep(16, 0.5)
    x = _x(3, 2)
    for decs in (decisions, Refiner(pruner, calib)(decisions)):
        pruned, diff = physical_and_masked(pruner, plan, decs, x)
        assert diff <= 1e-5
        assert pruned.source.out_channels == pruned.source_bn.num_features == k
        assert pruned.next_dw[0].out_channels == pruned.next_dw[1].num_features == k
        assert pruned.head_dw[0].out_channels == pruned.head_dw[0].bias.shape[0] == k
        assert pruned.next_pw.in_channels == pruned.head_pw.in_channels == pruned.direct.in_channels == k
        with torch.no_grad():
            assert [t.shape for t in pruned(x)] == [t.shape for t in net(x)]
    mm = MacsModel(net, pruner.graph, SHAPE)
    assert profile(pruned, SHAPE).total_macs == mm.macs_for_plan(plan) < mm.total_macs


def test_each_consumer_gets_its_own_compensation():
    pruner = Pruner(_net(), SHAPE, calibration=_x(16, 1))
    d = pruner.decide(Plan({SOURCE: 0.5}, strategy="lsq"))[SOURCE]
    assert d.per_consumer is not None and set(d.per_consumer) == {"next_pw", "head_pw", "direct"}
    # the head branch (bias, no BN) and the direct head read different values from next_pw's
    a = d.per_consumer["next_pw"].A
    assert not torch.allclose(a, d.per_consumer["head_pw"].A)
    assert not torch.allclose(a, d.per_consumer["direct"].A)


def test_an_exact_duplicate_channel_is_removed_output_identically_with_lsq():
    """A channel equal to a kept one in the source and in every branch is that channel at every
    consumer; lsq without ridge on the measured inputs predicts it exactly."""
    net = _net()
    p, k = 5, 2
    with torch.no_grad():
        net.source.weight[p] = net.source.weight[k]
        for t in ("running_mean", "running_var", "weight", "bias"):
            getattr(net.source_bn, t)[p] = getattr(net.source_bn, t)[k]
            getattr(net.next_dw[1], t)[p] = getattr(net.next_dw[1], t)[k]
        net.next_dw[0].weight[p] = net.next_dw[0].weight[k]
        net.head_dw[0].weight[p] = net.head_dw[0].weight[k]
        net.head_dw[0].bias[p] = net.head_dw[0].bias[k]
    pruner = Pruner(net, SHAPE, calibration=_x(64, 1))
    kept = [c for c in range(16) if c != p]
    lsq, none = duplicate_removal_errors(pruner, SOURCE, kept, 15 / 16, _x(3, 2), {"ridge": 0.0, "dims_ridge": 0.0})
    assert lsq <= 1e-5 and none > 1e-3  # exact, and the channel mattered


def test_default_prune_without_flags_calibrates_and_meets_the_budget():
    cfg = autodfp.Config(**CHEAP)
    res = autodfp.prune(_net(), input_shape=SHAPE, macs_ratio=0.8, search="uniform", config=cfg, progress=False)
    assert abs(res.report["macs_ratio_achieved"] - 0.8) <= 0.01
    assert res.plan.ratios[SOURCE] < 1
