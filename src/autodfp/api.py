"""The Python API: prune a model you hold, save the result, load it back.

::

    import autodfp
    model = autodfp.load_model("resnet20_cifar10")[0]          # or any nn.Module of yours
    result = autodfp.prune(model, input_shape=(3, 32, 32), macs_ratio=0.5)
    result.model, result.plan, result.report
    autodfp.save(result, "runs/r20")
    same = autodfp.load("runs/r20")

:func:`prune` owns the whole pipeline: which synthetic batches are made (and with which seeds),
the pruner and its correlation source, the refinement, the reward, the search and the final
choice of the refinement's shrinkage. Every default comes from :class:`autodfp.config.Config`;
the CLI is a thin layer that builds the same config from its flags and calls these functions, so
a plan pruned from Python and from the shell gives the same model.

No real data is used by the method: synthetic inputs come from the model's own BatchNorm
statistics. Real images enter only when the caller asks for them (``reward="unlabeled:DIR"`` or
``"labeled:SPEC"``, ``Config(refine_data=DIR)``), and evaluation is separate (:func:`evaluate`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

from autodfp._checks import check_seed
from autodfp._modes import eval_mode, keeps_modes
from autodfp._progress import shows_messages
from autodfp.analysis.graph import GroupGraph, find_groups
from autodfp.compress.final import FinalChoice, decision_scorer, final_choice, held_apart_reward
from autodfp.compress.plan import Plan
from autodfp.compress.refine import Refiner, select_dims_ridge
from autodfp.compress.surgery import GroupDecision, Pruner
from autodfp.config import DEFAULTS, SEARCH_METHODS, Config
from autodfp.distributed.executor import Executor
from autodfp.errors import ModelError, PlanError, PreprocessingWarning
from autodfp.models.load import check_finite
from autodfp.models.registry import ModelConfig, Preprocessing, check_input_shape, check_preprocessing
from autodfp.search.budget import MacsModel
from autodfp.workplan import WorkPlan

log = logging.getLogger("autodfp")

RewardSpec = Union[str, Callable[[nn.Module], float]]
PlanSpec = Union[Plan, Mapping[str, Any], str, os.PathLike]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an unavailable device is an error.

    Results are the same on every device up to floating-point rounding: the method's fits run in
    float64 on the CPU wherever the forward passes run.
    """
    if isinstance(device, torch.device):
        spec = device.type
    else:
        spec = "auto" if device is None else str(device).lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.split(":")[0] == "cuda":
        if not torch.cuda.is_available():
            raise PlanError(f"device '{device}' was requested but CUDA is not available here")
        return torch.device(str(device))
    if spec == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise PlanError("device 'mps' was requested but Apple's MPS is not available here")
        return torch.device("mps")
    if spec == "cpu":
        return torch.device("cpu")
    raise PlanError(f"unknown device '{device}'; use auto, cpu, cuda or mps")


