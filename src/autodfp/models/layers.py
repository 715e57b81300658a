"""Building blocks whose channel semantics torch-pruning must see correctly.

``ChannelPadShortcut`` replaces the CIFAR ResNet "option A" lambda. A lambda that pads channels is
invisible to torch-pruning, which then assumes output channel *i* is input channel *i*; it couples
the 16-channel and 32-channel residual streams into one giant, wrong group. As a module with its
own pruner, the shortcut keeps an explicit output→input channel map, so its input and output
channels are separate pruning dimensions (like a conv's) and the graph stays right.

``Conv2dSame`` reproduces TensorFlow "SAME" padding, which is asymmetric for stride 2: the
converted MobileNet weights were trained with it, and symmetric padding shifts every feature map
by half a pixel.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp


class ChannelPadShortcut(nn.Module):
    """Parameter-free shortcut: spatial subsampling plus zero channels.

    ``src[j]`` is the input channel copied to output channel ``j``, or ``in_channels`` for a zero
    channel. The map is a buffer, so it survives pruning and is saved with the state dict.
    """

    src: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("ChannelPadShortcut only widens")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        before = (out_channels - in_channels) // 2
        src = torch.full((out_channels,), in_channels, dtype=torch.long)
        src[before : before + in_channels] = torch.arange(in_channels)
        self.register_buffer("src", src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        zero = x.new_zeros(x.shape[0], 1, x.shape[2], x.shape[3])
        return torch.cat([x, zero], dim=1).index_select(1, self.src)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class ChannelPadShortcutPruner(tp.pruner.function.BasePruningFunc):
    """Tells torch-pruning how to remove input or output channels of a ``ChannelPadShortcut``."""

    def prune_out_channels(self, layer: ChannelPadShortcut, idxs: list[int]) -> ChannelPadShortcut:
        drop = set(int(i) for i in idxs)
        keep = [j for j in range(layer.out_channels) if j not in drop]
        layer.src = layer.src[keep].clone()
        layer.out_channels = len(keep)
        return layer

    def prune_in_channels(self, layer: ChannelPadShortcut, idxs: list[int]) -> ChannelPadShortcut:
        drop = set(int(i) for i in idxs)
        keep = [i for i in range(layer.in_channels) if i not in drop]
        new_in = len(keep)
        remap = torch.full((layer.in_channels + 1,), new_in, dtype=torch.long)
        remap[torch.tensor(keep, dtype=torch.long)] = torch.arange(new_in)
        layer.src = remap[layer.src].clone()
        layer.in_channels = new_in
        return layer

    def get_out_channels(self, layer: ChannelPadShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ChannelPadShortcut) -> int:
        return layer.in_channels


def _same_pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding (extra pixel at the bottom/right)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        top, bottom = _same_pad(x.shape[-2], kh, sh, dh)
        left, right = _same_pad(x.shape[-1], kw, sw, dw)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return self._conv_forward(x, self.weight, self.bias)


class OutputLeafPruner(tp.pruner.function.BasePruningFunc):
    """For output-formatting leaves (a detector's anchor flatten): their channels are the model's
    output and are never pruned; the leaf only keeps torch-pruning from tracing into them."""

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        raise ValueError(f"{type(layer).__name__} formats a model output; its channels cannot be pruned")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.channels)  # type: ignore[arg-type]

    def get_in_channels(self, layer: nn.Module) -> int:
        return int(layer.channels)  # type: ignore[arg-type]


#: Pruners for the custom layers above; pass to every ``tp.DependencyGraph.build_dependency``.
CUSTOM_PRUNERS: dict[type, tp.pruner.function.BasePruningFunc] = {
    ChannelPadShortcut: ChannelPadShortcutPruner(),
}


def _register_output_leaves() -> None:
    from autodfp.models.face_ultralight import AnchorFlatten

    CUSTOM_PRUNERS[AnchorFlatten] = OutputLeafPruner()


_register_output_leaves()
