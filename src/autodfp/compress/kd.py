"""Data-free knowledge distillation: an optional last stage after reconstruction and refinement.

Reconstruction and refinement are closed-form fits, one layer at a time. What they cannot undo is
the error that compounds across layers in ways a per-layer linear map does not express. A short
distillation fixes some of it: the pruned network (the student) is trained to reproduce the
original's outputs (the teacher) on the same synthetic inputs the pipeline already distilled from
the BN statistics. No real image is used.

Choices, and why:

- **BatchNorm layers stay in eval mode.** Their running statistics are the original network's
  knowledge of real data; letting synthetic batches overwrite them would undo the synthesis. Their
  affine parameters still train.
- **KL at a temperature** (Hinton et al. 2015) on class logits. A model with several outputs (a
  detector) is matched output by output: per-anchor class logits by KL, every other output (boxes,
  a YOLO head's packed rows, feature maps) by a squared error normalised channel by channel, so
  the objectness a detector thresholds weighs as much as its widest box channel.
- **Feature matching, optionally** (``features``): the outputs of the pruned groups' consumers,
  where the pruning's error first shows at full width, are matched too (FitNets-style, with no
  adapter: the widths agree there).
- **Random flips and shifts** of the few hundred synthetic inputs at every step, so the student
  learns the teacher's function around them rather than the inputs themselves. The pipeline uses
  them at small inputs only (:data:`autodfp.config.DISTILL_AUGMENT`): at 224 px they kept
  MobileNet-V1's loss on the unshifted inputs from falling at any learning rate.
- **Adam with a cosine decay**: a fixed small budget of steps, no schedule to tune per model.
- **Checks, rollback and backoff.** A learning rate that suits a CIFAR ResNet can ruin a 224-px
  ImageNet model in a few dozen steps (MobileNet-V1 put every input into one class). So the loss
  on a fixed probe of the pool (no augmentation) is measured :data:`CHECKS` times per run. A check
  far above the best so far (:data:`DIVERGENCE`) rolls the weights back to the best state and
  divides the learning rate by ten, at most :data:`MAX_BACKOFFS` times; the run always returns
  its best checked state. A bad learning rate thus costs one check interval, not the run.
- **Fresh inputs, optionally** (``fresh``): a fixed pool is learnt, not the teacher's function, once
  the student agrees with the teacher on it. Batches made during the run, each aimed at where the
  student still disagrees (Adaptive DeepInversion's competition, via the caller's ``fresh``), keep
  giving it something to learn; they cost a synthesis each, which is why they are opt-in.

On ResNet-20 at uniform 0.5 (refined, 56.7 %), 200 steps on 384 synthetic inputs reached 71.2 %
in a scratch run; see docs/RESULTS.md for the repository command and its numbers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from autodfp._micro import micro_batch_size
from autodfp._modes import eval_mode
from autodfp._outputs import flat_outputs
from autodfp.config import DEFAULTS
from autodfp.errors import PlanError

log = logging.getLogger(__name__)

#: probe-loss checks per run (at most one per step)
CHECKS = 10
#: a check whose probe loss exceeds the best so far by this factor (or is not finite) is a divergence
DIVERGENCE = 1.25
#: the learning rate's factor after a divergence, and how many times it may be applied
BACKOFF = 0.1
MAX_BACKOFFS = 2


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KL at ``temperature`` (times T², so gradients keep their scale) along the last
    dimension, averaged over every row: inputs of a classifier, anchors of a detector."""
    t = float(temperature)
    s, r = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    return F.kl_div(F.log_softmax(s / t, 1), F.log_softmax(r / t, 1), log_target=True, reduction="batchmean") * t * t


