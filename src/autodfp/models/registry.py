"""A timm-style model registry: one pretrained config per entry.

Each entry carries everything needed to reproduce the published number without reading code:
builder, weight file (name, url, sha256), preprocessing, classes/label offset and a default
evaluation set. Entries are looked up by name; users add their own with :func:`register`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from autodfp.errors import AutoDFPError, ModelError

#: Resampling filters the image pipeline knows (``autodfp.data.datasets`` maps each to PIL's).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
#: What a model's output is scored as: top-1 (classification) or mAP against the unpruned detections.
TASKS = ("classification", "detection")
#: Largest input side (height, width, ``input_size``, ``resize``), as ``--input-size`` allows. One
#: 3x4096x4096 input is 200 MB in float32 and a synthetic batch of 64 is 13 GB; a side of 2^20 (a
#: damaged or crafted record) would be accepted and then fail to allocate deep in the pipeline.
MAX_SIDE = 4096
#: Most input channels: far past any image model's (3, or a few more for multispectral inputs).
MAX_CHANNELS = 4096
#: Most classes (and the largest label offset): ImageNet-21k has 21,841; a million is past any head.
MAX_CLASSES = 1_000_000
#: Bounds of a normalisation's mean and std. A std under 1e-6 turns a pixel step of 1/255 into 4e3
#: and more, and no real preprocessing has one; a std of 0 divides by zero (NaN/Inf inputs).
STD_RANGE = (1e-6, 1e6)
MEAN_BOUND = 1e6


@dataclass(frozen=True)
class Preprocessing:
    """How raw RGB images become model inputs.

    ``resize`` is the shorter side before the centre crop (``None``: images are already
    ``input_size``, as CIFAR). TF's ``x/127.5 - 1`` is mean 0.5 / std 0.5 on [0, 1] pixels.
    ``input_hw`` (height, width) is for non-square inputs (detectors): the whole image is resized
    to it, aspect ratio not kept and nothing cropped; ``input_size`` and ``resize`` are then unused.
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None
    interpolation: str = "bilinear"
    input_hw: tuple[int, int] | None = None
    #: nobody said what the model expects: a neutral mean/std stands in. Evaluating with the wrong
    #: normalisation still runs and reports a number (27.83 % instead of 59.00 % on one model), so
    #: evaluation warns about a guess, and a saved set records it.
    guessed: bool = field(default=False, compare=False)

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of one model input."""
        return self.input_hw if self.input_hw is not None else (self.input_size, self.input_size)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v: Any) -> str:
    """``repr(v)`` on one line, at most 60 characters, whatever ``v`` is."""
    try:
        text = " ".join(repr(v).split())
    except (ValueError, RecursionError):  # an int past Python's 4300-digit limit, a self-nested list
        text = f"a {type(v).__name__} too large to show"
    return text if len(text) <= 60 else text[:57] + "..."


def _is_real(v: Any) -> bool:
    """A finite real, never a bool (an int of any size counts: ``math.isfinite`` would overflow on it)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) or math.isfinite(v)


def check_preprocessing(
    pre: Any,
    *,
    error: type[AutoDFPError] = ModelError,
    where: str = "",
    names: dict[str, str] | None = None,
) -> Preprocessing:
    """Refuse a preprocessing that cannot describe a real input pipeline; return it unchanged.

    The one check of these fields, used wherever they enter: the CLI's ``--mean/--std/--input-size``,
    :func:`autodfp.api.user_model_config`, and the record inside a ``pruned.pt`` (which a user can
    edit and re-seal, so it is as untrusted as a flag). Without it a ``mean`` of one value was
    broadcast to three channels, a ``std`` of 0 ran with a divide-by-zero warning and scored
    10.94 %, and an input size of 2^20 failed to allocate far from its cause.

    Rules: ``mean`` and ``std`` hold exactly 3 finite values (the image pipeline converts every
    image to RGB and normalises its 3 channels), ``std`` in :data:`STD_RANGE`, ``|mean|`` at most
    :data:`MEAN_BOUND`; ``input_size``, ``resize`` and ``input_hw`` are integers in
    [1, :data:`MAX_SIDE`], ``resize`` at least ``input_size`` (it is the shorter side *before* the
    centre crop); ``interpolation`` one of :data:`INTERPOLATIONS`.

    :param error: the :class:`AutoDFPError` subclass to raise (``WeightsError`` for a file)
    :param where: what starts the message, e.g. ``"runs/a/pruned.pt: "``
    :param names: how a field is called in the message (``{"std": "--std"}`` for the CLI);
        by default ``preprocessing field 'std'``
    """

    def name(key: str) -> str:
        return (names or {}).get(key, f"preprocessing field '{key}'")

    def fail(key: str, must: str, got: Any) -> None:
        raise error(f"{where}{name(key)} must be {must}, got {_short(got)}")

    def side(key: str, v: Any, low: int = 1) -> None:
        if not _is_int(v) or not low <= v <= MAX_SIDE:
            fail(key, f"an integer in [{low}, {MAX_SIDE}]", v)

    if not isinstance(pre, Preprocessing):
        raise error(f"{where}preprocessing must be a Preprocessing, got {type(pre).__name__}")
    side("input_size", pre.input_size)
    for key in ("mean", "std"):
        vals = getattr(pre, key)
        if not isinstance(vals, (tuple, list)) or len(vals) != 3 or not all(_is_real(v) for v in vals):
            fail(key, "3 finite numbers, one per RGB channel", vals)
        if key == "mean" and any(abs(v) > MEAN_BOUND for v in vals):
            fail(key, f"at most {MEAN_BOUND:g} in magnitude", vals)
        if key == "std" and any(not STD_RANGE[0] <= v <= STD_RANGE[1] for v in vals):
            fail(key, f"positive, in [{STD_RANGE[0]:g}, {STD_RANGE[1]:g}]", vals)
    if pre.resize is not None:
        side("resize", pre.resize, low=pre.input_size)
    if not isinstance(pre.interpolation, str) or pre.interpolation not in INTERPOLATIONS:
        fail("interpolation", f"one of {', '.join(INTERPOLATIONS)}", pre.interpolation)
    if pre.input_hw is not None:
        hw = pre.input_hw
        if not isinstance(hw, (tuple, list)) or len(hw) != 2:
            fail("input_hw", f"(height, width), two integers in [1, {MAX_SIDE}]", hw)
        for v in hw:
            side("input_hw", v)
    return pre