def user_model_config(
    model: nn.Module,
    input_shape: Sequence[int],
    name: str | None = None,
    preprocessing: Preprocessing | None = None,
    num_classes: int = 0,
    label_offset: int = 0,
) -> ModelConfig:
    """A registry-free config for a model passed from Python.

    The preprocessing matters only for evaluation on images; the method itself needs nothing but
    the input shape (synthetic inputs live in the model's normalised input space).
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise PlanError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    check_input_shape(shape, error=PlanError)
    if preprocessing is None:
        preprocessing = Preprocessing(shape[-1], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), guessed=True)
    check_preprocessing(preprocessing, error=PlanError)  # the same check as --mean/--std and pruned.pt's
    net = model
    return ModelConfig(
        name=name or type(model).__name__,
        builder=lambda: net,
        weights=None,
        preprocessing=preprocessing,
        num_classes=num_classes,
        label_offset=label_offset,
        description="user model",
    )


def _user_config(
    model: nn.Module,
    input_shape: Sequence[int],
    name: str | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    like: str | None,
) -> ModelConfig:
    """:func:`user_model_config` with the preprocessing the caller gave, or a guess said out loud."""
    from autodfp.models.registry import get_config

    if (mean is None) != (std is None):
        raise PlanError("give mean and std together (3 values each), or like='<zoo name>'")
    if like is not None and mean is not None:
        raise PlanError("give like or mean/std, not both")
    shape = tuple(int(s) for s in input_shape)
    if like is not None:
        base = get_config(like)
        pre = dataclasses.replace(base.preprocessing, input_size=shape[-1], input_hw=None, resize=None)
        if base.preprocessing.input_hw is None and base.preprocessing.input_size == shape[-1]:
            pre = base.preprocessing
        mc = user_model_config(
            model, shape, name=name, preprocessing=pre, num_classes=base.num_classes, label_offset=base.label_offset
        )
        return dataclasses.replace(mc, default_dataset=base.default_dataset)
    if mean is not None and std is not None:
        pre = Preprocessing(shape[-1], tuple(float(v) for v in mean), tuple(float(v) for v in std))  # type: ignore[arg-type]
        return user_model_config(model, shape, name=name, preprocessing=pre)
    log.warning(
        "no preprocessing given for the model: mean/std 0.5 is recorded as a guess; pass mean= and std= "
        "(or like='<zoo name>') so that evaluation normalises images as the model expects"
    )
    return user_model_config(model, shape, name=name)


def input_shape_of(config: ModelConfig) -> tuple[int, int, int]:
    h, w = config.preprocessing.hw
    return (3, h, w)


# ---------------------------------------------------------------------------------------------
# The pieces of the pipeline, built once per call
# ---------------------------------------------------------------------------------------------
class Pipeline:
    """Synthetic batches, pruner, refiner and reward of one model under one config and seed.

    Each batch has its own seed so that no fit is ever scored on its own inputs: the reward's batch
    uses ``seed``, the refinement's (and the calibration's, its prefix) ``seed +
    config.refine_seed_offset``. Batches are distilled on ``device`` and cached on disk
    (:func:`autodfp.synth.distill.synthetic_batch`); a batch that only ranks gets fewer steps
    (:data:`autodfp.config.RANKING_STEPS_SCALE`).

    :param model: the unpruned network (never modified)
    :param model_config: its config (name for the cache key, label offset)
    :param input_shape: (C, H, W) of one input
    :param config: every knob and default
    :param seed: the run's seed
    :param device: where forward passes run (distillation, rewards, refinement)
    :param progress: show progress bars with an ETA on stderr
    """

    def __init__(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        input_shape: Sequence[int],
        config: Config | None = None,
        seed: int = 0,
        device: str | torch.device = "auto",
        progress: bool = True,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.shape = tuple(int(s) for s in input_shape)
        self.config = config if config is not None else Config()
        self.seed = check_seed(seed)
        self.device = resolve_device(device)
        self.progress = progress
        self._device_model: nn.Module | None = None
        #: seconds spent in :meth:`batch` so far (distilling or reading the cache), for the report
        self.synth_seconds = 0.0
        #: where synthesis chunks and search episodes run (:mod:`autodfp.distributed`); ``None``:
        #: in this process. :func:`prune` sets it for the length of a run.
        self.executor: Executor | None = None
        self._cache_key: str | None = None

    @property
    def cache_key(self) -> str:
        """The synthetic cache's name for this model: the zoo name, or ``user-`` and a hash of a user
        model's weights. A user model's name is whatever the caller typed (or its class name, the
        same for every ResNet), so the same weights pruned from Python and from the CLI were
        synthesised twice; the weights themselves say which model it is."""
        if self._cache_key is None:
            from autodfp.models.registry import is_registered
            from autodfp.synth.distill import state_dict_hash

            name = self.model_config.name
            zoo = is_registered(name) and self.model_config.weights is not None
            self._cache_key = name if zoo else "user-" + state_dict_hash(self.model)[:16]
        return self._cache_key

    @property
    def device_model(self) -> nn.Module:
        """The original network on :attr:`device` (the model itself on the CPU; a copy elsewhere)."""
        if self._device_model is None:
            if self.device.type == "cpu" and _device_of(self.model).type == "cpu":
                self._device_model = self.model
            else:
                self._device_model = copy.deepcopy(self.model).to(self.device).eval()
        return self._device_model

    def synth_settings(self) -> dict[str, Any]:
        """How every batch of this run is synthesised, cached (:meth:`batch`) or made fresh during
        distillation: one place, so the two cannot drift apart."""
        return {
            "method": self.config.synth_method,
            "steps": self.config.synth_steps,
            "label_offset": self.model_config.label_offset,
            "low_res": self.config.synth_low_res_for(self.shape),
            "low_res_levels": self.config.synth_low_res_levels_for(self.shape),
        }

    def batch(self, seed: int, n: int, steps: int | None = None) -> torch.Tensor:
        """``n`` synthetic inputs distilled from the model with ``seed`` (cached on disk)."""
        from autodfp.synth.distill import synthetic_batch

        settings = self.synth_settings()
        if steps is not None:
            settings["steps"] = steps
        t0 = time.perf_counter()
        try:
            return synthetic_batch(
                self.device_model,
                self.cache_key,
                self.shape,
                n=n,
                seed=seed,
                progress=self.progress,
                log=log.info,
                executor=self.executor,
                **settings,
            )
        finally:
            self.synth_seconds += time.perf_counter() - t0

    def reward_batch(self, n: int | None = None, select: bool = False) -> torch.Tensor:
        """The reward's ``n`` inputs (seed ``seed``), distilled with fewer steps than a fit needs, and
        fewer still (``select``) where they only pick between a few candidates."""
        from autodfp.synth.distill import resolve_method

        cfg = self.config
        steps = cfg.reward_steps_for(resolve_method(self.model, cfg.synth_method), self.shape, select)
        return self.batch(self.seed, cfg.reward_inputs_for(self.shape) if n is None else n, steps=steps)

    def real_images(self, root: str, n: int, from_end: bool = False) -> torch.Tensor:
        """``n`` real unlabelled images of ``root``, a seeded sample in the model's preprocessing.

        A seeded order, not the directory's: class-sorted folders (``train/airplane/...``) would
        otherwise give a reward or a fit of one class. The reward takes the head of the order and
        a fit (``from_end``) its tail, so one directory serves both with disjoint images whenever it
        holds both counts.
        """
        import numpy as np

        from autodfp.data.datasets import UnlabeledImageDir, build_transform

        ds = UnlabeledImageDir(root, build_transform(self.model_config.preprocessing))
        order = np.random.default_rng(self.seed).permutation(len(ds))
        take = order[-n:][::-1] if from_end else order[:n]
        return torch.stack([ds[int(i)] for i in take])

    def fit_batch(self, n: int) -> torch.Tensor:
        """What the calibration and the refinement fit on: synthetic, or ``config.refine_data``'s images."""
        if self.config.refine_data is not None:
            return self.real_images(self.config.refine_data, n, from_end=True)
        return self.batch(self.seed + self.config.refine_seed_offset, n)

    def calibration_batch(self) -> torch.Tensor:
        """The first ``calibration_inputs`` of the refinement batch (its first chunk by default).

        Correlations and the refinement are both fits, so they may share inputs; only the reward
        must stay apart. Sharing them saves a first prune a whole distillation.
        """
        return self.fit_batch(self.config.calibration_inputs)

    def needs_calibration(self, corr: str, graph: GroupGraph | None = None) -> bool:
        """Whether the pruner needs a calibration batch for ``corr`` and the groups of ``graph``.

        SE-gated chains and parallel depthwise branches are reconstructed from what their
        consumers read, measured on the batch (``x * gate`` has no BN model; each branch's consumer
        reads its own branch), and groups without BN after their last stage (an SE's ``fc1``) have
        no stored statistics; either needs a batch even with every default.

        :param corr: the correlation source (``calibration`` or ``geometry``)
        :param graph: the model's groups, when known
        """
        from autodfp.synth.distill import bn_layers

        if corr == "calibration" or not bn_layers(self.model) or self.config.coupled:
            return True
        return graph is not None and any(g.coupled or g.last_stage.bn is None for g in graph.prunable)

    def corr_source(self, synthesising: bool, graph: GroupGraph) -> str:
        """The correlation source :meth:`pruner` uses: ``config.corr``, or for ``auto`` measured
        correlations whenever a synthetic batch is made anyway (or the model needs one regardless).
        One rule for the pruner and for the plan of work (:mod:`autodfp.workplan`)."""
        corr = self.config.corr
        if corr == "auto":
            corr = "calibration" if synthesising or self.needs_calibration("geometry", graph) else "geometry"
        return corr

    def pruner(self, synthesising: bool, graph: GroupGraph | None = None) -> Pruner:
        """``corr="auto"``: correlations measured on synthetic inputs whenever a batch exists anyway.

        On ResNet-56, lsq with measured correlations beats the filter-geometry estimate by 1.4
        points at uniform 0.7 and 13.0 at 0.5 (docs/RESULTS.md), but a batch costs minutes for
        224-px models on a CPU, so a prune that needs none keeps the free estimate.
        """
        if graph is None:
            graph = find_groups(self.model, self.shape, coupled=self.config.coupled)
        corr = self.corr_source(synthesising, graph)
        calib = self.calibration_batch() if self.needs_calibration(corr, graph) else None
        q = self.config.cluster_eps_quantile
        return Pruner(
            self.model,
            self.shape,
            graph=graph,
            calibration=calib,
            corr_source=corr,
            coupled=self.config.coupled,
            analysis_kwargs=None if q is None else {"eps_quantile": q},
        )

    def refiner(self, pruner: Pruner, n: int | None = None, dims_ridge: float | None = None) -> Refiner:
        """The drift-correction refiner on its own batch (seed + offset)."""
        cfg = self.config
        n = cfg.refine_inputs_for(self.shape) if n is None else n
        inputs = self.fit_batch(n)
        dims = cfg.search_dims_ridge if dims_ridge is None else dims_ridge
        return Refiner(
            pruner,
            inputs,
            ridge=cfg.refine_ridge,
            dims_ridge=dims,
            max_positions=cfg.refine_max_positions,
            device=self.device,
            progress=False,  # prune() turns it on for the final refinement only
        )

    def search_refiner(self, refiner: Refiner | None) -> Refiner | None:
        """The refiner candidates are scored with: the first ``search_refine_inputs`` inputs only."""
        n = self.config.search_refine_inputs
        if refiner is None or len(refiner.inputs) <= n:
            return refiner
        return Refiner(
            refiner.pruner,
            refiner.inputs[:n],
            ridge=refiner.ridge,
            max_positions=refiner.max_positions,
            include_unpruned=refiner.include_unpruned,
            dims_ridge=refiner.dims_ridge,
            device=self.device,
            progress=False,
        )

    def check_reward(self, spec: RewardSpec, eval_data: str | None = None) -> None:
        """Refuse, before any work, a reward spec :meth:`reward` cannot build: not a callable nor a
        known kind, or a labelled reward on the evaluation set (a search tuned on it would report a
        flattering top-1)."""
        if callable(spec):
            return
        if not isinstance(spec, str):
            raise PlanError(f"reward must be 'synthetic', 'unlabeled:DIR', 'labeled:SPEC' or a callable, got {spec!r}")
        kind, _, arg = spec.partition(":")
        if (kind == "synthetic" and not arg) or (kind == "unlabeled" and arg):
            return
        if kind == "labeled" and arg:
            if arg == eval_data or (eval_data is None and _is_default_eval(self.model_config, arg)):
                raise PlanError("the labeled reward must not use the evaluation set; pass a held-out set")
            return
        raise PlanError(f"unknown reward '{spec}'; use synthetic, unlabeled:DIR or labeled:SPEC")

    def reward(
        self, spec: RewardSpec, eval_data: str | None = None, n: int | None = None, select: bool = False
    ) -> Callable[[nn.Module], float]:
        """``"synthetic"`` (the default, data-free), ``"unlabeled:DIR"``, ``"labeled:SPEC"`` or a callable.

        A labelled reward must not use the evaluation set: a search tuned on it would report a
        flattering top-1. ``n`` caps the synthetic reward's inputs (a prefix of the search's batch);
        ``select``: the reward only picks between a few candidates (:meth:`reward_batch`).
        """
        from autodfp.data.datasets import make_loader, resolve_dataset
        from autodfp.search.rewards import AccuracyReward, AgreementReward

        cfg, mc = self.config, self.model_config
        self.check_reward(spec, eval_data)
        if callable(spec):
            return _checked_reward(spec)
        assert isinstance(spec, str)  # check_reward refuses anything else
        kind, _, arg = spec.partition(":")
        if kind == "synthetic" and not arg:
            return AgreementReward(
                self.device_model,
                self.reward_batch(n, select),
                measure=cfg.reward_measure,
                temperature=cfg.reward_temperature,
                label_offset=mc.label_offset,
                tail=cfg.reward_tail,
            )
        if kind == "unlabeled" and arg:
            return AgreementReward(
                self.device_model,
                self.real_images(arg, cfg.unlabeled_reward_inputs),
                measure=cfg.reward_measure,
                temperature=cfg.reward_temperature,
                label_offset=mc.label_offset,
                tail=cfg.reward_tail,
            )
        if kind == "labeled" and arg:
            loader = make_loader(
                resolve_dataset(arg, mc, split="train" if arg.startswith("cifar") else "test"),
                batch_size=cfg.eval_batch_size_for(self.shape),
                limit=cfg.labeled_reward_inputs,
            )
            return AccuracyReward([(x, y) for x, y in loader], label_offset=mc.label_offset)
        raise PlanError(f"unknown reward '{spec}'; use synthetic, unlabeled:DIR or labeled:SPEC")


