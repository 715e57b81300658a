"""Data-free inputs: images distilled from the model itself, so pruning needs no dataset.

A reward that ranks pruned models needs inputs on which the original network behaves as it does on
real data. Gaussian noise is a poor stand-in: deep layers see activations far from anything seen in
training, so agreement on noise says little about agreement on images. Two ways out, by model kind:

``"bn"`` (ZeroQ, Cai et al. 2020)
    Every BatchNorm layer stores the per-channel mean and variance its input had over the training
    set. Optimising a batch of inputs until the batch statistics at *every* BN layer match those
    running statistics gives a batch whose internal activations are distributed like real data's.
    Loss, per BN layer, averaged over its channels::

        mean_c (mu_batch - running_mean)^2  +  mean_c (sigma_batch - sqrt(running_var + eps))^2

    summed over layers. We match the *standard deviation*, as ZeroQ does, rather than the variance:
    running variances span orders of magnitude across layers, and matching them directly lets a few
    high-variance layers dominate the sum. Per-channel averaging (ZeroQ divides by the channel count
    too) keeps wide and narrow layers on an equal footing. Statistics are those of the whole batch
    over (N, H, W), exactly what BN computed in training (ZeroQ averages per-sample statistics
    instead, which ignores the between-image part of the variance). A small extra term of the same
    form pulls the inputs towards zero mean and unit std per channel, the statistics of the
    normalised input space (ZeroQ adds the same term).

``"deepinversion"`` (BN models; DeepInversion, Yin et al. 2020)
    The ``"bn"`` objective plus a cross-entropy term towards a random target class per image, with
    random flips and shifts (jitter) at every step. The class term spreads the batch over the
    classes the network knows (tested: the model predicts the targets), and the jitter keeps it
    from fitting pixel-exact patterns. An option, not the default: for refinement it did worse on
    MobileNet-V1 (44.1 % against 53.9 % at uniform 0.8 with as many steps) and moved the CIFAR
    ResNets by -2.7 to +1.4 points (docs/RESULTS.md, "Better synthesis").

``"inversion"`` (for models without BatchNorm, e.g. BN-folded or quantisation-exported networks)
    There are no stored statistics to match. We use the DeepInversion (Yin et al. 2020) image prior
    without its BN term: each image gets a random target class and the inputs are optimised for
    cross-entropy on that class, regularised by total variation and an l2 penalty, so the batch
    covers many classes with smooth, image-like inputs instead of drifting into adversarial noise.

``"noise"``
    Plain Gaussian noise in the normalised input space, N(0, 1) per pixel. No optimisation; a
    baseline and the cheapest fallback.

``method="auto"`` picks ``"bn"`` when the model has BatchNorm layers with running statistics and
the no-BN fallback (:data:`NO_BN_FALLBACK`) otherwise.

Why these choices (Spearman rho between the agreement reward, KL at T=2, and real top-1 accuracy
over damaged copies of each model: channels zeroed as uncompensated pruning does)::

                            ResNet-56 (30 variants)  MobileNet-V1 (24)  MobileNet-V2 no BN (24)
    real unlabelled, n=64          0.969                 0.988              0.995
    "bn", n=64 / 32 (default)      0.967                 0.951                -
    "inversion", default           0.913                 0.935              0.847
    "noise"                        0.544                 0.887              0.620

Distilled batches rank nearly as well as real images; noise does not. Without BN, inversion is
clearly better than noise, though below real data. For *ranking*, 50 to 300 steps give the same
rho on ResNet-56 (0.965-0.973), and 40 steps suffice on MobileNet-V1. Refinement
(:mod:`autodfp.compress.refine`) asks more of the batch: it fits weights to it. On 224-px inputs, 40 steps
leave the batch too far from images for that, and 200 steps do much better (docs/RESULTS.md,
"synthesis steps"), so the 224-px default is 200 steps, once per model and seed, then cached. Above
64x64 px, three quarters of them run at half the height and width (``low_res``; DeepInversion's
multi-resolution schedule): on MobileNet-V1 that took 0.48x the time and the refined model did no
worse (docs/RESULTS.md, "Synthesis at 224 px"); with ``low_res_levels`` 2 the first half of those
run at a quarter of the size, which cost a chunk 243.6 s instead of 304.7 for the same BN loss (7.82
against 7.99; docs/RESULTS.md, "A quarter-size start"). Nine tenths left the batch far from the
statistics (BN loss 43.6 against 8.0) and cost refinement 14.5 points; 160 steps instead of 200
cost it 1.8. ResNet-56 with n=64 and 100 steps takes ~28 s. On a CPU the full-size steps run in
micro-batches of eight (:class:`_BNMoments`, the same loss and gradient), a quarter faster.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from autodfp._checks import check_seed
from autodfp._io import atomic_write
from autodfp._micro import micro_batch_size
from autodfp._modes import eval_mode
from autodfp._outputs import normalised_mse
from autodfp.config import SYNTH_METHODS, SYNTH_SETTINGS, size_class
from autodfp.distributed.executor import Executor
from autodfp.errors import CacheWarning, ModelError
from autodfp.models.hub import cache_dir as _default_cache_root
from autodfp.models.hub import usable_cache_dir

METHODS = SYNTH_METHODS
#: what ``method="auto"`` uses for models without BatchNorm (chosen by measurement, see module doc)
NO_BN_FALLBACK = "inversion"

#: Batches bigger than this are distilled, and cached, in chunks of this size. Each chunk is a ZeroQ
#: batch of its own (its statistics match every BN layer's), memory stays bounded, and a larger
#: batch extends a smaller one: the first chunk of a 256-input batch *is* the 64-input batch of the
#: same seed. So a step that needs fewer inputs (the calibration, a final selection) reads a prefix
#: of what a search distils, and raising ``--refine-inputs`` reuses what was already distilled.
CHUNK = 64
#: Chunk ``i > 0`` of a batch with seed ``s`` is distilled from seed ``s + i * CHUNK_SEED_STRIDE``:
#: far from the small seeds users pick, so a chunk is never another run's whole batch.
CHUNK_SEED_STRIDE = 1_000_003
#: ``"deepinversion"`` weights of the class and smoothness terms relative to the BN term
DI_CE_WEIGHT = 0.3
DI_TV_WEIGHT = 0.1


def disagreement(teacher_out: Any, student_out: Any) -> torch.Tensor:
    """How far a student's outputs are from the teacher's, in [0, 1]: the competition term's measure.

    Class logits (N, classes) are compared by the Jensen-Shannon divergence of their softmaxes,
    divided by ln 2 (its maximum), as Adaptive DeepInversion does: bounded, so a batch cannot buy
    an unbounded gain by drifting into inputs no image resembles. Other outputs (a detector's
    tensors) by their mean squared difference over the teacher's variance, mapped to
    ``1 - exp(-d)``, bounded the same way.
    """
    if isinstance(teacher_out, torch.Tensor) and isinstance(student_out, torch.Tensor) and teacher_out.dim() == 2:
        p, q = F.softmax(teacher_out.float(), 1), F.softmax(student_out.float(), 1)
        m = (0.5 * (p + q)).clamp_min(1e-12).log()
        js = 0.5 * (F.kl_div(m, p, reduction="batchmean") + F.kl_div(m, q, reduction="batchmean"))
        return (js / math.log(2.0)).clamp(0.0, 1.0)
    return 1.0 - torch.exp(-normalised_mse(student_out, teacher_out))


def default_settings(method: str, input_shape: Sequence[int]) -> tuple[int, float]:
    """(steps, lr) used when the caller gives none (:data:`autodfp.config.SYNTH_SETTINGS`)."""
    return SYNTH_SETTINGS[method][size_class(input_shape)]


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class SynthResult:
    """The distilled batch with what it cost and how well it converged."""

    images: torch.Tensor
    method: str
    steps: int
    lr: float
    #: the method's objective on the initial noise and on the returned batch (0 for ``"noise"``)
    initial_loss: float
    final_loss: float
    seconds: float

    @property
    def loss_ratio(self) -> float:
        return self.final_loss / self.initial_loss if self.initial_loss > 0 else 0.0


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BN layers that carry running statistics (the only ones ZeroQ can match)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BN_TYPES)
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
    ]


def resolve_method(model: nn.Module, method: str = "auto") -> str:
    if method not in METHODS:
        raise ValueError(f"unknown synthesis method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "auto":
        return "bn" if bn_layers(model) else NO_BN_FALLBACK
    if method in ("bn", "deepinversion") and not bn_layers(model):
        raise ValueError(f"method='{method}' needs BatchNorm layers with running statistics; this model has none")
    return method


class _BNHooks:
    """A forward hook on every given BN layer for the duration of a ``with`` block."""

    def __init__(self, layers: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
        self.layers = list(layers)
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Self:
        for bn in self.layers:
            self._handles.append(bn.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        raise NotImplementedError


def _bn_term(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """One BN call's ZeroQ term from its input's batch mean and biased variance, in their dtype."""
    running_mean, running_var = bn.running_mean, bn.running_var
    assert running_mean is not None and running_var is not None  # bn_layers() keeps BNs that have them
    std = torch.sqrt(var + bn.eps)
    run_std = torch.sqrt(running_var.to(var.dtype) + bn.eps)
    return (mean - running_mean.to(mean.dtype)).pow(2).mean() + (std - run_std).pow(2).mean()


class _BNStatLoss(_BNHooks):
    """Collects the ZeroQ statistic-matching loss from forward hooks while the model runs."""

    def __init__(self, layers: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
        super().__init__(layers)
        self.terms: list[torch.Tensor] = []

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        bn = cast(nn.modules.batchnorm._BatchNorm, module)  # hooked on self.layers only
        self.terms.append(_bn_term(bn, x.mean(dim=dims), x.var(dim=dims, unbiased=False)))

    def pop(self) -> torch.Tensor:
        if not self.terms:
            raise ValueError("the model has BatchNorm layers but none ran in its forward pass; use method='inversion'")
        total = torch.stack(self.terms).sum()
        self.terms = []
        return total


class _BNMoments(_BNHooks):
    """The ZeroQ loss of a batch run in micro-batches, with the whole batch's exact gradient.

    A 224-px batch of 64 runs slower per image on a CPU than micro-batches of a few images whose
    activations stay in cache (:mod:`autodfp._micro`). The loss is not a sum over images, though:
    it compares each BN layer's whole-batch mean and std with its running statistics. It is a
    function of per-channel moments that *are* sums over images, so its gradient splits exactly.
    For a BN input ``a`` with ``N`` values per channel::

        dL/dx_i = sum over a:  (dL/dmean_a / N) da_i/dx_i  +  (dL/dvar_a / N) 2 (a_i - mean_a) da_i/dx_i

    :meth:`loss` runs the micro-batches forward, keeping their graphs, and pools the moments of
    every BN input (Chan's parallel update, in float64, so no variance is lost to cancellation).
    :meth:`backward` then back-propagates, part by part and from every BN input of the part at
    once, the bracket above: a vector-Jacobian product, with no graph built for the statistics
    themselves. Same loss and gradient as the whole batch up to float rounding.

    Moments are kept per BN *call* in forward order, as :class:`_BNStatLoss` keeps one term per call:
    a layer that runs twice in a forward pass gives two terms.
    """

    def __init__(self, layers: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
        super().__init__(layers)
        self._calls = 0
        #: per call, pooled over the parts seen so far: (BN, count, mean, M2), float64
        self._moments: list[tuple[nn.modules.batchnorm._BatchNorm, int, torch.Tensor, torch.Tensor]] = []
        #: per part, its BN inputs in call order, graphs kept for :meth:`backward`
        self._kept: list[list[torch.Tensor]] = []
        #: per call, the pooled (mean, variance) as leaves of :meth:`loss`'s graph
        self._leaves: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        i, self._calls = self._calls, self._calls + 1
        self._kept[-1].append(x)
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.detach(), dim=[0] + list(range(2, x.dim())), unbiased=False)
        mean, m2 = mean.double(), var.double() * count
        if i == len(self._moments):
            self._moments.append((cast(nn.modules.batchnorm._BatchNorm, module), count, mean, m2))
            return
        bn, n_a, mean_a, m2_a = self._moments[i]
        total = n_a + count
        delta = mean - mean_a
        self._moments[i] = (
            bn,
            total,
            mean_a + delta * (count / total),
            m2_a + m2 + delta * delta * (n_a * count / total),
        )

    def loss(self, model: nn.Module, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The whole batch's loss (float64, a graph over the pooled moments); runs every part."""
        self._moments, self._kept, self._leaves = [], [], []
        for part in parts:
            self._kept.append([])
            self._calls = 0
            model(part)
            if self._calls == 0:
                raise ValueError(
                    "the model has BatchNorm layers but none ran in its forward pass; use method='inversion'"
                )
        terms = []
        for bn, count, mean, m2 in self._moments:
            mean = mean.requires_grad_(True)
            var = (m2 / count).requires_grad_(True)
            terms.append(_bn_term(bn, mean, var))
            self._leaves.append((mean, var))
        return torch.stack(terms).sum()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``d loss / d input`` of :meth:`loss`'s batch into the leaf its parts view."""
        grads = torch.autograd.grad(loss, [t for pair in self._leaves for t in pair])
        weights = [
            (mean.detach(), grads[2 * k] / count, 2 * grads[2 * k + 1] / count)
            for k, ((mean, _), (_, count, _, _)) in enumerate(zip(self._leaves, self._moments))
        ]
        try:
            for kept in self._kept:
                roots = []
                for x, (mean, g_mean, g_var2) in zip(kept, weights):
                    shape = [1, -1] + [1] * (x.dim() - 2)
                    with torch.no_grad():
                        centred = x.detach() - mean.to(x.dtype).view(shape)
                        roots.append(centred.mul_(g_var2.to(x.dtype).view(shape)).add_(g_mean.to(x.dtype).view(shape)))
                torch.autograd.backward(kept, roots)
                kept.clear()  # frees the part's graph before the next part's backward
        finally:
            self._kept, self._leaves = [], []


def _input_prior(x: torch.Tensor) -> torch.Tensor:
    """Same form as one BN term, with target N(0, 1): the normalised input space's own statistics."""
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dim=dims)
    std = torch.sqrt(x.var(dim=dims, unbiased=False) + 1e-5)
    return mean.pow(2).mean() + (std - 1.0).pow(2).mean()


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    dh = x[..., 1:, :] - x[..., :-1, :]
    dw = x[..., :, 1:] - x[..., :, :-1]
    return dh.pow(2).mean() + dw.pow(2).mean()


