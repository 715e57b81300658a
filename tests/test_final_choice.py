"""The detector-aware score and the final choice (issue 26 item 4, issue 28 item 4).

- the tail-aware measure sees an exploding score channel that a mean over positions misses;
- a single-tensor classifier's reward is exactly what it was;
- the final choice is scored on inputs no fit used;
- the per-group pass never returns a lower score than the global choice, and undoes one harmful fit;
- a tiny YOLO-like detector (ShuffleNetV2 parts, FPN, raw head maps) prunes end to end.
"""

from __future__ import annotations

import logging
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

import autodfp  # before torchvision: registers its ops on the pinned CPU torch
from autodfp.compress.final import decision_scorer, final_choice, held_apart, held_apart_reward
from autodfp.compress.plan import Plan
from autodfp.compress.refine import Refiner
from autodfp.compress.surgery import Pruner
from autodfp.config import Config
from autodfp.search.rewards import AgreementReward, guess_kinds, tail_nmse
from conftest import CHEAP, bn_statistics_from_noise


def _whole_nmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    """The score multi-output models had before: one normalised MSE over the whole tensor."""
    return -float((out - ref).pow(2).mean()) / float(ref.var(unbiased=False))


def test_tail_measure_penalises_an_exploding_channel() -> None:
    """A few objectness logits shooting from the top of their range to 4x it (issue 26: 4.9 → 21.9)
    are nothing to a mean over every position, and most of a per-channel tail term."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(16, 20, 16, 16, generator=g)
    ref[:, 4] = ref[:, 4] * 2 - 4  # an objectness-like channel: mostly negative logits
    noisy = ref + 0.25 * torch.randn(ref.shape, generator=g)  # small error everywhere
    exploded = ref.clone()
    top = ref[:, 4].amax()
    exploded[:3, 4, 5, 5] = 4 * top  # three anchors out of 4096 in that channel
    assert _whole_nmse(ref, exploded) > _whole_nmse(ref, noisy), "plain NMSE prefers the explosion"
    assert tail_nmse(ref, exploded) < tail_nmse(ref, noisy), "the tail measure does not"
    assert tail_nmse(ref, ref) == 0.0


class _Maps(nn.Module):
    """Returns fixed maps per input index (``x[:, 0, 0]`` holds it): a stand-in detector."""

    def __init__(self, maps: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.maps = maps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        idx = x[:, 0, 0].long()
        return tuple(m[idx] for m in self.maps)


def test_detector_reward_ranks_the_explosion_below_mild_noise() -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(8, 12, 10, 10, generator=g)
    box = torch.randn(8, 4, 10, 10, generator=g)
    noisy = ref + 0.25 * torch.randn(ref.shape, generator=g)
    exploded = ref.clone()
    exploded[:2, 4, 3, 3] = 4 * ref[:, 4].amax()
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1).expand(8, 1, 2).contiguous()
    reward = AgreementReward(_Maps((ref, box)), x, tail=0.01)  # opt-in: Config.reward_tail
    assert reward.kinds is not None and set(reward.kinds.values()) == {"regression"}
    assert reward(_Maps((exploded, box))) < reward(_Maps((noisy, box)))
    plain = AgreementReward(_Maps((ref, box)), x)  # the default: a mean over positions misses it
    assert plain(_Maps((exploded, box))) > plain(_Maps((noisy, box)))
    assert reward(_Maps((ref, box))) == 0.0


def test_single_tensor_classifier_reward_is_unchanged(tiny_cnn: nn.Module) -> None:
    """The classifier path is the one measured in the rewards' docstring: KL at T, top-1, logit NMSE."""
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    other = Pruner(tiny_cnn, (3, 16, 16)).apply(Plan.uniform(Pruner(tiny_cnn, (3, 16, 16)).graph, 0.5)).model.eval()
    for measure in ("kl", "top1", "mse"):
        for temperature in (1.0, 2.0):
            reward = AgreementReward(tiny_cnn, x, measure=measure, temperature=temperature, label_offset=1)
            with torch.no_grad():
                r, o = tiny_cnn(x)[:, 1:], other(x)[:, 1:]
            kl = F.kl_div(
                F.log_softmax(o / temperature, 1),
                F.log_softmax(r / temperature, 1),
                log_target=True,
                reduction="batchmean",
            )
            expected = {
                "kl": -float(kl),
                "top1": float((o.argmax(1) == r.argmax(1)).float().mean()),
                "mse": -float((o - r).pow(2).mean()) / float(r.var(unbiased=False)),
            }[measure]
            assert abs(reward(other) - expected) <= 1e-6 * max(1.0, abs(expected))