def _checked_reward(fn: Callable[[nn.Module], Any]) -> Callable[[nn.Module], float]:
    """A user's reward callable whose every value is checked: a finite real number, or an error.

    A reward of ``None`` (a forgotten ``return``), a string or NaN would otherwise surface deep in
    the search as a bare ``TypeError`` or silently poison the agent's replay buffer.
    """

    def reward(model: nn.Module) -> float:
        value = fn(model)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise PlanError(
                f"the reward callable returned {type(value).__name__} ({str(value)[:40]!r}); it must return a "
                "finite number, higher for a better model"
            )
        if not math.isfinite(float(value)):
            raise PlanError(f"the reward callable returned {float(value)}; it must return a finite number")
        return float(value)

    return reward


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _is_default_eval(config: ModelConfig, spec: str) -> bool:
    from autodfp.data.datasets import parse_spec
    from autodfp.models.hub import assets_dir

    ref = config.default_dataset
    if ref is None:
        return False
    _, root, _ = parse_spec(spec)
    base = assets_dir()
    return base is not None and root.resolve() == (base / ref.path).resolve()


# ---------------------------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------------------------
class Report(dict[str, Any]):
    """The run's figures: a plain dict (JSON-ready, every setting included), printed as a summary.

    ``result.report`` holds the whole config so that a report says how its model was made; printing
    all of it buries the few figures a user looks for, so ``str()`` gives those in a few lines.
    """

    def __str__(self) -> str:
        def m(x: Any) -> str:
            return f"{x / 1e6:.2f}M" if isinstance(x, (int, float)) else "?"

        lines = [f"autodfp report: {self.get('model', 'model')}"]
        mb, ma, pb, pa = (self.get(k) for k in ("macs_before", "macs_after", "params_before", "params_after"))
        if mb and ma is not None:
            lines.append(f"  MACs    {m(mb)} -> {m(ma)}  ({ma / mb:.3f}x)")
        if pb and pa is not None:
            lines.append(f"  params  {m(pb)} -> {m(pa)}  ({pa / pb:.3f}x)")
        if "search" in self:
            lines.append(
                f"  search  {self['search']}, {self.get('episodes')} episodes in {self.get('search_seconds')} s, "
                f"best reward {self.get('best_reward')}"
            )
        recon = f"{self.get('strategy')} + {self.get('criterion')}"
        if self.get("refine"):
            recon += " + refine"
        if self.get("distill_steps"):
            recon += f" + distill {self['distill_steps']} steps"
        lines.append(f"  method  {recon}")
        if "final_step" in self:
            lines.append(f"  final   {self['final_step']} (data-free scores: {self.get('final_step_scores')})")
        for k in ("top1_before", "top1_after"):
            if self.get(k) is not None:
                lines.append(f"  {k.replace('_', ' ')}  {self[k]:.2f} %")
        if "seconds" in self:
            lines.append(f"  time    {self['seconds']} s")
        return "\n".join(lines)

    __repr__ = dict.__repr__


@dataclass
class PruningResult:
    """What :func:`prune` returns.

    :param model: the physically smaller network (fewer channels in real tensors)
    :param plan: the per-group preserved ratios, criterion and strategy that made it
    :param report: before/after MACs and params, the search's figures, the refinement's choice
    :param original: the unpruned network (unchanged)
    :param model_config: name, preprocessing and classes of the network
    :param input_shape: (C, H, W) of one input
    :param config: the config the run used
    :param search: the search's result (``None`` for a uniform or given plan)
    :param uniform_plan: the uniform plan at the same budget, for comparison plots
    :param arch: the ``package.module:factory`` that builds the unpruned architecture, if known
    """

    model: nn.Module
    plan: Plan
    report: dict[str, Any]
    original: nn.Module = field(repr=False)
    model_config: ModelConfig = field(repr=False)
    input_shape: tuple[int, ...] = (3, 32, 32)
    config: Config = field(default_factory=Config, repr=False)
    search: Any = field(default=None, repr=False)
    uniform_plan: Plan | None = field(default=None, repr=False)
    decisions: dict[str, GroupDecision] = field(default_factory=dict, repr=False)
    arch: str | None = None
    #: the pruned model before its distillation, when it was distilled: what the distillation added
    #: is measured against it (the CLI's table has its top-1)
    undistilled: nn.Module | None = field(default=None, repr=False)


def _config_over_plan(plan: Plan, cfg: Config) -> None:
    """A criterion or strategy set in ``cfg`` (not left at its default) replaces the plan's own.

    A plan records how it was made; a caller who passes ``Config(strategy="none")`` with it asks
    for something else, and ignoring that silently spent minutes synthesising inputs for a
    reconstruction nobody wanted. The CLI's ``--reconstruct``/``--criterion`` do the same.
    """
    for name in ("strategy", "criterion"):
        wanted = getattr(cfg, name)
        if wanted != getattr(DEFAULTS, name) and wanted != getattr(plan, name):
            log.info(f"plan: {name} '{getattr(plan, name)}' replaced by the config's '{wanted}'")
            setattr(plan, name, wanted)


def _as_plan(plan: PlanSpec) -> Plan:
    if isinstance(plan, Plan):
        return copy.deepcopy(plan)
    if isinstance(plan, Mapping):
        return Plan.from_dict(dict(plan))
    return Plan.load(plan)