def bn_stat_loss(model: nn.Module, x: torch.Tensor) -> float:
    """The ZeroQ objective of a batch (without the input prior); for reporting convergence."""
    layers = bn_layers(model)
    if not layers:
        raise ValueError("model has no BatchNorm layers with running statistics")
    with _frozen(model), torch.no_grad(), _BNStatLoss(layers) as hook:
        model(x)
        return float(hook.pop())


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, no parameter gradients; both restored on exit so the caller's model is untouched."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        for p, _ in grads:
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _progress(steps: int, enabled: bool, desc: str) -> Iterator[int]:
    if not enabled:
        return iter(range(steps))
    from autodfp._progress import progress_bar

    return iter(progress_bar(range(steps), desc=desc, unit="step"))


def distill(
    model: nn.Module,
    input_shape: Sequence[int] = (3, 32, 32),
    n: int = 64,
    steps: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    method: str = "auto",
    label_offset: int = 0,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
    low_res: float = 0.0,
    student: nn.Module | None = None,
    compete: float = 0.0,
    micro_batch: int | None = None,
    low_res_levels: int = 1,
) -> SynthResult:
    """Like :func:`synthesize`, returning convergence numbers alongside the batch.

    With a ``student`` and ``compete > 0``, the objective also rewards inputs on which the student
    disagrees with ``model`` (Adaptive DeepInversion's competition term,
    ``compete * (1 - disagreement)``, :func:`disagreement`): the batch goes where a distillation
    has most left to teach. Neither network is modified. The reported losses stay the method's own.

    ``micro_batch``: inputs per forward pass of a ``"bn"`` step without a student (0: the whole
    batch; ``None``: by input size on a CPU, :func:`autodfp._micro.micro_batch_size`). It changes
    the speed, not the objective: the loss and gradient are the whole batch's (:class:`_BNMoments`).
    """
    return _distill(
        model,
        input_shape,
        n,
        steps,
        lr,
        check_seed(seed),
        method,
        label_offset,
        progress,
        callback,
        low_res,
        student,
        compete,
        micro_batch,
        low_res_levels,
    )


