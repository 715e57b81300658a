"""Surgery: plan → channel selection → reconstruction → physical removal with torch-pruning.

:class:`Pruner` holds everything about a model that does not depend on the plan (dependency
graph, per-group BN-folded statistics and similarity analyses), so a search that applies hundreds
of plans analyses each layer once. It offers two ways to realise a plan:

- :meth:`Pruner.apply` returns a physically smaller copy (real tensors, fewer channels);
- :meth:`Pruner.masked_state` returns only the edited consumer tensors, with the pruned input
  columns zeroed. Run through ``torch.func.functional_call`` this computes exactly the pruned
  model's function without copying or re-tracing the model, which is what a reward needs.

**Coupled groups** (residual streams, ``Pruner(..., coupled=True)``). A stream channel is written
by several producers (every conv+BN adding into the stream, and the shortcuts) and read by several
consumers, each of which sees a *different* value: the sum over the adds made so far, after the
stream's activation. So a stream decision carries one compensation per consumer
(``GroupDecision.per_consumer``), each fitted to the moments of that consumer's input measured on
the calibration batch (:func:`~autodfp.analysis.fold.consumer_moments`): the strategies run with
``activation="identity"`` on those values, so ``lsq`` is the ridge regression of the pruned
channels on the kept ones as the consumer reads them, ``mean`` replaces them by their measured
mean and ``autodfp``/``nm`` merge along the joint (all producers side by side) folded filters.
Channels are ranked jointly: the criteria see every producer's filters side by side.

What is exact: a channel whose every producer row (and bias) is a positive multiple ``α`` of a
kept channel's, in a ReLU (or linear) stream, is ``α`` times that channel at every consumer, and
a merge removes it without changing the output. What is not: a parameter-free
:class:`~autodfp.models.layers.ChannelPadShortcut` that copies a pruned channel into the next
stage's stream cannot absorb a compensation; that copy becomes zero (as it does in the pruned
model), and only the refinement, which re-fits the next stage's consumers on what they read,
corrects for it. The masked fast path reproduces the physically pruned model exactly by also
silencing the pruned channels in the stream (their producers' BN scale and shift, or conv rows and
bias, are zeroed; a pad shortcut's output map points them at its zero channel), which is exact
when the stream's activation maps 0 to 0 (ReLU, none).

**SE-gated chains** (``kind == "se_chain"``, pruned by default; see :mod:`autodfp.analysis.graph`).
torch-pruning removes channel ``c`` from the expand conv (and its BN), the depthwise conv (and its
BN), the SE ``fc2``'s output rows (and bias) and the input columns of both consumers, ``fc1`` and
the project conv. The consumers read different values (``fc1`` the pooled activations, the
project conv the gated maps), so, exactly as for a stream, each gets its own compensation fitted
to the moments of *its* input measured on the calibration batch. ``fc2`` needs none: a removed
channel's gate has nothing left to scale. What is exact: a channel that duplicates a kept one
(expand row, BNs, depthwise filter and gate row alike) is the same value at both consumers, and
``lsq`` without ridge predicts it exactly whenever the kept channels' measured covariance is
full rank; for ``fc1``, which sees one pooled position per image, that takes more calibration
images than channels. What is approximate: any other channel is replaced by its best linear
prediction on the calibration batch; for ``fc1`` the fit is to the pooled values it reads
(``W[:, p] E[pool a_p]`` is what the constant term folds into its bias), so the gate of every kept
channel moves only by what that prediction misses. The masked fast path zeroes the pruned
channels' input columns in ``fc1`` and the project conv, which is exactly the physically pruned
model (the pruned gates then scale values nobody reads); no stream silencing is needed.

**Parts of channel cuts** (``kind == "split"``; see :mod:`autodfp.analysis.graph`). A part of a split
or slice is rows ``start …`` of its producer; its filters (for the criteria and the merges) are those
rows of each member (:func:`part_filters`), and each place a consumer reads it (a ghost module's
consumer reads each channel twice) gets its own compensation fitted to what that read measures,
keyed ``consumer`` or ``consumer#column`` in ``GroupDecision.per_consumer``. The masked fast path
zeroes the pruned columns at every read, which is exactly the physically pruned model: a pruned
channel's depthwise copies and SE gates feed nothing else. :func:`prune_channels` maps every
group's removal on the unpruned graph and cuts each layer once, then rewrites the forward code's
split sizes and slice bounds (:func:`autodfp.analysis.splits.apply_cuts`).

**Consumers with neither a bias nor a BatchNorm** (DenseNet's ``conv2``, timm's bias-free
heads). A compensation ``a_p ≈ A·a_kept + c`` leaves a constant ``W[:, p]·c`` per output channel
of the consumer. It needs a home: the BN after the consumer absorbs it in its running mean, a
bias in its bias. A consumer with neither gets a bias, a zero vector plus that constant, in the
pruned model (:meth:`Pruner.apply`) and in the masked fast path alike; saved models record it and
:func:`autodfp.eval.export.load_pruned` re-creates it. This is exact, like a BN shift: the layer
then computes ``W·x + b`` with ``b`` the constant. The one structural change is that extra
parameter (a few floats per output channel; no MACs are counted for biases).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn as nn
import torch_pruning as tp

from autodfp.analysis.fold import (
    consumer_moments,
    dense_filters,
    empirical_moments,
    fold_stage,
    group_stats,
    grouped_filters,
    raw_filters,
    stream_filters,
)
from autodfp.analysis.graph import GroupGraph, PrunableGroup, Stage, channel_cut_inputs, find_groups, trace_graph
from autodfp.analysis.similarity import ChannelAnalysis, ChannelStats, analyze
from autodfp.analysis.splits import apply_cuts
from autodfp.compress.criteria import select_channels
from autodfp.compress.plan import Plan, kept_channels
from autodfp.compress.reconstruct import STRATEGIES, Compensation, blockwise, fold_into_consumer, reconstruct
from autodfp.errors import PlanError
from autodfp.models.layers import ChannelPadShortcut


@dataclass
class GroupDecision:
    """Kept/pruned channels of one group and how its consumers compensate.

    ``per_consumer`` (coupled groups): each consumer's own compensation, which replaces
    ``compensation`` for that consumer.
    """

    kept: torch.Tensor
    pruned: torch.Tensor
    compensation: Compensation | None
    per_consumer: dict[str, Compensation] | None = None

    def for_consumer(self, consumer: str) -> Compensation | None:
        if self.per_consumer is not None and consumer in self.per_consumer:
            return self.per_consumer[consumer]
        return self.compensation


@dataclass
class PruneResult:
    model: nn.Module
    plan: Plan
    decisions: dict[str, GroupDecision] = field(repr=False)

    @property
    def kept(self) -> dict[str, list[int]]:
        return {k: d.kept.tolist() for k, d in self.decisions.items()}


class Pruner:
    """Per-model cache of groups, statistics and analyses; applies plans.

    ``calibration`` is an optional input batch (synthetic by default upstream). It is required for
    groups without BN statistics, and with ``corr_source="calibration"`` it also supplies the
    pre-activation correlations used by the ``lsq`` strategy instead of filter geometry.
    ``coupled=True`` also makes residual-stream groups prunable (see the module docstring); they
    need the calibration batch, as do the SE-gated chains that are prunable by default.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, ...],
        graph: GroupGraph | None = None,
        calibration: torch.Tensor | None = None,
        corr_source: str = "geometry",
        analysis_kwargs: dict[str, Any] | None = None,
        coupled: bool = False,
    ) -> None:
        self.model = model.eval()
        self.input_shape = tuple(input_shape)
        self.coupled = bool(coupled)
        self.graph = graph if graph is not None else find_groups(model, self.input_shape, coupled=self.coupled)
        self.calibration = calibration
        if corr_source not in ("geometry", "calibration"):
            raise PlanError(f"unknown correlation source '{corr_source}' (geometry or calibration)")
        if corr_source == "calibration" and calibration is None:
            raise PlanError("corr_source='calibration' needs a calibration batch")
        self.corr_source = corr_source
        self.analysis_kwargs = analysis_kwargs or {}
        self._moments: dict[str, tuple] | None = None
        self._stats: dict[str, ChannelStats] = {}
        self._analysis: dict[str, ChannelAnalysis] = {}
        self._raw: dict[str, torch.Tensor] = {}
        self._consumer_moments: dict[str, tuple] | None = None
        self._stream_stats: dict[tuple[str, str], ChannelStats] = {}

    # -- per-group cached quantities -------------------------------------------------------
    def _group(self, name: str) -> PrunableGroup:
        try:
            return self.graph.get(name)
        except KeyError:
            raise PlanError(f"unknown group '{name}'") from None

    def _calibration_moments(self) -> dict[str, tuple]:
        if self._moments is None:
            if self.calibration is None:
                raise PlanError(
                    "this model has groups without BatchNorm statistics; a calibration batch "
                    "(synthetic inputs) is needed to model their activations"
                )
            self._moments = empirical_moments(
                self.model, self.graph, self.calibration, with_corr=self.corr_source == "calibration"
            )
        return self._moments

    def _measured_inputs(self) -> dict[str, tuple]:
        """Moments of every prunable coupled group's consumer inputs on the calibration batch."""
        if self._consumer_moments is None:
            if self.calibration is None:
                raise PlanError(
                    "coupled (residual-stream) and SE-gated groups need a calibration batch "
                    "(synthetic inputs) to measure what their consumers read"
                )
            wanted = {c: g.channels for g in self.graph.prunable if g.coupled for c in g.consumers}
            self._consumer_moments = consumer_moments(self.model, wanted, self.calibration)
        return self._consumer_moments

    def consumer_stats(self, name: str, consumer: str) -> ChannelStats:
        """A coupled group's :class:`ChannelStats` as ``consumer`` reads the stream (measured).

        ``consumer`` is a slot key (:attr:`~autodfp.analysis.graph.PrunableGroup.slots`): a consumer's
        name, or ``"name#column"`` for a further place where it reads the channels.
        """
        key = (name, consumer)
        if key not in self._stream_stats:
            g = self._group(name)
            filters, bias = part_filters(self.model, g) if _partial(self.model, g) else stream_filters(self.model, g)
            mean, std, corr, positions = self._measured_inputs()[consumer.partition("#")[0]]
            cols = slice(g.offset(consumer), g.offset(consumer) + g.channels)  # the group's part of the input
            mean, std, corr = mean[cols], std[cols], corr[cols, cols]
            self._stream_stats[key] = ChannelStats(
                filters=filters,
                bias=bias,
                mean=mean,
                std=std,
                activation="identity",
                corr=corr,
                measured_from=positions,
            )
        return self._stream_stats[key]

    def stats(self, name: str) -> ChannelStats:
        if name not in self._stats:
            g = self._group(name)
            if g.coupled:  # what the first main consumer reads stands for the stream in analyses
                self._stats[name] = self.consumer_stats(name, g.main_consumers[0])
                return self._stats[name]
            has_bn = g.last_stage.bn is not None
            moments = corr = None
            positions = 0
            if not has_bn or self.corr_source == "calibration":
                mean, std, corr, positions = self._calibration_moments()[name]
                moments = (mean, std) if not has_bn else None
            self._stats[name] = group_stats(self.model, g, moments=moments, corr=corr, measured_from=positions)
        return self._stats[name]

    def analysis(self, name: str, block: int | None = None) -> ChannelAnalysis:
        """The similarity analysis of a group, or with ``block`` of one conv group of a group a
        grouped conv reads (its channels are only ever merged within that conv group)."""
        key = name if block is None else f"{name}#{block}"
        if key not in self._analysis:
            stats = self.stats(name)
            if block is not None:
                per = self._group(name).units
                stats = stats.subset(torch.arange(block * per, (block + 1) * per))
            self._analysis[key] = analyze(stats, **self.analysis_kwargs)
        return self._analysis[key]

    def raw_filters(self, name: str) -> torch.Tensor:
        if name not in self._raw:
            g = self._group(name)
            self._raw[name] = part_raw_filters(self.model, g) if _partial(self.model, g) else raw_filters(self.model, g)
        return self._raw[name]

    # -- plan → decisions --------------------------------------------------------------------
    def decide(self, plan: Plan) -> dict[str, GroupDecision]:
        plan.validate(self.graph)
        decisions: dict[str, GroupDecision] = {}
        for g in self.graph.prunable:
            if g.name not in plan.ratios:
                continue
            k = kept_channels(g, float(plan.ratios[g.name]))
            if k == g.channels:
                continue
            stats = self.stats(g.name)
            merges = plan.strategy in ("nm", "autodfp")  # strategies that read the analysis
            # a blockwise group's merges read one analysis per conv group instead (below)
            needs_analysis = plan.criterion == "cluster" or (merges and not g.blockwise)
            analysis = self.analysis(g.name) if needs_analysis else None
            if g.name in plan.keep:
                kept = torch.tensor(sorted(plan.keep[g.name]), dtype=torch.long)
                mask = torch.ones(g.channels, dtype=torch.bool)
                mask[kept] = False
                pruned = torch.arange(g.channels)[mask]
            else:
                kept, pruned = select_channels(
                    plan.criterion,
                    stats,
                    analysis,
                    k,
                    raw_filters=self.raw_filters(g.name),
                    seed=int(plan.params.get("seed", 0)),
                    granularity=g.granularity,
                )
            comp = None
            per_consumer = None
            params = _strategy_params(plan.strategy, plan.params_for(g.name))
            if plan.strategy != "none" and g.coupled:
                per_consumer = {
                    c: reconstruct(plan.strategy, self.consumer_stats(g.name, c), analysis, kept, pruned, **params)
                    for c, _, _, _ in g.slots
                }
                comp = per_consumer[g.main_consumers[0]]
            elif plan.strategy != "none" and g.blockwise:
                comp = self._blockwise_reconstruct(g, plan.strategy, merges, kept, pruned, params)
            elif plan.strategy != "none":
                comp = reconstruct(plan.strategy, stats, analysis, kept, pruned, **params)
            decisions[g.name] = GroupDecision(kept, pruned, comp, per_consumer)
        return decisions

    def _blockwise_reconstruct(
        self,
        g: PrunableGroup,
        strategy: str,
        merges: bool,
        kept: torch.Tensor,
        pruned: torch.Tensor,
        params: dict[str, Any],
    ) -> Compensation:
        """A compensation for a group a grouped conv reads: each conv group rebuilt on its own."""
        stats = self.stats(g.name)

        def fit(idx, k, p, _kpos, _ppos) -> Compensation:
            analysis = self.analysis(g.name, int(idx[0]) // g.units) if merges else None
            return reconstruct(strategy, stats.subset(idx), analysis, k, p, **params)

        return blockwise(g.granularity, g.channels, kept, pruned, fit)

    # -- realisation -----------------------------------------------------------------------
    def _edited_tensors(
        self, decisions: dict[str, GroupDecision], zero_pruned: bool, only: Collection[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """New values for every consumer weight/bias/BN mean touched by the decisions.

        ``only`` limits the consumer edits to those groups (the refinement rewrites one group at a
        time); with ``zero_pruned`` the pruned channels of every coupled decision are silenced in
        the stream all the same, last, so no rewritten tensor brings one back.
        """
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        out: dict[str, torch.Tensor] = {}

        def current(name: str) -> torch.Tensor:
            if name in out:
                return out[name]
            # every name asked for is a parameter or buffer of a consumer layer or its BN; the cast
            # keeps the old failure (None has no ``detach``) should one ever be missing
            src = cast(torch.Tensor, params.get(name, buffers.get(name)))
            return src.detach().clone()

        for gname, d in decisions.items():
            if only is not None and gname not in only:
                continue
            g = self._group(gname)
            for slot, cons, cbn, off in g.slots:  # off: a concat puts other channels before the group's
                wname = f"{cons}.weight"
                groups = int(getattr(self.model.get_submodule(cons), "groups", 1))
                # a grouped consumer is edited as the dense conv it equals (zero outside its blocks);
                # blockwise compensations keep it so
                w = dense_filters(current(wname), groups)
                comp = d.for_consumer(slot)
                kept, pruned = d.kept + off, d.pruned + off
                if comp is not None:
                    new_kept, delta = fold_into_consumer(w.double(), comp, kept, pruned)
                    w[:, kept] = new_kept.to(w.dtype)
                    delta = delta.to(w.dtype)
                    bname = f"{cons}.bias"
                    if cbn is not None:
                        rm = current(f"{cbn}.running_mean")
                        out[f"{cbn}.running_mean"] = rm - delta
                    elif bname in params or bname in out:
                        out[bname] = current(bname) + delta
                    elif bool(delta.abs().max() > 0):
                        # neither a bias nor a BN: the consumer gets a bias (see apply), as exact
                        # a home for the constant as a BN shift would be
                        out[bname] = delta.clone()
                if zero_pruned:
                    w[:, pruned] = 0
                out[wname] = grouped_filters(w, groups)
        if zero_pruned:
            for gname, d in decisions.items():
                g = self._group(gname)
                if g.coupled and g.kind not in _MEASURED_KINDS and d.pruned.numel():  # a stream
                    self._silence_stream(g, d.pruned, current, out)
        return out

    def _silence_stream(
        self, g: PrunableGroup, pruned: torch.Tensor, current: Callable[[str], torch.Tensor], out: dict
    ) -> None:
        """Make the pruned stream channels carry 0 everywhere, as they do once removed.

        Consumers already ignore them; this matters for parameter-free channel copies (a pad
        shortcut carrying the channel into the next stage's stream), which the physically pruned
        model feeds with zeros.
        """
        starts = g.member_starts or [0] * len(g.members)
        for conv, bn, first in zip(g.members, g.member_bns or [None] * len(g.members), starts):
            names = [f"{bn}.weight", f"{bn}.bias"] if bn is not None else [f"{conv}.weight"]
            if bn is None and getattr(self.model.get_submodule(conv), "bias", None) is not None:
                names.append(f"{conv}.bias")
            for tname in names:
                t = current(tname)
                t[pruned + first] = 0  # the member's rows of these channels
                out[tname] = t
        for sc in g.shortcuts:
            mod = cast(ChannelPadShortcut, self.model.get_submodule(sc))
            src = current(f"{sc}.src")
            src[pruned] = mod.in_channels  # the shortcut's zero channel
            out[f"{sc}.src"] = src

    def masked_state(
        self, plan: Plan | dict[str, GroupDecision], only: Collection[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Tensors that, substituted into the original model, compute the pruned model exactly.

        ``only``: rewrite the consumers of these groups alone (plus the stream silencing of every
        coupled decision, see :meth:`_edited_tensors`).
        """
        decisions = self.decide(plan) if isinstance(plan, Plan) else plan
        return self._edited_tensors(decisions, zero_pruned=True, only=only)

    def apply(self, plan: Plan, decisions: dict[str, GroupDecision] | None = None) -> PruneResult:
        """A physically pruned deep copy of the model.

        ``decisions`` (from :meth:`decide`, possibly refined by :func:`autodfp.compress.refine.refine`)
        replaces the plan's own; the plan is still what the result reports.
        """
        decisions = self.decide(plan) if decisions is None else decisions
        net = copy.deepcopy(self.model)
        edited = self._edited_tensors(decisions, zero_pruned=False)
        with torch.no_grad():
            for name, value in edited.items():
                set_tensor(net, name, value)
        removed = {k: d.pruned.tolist() for k, d in decisions.items()}
        for name, d in decisions.items():
            g = self._group(name)
            if g.blockwise and d.pruned.numel():
                removed[name] = _kept_first(net, g, d.kept)
        prune_channels(net, self.graph, removed, self.input_shape)
        return PruneResult(net, plan, decisions)


def _kept_first(net: nn.Module, g: PrunableGroup, kept: torch.Tensor) -> list[int]:
    """Reorder the channels of a group a grouped conv reads so each conv group lists its kept
    channels first; return the pruned ones' new indices (the same positions in every conv group).

    torch-pruning removes a grouped conv's input channels by their position within each conv
    group, so every group must lose the same positions. Reordering channels inside a conv group,
    consistently in the producer's rows (and its BN) and in every consumer's columns, changes no
    output; afterwards the pruned channels sit at the same positions everywhere.
    """
    per = g.units
    keep = set(kept.tolist())
    order: list[int] = []
    removed: list[int] = []
    for b in range(g.granularity):
        block = range(b * per, (b + 1) * per)
        ks = [i for i in block if i in keep]
        order += ks + [i for i in block if i not in keep]
        removed += list(range(b * per + len(ks), (b + 1) * per))
    perm = torch.tensor(order)
    with torch.no_grad():
        rows = [f"{g.producer.conv}.weight", f"{g.producer.conv}.bias"]
        if g.producer.bn is not None:
            rows += [f"{g.producer.bn}.{t}" for t in ("weight", "bias", "running_mean", "running_var")]
        state = dict(net.named_parameters()) | dict(net.named_buffers())
        for name in rows:
            if state.get(name) is not None:
                state[name].copy_(state[name][perm])
        for cons in g.consumers:
            layer = cast(nn.Conv2d | nn.Linear, net.get_submodule(cons))
            groups = int(getattr(layer, "groups", 1))
            w = dense_filters(layer.weight.detach(), groups).clone()
            off = g.offset(cons)
            w[:, off : off + g.channels] = w[:, off + perm]
            layer.weight.copy_(grouped_filters(w, groups))
    return removed


def set_tensor(model: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Write ``value`` into the parameter or buffer ``name`` of ``model`` (in place, no grad).

    A consumer with neither a bias nor a BN gets its missing bias here (see the module docstring),
    and ``value=None`` takes such a bias away again (a reused working copy is restored).
    """
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name)
    current = getattr(module, attr)
    if value is None:
        setattr(module, attr, None)
    elif current is None:  # trainable like the layer's weight, so fine-tuning the result trains it too
        weight = getattr(module, "weight", None)
        trainable = weight.requires_grad if isinstance(weight, torch.Tensor) else True
        setattr(module, attr, nn.Parameter(value.detach().clone(), requires_grad=trainable))
    else:
        current.copy_(value)


#: parameters a plan may set for every strategy; a strategy that has no use for one ignores it
_SHARED_PARAMS = {"strength", "seed"}


def _strategy_params(strategy: str, params: dict[str, Any]) -> dict[str, Any]:
    accepted = inspect.signature(STRATEGIES[strategy]).parameters
    unknown = [k for k in params if k not in accepted and k not in _SHARED_PARAMS]
    if unknown:
        raise PlanError(f"strategy '{strategy}' does not take parameter(s) {', '.join(sorted(unknown))}")
    return {k: v for k, v in params.items() if k in accepted}


#: kinds whose consumers are compensated from their own measured inputs, with no stream to silence
_MEASURED_KINDS = ("se_chain", "dw_branches", "concat", "split")


def _partial(model: nn.Module, g: PrunableGroup) -> bool:
    """Whether a group's members own more rows than its channels (a part of a split or slice, or a
    ghost's gate rows read twice): its filters are those rows of each member, not whole layers."""
    if g.kind == "split" or any(g.member_starts) or g.start:
        return True
    return any(cast(nn.Conv2d | nn.Linear, model.get_submodule(m)).weight.shape[0] != g.channels for m in g.members)


def _member_rows(model: nn.Module, g: PrunableGroup) -> list[tuple[str, str | None, slice]]:
    """``(conv, bn, rows)`` of each member: the rows that carry the group's channels."""
    starts = g.member_starts or [0] * len(g.members)
    bns = g.member_bns or [None] * len(g.members)
    return [(c, bn, slice(s, s + g.channels)) for c, bn, s in zip(g.members, bns, starts)]


def part_filters(model: nn.Module, g: PrunableGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~autodfp.analysis.fold.stream_filters` of a group whose members own other rows too.

    Each member contributes only the rows of the group's channels: a producer (or a stream's
    writer) its BN-folded rows, whose biases add up; an SE gate its raw rows and bias, side by
    side (as for an SE chain). Two channels equal in every member's rows carry one value into
    every consumer, which is what the similarity analysis reads.
    """
    filters: list[torch.Tensor] = []
    bias = torch.zeros(g.channels, dtype=torch.float64)
    for conv, bn, rows in _member_rows(model, g):
        if conv in g.gates:
            layer = cast(nn.Conv2d | nn.Linear, model.get_submodule(conv))
            w = layer.weight.detach().double()[rows]
            b = layer.bias.detach().double()[rows] if layer.bias is not None else torch.zeros(g.channels).double()
            filters += [w.reshape(g.channels, -1), b[:, None]]
            continue
        w, b, _, _ = fold_stage(model, Stage(conv, bn))
        filters.append(w[rows].reshape(g.channels, -1))
        bias = bias + b[rows]
    return torch.cat(filters, dim=1), bias


def part_raw_filters(model: nn.Module, g: PrunableGroup) -> torch.Tensor:
    """:func:`~autodfp.analysis.fold.raw_filters` of such a group: each member's rows of its channels."""
    ws = [
        cast(nn.Conv2d | nn.Linear, model.get_submodule(conv)).weight.detach()[rows].reshape(g.channels, -1)
        for conv, _, rows in _member_rows(model, g)
    ]
    return torch.cat(ws, dim=1)


def prune_channels(
    model: nn.Module, graph: GroupGraph, pruned: dict[str, list[int]], input_shape: tuple[int, ...]
) -> nn.Module:
    """Remove channels in place with torch-pruning (producer, pass-through and consumers together).

    Every group's removal is mapped on the graph of the model as it is, and each layer is then cut
    once, by all its indices together. Pruning group after group instead would need each later
    mapping to see the earlier cuts, and torch-pruning does not move a split's part offsets after a
    prune. Last, the splits and slices whose parts changed get their new sizes in the forward
    code's attributes, and a forward pass checks them (:func:`~autodfp.analysis.splits.apply_cuts`).
    """
    if not any(pruned.values()):
        return model
    example = torch.zeros(1, *input_shape)
    dg, sites = trace_graph(model, example)
    merged: dict[tuple[int, Any], tuple[Any, set[int]]] = {}
    for name, idxs in pruned.items():
        if not idxs:
            continue
        g = graph.get(name)
        module = model.get_submodule(g.producer.conv)
        fn = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        group = dg.get_pruning_group(module, fn, idxs=[g.start + int(i) for i in idxs])
        for item in group.items:
            key = (id(item.dep.target), item.dep.handler)
            merged.setdefault(key, (item.dep, set()))[1].update(int(i) for i in item.idxs)
    removed_at: dict[int, set[int]] = {}  # by graph node: the channels removed from its output
    for dep, rows in merged.values():
        if dg.is_out_channel_pruning_fn(dep.handler):  # (a layer's input columns are another matter)
            removed_at.setdefault(id(dep.target), set()).update(rows)
        _prune_item(dg, dep, sorted(rows))
    by_fn = {id(s.grad_fn): s for s in sites if s.grad_fn is not None}
    cut: dict[str, set[int]] = {}
    for node_id, nodes in channel_cut_inputs(dg).items():
        for node in nodes:
            site = by_fn.get(id(node.grad_fn))
            if site is not None and removed_at.get(node_id):
                cut.setdefault(site.key, set()).update(removed_at[node_id])
    apply_cuts(model, sites, cut, lambda: model(example))
    return model


def _prune_item(dg: tp.DependencyGraph, dep: Any, idxs: list[int]) -> None:
    """Apply one layer's cut, as torch-pruning's ``Group.prune`` does for each of its items.

    The bookkeeping of torch-pruning's functional nodes (concat, split, slice, element-wise ops) is
    skipped: the graph is not used again, and a split's bookkeeping does not hold up across
    several cuts anyway.
    """
    target = dep.target
    if target.type == tp.ops.OPTYPE.PARAMETER:  # an unwrapped nn.Parameter: replaced, then re-attached
        old = target.module
        name = dg._param_to_name.pop(old)
        new = dep(idxs)
        owner_name, _, attr = name.rpartition(".")
        owner = dg.model.get_submodule(owner_name) if owner_name else dg.model
        setattr(owner, attr, new)
        dg._param_to_name[new] = name
        return
    if type(target.module).__module__.startswith("torch_pruning"):
        return
    dep(idxs)