def prepare_model(
    model: nn.Module | str,
    input_shape: Sequence[int] | None = None,
    model_config: ModelConfig | None = None,
    name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    like: str | None = None,
) -> tuple[nn.Module, ModelConfig, tuple[int, ...]]:
    """A zoo name or a module → (module in eval mode, its config, input shape), checked for finiteness.

    A module's preprocessing comes from ``model_config``, ``like`` (a zoo entry's) or ``mean`` and
    ``std``; with none of them it is a guess, said once in a warning and recorded as one.
    """
    if isinstance(model, str):
        from autodfp.models import load_model

        net, mc = load_model(model)
    elif isinstance(model, nn.Module):
        from autodfp.models.load import zoo_config_of

        net = model
        known = zoo_config_of(model)
        if model_config is not None:
            mc = model_config
        elif known is not None:
            mc = known
        elif input_shape is not None:
            mc = _user_config(model, input_shape, name, mean, std, like)
        else:
            raise PlanError("input_shape is needed for a model passed as a module, e.g. input_shape=(3, 224, 224)")
    else:
        raise ModelError(f"model must be an nn.Module or a zoo name, got {type(model).__name__}")
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else input_shape_of(mc)
    if len(shape) != 3:
        raise PlanError(f"input_shape must be (channels, height, width), got {shape}")
    check_finite(net, mc.name)
    return net, mc, shape


@dataclass
class _Run:
    """What :func:`prune` and :func:`plan_work` share: the prepared model, the config resolved for
    its input and device, the checked plan and groups, and the pipeline."""

    net: nn.Module
    model_config: ModelConfig
    shape: tuple[int, ...]
    config: Config
    plan: Plan | None
    pipe: Pipeline
    method: str
    graph: GroupGraph
    macs_model: MacsModel | None


def _prepare_run(
    model: nn.Module | str,
    input_shape: Sequence[int] | None,
    *,
    macs_ratio: float | None,
    uniform: float | None,
    plan: PlanSpec | None,
    search: str | None,
    reward: RewardSpec,
    config: Config | None,
    seed: int,
    device: str | torch.device,
    progress: bool,
    resume: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    model_config: ModelConfig | None = None,
    name: str | None = None,
    eval_data: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    like: str | None = None,
) -> _Run:
    """Every check a run makes before its first synthetic input, in one place for :func:`prune` and
    :func:`plan_work`: a plan of work is made of exactly what the run would go on with, and a
    dry run refuses what the run would refuse."""
    cfg = config if config is not None else Config()
    if sum(x is not None for x in (macs_ratio, uniform, plan)) != 1:
        raise PlanError("give exactly one of macs_ratio, uniform or plan")
    if macs_ratio is not None:
        check_ratio("macs_ratio", macs_ratio)
    if uniform is not None:
        check_ratio("uniform", uniform)
    method = search if search is not None else cfg.search
    if method not in SEARCH_METHODS:
        raise PlanError(f"unknown search '{method}'; choose from {', '.join(SEARCH_METHODS)}")
    if resume and checkpoint_dir is None:
        raise PlanError("resume needs a checkpoint_dir")
    net, mc, shape = prepare_model(model, input_shape, model_config, name, mean, std, like)
    if cfg.reparameterize:
        from autodfp.models.reparam import reparameterize

        net = reparameterize(net, shape)  # a checked copy: the caller's model is left as it is
    cfg = cfg.resolved(shape, resolve_device(device))  # the effort preset's values, for this input and device
    given_plan = _as_plan(plan) if plan is not None else None
    if given_plan is not None:
        given_plan.check_model(mc.name)  # a plan for another model is refused, not partly applied
        _config_over_plan(given_plan, cfg)
    pipe = Pipeline(net, mc, shape, cfg, seed=seed, device=device, progress=progress)
    graph, macs_model = _checked_graph(net, shape, cfg, macs_ratio, uniform, given_plan)  # before any synthesis
    pipe.check_reward(reward, eval_data)
    return _Run(net, mc, shape, cfg, given_plan, pipe, method, graph, macs_model)


def _work_plan(
    run: _Run, macs_ratio: float | None, uniform: float | None, reward: RewardSpec, probe: bool = True
) -> WorkPlan:
    """The run's :class:`~autodfp.workplan.WorkPlan`, timed on its device."""
    from autodfp.workplan import plan_work as make

    return make(
        run.pipe,
        run.graph,
        macs_ratio=macs_ratio,
        uniform=uniform,
        plan=run.plan,
        search=run.method,
        reward=reward,
        macs_model=run.macs_model,
        probe=probe,
    )


class _Laps:
    """Real seconds per stage of a run, for the report beside the plan of work's estimate.

    Batches are synthesised lazily, inside whichever stage first needs one; so each lap gives the
    stage named the time since the last lap less what the pipeline spent synthesising meanwhile,
    and that goes to ``synthesis``.
    """

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()
        self._synth = pipe.synth_seconds

    def __call__(self, stage: str) -> None:
        now, synth = time.perf_counter(), self.pipe.synth_seconds
        made = synth - self._synth
        if made > 0:
            self.seconds["synthesis"] = self.seconds.get("synthesis", 0.0) + made
        self.seconds[stage] = self.seconds.get(stage, 0.0) + max(0.0, now - self._t - made)
        self._t, self._synth = now, synth

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}


@keeps_modes
def plan_work(
    model: nn.Module | str,
    input_shape: Sequence[int] | None = None,
    *,
    macs_ratio: float | None = None,
    uniform: float | None = None,
    plan: PlanSpec | None = None,
    search: str | None = None,
    reward: RewardSpec = "synthetic",
    config: Config | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    model_config: ModelConfig | None = None,
    name: str | None = None,
    eval_data: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    like: str | None = None,
    probe: bool = True,
) -> WorkPlan:
    """What :func:`prune` would do with these arguments, stage by stage, and how long it would take
    on this machine and device, without doing it (the CLI's ``autodfp prune ... --dry-run``).

    The arguments are those of :func:`prune` and are checked as it checks them, so a call that
    would be refused is refused here too. Nothing is synthesised or written; making the plan costs
    a few timed steps of the run's primitives (seconds: :mod:`autodfp.workplan`).
    ``print(plan_work(...))`` shows one line per stage and the total; ``.to_dict()`` is what a
    run's report records as ``work_plan``.

    :param probe: time the primitives (otherwise every figure is guessed from the MACs)
    :return: a :class:`autodfp.workplan.WorkPlan`
    """
    run = _prepare_run(
        model,
        input_shape,
        macs_ratio=macs_ratio,
        uniform=uniform,
        plan=plan,
        search=search,
        reward=reward,
        config=config,
        seed=seed,
        device=device,
        progress=False,
        model_config=model_config,
        name=name,
        eval_data=eval_data,
        mean=mean,
        std=std,
        like=like,
    )
    return _work_plan(run, macs_ratio, uniform, reward, probe=probe)


