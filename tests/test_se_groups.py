"""SE-gated expansion groups: found, identity at ratio 1, masked = physical, exact duplicates, MACs, budget.

A tiny net of two MobileNetV3-style blocks (expand → BN → hardswish → depthwise → BN → hardswish →
SE → project → BN; the second with a residual add), BN statistics from train-mode passes over
noise. The expansion channels are written by the expand conv and, through the multiply, by the SE
``fc2``; they are pruned by default as ``kind == "se_chain"`` and compensated from what each
consumer (the project conv, and ``fc1`` on the pooled channels) reads on the calibration batch.
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
from autodfp.errors import PlanError
from autodfp.eval.metrics import profile
from autodfp.search.budget import MacsModel
from conftest import bn_statistics_from_noise, physical_and_masked, zero_ratio_max_diff

SHAPE = (3, 16, 16)


class _SE(nn.Module):
    def __init__(self, c: int, r: int, combine: str = "mul") -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate if self.combine == "mul" else x + gate


class _Block(nn.Module):
    def __init__(self, cin: int, cexp: int, cout: int, se: str | None = "mul") -> None:
        super().__init__()
        self.expand = nn.Conv2d(cin, cexp, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cexp)
        self.dw = nn.Conv2d(cexp, cexp, 3, 1, 1, groups=cexp, bias=False)
        self.bn2 = nn.BatchNorm2d(cexp)
        self.se = _SE(cexp, cexp // 4, se) if se is not None else nn.Identity()
        self.project = nn.Conv2d(cexp, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.residual = cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(self.bn2(self.dw(F.hardswish(self.bn1(self.expand(x))))))
        y = self.bn3(self.project(self.se(y)))
        return x + y if self.residual else y


class TinySENet(nn.Module):
    def __init__(self, se: str | None = "mul") -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(_Block(8, 24, 12, se), _Block(12, 36, 12, se))
        self.head = nn.Conv2d(12, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.hardswish(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(F.hardswish(self.head(x)), 1).flatten(1))


def _calibrate(net: nn.Module, shape: tuple[int, ...] = SHAPE) -> nn.Module:
    return bn_statistics_from_noise(net, shape)


def _net(se: str | None = "mul") -> nn.Module:
    torch.manual_seed(0)
    return _calibrate(TinySENet(se))


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


EXPANSIONS = ["blocks.0.expand", "blocks.1.expand"]


def test_se_expansion_groups_are_found_and_prunable_by_default():
    graph = find_groups(_net(), SHAPE)
    for b, name in enumerate(EXPANSIONS):
        g = graph.get(name)
        assert g.prunable and g.kind == "se_chain" and g.reason == ""
        assert g.gates == [f"blocks.{b}.se.fc2"] and g.members == [name, f"blocks.{b}.se.fc2"]
        assert g.squeezes == [f"blocks.{b}.se.fc1"]
        assert g.consumers == [f"blocks.{b}.se.fc1", f"blocks.{b}.project"]
        assert g.main_consumers == [f"blocks.{b}.project"]
        assert [s.conv for s in g.passthrough] == [f"blocks.{b}.dw"]
        assert g.activation == "identity"  # measured at each consumer's input
    # the SE squeeze channels stay an ordinary group; the residual stream stays refused
    assert graph.get("blocks.0.se.fc1").kind == "conv" and graph.get("blocks.0.se.fc1").prunable
    assert graph.get("blocks.0.project").reason == "coupled (residual add / shortcut / concat)"


def test_without_se_or_with_an_additive_gate_the_groups_are_as_before():
    plain = find_groups(_net(None), SHAPE)
    for name in EXPANSIONS:
        g = plain.get(name)
        assert g.prunable and g.kind == "dw_chain" and not g.coupled and g.activation == "hardswish"
        assert g.gates == [] and g.squeezes == [] and g.consumers == [name.replace("expand", "project")]
    assert not any(g.kind == "se_chain" for g in plain)
    added = find_groups(_net("add"), SHAPE)  # x + gate: a second producer tied by an add, not a gate
    for name in EXPANSIONS:
        g = added.get(name)
        assert not g.prunable and g.kind == "dw_chain" and g.reason == "coupled (residual add / shortcut / concat)"
    coupled = find_groups(_net("add"), SHAPE, coupled=True)
    assert "not reconstructable" in coupled.get(EXPANSIONS[0]).reason


def test_zero_ratio_prune_is_output_identical():
    assert zero_ratio_max_diff(_net(), SHAPE, _x(3, 2)) == 0.0


@pytest.mark.parametrize("strategy", ["none", "lsq", "mean", "autodfp"])
def test_pruned_se_groups_equal_the_masked_path_and_the_analytic_macs(strategy):
    net = _net()
    calib = _x(16, 1)
    pruner = Pruner(net, SHAPE, calibration=calib)
    plan = Plan({name: 0.5 for name in EXPANSIONS}, strategy=strategy)
    decisions = pruner.decide(plan)
    x = _x(3, 2)
    for decs in (decisions, Refiner(pruner, calib)(decisions)):
        pruned, diff = physical_and_masked(pruner, plan, decs, x)
        assert diff <= 1e-5
        for b, name in enumerate(EXPANSIONS):
            k = n_keep(pruner.graph.get(name).channels, 0.5)
            block = pruned.blocks[b]
            assert block.expand.out_channels == block.dw.out_channels == block.bn2.num_features == k
            assert block.se.fc1.in_channels == block.se.fc2.out_channels == block.project.in_channels == k
            assert block.se.fc2.bias.shape == (k,)
        with torch.no_grad():
            assert pruned(x).shape == (3, 10)
    mm = MacsModel(net, pruner.graph, SHAPE)
    assert profile(pruned, SHAPE).total_macs == mm.macs_for_plan(plan) < mm.total_macs
    # with the SE squeeze groups pruned too, fc1 and fc2 shrink on both sides
    both = Plan({g.name: 0.5 for g in pruner.graph.prunable}, strategy=strategy)
    assert profile(pruner.apply(both).model, SHAPE).total_macs == mm.macs_for_plan(both)


def test_an_exact_duplicate_channel_is_removed_output_identically_with_lsq():
    """lsq with no ridge predicts the duplicate exactly, at the project conv and at fc1.

    Both fits are regressions on measured consumer inputs: exact only where the kept channels'
    covariance is full rank, so the calibration batch holds more images (fc1 sees one pooled
    position per image) than the group has channels.
    """
    net = _net()
    b, p, k = 0, 5, 2
    block = net.blocks[b]
    with torch.no_grad():
        block.expand.weight[p] = block.expand.weight[k]
        block.dw.weight[p] = block.dw.weight[k]
        for bn in (block.bn1, block.bn2):
            for t in ("running_mean", "running_var", "weight", "bias"):
                getattr(bn, t)[p] = getattr(bn, t)[k]
        block.se.fc2.weight[p] = block.se.fc2.weight[k]  # the same gate for both
        block.se.fc2.bias[p] = block.se.fc2.bias[k]
    name = EXPANSIONS[b]
    pruner = Pruner(net, SHAPE, calibration=_x(64, 1))
    kept = [c for c in range(24) if c != p]
    x = _x(3, 2)
    with torch.no_grad():
        ref = net(x)
        plan = Plan({name: 23 / 24}, strategy="lsq", keep={name: kept}, params={"ridge": 0.0, "dims_ridge": 0.0})
        out = pruner.apply(plan).model(x)
        dropped = pruner.apply(Plan({name: 23 / 24}, strategy="none", keep={name: kept})).model(x)
    assert (out - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())
    assert (dropped - ref).abs().max().item() > 1e-3  # the channel mattered


def test_default_prune_without_flags_calibrates_and_meets_the_budget():
    net = _net()
    cheap = autodfp.Config(synth_steps=2, calibration_inputs=8, refine_inputs=8, reward_inputs=8)
    res = autodfp.prune(net, input_shape=SHAPE, macs_ratio=0.7, search="uniform", config=cheap, progress=False)
    assert abs(res.report["macs_ratio_achieved"] - 0.7) <= 0.01
    assert any(n in res.plan.ratios and res.plan.ratios[n] < 1 for n in EXPANSIONS)


def test_torchvision_mobilenet_v3_small_reaches_0_7_macs():
    tv = pytest.importorskip("torchvision")
    shape = (3, 64, 64)
    torch.manual_seed(0)
    model = _calibrate(tv.models.mobilenet_v3_small(), shape)
    graph = find_groups(model, shape)
    se = [g for g in graph.prunable if g.kind == "se_chain"]
    assert len(se) == 9 and all(len(g.gates) == 1 and len(g.squeezes) == 1 for g in se)
    cfg = autodfp.Config(synth_steps=2, calibration_inputs=8, refine_inputs=8, reward_inputs=8)
    res = autodfp.prune(model, input_shape=shape, macs_ratio=0.7, search="uniform", config=cfg, progress=False)
    assert abs(res.report["macs_ratio_achieved"] - 0.7) <= 0.01
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.isfinite(res.model(x)).all()


def test_se_groups_need_a_calibration_batch():
    pruner = Pruner(_net(), SHAPE)
    with pytest.raises(PlanError, match="SE-gated groups need a calibration batch"):
        pruner.decide(Plan({EXPANSIONS[0]: 0.5}))
