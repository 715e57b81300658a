"""Cost and quality of a model: MACs/parameters, top-1/top-5 accuracy, and CPU latency.

MAC convention (the one pruning papers report, e.g. ResNet-56 = 125.49 M): multiply–accumulates of
convolutions and linear layers only, for one image. Bias adds, BatchNorm, activations, pooling and
residual additions are not counted. Per layer:

* conv: output elements per sample × (in_channels / groups) × prod(kernel_size)
* transposed conv: input elements per sample × (out_channels / groups) × prod(kernel_size)
* linear: output rows per sample × in_features × out_features

This equals half the FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` reports for a model
made of convolutions and linear layers (it counts one multiply–add as 2 FLOPs and also ignores
biases); the tests check that equality on ResNet-56 and MobileNet-V1. Counting happens with
forward hooks on the actual modules, so the numbers follow whatever shapes a pruned model really
produces rather than a formula that could drift from the code.

Parameters are ``numel`` of ``model.parameters()`` (buffers such as BN running statistics are not
parameters).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from autodfp._modes import eval_mode
from autodfp.errors import DataError

__all__ = [
    "EvalResult",
    "LayerProfile",
    "Profile",
    "evaluate",
    "latency_ms",
    "latency_table",
    "count_params",
    "profile",
]


@dataclass(frozen=True)
class LayerProfile:
    name: str
    type: str
    #: shapes of the first call, batch dimension included (batch 1); None if the layer never ran
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    macs: int
    params: int


@dataclass(frozen=True)
class Profile:
    total_macs: int
    total_params: int
    input_shape: tuple[int, ...]
    layers: list[LayerProfile] = field(default_factory=list)

    @property
    def mmacs(self) -> float:
        return self.total_macs / 1e6

    @property
    def mparams(self) -> float:
        return self.total_params / 1e6

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A fixed-width per-layer listing, for logs and ``--verbose`` output."""
        rows = [("layer", "type", "output", "MACs", "params")]
        for lp in self.layers:
            out = "x".join(map(str, lp.output_shape[1:])) if lp.output_shape else "-"
            rows.append((lp.name, lp.type, out, f"{lp.macs:,}", f"{lp.params:,}"))
        rows.append(("total", "", "", f"{self.total_macs:,}", f"{self.total_params:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join(
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _input_shape(input_size: int | Sequence[int]) -> tuple[int, ...]:
    """``224`` → (1, 3, 224, 224); ``(H, W)`` → (1, 3, H, W); ``(C, H, W)`` → (1, C, H, W)."""
    if isinstance(input_size, int):
        return (1, 3, input_size, input_size)
    dims = tuple(int(d) for d in input_size)
    if len(dims) == 2:
        return (1, 3) + dims
    if len(dims) == 3:
        return (1,) + dims
    if len(dims) == 4:
        return dims
    raise ValueError(f"input_size must be an int, (H, W), (C, H, W) or (N, C, H, W); got {input_size!r}")


def _example_input(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    return torch.zeros(shape, device=device, dtype=dtype)


def _layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    batch = inp.shape[0] if inp.dim() > 0 else 1
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        per_sample = inp.numel() // batch
        return per_sample * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvNd):
        per_sample = out.numel() // batch
        return per_sample * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return out.numel() // batch * module.in_features
    if isinstance(module, nn.Bilinear):
        return out.numel() // batch * module.in1_features * module.in2_features
    return 0


_COUNTED = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)


def _scripted_profile(model: torch.jit.ScriptModule, shape: tuple[int, ...]) -> Profile:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(_example_input(model, shape))
    return Profile(
        total_macs=int(counter.get_total_flops()) // 2, total_params=count_params(model), input_shape=shape, layers=[]
    )


def profile(model: nn.Module, input_size: int | Sequence[int]) -> Profile:
    """MACs and parameters of ``model`` for one image of ``input_size`` (see module docstring).

    A TorchScript module (a pruned directory loaded without its architecture's code) takes no
    forward hooks, so it gets totals only, from ``FlopCounterMode`` (its FLOPs are twice these MACs).
    """
    shape = _input_shape(input_size)
    if isinstance(model, torch.jit.ScriptModule):
        return _scripted_profile(model, shape)
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _COUNTED) or any(True for _ in m.parameters(recurse=False))
    ]
    macs: dict[str, int] = {name: 0 for name, _ in targets}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if inp is None or not isinstance(output, torch.Tensor):
                return
            macs[name] += _layer_macs(module, inp, output)
            shapes.setdefault(name, (tuple(inp.shape), tuple(output.shape)))

        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in targets]
    try:
        with eval_mode(model), torch.inference_mode():
            model(_example_input(model, shape))
    finally:
        for h in handles:
            h.remove()

    layers = []
    for name, m in targets:
        in_shape, out_shape = shapes.get(name, (None, None))
        layers.append(
            LayerProfile(
                name=name,
                type=type(m).__name__,
                input_shape=in_shape,
                output_shape=out_shape,
                macs=macs[name],  # already per image: _layer_macs divides by the batch
                params=sum(p.numel() for p in m.parameters(recurse=False)),
            )
        )
    total = sum(lp.macs for lp in layers)
    return Profile(total_macs=total, total_params=count_params(model), input_shape=shape, layers=layers)