@keeps_modes
@shows_messages
def prune(
    model: nn.Module | str,
    input_shape: Sequence[int] | None = None,
    *,
    macs_ratio: float | None = None,
    uniform: float | None = None,
    plan: PlanSpec | None = None,
    search: str | None = None,
    reward: RewardSpec = "synthetic",
    config: Config | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    model_config: ModelConfig | None = None,
    name: str | None = None,
    eval_data: str | None = None,
    arch: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    like: str | None = None,
) -> PruningResult:
    """Prune ``model`` to a budget with no training data; the model passed in is left unchanged.

    Give exactly one of ``macs_ratio`` (search a plan keeping this fraction of the MACs),
    ``uniform`` (one preserved ratio for every prunable group) or ``plan`` (a :class:`Plan`, its
    dict, or a plan.json path).

    :param model: any ``nn.Module`` (with ``input_shape``), or a zoo name
    :param input_shape: (C, H, W) of one input; a zoo model's own by default
    :param macs_ratio: target fraction of the original MACs, met within ``config.tol``
    :param uniform: one preserved ratio in (0, 1] for every prunable group
    :param plan: a plan to apply as it is (its criterion and strategy are kept)
    :param search: ``sac``, ``uniform``, ``random`` or ``evolution`` (default ``config.search``)
    :param reward: what the search maximises: ``"synthetic"`` (agreement with the original on
        inputs distilled from its BN statistics; data-free), ``"unlabeled:DIR"``,
        ``"labeled:SPEC"`` or a callable ``f(model) -> float`` (higher is better)
    :param config: every other knob (:class:`Config`); the defaults live there
    :param seed: seeds synthetic inputs, random criteria and the search
    :param device: ``auto``, ``cpu``, ``cuda`` or ``mps``, for distillation, rewards and refinement
    :param progress: progress bars with an ETA on stderr (messages go to the ``autodfp`` logger)
    :param checkpoint_dir: where a search writes resumable checkpoints
    :param resume: continue an interrupted search from ``checkpoint_dir``
    :param model_config: preprocessing/classes for a module (else a neutral one is made)
    :param name: a label for a module (cache keys, reports)
    :param eval_data: the evaluation data spec, so a labelled reward can refuse to use it
    :param arch: ``package.module:factory`` that builds the architecture, recorded by :func:`save`
    :param mean: per-channel mean of the module's input normalisation (with ``std``), recorded for
        evaluation; the method itself never reads it
    :param std: per-channel std, with ``mean``
    :param like: a zoo name whose preprocessing, classes and default dataset the module shares
    :return: a :class:`PruningResult`
    """
    t_start = time.perf_counter()
    run = _prepare_run(
        model,
        input_shape,
        macs_ratio=macs_ratio,
        uniform=uniform,
        plan=plan,
        search=search,
        reward=reward,
        config=config,
        seed=seed,
        device=device,
        progress=progress,
        resume=resume,
        checkpoint_dir=checkpoint_dir,
        model_config=model_config,
        name=name,
        eval_data=eval_data,
        mean=mean,
        std=std,
        like=like,
    )
    from autodfp.distributed import executor_for

    # workers=1 and no address: the in-process executor, nothing imported; else Ray, stopped on any exit
    with executor_for(run.config.workers, run.config.ray_address) as executor:
        run.pipe.executor = executor
        try:
            return _prune_run(run, t_start, macs_ratio, uniform, reward, eval_data, arch, checkpoint_dir, resume)
        finally:
            run.pipe.executor = None


def _prune_run(
    run: _Run,
    t_start: float,
    macs_ratio: float | None,
    uniform: float | None,
    reward: RewardSpec,
    eval_data: str | None,
    arch: str | None,
    checkpoint_dir: str | os.PathLike | None,
    resume: bool,
) -> PruningResult:
    """:func:`prune` once its run is prepared and its executor open."""
    net, mc, shape, cfg, given_plan, pipe = run.net, run.model_config, run.shape, run.config, run.plan, run.pipe
    method, graph, macs_model = run.method, run.graph, run.macs_model
    searching = macs_ratio is not None
    work = _work_plan(run, macs_ratio, uniform, reward)  # before any synthesis: what follows, and for how long
    for line in work.render().splitlines():  # line by line: handlers escape a newline inside a message
        log.info(line)
    laps = _Laps(pipe)
    synthetic_reward = isinstance(reward, str) and reward == "synthetic"
    pruner = pipe.pruner(synthesising=cfg.refine or (searching and synthetic_reward), graph=graph)
    refiner = pipe.refiner(pruner) if cfg.refine else None
    selecting = refiner is not None and (cfg.refine_dims_ridge is None or cfg.final_choice)
    # a search ranks hundreds of plans on the whole reward batch; a final choice between a few
    # candidates reads only its first select_inputs (no extra distillation for a uniform prune)
    reward_fn: Callable[[nn.Module], float] | None
    if searching:
        reward_fn = pipe.reward(reward, eval_data)
    else:
        n_select = min(cfg.select_inputs, cfg.reward_inputs_for(shape))
        reward_fn = pipe.reward(reward, eval_data, n=n_select, select=True) if selecting else None

    report: dict[str, Any] = {"model": mc.name, "seed": pipe.seed, "device": str(pipe.device)}
    report["work_plan"] = work.to_dict()
    laps("search" if searching else "pruning")  # the reward's reference outputs belong to the search
    search_result = uniform_plan = None
    if searching:
        assert reward_fn is not None
        assert macs_ratio is not None
        search_result, uniform_plan = _search(
            pipe, pruner, refiner, reward_fn, float(macs_ratio), method, checkpoint_dir, resume, macs_model
        )
        the_plan = search_result.best_plan
        report.update(
            {
                "search": method,
                "episodes": search_result.episodes,
                "search_seconds": round(search_result.seconds, 2),
                "best_reward": search_result.best_reward,
                "plateau_episode": search_result.plateau_episode,
            }
        )
        laps("search")
    elif given_plan is not None:
        the_plan = given_plan
    else:
        assert uniform is not None
        the_plan = Plan.uniform(pruner.graph, float(uniform), criterion=cfg.criterion, strategy=cfg.strategy)
    the_plan.model = mc.name
    if cfg.strength is not None and given_plan is None:
        the_plan.params["strength"] = cfg.strength
    if the_plan.criterion == "random":
        the_plan.params.setdefault("seed", pipe.seed)
    decisions = pruner.decide(the_plan)
    laps("pruning")
    refined_score: float | None = None
    final = decisions
    held: tuple[int, int] | None = None
    if reward_fn is not None and refiner is not None:  # the final choices score on inputs no fit used
        reward_fn, held = held_apart_reward(reward_fn, [refiner.inputs, pruner.calibration], pipe.device_model)
    if refiner is not None:
        refiner.progress = pipe.progress  # one bar per final refinement; none per search episode
        if cfg.refine_dims_ridge is not None:
            final = refiner(decisions, dims_ridge=cfg.refine_dims_ridge)
            report["refine_dims_ridge"] = cfg.refine_dims_ridge
        else:
            assert reward_fn is not None
            final, report["refine_dims_ridge"], scores = _select_dims_ridge(
                pruner, refiner, decisions, reward_fn, cfg.dims_ridge_grid, pipe.device_model
            )
            report["refine_dims_ridge_scores"] = {f"{k:g}": v for k, v in scores.items()}
            refined_score = scores[report["refine_dims_ridge"]]
        laps("refinement")
    refined = refiner is not None
    if cfg.final_choice and reward_fn is not None and the_plan.strategy != "none":
        choice = _final_step(
            pruner,
            the_plan,
            decisions,
            final if refined else None,
            refined_score,
            reward_fn,
            pipe.device_model,
            per_group=cfg.final_choice_per_group,
            held=held,
        )
        final = choice.decisions
        report.update(choice.report())
        refined = choice.uses_refinement
        if choice.uncompensated:
            # what was applied, so plan.json with --no-refine reproduces the model (a copy: the
            # caller's plan object is never changed)
            the_plan = dataclasses.replace(the_plan, strategy="none")
        laps("final choice")
    pruned = pruner.apply(the_plan, final)
    laps("pruning")
    undistilled = None
    if cfg.distill_steps_for(shape, pipe.device) > 0:
        undistilled = copy.deepcopy(pruned.model).to(_device_of(net)).eval()
        taps = _consumer_outputs(pruner.graph, final) if cfg.distill_features else []
        pruned.model, distilled = _distill(pipe, pruned.model, taps)
        report["distill_steps"] = cfg.distill_steps_for(shape, pipe.device)
        report.update(distilled)
        laps("distillation")
    check_finite(pruned.model, "the pruned model")
    before = _count(net, shape)
    after = _count(pruned.model, shape)
    laps("pruning")
    report.update(
        {
            "strategy": the_plan.strategy,
            "criterion": the_plan.criterion,
            "refine": refined,
            "macs_before": before[0],
            "macs_after": after[0],
            "macs_ratio_achieved": round(after[0] / before[0], 6) if before[0] else None,
            "params_before": before[1],
            "params_after": after[1],
            "seconds": round(time.perf_counter() - t_start, 2),
            # the real seconds of each stage of the plan of work, beside its estimate
            "stage_seconds": laps.to_dict(),
            # every setting, defaults included: a report says how its model was made
            "config": cfg.to_dict(),
        }
    )
    if macs_ratio is not None and before[0]:
        _check_budget(after[0] / before[0], float(macs_ratio), cfg.tol)
    report = Report(report)
    out_model = pruned.model.to(_device_of(net)).eval()
    return PruningResult(
        out_model,
        the_plan,
        report,
        net,
        mc,
        shape,
        cfg,
        search_result,
        uniform_plan,
        pruned.decisions,
        arch,
        undistilled,
    )


