"""Concat groups (DenseNet, SqueezeNet, Inception, RFB): found, identity, masked = physical, MACs.

A tiny dense block: ``stem`` (BN, ReLU) feeds two branches, ``b1`` (1×1) and ``b2`` (3×3, each BN,
ReLU), and ``cat([stem, b1, b2])`` feeds two consumers, ``mix`` directly and ``post`` through its
own BN and ReLU (DenseNet's pre-activation). Each branch's channels are a block of both
consumers' inputs, at an offset: ``kind == "concat"``, compensated per consumer from its measured
input, with the consumer's columns found at that offset. BN statistics come from train-mode passes
over noise.
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
S, B1, B2 = 8, 6, 10


def _cbr(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyDense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, S, 3)
        self.b1 = _cbr(S, B1, 1)
        self.b2 = _cbr(S, B2, 3)
        self.mix = _cbr(S + B1 + B2, 12, 1)
        self.pre_bn = nn.BatchNorm2d(S + B1 + B2)
        self.post = nn.Conv2d(S + B1 + B2, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        cat = torch.cat([s, self.b1(s), self.b2(s)], 1)
        y = self.mix(cat) + F.relu(self.post(F.relu(self.pre_bn(cat))))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return bn_statistics_from_noise(TinyDense(), SHAPE)


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_concatenated_branches_are_prunable_groups_at_their_offsets():
    graph = find_groups(_net(), SHAPE)
    for name, off in (("stem.0", 0), ("b1.0", S), ("b2.0", S + B1)):
        g = graph.get(name)
        assert g.prunable and g.kind == "concat" and g.coupled and g.activation == "identity", name
        assert g.offset("mix.0") == g.offset("post") == off
    assert graph.get("stem.0").consumers == ["b1.0", "b2.0", "mix.0", "post"]
    assert graph.get("stem.0").offset("b2.0") == 0  # the branches read the stem directly
    assert not graph.get("mix.0").prunable  # tied to post by the add


def test_zero_ratio_prune_is_output_identical():
    assert zero_ratio_max_diff(_net(), SHAPE, _x(3, 2)) == 0.0


@pytest.mark.parametrize("strategy", ["none", "lsq", "mean", "autodfp"])
def test_pruned_concat_groups_equal_the_masked_path_and_the_analytic_macs(strategy):
    net = _net()
    calib = _x(16, 1)
    pruner = Pruner(net, SHAPE, calibration=calib)
    plan = Plan({"stem.0": 0.75, "b1.0": 0.5, "b2.0": 0.6}, strategy=strategy)
    keep = {"stem.0": n_keep(S, 0.75), "b1.0": n_keep(B1, 0.5), "b2.0": n_keep(B2, 0.6)}
    decisions = pruner.decide(plan)
    x = _x(3, 2)
    for decs in (decisions, Refiner(pruner, calib)(decisions)):
        pruned, diff = physical_and_masked(pruner, plan, decs, x)
        assert diff <= 1e-5
        width = sum(keep.values())
        assert pruned.mix[0].in_channels == pruned.post.in_channels == pruned.pre_bn.num_features == width
        assert pruned.b2[0].in_channels == keep["stem.0"]
    mm = MacsModel(net, pruner.graph, SHAPE)
    assert profile(pruned, SHAPE).total_macs == mm.macs_for_plan(plan) < mm.total_macs
    # mix: 16·16·12·(kept inputs); post: 16·16·12·9·(kept inputs); the sum of blocks, not a product
    removed = S + B1 + B2 - sum(keep.values())
    mix = profile(net, SHAPE).layers
    by_name = {lp.name: lp.macs for lp in mix}
    assert by_name["mix.0"] == 16 * 16 * 12 * (S + B1 + B2)
    pruned_layers = {lp.name: lp.macs for lp in profile(pruned, SHAPE).layers}
    assert pruned_layers["mix.0"] == 16 * 16 * 12 * (S + B1 + B2 - removed)


def test_each_consumer_reads_its_own_compensation_at_its_offset():
    pruner = Pruner(_net(), SHAPE, calibration=_x(16, 1))
    d = pruner.decide(Plan({"b2.0": 0.5}, strategy="lsq"))["b2.0"]
    assert d.per_consumer is not None and set(d.per_consumer) == {"mix.0", "post"}
    # post reads the concat through its own BN and ReLU, mix reads it raw: different values
    assert not torch.allclose(d.per_consumer["mix.0"].A, d.per_consumer["post"].A)


def test_an_exact_duplicate_branch_channel_is_removed_output_identically_with_lsq():
    net = _net()
    p, k = 7, 2
    with torch.no_grad():
        net.b2[0].weight[p] = net.b2[0].weight[k]
        for t in ("running_mean", "running_var", "weight", "bias"):
            getattr(net.b2[1], t)[p] = getattr(net.b2[1], t)[k]
            # post's own BN sees the two columns alike too, or they differ there
            getattr(net.pre_bn, t)[S + B1 + p] = getattr(net.pre_bn, t)[S + B1 + k]
    pruner = Pruner(net, SHAPE, calibration=_x(64, 1))
    kept = [c for c in range(B2) if c != p]
    lsq, none = duplicate_removal_errors(pruner, "b2.0", kept, 0.9, _x(3, 2), {"ridge": 0.0, "dims_ridge": 0.0})
    assert lsq <= 1e-5 and none > 1e-3  # exact, and the channel mattered


def test_default_prune_meets_the_budget():
    cfg = autodfp.Config(**CHEAP)
    res = autodfp.prune(_net(), input_shape=SHAPE, macs_ratio=0.7, search="uniform", config=cfg, progress=False)
    assert abs(res.report["macs_ratio_achieved"] - 0.7) <= 0.01