def channel_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error normalised channel by channel by the teacher's variance (floored at
    :data:`~autodfp.search.rewards.CHANNEL_VAR_FLOOR` of the mean channel's), averaged.

    A detector's box offsets, objectness and class scores share one tensor at very different
    scales; one variance for the whole tensor lets the widest channel drown the rest, so the
    objectness a detector thresholds would be learnt last. Per channel, each weighs alike.
    """
    from autodfp.search.rewards import CHANNEL_VAR_FLOOR, channel_rows

    s, r = channel_rows(student.float()), channel_rows(teacher.float())
    var = r.var(0, unbiased=False)
    var = var.clamp_min(max(CHANNEL_VAR_FLOOR * float(var.mean()), 1e-12))
    return ((s - r).pow(2) / var).mean()


def distillation_loss(
    student_out: Any, teacher_out: Any, temperature: float, kinds: Sequence[str] | None = None
) -> torch.Tensor:
    """The loss between a student's and the teacher's outputs, per output by its kind.

    A single ``(N, classes)`` tensor is a classifier's logits: KL at ``temperature``. A model with
    several outputs (a detector's class scores beside their boxes, a YOLO head's packed rows) is
    scored per output and averaged: ``logits`` outputs by KL along their last dimension (per
    anchor), every other output by :func:`channel_mse`. ``kinds`` as
    :func:`autodfp.search.rewards.guess_kinds` guesses them from the teacher's outputs by default.

    :raises PlanError: when the two do not match in number or shape of tensors
    """
    if isinstance(student_out, torch.Tensor) and student_out.dim() == 2:
        return _kl(student_out, teacher_out, temperature)
    from autodfp.search.rewards import guess_kinds

    s_list, t_list = flat_outputs(student_out), flat_outputs(teacher_out)
    if len(s_list) != len(t_list) or any(a.shape != b.shape for a, b in zip(s_list, t_list)):
        raise PlanError("the pruned model's outputs do not match the original's in number or shape")
    kinds = list(kinds) if kinds is not None else guess_kinds({str(i): t for i, t in enumerate(t_list)})
    losses = [
        _kl(s, t, temperature) if kind == "logits" else channel_mse(s, t) for s, t, kind in zip(s_list, t_list, kinds)
    ]
    return torch.stack(losses).mean()


class _Taps:
    """Forward hooks that keep the outputs of named modules, for feature matching.

    The student and the teacher share module names (surgery narrows tensors in place, it never
    renames), so a consumer's output is found in both by one name.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._keep(n)) for n in names if n in modules]

    def _keep(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                self.outputs[name] = out

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _feature_loss(student: _Taps, teacher: _Taps, names: Sequence[str]) -> torch.Tensor | None:
    """:func:`channel_mse` averaged over the tapped layers whose outputs match in shape."""
    terms = [
        channel_mse(student.outputs[n], teacher.outputs[n].detach())
        for n in names
        if n in student.outputs and n in teacher.outputs and student.outputs[n].shape == teacher.outputs[n].shape
    ]
    return torch.stack(terms).mean() if terms else None


class _Features(NamedTuple):
    """Feature matching for one run: the layers, their weight, and the taps on both networks."""

    names: Sequence[str]
    weight: float
    student: _Taps
    teacher: _Taps


def _backward(
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    temperature: float,
    size: int,
    features: _Features | None = None,
) -> torch.Tensor:
    """The step's loss on ``x``, its gradient accumulated into the student's parameters.

    In micro-batches of ``size`` (one part when that is the whole batch): each part's KL, weighted
    by its share of the batch, sums to the batch's mean KL, so loss and gradient are the whole
    batch's (both networks are in eval mode, so no layer couples the inputs of a batch). A single
    part's weight is exactly 1, so an unsplit step computes what it did before splits existed.
    Feature matching (``features``) adds its weighted term per part; its per-channel variances are
    the part's, so a split step's feature term is close to, not exactly, the whole batch's.
    """
    n = int(x.shape[0])
    total = torch.zeros((), device=x.device)
    for part in x.split(size):
        with torch.no_grad():
            target = teacher(part)
        loss = distillation_loss(student(part), target, temperature)
        if features is not None:
            matched = _feature_loss(features.student, features.teacher, features.names)
            if matched is not None:
                loss = loss + features.weight * matched
        loss = loss * (part.shape[0] / n)
        loss.backward()
        total += loss.detach()
    return total


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random horizontal flip per input and one random shift of up to a tenth of the size."""
    if x.dim() != 4:
        return x
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    limit = max(1, int(x.shape[-1]) // 10)
    dx, dy = (int(v) for v in torch.randint(-limit, limit + 1, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


class Distilled(NamedTuple):
    """What :func:`distill` returns: the trained copy and how its learning rate fared."""

    #: the best checked state, in eval mode, on the student's original device
    model: nn.Module
    #: the learning rate the run ended with (``lr`` times :data:`BACKOFF` per divergence)
    lr: float
    #: divergences met, each rolled back
    backoffs: int
    #: ``(step, probe loss)`` of every check, the start (step 0) first
    checks: list[tuple[int, float]]
    #: fresh inputs made during the run and trained on (``fresh``)
    fresh_inputs: int = 0


def distill(
    student: nn.Module,
    teacher: nn.Module,
    inputs: torch.Tensor,
    steps: int,
    *,
    lr: float = DEFAULTS.distill_lr,
    temperature: float = DEFAULTS.distill_temperature,
    batch_size: int = DEFAULTS.distill_batch_size,
    augment: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
    fresh: Callable[[nn.Module, int], torch.Tensor] | None = None,
    fresh_batches: int = 0,
    micro_batch: int | None = None,
    features: Sequence[str] = (),
    feature_weight: float = 0.0,
) -> Distilled:
    """A copy of ``student`` trained for ``steps`` steps to match ``teacher`` on ``inputs``.

    :param student: the pruned network (not modified; a trained copy is returned)
    :param teacher: the original network (not modified)
    :param inputs: synthetic inputs, (N, *input_shape); never real data in the pipeline
    :param steps: optimisation steps (0 returns an unchanged copy)
    :param lr: Adam's first learning rate, decayed to 0 by a cosine schedule (and divided by ten
        after each divergence, for the steps that remain)
    :param temperature: softmax temperature of the KL term
    :param batch_size: inputs per step, drawn with replacement; also the size of the probe (the
        pool's first inputs) whose loss the checks measure
    :param augment: random flips and shifts of the inputs at every step
    :param seed: seeds the draws and the augmentation
    :param device: where the training runs (both networks' copies live there); CPU by default
    :param progress: a progress bar with an ETA on stderr
    :param callback: ``callback(step, loss)`` after every step
    :param fresh: ``fresh(student, i)`` makes the ``i``-th batch of fresh inputs for the student as it
        is at that step (in eval mode; it must not be modified); they join the draws from then on. The
        probe stays the pool's first inputs, so checks compare like with like.
    :param fresh_batches: how many times ``fresh`` is called, at evenly spaced steps from the first
    :param micro_batch: inputs per forward pass of a step on class logits (0: the whole batch;
        ``None``: by input size on a CPU, :func:`autodfp._micro.micro_batch_size`). The speed
        changes, not the step: its loss and gradient are the whole batch's. Other outputs (a
        detector's, normalised by the whole batch's variance) always run whole.
    :param features: module names whose outputs the student also learns from the teacher's
        (:func:`channel_mse`, where the two match in shape): the pipeline passes the consumers of
        the pruned groups, the first places where the pruning's error shows at full width
    :param feature_weight: the weight of that term (0: off); the checks and the pool loss stay on
        the outputs alone, so runs with and without it are compared on one scale
    :return: the best checked copy (never worse on the probe than the student), its learning rate
        at the end, the divergences rolled back, and every check's probe loss
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise PlanError(f"distill_steps must be a non-negative integer, got {steps!r}")
    if inputs.dim() < 2 or inputs.shape[0] == 0:
        raise PlanError("distillation needs a non-empty batch of inputs")
    if isinstance(fresh_batches, bool) or not isinstance(fresh_batches, int) or fresh_batches < 0:
        raise PlanError(f"fresh_batches must be a non-negative integer, got {fresh_batches!r}")
    if fresh_batches and fresh is None:
        raise PlanError("fresh_batches needs a fresh() to make them")
    home = next((p.device for p in student.parameters()), torch.device("cpu"))
    dev = torch.device("cpu") if device is None else torch.device(device)
    trained = copy.deepcopy(student).to(dev).eval()
    if steps == 0:
        return Distilled(trained.to(home), float(lr), 0, [], 0)
    frozen_teacher = teacher if next((p.device for p in teacher.parameters()), dev) == dev else None
    frozen_teacher = frozen_teacher or copy.deepcopy(teacher).to(dev)
    frozen_teacher.eval()
    params = [p for p in trained.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    probe = inputs[: min(batch_size, inputs.shape[0])].to(dev)
    pooled = inputs.shape[0]
    with torch.no_grad():
        probe_target = frozen_teacher(probe)
    # class logits: a KL averaged over inputs, which micro-batches add up to exactly
    splittable = isinstance(probe_target, torch.Tensor) and probe_target.dim() == 2

    def probe_loss() -> float:
        with torch.no_grad():
            value = float(distillation_loss(trained(probe), probe_target, temperature))
        return value if math.isfinite(value) else math.inf

    def optimiser(rate: float, remaining: int) -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.Adam(params, lr=rate)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, remaining))

    rate, backoffs = float(lr), 0
    best = probe_loss()
    checks = [(0, best)]
    best_state = copy.deepcopy(trained.state_dict())
    every = max(1, math.ceil(steps / CHECKS))
    opt, sched = optimiser(rate, steps)
    gen = torch.Generator().manual_seed(int(seed))
    # step -> indices of the fresh batches made before it (several when there are more than steps)
    fresh_at: dict[int, list[int]] = {}
    for i in range(fresh_batches):
        fresh_at.setdefault(i * steps // fresh_batches, []).append(i)
    from autodfp._progress import progress_bar

    bar = progress_bar(total=steps, desc="distillation", unit="step", enabled=progress)
    taps: _Features | None = None
    if feature_weight and features:
        taps = _Features(
            list(features), float(feature_weight), _Taps(trained, features), _Taps(frozen_teacher, features)
        )
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            for step in range(steps):
                for i in fresh_at.get(step, []):
                    assert fresh is not None  # checked above
                    with eval_mode(trained):
                        new = fresh(trained, i)
                    if tuple(new.shape[1:]) != tuple(inputs.shape[1:]):
                        raise PlanError(
                            f"fresh inputs {tuple(new.shape)} do not match the pool's {tuple(inputs.shape)}"
                        )
                    inputs = torch.cat([inputs, new.to(inputs.device, inputs.dtype)])
                idx = torch.randint(0, inputs.shape[0], (min(batch_size, inputs.shape[0] * 4),), generator=gen)
                x = inputs[idx]
                if augment:
                    x = _augment(x, gen)
                x = x.to(dev)
                opt.zero_grad(set_to_none=True)
                size = micro_batch_size(x, dev, micro_batch) if splittable else x.shape[0]
                loss = _backward(trained, frozen_teacher, x, temperature, size, taps)
                opt.step()
                sched.step()
                bar.update(1)
                if callback is not None:
                    callback(step, float(loss.detach()))
                done = step + 1
                if done % every and done != steps:
                    continue
                current = probe_loss()
                checks.append((done, current))
                if current < best:
                    best, best_state = current, copy.deepcopy(trained.state_dict())
                elif current > best * DIVERGENCE and backoffs < MAX_BACKOFFS and done < steps:
                    trained.load_state_dict(best_state)
                    rate, backoffs = rate * BACKOFF, backoffs + 1
                    opt, sched = optimiser(rate, steps - done)
                    log.info(
                        f"distillation diverging at step {done} (probe loss {best:.4g} → {current:.4g}); "
                        f"rolled back, learning rate now {rate:.2g}"
                    )
    finally:
        bar.close()
        if taps is not None:
            taps.student.close()
            taps.teacher.close()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    trained.load_state_dict(best_state)
    return Distilled(trained.eval().to(home), rate, backoffs, checks, inputs.shape[0] - pooled)


def pool_losses(
    students: Sequence[nn.Module],
    teacher: nn.Module,
    inputs: torch.Tensor,
    *,
    temperature: float = DEFAULTS.distill_temperature,
    batch_size: int = DEFAULTS.distill_batch_size,
) -> list[float]:
    """The distillation loss of each student over the whole pool, without augmentation, per input.

    Distillation minimises this very quantity; a run that ends above where it started diverged (the
    learning rate too large for the model), so the caller can keep the model it started from. The
    teacher runs once per batch for all the students (the models before and after distillation).

    :param students: the models scored (not modified), on one device with the teacher
    :param teacher: the original network (not modified)
    :param inputs: the pool distillation trained on
    :param temperature: as for :func:`distill`
    :param batch_size: inputs per forward pass
    :return: each student's mean loss, ``inf`` where it is not finite
    """
    dev = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    totals, count = [0.0] * len(students), 0
    with contextlib.ExitStack() as stack, torch.no_grad():
        for m in (teacher, *students):  # eval: scoring must not move BN statistics
            stack.enter_context(eval_mode(m))
        for i in range(0, inputs.shape[0], batch_size):
            x = inputs[i : i + batch_size].to(dev)
            target = teacher(x)
            for j, student in enumerate(students):
                totals[j] += float(distillation_loss(student(x), target, temperature)) * x.shape[0]
            count += x.shape[0]
    means = [t / max(count, 1) for t in totals]
    return [m if math.isfinite(m) else math.inf for m in means]


__all__ = ["Distilled", "distill", "distillation_loss", "pool_losses"]
