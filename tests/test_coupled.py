"""Coupled groups (residual streams): identity at ratio 1, masked = physical, exact duplicates, MACs, budget.

Two tiny residual nets with random BN statistics: the CIFAR ResNet (option-A
``ChannelPadShortcut`` between stages) at depth 8, and a torchvision-style net whose stage change
goes through a 1×1 downsample conv + BN. An exact duplicate stream channel merges output-identically
in the second; in the first the pad shortcut copies the pruned channel into the next stage's stream
and cannot absorb a compensation (see :mod:`autodfp.compress.surgery`), so there the test checks
what does hold: every stage-1 consumer's output is unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from autodfp.analysis.graph import find_groups
from autodfp.compress.plan import Plan, n_keep
from autodfp.compress.refine import Refiner
from autodfp.compress.surgery import Pruner
from autodfp.errors import ModelError, PlanError
from autodfp.eval.metrics import profile
from autodfp.models.resnet_cifar import ResNetCifar
from autodfp.search.budget import MacsModel
from autodfp.search.driver import search

SHAPE = (3, 16, 16)


def _randomise_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(0.6 * torch.rand(c, generator=g) - 0.3)
    return net.eval()


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyTorchvisionResNet(nn.Module):
    """Stem → 2 blocks at 8 channels → a downsampling block to 16 (1×1 conv shortcut) → 1 block → head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(_Block(8, 8, 1), _Block(8, 8, 1))
        self.layer2 = nn.Sequential(_Block(8, 16, 2), _Block(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _InvertedResidual(nn.Module):
    """MobileNet-V2 block with BN folded away (convs carry biases), a linear bottleneck and a residual add."""

    def __init__(self, c: int, t: int = 3) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, c * t, 1)
        self.dw = nn.Conv2d(c * t, c * t, 3, 1, 1, groups=c * t)
        self.project = nn.Conv2d(c * t, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(F.relu6(self.dw(F.relu6(self.expand(x)))))


class TinyInvertedResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.blocks = nn.Sequential(_InvertedResidual(8), _InvertedResidual(8))
        self.head = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(F.relu6(self.head(x)), 1).flatten(1))


def _nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "option_a": _randomise_bn(ResNetCifar(8)),
        "downsample": _randomise_bn(TinyTorchvisionResNet()),
        "inverted": TinyInvertedResidualNet().eval(),
    }


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["option_a", "downsample"])
def test_coupled_streams_are_found_and_only_when_asked(arch):  # both end in a stream that feeds the classifier
    net = _nets()[arch]
    off = find_groups(net, SHAPE)
    on = find_groups(net, SHAPE, coupled=True)
    assert not any(g.coupled for g in off.prunable)
    streams = [g for g in on.prunable if g.coupled]
    assert streams and all((len(g.members) > 1 or g.shortcuts) and g.activation == "identity" for g in streams)
    # the inner groups are the same either way
    assert [g.to_dict() for g in off.prunable] == [g.to_dict() for g in on.prunable if not g.coupled]
    last = [g for g in on.groups if g.coupled][-1]  # the last stream feeds the classifier
    assert not last.prunable and last.reason == "feeds the classifier"


@pytest.mark.parametrize("arch", ["option_a", "downsample", "inverted"])
def test_zero_ratio_plan_with_coupled_groups_is_output_identical(arch):
    net = _nets()[arch]
    pruner = Pruner(net, SHAPE, calibration=_x(8, 1), coupled=True)
    x = _x(3, 2)
    with torch.no_grad():
        ref = net(x)
        for strategy in ("none", "lsq"):
            plan = Plan.uniform(pruner.graph, 1.0, strategy=strategy)
            assert any(pruner.graph.get(g).coupled for g in plan.ratios)
            assert torch.equal(pruner.apply(plan).model(x), ref)
            assert torch.equal(functional_call(net, pruner.masked_state(plan), (x,)), ref)


@pytest.mark.parametrize("arch", ["option_a", "downsample", "inverted"])
@pytest.mark.parametrize("strategy", ["none", "mean", "lsq", "autodfp"])
def test_pruned_streams_equal_the_masked_path_and_the_analytic_macs(arch, strategy):
    net = _nets()[arch]
    calib = _x(8, 1)
    pruner = Pruner(net, SHAPE, calibration=calib, coupled=True)
    plan = Plan.uniform(pruner.graph, 0.5, strategy=strategy)
    decisions = pruner.decide(plan)
    x = _x(3, 2)
    for decs in (decisions, Refiner(pruner, calib)(decisions)):
        pruned = pruner.apply(plan, decs).model
        for g in pruner.graph.prunable:
            for conv in g.members if g.coupled else [g.producer.conv]:
                assert pruned.get_submodule(conv).out_channels == n_keep(g.channels, 0.5)
        with torch.no_grad():
            physical = pruned(x)
            masked = functional_call(net, pruner.masked_state(decs), (x,))
        assert physical.shape == (3, 10)
        assert (physical - masked).abs().max().item() <= 1e-5
    mm = MacsModel(net, pruner.graph, SHAPE)
    assert profile(pruned, SHAPE).total_macs == mm.macs_for_plan(plan)
    # a stream's width changes every producer's and consumer's MACs
    stream = next(g for g in pruner.graph.prunable if g.coupled)
    only = Plan({stream.name: 0.5})
    assert profile(pruner.apply(only).model, SHAPE).total_macs == mm.macs_for_plan(only) < mm.total_macs


