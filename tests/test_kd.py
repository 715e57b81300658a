"""The optional data-free distillation stage: it learns the teacher, and changes nothing it should not."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autodfp.compress.kd import DIVERGENCE, distill, distillation_loss, pool_losses
from autodfp.config import Config
from autodfp.errors import AutoDFPError


def _net(width: int) -> nn.Module:
    torch.manual_seed(width)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 5),
    ).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, 3, 8, 8))
    return net.eval()


def _kl(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(distillation_loss(student(x), teacher(x), 4.0))


def test_distillation_moves_the_student_towards_the_teacher_and_keeps_bn_statistics() -> None:
    teacher, student = _net(16), _net(4)
    inputs = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    held_out = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    stats = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    before = copy.deepcopy(student.state_dict())
    run = distill(student, teacher, inputs, 150, lr=1e-2, seed=0)
    trained = run.model
    assert run.backoffs == 0 and run.lr == 1e-2 and len(run.checks) == 11, "the start and ten checks"
    assert _kl(trained, teacher, held_out) < 0.5 * _kl(student, teacher, held_out)
    for k, v in stats.items():  # BN running statistics are the original's knowledge: never updated
        assert torch.equal(trained.state_dict()[k], v), k
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items()), "the input is left unchanged"
    assert not trained.training


def test_zero_steps_is_an_unchanged_copy_and_bad_steps_are_refused() -> None:
    teacher, student = _net(8), _net(4)
    x = torch.randn(4, 3, 8, 8)
    same = distill(student, teacher, x, 0).model
    with torch.no_grad():
        assert torch.equal(same(x), student(x))
    with pytest.raises(AutoDFPError, match="distill_steps"):
        distill(student, teacher, x, -1)
    with pytest.raises(AutoDFPError, match="distill_steps"):
        Config(distill_steps=-5)
    with pytest.raises(AutoDFPError, match="distill_lr"):
        Config(distill_lr=float("nan"))


def test_multi_output_models_are_matched_output_by_output() -> None:
    s = (torch.zeros(2, 3, 4), {"b": torch.ones(2, 5)})
    t = (torch.zeros(2, 3, 4), {"b": torch.ones(2, 5)})
    assert float(distillation_loss(s, t, 4.0)) == 0.0
    logits = torch.randn(6, 5)
    expected = (
        F.kl_div(
            F.log_softmax(logits / 2, 1), F.log_softmax(logits.flip(0) / 2, 1), log_target=True, reduction="batchmean"
        )
        * 4
    )
    assert torch.allclose(distillation_loss(logits, logits.flip(0), 2.0), expected)
    with pytest.raises(AutoDFPError, match="number or shape"):
        distillation_loss((torch.zeros(2, 3),), (torch.zeros(2, 4),), 4.0)


def test_prune_with_distillation_reports_it_and_meets_the_shapes(tiny_cnn: nn.Module) -> None:
    import autodfp

    net = tiny_cnn
    cfg = Config(synth_steps=3, calibration_inputs=8, refine_inputs=8, reward_inputs=8, distill_steps=5)
    plain = autodfp.prune(
        net, input_shape=(3, 16, 16), uniform=0.5, config=cfg.replace(distill_steps=0), progress=False
    )
    kd = autodfp.prune(net, input_shape=(3, 16, 16), uniform=0.5, config=cfg, progress=False)
    assert kd.report["distill_steps"] == 5 and "distill_steps" not in plain.report
    assert kd.report["distill_kept"] and kd.report["distill_loss_after"] < kd.report["distill_loss_before"]
    assert kd.report["macs_after"] == plain.report["macs_after"], "distillation edits weights, never shapes"
    assert kd.report["config"]["distill_steps"] == 5 and plain.report["config"]["distill_steps"] == 0
    # every setting, defaults included, with the effort preset's values resolved for this run
    assert kd.report["config"] == cfg.resolved(kd.input_shape).to_dict()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert not torch.equal(kd.model(x), plain.model(x))


def test_distill_inputs_add_a_pool_of_their_own(tiny_cnn: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """--distill-inputs N: the student also learns on N inputs distilled with a seed of their own."""
    import autodfp
    from autodfp import api
    from autodfp.compress import kd as kd_mod

    cfg = Config(synth_steps=2, calibration_inputs=8, refine_inputs=8, reward_inputs=8, distill_steps=2)
    pools: list[int] = []
    real = kd_mod.distill

    augments: list[bool] = []

    def spy(student, teacher, inputs, *args, **kwargs):
        pools.append(len(inputs))
        augments.append(kwargs["augment"])
        return real(student, teacher, inputs, *args, **kwargs)

    monkeypatch.setattr(kd_mod, "distill", spy)
    seeds: list[int] = []
    real_batch = api.Pipeline.batch

    def batch(self, seed, n, steps=None):
        seeds.append(seed)
        return real_batch(self, seed, n, steps)

    monkeypatch.setattr(api.Pipeline, "batch", batch)
    autodfp.prune(tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=cfg, progress=False)
    autodfp.prune(tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=cfg.replace(distill_inputs=6), progress=False)
    autodfp.prune(
        tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=cfg.replace(distill_augment=False), progress=False
    )
    assert pools == [16, 22, 16], "reward 8 + refinement 8, then 6 more"
    assert augments == [True, True, False], "Config.distill_augment reaches the training loop"
    assert Config().distill_augment_for((3, 32, 32)) and not Config().distill_augment_for((3, 224, 224))
    assert Config(distill_augment=True).distill_augment_for((3, 224, 224)), "an explicit choice wins"
    assert api.DISTILL_SEED_OFFSET in seeds and seeds.count(api.DISTILL_SEED_OFFSET) == 1
    with pytest.raises(autodfp.AutoDFPError, match="distill_inputs"):
        Config(distill_inputs=1)
    with pytest.raises(autodfp.AutoDFPError, match="distill_augment"):
        Config(distill_augment="no")  # type: ignore[arg-type]


def test_pool_losses_are_mean_losses_and_inf_when_not_finite() -> None:
    teacher, student = _net(16), _net(4)
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # batches of 4, 4 and 2 weigh by their size: the same as one batch of 10 (KL is a batch mean)
    (loss,) = pool_losses([student], teacher, x, batch_size=4)
    assert loss == pytest.approx(_kl(student, teacher, x), rel=1e-5)
    assert pool_losses([teacher], teacher, x) == [pytest.approx(0.0, abs=1e-6)]
    stats, s_stats = teacher[1].running_mean.clone(), student[1].running_mean.clone()
    teacher.train(), student.train()
    pool_losses([student], teacher, x)
    assert teacher.training and torch.equal(teacher[1].running_mean, stats), "scored in eval mode, flag restored"
    assert student.training and torch.equal(student[1].running_mean, s_stats), "the students too"
    teacher.eval(), student.eval()
    broken = copy.deepcopy(student)
    with torch.no_grad():
        broken[-1].bias.fill_(float("nan"))
    assert pool_losses([student, broken], teacher, x) == [
        pytest.approx(_kl(student, teacher, x), rel=1e-5),
        float("inf"),
    ]


def test_a_diverging_distillation_keeps_the_model_before_it(tiny_cnn: nn.Module) -> None:
    """A learning rate far too large ruins the student; the pipeline sees its loss rise and keeps the fit."""
    import autodfp

    cfg = Config(synth_steps=3, calibration_inputs=8, refine_inputs=8, reward_inputs=8, distill_steps=5)
    plain = autodfp.prune(
        tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=cfg.replace(distill_steps=0), progress=False
    )
    with pytest.warns(RuntimeWarning, match="distillation did not lower its loss"):
        kd = autodfp.prune(
            tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=cfg.replace(distill_lr=1e4), progress=False
        )
    assert kd.report["distill_kept"] is False
    assert kd.report["distill_backoffs"] == 2 and kd.report["distill_lr_final"] == pytest.approx(1e2)
    after = kd.report["distill_loss_after"]
    assert after is None or after >= kd.report["distill_loss_before"], "null when the loss is not finite"
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(kd.model(x), plain.model(x)), "the model before distillation, unchanged"


def test_a_divergence_is_rolled_back_and_the_learning_rate_divided() -> None:
    """A learning rate that ruins the student costs one check interval: the weights return to the
    best state and the run goes on at a tenth of the rate, so it still ends below where it began."""
    teacher, student = _net(16), _net(4)
    inputs = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    run = distill(student, teacher, inputs, 100, lr=10.0, seed=0)
    assert run.backoffs >= 1 and run.lr == pytest.approx(10.0 * 0.1**run.backoffs)
    start = run.checks[0][1]
    assert any(loss > DIVERGENCE * start for _, loss in run.checks), "lr 10 does diverge"
    assert _kl(run.model, teacher, inputs[:64]) == pytest.approx(min(loss for _, loss in run.checks), rel=1e-4)
    assert _kl(run.model, teacher, inputs[:64]) < start, "the best checked state, below the start"


def test_the_best_checked_state_is_returned_never_worse_than_the_start() -> None:
    teacher, student = _net(16), _net(4)
    inputs = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    run = distill(student, teacher, inputs, 6, lr=1e4, seed=0, batch_size=32)  # hopeless at any backoff
    assert run.backoffs == 2 and [s for s, _ in run.checks] == [0, 1, 2, 3, 4, 5, 6]
    with torch.no_grad():
        assert torch.equal(run.model(inputs), student(inputs)), "no check beat the start: the student itself"


def test_fresh_inputs_join_the_pool_at_evenly_spaced_steps() -> None:
    """fresh(student, i) is called fresh_batches times, on the student as trained so far (eval mode)."""
    teacher, student = _net(16), _net(4)
    inputs = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    calls: list[tuple[int, bool, float]] = []
    probe = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    def fresh(model: nn.Module, i: int) -> torch.Tensor:
        calls.append((i, model.training, _kl(model, teacher, probe)))
        return torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(10 + i))

    run = distill(student, teacher, inputs, 30, lr=1e-2, seed=0, fresh=fresh, fresh_batches=3, augment=False)
    assert [c[0] for c in calls] == [0, 1, 2] and not any(c[1] for c in calls)
    assert calls[2][2] < calls[0][2], "later batches are made for the student as it has been trained"
    plain = distill(student, teacher, inputs, 30, lr=1e-2, seed=0, augment=False)
    with torch.no_grad():
        assert not torch.equal(run.model(probe), plain.model(probe)), "the fresh inputs were trained on"
    with pytest.raises(AutoDFPError, match="fresh_batches"):
        distill(student, teacher, inputs, 5, fresh_batches=2)
    with pytest.raises(AutoDFPError, match="do not match"):
        distill(student, teacher, inputs, 5, fresh=lambda m, i: torch.zeros(2, 3, 4, 4), fresh_batches=1)
    with pytest.raises(AutoDFPError, match="distill_fresh"):
        Config(distill_fresh=-1)
    with pytest.raises(AutoDFPError, match="distill_compete"):
        Config(distill_compete=float("inf"))


def test_prune_with_fresh_inputs_synthesises_them_against_the_student(
    tiny_cnn: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--distill-fresh N: N batches, each synthesised with the competition term and a seed of its own."""
    import autodfp
    from autodfp import api
    from autodfp.synth import distill as synth

    cfg = Config(
        synth_steps=2, calibration_inputs=8, refine_inputs=8, reward_inputs=8, distill_steps=4, distill_fresh=2
    )
    seen: list[tuple[int, float, bool]] = []
    real = synth.distill

    def spy(model, input_shape, n=64, steps=None, lr=None, seed=0, *args, **kwargs):
        if kwargs.get("student") is not None:
            seen.append((seed, kwargs["compete"], kwargs["student"] is not model))
        return real(model, input_shape, 4, steps, lr, seed, *args, **kwargs)

    monkeypatch.setattr(synth, "distill", spy)
    out = autodfp.prune(tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=cfg, progress=False)
    assert [s[0] for s in seen] == [api.FRESH_SEED_OFFSET, api.FRESH_SEED_OFFSET + synth.CHUNK_SEED_STRIDE]
    assert all(s[1] == cfg.distill_compete and s[2] for s in seen)
    assert out.report["distill_fresh_inputs"] == 2 * 4


