"""Channels through splits, chunks and slices (issue 28): each part its own group, consumers at their offsets.

Small hand-written modules reproduce each pattern (BN statistics from train-mode passes over
noise):

- ``SplitNet``: a stem's channels split by a list attribute (``torch.split(x, self.sizes, 1)``)
  into two dense convs, whose outputs are concatenated (timm's mixed pointwise ``MixedConv2d``);
- ``ChunkNet``: the same through ``torch.chunk`` (parts that can only shrink together: kept whole);
- ``SliceNet``: the same through ``x[:, :self.k]`` / ``x[:, self.k:]``;
- ``MixedDW``: an expansion split into depthwise convs of different kernels, concatenated, then
  projected (MixNet's mixed depthwise conv), with an SE gate on the concat;
- ``GhostNet``: ghost modules (a primary conv concatenated with a depthwise "cheap" conv of itself,
  sliced to ``self.out_chs``), one plain, one followed by a strided depthwise conv and an SE gate;
- ``Res2Net``: Res2Net bottlenecks (``torch.split(x, self.width, 1)`` into ``scale`` parts, each
  conv'd, the later ones after adding the previous part's output, all concatenated), the first
  block of a stage (parts independent, the last one pooled) and a later one.

Each part of a cut is its own group (``name[a:b]``), measured and compensated per consumer read;
the forward code's sizes (``sizes``, ``k``, ``width``) are rewritten after the physical prune.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autodfp
from autodfp.analysis.graph import find_groups
from autodfp.compress.plan import Plan
from autodfp.compress.refine import Refiner
from autodfp.compress.surgery import Pruner
from autodfp.errors import ModelError
from autodfp.eval.metrics import profile
from autodfp.search.budget import MacsModel
from conftest import CHEAP, bn_statistics_from_noise, duplicate_removal_errors, physical_and_masked, zero_ratio_max_diff

SHAPE = (3, 16, 16)


def _cbr(cin: int, cout: int, k: int = 1, groups: int = 1, stride: int = 1, act: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU() if act else nn.Identity(),
    )


class _Head(nn.Module):
    """conv → BN → ReLU → global pool → linear, so the tested channels never feed the classifier."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = _cbr(cin, 12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1))


class SplitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sizes = [6, 10]
        self.stem = _cbr(3, 16, 3)
        self.a = _cbr(6, 8, 3)
        self.b = _cbr(10, 8)
        self.head = _Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.stem(x), self.sizes, 1)
        return self.head(torch.cat([self.a(a), self.b(b)], 1))


class ChunkNet(SplitNet):
    def __init__(self) -> None:
        super().__init__()
        self.b = _cbr(6, 8)
        self.stem = _cbr(3, 12, 3)
        self.head = _Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.stem(x), 2, dim=1)
        return self.head(torch.cat([self.a(a), self.b(b)], 1))


class SliceNet(SplitNet):
    def __init__(self) -> None:
        super().__init__()
        self.k = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head(torch.cat([self.a(s[:, : self.k]), self.b(s[:, self.k :])], 1))


