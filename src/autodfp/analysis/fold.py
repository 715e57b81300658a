"""BatchNorm folding and per-group channel statistics, read from the weights alone.

The analysis must compare channels as the consumer sees them, i.e. after BN: two raw filters can
be parallel while their BN scales differ by 10×. Folding gives, per channel, the affine map
``y_c = f_c · x + b_c`` that produces the pre-activation, and BN's own parameters give the
Gaussian model ``y_c ~ N(β_c, γ_c²)`` of that pre-activation without any data.

For BN-free models (the BN-folded MobileNet-V2) there are no stored statistics. Their Gaussian
model comes from :func:`empirical_moments` on an input batch (synthetic by default): the mean and
std of each pre-activation channel, and optionally their correlation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn as nn

from autodfp.analysis.graph import GroupGraph, PrunableGroup, Stage, register_preactivation_hook
from autodfp.analysis.similarity import ChannelStats


def _conv_bias(conv: nn.Conv2d | nn.Linear) -> torch.Tensor:
    out = conv.weight.shape[0]
    bias = getattr(conv, "bias", None)
    return bias.detach().double() if bias is not None else torch.zeros(out, dtype=torch.float64)


def fold_stage(
    model: nn.Module, stage: Stage
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Folded (weight, bias) of a conv+BN stage, plus BN's (β, |γ|) when a BN exists."""
    conv = cast(nn.Conv2d | nn.Linear, model.get_submodule(stage.conv))  # a dense or depthwise layer
    w = conv.weight.detach().double()
    b = _conv_bias(conv)
    if stage.bn is None:
        return w, b, None, None
    bn = cast(nn.modules.batchnorm._BatchNorm, model.get_submodule(stage.bn))
    # torch types the running stats as optional; folding needs them, and a BN without them fails
    # at ``.detach()`` exactly as before
    running_mean, running_var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
    scale = bn.weight.detach().double() / torch.sqrt(running_var.detach().double() + bn.eps)
    w = w * scale.view(-1, *([1] * (w.dim() - 1)))
    b = scale * (b - running_mean.detach().double()) + bn.bias.detach().double()
    return w, b, bn.bias.detach().double(), bn.weight.detach().double().abs()