def _distill(
    model: nn.Module,
    input_shape: Sequence[int],
    n: int,
    steps: int | None,
    lr: float | None,
    seed: int,
    method: str,
    label_offset: int,
    progress: bool,
    callback: Callable[[int, float], None] | None = None,
    low_res: float = 0.0,
    student: nn.Module | None = None,
    compete: float = 0.0,
    micro_batch: int | None = None,
    low_res_levels: int = 1,
) -> SynthResult:
    """:func:`distill` for any seed torch accepts: chunk seeds (:data:`CHUNK_SEED_STRIDE`) may pass 2**32."""
    method = resolve_method(model, method)
    d_steps, d_lr = default_settings(method, input_shape)
    steps = d_steps if steps is None else int(steps)
    lr = d_lr if lr is None else float(lr)
    if n < 2 and method in ("bn", "deepinversion"):
        raise ValueError("ZeroQ matches batch statistics; n must be at least 2")
    if not 0.0 <= float(low_res) < 1.0:
        raise ValueError(f"low_res is a share of the steps in [0, 1), got {low_res!r}")
    if isinstance(low_res_levels, bool) or not isinstance(low_res_levels, int) or low_res_levels < 1:
        raise ValueError(f"low_res_levels is a whole number of reduced sizes, at least 1, got {low_res_levels!r}")
    if not (math.isfinite(float(compete)) and float(compete) >= 0.0):
        raise ValueError(f"compete must be a finite, non-negative weight, got {compete!r}")
    competing = student is not None and float(compete) > 0.0
    device = _model_device(model)
    start = time.perf_counter()

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    stages = _stages(model, input_shape, method, steps, float(low_res), low_res_levels, device)
    x0 = torch.randn((n, *stages[0][0]), generator=gen)

    # fork_rng: a seeded, deterministic run without disturbing the caller's global RNG stream
    # (randomness inside the model, e.g. dropout, is off in eval mode anyway).
    # inference_mode(False)/enable_grad: works even when called from inside a caller's no-grad block.
    cuda = [device.index or 0] if device.type == "cuda" else []
    rival = _frozen(student) if competing and student is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=cuda), _frozen(model), rival, torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(int(seed))
        x = x0.to(device).requires_grad_(method != "noise")

        if method == "noise":
            return SynthResult(x.detach().cpu(), method, 0, 0.0, 0.0, 0.0, time.perf_counter() - start)

        if method in ("inversion", "deepinversion"):
            with torch.no_grad():
                probe = model(x0[:1].to(device))
            if not isinstance(probe, torch.Tensor) or probe.dim() != 2:
                # inversion draws target classes from a classifier's logits; a detector's or a
                # backbone's outputs have none to draw from
                shown = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
                raise ModelError(
                    f"synthesis method '{method}' needs a classifier returning logits (N, classes), but the model "
                    f"returns {shown}; use 'bn' (from BatchNorm statistics) or 'noise'"
                )
            n_out = probe.shape[1]
            if n_out <= label_offset:
                raise ValueError(f"label_offset {label_offset} leaves no classes among {n_out} outputs")
            targets = torch.randint(label_offset, n_out, (n,), generator=gen).to(device)
        if method == "deepinversion":
            layers = bn_layers(model)
            hook = _BNStatLoss(layers)

            def terms(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
                shift = max(1, int(batch.shape[-1]) // 16) if batch.dim() >= 3 else 0
                dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
                moved = torch.roll(batch, shifts=(dy, dx), dims=(-2, -1))
                if bool(torch.rand((), generator=gen) < 0.5):
                    moved = moved.flip(-1)
                logits = model(moved)
                loss = (
                    hook.pop()
                    + _input_prior(batch)
                    + DI_CE_WEIGHT * F.cross_entropy(logits, targets)
                    + DI_TV_WEIGHT * _total_variation(batch)
                )
                return loss, moved, logits

            def report(batch: torch.Tensor) -> float:
                model(batch)
                return float(hook.pop())
        elif method == "bn":
            layers = bn_layers(model)
            hook = _BNStatLoss(layers)

            def terms(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
                out = model(batch)
                return hook.pop() + _input_prior(batch), batch, out

            def report(batch: torch.Tensor) -> float:
                model(batch)
                return float(hook.pop())
        else:  # inversion
            hook = None

            def terms(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
                logits = model(batch)
                loss = F.cross_entropy(logits, targets) + 1.0 * _total_variation(batch) + 1e-2 * batch.pow(2).mean()
                return loss, batch, logits

            def report(batch: torch.Tensor) -> float:
                return float(terms(batch)[0])

        ctx = hook if hook is not None else contextlib.nullcontext()

        def objective(batch: torch.Tensor) -> torch.Tensor:
            loss, fed, out = terms(batch)
            if competing and student is not None:  # the student sees exactly what the teacher saw
                loss = loss + float(compete) * (1.0 - disagreement(out, student(fed)))
            loss.backward()
            return loss.detach()

        moments = _BNMoments(bn_layers(model)) if method == "bn" and not competing else None

        def micro_objective(batch: torch.Tensor) -> torch.Tensor:
            """``objective`` of the "bn" method, in micro-batches when they pay (:class:`_BNMoments`)."""
            size = micro_batch_size(batch, device, micro_batch)
            if moments is None or size >= batch.shape[0]:
                with ctx:
                    return objective(batch)
            parts = batch.split(size)
            with moments:
                loss = moments.loss(model, parts)
            moments.backward(loss)
            prior = _input_prior(batch)
            prior.backward()
            return loss.detach().to(batch.dtype) + prior.detach()

        with torch.no_grad(), ctx:
            initial = report(_upsampled(x.detach(), input_shape))
        bar = _progress(steps, progress, f"synthesis ({method})")
        done = 0
        for shape, count in stages:
            if tuple(x.shape[1:]) != shape:
                x = _upsampled(x.detach(), shape).requires_grad_(True)
            x = _optimise(x, micro_objective, count, lr, bar, callback, done)
            done += count
        for _ in bar:  # ends the progress bar
            pass
        with torch.no_grad(), ctx:
            final = report(x)
    return SynthResult(x.detach().cpu(), method, steps, lr, float(initial), float(final), time.perf_counter() - start)


#: The low-resolution stage halves each spatial side, and only for inputs whose sides stay at least
#: this large: below it a CNN's deeper layers see a map of a pixel or two, too far from their
#: training statistics for the stage to help.
LOW_RES_MIN_SIDE = 32


def _low_res_shapes(input_shape: Sequence[int], method: str, levels: int = 1) -> list[tuple[int, ...]]:
    """The reduced sizes a batch may start at, smallest first: ``(C, H/2**k, W/2**k)`` for ``k`` from
    ``levels`` down to 1, each kept only if its sides stay at least :data:`LOW_RES_MIN_SIDE`; none
    for an input that is not image-shaped or a method that does not optimise (noise has no steps)."""
    shape = tuple(int(s) for s in input_shape)
    if method == "noise" or len(shape) != 3:
        return []
    return [
        (shape[0], shape[1] >> k, shape[2] >> k)
        for k in range(int(levels), 0, -1)
        if min(shape[1:]) >> k >= LOW_RES_MIN_SIDE
    ]


def _stages(
    model: nn.Module,
    input_shape: Sequence[int],
    method: str,
    steps: int,
    low_res: float,
    levels: int,
    device: torch.device,
) -> list[tuple[tuple[int, ...], int]]:
    """``(shape, steps)`` of each stage, smallest size first and the full size last (never empty).

    ``low_res`` of the steps are shared evenly by the reduced sizes, the smaller ones taking any
    rounding down. On MobileNet-V1 a quarter-size start for half of them left the batch as close to
    the BN statistics as half-size steps alone did, in 0.80 of the time (docs/RESULTS.md, "A
    quarter-size start"). A size the model refuses (a flatten into a Linear) is left out.
    """
    full = tuple(int(s) for s in input_shape)
    low_steps = round(steps * low_res)
    shapes = _low_res_shapes(full, method, levels) if low_steps else []
    # a model tied to its input size (a flatten into a Linear) stays at full size
    shapes = [s for s in shapes if _runs_at(model, s, device)]
    counts = [low_steps * (i + 1) // len(shapes) - low_steps * i // len(shapes) for i in range(len(shapes))]
    stages = [(s, c) for s, c in zip(shapes, counts, strict=True) if c > 0]
    return [*stages, (full, steps - sum(c for _, c in stages))]


def _runs_at(model: nn.Module, shape: Sequence[int], device: torch.device) -> bool:
    """Whether the model accepts inputs of this shape: a classifier tied to its input size does not."""
    try:
        with eval_mode(model), torch.no_grad():  # eval: a probe must not move BN running statistics
            model(torch.zeros((2, *shape), device=device))
    except Exception:  # any failure means "not at this size"; the full-size stage reports real errors
        return False
    return True


def _upsampled(x: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """``x`` at the full input size (bilinear), or ``x`` itself when it already is."""
    size = tuple(int(s) for s in input_shape[1:])
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _optimise(
    x: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    steps: int,
    lr: float,
    bar: Iterator[int],
    callback: Callable[[int, float], None] | None,
    first: int,
) -> torch.Tensor:
    """``steps`` Adam steps on ``x`` with a cosine decay of its own; ``bar`` advances once a step.

    ``objective`` fills ``x.grad`` and returns the loss, detached: it may run the batch in parts.

    Each resolution stage gets a fresh optimiser and schedule (as DeepInversion's multi-resolution
    setting does): large early steps to leave the noise (or to sharpen the upsampled batch), small
    late ones to settle.
    """
    if steps <= 0:
        return x
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for i in range(steps):
        next(bar, None)
        opt.zero_grad(set_to_none=True)
        loss = objective(x)  # fills x.grad
        opt.step()
        sched.step()
        if callback is not None:
            callback(first + i, float(loss.detach()))
    return x


def synthesize(
    model: nn.Module,
    input_shape: Sequence[int] = (3, 32, 32),
    n: int = 64,
    steps: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    progress: bool = False,
    method: str = "auto",
    label_offset: int = 0,
    low_res: float = 0.0,
    low_res_levels: int = 1,
) -> torch.Tensor:
    """A batch of ``n`` inputs, shape ``(n, *input_shape)``, distilled from ``model`` alone.

    Inputs live in the model's normalised input space (what the model consumes, not pixels).
    ``steps``/``lr`` default per method and input size (:func:`default_settings`). The same seed
    gives the same tensor on the same machine. ``label_offset`` matters only for ``"inversion"``: target
    classes are drawn from ``logits[:, label_offset:]`` (MobileNet-V2's output 0 is "background").
    ``low_res`` is the share of the steps spent at half the height and width before the batch is
    upsampled and finished at full size (DeepInversion's multi-resolution schedule): those steps cost
    about a third as much (0.31 on MobileNet-V1). With ``low_res_levels`` 2 those steps are shared by a
    quarter-size stage and a half-size one (:func:`_stages`). Inputs under twice :data:`LOW_RES_MIN_SIDE`
    a side, and models that refuse the smaller size, get every step at full size.
    """
    return distill(
        model,
        input_shape,
        n,
        steps,
        lr,
        seed,
        method,
        label_offset,
        progress,
        low_res=low_res,
        low_res_levels=low_res_levels,
    ).images


def state_dict_hash(model: nn.Module) -> str:
    """Content hash of the weights and buffers, so a cache entry never outlives the model it came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_path(root: Path, model_key: str, parts: dict) -> Path:
    key = "|".join(f"{k}={parts[k]}" for k in sorted(parts))
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_key)[:80] or "model"
    return root / f"{safe}-{parts['method']}-n{parts['n']}-s{parts['seed']}-{digest}.pt"


#: Largest magnitude a cached synthetic input may hold. Inputs live in the model's normalised
#: input space, where real images lie within a few units of 0 and distilled ones within tens; a
#: value past this is a damaged or foreign entry, which would make every BN statistic and score
#: of the run nonsense and be blamed on the model.
CACHE_MAX_ABS = 1e4


def _read_cache_entry(path: Path, shape: tuple[int, ...]) -> tuple[torch.Tensor | None, str]:
    """The images of the cache entry at ``path`` if they can be trusted, else ``(None, why not)``.

    An entry is trusted only if it loads weights-only and holds a floating tensor of exactly
    ``shape`` whose values are all finite and below :data:`CACHE_MAX_ABS` in magnitude. A truncated
    write, a disk error or a hand-edited file otherwise became the run's inputs: an entry full of
    NaN made the pruned model's BN statistics NaN, and the run failed blaming the model.
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any damage: the entry is recomputed, never fatal
        return None, f"unreadable: {exc.__class__.__name__}"
    images = blob.get("images") if isinstance(blob, dict) else None
    if not isinstance(images, torch.Tensor):
        return None, "no images tensor"
    if not images.is_floating_point():
        return None, f"dtype {str(images.dtype).removeprefix('torch.')}, not floating point"
    if tuple(images.shape) != tuple(shape):
        return None, f"shape {tuple(images.shape)}, expected {tuple(shape)}"
    if not bool(torch.isfinite(images).all()):
        return None, "non-finite values"
    if images.numel() and float(images.abs().max()) > CACHE_MAX_ABS:
        return None, f"values beyond ±{CACHE_MAX_ABS:g}"
    return images, ""


def chunk_sizes(n: int, input_shape: Sequence[int]) -> list[int]:
    """How :func:`synthetic_batch` splits ``n`` inputs: :data:`CHUNK` s, whatever the input size.

    A remainder of one input joins the last chunk, since a BN batch of one has no variance to match.
    ``input_shape`` is kept for callers; the split no longer depends on it.
    """
    if n <= CHUNK:
        return [int(n)]
    sizes = [CHUNK] * (n // CHUNK)
    rest = n % CHUNK
    if rest == 1:
        sizes[-1] += 1
    elif rest:
        sizes.append(rest)
    return sizes


def _chunks(n: int, seed: int, input_shape: Sequence[int]) -> list[tuple[int, int]]:
    """``(inputs, seed)`` of each chunk of a batch of ``n`` with ``seed`` (:func:`chunk_sizes`,
    :data:`CHUNK_SEED_STRIDE`): one rule for the synthesis and for :func:`cache_entry_paths`."""
    return [(size, int(seed) + i * CHUNK_SEED_STRIDE) for i, size in enumerate(chunk_sizes(n, input_shape))]


def _chunk_entry(
    model_key: str,
    weights: str,
    input_shape: Sequence[int],
    n: int,
    seed: int,
    method: str,
    steps: int,
    lr: float,
    label_offset: int,
    low_res: float,
    low_res_levels: int,
    cache_dir: str | Path | None,
) -> tuple[Path, dict[str, Any], list[tuple[int, ...]]]:
    """The cache file of one chunk, the key ``parts`` it is named after and the reduced sizes its
    synthesis starts at: pure (no model, no disk), so a plan of work can name the files the
    synthesis will read or write without distilling anything.

    ``method`` is resolved and ``steps``/``lr`` are filled in; ``weights`` is
    :func:`state_dict_hash` of the model.
    """
    root = Path(cache_dir) if cache_dir is not None else _default_cache_root() / "synthetic"
    parts: dict[str, Any] = {
        "model_key": model_key,
        "weights": weights,
        "shape": tuple(int(s) for s in input_shape),
        "n": int(n),
        "seed": int(seed),
        "method": method,
        "steps": int(steps),
        "lr": float(lr),
        "label_offset": int(label_offset),
    }
    reduced = _low_res_shapes(input_shape, method, low_res_levels) if low_res else []
    if reduced:
        parts["low_res"] = float(low_res)
    if len(reduced) > 1:  # one reduced size keeps the key it had before more were possible
        parts["low_res_levels"] = len(reduced)
    return _cache_path(root, model_key, parts), parts, reduced


def cache_entry_paths(
    model: nn.Module,
    model_key: str,
    input_shape: Sequence[int],
    n: int = 64,
    seed: int = 0,
    method: str = "auto",
    steps: int | None = None,
    lr: float | None = None,
    label_offset: int = 0,
    low_res: float = 0.0,
    low_res_levels: int = 1,
    cache_dir: str | Path | None = None,
) -> list[Path]:
    """The cache file of each chunk :func:`synthetic_batch` reads or writes for these arguments,
    in chunk order, computed without synthesising anything.

    A plan of work says which batches are already cached (a reload takes milliseconds, a
    distillation minutes); it must name exactly the files the synthesis will use, so both go
    through :func:`_chunks` and :func:`_chunk_entry`. The cost is one hash of the model's weights.
    """
    resolved = resolve_method(model, method)
    d_steps, d_lr = default_settings(resolved, input_shape)
    steps = d_steps if steps is None else int(steps)
    lr = d_lr if lr is None else float(lr)
    weights = state_dict_hash(model)
    return [
        _chunk_entry(
            model_key,
            weights,
            input_shape,
            size,
            chunk_seed,
            resolved,
            steps,
            lr,
            label_offset,
            float(low_res),
            int(low_res_levels),
            cache_dir,
        )[0]
        for size, chunk_seed in _chunks(n, check_seed(seed), input_shape)
    ]


def synthetic_batch(
    model: nn.Module,
    model_key: str,
    input_shape: Sequence[int],
    n: int = 64,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    method: str = "auto",
    steps: int | None = None,
    lr: float | None = None,
    label_offset: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    low_res: float = 0.0,
    low_res_levels: int = 1,
    executor: Executor | None = None,
) -> torch.Tensor:
    """:func:`synthesize`, cached on disk: distillation costs minutes, a reload milliseconds.

    The key covers everything that changes the result: ``model_key``, a hash of the state dict (a
    fine-tuned model under the same name gets its own entry), shape, ``n``, seed, the resolved
    method, steps, learning rate, the low-resolution share (when not 0, so entries written
    before it existed stay valid) and the number of reduced sizes (when more than one, likewise).
    Default location: ``autodfp.hub.cache_dir()/"synthetic"``.
    Batches are concatenated chunks (:func:`chunk_sizes`), each distilled and cached on its own.
    ``log`` receives one line per batch: read from the cache, or being distilled (with its cost),
    so a long first run never looks hung. A cache directory that cannot be written costs only the
    caching: the batch is computed and returned, with one :class:`~autodfp.errors.CacheWarning`
    given before the work.

    ``executor`` (:mod:`autodfp.distributed`): with one that runs work elsewhere (Ray workers), the
    chunks missing from the cache are distilled on its workers at once, the model sent to them
    once; each chunk's cache file is written here exactly as the serial path writes it (same key,
    same contents), so either path reads what the other wrote. A model off the CPU stays serial.
    """
    return _synthetic_batch(
        model,
        model_key,
        input_shape,
        n,
        check_seed(seed),
        cache_dir,
        method,
        steps,
        lr,
        label_offset,
        progress,
        log,
        float(low_res),
        int(low_res_levels),
        executor,
    )


def _synthetic_batch(
    model: nn.Module,
    model_key: str,
    input_shape: Sequence[int],
    n: int,
    seed: int,
    cache_dir: str | Path | None,
    method: str,
    steps: int | None,
    lr: float | None,
    label_offset: int,
    progress: bool,
    log: Callable[[str], None] | None = None,
    low_res: float = 0.0,
    low_res_levels: int = 1,
    executor: Executor | None = None,
) -> torch.Tensor:
    resolved = resolve_method(model, method)
    chunks = _chunks(n, seed, input_shape)
    if len(chunks) > 1 and executor is not None and executor.parallel and _model_device(model).type == "cpu":
        return _parallel_batch(
            model,
            model_key,
            input_shape,
            chunks,
            cache_dir,
            resolved,
            steps,
            lr,
            label_offset,
            log,
            low_res,
            low_res_levels,
            executor,
        )
    if len(chunks) > 1:
        return torch.cat(
            [
                _synthetic_batch(
                    model,
                    model_key,
                    input_shape,
                    size,
                    chunk_seed,
                    cache_dir,
                    resolved,
                    steps,
                    lr,
                    label_offset,
                    progress,
                    log,
                    low_res,
                    low_res_levels,
                )
                for size, chunk_seed in chunks
            ]
        )
    d_steps, d_lr = default_settings(resolved, input_shape)
    steps = d_steps if steps is None else int(steps)
    lr = d_lr if lr is None else float(lr)
    path, parts, reduced = _chunk_entry(
        model_key,
        state_dict_hash(model),
        input_shape,
        n,
        seed,
        resolved,
        steps,
        lr,
        label_offset,
        low_res,
        low_res_levels,
        cache_dir,
    )
    cached = _cached_chunk(path, parts, log)
    if cached is not None:
        return cached
    writable = usable_cache_dir(path.parent) is not None  # warns now, not after the distillation
    if log is not None:
        sizes_named = " and ".join(f"{h}x{w}" for _, h, w in reduced)
        stages = f", {round(steps * low_res)} of them at {sizes_named}" if reduced else ""
        log(
            f"synthesising {n} inputs from the model ({resolved}, {steps} steps{stages}, seed {seed})"
            + ("; cached after the first run" if writable else "")
        )
    result = _distill(
        model,
        input_shape,
        n,
        steps,
        lr,
        seed,
        resolved,
        label_offset,
        progress,
        low_res=low_res,
        low_res_levels=low_res_levels,
    )
    if log is not None:
        log(f"synthesised {n} inputs in {result.seconds:.1f} s")
    if writable:
        _store_chunk(path, parts, result, model_key)
    return result.images


def _cached_chunk(path: Path, parts: dict[str, Any], log: Callable[[str], None] | None) -> torch.Tensor | None:
    """The images of one chunk's cache entry if it exists and can be trusted; a corrupt entry
    warns and gives ``None`` (it is recomputed and overwritten, never fatal and never trusted)."""
    if not path.is_file():
        return None
    images, problem = _read_cache_entry(path, (parts["n"], *parts["shape"]))
    if images is not None:
        if log is not None:
            log(f"synthetic batch: {parts['n']} inputs (seed {parts['seed']}) read from the cache")
        return images
    warnings.warn(f"synthetic cache entry {path} is corrupt ({problem}); recomputing", CacheWarning, stacklevel=3)
    return None


def _store_chunk(path: Path, parts: dict[str, Any], result: SynthResult, model_key: str) -> None:
    """Write one chunk's cache entry (the same blob whichever path distilled it); a write that fails
    (a full disk) warns and costs only the caching."""
    blob = {
        "images": result.images,
        "method": result.method,
        "steps": result.steps,
        "lr": result.lr,
        "initial_loss": result.initial_loss,
        "final_loss": result.final_loss,
        "model_key": model_key,
        "weights_sha256": parts["weights"],
    }
    try:
        atomic_write(path, lambda p: torch.save(blob, p))
    except (OSError, RuntimeError) as exc:  # e.g. a full disk: the batch is still good
        reason = " ".join(str(exc).split())[:120] or exc.__class__.__name__
        warnings.warn(
            f"could not cache synthetic inputs at {path} ({reason}); continuing without", CacheWarning, stacklevel=3
        )


@dataclass(frozen=True)
class _ChunkJob:
    """What a worker needs, beside the model, to distil one chunk exactly as the serial path does."""

    input_shape: tuple[int, ...]
    n: int
    steps: int
    lr: float
    seed: int
    method: str
    label_offset: int
    low_res: float
    low_res_levels: int


def _distill_chunk(model: nn.Module, job: _ChunkJob) -> SynthResult:
    """One chunk on a worker: the serial path's :func:`_distill` call, without a progress bar."""
    return _distill(
        model,
        job.input_shape,
        job.n,
        job.steps,
        job.lr,
        job.seed,
        job.method,
        job.label_offset,
        False,
        low_res=job.low_res,
        low_res_levels=job.low_res_levels,
    )


def _parallel_batch(
    model: nn.Module,
    model_key: str,
    input_shape: Sequence[int],
    chunks: list[tuple[int, int]],
    cache_dir: str | Path | None,
    method: str,
    steps: int | None,
    lr: float | None,
    label_offset: int,
    log: Callable[[str], None] | None,
    low_res: float,
    low_res_levels: int,
    executor: Executor,
) -> torch.Tensor:
    """A chunked batch with its missing chunks distilled on ``executor``'s workers at once.

    The same chunks, seeds, cache keys and :func:`_distill` calls as the serial recursion of
    :func:`_synthetic_batch`; only where they run differs. Chunks already cached are read here;
    each distilled chunk is written here as it comes back, in chunk order, so an interrupted
    first run keeps what finished.
    """
    d_steps, d_lr = default_settings(method, input_shape)
    steps = d_steps if steps is None else int(steps)
    lr = d_lr if lr is None else float(lr)
    weights = state_dict_hash(model)
    images: list[torch.Tensor | None] = []
    missing: list[tuple[int, Path, dict[str, Any]]] = []
    for i, (size, chunk_seed) in enumerate(chunks):
        path, parts, _ = _chunk_entry(
            model_key,
            weights,
            input_shape,
            size,
            chunk_seed,
            method,
            steps,
            lr,
            label_offset,
            low_res,
            low_res_levels,
            cache_dir,
        )
        images.append(_cached_chunk(path, parts, log))
        if images[-1] is None:
            missing.append((i, path, parts))
    if missing:
        writable = usable_cache_dir(missing[0][1].parent) is not None  # warns now, not after the work
        if log is not None:
            inputs = sum(parts["n"] for _, _, parts in missing)
            log(
                f"synthesising {inputs} inputs in {len(missing)} chunks on {executor.workers} Ray workers "
                f"({method}, {steps} steps)" + ("; cached after the first run" if writable else "")
            )
        jobs = [
            _ChunkJob(
                tuple(parts["shape"]),
                parts["n"],
                steps,
                lr,
                parts["seed"],
                method,
                label_offset,
                low_res,
                low_res_levels,
            )
            for _, _, parts in missing
        ]
        for (i, path, parts), result in zip(missing, executor.imap(_distill_chunk, jobs, shared=model)):
            if log is not None:
                log(f"synthesised {parts['n']} inputs (seed {parts['seed']}) in {result.seconds:.1f} s on a worker")
            if writable:
                _store_chunk(path, parts, result, model_key)
            images[i] = result.images
    return torch.cat([im for im in images if im is not None])
