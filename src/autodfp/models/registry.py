"""A timm-style model registry: one pretrained config per entry.

Each entry carries everything needed to reproduce the published number without reading code:
builder, weight file (name, url, sha256), preprocessing, classes/label offset and a default
evaluation set. Entries are looked up by name; users add their own with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch.nn as nn

from autodfp.errors import ModelError


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

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of one model input."""
        return self.input_hw if self.input_hw is not None else (self.input_size, self.input_size)


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