@dataclass(frozen=True)
class EvalResult:
    top1: float  # percent
    top5: float  # percent
    n: int

    def __str__(self) -> str:
        return f"top-1 {self.top1:.2f}%  top-5 {self.top5:.2f}%  (n={self.n})"


def _model_device(model: nn.Module) -> torch.device:
    ref = next(model.parameters(), None)
    return ref.device if ref is not None else torch.device("cpu")


def evaluate(
    model: nn.Module, loader: DataLoader | Iterable, label_offset: int = 0, progress: bool = True
) -> EvalResult:
    """Top-1/top-5 accuracy in percent; ``logits[:, label_offset:]`` are the dataset's classes.

    The model runs in eval mode (BN statistics frozen) and is returned to its previous mode.
    """
    from autodfp._progress import progress_bar

    device = _model_device(model)
    correct1 = correct5 = n = 0
    try:
        total = len(cast(Sized, loader)) if hasattr(loader, "__len__") else None
    except TypeError:
        total = None
    bar = progress_bar(loader, total=total, desc="eval", unit="batch", enabled=progress)
    try:
        with eval_mode(model), torch.inference_mode():
            for batch in bar:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise DataError("evaluation needs labelled data: the loader yields images without labels")
                x, y = batch[0].to(device), torch.as_tensor(batch[1]).to(device).long()
                if x.dim() == 4:
                    # Channels-last input lets oneDNN pick its NHWC kernels (about 2x faster for
                    # depthwise-heavy nets on CPU); the model's own parameters are left untouched.
                    x = x.contiguous(memory_format=torch.channels_last)
                logits = model(x)
                if logits.dim() != 2:
                    raise DataError(f"model output has shape {tuple(logits.shape)}; expected (batch, classes)")
                logits = logits[:, label_offset:]
                classes = logits.shape[1]
                if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
                    raise DataError(
                        f"dataset label {int(y.max()) if int(y.max()) >= classes else int(y.min())} is out of "
                        f"range for a model with {classes} classes (label offset {label_offset}); "
                        "is this the right dataset for the model?"
                    )
                k = min(5, classes)
                top = logits.topk(k, dim=1).indices
                hit = top == y[:, None]
                correct1 += int(hit[:, 0].sum())
                correct5 += int(hit.any(dim=1).sum())
                n += int(y.numel())
                if progress:
                    bar.set_postfix(top1=f"{100.0 * correct1 / n:.2f}")
    finally:
        bar.close()
    if n == 0:
        raise DataError("empty dataset: nothing to evaluate")
    return EvalResult(top1=100.0 * correct1 / n, top5=100.0 * correct5 / n, n=n)


def latency_ms(
    model: nn.Module, input_size: int | Sequence[int], batch_size: int = 1, warmup: int = 3, repeats: int = 10
) -> float:
    """Median wall time of one forward pass in milliseconds (median: robust to scheduler noise)."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    shape = (batch_size,) + _input_shape(input_size)[1:]
    x = _example_input(model, shape)
    cuda = x.is_cuda
    times = []
    with eval_mode(model), torch.inference_mode():
        for _ in range(max(warmup, 0)):
            model(x)
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize(x.device)
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def latency_table(
    model: nn.Module,
    input_size: int | Sequence[int],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 10,
) -> dict[int, float]:
    """``{batch_size: median ms per forward pass}``."""
    return {int(b): latency_ms(model, input_size, b, warmup, repeats) for b in batch_sizes}