def _duplicate_stream_channel(net: nn.Module, producers: list[tuple[str, str | None]], p: int, k: int) -> None:
    """Stream channel p becomes an exact copy of channel k: every producer row, bias and BN entry copied."""
    with torch.no_grad():
        for conv, bn in producers:
            c = net.get_submodule(conv)
            c.weight[p] = c.weight[k]
            if c.bias is not None:
                c.bias[p] = c.bias[k]
            if bn is not None:
                b = net.get_submodule(bn)
                for name in ("running_mean", "running_var", "weight", "bias"):
                    getattr(b, name)[p] = getattr(b, name)[k]


@pytest.mark.parametrize("arch,name", [("downsample", "conv1"), ("inverted", "stem")])
@pytest.mark.parametrize("strategy", ["autodfp", "nm"])
def test_exact_duplicate_stream_channel_merges_output_identically(arch, name, strategy):
    net = _nets()[arch]
    graph = find_groups(net, SHAPE, coupled=True)
    stream = graph.get(name)
    assert stream.coupled and stream.prunable
    if arch == "downsample":  # the 1x1 downsample conv is a consumer that absorbs the merge
        assert "layer2.0.downsample.0" in stream.consumers
    p, k = 5, 2
    _duplicate_stream_channel(net, list(zip(stream.members, stream.member_bns)), p, k)
    pruner = Pruner(net, SHAPE, calibration=_x(8, 1), coupled=True)
    kept = [c for c in range(8) if c != p]
    params = {"lam": 1.0} if strategy == "nm" else {}
    plan = Plan({name: 7 / 8}, strategy=strategy, keep={name: kept}, params=params)
    x = _x(3, 2)
    with torch.no_grad():
        ref = net(x)
        out = pruner.apply(plan).model(x)
        dropped = pruner.apply(Plan({name: 7 / 8}, strategy="none", keep={name: kept})).model(x)
    assert (out - ref).abs().max().item() <= 1e-4 * (1 + ref.abs().max().item())
    assert (dropped - ref).abs().max().item() > 1e-2  # the channel mattered


def test_option_a_duplicate_is_exact_up_to_the_pad_shortcut():
    """The pad shortcut's copy of the pruned channel is lost; every stage-1 consumer is unchanged."""
    net = _nets()["option_a"]
    graph = find_groups(net, SHAPE, coupled=True)
    stream = graph.get("conv1")
    p, k = 3, 9
    _duplicate_stream_channel(net, list(zip(stream.members, stream.member_bns)), p, k)
    pruner = Pruner(net, SHAPE, calibration=_x(8, 1), coupled=True)
    kept = [c for c in range(16) if c != p]
    plan = Plan({"conv1": 15 / 16}, strategy="autodfp", keep={"conv1": kept})
    pruned = pruner.apply(plan).model
    x = _x(3, 2)

    def outputs(model: nn.Module) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        hooks = [
            model.get_submodule(c).register_forward_hook(lambda m, i, o, c=c: got.__setitem__(c, o.detach()))
            for c in stream.consumers
        ]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return got

    ref, out = outputs(net), outputs(pruned)
    for c in stream.consumers:
        assert (out[c] - ref[c]).abs().max().item() <= 1e-4, c
    # the lost shortcut copy is the only difference: restoring it in the original gives the same output
    with torch.no_grad():
        sc = copy.deepcopy(net)
        sc.layer2[0].shortcut.src[sc.layer2[0].shortcut.src == p] = sc.layer2[0].shortcut.in_channels
        assert (pruned(x) - sc(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", ["uniform", "random"])
def test_search_meets_the_budget_with_coupled_groups(method):
    net = _nets()["downsample"]
    pruner = Pruner(net, SHAPE, calibration=_x(8, 1), coupled=True)
    mm = MacsModel(net, pruner.graph, SHAPE)
    for ratio in (0.5, 0.7):
        result = search(pruner, ratio, method=method, episodes=3, reward=lambda m: 0.0, strategy="none", progress=False)
        assert any(pruner.graph.get(g).coupled and r < 1.0 for g, r in result.best_plan.ratios.items())
        assert abs(result.best_macs_ratio / ratio - 1) <= 0.01
        macs = profile(pruner.apply(result.best_plan).model, SHAPE).total_macs
        assert macs == mm.macs_for_plan(result.best_plan) == result.best_macs


def test_coupled_groups_need_a_calibration_batch():
    pruner = Pruner(_nets()["downsample"], SHAPE, coupled=True)
    with pytest.raises(PlanError, match="calibration batch"):
        pruner.decide(Plan({"conv1": 0.5}))


class _ConcatStream(nn.Module):
    """A residual add whose one side is a concat of two convs: channels tied across the concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.a = nn.Conv2d(8, 4, 3, 1, 1)
        self.b = nn.Conv2d(8, 4, 3, 1, 1)
        self.head = nn.Conv2d(8, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.stem(x))
        s = F.relu(s + torch.cat([self.a(s), self.b(s)], 1))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.head(s)), 1).flatten(1))


def test_a_stream_tied_through_a_concat_is_excluded_with_a_reason():
    graph = find_groups(_ConcatStream().eval(), SHAPE, coupled=True)
    stem = graph.get("stem")
    assert stem.coupled and not stem.prunable and "concat" in stem.reason
    with pytest.raises(PlanError, match="cannot be pruned: coupled through a concat"):
        Plan({"stem": 0.5}).validate(graph)


class _Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ZeroDivisionError("boom")


def test_untraceable_model_names_the_module():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(_Broken()))
    with pytest.raises(ModelError, match="at module '1.0'"):
        find_groups(net, SHAPE)
