"""Model zoo: registry, built-in architectures and loading."""

from autodfp.models._tv_ops import ensure_torchvision_ops

ensure_torchvision_ops()  # before anything imports torchvision (or timm): see models/_tv_ops.py

from autodfp.models import zoo as _zoo  # noqa: F401  (registers the built-in entries)
from autodfp.models.layers import CUSTOM_PRUNERS, ChannelPadShortcut, Conv2dSame
from autodfp.models.load import load_checkpoint, load_model
from autodfp.models.registry import (
    DatasetRef,
    ModelConfig,
    Preprocessing,
    WeightsRef,
    get_config,
    list_models,
    register,
)

__all__ = [
    "CUSTOM_PRUNERS",
    "ChannelPadShortcut",
    "Conv2dSame",
    "DatasetRef",
    "ModelConfig",
    "Preprocessing",
    "WeightsRef",
    "get_config",
    "list_models",
    "load_checkpoint",
    "load_model",
    "register",
]
