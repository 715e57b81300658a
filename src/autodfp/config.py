"""Every default of the pipeline, in one place.

The library, the CLI and the benchmarks all read their defaults from :class:`Config`; the CLI
builds the same object from its flags, so the two cannot disagree. Values that depend on the input
size (synthesis steps, batch sizes) are tables keyed by :func:`size_class`, resolved by the
``*_for(shape)`` methods once the model's input shape is known.

Why the values are what they are is recorded next to each one, with the measurement in
docs/RESULTS.md that chose it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autodfp.errors import ConfigError, PlanError

#: Inputs of at most this many pixels (per channel) are "small" (CIFAR-size); above, "large"
#: (ImageNet-size), where one forward pass costs ~50x more on a CPU.
SMALL_INPUT_PIXELS = 64 * 64


def size_class(input_shape: Sequence[int]) -> str:
    """``"small"`` (at most :data:`SMALL_INPUT_PIXELS` per channel) or ``"large"``."""
    pixels = 1
    for s in tuple(input_shape)[1:]:
        pixels *= int(s)
    return "small" if pixels <= SMALL_INPUT_PIXELS else "large"


#: (steps, Adam learning rate) of each synthesis method, by input size. For *ranking*, 50 to 300
#: steps give the same Spearman rho on ResNet-56; refinement fits weights to the batch and needs
#: more at 224 px (40 steps: 40.54 %, 200 steps: 51.54 % for refined uniform 0.8 on MobileNet-V1).
SYNTH_SETTINGS: Mapping[str, Mapping[str, tuple[int, float]]] = {
    "bn": {"small": (100, 0.2), "large": (200, 0.2)},
    "deepinversion": {"small": (100, 0.2), "large": (100, 0.2)},
    "inversion": {"small": (100, 0.1), "large": (60, 0.1)},
    "noise": {"small": (0, 0.0), "large": (0, 0.0)},
}

#: Distillation steps of the reward's batch, as a share of the method's steps. A reward ranks plans
#: and a ranking settles sooner than a fit does: on ResNet-56 50 to 300 steps gave the same proxy
#: Spearman rho (and 40 steps sufficed on MobileNet-V1), while a fit's batch moves top-1
#: (``--synth-steps 50`` for every batch instead of 100: 57.42 → 53.79 % for ResNet-20 at uniform
#: 0.5, docs/RESULTS.md). A MobileNet-V1 search on a reward batch of 110 full-size steps, instead of
#: 200 with a half-size start, ended at the same top-1 (55.31 against 55.46 %). So at 224 px too the
#: reward's batch takes half the steps (docs/RESULTS.md, "A first MobileNet-V1 prune").
RANKING_STEPS_SCALE: Mapping[str, float] = {"small": 0.5, "large": 0.5}

#: Steps of the reward's batch where it only picks between a handful of candidates (a uniform
#: prune's dims ridge and final step), as a share of the method's steps. On MobileNet-V1 a batch of
#: 50 steps instead of 100 cost 93 s instead of 176 and picked the same ridge and step; a 300-episode
#: search that ranked its plans on such a batch ended 2.7 points below the lowest of three on
#: batches of 100 to 200 steps, so a search keeps :data:`RANKING_STEPS_SCALE` (docs/RESULTS.md,
#: "A quarter-size start").
SELECT_STEPS_SCALE: Mapping[str, float] = {"small": 0.5, "large": 0.25}

#: Share of a batch's synthesis steps spent at half the height and width before the batch is
#: upsampled and finished at full size (DeepInversion's multi-resolution schedule). On MobileNet-V1
#: (224 px, one 64-input chunk, 200 steps, 2-core CPU) 0.75 cost 0.48x the time of all steps at full
#: size, and refined uniform 0.8 reached 52.69 % on it against 51.46 % (and 50.00 % for 110 full-size
#: steps, the same time); docs/RESULTS.md. Small inputs are never halved
#: (:data:`autodfp.synth.distill.LOW_RES_MIN_SIDE`).
LOW_RES_SHARE: Mapping[str, float] = {"small": 0.0, "large": 0.75}

#: Reduced sizes those steps are shared by: 1 runs them all at half size; 2 runs the first half of
#: them at a quarter of the height and width, then the rest at half size. On MobileNet-V1 (one
#: 64-input chunk, 200 steps, 0.75 share, 2-core CPU) two levels left the batch as close to the BN
#: statistics at full size as one (BN loss 7.82 against 7.99) in 243.6 s instead of 304.7
#: (docs/RESULTS.md, "A quarter-size start"). A size under
#: :data:`autodfp.synth.distill.LOW_RES_MIN_SIDE` a side is left out.
LOW_RES_LEVELS: Mapping[str, int] = {"small": 1, "large": 2}

#: Input pixels (per channel) per micro-batch of a synthesis or distillation step on a CPU
#: (:mod:`autodfp._micro`), for batches that hold at least :data:`MICRO_BATCH_MIN_PARTS` of them.
#: The step's loss and gradient are the whole batch's either way; only the speed differs. On
#: MobileNet-V1 (2-core CPU, ``benchmarks/step_cost.py``, docs/RESULTS.md) 64 inputs at 224 px in
#: eights took a synthesis step from 3.97 to 3.04 s and a distillation step from 4.41 to 2.84 s. At
#: 112 px a split in two or four gained nothing in a probe, so fewer than four parts run whole;
#: CIFAR batches (32 px) are never split.
MICRO_BATCH_PIXELS = 8 * 224 * 224
MICRO_BATCH_MIN_PARTS = 4

#: Synthetic inputs the reward compares on. On ResNet-56 at 0.5 MACs the proxy check's rho rises
#: from 0.873 with 64 inputs to 0.896 with 256 (0.912 with refinement); at 224 px each input costs
#: ~50x more to distil and to score.
REWARD_INPUTS: Mapping[str, int] = {"small": 256, "large": 64}

#: Synthetic inputs the final refinement fits on. On MobileNet-V1 256 instead of 64 took refined
#: uniform 0.8 from 51.54 % to 54.38 %; 128 then did as well as 256 (55.00 against 54.85 %, the same
#: batches), for half the one-off distillation (docs/RESULTS.md, "A first MobileNet-V1 prune").
REFINE_INPUTS: Mapping[str, int] = {"small": 64, "large": 128}

#: Random flips and shifts of the distillation's inputs. At 32 px they let ResNet-20 learn from a
#: few hundred inputs for thousands of steps (docs/RESULTS.md). At 224 px they kept MobileNet-V1's
#: distillation from lowering its loss on the unshifted pool at any learning rate down to 1e-5 (the
#: model before it was kept), while the same run without them lowered it from 0.868 to 0.647.
DISTILL_AUGMENT: Mapping[str, bool] = {"small": True, "large": False}

#: Evaluation batch size: small batches are several times faster per image for 224-px CNNs on a
#: CPU (they stay cache-resident).
EVAL_BATCH: Mapping[str, int] = {"small": 256, "large": 8}

#: How much work a run spends, by preset (``Config(effort=...)``, ``--effort``). Each value is
#: used only where the field is left unset (``None``); an explicit field or flag always wins.
#:
#: - ``fast``: the pipeline as it was before presets (no distillation): minutes on a CPU.
#: - ``balanced`` (the default): data-free distillation on a larger synthetic pool after the
#:   refinement, and a shorter search. On CIFAR ResNets distillation was the one stage that paid
#:   tens of points (ResNet-20 at half the MACs: 61.26 -> 80.43 % with 2000 steps on 512 more
#:   inputs; a held-out depth 59.00 -> 80.24 % on the uniform plan), against a point or two for the
#:   search's last 200 episodes, so the time goes to distillation. At 224 px a distillation step costs
#:   ~5 s on a 2-core CPU (MobileNet-V1: +0.8 points per 500 steps, 41 min), so on a CPU large
#:   inputs are not distilled by default and keep the full search; on a GPU they are distilled.
#:   Large inputs are synthesised at full size from the first step (``fast`` starts at a quarter
#:   and half size): on MobileNet-V1's search 57.08 against 55.3-56.5 % (one search each, within
#:   the searches' spread), for a first run of ~30 min instead of ~13 on a 2-core CPU.
#: - ``best``: for a run left alone: the full search, twice the distillation, full-size synthesis.
#:
#: Tables are keyed by :func:`size_class`, and ``large_cpu`` is a large input without a GPU.
#: docs/RESULTS.md, "Effort presets", has the measurements.
EFFORTS = ("fast", "balanced", "best")
EFFORT_PRESETS: Mapping[str, Mapping[str, Any]] = {
    "fast": {
        "episodes": {"small": 300, "large": 300, "large_cpu": 300},
        "distill_steps": {"small": 0, "large": 0, "large_cpu": 0},
        "distill_inputs": {"small": 0, "large": 0, "large_cpu": 0},
        "synth_low_res": {},
    },
    "balanced": {
        "episodes": {"small": 100, "large": 100, "large_cpu": 300},
        "distill_steps": {"small": 1500, "large": 2000, "large_cpu": 0},
        "distill_inputs": {"small": 256, "large": 512, "large_cpu": 0},
        "synth_low_res": {"large": 0.0, "large_cpu": 0.0},
    },
    "best": {
        "episodes": {"small": 300, "large": 300, "large_cpu": 300},
        "distill_steps": {"small": 4000, "large": 4000, "large_cpu": 1000},
        "distill_inputs": {"small": 1024, "large": 1024, "large_cpu": 256},
        "synth_low_res": {"large": 0.0, "large_cpu": 0.0},
    },
}


def default_effort() -> str:
    """The effort of a ``Config()`` that names none: ``balanced``, or ``$AUTODFP_EFFORT`` (a machine
    that runs many short jobs, a CI job, can make ``fast`` its default without a flag on every call)."""
    return os.environ.get("AUTODFP_EFFORT", "").strip() or "balanced"


SYNTH_METHODS = ("auto", "bn", "deepinversion", "inversion", "noise")
CORR_SOURCES = ("auto", "geometry", "calibration")
SEARCH_METHODS = ("sac", "uniform", "random", "evolution")
REWARD_MEASURES = ("kl", "top1", "mse")


@dataclass(frozen=True)
class Config:
    """All knobs of :func:`autodfp.prune`, with their defaults.

    Build one with keyword overrides, ``Config(refine_ridge=0.1)``, or derive one with
    :meth:`replace`. Every field is validated on construction, so a bad value fails before any
    minutes of work.

    :param coupled: also prune coupled groups (residual-stream widths: ResNet stages, inverted-residual
        block outputs), compensating every consumer on measured stream moments; off by default
        until measured (docs/RESULTS.md, "Coupled groups")
    :param reparameterize: fold training-time branches (RepVGG, MobileOne: modules with a
        ``reparameterize()`` or ``switch_to_deploy()`` method) into single convs before pruning,
        checked to compute the same (:mod:`autodfp.models.reparam`); the pruned model is the folded one
    :param criterion: channel selection (``l1``, ``l2``, ``cluster``, ``random`` or a registered one)
    :param strategy: reconstruction (``none``, ``mean``, ``nm``, ``autodfp``, ``lsq`` or a registered
        one). ``lsq`` is the default: on ResNet-56 it beats the paper's ``autodfp`` merge at every
        ratio (docs/RESULTS.md, refinement bench).
    :param strength: merge strength λ in [0, 1] for ``autodfp`` (``None``: the strategy's own default)
    :param cluster_eps_quantile: DBSCAN radius per layer, the q-quantile of that layer's
        nearest-neighbour channel distances (never below the absolute default 0.15); ``None``
        keeps the absolute radius, which clusters no channel of a trained layer (docs/RESULTS.md)
    :param corr: where ``lsq`` gets its channel correlations: ``geometry`` (filters), ``calibration``
        (synthetic inputs) or ``auto`` (calibration whenever a synthetic batch is made anyway: on
        ResNet-56 it beats geometry by 13 points at uniform 0.5)
    :param synth_method: synthetic-input method (``auto`` = ZeroQ for BN models, inversion otherwise)
    :param synth_steps: optimisation steps per synthetic batch (``None``: :data:`SYNTH_SETTINGS`)
    :param synth_low_res: share of those steps run at half the input's height and width (a step
        there cost about 0.31 of a full one on MobileNet-V1) before the batch is upsampled and
        finished at full size (``None``: :data:`LOW_RES_SHARE`)
    :param synth_low_res_levels: reduced sizes those steps are shared by, a quarter of the size
        before the half (``None``: :data:`LOW_RES_LEVELS`; 1: half size only)
    :param calibration_inputs: synthetic inputs for measured correlations and BN-free moments: a
        prefix of the refinement batch, so a first prune distils no batch of its own for them
    :param reward_inputs: synthetic inputs of the reward (``None``: :data:`REWARD_INPUTS`)
    :param refine_inputs: synthetic inputs of the final refinement (``None``: :data:`REFINE_INPUTS`)
    :param search_refine_inputs: a search refines each candidate on the first this many refinement
        inputs (at 224 px, the first distilled chunk); the chosen plan gets them all
    :param select_inputs: reward inputs the final choice is scored on when no search needs the
        whole reward batch (a prefix of it, never more than ``reward_inputs``): a handful of
        candidates is told apart by fewer inputs than the hundreds of plans a search ranks
    :param refine_seed_offset: the refinement and calibration batch uses seed ``seed + offset``,
        apart from the reward's: a fit scored on the very inputs it was fitted to flatters the
        plans that overfit
    :param refine: re-fit every consumer in forward order on synthetic inputs (drift correction)
    :param refine_data: a directory of real unlabelled images that the calibration, the refinement
        (and ``--distill``) fit on instead of synthetic inputs. Not data-free: it measures the
        ceiling that better synthesis could reach, or serves users who hold some unlabelled images
    :param refine_ridge: ridge of the refinement fits, relative to the kept variance
    :param refine_dims_ridge: extra ridge × kept channels / positions; ``None``: the final
        refinement tries :attr:`dims_ridge_grid` and keeps the one the reward scores best
    :param search_dims_ridge: the dims ridge searches, bench and proxy-check score candidates with
    :param dims_ridge_grid: candidates of the final dims-ridge selection
    :param final_choice: the final step also scores the plan without refinement and without any
        compensation, and keeps whichever the reward rates best: on some blocks (SE gates) a fit
        can do harm that no ridge undoes
    :param final_choice_per_group: after that global choice, each group in turn also tries its
        other variants (refined, unrefined, uncompensated) and keeps one where the held-apart
        score rises: a fit's harm is often local (one detector head, one SE chain) while the fits
        elsewhere pay (:mod:`autodfp.compress.final`; at most two reward calls per group). Off by
        default: on ResNet-56's searched plan it raised the data-free score (-0.559 -> -0.395) and
        cost 3.7 points of top-1 (84.96 -> 81.22 %, docs/RESULTS.md), so the score does not yet
        say which single-group switches pay
    :param refine_max_positions: spatial positions sampled per layer for a refinement fit
    :param reward_measure: agreement measure of the synthetic reward (``kl``, ``top1``, ``mse``)
    :param reward_tail: for models with several outputs (detectors), compare each output channel by
        channel with a second term on each channel's top ``reward_tail`` share of positions, where a
        detector's thresholds act (:func:`autodfp.search.rewards.tail_nmse`); ``None``: a plain
        normalised MSE. Opt-in: on the slim face detector at 0.8x MACs (0.01) it moved the final
        choice to the uncompensated plan, mAP@0.5 0.914 -> 0.767
    :param reward_temperature: softmax temperature of the KL reward (T=2 ranked best)
    :param unlabeled_reward_inputs: real unlabelled images the ``unlabeled:`` reward uses (at most)
    :param labeled_reward_inputs: labelled images the ``labeled:`` reward uses (at most)
    :param search: ``sac`` (the agent), ``uniform``, ``random`` or ``evolution`` (mutating the best plans
        found so far: is the agent worth its cost?)
    :param episodes: search episodes (SAC, random, evolution), one reward call each
    :param warmup: random-action episodes before SAC learns, and evolution's population (``None``:
        ``min(warmup_cap, episodes // 4)``), so both start from the same random episodes
    :param warmup_cap: upper bound of the default warm-up
    :param r_min: smallest preserved ratio per group (``None``: chosen from the budget, at most 0.3)
    :param tol: the budget tolerance: plans land within ``±tol`` of the target MACs ratio
    :param checkpoint_every: a resumable search checkpoint every this many episodes
    :param distill_steps: steps of data-free knowledge distillation after refinement (0: off); the
        pruned model learns the original's outputs on the pipeline's synthetic inputs
        (:mod:`autodfp.compress.kd`)
    :param distill_lr: Adam's first learning rate for the distillation, decayed by a cosine
        schedule and divided by ten whenever the run diverges (:mod:`autodfp.compress.kd`)
    :param distill_augment: random flips and shifts of the distillation's inputs at every step
        (``None``: :data:`DISTILL_AUGMENT` by input size)
    :param distill_temperature: softmax temperature of the distillation's KL term
    :param distill_batch_size: synthetic inputs per distillation step
    :param distill_inputs: extra synthetic inputs, distilled for the distillation alone (seed
        ``seed + 2``, chunks of 64), added to the pipeline's reward and refinement batches: a
        larger, more diverse pool for the student to learn from (0: the pipeline's batches only)
    :param distill_fresh: batches of fresh inputs (64 each) synthesised *during* the distillation,
        at evenly spaced steps, against the student as it then is: the BN objective plus
        ``distill_compete`` × a term that rewards the student's disagreement with the original
        (Adaptive DeepInversion). Never cached, since each depends on the student (0: none)
    :param distill_compete: weight of that competition term (0: fresh inputs from the BN
        objective alone). On ResNet-20 at uniform 0.5 (300 steps, 4 fresh batches) 0.03 gave 71.68 %,
        0 gave 70.99 % and 1 gave 69.91 %; 256 static inputs (``distill_inputs``) gave 73.75 %
        (docs/RESULTS.md), so fresh inputs are opt-in
    :param distill_features: weight of feature matching in the distillation: the outputs of the
        pruned groups' consumers (after their BN) learn the original's, normalised per channel (0:
        outputs only). Their widths agree with the original's, so no adapter is needed
    :param eval_batch_size: evaluation batch size (``None``: :data:`EVAL_BATCH`)
    :param workers: pieces of work at once (:mod:`autodfp.distributed`). 1, the default, runs
        everything in this process, as without Ray. More starts a local Ray instance with that many
        workers (``pip install 'autodfp[distributed]'``): the chunks of a synthetic batch are
        distilled on them, and a random or evolution search scores that many plans at once. Where
        each worker has cores of its own that pays up to the chunks of a batch (4 for a CIFAR reward
        batch); on 2 cores 2 workers distilled 1.17x as fast and a short search ran no faster
        (docs/RESULTS.md, "Ray: workers for synthesis and the search").
        Synthesis and random search give the same result for any count; evolution's plan depends on
        it (it breeds a generation of ``workers`` children from the same archive), so the same seed
        and the same count give the same plan. SAC still plays one episode at a time
    :param ray_address: join a running Ray cluster instead of starting one: ``"auto"`` (the
        cluster this machine belongs to) or ``"HOST:PORT"`` of its head (``ray start --head``);
        ``workers`` is then the number of workers used on it. The cluster is left running
    """

    #: ``fast``, ``balanced`` or ``best`` (:data:`EFFORT_PRESETS`): fills the fields left ``None``
    effort: str = field(default_factory=default_effort)
    # channel selection and reconstruction
    criterion: str = "l1"
    strategy: str = "lsq"
    coupled: bool = False
    reparameterize: bool = False
    strength: float | None = None
    cluster_eps_quantile: float | None = None
    corr: str = "auto"
    # synthetic inputs
    synth_method: str = "auto"
    synth_steps: int | None = None
    synth_low_res: float | None = None
    synth_low_res_levels: int | None = None
    calibration_inputs: int = 64
    reward_inputs: int | None = None
    refine_inputs: int | None = None
    search_refine_inputs: int = 64
    select_inputs: int = 64
    refine_seed_offset: int = 1
    # refinement
    refine: bool = True
    refine_data: str | None = None
    refine_ridge: float = 1e-2
    refine_dims_ridge: float | None = None
    search_dims_ridge: float = 3.0
    dims_ridge_grid: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
    final_choice: bool = True
    final_choice_per_group: bool = False
    refine_max_positions: int = 32768
    # reward
    reward_measure: str = "kl"
    reward_tail: float | None = None
    reward_temperature: float = 2.0
    unlabeled_reward_inputs: int = 256
    labeled_reward_inputs: int = 512
    # search
    search: str = "sac"
    episodes: int | None = None
    warmup: int | None = None
    warmup_cap: int = 50
    r_min: float | None = None
    tol: float = 0.01
    checkpoint_every: int = 25
    # data-free distillation (optional last stage)
    distill_steps: int | None = None
    distill_lr: float = 1e-3
    distill_augment: bool | None = None
    distill_temperature: float = 4.0
    distill_batch_size: int = 64
    distill_inputs: int | None = None
    distill_fresh: int = 0
    distill_compete: float = 0.03
    distill_features: float = 0.0
    # evaluation
    eval_batch_size: int | None = None
    #: SAC hyper-parameters (see :data:`autodfp.search.driver.SAC_DEFAULTS`); overrides only
    sac: Mapping[str, Any] = field(default_factory=dict)
    # scale-out on Ray (autodfp.distributed): 1 and None keep every stage in this process
    workers: int = 1
    ray_address: str | None = None

    def __post_init__(self) -> None:
        from autodfp.compress.criteria import criterion_names
        from autodfp.compress.reconstruct import strategy_names

        if self.effort not in EFFORTS and self.effort == os.environ.get("AUTODFP_EFFORT", "").strip():
            raise PlanError(
                f"unknown effort {_shown(self.effort)} (from $AUTODFP_EFFORT); choose from {', '.join(EFFORTS)}"
            )
        _choice("effort", self.effort, EFFORTS)
        _choice("criterion", self.criterion, criterion_names())
        _choice("strategy", self.strategy, strategy_names())
        _choice("corr", self.corr, CORR_SOURCES)
        _choice("synth_method", self.synth_method, SYNTH_METHODS)
        _choice("search", self.search, SEARCH_METHODS)
        _choice("reward_measure", self.reward_measure, REWARD_MEASURES)
        if self.strength is not None:
            _real("strength", self.strength, 0.0, 1.0)
        if self.cluster_eps_quantile is not None:
            _real("cluster_eps_quantile", self.cluster_eps_quantile, 0.0, 1.0)
        _real("refine_ridge", self.refine_ridge, 0.0)
        if self.refine_dims_ridge is not None:
            _real("refine_dims_ridge", self.refine_dims_ridge, 0.0)
        _real("search_dims_ridge", self.search_dims_ridge, 0.0)
        if not isinstance(self.dims_ridge_grid, (tuple, list)) or not self.dims_ridge_grid:
            raise PlanError(f"dims_ridge_grid must be a non-empty tuple of numbers, got {_shown(self.dims_ridge_grid)}")
        for v in self.dims_ridge_grid:
            _real("dims_ridge_grid", v, 0.0)
        _real("reward_temperature", self.reward_temperature, 0.0, strict_low=True)
        if self.reward_tail is not None:
            _real("reward_tail", self.reward_tail, 0.0, 1.0, strict_low=True)
        _real("tol", self.tol, 0.0, 0.5, strict_low=True)
        if self.r_min is not None:
            _real("r_min", self.r_min, 0.0, 1.0, strict_low=True)
        if self.synth_steps is not None:
            _integer("synth_steps", self.synth_steps, 0)
        if self.synth_low_res is not None:
            _real("synth_low_res", self.synth_low_res, 0.0)
            if self.synth_low_res >= 1.0:
                raise PlanError(f"synth_low_res is a share of the steps below 1, got {self.synth_low_res}")
        if self.synth_low_res_levels is not None:
            _integer("synth_low_res_levels", self.synth_low_res_levels, 1)
        for name in ("reward_inputs", "refine_inputs"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), 2)
        for name, low in (
            ("calibration_inputs", 2),
            ("search_refine_inputs", 2),
            ("select_inputs", 2),
            ("refine_seed_offset", 0),
            ("refine_max_positions", 1),
            ("unlabeled_reward_inputs", 1),
            ("labeled_reward_inputs", 1),
            ("warmup_cap", 0),
            ("checkpoint_every", 1),
        ):
            _integer(name, getattr(self, name), low)
        if self.episodes is not None:
            _integer("episodes", self.episodes, 1)
        if self.distill_steps is not None:
            _integer("distill_steps", self.distill_steps, 0)
        _integer("distill_batch_size", self.distill_batch_size, 1)
        if self.distill_inputs is not None:
            _integer("distill_inputs", self.distill_inputs, 0)
        _integer("distill_fresh", self.distill_fresh, 0)
        _real("distill_compete", self.distill_compete, 0.0)
        _real("distill_features", self.distill_features, 0.0)
        if self.distill_inputs == 1:
            raise PlanError("distill_inputs must be 0 or at least 2 (a synthetic batch of one has no statistics)")
        _real("distill_lr", self.distill_lr, 0.0, strict_low=True)
        _real("distill_temperature", self.distill_temperature, 0.0, strict_low=True)
        if self.warmup is not None:
            _integer("warmup", self.warmup, 0)
        if self.eval_batch_size is not None:
            _integer("eval_batch_size", self.eval_batch_size, 1)
        if self.refine_data is not None and (not isinstance(self.refine_data, str) or not self.refine_data):
            raise PlanError(f"refine_data must be a directory of images, got {_shown(self.refine_data)}")
        for name in ("refine", "coupled", "final_choice", "final_choice_per_group", "distill_augment"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "distill_augment" and value is None):
                raise PlanError(f"{name} must be True or False, got {_shown(value)}")
        _check_sac(self.sac)
        _check_scale_out(self.workers, self.ray_address)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated like a new one)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dims_ridge_grid"] = list(self.dims_ridge_grid)
        d["sac"] = dict(self.sac)
        return d

    # -- values that depend on the input size ------------------------------------------------
    def synth_settings_for(self, method: str, input_shape: Sequence[int]) -> tuple[int, float]:
        """(steps, lr) of a resolved synthesis method at this input size; ``synth_steps`` wins."""
        steps, lr = SYNTH_SETTINGS[method][size_class(input_shape)]
        return (steps if self.synth_steps is None else int(self.synth_steps)), lr

    def synth_low_res_for(self, input_shape: Sequence[int]) -> float:
        """Share of synthesis steps at half size (:data:`LOW_RES_SHARE`); ``synth_low_res`` wins."""
        return float(self.synth_low_res) if self.synth_low_res is not None else LOW_RES_SHARE[size_class(input_shape)]

    def synth_low_res_levels_for(self, input_shape: Sequence[int]) -> int:
        """Reduced sizes of the low-resolution steps (:data:`LOW_RES_LEVELS`); ``synth_low_res_levels`` wins."""
        if self.synth_low_res_levels is not None:
            return int(self.synth_low_res_levels)
        return LOW_RES_LEVELS[size_class(input_shape)]

    def reward_steps_for(self, method: str, input_shape: Sequence[int], select: bool = False) -> int:
        """Steps of the reward's batch: :data:`RANKING_STEPS_SCALE` of the method's, or
        :data:`SELECT_STEPS_SCALE` where it only picks between a few candidates; ``synth_steps`` wins."""
        if self.synth_steps is not None:
            return int(self.synth_steps)
        steps, _ = SYNTH_SETTINGS[method][size_class(input_shape)]
        scale = (SELECT_STEPS_SCALE if select else RANKING_STEPS_SCALE)[size_class(input_shape)]
        return max(1, round(steps * scale)) if steps else 0

    def reward_inputs_for(self, input_shape: Sequence[int]) -> int:
        return self.reward_inputs if self.reward_inputs is not None else REWARD_INPUTS[size_class(input_shape)]

    def refine_inputs_for(self, input_shape: Sequence[int]) -> int:
        return self.refine_inputs if self.refine_inputs is not None else REFINE_INPUTS[size_class(input_shape)]

    def distill_augment_for(self, input_shape: Sequence[int]) -> bool:
        """Whether the distillation augments its inputs (:data:`DISTILL_AUGMENT`); ``distill_augment`` wins."""
        return self.distill_augment if self.distill_augment is not None else DISTILL_AUGMENT[size_class(input_shape)]

    def eval_batch_size_for(self, input_shape: Sequence[int]) -> int:
        return self.eval_batch_size if self.eval_batch_size is not None else EVAL_BATCH[size_class(input_shape)]

    def warmup_for(self, episodes: int | None = None) -> int:
        if self.warmup is not None:
            return self.warmup
        return min(self.warmup_cap, (self.episodes_for() if episodes is None else episodes) // 4)

    # -- values the effort preset fills --------------------------------------------------------
    def _preset_key(self, input_shape: Sequence[int], device: Any) -> str:
        size = size_class(input_shape)
        accelerated = str(device).split(":")[0] in ("cuda", "mps")
        return "large_cpu" if size == "large" and not accelerated else size

    def episodes_for(self, input_shape: Sequence[int] | None = None, device: Any = "cpu") -> int:
        """Search episodes: ``episodes``, else the effort preset's (for a small input without a shape:
        the search driver's keyword default)."""
        if self.episodes is not None:
            return int(self.episodes)
        key = self._preset_key(input_shape, device) if input_shape is not None else "small"
        return int(EFFORT_PRESETS[self.effort]["episodes"][key])

    def distill_steps_for(self, input_shape: Sequence[int], device: Any = "cpu") -> int:
        """Distillation steps: ``distill_steps``, else the preset's for this input size and device."""
        if self.distill_steps is not None:
            return int(self.distill_steps)
        return int(EFFORT_PRESETS[self.effort]["distill_steps"][self._preset_key(input_shape, device)])

    def distill_inputs_for(self, input_shape: Sequence[int], device: Any = "cpu") -> int:
        """Extra distillation inputs: ``distill_inputs``, else the preset's for this size and device."""
        if self.distill_inputs is not None:
            return int(self.distill_inputs)
        return int(EFFORT_PRESETS[self.effort]["distill_inputs"][self._preset_key(input_shape, device)])

    def resolved(self, input_shape: Sequence[int], device: Any = "cpu") -> Config:
        """This config with every preset-filled field set for one run (``effort`` kept).

        A run's report records the resolved config, so it says how many episodes and steps were
        spent, whichever preset chose them.
        """
        changes: dict[str, Any] = {}
        if self.episodes is None:
            changes["episodes"] = self.episodes_for(input_shape, device)
        if self.distill_steps is None:
            changes["distill_steps"] = self.distill_steps_for(input_shape, device)
        if self.distill_inputs is None:
            changes["distill_inputs"] = self.distill_inputs_for(input_shape, device)
        low_res = EFFORT_PRESETS[self.effort]["synth_low_res"].get(self._preset_key(input_shape, device))
        if self.synth_low_res is None and low_res is not None:
            changes["synth_low_res"] = low_res
        return self.replace(**changes) if changes else self


def _shown(value: Any) -> str:
    """``repr(value)`` for a message, at most 60 characters: never itself an error (an int past
    Python's 4,300-digit limit cannot be printed, and would turn a one-line error into a crash)."""
    try:
        text = " ".join(repr(value).split())
    except (ValueError, RecursionError):
        text = f"a {type(value).__name__} too large to show"
    return text if len(text) <= 60 else text[:57] + "..."


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise PlanError(f"unknown {name} {_shown(value)}; choose from {', '.join(allowed)}")


def _real(name: str, value: Any, low: float, high: float | None = None, strict_low: bool = False) -> None:
    """A finite real in range: ``nan`` slips through every ``<``/``>`` comparison, so check it first.

    An ``int`` too large for a float (``float(10**400)`` raises ``OverflowError``) is no usable
    setting either, so it is refused as not finite.
    """
    finite = isinstance(value, float) and math.isfinite(value)
    finite = finite or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**1023)
    if not finite:
        raise PlanError(f"{name} must be a finite number, got {_shown(value)}")
    v = float(value)
    if v < low or (strict_low and v == low) or (high is not None and v > high):
        lo = f"({low:g}" if strict_low else f"[{low:g}"
        hi = f"{high:g}]" if high is not None else "∞)"
        raise PlanError(f"{name} must be in {lo}, {hi}, got {_shown(value)}")


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PlanError(f"{name} must be an integer ≥ {low}, got {_shown(value)}")


def _check_sac(sac: Any) -> None:
    """SAC overrides: a mapping of known hyper-parameter names to JSON values.

    They are written into the search checkpoint as JSON and passed to the agent by name, so a
    non-string key, an unknown name or a value JSON cannot hold fails here, on construction, not
    as a raw ``TypeError`` when the search starts.
    """
    if not isinstance(sac, Mapping):
        raise PlanError(f"sac must be a mapping of SAC hyper-parameters, got {_shown(sac)}")
    if not sac:
        return
    from autodfp.search.driver import SAC_DEFAULTS  # lazy: the search stack is heavy, and imports this module

    for key, value in sac.items():
        if not isinstance(key, str) or key not in SAC_DEFAULTS:
            raise PlanError(f"unknown sac setting {_shown(key)}; choose from {', '.join(SAC_DEFAULTS)}")
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            ok = v is None or isinstance(v, (str, bool)) or (isinstance(v, int) and abs(v) < 2**63)
            if not ok and not (isinstance(v, float) and math.isfinite(v)):
                raise PlanError(f"sac setting '{key}' must be a number, string or list of them, got {_shown(value)}")


#: ``HOST:PORT`` of a Ray head (``ray://`` for Ray Client): a host name, an IPv4 address or a
#: bracketed IPv6 one, and a port
_RAY_ADDRESS = re.compile(r"^(ray://)?([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})$")


def _check_scale_out(workers: Any, ray_address: Any) -> None:
    """``workers`` a whole number ≥ 1, ``ray_address`` ``None``, ``"auto"`` or ``HOST:PORT``, and
    Ray installed where either asks for it: a run that cannot start its workers fails here, before
    any minutes of work, not after the model is loaded and its synthesis begun."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer ≥ 1, got {_shown(workers)}")
    if ray_address is not None:
        match = _RAY_ADDRESS.match(ray_address) if isinstance(ray_address, str) else None
        if ray_address != "auto" and (match is None or not 0 < int(match.group(3)) < 65536):
            raise ConfigError(f"ray_address must be 'auto' or HOST:PORT of a Ray head, got {_shown(ray_address)}")
    if workers > 1 or ray_address is not None:
        from autodfp.distributed.executor import INSTALL_HINT, ray_available

        if not ray_available():
            what = "workers > 1" if workers > 1 else "ray_address"
            raise ConfigError(f"{what} needs Ray, which is not installed: {INSTALL_HINT}")


_DATACLASS_INIT = Config.__init__
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Config))


@functools.wraps(_DATACLASS_INIT)
def _config_init(self: Config, *args: Any, **kwargs: Any) -> None:
    """The dataclass's ``__init__``, with an unknown keyword named as a one-line :class:`ConfigError`.

    A misspelt knob (``Config(episode=100)``) would otherwise be a bare ``TypeError`` that the CLI
    reports as an internal error; here it names the closest valid field, and it is still a
    ``TypeError`` for callers that catch one.
    """
    unknown = [k for k in kwargs if k not in _FIELD_NAMES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_FIELD_NAMES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Config has no field '{unknown[0]}'{hint}")
    _DATACLASS_INIT(self, *args, **kwargs)


Config.__init__ = _config_init  # type: ignore[method-assign]


def _unvalidated_defaults() -> Config:
    """The default config without running validation: the registries it checks against import
    modules that themselves read :data:`DEFAULTS`, so validating here would be circular."""
    obj = Config.__new__(Config)
    for f in dataclasses.fields(Config):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        object.__setattr__(obj, f.name, value)
    return obj


#: The defaults, for library functions whose keyword defaults must agree with the pipeline's.
DEFAULTS = _unvalidated_defaults()

__all__ = [
    "Config",
    "DEFAULTS",
    "DISTILL_AUGMENT",
    "EVAL_BATCH",
    "LOW_RES_LEVELS",
    "LOW_RES_SHARE",
    "MICRO_BATCH_MIN_PARTS",
    "MICRO_BATCH_PIXELS",
    "RANKING_STEPS_SCALE",
    "SELECT_STEPS_SCALE",
    "REFINE_INPUTS",
    "REWARD_INPUTS",
    "SMALL_INPUT_PIXELS",
    "SYNTH_SETTINGS",
    "size_class",
]