class MixedDW(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.splits = [10, 8]
        self.stem = _cbr(3, 8, 3)
        self.pw = _cbr(8, 18)
        self.dw = nn.ModuleList([nn.Conv2d(10, 10, 3, padding=1, groups=10), nn.Conv2d(8, 8, 5, padding=2, groups=8)])
        self.bn = nn.BatchNorm2d(18)
        self.fc1 = nn.Conv2d(18, 4, 1)
        self.fc2 = nn.Conv2d(4, 18, 1)
        self.pwl = _cbr(18, 8, act=False)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        parts = torch.split(self.pw(s), self.splits, 1)
        y = F.relu(self.bn(torch.cat([conv(p) for conv, p in zip(self.dw, parts)], 1)))
        y = y * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(self.pwl(y) + s)


class Ghost(nn.Module):
    """timm's ``GhostModule``: the primary conv's channels and their depthwise copies, concatenated."""

    def __init__(self, cin: int, out: int, act: bool = True) -> None:
        super().__init__()
        self.out_chs = out
        init = -(-out // 2)
        self.primary_conv = _cbr(cin, init, act=act)
        self.cheap_operation = _cbr(init, init, 3, groups=init, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        return torch.cat([x1, self.cheap_operation(x1)], 1)[:, : self.out_chs]


class GhostNet(nn.Module):
    def __init__(self, odd: bool = False) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, 3)
        self.g1 = Ghost(8, 11 if odd else 12)
        self.g2 = Ghost(11 if odd else 12, 8, act=False)
        self.g3 = Ghost(8, 16)
        self.conv_dw = _cbr(16, 16, 3, groups=16, stride=2, act=False)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.g4 = Ghost(16, 8, act=False)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        s = s + self.g2(self.g1(s))
        y = self.conv_dw(self.g3(s))
        y = y * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(self.g4(y) + F.avg_pool2d(s, 2))


class Res2Block(nn.Module):
    """timm's ``Bottle2neck`` (cardinality 1): split into ``scale`` parts of ``width``."""

    def __init__(self, first: bool, width: int = 6, scale: int = 4, planes: int = 8) -> None:
        super().__init__()
        self.width, self.scale, self.is_first = width, scale, first
        self.conv1 = _cbr(planes, width * scale)
        self.convs = nn.ModuleList([_cbr(width, width, 3) for _ in range(scale - 1)])
        self.pool = nn.AvgPool2d(3, 1, 1) if first else None
        self.conv3 = _cbr(width * scale, planes, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spx = torch.split(self.conv1(x), self.width, 1)
        spo: list[torch.Tensor] = []
        sp = spx[0]
        for i, conv in enumerate(self.convs):
            sp = spx[i] if i == 0 or self.is_first else sp + spx[i]
            sp = conv(sp)
            spo.append(sp)
        spo.append(self.pool(spx[-1]) if self.pool is not None else spx[-1])
        return F.relu(self.conv3(torch.cat(spo, 1)) + x)


class Res2Net(nn.Module):
    def __init__(self, width: int = 6, scale: int = 4) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, 3)
        self.b1 = Res2Block(True, width, scale)
        self.b2 = Res2Block(False, width, scale)
        self.head = _Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(self.b1(self.stem(x))))


MODELS = {"split": SplitNet, "slice": SliceNet, "mixed_dw": MixedDW, "ghost": GhostNet, "res2net": Res2Net}


def _net(cls: type[nn.Module], **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return bn_statistics_from_noise(cls(**kw), SHAPE)


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


# -- structure ---------------------------------------------------------------------------------------


def test_each_part_of_a_list_split_is_its_own_group_read_at_offset_zero():
    graph = find_groups(_net(SplitNet), SHAPE)
    a, b = graph.get("stem.0[0:6]"), graph.get("stem.0[6:16]")
    for g, start, n, cons in ((a, 0, 6, "a.0"), (b, 6, 10, "b.0")):
        assert g.prunable and g.kind == "split" and g.coupled and g.activation == "identity", g.reason
        assert (g.start, g.channels, g.consumers, g.offsets) == (start, n, [cons], [0])
        assert g.cuts == [":split0"]
    # the two convs' outputs are concatenated: ordinary concat groups, at their offsets
    assert graph.get("a.0").kind == graph.get("b.0").kind == "concat"
    assert graph.get("b.0").offset("head.conv.0") == 8


def test_slice_parts_are_groups_and_their_bounds_have_holders():
    graph = find_groups(_net(SliceNet), SHAPE)
    assert [g.name for g in graph.prunable][:2] == ["stem.0[0:6]", "stem.0[6:16]"]
    assert graph.get("stem.0[0:6]").cuts == [":slice0", ":slice1"]  # removing a channel moves both bounds
    assert graph.get("stem.0[6:16]").cuts == [":slice1"]


def test_chunk_parts_stay_whole_with_the_reason():
    g = find_groups(_net(ChunkNet), SHAPE).get("stem.0")  # one group: the parts shrink together or not at all
    assert (
        not g.prunable
        and g.reason == "coupled through a chunk in the model's forward (its parts can only shrink together)"
    )


def test_a_split_size_no_attribute_holds_stays_whole():
    # width == scale: two int attributes equal the split size, so neither is known to be it
    graph = find_groups(_net(Res2Net, width=4, scale=4), SHAPE)
    g = graph.get("b1.conv1.0")
    assert not g.prunable and g.reason == "coupled through a split in 'b1' whose sizes no attribute holds"


def test_mixed_depthwise_parts_pass_their_own_depthwise_conv_and_the_se_gate():
    graph = find_groups(_net(MixedDW), SHAPE)
    for name, start, n, dw in (("pw.0[0:10]", 0, 10, "dw.0"), ("pw.0[10:18]", 10, 8, "dw.1")):
        g = graph.get(name)
        assert g.prunable and g.kind == "split" and g.channels == n, g.reason
        assert [st.conv for st in g.passthrough] == [dw]
        assert g.members == ["pw.0", "fc2"] and g.gates == ["fc2"] and g.member_starts == [start, start]
        assert g.consumers == ["fc1", "pwl.0"] and g.offsets == [start, start] and g.squeezes == ["fc1"]


def test_ghost_channels_are_read_twice_by_their_consumer():
    graph = find_groups(_net(GhostNet), SHAPE)
    g = graph.get("g1.primary_conv.0")
    assert g.prunable and g.kind == "split" and g.blocks == [[0, 6]]
    assert [s[0] for s in g.slots] == ["g2.primary_conv.0", "g2.primary_conv.0#6"]
    # after a strided depthwise conv over both halves and an SE gate, still two reads per consumer
    g3 = graph.get("g3.primary_conv.0")
    assert g3.prunable and g3.kind == "split", g3.reason
    assert g3.gates == ["fc2"] and g3.member_starts == [0, 0]
    assert g3.blocks == [[0, 8], [0, 8]] and g3.consumers == ["fc1", "g4.primary_conv.0"]
    assert ("fc2", "out", 16) in g3.footprint and ("conv_dw.0", "dw", 16) in g3.footprint
    # the ghosts that write the residual stream stay coupled to it
    stream = graph.get("stem.0")
    assert not stream.prunable and stream.members == ["stem.0", "g2.primary_conv.0", "g4.primary_conv.0"]


def test_an_odd_ghost_whose_concat_torch_pruning_cannot_size_stays_whole():
    g = find_groups(_net(GhostNet, odd=True), SHAPE).get("g1.primary_conv.0")
    assert not g.prunable and "concat whose parts torch-pruning cannot size" in g.reason


def test_res2net_parts_first_block_independent_later_block_tied_by_the_adds():
    graph = find_groups(_net(Res2Net), SHAPE)
    for i, cons in enumerate(["b1.convs.0.0", "b1.convs.1.0", "b1.convs.2.0", "b1.conv3.0"]):
        g = graph.get(f"b1.conv1.0[{6 * i}:{6 * i + 6}]")
        assert g.prunable and g.kind == "split" and g.consumers == [cons], g.reason
    assert graph.get("b1.conv1.0[18:24]").offsets == [18]  # pooled into the concat at its offset
    assert [graph.get(f"b1.convs.{i}.0").kind for i in range(3)] == ["concat"] * 3
    # later block: part 0 feeds conv 0 alone, the last part the concat; parts 1, 2 are added to
    # the previous conv's output (a residual-like tie: coupled)
    assert graph.get("b2.conv1.0[0:6]").prunable and graph.get("b2.conv1.0[18:24]").prunable
    tied = graph.get("b2.conv1.0[6:12]")
    assert not tied.prunable and tied.members == ["b2.conv1.0", "b2.convs.0.0"] and tied.member_starts == [6, 0]
    assert graph.get("b2.convs.2.0").kind == "concat"


def test_with_coupled_the_parts_added_to_a_previous_scale_are_streams():
    graph = find_groups(_net(Res2Net), SHAPE, coupled=True)
    for name, starts in (("b2.conv1.0[6:12]", [6, 0]), ("b2.conv1.0[12:18]", [12, 0])):
        g = graph.get(name)
        assert g.prunable and g.coupled and g.kind == "conv" and g.member_starts == starts, g.reason
    # the next scale's conv reads the sum, conv3 the previous scale's output (through the concat)
    assert graph.get("b2.conv1.0[6:12]").consumers == ["b2.convs.1.0", "b2.conv3.0"]


# -- pruning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero_ratio_prune_is_output_identical(name):
    assert zero_ratio_max_diff(_net(MODELS[name]), SHAPE, _x(3, 2)) == 0.0


@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_half_prune_equals_the_masked_path_and_the_analytic_macs(name, coupled):
    net = _net(MODELS[name])
    x = _x(3, 2)
    with torch.no_grad():
        ref = net(x)
    pruner = Pruner(net, SHAPE, calibration=_x(16, 1), coupled=coupled)
    plan = Plan({g.name: 0.5 for g in pruner.graph.prunable}, strategy="lsq")
    pruned, diff = physical_and_masked(pruner, plan, pruner.decide(plan), x)
    assert diff <= 1e-5
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    mm = MacsModel(net, pruner.graph, SHAPE)
    assert profile(pruned, SHAPE).total_macs == mm.macs_for_plan(plan) < mm.total_macs


def test_the_forward_codes_sizes_are_rewritten():
    net = _net(Res2Net)
    pruner = Pruner(net, SHAPE, calibration=_x(16, 1))
    parts = {"b1.conv1.0[0:6]": 0.5, "b1.conv1.0[6:12]": 0.5, "b1.conv1.0[12:18]": 0.5, "b1.conv1.0[18:24]": 0.5}
    pruned = pruner.apply(Plan({**parts, "b2.conv1.0[0:6]": 0.5}, strategy="none")).model
    assert pruned.b1.width == 3  # equal parts: still an int
    assert pruned.b2.width == [3, 6, 6, 6]  # unequal: the list torch.split takes alike
    assert net.b2.width == 6  # the original is untouched
    mixed = _net(MixedDW)
    pruned = Pruner(mixed, SHAPE, calibration=_x(16, 1)).apply(Plan({"pw.0[10:18]": 0.5})).model
    assert pruned.splits == [10, 4] and mixed.splits == [10, 8]
    sliced = Pruner(_net(SliceNet), SHAPE, calibration=_x(16, 1)).apply(Plan({"stem.0[0:6]": 0.5})).model
    assert sliced.k == 3


class _Computed(SliceNet):
    """A slice bound computed from the shape, equal by chance to an attribute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        k = 6 * s.shape[1] // 16
        return self.head(torch.cat([self.a(s[:, :k]), self.b(s[:, k:])], 1))


def test_a_cut_that_the_rewritten_attribute_does_not_drive_fails_loudly():
    pruner = Pruner(_net(_Computed), SHAPE, calibration=_x(16, 1))
    assert pruner.graph.get("stem.0[0:6]").prunable  # ``self.k`` looks like its holder
    with pytest.raises(ModelError, match="channel cut"):
        pruner.apply(Plan({"stem.0[0:6]": 0.5}))


@pytest.mark.parametrize("strategy", ["none", "mean", "autodfp"])
def test_other_strategies_and_refinement_keep_masked_equal_to_physical(strategy):
    net = _net(GhostNet)
    calib = _x(16, 1)
    pruner = Pruner(net, SHAPE, calibration=calib)
    plan = Plan({g.name: 0.6 for g in pruner.graph.prunable}, strategy=strategy)
    decisions = pruner.decide(plan)
    for decs in (decisions, Refiner(pruner, calib)(decisions)):
        _, diff = physical_and_masked(pruner, plan, decs, _x(3, 2))
        assert diff <= 1e-5


def test_an_exact_duplicate_ghost_channel_is_removed_output_identically_with_lsq():
    net = _net(GhostNet)
    p, k = 4, 1
    with torch.no_grad():
        for conv in (net.g1.primary_conv, net.g1.cheap_operation):
            conv[0].weight[p] = conv[0].weight[k]
            for t in ("running_mean", "running_var", "weight", "bias"):
                getattr(conv[1], t)[p] = getattr(conv[1], t)[k]
    pruner = Pruner(net, SHAPE, calibration=_x(64, 1))
    kept = [c for c in range(6) if c != p]
    lsq, none = duplicate_removal_errors(
        pruner, "g1.primary_conv.0", kept, 0.9, _x(3, 2), {"ridge": 0.0, "dims_ridge": 0.0}
    )
    assert lsq <= 1e-5 and none > 1e-3  # both reads compensated exactly, and the channel mattered


def test_an_exact_duplicate_in_a_split_part_is_removed_output_identically_with_lsq():
    net = _net(SplitNet)
    p, k = 6 + 7, 6 + 2  # stem rows of the second part
    with torch.no_grad():
        net.stem[0].weight[p] = net.stem[0].weight[k]
        for t in ("running_mean", "running_var", "weight", "bias"):
            getattr(net.stem[1], t)[p] = getattr(net.stem[1], t)[k]
    pruner = Pruner(net, SHAPE, calibration=_x(64, 1))
    kept = [c for c in range(10) if c != 7]
    lsq, none = duplicate_removal_errors(pruner, "stem.0[6:16]", kept, 0.9, _x(3, 2), {"ridge": 0.0, "dims_ridge": 0.0})
    assert lsq <= 1e-5 and none > 1e-3


@pytest.mark.parametrize("name", ["res2net", "mixed_dw"])
def test_default_prune_meets_the_budget_and_reloads(name, tmp_path):
    net = _net(MODELS[name])
    x = _x(3, 2)
    cfg = autodfp.Config(**CHEAP)
    res = autodfp.prune(net, input_shape=SHAPE, macs_ratio=0.7, search="uniform", config=cfg, progress=False)
    assert abs(res.report["macs_ratio_achieved"] - 0.7) <= 0.01
    autodfp.save(res, tmp_path, plots=False)
    back = autodfp.load(tmp_path, model=_net(MODELS[name]))
    with torch.no_grad():
        assert (back.eval()(x) - res.model(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["ghostnet_100", "mixnet_s", "res2net50_14w_8s"])
def test_timm_models_with_cuts_prune_physically_as_modelled(name):
    """The real timm modules (GhostModule, MixedConv2d, Bottle2neck) at 64 px: the parts are prunable
    groups, 0.7× is within reach, and a uniform half prune is what the masked path and the MACs
    model say it is (the forward code's sizes rewritten)."""
    timm = pytest.importorskip("timm")
    shape = (3, 64, 64)
    torch.manual_seed(0)
    net = bn_statistics_from_noise(timm.create_model(name, pretrained=False), shape, batches=1, n=4)
    pruner = Pruner(net, shape, calibration=torch.randn(4, *shape, generator=torch.Generator().manual_seed(1)))
    kinds = {g.kind for g in pruner.graph.prunable}
    assert "split" in kinds
    mm = MacsModel(net, pruner.graph, shape)
    assert mm.min_macs(0.2) < 0.7 * mm.total_macs  # before issue 28: 0.981× / 0.994× / 0.850× at best
    plan = Plan({g: 0.5 for g in mm.groups}, strategy="none")
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    pruned, diff = physical_and_masked(pruner, plan, pruner.decide(plan), x)
    assert diff <= 1e-4
    assert profile(pruned, shape).total_macs == mm.macs_for_plan(plan)