def _into(values: list[float]) -> Callable[[int, float], None]:
    return lambda _, v: values.append(v)


def test_micro_batches_take_the_whole_batch_step() -> None:
    teacher, student = _net(16), _net(4)
    inputs = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = []
    for size in (0, 3, 1):
        losses: list[float] = []
        run = distill(
            student, teacher, inputs, 20, lr=1e-2, batch_size=10, seed=0, micro_batch=size, callback=_into(losses)
        )
        runs.append((losses, run.model.state_dict()))
    (whole, state), rest = runs[0], runs[1:]
    assert whole[-1] < 0.8 * whole[0], "the student learns"
    for losses, other in rest:
        assert losses == pytest.approx(whole, rel=1e-3, abs=1e-6), "the same loss, step for step"
        for k, v in state.items():
            assert torch.allclose(other[k], v, rtol=1e-3, atol=1e-5), k


def test_detector_outputs_always_run_as_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    import autodfp.compress.kd as kd

    sizes: list[int] = []
    real = kd._backward

    def spy(
        student: nn.Module, teacher: nn.Module, x: torch.Tensor, temperature: float, size: int, *rest: object
    ) -> torch.Tensor:
        sizes.append(size)
        return real(student, teacher, x, temperature, size, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(kd, "_backward", spy)

    class Pair(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.net = _net(width)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.net(x)
            return y, y.sum(1)

    distill(Pair(4), Pair(16), torch.randn(12, 3, 8, 8), 2, batch_size=6, micro_batch=2)
    assert sizes == [6, 6], "a variance-normalised loss needs the whole batch"
    distill(_net(4), _net(16), torch.randn(12, 3, 8, 8), 2, batch_size=6, micro_batch=2)
    assert sizes[2:] == [2, 2]


def test_a_detectors_outputs_are_matched_by_their_kind() -> None:
    """Per-anchor class logits beside boxes are matched by KL per anchor; boxes and packed YOLO rows
    channel by channel, so a small-scale channel (objectness) weighs as much as a wide one."""
    from autodfp.compress.kd import channel_mse

    torch.manual_seed(0)
    scores, boxes = torch.randn(2, 7, 3), torch.randn(2, 7, 4)
    loss = distillation_loss((scores.flip(0), boxes), (scores, boxes), 2.0)
    expected = (
        F.kl_div(
            F.log_softmax(scores.flip(0).reshape(-1, 3) / 2, 1),
            F.log_softmax(scores.reshape(-1, 3) / 2, 1),
            log_target=True,
            reduction="batchmean",
        )
        * 4
        / 2
    )  # the mean with the boxes' zero
    assert torch.allclose(loss, expected)
    # a packed row (x, y, w, h, obj, cls...): the channels have scales 100 and 1
    rows = torch.randn(4, 50, 6)
    rows[..., :4] *= 100
    off_obj, off_box = rows.clone(), rows.clone()
    off_obj[..., 4] += 1.0  # one teacher-std of error on objectness
    off_box[..., 0] += 1.0  # 1/100 of a std on a box channel
    assert float(channel_mse(off_obj, rows)) > 50 * float(channel_mse(off_box, rows))
    single = distillation_loss((off_obj,), (rows,), 2.0)  # alone, a (N, A, 6) tensor is not class logits
    assert torch.allclose(single, channel_mse(off_obj, rows))


def test_feature_matching_pulls_the_tapped_layer_towards_the_teacher() -> None:
    teacher = _net(8)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.mul_(0.5)  # the tapped BN's input is off; the head can hide part of it
    x = torch.randn(64, 3, 8, 8)

    def feature_gap(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m[:2](x) - teacher[:2](x)).pow(2).mean())

    plain = distill(student, teacher, x, 30, lr=1e-2, seed=0).model
    matched = distill(student, teacher, x, 30, lr=1e-2, seed=0, features=["1"], feature_weight=1.0).model
    assert feature_gap(matched) < feature_gap(plain)
    assert not teacher[1]._forward_hooks, "the taps are removed after the run"
    same = distill(student, teacher, x, 5, lr=1e-2, seed=0, features=["1"], feature_weight=0.0).model
    again = distill(student, teacher, x, 5, lr=1e-2, seed=0).model
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), again.state_dict().values()))


def test_prune_taps_the_pruned_groups_consumers(tiny_cnn: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    import autodfp
    import autodfp.compress.kd as kd

    seen: dict[str, object] = {}
    real = kd.distill

    def spy(*args: object, **kw: object) -> object:
        seen.update(kw)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kd, "distill", spy)
    cfg = Config(synth_steps=2, calibration_inputs=8, refine_inputs=8, reward_inputs=8, distill_steps=2)
    autodfp.prune(
        tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=cfg.replace(distill_features=0.5), progress=False
    )
    names = dict(tiny_cnn.named_modules())
    assert seen["feature_weight"] == 0.5 and seen["features"], seen
    assert all(n in names for n in seen["features"])  # type: ignore[attr-defined]
    with pytest.raises(AutoDFPError, match="distill_features"):
        Config(distill_features=-1.0)
