"""MACs budgets: the closed-form count against real pruned models, feasibility, uniform fit, repair."""

from __future__ import annotations

import random

import pytest

from autodfp.compress.plan import Plan, n_keep
from autodfp.compress.surgery import Pruner
from autodfp.errors import PlanError
from autodfp.eval.metrics import profile
from autodfp.models import load_model
from autodfp.search.budget import MacsModel, plan_from_keep

CIFAR = (3, 32, 32)
IMAGENET = (3, 224, 224)


@pytest.fixture(scope="module")
def resnet20():
    net, _ = load_model("resnet20_cifar10")
    pruner = Pruner(net, CIFAR)
    return pruner, MacsModel(net, pruner.graph, CIFAR)


@pytest.fixture(scope="module")
def resnet56_mm():
    net, _ = load_model("resnet56_cifar10")
    pruner = Pruner(net, CIFAR)
    return MacsModel(net, pruner.graph, CIFAR)


@pytest.fixture(scope="module")
def mobilenet():
    net, _ = load_model("mobilenet_v1_075_imagenet")
    pruner = Pruner(net, IMAGENET)
    return pruner, MacsModel(net, pruner.graph, IMAGENET)


def _random_plan(graph, rng: random.Random) -> Plan:
    # ratios down to 0.05 so that some groups keep a single channel
    return Plan({g.name: rng.uniform(0.05, 1.0) for g in graph.prunable}, strategy="none")


def test_analytic_macs_equal_the_profile_of_physically_pruned_resnets(resnet20):
    pruner, mm = resnet20
    assert mm.macs({}) == mm.total_macs == profile(pruner.model, CIFAR).total_macs
    rng = random.Random(0)
    for _ in range(3):
        plan = _random_plan(pruner.graph, rng)
        real = profile(pruner.apply(plan).model, CIFAR).total_macs
        assert mm.macs_for_plan(plan) == real
        assert real < mm.total_macs


def test_analytic_macs_equal_the_profile_of_a_pruned_mobilenet(mobilenet):
    """The pointwise conv after a pruned chain is also the producer of the next one: both factors apply."""
    pruner, mm = mobilenet
    plan = _random_plan(pruner.graph, random.Random(1))
    assert mm.macs_for_plan(plan) == profile(pruner.apply(plan).model, IMAGENET).total_macs


def test_feasible_range_is_tight_in_channel_space(mobilenet):
    _, mm = mobilenet
    target, r_min, tol = 0.4 * mm.total_macs, 0.2, 0.01
    kmin = mm.min_keep(r_min)
    rng = random.Random(3)
    chosen: dict[str, int] = {}
    for g in mm.groups[:-1]:
        lo, hi = mm.feasible_keep(chosen, g, target, r_min, tol)
        assert kmin[g] <= lo <= hi <= mm.channels[g]
        rest = [h for h in mm.groups if h != g and h not in chosen]
        at_min = {**chosen, **{h: kmin[h] for h in rest}}
        at_max = {**chosen, **{h: mm.channels[h] for h in rest}}
        assert mm.macs({**at_min, g: hi}) <= target
        if hi < mm.channels[g]:
            assert mm.macs({**at_min, g: hi + 1}) > target
        assert mm.macs({**at_max, g: lo}) >= target * (1 - tol)
        if lo > kmin[g]:
            assert mm.macs({**at_max, g: lo - 1}) < target * (1 - tol)
        ratio_lo, ratio_hi = mm.feasible_range(chosen, g, target, r_min, tol)
        assert n_keep(mm.channels[g], ratio_lo) == lo and n_keep(mm.channels[g], ratio_hi) == hi
        chosen[g] = rng.randint(lo, hi)
    last = mm.groups[-1]
    lo, hi = mm.feasible_keep(chosen, last, target, r_min, tol)
    for k in (lo, hi):  # any choice for the last group lands in the band
        assert target * (1 - tol) <= mm.macs({**chosen, last: k}) <= target


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_fit_uniform_lands_within_one_percent(resnet56_mm, mobilenet, ratio):
    for mm in (resnet56_mm, mobilenet[1]):
        r = mm.fit_uniform(ratio * mm.total_macs)
        got = mm.macs(mm.ratio_keep(r)) / mm.total_macs
        assert abs(got / ratio - 1) <= 0.01, (mm.groups[0], ratio, r, got)
        assert len(repr(r)) <= 8  # a short decimal, not a float at a rounding edge
    assert resnet56_mm.fit_uniform(0.5 * resnet56_mm.total_macs) == 0.5


def test_repair_moves_few_channels_into_the_band(resnet56_mm):
    mm = resnet56_mm
    target = 0.5 * mm.total_macs
    keep = mm.ratio_keep(0.53)  # ~6 % over
    fixed = mm.repair(keep, target)
    assert abs(mm.macs(fixed) / target - 1) <= 0.01
    assert all(fixed[g] <= keep[g] for g in keep)
    inside = mm.ratio_keep(0.5)
    assert mm.repair(inside, target) == inside
    plan = plan_from_keep(fixed, mm.channels)
    assert mm.macs_for_plan(plan) == mm.macs(fixed)


def test_impossible_targets_are_plan_errors_that_state_the_floor(resnet56_mm):
    mm = resnet56_mm
    floor = mm.min_macs(0.2) / mm.total_macs
    with pytest.raises(PlanError, match=rf"minimum reachable MACs ratio is {floor:.4f}") as err:
        mm.fit_uniform(0.1 * mm.total_macs, r_min=0.2)
    assert "\n" not in str(err.value)
    with pytest.raises(PlanError, match="above the original"):
        mm.check_target(1.2 * mm.total_macs)
    mm.check_target(floor * mm.total_macs, r_min=0.2)  # exactly the floor is reachable


def test_auto_r_min_leaves_headroom_below_the_target(resnet56_mm, mobilenet):
    from autodfp.search.budget import AUTO_R_MIN_MAX

    mm = resnet56_mm
    assert mm.auto_r_min(0.5 * mm.total_macs) == 0.3 == AUTO_R_MIN_MAX  # the measured setting
    previous = 0.0
    for ratio in (0.1, 0.2, 0.3, 0.5, 0.8):
        r = mm.auto_r_min(ratio * mm.total_macs)
        assert r >= previous  # a looser budget never gets a lower floor
        assert mm.min_macs(r) <= ratio * mm.total_macs  # every target stays reachable
        previous = r
    assert mobilenet[1].auto_r_min(0.3 * mobilenet[1].total_macs) == 0.3


def test_repair_reaches_a_band_that_only_two_groups_moved_together_can_reach() -> None:
    """Two narrow groups: single-channel moves oscillate around 0.7x, a joint move lands at 0.6995x."""
    import torch.nn as nn

    from autodfp.analysis.graph import find_groups

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 4, stride=4)
            self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
            self.norm1 = nn.GroupNorm(1, 32)
            self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
            self.conv3 = nn.Conv2d(32, 48, 3, stride=2, padding=1)
            self.head = nn.Linear(48, 10)

        def forward(self, x):
            x = nn.functional.gelu(self.norm1(self.conv1(self.stem(x))))
            x = nn.functional.gelu(self.conv3(nn.functional.gelu(self.conv2(x))))
            return self.head(x.mean((2, 3)))

    model, shape = Tiny().eval(), (3, 64, 64)
    mm = MacsModel(model, find_groups(model, shape), shape)
    target = 0.7 * mm.total_macs
    keep = mm.repair(mm.ratio_keep(mm.fit_uniform(target, 0.3, 0.01)), target, 0.01, 0.3)
    assert abs(mm.macs(keep) / target - 1) <= 0.01
