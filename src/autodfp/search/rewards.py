"""Rewards for the pruning agent: how close a pruned model stays to the original.

The agent needs one number per episode that ranks candidate pruned models the way test accuracy
would. Without labels (the data-free setting) the best available signal is *agreement with the
original model* on a fixed input batch, synthetic or real-but-unlabelled: :class:`AgreementReward`.
With a labelled loader, :class:`AccuracyReward` gives plain top-1 accuracy, as in AMC.

Agreement measures, all "higher is better" and maximal for a model identical to the original:

``kl``   ``-mean_i KL(p_orig(x_i) || p_pruned(x_i))``, softmax at temperature ``T`` (default 2). Uses
         the whole output distribution, so it still separates models whose top-1 agree everywhere. Not
         multiplied by ``T^2`` (that scaling only matters for distillation gradients).
``top1`` fraction of inputs where both models predict the same class. Coarse on a small batch (steps
         of 1/n) and saturates at 1.0 for mildly damaged models.
``mse``  ``-mean (z_pruned - z_orig)^2 / var(z_orig)``: logit error relative to the original logits'
         spread, so models with different logit scales get comparable numbers.

Defaults (``kl``, ``T=2``) come from measurement: Spearman rho between each reward and real top-1
over damaged copies of each model (channels zeroed as uncompensated pruning does)::

    batch                         kl T=1  kl T=2  kl T=4  top1    mse
    ResNet-56, 30 variants
      real unlabelled n=256       0.987   0.986   0.986   0.989   0.948
      real unlabelled n=64        0.960   0.969   0.972   0.944   0.942
      ZeroQ n=64, 100 steps       0.965   0.967   0.970   0.951   0.961
      Gaussian noise n=64         0.504   0.544   0.584   0.350   0.702
    MobileNet-V1, 24 variants
      real n=64                   0.970   0.988   0.971   0.968   0.963
      ZeroQ n=32, 40 steps        0.958   0.951   0.947   0.907   0.938
    MobileNet-V2 (no BN), 24 variants
      real n=64                   0.982   0.995   0.923   0.993   0.847
      inversion n=32, 60 steps    0.728   0.847   0.784   0.662   0.776

KL is the most consistent measure; T=2 is never far from the best temperature and clearly best
on the BN-free model, where T=4 over-smooths. ``top1`` is coarse on small batches; ``mse`` trails KL
on real data and on the BN-free model. ``details()`` returns all three, for logging side by side.

Models with several outputs (detectors, backbones) are scored per output and averaged. Class logits
beside their boxes keep the measure above; every other output (boxes, a YOLO head's packed rows,
which are not one softmax: :func:`guess_kinds`) by its normalised MSE. Optionally (``tail``,
``Config.reward_tail``) it is compared channel by channel, each channel normalised by its own
spread, with a second term on the positions in that channel's top tail (:func:`tail_nmse`): a
detector decides by thresholds on the top of its score channels, and a mean over tens of thousands
of anchors does not see a few objectness logits that a fit drove from 4.9 to 21.9. It is opt-in
because on the slim face detector it preferred the uncompensated plan, which detected worse
(docs/RESULTS.md). A single-tensor classifier is scored exactly as before either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from autodfp._modes import eval_mode
from autodfp.errors import ModelError

MEASURES = ("kl", "top1", "mse")
#: how one output of a multi-output model is compared: class logits along the last dim, or values
OUTPUT_KINDS = ("logits", "regression")


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _flatten(out: object, where: str = "output") -> list[tuple[str, torch.Tensor]]:
    """A model's outputs as (name, tensor) pairs: a tensor, or tuples/lists/dicts of them, nested."""
    if isinstance(out, torch.Tensor):
        return [(where, out)]
    if isinstance(out, Mapping):
        return [pair for k, v in out.items() for pair in _flatten(v, f"{where}[{k!r}]")]
    if isinstance(out, (tuple, list)):
        return [pair for i, v in enumerate(out) for pair in _flatten(v, f"{where}[{i}]")]
    raise ModelError(
        f"the model's {where} is a {type(out).__name__}; rewards compare tensors (or tuples/dicts of them)"
    )


