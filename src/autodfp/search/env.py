"""The layer-by-layer pruning decision process, as a gymnasium environment.

One episode walks the prunable groups in forward order; each step chooses the group's preserved
ratio and its reconstruction strength λ. As in AMC the ratio is clipped to the range that keeps
the MACs target reachable, so *every* episode ends with a plan on budget and the agent's reward
only has to rank plans by quality, never by cost. The reward is computed once, at the last step,
on the masked model (:meth:`Pruner.masked_state` through ``functional_call``): the original
weights are shared, only the edited consumer tensors are new, so an episode costs one plan
decision plus one forward pass of the reward batch.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from autodfp.analysis.similarity import FEATURE_NAMES
from autodfp.compress.plan import Plan, n_keep
from autodfp.compress.reconstruct import strategy_names
from autodfp.compress.surgery import Pruner
from autodfp.config import DEFAULTS
from autodfp.errors import AutoDFPError, PlanError
from autodfp.search.budget import DEFAULT_TOL, MacsModel, plan_from_keep

#: A reward scores a candidate pruned model (higher is better). It receives an ``nn.Module``: the
#: masked original (:class:`MaskedModel`) on the fast path, or any physically pruned model.
RewardFn = Callable[[nn.Module], float]


OBS_NAMES: list[str] = [
    "layer_index",  # group index / number of groups
    "depth_fraction",  # producer position among all channel groups of the model
    "kind_conv",
    "kind_dw_chain",
    "kind_linear",
    "in_channels",  # log2(C_in) / log2(max width)
    "out_channels",  # log2(C) / log2(max width)
    "kernel",  # producer kernel size / largest kernel among producers
    "stride",  # producer stride / 2, clipped to 1
    "fmap_size",  # producer output height / input height
    "layer_macs",  # MACs this group rescales / total
    "macs_removed",  # MACs removed by the decisions so far / total
    "macs_rest",  # MACs the later groups can still remove / total
    "target",  # target MACs ratio
    "feasible_lo",  # lowest ratio the budget allows here
    "feasible_hi",  # highest ratio the budget allows here
    "prev_ratio",
    "prev_strength",
] + [f"sim_{n}" for n in FEATURE_NAMES]


class MaskedModel(nn.Module):
    """The original model with a few tensors substituted: exactly the pruned model's function."""

    def __init__(self, base: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.base = base
        self.state = state
        # A new Module starts in training mode; mirror the base instead, so that code restoring
        # "the caller's mode" on this wrapper never switches the shared original to training.
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = next(iter(self.base.parameters()), torch.empty(0)).device
        state = {k: v.to(device) for k, v in self.state.items()}  # a no-op when both live on the CPU
        return functional_call(self.base, state, (x,))


@dataclass
class EpisodeResult:
    plan: Plan
    macs: int
    macs_ratio: float
    reward: float
    keep: dict[str, int] = field(default_factory=dict)


class PruningEnv(gym.Env):
    """One step per prunable group; the reward arrives with the finished plan at the last step.

    ``r_min=None`` picks :meth:`MacsModel.auto_r_min` for the target.
    Action ``a ∈ [-1, 1]²``: ``a[0]`` maps linearly to a preserved ratio in ``[r_min, 1]``, ``a[1]``
    to the strength ``λ ∈ [0, 1]`` (ignored unless the strategy is ``autodfp``). The ratio is then
    clipped, in channel space, to :meth:`MacsModel.feasible_keep`, and the finished plan goes
    through :meth:`MacsModel.repair`, so every plan is within ``±tol`` of the target.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        pruner: Pruner,
        target_macs_ratio: float,
        reward: RewardFn,
        r_min: float | None = None,
        strategy: str = DEFAULTS.strategy,
        criterion: str = DEFAULTS.criterion,
        params: dict[str, Any] | None = None,
        tol: float = DEFAULT_TOL,
        macs_model: MacsModel | None = None,
        model_key: str | None = None,
        refiner: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        reward_base: nn.Module | None = None,
    ) -> None:
        super().__init__()
        #: the original network the reward runs (a copy on the accelerator, or the pruner's own)
        self.reward_base = pruner.model if reward_base is None else reward_base
        if strategy not in strategy_names():
            raise PlanError(f"unknown strategy '{strategy}'; choose from {', '.join(strategy_names())}")
        if not callable(reward):
            raise TypeError("reward must be a callable taking a model and returning a float")
        self.pruner = pruner
        self.reward_fn = reward
        self.strategy = strategy
        self.criterion = criterion
        self.params = dict(params or {})
        self.tol = float(tol)
        self.refiner = refiner
        self.last_decisions: dict[str, Any] = {}  # of the last plan scored, refined if a refiner is set
        self.model_key = model_key
        self.mm = macs_model if macs_model is not None else MacsModel(pruner.model, pruner.graph, pruner.input_shape)
        self.target_ratio = float(target_macs_ratio)
        self.target = self.target_ratio * self.mm.total_macs
        self.r_min = float(self.mm.auto_r_min(self.target) if r_min is None else r_min)
        self.mm.check_target(self.target, self.r_min, self.tol)
        self.groups = list(self.mm.groups)
        if not self.groups:
            raise PlanError("the model has no prunable channel groups")
        self.n_steps = len(self.groups)
        self._static = self._static_features()
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(len(OBS_NAMES),), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.episodes = 0
        self.last: EpisodeResult | None = None
        self._decisions: OrderedDict[tuple, Any] = OrderedDict()
        self._begin()

    # -- features that never change between episodes ----------------------------------------
    def _static_features(self) -> np.ndarray:
        graph = self.pruner.graph
        model = self.pruner.model
        n_all = max(len(graph.groups), 1)
        widths, kernels = [], []
        rows: list[dict[str, Any]] = []
        h_in = self.pruner.input_shape[-1] if len(self.pruner.input_shape) >= 2 else 1
        for i, name in enumerate(self.groups):
            g = graph.get(name)
            mod = model.get_submodule(g.producer.conv)
            if isinstance(mod, nn.Linear):
                c_in, k, s = mod.in_features, 1, 1
            else:
                conv = cast(nn.Conv2d, mod)  # a producer is a Linear or a (dense or grouped) Conv2d
                c_in, k, s = conv.in_channels, int(np.prod(conv.kernel_size)), int(conv.stride[0])
            lp = self.mm.layers.get(g.producer.conv)
            out_shape = lp.output_shape if lp is not None else None
            fmap = (out_shape[-1] / h_in) if out_shape is not None and len(out_shape) == 4 else 0.0
            widths += [c_in, g.channels]
            kernels.append(k)
            rows.append(
                dict(
                    i=i,
                    depth=g.index / n_all,
                    kind=g.kind,
                    c_in=c_in,
                    c_out=g.channels,
                    k=k,
                    s=s,
                    fmap=fmap,
                    macs=self.mm.group_macs(name) / self.mm.total_macs,
                )
            )
        log_max = math.log2(max(max(widths), 2))
        k_max = max(kernels)
        feats = []
        for r in rows:
            feats.append(
                [
                    r["i"] / self.n_steps,
                    r["depth"],
                    float(r["kind"] in ("conv", "concat")),
                    float(r["kind"] in ("dw_chain", "se_chain", "dw_branches")),  # gated or branched: a dw chain
                    float(r["kind"] == "linear"),
                    math.log2(max(r["c_in"], 1)) / log_max,
                    math.log2(max(r["c_out"], 1)) / log_max,
                    r["k"] / k_max,
                    min(r["s"] / 2.0, 1.0),
                    min(r["fmap"], 1.0),
                    r["macs"],
                ]
            )
        sims = np.stack([self.pruner.analysis(name).features() for name in self.groups])
        return np.concatenate([np.asarray(feats, dtype=np.float64), sims.astype(np.float64)], axis=1)

    # -- episode state -------------------------------------------------------------------------
    def _begin(self) -> None:
        self.t = 0
        self.chosen: dict[str, int] = {}
        self.strengths: dict[str, float] = {}
        self.prev = (1.0, 0.0)

    def _observation(self) -> np.ndarray:
        t = min(self.t, self.n_steps - 1)
        name = self.groups[t]
        static = self._static[t]
        total = self.mm.total_macs
        now = self.mm.macs(self.chosen)
        removed = (total - now) / total
        kmin = self.mm.min_keep(self.r_min)
        later = {g: kmin[g] for g in self.groups[t + 1 :]}
        rest = (now - self.mm.macs({**self.chosen, **later})) / total
        if self.t < self.n_steps:
            lo, hi = self.mm.feasible_range(self.chosen, name, self.target, self.r_min, self.tol)
        else:
            lo = hi = 0.0
        dyn = [removed, rest, self.target_ratio, lo, hi, self.prev[0], self.prev[1]]
        obs = np.concatenate([static[:11], dyn, static[11:]])
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._begin()
        return self._observation(), {}

    def action_to_ratio(self, action: np.ndarray) -> tuple[float, float]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        ratio = self.r_min + (a[0] + 1.0) / 2.0 * (1.0 - self.r_min)
        strength = (a[1] + 1.0) / 2.0 if a.shape[0] > 1 else 1.0
        return float(ratio), float(strength)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.t >= self.n_steps:
            raise AutoDFPError("step() called on a finished episode; call reset() first")
        name = self.groups[self.t]
        c = self.mm.channels[name]
        ratio, strength = self.action_to_ratio(action)
        lo, hi = self.mm.feasible_keep(self.chosen, name, self.target, self.r_min, self.tol)
        k = min(max(n_keep(c, ratio), lo), hi)
        self.chosen[name] = k
        self.strengths[name] = round(strength, 4)
        self.prev = (k / c, strength)
        self.t += 1
        if self.t < self.n_steps:
            return self._observation(), 0.0, False, False, {}
        result = self.finish()
        return (
            self._observation(),
            result.reward,
            True,
            False,
            {
                "plan": result.plan,
                "macs": result.macs,
                "macs_ratio": result.macs_ratio,
                "reward": result.reward,
                "episode": self.episodes,
            },
        )

    # -- plans and rewards ---------------------------------------------------------------------
    def make_plan(self, keep: dict[str, int], strengths: dict[str, float] | None = None) -> Plan:
        layer_params = {}
        if self.strategy == "autodfp" and strengths:
            layer_params = {g: {"strength": float(strengths[g])} for g in keep if g in strengths}
        return plan_from_keep(
            keep,
            self.mm.channels,
            criterion=self.criterion,
            strategy=self.strategy,
            params=dict(self.params),
            layer_params=layer_params,
            model=self.model_key,
        )

    #: per-group decisions kept for reuse; ~30 KB each for a 64-channel group
    DECISION_CACHE = 4096

    def decide(self, plan: Plan) -> dict[str, Any]:
        """:meth:`Pruner.decide`, one group at a time, memoised on (group, kept count, parameters).

        A group's decision depends only on its own ratio and parameters, so it can be reused
        across episodes. That matters for ``lsq``, whose Monte-Carlo moments cost ~70 ms per
        ResNet-56 group (1.8 s of a 2.2 s episode) while the agent keeps revisiting the same
        counts; with a continuous per-layer λ (``autodfp``) entries rarely repeat, but that
        strategy is cheap anyway.
        """
        plan.validate(self.pruner.graph)
        out: dict[str, Any] = {}
        for g, r in plan.ratios.items():
            c = self.mm.channels[g]
            k = n_keep(c, float(r))
            if k == c:
                continue
            key = (
                g,
                k,
                plan.criterion,
                plan.strategy,
                json.dumps(plan.params_for(g), sort_keys=True),
                tuple(plan.keep.get(g, ())),
            )
            hit = self._decisions.get(key)
            if hit is None:
                sub = Plan(
                    {g: r},
                    criterion=plan.criterion,
                    strategy=plan.strategy,
                    params=plan.params,
                    layer_params={g: plan.layer_params[g]} if g in plan.layer_params else {},
                    keep={g: plan.keep[g]} if g in plan.keep else {},
                )
                hit = self.pruner.decide(sub)[g]
                self._decisions[key] = hit
                if len(self._decisions) > self.DECISION_CACHE:
                    self._decisions.popitem(last=False)
            else:
                self._decisions.move_to_end(key)
            out[g] = hit
        return out

    def evaluate(self, plan: Plan) -> float:
        """Reward of ``plan`` on the masked fast path (no model copy).

        With a ``refiner`` (:class:`autodfp.compress.refine.Refiner`) the plan is scored as it will be
        delivered, after drift correction, so the agent does not optimise a model nobody gets.
        """
        decisions = self.decide(plan)
        if self.refiner is not None:
            decisions = self.refiner(decisions)
        self.last_decisions = decisions
        state = self.pruner.masked_state(decisions)
        value = float(self.reward_fn(MaskedModel(self.reward_base, state)))
        if not math.isfinite(value):
            ratio = self.mm.macs_for_plan(plan) / self.mm.total_macs
            raise AutoDFPError(f"the reward returned {value} for a plan at {ratio:.3f}x MACs; rewards must be finite")
        return value

    def finish(self) -> EpisodeResult:
        keep = self.mm.repair(self.chosen, self.target, self.tol, self.r_min)
        plan = self.make_plan(keep, self.strengths)
        macs = self.mm.macs(keep)
        reward = self.evaluate(plan)
        self.episodes += 1
        self.last = EpisodeResult(plan, macs, macs / self.mm.total_macs, reward, keep)
        return self.last


__all__ = ["EpisodeResult", "MaskedModel", "OBS_NAMES", "PruningEnv", "RewardFn"]
