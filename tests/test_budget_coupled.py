"""The MACs model of coupled groups counts a conv that reads and writes one stream in both roles (issue 28).

A RepVGG-like net (timm's ``RepVggBlock``: ``y = act(bn_id(x) + bn(conv3x3(x)) + bn(conv1x1(x)))``):
inside a stage every block's convs read the stream and write into it, so with ``coupled=True``
pruning a stream channel removes both a row and a column of each of them, and their MACs scale by
the kept fraction *squared*. The old model counted such a conv once (as a producer), and predicted
0.7× where the physical prune reached 0.538× on ``timm:repvgg_a0``. Here the prediction must equal
the profile of the physically pruned model for every plan.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autodfp.compress.plan import Plan
from autodfp.compress.surgery import Pruner
from autodfp.eval.metrics import profile
from autodfp.search.budget import MacsModel, plan_from_keep
from conftest import bn_statistics_from_noise

SHAPE = (3, 16, 16)


def _conv_bn(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class RepVggBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.conv_kxk = _conv_bn(cin, cout, 3, stride)
        self.conv_1x1 = _conv_bn(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_kxk(x) + self.conv_1x1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return F.relu(y)


class TinyRepVgg(nn.Module):
    """Three stages (the first block of each changes width or stride), pooled, linear head; the last
    stage's stream feeds the classifier, the two before it are prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = RepVggBlock(3, 8, 1)
        self.s1 = nn.Sequential(RepVggBlock(8, 8), RepVggBlock(8, 8))
        self.s2 = nn.Sequential(RepVggBlock(8, 12, 2), RepVggBlock(12, 12))
        self.s3 = RepVggBlock(12, 16, 2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.s3(self.s2(self.s1(self.stem(x)))), 1).flatten(1))


def _pruner() -> Pruner:
    torch.manual_seed(0)
    net = bn_statistics_from_noise(TinyRepVgg(), SHAPE)
    return Pruner(
        net, SHAPE, calibration=torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(1)), coupled=True
    )


def test_the_stream_groups_hold_convs_that_read_and_write_them():
    graph = _pruner().graph
    stream = graph.get("stem.conv_kxk.0")
    assert stream.prunable and stream.coupled
    # s1's convs read the stream the stem writes and write it again: rows and columns of one group
    for conv in ("s1.0.conv_kxk.0", "s1.1.conv_1x1.0"):
        assert conv in stream.members
        assert (conv, "out", 8) in stream.footprint and (conv, "in", 8) in stream.footprint
    # s2's first convs read it and write the next stream
    assert ("s2.0.conv_kxk.0", "in", 8) in stream.footprint


@pytest.mark.parametrize(
    "ratios",
    [
        {"stem.conv_kxk.0": 0.5},
        {"s2.0.conv_kxk.0": 0.5},
        {"stem.conv_kxk.0": 0.75, "s2.0.conv_kxk.0": 0.5},
        {"stem.conv_kxk.0": 0.25, "s2.0.conv_kxk.0": 0.9},
    ],
)
def test_predicted_macs_equal_the_physically_pruned_models(ratios):
    pruner = _pruner()
    plan = Plan(ratios, strategy="none")
    mm = MacsModel(pruner.model, pruner.graph, SHAPE)
    pruned = pruner.apply(plan).model
    assert profile(pruned, SHAPE).total_macs == mm.macs_for_plan(plan) < mm.total_macs


def test_a_plan_repaired_onto_a_target_reaches_it_physically():
    pruner = _pruner()
    mm = MacsModel(pruner.model, pruner.graph, SHAPE)
    target = 0.7 * mm.total_macs
    keep = mm.repair(mm.ratio_keep(mm.fit_uniform(target)), target)
    plan = plan_from_keep(keep, mm.channels, strategy="none")
    achieved = profile(pruner.apply(plan).model, SHAPE).total_macs
    assert achieved == mm.macs(keep)
    assert abs(achieved / target - 1) <= 0.01  # what the search promises, now true of the pruned model