def test_packed_anchor_rows_are_not_softmaxed() -> None:
    """SSD scores beside their boxes stay class logits; a YOLO row [xywh, obj, cls...] alone does not."""
    ssd = {"s": torch.zeros(2, 100, 21), "b": torch.zeros(2, 100, 4)}
    assert guess_kinds(ssd) == ["logits", "regression"]
    yolo = {"rows": torch.zeros(2, 300, 85), "aux": torch.zeros(2, 10)}
    assert guess_kinds(yolo) == ["regression", "logits"]


def test_held_apart_drops_the_fit_rows() -> None:
    g = torch.Generator().manual_seed(3)
    fit = torch.randn(6, 3, 8, 8, generator=g)
    fresh = torch.randn(5, 3, 8, 8, generator=g)
    mixed = torch.cat([fit[:3], fresh])
    assert held_apart(mixed, [fit, None]).tolist() == [False] * 3 + [True] * 5
    assert held_apart(mixed, [fit[:2]]).tolist() == [False] * 2 + [True] * 6, "a prefix of a fit batch counts"
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    net(mixed)
    reward = AgreementReward(net.eval(), mixed)
    apart, held = held_apart_reward(reward, [fit], net)
    assert held == (5, 8)
    assert isinstance(apart, AgreementReward) and torch.equal(apart.inputs, fresh)
    same, held = held_apart_reward(reward, [torch.randn(4, 3, 8, 8)], net)
    assert same is reward and held == (8, 8)


def test_final_choice_never_scores_on_refinement_inputs(tiny_cnn: nn.Module, caplog) -> None:
    """By default the reward's batch and the fits' are apart; when the caller makes them the same
    batch, the report says so and a warning names the cause."""
    shape = (3, 16, 16)
    cfg = Config(effort="fast", select_inputs=8, **CHEAP)
    res = autodfp.prune(tiny_cnn, input_shape=shape, uniform=0.5, config=cfg, progress=False)
    assert res.report["final_choice_held_apart"] == [8, 8]
    with caplog.at_level(logging.WARNING, logger="autodfp"):
        same = autodfp.prune(
            tiny_cnn, input_shape=shape, uniform=0.5, config=cfg.replace(refine_seed_offset=0), progress=False
        )
    assert same.report["final_choice_held_apart"] == [0, 8]
    assert "fit inputs" in caplog.text


