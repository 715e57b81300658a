"""Grouped convolutions (ResNeXt, RegNet): a grouped conv's outputs and inputs are prunable.

A tiny ResNeXt-style bottleneck: ``a`` (1×1, BN, ReLU) → ``b`` (3×3, 4 groups, BN, ReLU) → ``c``
(1×1, BN) + identity → ReLU → head. ``b``'s output channels are a group of granularity 4: each of
its conv groups keeps as many rows, so the pruned conv still splits into 4 equal groups. ``a``'s
channels are read by the grouped conv: as many leave each of its conv groups, each pruned channel
is rebuilt from kept channels of its own conv group, and the channels are reordered within each
group before torch-pruning removes them (by position). BN statistics come from train-mode passes
over noise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autodfp
from autodfp.analysis.graph import find_groups
from autodfp.compress.criteria import select_channels
from autodfp.compress.plan import Plan, kept_channels
from autodfp.compress.refine import Refiner
from autodfp.compress.surgery import Pruner
from autodfp.errors import PlanError
from autodfp.eval.metrics import profile
from autodfp.search.budget import MacsModel
from conftest import CHEAP, bn_statistics_from_noise, duplicate_removal_errors, physical_and_masked, zero_ratio_max_diff

SHAPE = (3, 16, 16)
GROUPS, WIDTH = 4, 16  # b: 16 channels in 4 groups of 4
B = "b"


class TinyResNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.a = nn.Conv2d(12, WIDTH, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(WIDTH)
        self.b = nn.Conv2d(WIDTH, WIDTH, 3, 1, 1, groups=GROUPS, bias=False)
        self.b_bn = nn.BatchNorm2d(WIDTH)
        self.c = nn.Conv2d(WIDTH, 12, 1, bias=False)
        self.c_bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = F.relu(self.a_bn(self.a(s)))
        y = F.relu(self.b_bn(self.b(y)))
        y = F.relu(self.c_bn(self.c(y)) + s)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return bn_statistics_from_noise(TinyResNeXt(), SHAPE)


def _copy_channels(conv: nn.Conv2d, bn: nn.BatchNorm2d, dup: dict[int, int]) -> None:
    """Make output channel ``p`` of ``conv`` and ``bn`` an exact copy of channel ``k``, ``dup[p] = k``."""
    with torch.no_grad():
        for p, k in dup.items():
            conv.weight[p] = conv.weight[k]
            for t in ("running_mean", "running_var", "weight", "bias"):
                getattr(bn, t)[p] = getattr(bn, t)[k]


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_a_grouped_producer_is_a_prunable_group_and_its_input_group_says_why_not():
    graph = find_groups(_net(), SHAPE)
    g = graph.get(B)
    assert g.prunable and g.kind == "conv" and not g.coupled and g.activation == "relu"
    assert g.granularity == GROUPS and g.units == WIDTH // GROUPS and g.consumers == ["c"]
    a = graph.get("a")  # read by the grouped conv: compensated within each of its conv groups
    assert a.prunable and a.blockwise and a.grouped_consumers == ["b"] and a.consumers == ["b"]
    assert a.granularity == GROUPS and a.activation == "relu"
    # filters over the whole input: rows of different conv groups read disjoint channels
    f = Pruner(_net(), SHAPE).stats(B).filters
    gram = (f @ f.T).abs()
    same = torch.arange(WIDTH)[:, None] // 4 == torch.arange(WIDTH)[None, :] // 4
    assert gram[~same].max().item() == 0.0 and gram[same].min().item() > 0


def test_selection_keeps_as_many_channels_in_every_conv_group():
    # L1 rises with the channel index, so a global top-8 would take the last two conv groups only
    stats = Pruner(_net(), SHAPE).stats(B)
    raw = torch.arange(1.0, WIDTH + 1)[:, None]
    kept, pruned = select_channels("l1", stats, None, 8, raw_filters=raw, granularity=GROUPS)
    assert kept.tolist() == [2, 3, 6, 7, 10, 11, 14, 15]
    assert sorted(kept.tolist() + pruned.tolist()) == list(range(WIDTH))
    assert select_channels("l1", stats, None, 8, raw_filters=raw)[0].tolist() == list(range(8, 16))
    with pytest.raises(PlanError, match="4 equal groups"):
        select_channels("l1", stats, None, 6, raw_filters=raw, granularity=GROUPS)


def test_zero_ratio_prune_is_output_identical():
    assert zero_ratio_max_diff(_net(), SHAPE, _x(3, 2)) == 0.0


@pytest.mark.parametrize("strategy", ["none", "lsq", "mean", "autodfp"])
def test_pruned_grouped_producer_equals_the_masked_path_and_the_analytic_macs(strategy):
    net = _net()
    calib = _x(16, 1)
    pruner = Pruner(net, SHAPE, calibration=calib)
    plan = Plan({B: 0.5}, strategy=strategy)
    k = kept_channels(pruner.graph.get(B), 0.5)
    assert k == 8
    decisions = pruner.decide(plan)
    kept = decisions[B].kept
    assert [int((kept // (WIDTH // GROUPS) == j).sum()) for j in range(GROUPS)] == [2] * GROUPS
    x = _x(3, 2)
    for decs in (decisions, Refiner(pruner, calib)(decisions)):
        pruned, diff = physical_and_masked(pruner, plan, decs, x)
        assert diff <= 1e-5
        assert pruned.b.out_channels == pruned.b_bn.num_features == pruned.c.in_channels == k
        assert pruned.b.groups == GROUPS and pruned.b.in_channels == WIDTH
    mm = MacsModel(net, pruner.graph, SHAPE)
    # b: 16·16·k·(16/4)·9, c: 16·16·12·k (and the rest fixed)
    full = profile(net, SHAPE).total_macs
    assert profile(pruned, SHAPE).total_macs == mm.macs_for_plan(plan) == full - 8 * (8 * 8 * 4 * 9 + 8 * 8 * 12)


def test_an_exact_duplicate_channel_in_its_own_conv_group_is_removed_output_identically():
    """Channel 1 copies channel 0 (same conv group: same filter over the same inputs, same BN), so
    ``lsq`` moves its consumer column onto channel 0 exactly. Each conv group loses one row."""
    net = _net()
    per = WIDTH // GROUPS
    dup = {1: 0, 1 + per: per, 1 + 2 * per: 2 * per, 1 + 3 * per: 3 * per}
    _copy_channels(net.b, net.b_bn, dup)
    pruner = Pruner(net, SHAPE, calibration=_x(64, 1))
    kept = [c for c in range(WIDTH) if c not in dup]
    lsq, none = duplicate_removal_errors(pruner, B, kept, 0.75, _x(3, 2), {"ridge": 0.0, "dims_ridge": 0.0})
    assert lsq <= 1e-5 and none > 1e-3  # exact, and the channels mattered


def test_a_plan_keeping_unequal_counts_per_conv_group_is_refused():
    pruner = Pruner(_net(), SHAPE)
    with pytest.raises(PlanError, match="each of its 4 conv groups"):
        pruner.decide(Plan({B: 0.75}, keep={B: [0, 1, 2, 3, 4, 5, 6, 8, 9, 12, 13, 14]}))


def test_default_prune_meets_the_budget_with_the_grouped_group():
    """The budget counts ``b`` in rows per conv group (4 here); half of them is reachable exactly."""
    net = _net()
    mm = MacsModel(net, find_groups(net, SHAPE), SHAPE)
    assert mm.channels == {"a": WIDTH // GROUPS, B: WIDTH // GROUPS}
    target = mm.macs({"a": 2, B: 2}) / mm.total_macs
    cfg = autodfp.Config(**CHEAP)
    res = autodfp.prune(net, input_shape=SHAPE, macs_ratio=target, search="uniform", config=cfg, progress=False)
    assert abs(res.report["macs_ratio_achieved"] - target) <= 0.01 * target
    assert res.model.b.out_channels == res.model.b.in_channels == WIDTH // 2 and res.model.b.groups == GROUPS


@pytest.mark.parametrize("strategy", ["none", "lsq", "mean", "autodfp"])
def test_channels_into_a_grouped_conv_prune_physically_as_masked_and_as_counted(strategy):
    net = _net()
    calib = _x(16, 1)
    pruner = Pruner(net, SHAPE, calibration=calib)
    plan = Plan({"a": 0.5, B: 0.75}, strategy=strategy)
    decisions = pruner.decide(plan)
    kept = decisions["a"].kept
    per = WIDTH // GROUPS
    assert [int((kept // per == j).sum()) for j in range(GROUPS)] == [2] * GROUPS
    if strategy != "none":  # a pruned channel is rebuilt from its own conv group only
        comp = decisions["a"].compensation
        same = decisions["a"].pruned[:, None] // per == kept[None, :] // per
        assert comp.A[~same].abs().max().item() == 0.0
        assert strategy != "lsq" or comp.A[same].abs().sum() > 0
    x = _x(3, 2)
    for decs in (decisions, Refiner(pruner, calib)(decisions)):
        if decs is not decisions and strategy == "lsq":
            fit = decs["a"].compensation
            assert fit.K is not None and fit.K[~(kept[:, None] // per == kept[None, :] // per)].abs().max() == 0
        pruned, diff = physical_and_masked(pruner, plan, decs, x)
        assert diff <= 1e-5  # the reordering before torch-pruning changed no output
        assert pruned.a.out_channels == pruned.a_bn.num_features == pruned.b.in_channels == 8
        assert pruned.b.groups == GROUPS and pruned.b.out_channels == 12
    mm = MacsModel(net, pruner.graph, SHAPE)
    assert profile(pruned, SHAPE).total_macs == mm.macs_for_plan(plan) < mm.total_macs


def test_a_duplicate_channel_into_a_grouped_conv_is_removed_output_identically():
    """Channel 1 copies channel 0 in ``a`` (and its BN): the same value enters conv group 0 twice,
    so ``lsq`` (within the group) moves ``b``'s column 1 onto column 0 exactly."""
    net = _net()
    per = WIDTH // GROUPS
    dup = {1 + j * per: j * per for j in range(GROUPS)}
    _copy_channels(net.a, net.a_bn, dup)
    pruner = Pruner(net, SHAPE, calibration=_x(64, 1))
    kept = [c for c in range(WIDTH) if c not in dup]
    lsq, none = duplicate_removal_errors(pruner, "a", kept, 0.75, _x(3, 2), {"ridge": 0.0})
    assert lsq <= 1e-5 and none > 1e-3