def _checked_graph(
    net: nn.Module,
    shape: tuple[int, ...],
    cfg: Config,
    macs_ratio: float | None,
    uniform: float | None,
    plan: Plan | None,
) -> tuple[GroupGraph, MacsModel | None]:
    """The channel groups (and, for a budget, the MACs model the search reuses), after every check
    that needs no synthetic input.

    A budget the model cannot reach, a ratio that would remove a whole layer, or a model with
    nothing to prune is refused here, before the first synthetic batch is distilled (minutes at
    224 px), instead of after it.
    """
    from autodfp.analysis.graph import find_groups

    graph = find_groups(net, shape, coupled=cfg.coupled)
    if not graph.prunable:
        from autodfp.models.reparam import reparameterizable

        reasons = sorted({g.reason for g in graph if g.reason})
        hint = ""
        if not cfg.reparameterize and reparameterizable(net):
            hint = (
                "; its training-time branches can be folded first: reparameterize=True (--reparameterize), "
                "as its reparameterize()/switch_to_deploy() methods do for deployment"
            )
        raise PlanError(
            f"the model has no prunable channel groups ({len(graph)} groups: "
            f"{'; '.join(reasons[:3]) or 'none found'}); nothing can be removed{hint}"
        )
    mm: MacsModel | None = None
    if macs_ratio is not None:
        mm = MacsModel(net, graph, shape)
        target = macs_ratio * mm.total_macs
        mm.check_target(target, cfg.r_min if cfg.r_min is not None else mm.auto_r_min(target), cfg.tol)
    elif uniform is not None:
        Plan.uniform(graph, uniform, criterion=cfg.criterion, strategy=cfg.strategy).validate(graph)
    elif plan is not None:
        plan.validate(graph)
    return graph, mm


def check_ratio(name: str, value: Any) -> float:
    """A ratio in (0, 1]: NaN fails every comparison, so finiteness is checked first."""
    import math

    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(float(value))
        or not 0.0 < float(value) <= 1.0
    ):
        raise PlanError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _check_budget(achieved: float, target: float, tol: float) -> None:
    """Refuse a model whose *counted* MACs miss the budget, whatever the planning model predicted.

    The search plans with an analytic MACs model; a structure it miscounts (a conv that reads and
    writes one coupled stream, say) would otherwise deliver another budget than the one asked for,
    silently. The pruned network's own profile is the ground truth.
    """
    if not target * (1 - tol) - 1e-9 <= achieved <= target * (1 + tol) + 1e-9:
        raise PlanError(
            f"the pruned model keeps {achieved:.4f}x the MACs, outside ±{tol:.0%} of the {target:.4f}x asked for "
            "(the MACs model miscounts a structure of this network; please report it)"
        )