def dense_filters(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's filters written over its *whole* input, zero outside each filter's group.

    Filters of two conv groups read disjoint input channels, so their raw weights are not
    comparable as vectors; over the full input they are, and the comparison comes out right:
    orthogonal across groups (no similarity, zero correlation under the isotropic-input model of
    :mod:`autodfp.analysis.similarity`), unchanged within a group. (C_out, C_in/G, k…) → (C_out, C_in, k…).
    """
    if groups == 1:
        return weight
    out, per_in = weight.shape[0], weight.shape[1]
    full = weight.new_zeros((out, per_in * groups, *weight.shape[2:]))
    per_out = out // groups
    for g in range(groups):
        full[g * per_out : (g + 1) * per_out, g * per_in : (g + 1) * per_in] = weight[g * per_out : (g + 1) * per_out]
    return full


def grouped_filters(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of :func:`dense_filters`: each conv group's block of a dense view (the rest,
    zero for a grouped conv, is dropped)."""
    if groups == 1:
        return dense
    out, per_in = dense.shape[0], dense.shape[1] // groups
    per_out = out // groups
    return torch.cat(
        [dense[g * per_out : (g + 1) * per_out, g * per_in : (g + 1) * per_in] for g in range(groups)], dim=0
    )


def group_stats(
    model: nn.Module,
    group: PrunableGroup,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    corr: torch.Tensor | None = None,
    measured_from: int | None = None,
) -> ChannelStats:
    """The :class:`ChannelStats` of a group.

    For a depthwise chain the linearised filter of channel ``c`` is the outer product of its
    folded pointwise filter and folded depthwise kernel (see :mod:`autodfp.analysis.similarity`), and the
    bias and Gaussian model are those of the last stage, whose output the consumer sees.
    ``moments`` (mean, std of the last stage's pre-activation) overrides the BN model; it is
    required when the last stage has no BN. ``measured_from``: the positions a measured ``corr``
    came from (see :attr:`ChannelStats.measured_from`).
    """
    w, b, beta, gamma = fold_stage(model, group.producer)
    filters = dense_filters(w, group.granularity).reshape(w.shape[0], -1)
    for stage in group.passthrough:
        wd, b, beta, gamma = fold_stage(model, stage)
        filters = torch.einsum("cd,ck->cdk", filters, wd.reshape(wd.shape[0], -1)).reshape(wd.shape[0], -1)
    if moments is not None:
        mean, std = (t.double() for t in moments)
    elif beta is not None and gamma is not None:  # fold_stage gives both or neither
        mean, std = beta, gamma
    else:
        raise ValueError(f"group {group.name} has no BN after its last stage; pass measured moments")
    return ChannelStats(
        filters=filters,
        bias=b,
        mean=mean,
        std=std,
        activation=group.activation,
        corr=None if corr is None else corr.double(),
        measured_from=measured_from if corr is not None and measured_from else None,
    )


def raw_filters(model: nn.Module, group: PrunableGroup) -> torch.Tensor:
    """The producer's un-folded filters, (C, D): what textbook L1/L2 criteria rank.

    For a coupled group, every producer's filters side by side, (C, ΣD): the L1 norm of a row is
    then the sum of the per-producer L1 norms, a joint score of the channel across the stream.
    """
    convs = group.members if group.coupled and group.members else [group.producer.conv]
    ws = [cast(nn.Conv2d | nn.Linear, model.get_submodule(c)).weight.detach() for c in convs]
    return torch.cat([w.reshape(w.shape[0], -1) for w in ws], dim=1)


def stream_filters(model: nn.Module, group: PrunableGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """BN-folded filters of every producer of a coupled group side by side, and the summed bias.

    If channel ``p``'s row is ``α`` times channel ``k``'s (every producer with the same ``α > 0``,
    biases too) and the stream's non-linearity is positively homogeneous (ReLU, or none), the
    stream carries ``a_p = α·a_k`` at every depth: the geometry the similarity analysis reads.

    An SE-gated chain (``kind == "se_chain"``) is one producer path, gated: its filters are the
    chain's linearised ones (as in :func:`group_stats`) beside each gate's row and bias, and its
    bias the last stage's. Two channels whose chain filters and gate rows coincide carry the same
    value into the consumer; the gate is not homogeneous, so ``α ≠ 1`` promises nothing there.
    """
    if group.kind == "se_chain":
        chain = group_stats(model, group, moments=(torch.zeros(group.channels), torch.ones(group.channels)))
        gates = []
        for name in group.gates:
            g = cast(nn.Conv2d | nn.Linear, model.get_submodule(name))
            gates += [g.weight.detach().double().reshape(g.weight.shape[0], -1), _conv_bias(g)[:, None]]
        return torch.cat([chain.filters, *gates], dim=1), chain.bias
    folded = [
        fold_stage(model, Stage(conv, bn))
        for conv, bn in zip(group.members, group.member_bns or [None] * len(group.members))
    ]
    filters = torch.cat([w.reshape(w.shape[0], -1) for w, _, _, _ in folded], dim=1)
    bias = torch.stack([b for _, b, _, _ in folded]).sum(0)
    return filters, bias


def last_stage_module(model: nn.Module, group: PrunableGroup) -> nn.Module:
    st = group.last_stage
    return model.get_submodule(st.bn if st.bn is not None else st.conv)


def channel_columns(value: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``value`` as (C, P): one row per channel, positions (batch × spatial) pooled.

    A Linear layer reads and writes its channels in the *last* dimension, also on a feature map
    (ConvNeXt's blocks run their MLP channels-last, (N, H, W, C)); a conv, a BN and every other
    layer here in dimension 1.
    """
    if value.dim() == 2:
        return value.t()
    if channels_last:
        return value.reshape(-1, value.shape[-1]).t()
    return value.transpose(0, 1).reshape(value.shape[1], -1)


class _PooledMoments:
    """Per-channel sums of one layer's values over a batch, positions (batch × spatial) pooled,
    plus a reproducible sample of positions for the correlation.

    The sample keeps at most ``max_positions`` positions over the whole input (a share per chunk),
    drawn with the generator shared by every layer of one measurement.
    """

    def __init__(self, gen: torch.Generator, sample: bool, take: int) -> None:
        self.gen, self.sample, self.take = gen, sample, take
        self.n = 0
        self.s1: torch.Tensor | float = 0.0
        self.s2: torch.Tensor | float = 0.0
        self.samples: list[torch.Tensor] = []
        #: positions the correlation was computed from (set by :meth:`result`)
        self.used = 0
        #: the measured layer is a Linear (see :func:`channel_columns`); set by the caller's hook
        self.channels_last = False

    def add(self, value: torch.Tensor) -> None:
        y = channel_columns(value.detach().double(), self.channels_last)
        self.n += y.shape[1]
        self.s1 = self.s1 + y.sum(1)
        self.s2 = self.s2 + (y * y).sum(1)
        if self.sample:
            idx = torch.randperm(y.shape[1], generator=self.gen)[: min(y.shape[1], self.take)]
            self.samples.append(y[:, idx])

    def result(self, max_positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        mean = torch.as_tensor(self.s1) / self.n
        std = (torch.as_tensor(self.s2) / self.n - mean * mean).clamp_min(0).sqrt()
        corr = None
        if self.sample:
            ys = torch.cat(self.samples, dim=1)[:, :max_positions]
            self.used = int(ys.shape[1])
            corr = torch.nan_to_num(torch.corrcoef(ys), nan=0.0)
            corr.fill_diagonal_(1.0)
        return mean, std, corr


def _measure(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int,
    max_positions: int,
    names: list[str],
    sample: bool,
    attach: Callable[[str, _PooledMoments], Any],
) -> dict[str, _PooledMoments]:
    """Run ``x`` through ``model`` in chunks with one accumulator per name hooked by ``attach``."""
    gen = torch.Generator().manual_seed(0)
    take = max(1, max_positions * batch_size // max(1, x.shape[0]))
    acc = {n: _PooledMoments(gen, sample, take) for n in names}
    hooks = [attach(n, acc[n]) for n in names]
    try:
        model.eval()
        for i in range(0, x.shape[0], batch_size):
            model(x[i : i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return acc


@torch.no_grad()
def empirical_moments(
    model: nn.Module,
    graph: GroupGraph,
    x: torch.Tensor,
    with_corr: bool = False,
    max_positions: int = 20000,
    batch_size: int = 32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]]:
    """Per-channel mean/std (and correlation) of every prunable group's pre-activation on ``x``,
    and the number of positions the correlation came from (0 without one).

    The pre-activation is the last stage's output, or for a fused BN+activation layer (timm's
    ``BatchNormAct2d``) the input of its ``act``.

    Positions (batch × spatial) are pooled: the Gaussian model describes one activation value, not
    a feature map. At most ``max_positions`` positions per group are kept for the correlation,
    sampled with a fixed generator so the estimate is reproducible.
    """
    mods = {g.name: last_stage_module(model, g) for g in graph.prunable}

    def attach(name: str, acc: _PooledMoments) -> Any:
        acc.channels_last = isinstance(mods[name], nn.Linear)
        # the hook runs before an in-place activation overwrites the pre-activation
        return register_preactivation_hook(mods[name], acc.add)

    acc = _measure(model, x, batch_size, max_positions, list(mods), with_corr, attach)
    return {name: (*a.result(max_positions), a.used) for name, a in acc.items()}


@torch.no_grad()
def consumer_moments(
    model: nn.Module,
    consumers: dict[str, int],
    x: torch.Tensor,
    max_positions: int = 20000,
    batch_size: int = 32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Per-channel mean, std and correlation of each named layer's *input* on ``x``, and the
    number of positions the correlation came from.

    What a consumer of a residual stream reads is a sum over residual adds (and an activation),
    so it is measured where it is read. ``consumers`` maps a layer name to its input's channel
    count; inputs are (N, C[, H, W]), positions pooled as in :func:`empirical_moments`. A layer
    that reads pooled values (an SE block's ``fc1``) has one position per input: fewer, often,
    than it has channels, which is why the count travels with the correlation.
    """

    def attach(name: str, acc: _PooledMoments) -> Any:
        layer = model.get_submodule(name)
        acc.channels_last = isinstance(layer, nn.Linear)
        return layer.register_forward_pre_hook(lambda mod, args: acc.add(args[0]))

    acc = _measure(model, x, batch_size, max_positions, list(consumers), True, attach)
    result = {}
    for name, a in acc.items():
        mean, std, corr = a.result(max_positions)
        assert corr is not None  # sampled above
        result[name] = (mean, std, corr, a.used)
    return result
