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
"""

from __future__ import annotations

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


def _kind_scores(ref: torch.Tensor, out: torch.Tensor, kind: str, temperature: float) -> dict[str, float]:
    """The three measures for one output; a regression output scores its normalised MSE for all three."""
    var = max(float(ref.var(unbiased=False)), 1e-12)
    nmse = -float((out - ref).pow(2).mean()) / var
    if kind == "regression":
        return {"kl": nmse, "top1": nmse, "mse": nmse}
    r, o = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
    kl = F.kl_div(
        F.log_softmax(o / temperature, dim=1),
        F.log_softmax(r / temperature, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    return {"kl": -float(kl), "top1": float((o.argmax(1) == r.argmax(1)).float().mean()), "mse": nmse}


class AgreementReward:
    """Agreement of a pruned model with the original on a fixed, unlabelled input batch.

    The original model's logits are computed once here; each call then costs one forward pass of
    the pruned model, which is what makes it affordable once per RL episode.

    A model with several outputs (tuples, lists, dicts of tensors: a detector's class scores and box
    offsets, a backbone's feature maps) is scored on all of them, each with the measure that suits
    it (:func:`output_kind`, or ``output_kinds``): class logits by the chosen ``measure`` along their
    last dimension (per anchor for a detector), everything else by normalised MSE; the reward is
    the mean over outputs. ``label_offset`` applies to single-tensor classifiers only.

    :param original: the unpruned model
    :param inputs: the fixed batch
    :param measure: ``kl``, ``top1`` or ``mse`` (for logits outputs)
    :param temperature: softmax temperature of ``kl``
    :param label_offset: leading logits that are not dataset classes (single-tensor classifiers)
    :param batch_size: inputs per forward pass
    :param output_kinds: ``logits``/``regression`` per output of a multi-output model, in order
        (default: guessed from each output's shape)
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
    ) -> None:
        if measure not in MEASURES:
            raise ValueError(f"unknown agreement measure {measure!r}; choose one of {', '.join(MEASURES)}")
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if inputs.dim() < 2 or inputs.shape[0] == 0:
            raise ValueError("inputs must be a non-empty batch (N, ...)")
        self.measure = measure
        self.temperature = float(temperature)
        self.label_offset = int(label_offset)
        self.batch_size = int(batch_size)
        self.inputs = inputs.detach().cpu()
        outputs = model_outputs(original, self.inputs, self.batch_size)
        #: names → kinds of a multi-output model's outputs; None for a single-tensor classifier
        self.kinds: dict[str, str] | None = None
        if list(outputs) != ["output"]:
            kinds = list(output_kinds) if output_kinds is not None else [output_kind(t) for t in outputs.values()]
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
            per.append(_kind_scores(ref, out, kind, self.temperature))
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