def model_outputs(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Every output of ``model`` on ``inputs``, each concatenated over the batches (float, on the CPU).

    Outputs are named by their place in the returned structure (``output[0]``, ``output['p3']``).
    An output must have the batch as its first dimension and the same other dimensions for every
    batch: one whose shape depends on the input (a detector's post-NMS boxes) cannot be compared
    position by position, and is refused.

    :param model: any module returning a tensor or tuples/lists/dicts of tensors
    :param inputs: the batch ``(N, ...)``
    :param batch_size: inputs per forward pass
    """
    device = _device_of(model)
    parts: dict[str, list[torch.Tensor]] = {}
    with eval_mode(model), torch.inference_mode():
        for i in range(0, inputs.shape[0], batch_size):
            x = inputs[i : i + batch_size]
            flat = _flatten(model(x.to(device)))
            if parts and [k for k, _ in flat] != list(parts):
                raise ModelError("the model returned a different output structure for another batch of inputs")
            for name, t in flat:
                if t.dim() == 0 or t.shape[0] != x.shape[0]:
                    raise ModelError(
                        f"model {name} has shape {tuple(t.shape)} for a batch of {x.shape[0]} inputs: rewards "
                        "need outputs whose first dimension is the batch (return raw head outputs, before NMS)"
                    )
                prev = parts.setdefault(name, [])
                if prev and prev[0].shape[1:] != t.shape[1:]:
                    raise ModelError(
                        f"model {name} changes shape with the input ({tuple(prev[0].shape[1:])} vs "
                        f"{tuple(t.shape[1:])} per sample): rewards need fixed-shape outputs"
                    )
                prev.append(t.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _logits(model: nn.Module, inputs: torch.Tensor, batch_size: int, label_offset: int) -> torch.Tensor:
    device = _device_of(model)
    out = []
    with eval_mode(model), torch.inference_mode():
        for i in range(0, inputs.shape[0], batch_size):
            z = model(inputs[i : i + batch_size].to(device))
            out.append(z[:, label_offset:].float().cpu())
    return torch.cat(out)


def output_kind(t: torch.Tensor) -> str:
    """``logits`` for ``(N, C)`` and ``(N, A, C)`` with ``C != 4`` (class and per-anchor scores),
    ``regression`` otherwise (box offsets ``(…, 4)``, feature maps, scalars per sample).

    :param t: one output, batch first
    """
    return "logits" if t.dim() in (2, 3) and t.shape[-1] not in (1, 4) else "regression"


def guess_kinds(outputs: Mapping[str, torch.Tensor]) -> list[str]:
    """:func:`output_kind` of each output of a multi-output model, with one exception: an
    ``(N, A, C)`` output counts as per-anchor class logits only when a sibling holds that many
    anchors' boxes, ``(N, A, 4)`` (an SSD's scores beside its locations). Alone, it is a packed
    row per anchor (YOLO's ``[x, y, w, h, obj, cls...]``, sigmoid scores, not one softmax), and a
    softmax over it would mix box coordinates with class logits: it is compared channel by
    channel (``regression``, :func:`tail_nmse`) instead.

    :param outputs: the original model's outputs by name, batch first
    """
    anchors = {tuple(t.shape[:2]) for t in outputs.values() if t.dim() == 3 and t.shape[-1] == 4}
    kinds = []
    for t in outputs.values():
        kind = output_kind(t)
        if kind == "logits" and t.dim() == 3 and tuple(t.shape[:2]) not in anchors:
            kind = "regression"
        kinds.append(kind)
    return kinds


#: Share of each output channel's positions that :func:`tail_nmse` treats as its top tail. A detector
#: decides by thresholds on the top of its score channels (objectness, class scores): a few hundred
#: anchors out of tens of thousands. 1 % of a 40×40 map over 16 inputs is 256 positions, enough to
#: be stable, and few enough that a handful of exploding logits dominate them.
TAIL_SHARE = 0.01

#: A channel's variance is floored at this share of the output's mean channel variance, so a
#: near-constant channel (dead after a ReLU, a saturated score) cannot make one error infinite.
CHANNEL_VAR_FLOOR = 0.01


def channel_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(positions, channels)``: dim 1 of an ``(N, C, H, W)`` map, the last dim otherwise
    (``(N, A, C)`` anchor rows, ``(N, C)`` vectors); a ``(N,)`` output is one channel.

    :param t: one output, batch first
    """
    if t.dim() == 4:
        return t.transpose(0, 1).reshape(t.shape[1], -1).t()
    if t.dim() == 1:
        return t.reshape(-1, 1)
    return t.reshape(-1, t.shape[-1])


def tail_nmse(ref: torch.Tensor, out: torch.Tensor, share: float = TAIL_SHARE) -> float:
    """Per-channel normalised squared error, plus the same error on each channel's top tail.

    Each channel ``c`` (:func:`channel_rows`) is normalised by its own variance in ``ref``, so a
    box-width channel and an objectness channel weigh alike, whatever their scales. Its score is
    ``mean_p e_pc + mean_{p in T_c} e_pc`` with ``e = (out - ref)^2 / var_c`` and ``T_c`` the
    positions where ``ref`` *or* ``out`` reaches the top ``share`` of ``ref``'s values in that
    channel: where the original fires, and where the student fires though the original does not.
    A mean over every position ignores a few exploding logits (an objectness channel rising from
    4.9 to 21.9 at a handful of anchors is a few false detections per image, and 1e-4 of the
    positions); on the tail they are a large share of the term. The result is the mean over
    channels, negated (higher is better, 0 for identical outputs).

    :param ref: the original model's output
    :param out: the pruned model's output, same shape
    :param share: the top share of positions per channel that forms the tail
    """
    r, o = channel_rows(ref.float()), channel_rows(out.float())
    var = r.var(0, unbiased=False)
    var = var.clamp_min(max(CHANNEL_VAR_FLOOR * float(var.mean()), 1e-12))
    err = (o - r).pow(2) / var
    k = max(1, math.ceil(share * r.shape[0]))
    threshold = r.topk(k, dim=0).values[-1]
    tail = (r >= threshold) | (o >= threshold)
    tail_err = (err * tail).sum(0) / tail.sum(0).clamp_min(1)
    return -float((err.mean(0) + tail_err).mean())


def _kind_scores(
    ref: torch.Tensor, out: torch.Tensor, kind: str, temperature: float, tail: float | None = None
) -> dict[str, float]:
    """The three measures for one output of a multi-output model.

    Without ``tail`` (the default): a ``regression`` output (boxes, raw head maps, features) scores
    its normalised MSE for all three, and a ``logits`` output (per-anchor class scores) ``measure``
    along its last dim as a classifier would. With ``tail``, a ``regression`` output scores
    :func:`tail_nmse` instead, and ``kl`` and ``mse`` of a ``logits`` output also add
    :func:`tail_nmse` of the softmax probabilities, the values a detector thresholds.
    """
    var = max(float(ref.var(unbiased=False)), 1e-12)
    nmse = -float((out - ref).pow(2).mean()) / var
    if kind == "regression":
        v = nmse if tail is None else tail_nmse(ref, out, tail)
        return {"kl": v, "top1": v, "mse": v}
    r, o = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
    kl = F.kl_div(
        F.log_softmax(o / temperature, dim=1),
        F.log_softmax(r / temperature, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    prob_tail = 0.0 if tail is None else tail_nmse(r.softmax(1), o.softmax(1), tail)
    return {
        "kl": -float(kl) + prob_tail,
        "top1": float((o.argmax(1) == r.argmax(1)).float().mean()),
        "mse": nmse + prob_tail,
    }


class AgreementReward:
    """Agreement of a pruned model with the original on a fixed, unlabelled input batch.

    The original model's logits are computed once here; each call then costs one forward pass of
    the pruned model, which is what makes it affordable once per RL episode.

    A model with several outputs (tuples, lists, dicts of tensors: a detector's class scores and box
    offsets, a backbone's feature maps) is scored on all of them, each with the measure that suits
    it (:func:`guess_kinds`, or ``output_kinds``): class logits by the chosen ``measure`` along their
    last dimension (per anchor for a detector), everything else channel by channel with a term on
    each channel's top tail (:func:`tail_nmse`: a detector thresholds the top of its score
    channels, where a mean over all anchors hides a few exploding logits); the reward is the mean
    over outputs. A single-tensor classifier is scored exactly as before: ``measure`` on its
    logits. ``label_offset`` applies to single-tensor classifiers only.

    :param original: the unpruned model
    :param inputs: the fixed batch
    :param measure: ``kl``, ``top1`` or ``mse`` (for logits outputs)
    :param temperature: softmax temperature of ``kl``
    :param label_offset: leading logits that are not dataset classes (single-tensor classifiers)
    :param batch_size: inputs per forward pass
    :param output_kinds: ``logits``/``regression`` per output of a multi-output model, in order
        (default: guessed from the outputs' shapes, :func:`guess_kinds`)
    :param tail: the top share of each channel's positions that :func:`tail_nmse` weighs again
        (multi-output models only); ``None`` (the default): a plain normalised MSE. Opt-in: on the
        slim face detector at 0.8x MACs it moved the final choice to the uncompensated plan and
        mAP@0.5 from 0.914 to 0.767 (docs/RESULTS.md)
    """

    def __init__(
        self,
        original: nn.Module,
        inputs: torch.Tensor,
        measure: str = "kl",
        temperature: float = 2.0,
        label_offset: int = 0,
        batch_size: int = 256,
        output_kinds: Sequence[str] | None = None,
        tail: float | None = None,
    ) -> None:
        if measure not in MEASURES:
            raise ValueError(f"unknown agreement measure {measure!r}; choose one of {', '.join(MEASURES)}")
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if inputs.dim() < 2 or inputs.shape[0] == 0:
            raise ValueError("inputs must be a non-empty batch (N, ...)")
        if tail is not None and not 0.0 < tail <= 1.0:
            raise ValueError(f"tail must be a share in (0, 1], got {tail}")
        self.tail = None if tail is None else float(tail)
        self.measure = measure
        self.temperature = float(temperature)
        self.label_offset = int(label_offset)
        self.batch_size = int(batch_size)
        self.inputs = inputs.detach().cpu()
        outputs = model_outputs(original, self.inputs, self.batch_size)
        #: names → kinds of a multi-output model's outputs; None for a single-tensor classifier
        self.kinds: dict[str, str] | None = None
        if list(outputs) != ["output"]:
            kinds = list(output_kinds) if output_kinds is not None else guess_kinds(outputs)
            if len(kinds) != len(outputs) or any(k not in OUTPUT_KINDS for k in kinds):
                raise ValueError(
                    f"output_kinds must give one of {', '.join(OUTPUT_KINDS)} for each of the {len(outputs)} outputs"
                )
            self.kinds = dict(zip(outputs, kinds))
            self.outputs = outputs
            return
        self.reference = outputs["output"][:, self.label_offset :]
        self._ref_logp = F.log_softmax(self.reference / self.temperature, dim=1)
        self._ref_top1 = self.reference.argmax(dim=1)
        # floor: a constant-logit original would otherwise divide by zero
        self._ref_var = max(float(self.reference.var(unbiased=False)), 1e-12)

    def _scores(self, logits: torch.Tensor) -> dict[str, float]:
        if logits.shape != self.reference.shape:
            raise ValueError(
                f"pruned model's outputs {tuple(logits.shape)} do not match the original's "
                f"{tuple(self.reference.shape)} (after label_offset={self.label_offset})"
            )
        logq = F.log_softmax(logits / self.temperature, dim=1)
        kl = F.kl_div(logq, self._ref_logp, log_target=True, reduction="batchmean")
        return {
            "kl": -float(kl),
            "top1": float((logits.argmax(dim=1) == self._ref_top1).float().mean()),
            "mse": -float((logits - self.reference).pow(2).mean()) / self._ref_var,
        }

    def _multi_scores(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        assert self.kinds is not None
        if list(outputs) != list(self.outputs):
            raise ValueError(f"pruned model's outputs {list(outputs)} do not match the original's {list(self.outputs)}")
        per = []
        for name, kind in self.kinds.items():
            ref, out = self.outputs[name], outputs[name]
            if out.shape != ref.shape:
                raise ValueError(
                    f"pruned model's {name} {tuple(out.shape)} does not match the original's {tuple(ref.shape)}"
                )
            per.append(_kind_scores(ref, out, kind, self.temperature, self.tail))
        return {m: sum(p[m] for p in per) / len(per) for m in MEASURES}

    def details(self, pruned: nn.Module) -> dict[str, float]:
        """All three measures (as rewards: higher is better) from one forward pass."""
        if self.kinds is not None:
            return self._multi_scores(model_outputs(pruned, self.inputs, self.batch_size))
        return self._scores(_logits(pruned, self.inputs, self.batch_size, self.label_offset))

    def __call__(self, pruned: nn.Module) -> float:
        return self.details(pruned)[self.measure]


class AccuracyReward:
    """Top-1 accuracy on a labelled loader (the AMC reward, for when labels are available).

    ``loader`` yields ``(x, y)`` with ``y`` the dataset's class indices; the model's class ``y`` is
    output ``y + label_offset``. ``max_batches`` caps the cost per call for a quick, fixed subset.
    The loader is re-iterated on every call, so it should be deterministic (no shuffling) for the
    reward to be comparable between episodes.
    """

    def __init__(
        self,
        loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
        label_offset: int = 0,
        max_batches: int | None = None,
    ) -> None:
        self.loader = loader
        self.label_offset = int(label_offset)
        self.max_batches = max_batches

    def __call__(self, model: nn.Module) -> float:
        device = _device_of(model)
        correct = total = 0
        with eval_mode(model), torch.inference_mode():
            for i, (x, y) in enumerate(self.loader):
                if self.max_batches is not None and i >= self.max_batches:
                    break
                z = model(x.to(device))[:, self.label_offset :]
                correct += int((z.argmax(dim=1).cpu() == y.view(-1).long()).sum())
                total += int(y.numel())
        if total == 0:
            raise ValueError("the labelled loader yielded no samples")
        return correct / total