def _chain() -> nn.Module:
    """Three prunable groups before a raw head map."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    c = 3
    for w in (8, 12, 12):
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    layers += [nn.Conv2d(c, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10), nn.ReLU(), nn.Conv2d(10, 6, 1)]
    return bn_statistics_from_noise(nn.Sequential(*layers), (3, 12, 12))


def _setup() -> tuple[Pruner, Plan, dict, dict, torch.Tensor]:
    net = _chain()
    shape = (3, 12, 12)
    g = torch.Generator().manual_seed(4)
    pruner = Pruner(net, shape, calibration=torch.randn(16, *shape, generator=g), corr_source="calibration")
    plan = Plan.uniform(pruner.graph, 0.5, strategy="lsq")
    decisions = pruner.decide(plan)
    refined = Refiner(pruner, torch.randn(16, *shape, generator=g))(decisions)
    return pruner, plan, decisions, refined, torch.randn(16, *shape, generator=g)


def _variant_of(d: dict, name: str, refined: dict, unrefined: dict) -> int:
    """Which variant a group's decision in ``d`` is: 0 refined, 1 unrefined, 2 uncompensated
    (the final choice makes its own uncompensated decisions, so those are told by their
    missing compensation)."""
    v = d.get(name)
    if v is refined.get(name):
        return 0
    if v is unrefined.get(name):
        return 1
    assert v is not None and v.compensation is None and v.per_consumer is None
    return 2


def test_per_group_choice_undoes_one_harmful_fit() -> None:
    """Refinement pays everywhere but in one group, where it is the worst choice (a head whose
    logits it blows up): the global choice keeps the refinement, and the per-group pass takes the
    unrefined decision for that group alone."""
    pruner, plan, decisions, refined, _ = _setup()
    names = [g.name for g in pruner.graph.prunable]
    bad = names[-1]
    # cost of (refined, unrefined, uncompensated) per group; the score is minus their sum
    cost = {n: (0.0, 3.0, 4.0) for n in names}
    cost[bad] = (2.0, 0.0, 1.0)

    def score(d: dict) -> float:
        return -sum(cost[n][_variant_of(d, n, refined, decisions)] for n in names)

    choice = final_choice(pruner, plan, decisions, refined, None, score)
    assert choice.step == "refined" and choice.scores["refined"] == -2.0
    assert choice.groups == {bad: {"chosen": "unrefined", "gain": 2.0}}
    assert choice.decisions[bad] is decisions[bad] and choice.score == 0.0
    assert all(choice.decisions[n] is refined[n] for n in names if n != bad)
    assert choice.reward_calls == 3 + 2 * len(names), "three global candidates, at most two per group"
    assert choice.uses_refinement and not choice.uncompensated


def test_per_group_choice_on_the_agreement_reward() -> None:
    """With the real agreement reward on a tiny chain: never below the global choice, and the
    score reported is the score of the decisions returned."""
    pruner, plan, decisions, refined, x = _setup()
    names = [g.name for g in pruner.graph.prunable]
    net = pruner.model
    score = decision_scorer(pruner, AgreementReward(net, x), net)
    glob = final_choice(pruner, plan, decisions, refined, None, score, per_group=False)
    choice = final_choice(pruner, plan, decisions, refined, None, score, per_group=True)
    assert glob.groups == {} and glob.score == max(glob.scores.values())
    assert choice.score >= glob.score
    assert abs(score(choice.decisions) - choice.score) < 1e-9
    assert choice.reward_calls <= len(choice.scores) + 2 * len(names)


def test_per_group_choice_never_lowers_the_score() -> None:
    """Against arbitrary scores (a random table over which variant each group has), the per-group
    pass ends at or above the global choice, on the same scorer."""
    pruner, plan, decisions, refined, _ = _setup()
    names = [g.name for g in pruner.graph.prunable]
    for seed in range(10):
        rng = random.Random(seed)
        table: dict[tuple[int, ...], float] = {}

        def score(d: dict, table=table, rng=rng) -> float:
            key = tuple(_variant_of(d, n, refined, decisions) for n in names)
            return table.setdefault(key, rng.random())

        choice = final_choice(pruner, plan, decisions, refined, None, score)
        assert choice.score >= choice.scores[choice.step]
        assert choice.score == score(choice.decisions)


class _TinyYolo(nn.Module):
    """ShuffleNetV2 stages (torchvision, tiny widths), a two-level FPN, YOLO-style 1×1 heads
    (3 anchors × (5 + 3 classes)): the structure of ``benchmarks/yolo_like.py`` at toy size."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        tv = torchvision.models.shufflenetv2.ShuffleNetV2([1, 2, 1], [8, 16, 32, 48, 64])
        self.input = nn.Sequential(tv.conv1, tv.maxpool)
        self.stage2, self.stage3, self.stage4 = tv.stage2, tv.stage3, tv.stage4

        def cbr(cin: int, cout: int, k: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.lateral = nn.ModuleList([cbr(32, 12, 1), cbr(48, 12, 1)])
        self.smooth = nn.ModuleList([cbr(12, 12, 3), cbr(12, 12, 3)])
        self.stem = nn.ModuleList([cbr(12, 12, 1), cbr(12, 12, 1)])
        self.heads = nn.ModuleList([nn.Conv2d(12, 24, 1), nn.Conv2d(12, 24, 1)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c4 = self.stage3(self.stage2(self.input(x)))
        c5 = self.stage4(c4)
        p5 = self.lateral[1](c5)
        p4 = self.lateral[0](c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        a, b = (h(t(s(p))) for h, t, s, p in zip(self.heads, self.stem, self.smooth, (p4, p5)))
        return a, b


def test_tiny_yolo_like_prunes_end_to_end() -> None:
    torch.manual_seed(0)
    shape = (3, 64, 64)
    net = bn_statistics_from_noise(_TinyYolo(), shape)
    cfg = Config(effort="fast", select_inputs=8, **CHEAP)
    res = autodfp.prune(net, input_shape=shape, uniform=0.6, config=cfg, progress=False)
    assert res.report["macs_after"] < res.report["macs_before"]
    assert "final_step" in res.report and isinstance(res.report["final_choice_groups"], dict)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        want, got = net(x), res.model(x)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert all(torch.isfinite(t).all() for t in got)