def check_input_shape(shape: Any, *, error: type[AutoDFPError] = ModelError, where: str = "") -> tuple[int, int, int]:
    """``(channels, height, width)`` of one input, each a positive integer within the sane bounds.

    Channels at most :data:`MAX_CHANNELS`, height and width at most :data:`MAX_SIDE` (see there
    for why), so that a recorded shape can never ask for an input that cannot be allocated.
    """
    ok = (
        isinstance(shape, (tuple, list))
        and len(shape) == 3
        and all(_is_int(s) for s in shape)
        and 1 <= shape[0] <= MAX_CHANNELS
        and all(1 <= s <= MAX_SIDE for s in shape[1:])
    )
    if not ok:
        raise error(
            f"{where}input_shape must be (channels, height, width): channels in [1, {MAX_CHANNELS}], "
            f"height and width in [1, {MAX_SIDE}], got {_short(shape)}"
        )
    return int(shape[0]), int(shape[1]), int(shape[2])


@dataclass(frozen=True)
class DatasetRef:
    """A dataset located relative to the asset mirror or cache root (``kind`` as in data specs)."""

    kind: str  # "cifar10" | "folder"
    path: str
    class_list: str | None = None


@dataclass(frozen=True)
class WeightsRef:
    filename: str
    sha256: str | None
    url: str | None = None
    #: key holding the state dict inside the checkpoint, if it is wrapped
    key: str | None = None
    #: folder of the file in the asset mirror (default ``weights``), e.g. ``detection/face-ultralight``
    subdir: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str
    builder: Callable[[], nn.Module] = field(repr=False, compare=False)
    weights: WeightsRef | None
    preprocessing: Preprocessing
    num_classes: int
    #: logits[:, label_offset:] are the dataset's classes (MobileNet-V2's index 0 is "background")
    label_offset: int = 0
    default_dataset: DatasetRef | None = None
    description: str = ""
    #: ``classification`` (top-1 evaluation) or ``detection`` (mAP against the unpruned detections)
    task: str = "classification"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("builder", None)
        return d


def check_model_config(config: ModelConfig, *, error: type[AutoDFPError] = ModelError, where: str = "") -> ModelConfig:
    """:func:`check_preprocessing`, then the classes and task: the fields a ``pruned.pt`` records.

    ``num_classes`` and ``label_offset`` are integers in [0, :data:`MAX_CLASSES`], ``task`` one of
    :data:`TASKS`, a default dataset's fields strings (no value is coerced: ``str(3)`` would make
    a path of a number).
    """
    check_preprocessing(config.preprocessing, error=error, where=where)
    for key in ("num_classes", "label_offset"):
        v = getattr(config, key)
        if not _is_int(v) or not 0 <= v <= MAX_CLASSES:
            raise error(f"{where}field '{key}' must be an integer in [0, {MAX_CLASSES}], got {_short(v)}")
    if not isinstance(config.task, str) or config.task not in TASKS:
        raise error(f"{where}field 'task' must be one of {', '.join(TASKS)}, got {_short(config.task)}")
    if not isinstance(config.description, str):
        raise error(f"{where}field 'description' must be a string")
    ds = config.default_dataset
    if ds is not None and not (
        isinstance(ds.kind, str)
        and isinstance(ds.path, str)
        and (ds.class_list is None or isinstance(ds.class_list, str))
    ):
        raise error(f"{where}field 'default_dataset' must hold strings 'kind', 'path' and 'class_list'")
    return config


CIFAR_PRE = Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TF_IMAGENET_PRE = Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize=256)
CIFAR10_TEST = DatasetRef("cifar10", "cifar10/cifar-10-batches-py")
IMAGENET_VAL = DatasetRef("folder", "imagenet/val-1300", "imagenet/synsets.txt")

_REGISTRY: dict[str, ModelConfig] = {}


def register(config: ModelConfig) -> ModelConfig:
    if config.name in _REGISTRY:
        raise ValueError(f"model {config.name!r} is already registered")
    _REGISTRY[config.name] = config
    return config


def get_config(name: str) -> ModelConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ModelError(f"unknown model '{name}'; known models: {known}") from None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def is_registered(name: str) -> bool:
    return name in _REGISTRY