def _count(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    from autodfp.eval.metrics import profile

    p = profile(model, shape)
    return p.total_macs, p.total_params


def _search(
    pipe: Pipeline,
    pruner: Pruner,
    refiner: Refiner | None,
    reward_fn: Callable[[nn.Module], float],
    macs_ratio: float,
    method: str,
    checkpoint_dir: str | os.PathLike | None,
    resume: bool,
    macs_model: MacsModel | None = None,
) -> tuple[Any, Plan]:
    from autodfp.search.driver import search as run_search

    cfg = pipe.config
    params = {"strength": cfg.strength} if cfg.strength is not None else None
    common: dict[str, Any] = dict(
        reward=reward_fn,
        strategy=cfg.strategy,
        criterion=cfg.criterion,
        params=params,
        model_key=pipe.model_config.name,
        tol=cfg.tol,
        reward_base=pipe.device_model,
        macs_model=macs_model,
    )
    result = run_search(
        pruner,
        macs_ratio,
        method=method,
        episodes=cfg.episodes_for(),
        warmup=None if cfg.warmup is None and resume else cfg.warmup_for(cfg.episodes_for()),
        seed=pipe.seed,
        r_min=cfg.r_min,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        checkpoint_every=cfg.checkpoint_every,
        resume=resume,
        progress=pipe.progress,
        sac_kwargs=dict(cfg.sac) or None,
        refiner=pipe.search_refiner(refiner),
        executor=pipe.executor,
        **common,
    )
    uniform = run_search(pruner, macs_ratio, method="uniform", progress=False, **common).best_plan
    log.info(
        f"search: {method}, {result.episodes} episodes in {result.seconds:.1f} s, best reward "
        f"{result.best_reward:.4f} (plateau at episode {result.plateau_episode})"
    )
    return result, uniform


#: the distillation's own extra inputs use seed ``seed + 2``: apart from the reward's (``seed``) and
#: the refinement's (``seed + 1``, the default ``refine_seed_offset``)
DISTILL_SEED_OFFSET = 2


#: fresh inputs made during distillation use seed ``seed + 3`` (chunk ``i``: ``+ i × CHUNK_SEED_STRIDE``)
FRESH_SEED_OFFSET = 3


def _fresh_inputs(pipe: Pipeline) -> Callable[[nn.Module, int], torch.Tensor]:
    """What :func:`autodfp.compress.kd.distill` calls for a batch of fresh inputs: one chunk
    synthesised like the pipeline's own (method, steps, size schedule), with the competition term
    against the student as it is at that step. Such a batch is never cached: it depends on the
    student, which changes with every step."""
    from autodfp._checks import SEED_LIMIT
    from autodfp.synth.distill import CHUNK, CHUNK_SEED_STRIDE
    from autodfp.synth.distill import distill as synthesise

    cfg = pipe.config

    def make(student: nn.Module, i: int) -> torch.Tensor:
        t0 = time.perf_counter()
        result = synthesise(
            pipe.device_model,
            pipe.shape,
            n=CHUNK,
            seed=(pipe.seed + FRESH_SEED_OFFSET + i * CHUNK_SEED_STRIDE) % SEED_LIMIT,
            student=student,
            compete=cfg.distill_compete,
            **pipe.synth_settings(),
        )
        log.info(f"fresh inputs {i + 1}/{cfg.distill_fresh}: {CHUNK} synthesised in {time.perf_counter() - t0:.1f} s")
        return result.images

    return make


def _consumer_outputs(graph: GroupGraph, decisions: Mapping[str, GroupDecision]) -> list[str]:
    """Where feature matching taps: each pruned group's consumers, after their BN where they have
    one (the first full-width activations that carry the pruning's error), in the graph's order."""
    names: list[str] = []
    for g in graph.prunable:
        d = decisions.get(g.name)
        if d is None or not d.pruned.numel():
            continue
        for consumer, bn in zip(g.consumers, g.consumer_bns):
            name = bn or consumer
            if name not in names:
                names.append(name)
    return names


def _distill(pipe: Pipeline, student: nn.Module, features: Sequence[str] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """The optional last stage: the pruned model learns the original's outputs on the synthetic
    batches the pipeline already made (the reward's and the refinement's), never on real data.
    With ``config.distill_features``, the outputs of ``features`` (modules) are matched too.

    The loss over the whole pool is measured before and after. A run that ends no lower than it
    started diverged (it happened on MobileNet-V1 at 224 px: every input then fell into one class),
    so the model before distillation is kept, with a warning; the report says which was kept.
    """
    from autodfp.compress.kd import distill, pool_losses
    from autodfp.synth.distill import CHUNK

    cfg = pipe.config
    pools = [pipe.reward_batch(), pipe.fit_batch(cfg.refine_inputs_for(pipe.shape))]
    extra = cfg.distill_inputs_for(pipe.shape, pipe.device)
    steps = cfg.distill_steps_for(pipe.shape, pipe.device)
    if extra:
        pools.append(pipe.batch(pipe.seed + DISTILL_SEED_OFFSET, extra))
    inputs = torch.cat(pools)
    fresh_note = f", and {cfg.distill_fresh} × {CHUNK} fresh ones made during it" if cfg.distill_fresh else ""
    log.info(f"distilling the pruned model for {steps} steps on {len(inputs)} synthetic inputs{fresh_note}")
    t0 = time.perf_counter()
    run = distill(
        student,
        pipe.model,
        inputs,
        steps,
        lr=cfg.distill_lr,
        temperature=cfg.distill_temperature,
        batch_size=cfg.distill_batch_size,
        augment=cfg.distill_augment_for(pipe.shape),
        seed=pipe.seed,
        device=pipe.device,
        progress=pipe.progress,
        fresh=_fresh_inputs(pipe),
        fresh_batches=cfg.distill_fresh,
        features=features,
        feature_weight=cfg.distill_features,
    )
    log.info(f"distilled in {time.perf_counter() - t0:.1f} s")
    # both on the original's device (the CPU copies the pipeline returns), not the training device
    before, after = pool_losses([student, run.model], pipe.model, inputs, temperature=cfg.distill_temperature)
    info: dict[str, Any] = {  # a non-finite loss is reported as null: JSON has no infinity
        "distill_loss_before": before if math.isfinite(before) else None,
        "distill_loss_after": after if math.isfinite(after) else None,
        "distill_kept": after < before,
        "distill_fresh_inputs": run.fresh_inputs,
        "distill_lr_final": run.lr,
        "distill_backoffs": run.backoffs,
    }
    if after < before:
        log.info(f"distillation loss over the pool: {before:.4g} → {after:.4g}")
        return run.model, info
    warnings.warn(
        f"distillation did not lower its loss (over its inputs {before:.4g} → {after:.4g}, learning rate "
        f"{cfg.distill_lr:.2g} → {run.lr:.2g}); keeping the model before it",
        RuntimeWarning,
        stacklevel=2,
    )
    return student, info


def _select_dims_ridge(
    pruner: Pruner,
    refiner: Refiner,
    decisions: dict[str, GroupDecision],
    reward_fn: Callable[[nn.Module], float],
    grid: Sequence[float],
    base: nn.Module,
) -> tuple[dict[str, GroupDecision], float, dict[float, float]]:
    """The final refinement's dims ridge, chosen by the reward on held-apart inputs
    (``reward_fn`` from :func:`autodfp.compress.final.held_apart_reward`)."""
    chosen, refined, scores = select_dims_ridge(refiner, decisions, decision_scorer(pruner, reward_fn, base), grid=grid)
    log.info(
        "refinement dims ridge by reward: "
        + ", ".join(f"{k:g} → {v:.4f}" for k, v in scores.items())
        + f"; chose {chosen:g}"
    )
    return refined, chosen, scores


def _final_step(
    pruner: Pruner,
    plan: Plan,
    decisions: dict[str, GroupDecision],
    refined: dict[str, GroupDecision] | None,
    refined_score: float | None,
    reward_fn: Callable[[nn.Module], float],
    base: nn.Module,
    per_group: bool = True,
    held: tuple[int, int] | None = None,
) -> FinalChoice:
    """Refined, unrefined or uncompensated, for the plan and then per group
    (:func:`autodfp.compress.final.final_choice`), scored by ``reward_fn`` on held-apart inputs."""
    score = decision_scorer(pruner, reward_fn, base)
    return final_choice(pruner, plan, decisions, refined, refined_score, score, per_group=per_group, held=held)


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------
@keeps_modes
def groups(
    model: nn.Module | str,
    input_shape: Sequence[int] | None = None,
    *,
    coupled: bool = False,
    reparameterize: bool = False,
) -> list[dict[str, Any]]:
    """Every output-channel group of ``model``, as ``autodfp info`` lists them: one dict per group
    with its ``name``, ``kind``, ``channels``, ``consumers``, ``prunable`` and, for a group that
    stays whole, the ``reason``.

    This is what a plan's keys are, and what to read when a budget cannot be reached: the groups
    that stay whole bound how far the MACs can fall.

    :param model: any ``nn.Module`` (with ``input_shape``), or a zoo name
    :param input_shape: (C, H, W) of one input; a zoo model's own by default
    :param coupled: list residual-stream groups as prunable, as ``Config(coupled=True)`` prunes them
    :param reparameterize: the groups of the model with its training-time branches folded, as
        ``Config(reparameterize=True)`` prunes it
    """
    with warnings.catch_warnings():  # listing groups reads no preprocessing: a guess is no news here
        warnings.simplefilter("ignore", PreprocessingWarning)
        net, _, shape = prepare_model(model, input_shape)
    if reparameterize:
        from autodfp.models.reparam import reparameterize as fold

        net = fold(net, shape)
    return [g.to_dict() for g in find_groups(net, shape, coupled=coupled)]


def _eval_config(model: nn.Module, model_config: ModelConfig | None, like: str | None) -> ModelConfig:
    """The config an evaluation reads its preprocessing from: given, borrowed (``like``) or the zoo's.

    Evaluating with the wrong normalisation still runs and reports a number (27.83 % instead of
    59.00 % on one model), so there is no silent neutral default here.
    """
    from autodfp.models.load import zoo_config_of
    from autodfp.models.registry import get_config

    if model_config is not None and like is not None:
        raise PlanError("give model_config or like, not both")
    if like is not None:
        return get_config(like)
    if model_config is not None:
        return model_config
    known = zoo_config_of(model)
    if known is None:
        raise PlanError(
            "evaluate needs the model's preprocessing: pass model_config=result.model_config (after prune), "
            "or like='<zoo name>' for a model that shares a zoo model's"
        )
    return known


@keeps_modes
def evaluate(
    model: nn.Module,
    data: str | None = None,
    *,
    model_config: ModelConfig | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = False,
    config: Config | None = None,
    reference: nn.Module | None = None,
    like: str | None = None,
) -> Any:
    """Top-1/top-5 of ``model`` on labelled data: a spec (``cifar10:DIR``, ``folder:DIR[:CLASSLIST]``)
    or, without one, the model config's default evaluation set.

    A detector (``model_config.task == "detection"``) is scored by
    :func:`autodfp.eval.detection.evaluate_detection` instead: mAP@0.5, mAP@0.5:0.95 and recall on
    ``yolo:DIR`` / ``coco:JSON:IMAGES`` labels, or on ``self:DIR`` photographs (the default for the
    face detectors) against ``reference``'s detections. Without a ``reference`` the zoo's unpruned
    model is used when ``model`` is a pruned copy of one, else ``model`` itself (which scores 1).

    :param model_config: preprocessing and classes (``result.model_config`` after :func:`prune`);
        a module built by :func:`create_model` knows its own, and ``like`` borrows a zoo entry's
    :param reference: the unpruned detector (detection on ``self:`` data only)
    :param like: a zoo name whose preprocessing, classes and default dataset the model shares
    :return: :class:`autodfp.eval.metrics.EvalResult` (percentages and the image count), or
        :class:`autodfp.eval.detection.DetectionResult` for a detector
    """
    from autodfp.data.datasets import make_loader, resolve_dataset
    from autodfp.eval.metrics import evaluate as run_eval

    model_config = _eval_config(model, model_config, like)
    if model_config.preprocessing.guessed:
        warnings.warn(
            f"the preprocessing of {model_config.name} is a guess (mean {model_config.preprocessing.mean}, std "
            f"{model_config.preprocessing.std}); accuracy is wrong unless the model expects it: pass like= or a "
            "model_config with the real mean/std (CLI: --like or --mean/--std)",
            PreprocessingWarning,
            stacklevel=2,
        )
    cfg = config if config is not None else Config()
    dev = resolve_device(device)
    shape = input_shape_of(model_config)
    if model_config.task == "detection":
        return _evaluate_detection(model, data, model_config, reference, limit, batch_size or 8, dev)
    loader = make_loader(
        resolve_dataset(data, model_config, limit=limit),
        batch_size=batch_size or cfg.eval_batch_size_for(shape),
        limit=limit,
    )
    moved = model if _device_of(model) == dev else copy.deepcopy(model).to(dev)
    with eval_mode(moved):
        return run_eval(moved, loader, label_offset=model_config.label_offset, progress=progress)


def _evaluate_detection(
    model: nn.Module,
    data: str | None,
    model_config: ModelConfig,
    reference: nn.Module | None,
    limit: int | None,
    batch_size: int,
    device: torch.device,
) -> Any:
    from autodfp.eval.detection import default_detection_data, evaluate_detection
    from autodfp.models.load import zoo_config_of
    from autodfp.models.registry import get_config, is_registered

    spec = data if data is not None else default_detection_data(model_config)
    if reference is None and zoo_config_of(model) is None and is_registered(model_config.name):
        zoo = get_config(model_config.name)
        if zoo.task == "detection" and zoo.weights is not None:
            from autodfp.models import load_model

            reference = load_model(model_config.name)[0]
    moved = model if _device_of(model) == device else copy.deepcopy(model).to(device)
    ref = (
        None
        if reference is None
        else reference
        if _device_of(reference) == device
        else copy.deepcopy(reference).to(device)
    )
    return evaluate_detection(moved, spec, model_config, reference=ref, limit=limit, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
def save(
    result: PruningResult,
    out_dir: str | os.PathLike,
    *,
    plots: bool = True,
    overwrite: bool = False,
    torchscript: bool = True,
) -> dict[str, Path]:
    """Write the result as one complete set: pruned.pt, model.ts, plan.json, report.json and, after a
    search, search.json, ratios.png and rewards.png (see :mod:`autodfp.eval.export`).

    autodfp replaces or deletes only files it wrote itself (those its earlier set's manifest
    lists): a folder holding anything else is refused at once, before any work, unless
    ``overwrite=True``; then the set is written beside those files, which are kept, and a file of
    the user's that has a name of the set is still refused (see :mod:`autodfp.eval.outdir`).

    :param result: what :func:`prune` returned
    :param out_dir: the output directory (created; an earlier set of autodfp's in it is replaced whole)
    :param plots: also draw the search's plots
    :param overwrite: write into a folder that holds files autodfp did not write (they are kept)
    :param torchscript: also write ``model.ts``, when its outputs match the model's in type and values
        (otherwise it is left out with a warning, and the manifest says ``"torchscript": null``)
    :return: ``{kind: path}`` of the files written
    """
    import json

    from autodfp.eval.export import save_pruned
    from autodfp.eval.outdir import claim_output_dir

    claim_output_dir(out_dir, overwrite=overwrite, kind="pruned")  # before the plots and the serialisation

    extra: dict[str, bytes] = {"report.json": (json.dumps(result.report, indent=2) + "\n").encode()}
    if result.search is not None:
        extra["search.json"] = (json.dumps(result.search.to_dict(), indent=2) + "\n").encode()
        if plots:
            extra.update(_search_plots(result))
    zoo = result.arch is None and _is_zoo(result)
    return save_pruned(
        _SavedView(result),
        out_dir,
        result.model_config,
        result.input_shape,
        arch=result.arch,
        zoo=zoo,
        extra=extra,
        overwrite=overwrite,
        torchscript=torchscript,
        reparameterized=bool(result.report.get("config", {}).get("reparameterize", False)),
    )


@dataclass
class _SavedView:
    model: nn.Module
    plan: Plan
    decisions: dict[str, GroupDecision]

    def __init__(self, result: PruningResult) -> None:
        self.model, self.plan, self.decisions = result.model, result.plan, result.decisions


def _is_zoo(result: PruningResult) -> bool:
    from autodfp.models.registry import get_config, is_registered

    name = result.model_config.name
    return is_registered(name) and get_config(name).preprocessing == result.model_config.preprocessing


def _search_plots(result: PruningResult) -> dict[str, bytes]:
    import tempfile

    from autodfp.search.driver import plot_ratios, plot_rewards

    files: dict[str, bytes] = {}
    name = result.model_config.name
    with tempfile.TemporaryDirectory() as tmp:
        plot_ratios(
            result.plan, result.uniform_plan, Path(tmp) / "ratios.png", title=f"{name}: preserved ratio per group"
        )
        files["ratios.png"] = (Path(tmp) / "ratios.png").read_bytes()
        if result.search.history:
            plot_rewards(
                result.search.history, Path(tmp) / "rewards.png", title=f"{name}: {result.search.method} search"
            )
            files["rewards.png"] = (Path(tmp) / "rewards.png").read_bytes()
    return files


@keeps_modes
def load(path: str | os.PathLike, *, model: nn.Module | None = None, arch: str | None = None) -> nn.Module:
    """The pruned network saved in ``path`` (a directory written by :func:`save` or ``autodfp prune``).

    Zoo models are rebuilt from the registry. A user architecture is rebuilt only from what you
    pass: ``model`` (an unpruned instance, shrunk to the saved widths) or ``arch``
    (``package.module:factory``); otherwise the saved TorchScript is returned, which computes the
    same outputs but cannot be pruned again. Nothing the file itself names is ever imported.
    """
    from autodfp.eval.export import load_pruned

    return load_pruned(path, model=model, arch=arch)[0]


def create_model(name: str, pretrained: bool = True) -> nn.Module:
    """A zoo model by name, in eval mode, with its weights (resolved from the mirror, cache or URL).

    Like ``timm.create_model``; :func:`prune` and :func:`save` recognise the module as the zoo
    entry, so its preprocessing and classes follow it and a saved result rebuilds from the zoo.
    """
    from autodfp.models import load_model

    return load_model(name, pretrained=pretrained)[0]


__all__ = [
    "Pipeline",
    "PruningResult",
    "check_ratio",
    "check_seed",
    "create_model",
    "evaluate",
    "load",
    "plan_work",
    "prepare_model",
    "prune",
    "resolve_device",
    "save",
    "user_model_config",
]
