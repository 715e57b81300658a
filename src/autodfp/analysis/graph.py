"""Prunable channel groups, found with torch-pruning's dependency graph.

A *group* is a set of channels that must be removed together. For reconstruction we need more
than torch-pruning's flat list of (layer, dimension) pairs: which layer *produces* the channels
(conv + its BN), which layers merely *pass them through* (a depthwise conv + BN, as in MobileNet
pointwise→depthwise chains), which layers *consume* them on their input side, and which
activation sits between the last producing stage and the consumers. This module recovers that
structure once per model; later stages refer to layers by their qualified names, so a group stays
valid for every copy of the model.

Groups are *inner* when one producer feeds its consumers directly (ResNet block ``conv1``,
MobileNet chains, plain VGG convs) and *coupled* when a residual add, a channel-pad shortcut or a
concat ties several producers together. Only inner groups are pruned by default: coupled groups
change the residual stream and need reconstruction across every tied layer.

With ``find_groups(..., coupled=True)`` a coupled group is prunable when it is a *residual
stream*: every tie is an element-wise add (a residual add, an identity shortcut) or a
:class:`~autodfp.models.layers.ChannelPadShortcut`, and every layer on it is a dense conv/linear
producer (with its BN) or consumer. Its ``members`` are all producers (``member_bns`` their BNs),
``shortcuts`` the channel-pad shortcuts whose *output* channels are the stream's. The value a
consumer reads is the sum over the adds (after an activation, in ResNets), so no per-producer
Gaussian model describes it: :mod:`autodfp.compress.surgery` measures it at each consumer's input
on the calibration batch and compensates each consumer for what *it* sees. Streams tied through
anything else (a concat, a split, a reshape, a multiplicative gate, a grouped or depthwise conv, a
custom op) stay unprunable, with the reason in ``PrunableGroup.reason``; SE gates are the one
multiplicative tie handled, below.

**Squeeze-and-excitation chains** (MobileNetV3, EfficientNet) are prunable by default, as
``kind == "se_chain"``. Their expansion channels go expand conv → BN → act → depthwise → BN → act
→ ``x * sigmoid(fc2(act(fc1(pool(x)))))`` → project conv, so torch-pruning ties the SE ``fc2``
to them as a second producer (through the multiply). That tie is benign: channel ``c``'s gate is
``fc2``'s row ``c`` and is only ever used on channel ``c``, so removing the channel removes its
gate (``fc2``'s row and bias entry) and nothing else. :func:`_se_gates` accepts a coupled group
as such a chain only if every extra producer reaches the channels through sigmoid-like ops into
a multiply, every multiply of the group is one of those gates, each gate reads (through
element-wise ops and BNs) a dense consumer of the group itself (``fc1``, listed in ``squeezes``),
and nothing else ties the channels: a residual add, a concat, a shortcut or an ungated product
keeps the coupled reason above. ``members`` lists the main producer and the gates, ``gates`` the
gates. The project conv reads ``act(dw(…)) · gate`` and ``fc1`` the pooled ``act(dw(…))``; no
BN model describes either, so, as for streams, :mod:`autodfp.compress.surgery` measures each
consumer's input on the calibration batch and compensates each consumer on its own
(``activation == "identity"``). The channels the SE ``fc1`` produces (the squeeze) remain an
ordinary ``conv`` group feeding ``fc2``.

**Parallel depthwise branches** (``kind == "dw_branches"``, prunable by default): a detector's
source layer (MobileNet-SSD, SSDLite, Ultra-Light) feeds the next block's depthwise conv *and*
each head's, in parallel, and maybe a head that reads it directly. torch-pruning lists every one
of those depthwise convs (and their BNs) in the group, which is right for removal, but no single
"last stage" describes what the consumers read: each reads its own branch. :func:`_is_chain`
tells such a group from a chain (each depthwise conv reading the one before it); the group is
then handled like an SE chain, ``coupled`` with ``activation == "identity"``, and
:mod:`autodfp.compress.surgery` compensates each consumer from its own input measured on the
calibration batch. Nothing ties the channels besides the depthwise convs, which act per channel,
so a channel equal to a kept one in the producer and in every branch is that channel at every
consumer, and ``lsq`` removes it exactly.

**Grouped convolutions** (ResNeXt, RegNet; ``groups`` G > 1, not depthwise). As a *producer*, a
grouped conv's output channels form G contiguous blocks, one per conv group. Removing rows keeps
the conv valid only if every block loses as many, so the group has ``granularity == G``: plans
count it in channels per conv group (:attr:`PrunableGroup.units`), the selection keeps the best
rows of each block, and torch-pruning removes them. The consumers (dense convs) are compensated as
for any group; the analysis writes each filter over the whole input, zero outside its block
(:func:`autodfp.analysis.fold.dense_filters`), so channels of different blocks are never
"similar". Its consumers may be an SE branch (RegNetY): the group is then an SE chain with the same
granularity. As a *consumer* (``grouped_consumers``; :attr:`PrunableGroup.blockwise`), a grouped
conv reads input channel ``i`` only in the filters of conv group ``i // (C/G)``: the feeding group
gets ``granularity == G`` too (as many channels leave each block), each pruned channel is rebuilt
from kept channels of its own block (:func:`autodfp.compress.reconstruct.blockwise`), and before
torch-pruning removes the channels, which it does by position within each block, the surgery
reorders every block so its kept channels come first. A group read by grouped convs of different
``groups``, or through a depthwise conv as well, stays whole with the reason "read by grouped conv …".

**Channel cuts** (``kind == "split"``, prunable by default): the inverse of the concat groups. A
split, chunk or channel slice (``torch.split(x, sizes, 1)``, ``x[:, a:b]``) cuts a producer's rows
into parts that go to different layers (MixNet's mixed depthwise convs, Res2Net's scales, a
layer fed by half of a tensor), so each part is its own group, named ``producer[a:b]`` (its rows
``a … b−1``; :attr:`PrunableGroup.start`), its consumers reading it at their offsets. Rows are
parted where torch-pruning's root indices show they reach different layers, or the same ones a
different number of times (:func:`_segments`). The same kind covers channels a consumer reads as
*blocks* of its input more than once: a ghost module concatenates a primary conv's channels with a
depthwise "cheap" conv of them, so the next conv reads each channel twice (:attr:`PrunableGroup.blocks`),
maybe after a depthwise conv over both halves and an SE gate (whose rows, two per channel, the gate
conv gives up: :attr:`PrunableGroup.member_starts`). Like a concat group, such a group is
``coupled`` with ``activation == "identity"``: :mod:`autodfp.compress.surgery` measures what each
read (:attr:`PrunableGroup.slots`) sees on the calibration batch and compensates it on its own. The
sizes of a cut live in the model's forward code, so a part is prunable only where
:mod:`autodfp.analysis.splits` found the attribute that holds them (a list passed to the split,
the one int attribute equal to a split size or slice bound); the surgery rewrites it after the
physical prune and checks the cuts by a forward pass. Kept whole, with the reason: a chunk (its
parts can only shrink together), a split size or bound no single attribute holds, a layer reading
several parts of one split at once, a concat torch-pruning cannot size (a slice narrows it, as in a
ghost module of odd width). A part tied by a residual add (Res2Net's later scales add the
previous scale's output) is a residual stream: coupled, prunable with ``coupled=True`` like any
other, its members' rows and its consumers' columns found as whole blocks.

A group whose channels reach the model's output without passing another conv/linear layer (the
classifier, a detection head) is never prunable: that would change the output's shape. The
groups that feed such a layer are not pruned by default either ("feeds the classifier"), unless
the layer is a dense-prediction head (a conv) and the group also feeds the rest of the network:
a detector's source features are intermediate, and the head is compensated like any consumer.

The activation between the last stage and the consumers is read from one forward pass (see
:func:`_detect_activations`). The pre-activation is captured *cloned*: an in-place activation
(``nn.ReLU(inplace=True)``, as in every torchvision model) would otherwise overwrite it and the
activation would read as "identity". A fused norm+activation layer (timm's ``BatchNormAct2d``, a
``BatchNorm2d`` subclass whose ``act`` runs inside its forward) counts as the stage's BN, and its
``act`` as the group's activation; its pre-activation is the input of that ``act``.

**Max-pooling between the activation and a consumer** (VGG) does not make a group unprunable; the
group lists it in ``pools``. Max-pool is channel-wise, so removing a channel commutes with it, and
a merge ``a_p = α·a_k`` (α > 0) passes through it exactly (max-pool is positively homogeneous).
The rest of a compensation ``a_p ≈ A·a_kept + c`` is folded into a consumer that sees the *pooled*
channels, where it is an approximation: the max of a linear combination is not the linear
combination of the maxes, and ``c`` is built from ``E[a]`` where the consumer sees
``E[maxpool(a)] ≥ E[a]``. Refinement (:mod:`autodfp.compress.refine`) fits on the consumer's real,
pooled input and so has no such gap. Measured with ``benchmarks/maxpool_passthrough.py``: a
random tiny VGG (six conv–BN–ReLU, four 2×2 max-pools, 2-layer MLP head; BN statistics from
forward passes over 600 CIFAR-10 images), relative logit MSE on 317 other images, mean of 3
seeds. Pruning the three groups behind a max-pool to 75 % / 50 % of their channels: no
compensation 0.283 / 0.445, ``mean`` 0.227 / 0.364, ``autodfp`` 0.223 / 0.361, ``lsq`` 0.220 /
0.355, and 0.105 / 0.162 for every strategy after refinement. Compensation thus helps through
a max-pool (about −20 % error), if less than for the two groups without one (none 0.298 / 0.505
against ``lsq`` 0.201 / 0.287, about −35 %). Top-1 agreement, noisy on a random network's flat
logits, did not follow at 50 % behind the pools (0.644 with no compensation, 0.58–0.61 with
one; without pools 0.462 → 0.59–0.63); refinement brings both sets to ≈ 0.72. Other poolings
between producer and consumer (avg, adaptive) still read as an unknown activation and leave the
group unprunable.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeGuard

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch.utils.hooks import RemovableHandle

from autodfp.analysis.similarity import ACTIVATIONS, activation_name, apply_activation
from autodfp.analysis.splits import CutSite, cut_bounds, patch_split_mapping, recording, unmapped_split
from autodfp.errors import ModelError
from autodfp.models.layers import CUSTOM_PRUNERS, ChannelPadShortcut


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_dense(m: nn.Module) -> TypeGuard[nn.Linear | nn.Conv2d]:
    """A conv with groups=1 or a linear layer: the only producers/consumers we reconstruct."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def is_grouped(m: nn.Module) -> TypeGuard[nn.Conv2d]:
    """A grouped conv that is not depthwise (ResNeXt, RegNet): pruned by equal numbers of channels
    per conv group (see "Grouped convolutions" in the module docstring)."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not is_depthwise(m)


def _conv_groups(m: nn.Module) -> int:
    return int(m.groups) if isinstance(m, nn.modules.conv._ConvNd) else 1


def _mixes_channels(m: nn.Module) -> bool:
    """A layer whose outputs are new channels (not the input's channels, reordered or scaled)."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return not (m.groups > 1 and m.groups == m.in_channels == m.out_channels)
    return isinstance(m, (nn.Linear, nn.MultiheadAttention, nn.RNNBase, nn.Embedding))


def fused_activation(module: nn.Module) -> nn.Module | None:
    """The activation a fused BN layer applies to its own output (timm ``BatchNormAct2d.act``), if any."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        act = getattr(module, "act", None)
        if isinstance(act, nn.Module):
            return act
    return None


def register_preactivation_hook(module: nn.Module, fn: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """Call ``fn(y)`` with the pre-activation output of a stage's last module on every forward.

    That is the module's output, or for a fused BN the input of its ``act``. ``y`` is the live
    tensor: an in-place activation will overwrite it right after ``fn`` returns, so ``fn`` must
    use it (or clone it) at once.
    """
    act = fused_activation(module)
    if act is not None:
        return act.register_forward_pre_hook(lambda mod, inp: fn(inp[0]))
    return module.register_forward_hook(lambda mod, inp, out: fn(out))


@dataclass
class Stage:
    """A conv (producer or depthwise pass-through) and the BN that normalises its output, if any."""

    conv: str
    bn: str | None


@dataclass
class PrunableGroup:
    name: str
    index: int
    channels: int
    producer: Stage
    passthrough: list[Stage]
    consumers: list[str]
    consumer_bns: list[str | None]
    activation: str
    coupled: bool
    prunable: bool
    reason: str = ""
    kind: str = "conv"  # "conv" | "dw_chain" | "linear" | "se_chain" | "dw_branches" | "concat" | "split"
    #: where channel 0 sits in each consumer's input (parallel to ``consumers``): 0 unless a
    #: concat puts other channels before it (``kind == "concat"``)
    offsets: list[int] = field(default_factory=list)
    #: consumers that are grouped convs (their conv groups are the ``granularity`` blocks)
    grouped_consumers: list[str] = field(default_factory=list)
    #: channels leave in sets of this many, one from each conv group of the grouped conv that
    #: produces or reads them (its ``groups``; 1 otherwise): plans count a group in units of
    #: ``channels // granularity``
    granularity: int = 1
    members: list[str] = field(default_factory=list)
    #: channel-wise pooling between the activation and a consumer (e.g. ``"max_pool2d(k=2, s=2)"``)
    pools: list[str] = field(default_factory=list)
    #: the BN after each of ``members`` (coupled groups; ``None`` where a producer has none)
    member_bns: list[str | None] = field(default_factory=list)
    #: channel-pad shortcuts whose output channels are this group's (coupled groups)
    shortcuts: list[str] = field(default_factory=list)
    #: SE gate producers (``fc2``) among ``members`` (``kind == "se_chain"``)
    gates: list[str] = field(default_factory=list)
    #: consumers that read the group's channels pooled, inside the SE branch (``fc1``; ``se_chain``)
    squeezes: list[str] = field(default_factory=list)
    #: the producer's first output row of this group: 0 unless the group is one part of a split or
    #: slice (``kind == "split"``), whose rows ``start … start + channels − 1`` of the producer it is
    start: int = 0
    #: each member's first row of the group's channels (parallel to ``members``)
    member_starts: list[int] = field(default_factory=list)
    #: every column at which each consumer reads the group's channel 0 (parallel to ``consumers``;
    #: the first is ``offsets``): more than one where a consumer reads the channels twice, as a ghost
    #: module's concat of a channel and its depthwise copy does
    blocks: list[list[int]] = field(default_factory=list)
    #: the channel cuts (splits, slices; :class:`~autodfp.analysis.splits.CutSite` keys) whose sizes
    #: pruning this group changes
    cuts: list[str] = field(default_factory=list)
    #: ``(layer, role, count)`` for every MAC-counted layer the group's channels pass: ``role`` is
    #: ``"out"`` (rows), ``"in"`` (columns) or ``"dw"`` (a depthwise conv's channels), ``count`` how
    #: many of that dimension the whole group occupies; :class:`~autodfp.search.budget.MacsModel`
    #: rescales each layer by what its dimensions lose, which is what torch-pruning removes
    footprint: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def main_consumers(self) -> list[str]:
        """The consumers that read the group's full maps (all of them, except an SE group's ``fc1``)."""
        return [c for c in self.consumers if c not in self.squeezes]

    def offset(self, consumer: str) -> int:
        """The column of channel 0 in ``consumer``'s input (a slot key: that slot's column)."""
        name, _, col = consumer.partition("#")
        if col:
            return int(col)
        return self.offsets[self.consumers.index(name)] if self.offsets else 0

    @property
    def slots(self) -> list[tuple[str, str, str | None, int]]:
        """``(key, consumer, consumer_bn, column)`` for every place a consumer reads the channels.

        One per consumer, keyed by its name, except where a consumer reads the channels more than
        once (:attr:`blocks`): its further reads are keyed ``"consumer#column"``. Each slot gets its own
        compensation, fitted to what that slot reads.
        """
        out = []
        for i, (c, bn) in enumerate(zip(self.consumers, self.consumer_bns)):
            cols = self.blocks[i] if self.blocks else [self.offset(c)]
            out += [(c if j == 0 else f"{c}#{col}", c, bn, col) for j, col in enumerate(cols)]
        return out

    @property
    def blockwise(self) -> bool:
        """Whether a grouped conv reads the channels: each conv group's pruned channels may only be
        compensated from kept channels of the same conv group (see "Grouped convolutions")."""
        return bool(self.grouped_consumers)

    @property
    def units(self) -> int:
        """What a preserved ratio is a fraction of: channels per conv group (all of them, ungrouped)."""
        return self.channels // self.granularity

    @property
    def last_stage(self) -> Stage:
        """The stage whose (pre-activation) output the consumers see through ``activation``."""
        return self.passthrough[-1] if self.passthrough else self.producer

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GroupGraph:
    """All channel groups of a model, in forward order of their producers."""

    groups: list[PrunableGroup]
    input_shape: tuple[int, ...]

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def prunable(self) -> list[PrunableGroup]:
        return [g for g in self.groups if g.prunable]

    def get(self, name: str) -> PrunableGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)


def _tolerant_reshape_mapping() -> None:
    """Let torch-pruning trace a model whose reshape it cannot map (ShuffleNet's channel shuffle).

    Its index mapping for a reshape divides by the channel count it infers on one side, and that
    inference returns 0 in some graphs (torch-pruning: "=0 if there is a residual connection to
    model inputs"), which raised ``ZeroDivisionError`` and stopped the whole trace. Skipped, the
    reshape keeps torch-pruning's default one-to-one mapping, which is wrong for a shuffle; that
    does not matter here, because every group whose channels pass a reshape that is not a plain
    flatten into a Linear is left unprunable: "coupled through a reshape", or, where torch-pruning
    then fails to map them at all (ShuffleNet's split), "torch-pruning cannot map these channels".
    Only groups that never meet the reshape are pruned, and their indices never go through it.

    For the same reason a reshape that does not flatten into a Linear layer gets no mapping at
    all: torch-pruning's guess for a channel shuffle (a flatten of stride 2 to 8 from channel
    counts inferred across the chunks around it) only multiplied the indices a group carries
    around the shuffled stream, millions of them (ShuffleNet's trace slowed down 70 % once its
    chunks were mapped; see :func:`~autodfp.analysis.splits.patch_split_mapping`).
    """
    try:
        from torch_pruning.dependency import index_mapping

        original = index_mapping.update_reshape_index_mapping
    except (ImportError, AttributeError):  # another torch-pruning layout: trace as it is
        return
    if getattr(original, "_autodfp_tolerant", False):
        return

    def tolerant(graph: Any, node: Any) -> None:
        if not _flattens_into_linear(node):
            return
        try:
            original(graph, node)
        except ZeroDivisionError:
            pass

    tolerant._autodfp_tolerant = True  # type: ignore[attr-defined]
    index_mapping.update_reshape_index_mapping = tolerant


def _flattens_into_linear(node: Any) -> bool:
    """Whether a reshape node of torch-pruning's graph feeds a Linear layer, through element-wise
    ops and further reshapes only (a flatten before a classifier, maybe through dropout)."""
    frontier, seen = list(node.outputs), set()
    while frontier:
        n = frontier.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n.module, nn.Linear):
            return True
        if isinstance(n.module, (tp.ops._ElementWiseOp, tp.ops._ReshapeOp)):
            frontier.extend(n.outputs)
    return False


def build_dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model`` (see :func:`trace_graph`, which also returns the cuts)."""
    return trace_graph(model, example)[0]


def trace_graph(model: nn.Module, example: torch.Tensor) -> tuple[tp.DependencyGraph, list[CutSite]]:
    """torch-pruning's dependency graph of ``model``, and the channel cuts its forward pass made.

    The cuts (:class:`~autodfp.analysis.splits.CutSite`) are matched to the graph's split and slice
    nodes by their autograd node; torch-pruning's split mapping is corrected first (see
    :func:`~autodfp.analysis.splits.patch_split_mapping`).
    """
    _tolerant_reshape_mapping()
    patch_split_mapping()
    try:
        with torch.enable_grad(), recording(model) as sites:  # torch-pruning traces through autograd
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, customized_pruners=CUSTOM_PRUNERS)
        return dg, sites
    except Exception as exc:  # torch-pruning raises bare exceptions on untraceable models
        where = _failing_module(model, exc.__traceback__)
        at = f" at module '{where}'" if where else ""
        raise ModelError(
            f"could not trace the model's dependency graph{at} ({exc.__class__.__name__}: {exc})"
        ) from None


def _failing_module(model: nn.Module, tb: Any) -> str | None:
    """The name of the innermost model layer torch-pruning was handling when it raised, if any.

    torch-pruning's tracing frames hold the node or layer they work on in a local variable; the
    innermost one that is (or wraps) a module of ``model`` names the structure that stops it.
    """
    names = {id(m): n for n, m in model.named_modules() if n}
    found = None
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            mod = getattr(value, "module", value)  # a torch-pruning Node wraps its module
            if isinstance(mod, nn.Module) and id(mod) in names:
                found = names[id(mod)]
        tb = tb.tb_next
    return found


def _forward_order(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: order.append(mod))
        for m in model.modules()
        if len(list(m.children())) == 0
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    seen: dict[nn.Module, None] = {}
    for m in order:
        seen.setdefault(m, None)
    return list(seen)


#: activations tried by :func:`_classify_activation`, simplest first (ties go to the earlier one:
#: without values above 6, ReLU and ReLU6 are the same function on the probe)
_CANDIDATES = tuple(a for a in ACTIVATIONS if a not in ("leaky_relu", "elu"))


def _fit_parameter(kind: str, pre: torch.Tensor, post: torch.Tensor) -> float | None:
    """The slope of a LeakyReLU (or α of an ELU) read off the negative inputs; None if there are none.

    Only meaningful without a pooling in between (then ``post`` is element-wise in ``pre``).
    """
    if pre.shape != post.shape:
        return None
    x, y = pre.double().flatten(), post.double().flatten()
    neg = x < (-1.0 if kind == "elu" else -1e-3)
    if not bool(neg.any()):
        return None
    ratio = y[neg] / (torch.expm1(x[neg]) if kind == "elu" else x[neg])
    return float(ratio.median())


def _classify_activation(pre: torch.Tensor | None, post: torch.Tensor | None, pools: list[dict] | None = None) -> str:
    """The name (see :data:`ACTIVATIONS`) of the element-wise map from ``pre`` to ``post``, or ``"unknown"``.

    Every candidate is applied to ``pre`` (then the max-pools of ``pools``, in forward order) and
    compared with ``post``; the closest one within ``1e-5·(1 + max|pre|)`` wins (that separates
    GELU's erf form from its tanh approximation, which differ by up to 5e-4). LeakyReLU's slope
    and ELU's α are fitted on the negative inputs first and checked like any other candidate.
    """
    if pre is None or post is None:
        return "unknown"
    tol = 1e-5 * (1 + pre.abs().max().item())
    names: list[str] = list(_CANDIDATES)
    for kind in ("leaky_relu", "elu"):
        param = _fit_parameter(kind, pre, post)
        if param is not None and math.isfinite(param):
            names.append(activation_name(kind, round(param, 6)))
    best, best_err = "unknown", math.inf
    for path in ([], pools) if pools else ([],):
        if not path and pre.shape == post.shape:
            # element-wise: screen every candidate on a fixed sample of positions (a dozen
            # candidates on full 112×112 maps cost seconds per model), confirm the winner in full
            flat_pre, flat_post = pre.flatten(), post.flatten()
            idx = torch.randperm(flat_pre.numel(), generator=torch.Generator().manual_seed(0))[:_SCREEN]
            xs, ys = flat_pre[idx], flat_post[idx]
            errs = {n: _act_error(xs, ys, n, []) for n in names}
            ok = [n for n in names if errs[n] <= tol]
            if ok:
                name = min(ok, key=lambda n: errs[n])  # min keeps the earliest on ties
                err = _act_error(pre, post, name, [])
                if err <= tol and err < best_err:
                    best, best_err = name, err
            continue
        for name in names:
            err = _act_error(pre, post, name, path)
            if err <= tol and err < best_err:
                best, best_err = name, err
    return best


#: positions sampled to screen the candidate activations (see :func:`_classify_activation`)
_SCREEN = 20000


def _act_error(pre: torch.Tensor, post: torch.Tensor, name: str, path: list[dict]) -> float:
    """max |pool(act(pre)) − post|, or inf when the shapes do not match."""
    y = apply_activation(pre.double(), name).to(pre.dtype)
    for p in path:  # pooling follows the activation, as in the model
        y = F.max_pool2d(y, **p)
    if y.shape != post.shape:
        return math.inf
    return (y - post).abs().max().item()


def _detect_activations(
    model: nn.Module, example: torch.Tensor, pairs: list[tuple[nn.Module, list[nn.Module], list[list[dict]]]]
) -> list[str]:
    """Identify the element-wise activation between each ``last`` output and its consumers' inputs.

    Checked numerically on one forward pass instead of parsing code, so it works for functional
    (``F.relu``) and module activations alike. ``pairs`` holds, per group, the last stage's module,
    the consumers and, per consumer, the max-pools on its path (kwargs of ``F.max_pool2d``, in
    forward order), which are applied to the candidate before comparing. Both ends are cloned
    when captured, because in-place activations overwrite the tensors afterwards. Anything else
    (another pooling, an unknown non-linearity) is reported as ``"unknown"``, which makes the
    group unprunable by default.
    """
    outs: dict[nn.Module, torch.Tensor] = {}
    ins: dict[nn.Module, torch.Tensor] = {}
    lasts = {last for last, _, _ in pairs}
    cons = {c for _, cs, _ in pairs for c in cs}

    def grab_out(mod: nn.Module):
        def fn(y: torch.Tensor) -> None:
            if mod not in outs:
                outs[mod] = y.detach().clone()

        return fn

    def grab_in(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if mod not in ins:
            ins[mod] = inp[0].detach().clone()

    hooks = [register_preactivation_hook(m, grab_out(m)) for m in lasts]
    hooks += [m.register_forward_hook(grab_in) for m in cons]
    try:
        with torch.no_grad():
            model(example * 3.0)  # a wide input range so that ReLU6 clipping shows
    finally:
        for h in hooks:
            h.remove()
    result = []
    for last, consumers, pools in pairs:
        acts = {_classify_activation(outs.get(last), ins.get(c), p) for c, p in zip(consumers, pools)}
        result.append(acts.pop() if len(acts) == 1 else "unknown")
    return result


def _bn_after(dg: tp.DependencyGraph, module: nn.Module) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm directly fed by ``module`` (through pads/pass-through ops only)."""
    node = dg.module2node.get(module)
    frontier = list(node.outputs) if node else []
    seen = set()
    while frontier:
        n = frontier.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n.module, nn.modules.batchnorm._BatchNorm):
            return n.module
        grad = type(n.grad_fn).__name__ if n.grad_fn is not None else ""
        if "BatchNorm" in grad:
            # torch-pruning maps a fused BN+act layer to its activation's output, so the batch-norm
            # itself shows up as a functional op right before the layer's node
            fused = [o.module for o in n.outputs if fused_activation(o.module) is not None]
            if fused:
                return fused[0]
        if isinstance(n.module, nn.Module):  # a real layer: stop
            continue
        if any(k in grad for k in ("ConstantPadNd", "Unsqueeze", "Convolution")):
            frontier.extend(n.outputs)
    return None


def _upstream(
    dg: tp.DependencyGraph, module: nn.Module, is_target: Callable[[Any], bool], crosses: Callable[[Any], bool]
) -> list[Any]:
    """The modules satisfying ``is_target`` that ``module`` reads, walking its inputs back through
    the nodes whose module ``crosses`` allows (and no further), in the order they are met."""
    node = dg.module2node.get(module)
    frontier = list(node.inputs) if node is not None else []
    found: list[Any] = []
    seen: set[int] = set()
    while frontier:
        n = frontier.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if is_target(n.module):
            if n.module not in found:
                found.append(n.module)
        elif crosses(n.module):
            frontier.extend(n.inputs)
    return found


def _stage_input(dg: tp.DependencyGraph, module: nn.Module) -> nn.Module | None:
    """The conv or linear layer whose output ``module`` reads, through BNs, activations and
    functional ops only; None if there is no single one (an add, a concat of two layers)."""
    found = _upstream(dg, module, lambda m: isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)), lambda m: True)
    return found[0] if len(found) == 1 else None


def _is_chain(dg: tp.DependencyGraph, producer: nn.Module, dws: list[nn.Module]) -> bool:
    """Whether the depthwise convs of a group form one chain, each reading the one before it.

    MobileNet's pointwise → depthwise → pointwise is a chain of one. A detector's source layer is
    not: its channels feed the next block's depthwise conv *and* each head's, in parallel, and
    every consumer reads its own branch (see ``kind == "dw_branches"`` in the module docstring).
    """
    return all(_stage_input(dg, dw) is (dws[i - 1] if i else producer) for i, dw in enumerate(dws))


def _reaches_output(dg: tp.DependencyGraph, module: nn.Module) -> bool:
    """Whether ``module``'s output channels reach a model output without a channel-mixing layer.

    torch-pruning adds an explicit output node only when the model ends in a functional op; a
    model that ends in its classifier layer has that layer's node as the sink. Every sink of its
    graph is (part of) an output, because the graph is traced back from the outputs.
    """
    node = dg.module2node.get(module)
    frontier = [node] if node is not None else []
    seen = set()
    while frontier:
        n = frontier.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if not n.outputs or isinstance(n.module, tp.ops._OutputOp):
            return True
        frontier.extend(o for o in n.outputs if not _mixes_channels(o.module))
    return False


def _path_pools(dg: tp.DependencyGraph, src: nn.Module, dst: nn.Module) -> tuple[list[dict], list[str]]:
    """The max-pools on the path ``src`` → ``dst`` (forward order), as ``F.max_pool2d`` kwargs and labels.

    Only functional ops are crossed; the first path found is used (a group with several paths to
    one consumer is coupled anyway).
    """
    start, target = dg.module2node.get(dst), dg.module2node.get(src)
    if start is None or target is None:
        return [], []
    stack: list[tuple[Any, tuple[Any, ...]]] = [(n, ()) for n in start.inputs]
    seen: set[int] = set()
    while stack:
        n, path = stack.pop()
        if n is target:
            pools = [
                p.grad_fn for p in reversed(path) if p.grad_fn is not None and "MaxPool2D" in type(p.grad_fn).__name__
            ]
            kw: list[dict[str, Any]] = [
                dict(
                    kernel_size=tuple(g._saved_kernel_size),
                    stride=tuple(g._saved_stride),
                    padding=tuple(g._saved_padding),
                    dilation=tuple(g._saved_dilation),
                    ceil_mode=bool(g._saved_ceil_mode),
                )
                for g in pools
            ]
            labels = [
                f"max_pool2d(k={_short(k['kernel_size'])}, s={_short(k['stride'])}"
                + (f", p={_short(k['padding'])}" if any(k["padding"]) else "")
                + ")"
                for k in kw
            ]
            return kw, labels
        if id(n) in seen or not isinstance(n.module, tp.ops._ElementWiseOp):
            continue
        seen.add(id(n))
        stack.extend((i, path + (n,)) for i in n.inputs)
    return [], []


def _benign_op(node: Any, channels: int) -> bool:
    """Whether a functional op on a coupled group keeps every channel whole and in place.

    The cases: ops that only feed a :class:`ChannelPadShortcut` (its own slicing, zero concat and
    index select, which its pruner handles as one layer), and a reshape that only flattens a
    ``(N, C, 1, 1)`` map into the ``C`` inputs of Linear layers (global pooling → classifier; the
    channels may be one concatenated block of those ``C``), or hands a channels-last map's ``C``
    channels to a Linear layer as rows (ConvNeXt).
    """
    kind = type(node.module).__name__
    frontier, seen = list(node.outputs), set()
    ends: list[nn.Module] = []
    while frontier:
        n = frontier.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if (
            isinstance(n.module, nn.Module)
            and not isinstance(n.module, tp.ops._ElementWiseOp)
            and not any(
                isinstance(n.module, getattr(tp.ops, o)) for o in ("_ConcatOp", "_SplitOp", "_ReshapeOp", "_SliceOp")
            )
        ):
            ends.append(n.module)
            continue
        if isinstance(n.module, tp.ops._OutputOp):
            return False
        frontier.extend(n.outputs)
    if not ends:
        return False
    if all(isinstance(m, ChannelPadShortcut) for m in ends):
        return True
    # the flatten's input width: a concat's, when the channels are one block of a wider (N, C, 1, 1) map
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    width = int(sizes[1]) if sizes is not None and len(sizes) > 2 and all(int(d) == 1 for d in sizes[2:]) else channels
    return kind == "_ReshapeOp" and all(isinstance(m, nn.Linear) and m.in_features in (channels, width) for m in ends)


def _tie_label(target: Any, names: dict[nn.Module, str]) -> str:
    """A one-phrase description of a non-add structure that ties a group's channels together."""
    ops = {
        "_ConcatOp": "a concat",
        "_SplitOp": "a split",
        "_ReshapeOp": "a reshape (channel shuffle / flatten)",
        "_UnbindOp": "an unbind",
        "_ExpandOp": "an expand",
        "_SliceOp": "a slice",
    }
    kind = type(target).__name__
    if kind in ops:
        return ops[kind]
    if isinstance(target, nn.modules.conv._ConvNd) and target.groups > 1:
        return f"a grouped conv ('{names.get(target, '?')}')"
    if isinstance(target, nn.Module):
        return f"{type(target).__name__} '{names.get(target, '?')}' (unsupported layer)"
    return f"an unsupported op ({kind})"


def _short(t: tuple) -> str:
    return str(t[0]) if len(set(t)) == 1 else "x".join(map(str, t))


#: grad_fn names of the element-wise gates an SE branch may end in (sigmoid, hard sigmoid)
_GATES = ("SigmoidBackward", "HardsigmoidBackward")


def _se_gates(
    dg: tp.DependencyGraph,
    producers: list[nn.Module],
    consumers: list[nn.Module],
    others: list[Any],
    muls: set[Any],
    shortcuts: Sequence[nn.Module],
) -> tuple[list[nn.Module], set[nn.Module]] | None:
    """The gate producers and squeeze consumers of a squeeze-and-excitation chain, or None.

    The pattern: the first producer is the group's main one; every other producer ``G`` (an SE
    ``fc2``) reaches the channels only through sigmoid-like element-wise ops into a multiply, and
    reads (through element-wise ops and BNs) a dense consumer ``S`` of this very group (``fc1``,
    after the pooling). Then removing channel ``c`` removes its gate with it and nothing else ties
    the channels: every multiply of the group is such a gate, with no add, concat or shortcut.
    """
    gates = producers[1:]
    if not gates or shortcuts or not muls or not {id(o) for o in others} <= {id(m.module) for m in muls}:
        return None  # an add, a concat, a division ... ties the channels too
    reached: set[int] = set()
    squeezes: set[nn.Module] = set()
    for gate in gates:
        node = dg.module2node.get(gate)
        if node is None or len(node.outputs) != 1:
            return None
        n, steps = node.outputs[0], 0
        while n not in muls:  # the gate's own path: sigmoid-like ops only, then the multiply
            grad = type(n.grad_fn).__name__ if n.grad_fn is not None else ""
            if not any(k in grad for k in _GATES) or len(n.outputs) != 1:
                return None
            n, steps = n.outputs[0], steps + 1
        if steps == 0:
            return None  # an ungated product: not a sigmoid gate
        reached.add(id(n))
        squeeze = _reads_consumer(dg, gate, set(consumers))
        if squeeze is None:
            return None
        squeezes.add(squeeze)
    if reached != {id(m) for m in muls}:
        return None  # some multiply of the group is not an SE gate
    return gates, squeezes


def _reads_consumer(dg: tp.DependencyGraph, gate: nn.Module, consumers: set[nn.Module]) -> nn.Module | None:
    """The consumer of the group that ``gate`` reads through element-wise ops and BNs only."""
    found = _upstream(
        dg,
        gate,
        lambda m: m in consumers,
        lambda m: isinstance(m, (tp.ops._ElementWiseOp, nn.modules.batchnorm._BatchNorm)),
    )
    return found[0] if found else None


#: torch-pruning node types that cut or join channels: a group through them is measured per consumer
_CUT_OPS = ("_SplitOp", "_SliceOp")
_JOIN_OPS = ("_ConcatOp",)
#: torch-pruning node types that move channels around in ways a part of a cut cannot follow
_TANGLES = ("_ReshapeOp", "_UnbindOp", "_ExpandOp")


def _channel_cut(node: Any) -> bool:
    """Whether a graph node cuts the channel dimension: a split, or a slice along dim 1."""
    kind = type(node.module).__name__
    if kind == "_SplitOp":
        return True
    return kind == "_SliceOp" and getattr(node.module, "dim", None) == 1


def _cut_sites(dg: tp.DependencyGraph, sites: list[CutSite]) -> dict[int, list[tuple[Any, CutSite | None]]]:
    """Every channel-cut node of the graph, keyed by the id of the node it cuts, with the recorded call
    that made it (None if the forward pass made it some way the recorder does not see).

    Cuts inside a :class:`ChannelPadShortcut` are its own business (its pruner handles them) and
    are left out, as :func:`_benign_op` leaves them out of a group's ties.
    """
    by_fn = {id(s.grad_fn): s for s in sites if s.grad_fn is not None}
    return {k: [(n, by_fn.get(id(n.grad_fn))) for n in nodes] for k, nodes in channel_cut_inputs(dg).items()}


def channel_cut_inputs(dg: tp.DependencyGraph) -> dict[int, list[Any]]:
    """The graph's channel-cut nodes (splits, channel slices) by the id of the node whose output they cut."""
    out: dict[int, list[Any]] = {}
    for node in dg.module2node.values():
        if _channel_cut(node) and node.inputs and not _benign_op(node, 0):
            out.setdefault(id(node.inputs[0]), []).append(node)
    return out


def _blocks(idxs: Sequence[int], roots: Sequence[int], start: int, n: int) -> list[int] | None:
    """Where a layer holds the channels ``start … start+n−1`` of a producer, as whole blocks.

    ``idxs`` are the layer's indices (rows or columns) in a torch-pruning group, ``roots`` the
    producer row each one comes from. Returns each block's first index, or None unless every
    block is the whole run of channels, in order (a scattered or partial read).
    """
    pairs = sorted(zip((int(i) for i in idxs), (int(r) for r in roots)))
    found: list[int] = []
    for i in range(0, len(pairs), n):
        col = pairs[i][0]
        if pairs[i : i + n] != [(col + k, start + k) for k in range(n)]:
            return None
        found.append(col)
    return found or None


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def _segments(
    dg: tp.DependencyGraph, group: Any, rows: list[int], cut_inputs: dict[int, list]
) -> list[tuple[int, int]]:
    """The producer rows cut into runs that every split and slice keeps together.

    Where the group reaches a channel cut, each row lands in some part of it (torch-pruning's root
    indices tell which row each of the cut input's channels comes from); two adjacent rows stay in
    one run when they land in the same parts of every cut, as often. A group that reaches no cut
    stays one run (its rows, as before); rows parted by anything else (a channel shuffle's reshape)
    are not parted here, and that tie keeps them whole.
    """
    sig: dict[int, list[tuple[int, int]]] = {r: [] for r in rows}
    for item in group.items:
        cuts = cut_inputs.get(id(item.dep.target), [])
        roots = getattr(item, "root_idxs", None)
        if not cuts or roots is None or not dg.is_out_channel_pruning_fn(item.dep.handler):
            continue  # (a layer's input columns are not the cut's input)
        for node, _ in cuts:
            bounds = cut_bounds(node)
            if bounds is None:
                continue
            for i, r in zip(item.idxs, roots):
                if int(r) in sig:
                    sig[int(r)].append((id(node), bisect.bisect_right(bounds, int(i))))
    if not any(sig.values()):
        return _runs(rows)
    keys = {r: tuple(sorted(v)) for r, v in sig.items()}
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r and keys[r] == keys[r - 1]:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def _footprint(group: Any, names: dict[nn.Module, str], dg: tp.DependencyGraph) -> list[tuple[str, str, int]]:
    """``(layer, role, count)`` of every MAC-counted layer in a torch-pruning group (see
    :attr:`PrunableGroup.footprint`); a depthwise conv counts once, by its channels."""
    counts: dict[tuple[str, str], int] = {}
    for item in group.items:
        mod = item.dep.target.module
        if not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) or mod not in names:
            continue
        role = "dw" if is_depthwise(mod) else ("out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in")
        key = (names[mod], role)
        n = len(item.idxs)
        counts[key] = max(counts.get(key, 0), n) if role == "dw" else counts.get(key, 0) + n
    return [(layer, role, n) for (layer, role), n in counts.items()]


def _cut_problem(group: Any, cut_inputs: dict[int, list]) -> tuple[list[str], str | None]:
    """The cuts a group's removal resizes, and why one of them cannot be resized (None if all can).

    A cut is resized when the group holds channels of the tensor it cuts: a split's part sizes
    change, a slice's bounds move when channels before them go. Each such cut needs a holder (see
    :mod:`autodfp.analysis.splits`) and a split mapping torch-pruning could follow.
    """
    keys: list[str] = []
    for item in group.items:
        if not len(item.idxs):
            continue
        for node, site in cut_inputs.get(id(item.dep.target), []):
            if site is None:
                return keys, "a split or slice made where autodfp cannot follow it"
            if type(node.module).__name__ == "_SplitOp" and unmapped_split(node):
                where = f"'{site.owner}'" if site.owner else "the model's forward"
                return keys, f"a layer reading several parts of a split in {where} at once"
            if site.kind == "slice":
                pos = [int(i) for i in item.idxs]
                roles = {r for r, _ in site.holder}
                moves_start = site.start > 0 and any(i < site.start for i in pos)
                moves_stop = site.stop < site.width and any(i < site.stop for i in pos)
                if site.step != 1 or (moves_start and "start" not in roles) or (moves_stop and "stop" not in roles):
                    return keys, site.describe()
                if not any(i < site.stop for i in pos):
                    continue  # all after the slice: it neither moves nor shrinks
            elif not site.patchable:
                return keys, site.describe()
            if site.key not in keys:
                keys.append(site.key)
    return sorted(keys), None


@dataclass
class _Scan:
    """What :func:`find_groups` keeps while it walks the producers."""

    dg: tp.DependencyGraph
    names: dict[nn.Module, str]
    rank: dict[nn.Module, int]
    cut_inputs: dict[int, list]
    coupled_mode: bool
    groups: list[PrunableGroup] = field(default_factory=list)
    pairs: list[tuple[nn.Module, list[nn.Module], list[list[dict]]]] = field(default_factory=list)
    #: producers taken whole by an earlier group
    whole: set[nn.Module] = field(default_factory=set)
    #: rows of producers taken by earlier groups through a cut
    covered: dict[nn.Module, set[int]] = field(default_factory=dict)

    def order(self, mods: Any) -> list[nn.Module]:
        return sorted(mods, key=lambda m: self.rank.get(m, 1 << 30))


def find_groups(model: nn.Module, input_shape: tuple[int, ...], coupled: bool = False) -> GroupGraph:
    """Discover every output-channel group of ``model`` and classify it.

    :param model: the network (put in eval mode)
    :param input_shape: one input's shape, without the batch dimension
    :param coupled: also make residual-stream groups prunable (see the module docstring); off,
        every coupled group is unprunable as before

    A producer whose rows a split or slice cuts apart gives one group per part, ``name[a:b]`` (see
    "Channel cuts" in the module docstring).
    """
    model.eval()
    example = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    dg, sites = trace_graph(model, example)
    order = _forward_order(model, example)
    scan = _Scan(
        dg=dg,
        names={m: n for n, m in model.named_modules()},
        rank={m: i for i, m in enumerate(order)},
        cut_inputs=_cut_sites(dg, sites),
        coupled_mode=bool(coupled),
    )
    names, groups = scan.names, scan.groups
    for module in order:
        if not (is_dense(module) or is_grouped(module)) or module in scan.whole:
            continue
        fn = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        n_all = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        rows = [r for r in range(n_all) if r not in scan.covered.get(module, set())]
        if not rows:
            continue
        try:
            full = dg.get_pruning_group(module, fn, idxs=rows)
        except Exception as exc:  # torch-pruning could not map the channels (a shuffle's split)
            bn = _bn_after(dg, module)
            groups.append(
                PrunableGroup(
                    name=names[module],
                    index=len(groups),
                    channels=n_all,
                    producer=Stage(names[module], names.get(bn) if bn is not None else None),
                    passthrough=[],
                    consumers=[],
                    consumer_bns=[],
                    activation="unknown",
                    coupled=True,
                    prunable=False,
                    reason=f"torch-pruning cannot map these channels ({exc.__class__.__name__}: {exc})",
                    members=[names[module]],
                )
            )
            scan.pairs.append((bn or module, [], []))
            scan.whole.add(module)
            continue
        # a cut that cannot be resized, or a reshape (a channel shuffle scatters rows over the
        # parts), keeps every part whole anyway: one group, as before, and no per-part tracing
        tangled = any(type(item.dep.target.module).__name__ in _TANGLES for item in full.items)
        whole_group = tangled or _cut_problem(full, scan.cut_inputs)[1] is not None
        for a, b in _runs(rows) if whole_group else _segments(dg, full, rows, scan.cut_inputs):
            whole_rows = b - a == n_all
            group = full if b - a == len(rows) else dg.get_pruning_group(module, fn, idxs=list(range(a, b)))
            _describe_group(scan, group, module, a, b - a, segment=not whole_rows)

    # Never prune into the classifier by default: its input channels are the final features, and
    # their loss cannot be reconstructed by any later layer. A dense-prediction head (a conv on a
    # feature map) that reads features the rest of the network also reads (a detector's source
    # layers, read by a head and by the next block) is compensated like any consumer instead:
    # those features are intermediate, and the search may still keep them whole.
    output_layers = {m for g in groups if g.reason == "model output" for m in g.members}
    for g in groups:
        heads = output_layers & set(g.consumers)
        linear = any(isinstance(model.get_submodule(c), nn.Linear) for c in heads)
        if g.prunable and heads and (linear or heads == set(g.consumers)):
            g.prunable, g.reason = False, "feeds the classifier"
    for g, act in zip(groups, _detect_activations(model, example, scan.pairs)):
        g.activation = act
        if g.prunable and not g.coupled and act == "unknown":
            g.prunable, g.reason = False, "no element-wise activation between producer and consumer"
    for g in groups:
        if g.prunable and g.coupled:
            # a stream's consumers read sums over residual adds; the surgery measures those values
            # at each consumer's input and compensates them linearly, i.e. as "identity"
            g.activation = "identity"
    return GroupGraph(groups, tuple(input_shape))


def _describe_group(scan: _Scan, group: Any, module: nn.Module, start: int, n_out: int, segment: bool) -> None:
    """Classify one torch-pruning group, rows ``start … start+n_out−1`` of ``module``, and append it.

    ``segment``: those rows are a part of the producer's output (the rest go elsewhere).
    """
    dg, names = scan.dg, scan.names
    producers: list[nn.Module] = []
    consumers: list[nn.Module] = []
    bns, dws, shortcuts, others = [], [], [], []
    ties: list[str] = []  # what, besides adds and channel-pad shortcuts, ties these channels
    muls: set[Any] = set()  # the element-wise multiplies among the ties (graph nodes)
    pad_out: list[nn.Module] = []
    grouped_in: list[nn.Module] = []  # grouped convs that read these channels
    feeds_output = False
    offsets: dict[nn.Module, int] = {}  # where the channels sit in each consumer's input
    blocks: dict[nn.Module, list[int]] = {}  # every place they sit there (several: a ghost concat)
    rows: dict[nn.Module, list[int]] = {}  # where they sit in each producer's output, as whole blocks
    taken: dict[nn.Module, set[int]] = {}  # every producer row the group takes
    scattered = False  # some consumer reads them in another order or spread out
    joins_mapped = True  # torch-pruning found every concat's offsets
    for item in group.items:
        dep, idxs = item.dep, item.idxs
        roots = getattr(item, "root_idxs", None)
        target = dep.target.module
        handler = dep.handler
        out_side = dg.is_out_channel_pruning_fn(handler)
        if is_dense(target) or is_grouped(target):
            if roots is not None:
                found = _blocks(idxs, roots, start, n_out)
            else:  # a torch-pruning without root indices: one block, in order, or nothing
                first = int(idxs[0]) if len(idxs) else 0
                found = [first] if [int(i) for i in idxs] == list(range(first, first + n_out)) else None
            if out_side:
                taken.setdefault(target, set()).update(int(i) for i in idxs)
                if found is not None:
                    rows[target] = found
            else:
                first = int(idxs[0]) if len(idxs) else 0
                scattered |= found is None
                offsets[target] = found[0] if found is not None else first
                if found is not None:
                    blocks[target] = found
        if isinstance(target, nn.modules.batchnorm._BatchNorm):
            bns.append(target)
        elif is_depthwise(target):
            if target not in dws:
                dws.append(target)
        elif is_dense(target):
            (producers if out_side else consumers).append(target)
        elif is_grouped(target):
            if out_side:
                producers.append(target)
            elif target not in grouped_in:
                grouped_in.append(target)
        elif isinstance(target, ChannelPadShortcut):
            shortcuts.append(target)
            if out_side and target not in pad_out:
                pad_out.append(target)
        elif isinstance(target, tp.ops._OutputOp):
            feeds_output = True
        elif isinstance(target, tp.ops._ElementWiseOp):
            grad = type(dep.target.grad_fn).__name__ if dep.target.grad_fn is not None else ""
            # element-wise arithmetic between tensors (not a Linear's own ``addmm`` on a
            # channels-last input, which torch-pruning traces as an element-wise node too)
            if any(grad.startswith(k) for k in ("Add", "Sub", "Mul", "Div")) and not grad.startswith("Addmm"):
                others.append(target)  # a residual add or gating ties channels together
                if not any(k in grad for k in ("Add", "Sub")):
                    ties.append("a multiplicative gate")
                if "Mul" in grad:
                    muls.add(dep.target)
        elif not _benign_op(dep.target, n_out):
            others.append(target)  # concat, split, reshape, other layers: not reconstructed
            ties.append(_tie_label(target, names))
            if type(target).__name__ == "_ConcatOp" and getattr(target, "offsets", None) is None:
                joins_mapped = False  # torch-pruning gave up on this concat's offsets
    producers = scan.order(set(producers))
    # a grouped conv reading the channels is a consumer, compensated within each conv group
    consumers = scan.order(set(consumers + grouped_in) - set(producers))
    dws = scan.order(dws)
    cut_keys, cut_problem = _cut_problem(group, scan.cut_inputs)
    cut = segment or bool(cut_keys)
    # producers met through a cut give up only these rows; others are taken whole, as ever
    for p in set(producers) | {module}:
        if cut:
            scan.covered.setdefault(p, set()).update(taken.get(p, set()))
        else:
            scan.whole.add(p)

    coupled = len(producers) > 1 or bool(shortcuts) or bool(others)
    producer = module if cut else producers[0]  # a cut's rows are counted in the producer walked
    if coupled and any(is_grouped(p) for p in producers):
        ties.append("a grouped conv")  # a stream written by grouped convs (an SE chain passes below)
    prod_bn = _bn_after(dg, producer)
    passthrough = [Stage(names[d], names.get(b) if (b := _bn_after(dg, d)) is not None else None) for d in dws]
    consumer_bns = [names.get(b) if (b := _bn_after(dg, c)) is not None else None for c in consumers]
    last_module = dws[-1] if dws else producer
    last_bn = _bn_after(dg, last_module)
    # a part of a producer reaches the output only through its own ops (torch-pruning then lists an
    # output node in its group), so a cut producer is not walked as a whole
    feeds_output = feeds_output or any(_reaches_output(dg, m) for m in dws + ([] if segment else producers))
    pool_paths = [_path_pools(dg, last_bn or last_module, c) for c in consumers]
    pools = sorted({label for _, labels in pool_paths for label in labels})

    se = _se_gates(dg, producers, consumers, others, muls, shortcuts)
    # parallel depthwise branches: one producer, no other tie, each consumer behind its own dw
    branches = len(dws) > 1 and not coupled and not _is_chain(dg, producer, dws)
    coupled = coupled or branches
    once = all(len(b) == 1 for b in blocks.values())  # each consumer reads the channels once
    # concatenated into the consumers' inputs (DenseNet, SqueezeNet, Inception, RFB), and tied
    # by nothing else: one producer, each consumer reading the channels as one block
    concat = (
        len(producers) == 1
        and bool(others)
        and all(type(o).__name__ in _JOIN_OPS for o in others)
        and not (shortcuts or dws or grouped_in or scattered or cut or not once or not joins_mapped)
        and bool(consumers)
    )
    split = False
    if not concat and consumers and not (shortcuts or grouped_in or scattered) and joins_mapped and cut_problem is None:
        # cut out of a wider tensor (a split or slice), or read in blocks of the consumers' inputs,
        # maybe more than once (a ghost module's channel and its depthwise copy) or SE-gated:
        # measured and compensated per read, like a concat (see "Channel cuts" in the module doc)
        joins = [o for o in others if type(o).__name__ in _CUT_OPS + _JOIN_OPS]
        rest = [o for o in others if type(o).__name__ not in _CUT_OPS + _JOIN_OPS]
        gated = _se_gates(dg, producers, consumers, rest, muls, shortcuts) if len(producers) > 1 else None
        split = (
            bool(joins)
            and ((len(producers) == 1 and not rest) or gated is not None)
            and (cut or not once or bool(dws) or gated is not None)
            and all(p in rows and not is_grouped(p) for p in producers)
        )
        if split and gated is not None:
            se = gated
    # a residual-like stream through cuts (Res2Net's later scales: a part added to the previous
    # scale's output): with ``coupled=True``, a stream like any other, its members' rows and its
    # consumers' columns found as whole blocks
    cut_stream = (
        scan.coupled_mode
        and cut
        and set(ties) <= {"a split", "a slice", "a concat"}
        and not (dws or grouped_in or shortcuts or scattered or not once or not joins_mapped)
        and all(p in rows and len(rows[p]) == 1 and not is_grouped(p) for p in producers)
    )
    prunable, reason = True, ""
    if feeds_output:
        prunable, reason = False, "model output"
    elif se is not None or branches or concat or split:
        pass  # an SE chain, dw branches, a concat or a cut: prunable by default, from measured consumer inputs
    elif cut_problem is not None:
        prunable, reason = False, f"coupled through {cut_problem}"
    elif not joins_mapped:
        prunable, reason = False, "coupled through a concat whose parts torch-pruning cannot size (a slice narrows it)"
    elif coupled and not scan.coupled_mode:
        prunable, reason = False, "coupled (residual add / shortcut / concat)"
    elif cut_stream:
        pass  # a stream: compensated per consumer, silenced in its members' rows
    elif coupled and (ties or dws or grouped_in):
        what = sorted(set(ties + (["a depthwise conv"] if dws else []) + (["a grouped conv"] if grouped_in else [])))
        prunable, reason = False, f"coupled through {', '.join(what)}: not reconstructable"
    elif grouped_in and (
        dws
        or len({gc.groups for gc in grouped_in}) > 1
        or (is_grouped(producer) and producer.groups != grouped_in[0].groups)
        or any(offsets.get(gc, 0) for gc in grouped_in)
    ):
        gc = grouped_in[0]
        prunable, reason = (
            False,
            f"read by grouped conv '{names[gc]}' ({gc.groups} groups) with other grouped or depthwise "
            "layers: not supported",
        )
    elif not consumers and not grouped_in:
        prunable, reason = False, "no consumer layer"
    elif cut:  # a part of a cut that none of the kinds above describes
        prunable, reason = False, "coupled through a split or slice: not reconstructable"
    kind = "linear" if isinstance(producer, nn.Linear) else ("dw_chain" if dws else "conv")
    if split:
        kind = "split"
    elif se is not None:
        kind = "se_chain"
    elif branches:
        kind = "dw_branches"
    elif concat:
        kind = "concat"
    scan.groups.append(
        PrunableGroup(
            name=f"{names[producer]}[{start}:{start + n_out}]" if segment else names[producer],
            index=len(scan.groups),
            channels=n_out,
            producer=Stage(names[producer], names.get(prod_bn) if prod_bn is not None else None),
            passthrough=passthrough,
            consumers=[names[c] for c in consumers],
            consumer_bns=consumer_bns,
            offsets=[offsets.get(c, 0) for c in consumers],
            activation="unknown",
            coupled=coupled or split,
            prunable=prunable,
            reason=reason,
            kind=kind,
            granularity=_conv_groups(grouped_in[0] if grouped_in else producer),
            grouped_consumers=[names[c] for c in grouped_in],
            members=[names[p] for p in producers],
            pools=pools,
            member_bns=[names.get(b) if (b := _bn_after(dg, p)) is not None else None for p in producers],
            shortcuts=[names[m] for m in pad_out] if coupled else [],
            gates=[names[m] for m in se[0]] if se is not None else [],
            squeezes=[names[m] for m in consumers if se is not None and m in se[1]],
            start=start,
            member_starts=[rows[p][0] if p in rows else 0 for p in producers],
            blocks=[blocks.get(c, [offsets.get(c, 0)]) for c in consumers],
            cuts=cut_keys,
            footprint=_footprint(group, names, dg),
        )
    )
    # a part of a cut is compensated from its measured reads ("identity"): no activation to look for
    looked = [] if split and prunable else consumers
    scan.pairs.append((last_bn or last_module, looked, [kw for kw, _ in pool_paths][: len(looked)]))
