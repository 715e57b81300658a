"""Ultra-Light-Fast-Generic-Face-Detector-1MB (slim and RFB, 320×240), as in Linzaer's release.

Module names follow the upstream state dicts (``base_net``, ``extras``, ``classification_headers``,
``regression_headers``; layouts in ``shared/assets/README.md``), so the released files load as
they are.

The forward pass returns the *raw* head outputs, ``(class logits (N, A, 2), box offsets (N, A, 4))``
with ``A = 4420`` anchors at 320×240: no softmax, no decoding, no NMS. That keeps the network a
plain traceable CNN whose every output is a tensor of fixed shape, which is what the pruner, the
refinement and the agreement reward need. :func:`priors`, :func:`decode` and :func:`detect` turn the
raw outputs into boxes, exactly as upstream's ``Predictor`` does.

Priors follow upstream's ``generate_priors``: a cell's centre is ``(i + 0.5) / (W / stride)``, not
``/ feature-map size``. The two agree for the 40×30 and 20×15 maps; for 10×8 and 5×4 the heights
240/32 = 7.5 and 240/64 = 3.75 are not whole, and the model was trained with upstream's centres
(clamped to [0, 1]), so those are used here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

#: (width, height) of the input the detectors were trained at
IMAGE_WH = (320, 240)
#: strides of the four detection sources
SHRINKAGE = (8, 16, 32, 64)
#: prior sizes in pixels per source (anchors per cell: 3, 2, 2, 3)
MIN_BOXES: tuple[tuple[int, ...], ...] = ((10, 16, 24), (32, 48), (64, 96), (128, 192, 256))
CENTER_VARIANCE = 0.1
SIZE_VARIANCE = 0.2
NUM_CLASSES = 2  # background, face


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=False))


def _conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=False),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=False),
    )


class BasicConv(nn.Module):
    """conv (no bias) + BN (+ ReLU), the RFB block's unit (keys ``.conv``, ``.bn``)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        relu: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)
        self.relu = nn.ReLU(inplace=False) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.relu is not None else x


class BasicRFB(nn.Module):
    """Receptive-field block: three dilated branches, concatenated, 1×1 to ``cout``, plus a 1×1 shortcut.

    Upstream multiplies the branch sum by ``scale`` before the shortcut; the released models use
    ``scale = 1.0``, so the multiplication is left out (it would only add a node to the graph).
    """

    def __init__(self, cin: int, cout: int, map_reduce: int = 8, vision: int = 1) -> None:
        super().__init__()
        inter = cin // map_reduce
        self.branch0 = nn.Sequential(
            BasicConv(cin, inter, 1, relu=False),
            BasicConv(inter, 2 * inter, 3, padding=1),
            BasicConv(2 * inter, 2 * inter, 3, padding=vision + 1, dilation=vision + 1, relu=False),
        )
        self.branch1 = nn.Sequential(
            BasicConv(cin, inter, 1, relu=False),
            BasicConv(inter, 2 * inter, 3, padding=1),
            BasicConv(2 * inter, 2 * inter, 3, padding=vision + 2, dilation=vision + 2, relu=False),
        )
        self.branch2 = nn.Sequential(
            BasicConv(cin, inter, 1, relu=False),
            BasicConv(inter, (inter // 2) * 3, 3, padding=1),
            BasicConv((inter // 2) * 3, 2 * inter, 3, padding=1),
            BasicConv(2 * inter, 2 * inter, 3, padding=vision + 4, dilation=vision + 4, relu=False),
        )
        self.ConvLinear = BasicConv(6 * inter, cout, 1, relu=False)
        self.shortcut = BasicConv(cin, cout, 1, relu=False)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)
        return self.relu(self.ConvLinear(out) + self.shortcut(x))


class AnchorFlatten(nn.Module):
    """A head's map ``(N, a·k, H, W)`` → ``(N, H·W·a, k)``: ``k`` values per anchor, cells row-major.

    A module (with a pruner in :data:`autodfp.models.layers.CUSTOM_PRUNERS`) rather than inline
    ``permute``/``reshape``: torch-pruning maps every element of a traced reshape to channel
    indices, and on the 4420-anchor outputs that takes minutes and gigabytes per group. As a leaf it
    is one node whose input channels are the head's output channels, never pruned (they are the
    model's output).
    """

    def __init__(self, channels: int, per_anchor: int) -> None:
        super().__init__()
        self.channels = channels
        self.per_anchor = per_anchor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.per_anchor)

    def extra_repr(self) -> str:
        return f"{self.channels}, per_anchor={self.per_anchor}"


def _separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3×3 (bias) + ReLU + pointwise 1×1 (bias): upstream's ``SeperableConv2d``."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin), nn.ReLU(inplace=False), nn.Conv2d(cin, cout, 1))


class UltraLightFace(nn.Module):
    """The SSD-style detector; ``rfb`` swaps backbone index 7 for an RFB block.

    :param rfb: build the RFB variant (else slim)
    :param base: base width (16 in the releases)
    """

    #: backbone indices whose outputs feed a head (upstream's ``source_layer_indexes`` minus one)
    SOURCES = (7, 10, 12)

    def __init__(self, rfb: bool = False, base: int = 16) -> None:
        super().__init__()
        b = base
        layers: list[nn.Module] = [
            _conv_bn(3, b, 2),
            _conv_dw(b, 2 * b, 1),
            _conv_dw(2 * b, 2 * b, 2),
            _conv_dw(2 * b, 2 * b, 1),
            _conv_dw(2 * b, 4 * b, 2),
            _conv_dw(4 * b, 4 * b, 1),
            _conv_dw(4 * b, 4 * b, 1),
            BasicRFB(4 * b, 4 * b) if rfb else _conv_dw(4 * b, 4 * b, 1),
            _conv_dw(4 * b, 8 * b, 2),
            _conv_dw(8 * b, 8 * b, 1),
            _conv_dw(8 * b, 8 * b, 1),
            _conv_dw(8 * b, 16 * b, 2),
            _conv_dw(16 * b, 16 * b, 1),
        ]
        self.base_net = nn.Sequential(*layers)
        self.extras = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(16 * b, 4 * b, 1),
                    nn.ReLU(inplace=False),
                    _separable(4 * b, 16 * b, 2),
                    nn.ReLU(inplace=False),
                )
            ]
        )
        widths = (4 * b, 8 * b, 16 * b)
        anchors = [len(m) for m in MIN_BOXES]
        self.classification_headers = nn.ModuleList(
            [_separable(c, a * NUM_CLASSES) for c, a in zip(widths, anchors)]
            + [nn.Conv2d(16 * b, anchors[3] * NUM_CLASSES, 3, padding=1)]
        )
        self.regression_headers = nn.ModuleList(
            [_separable(c, a * 4) for c, a in zip(widths, anchors)] + [nn.Conv2d(16 * b, anchors[3] * 4, 3, padding=1)]
        )
        self.flatten_scores = nn.ModuleList([AnchorFlatten(a * NUM_CLASSES, NUM_CLASSES) for a in anchors])
        self.flatten_boxes = nn.ModuleList([AnchorFlatten(a * 4, 4) for a in anchors])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``(class logits (N, A, 2), box offsets (N, A, 4))``; see :func:`decode`."""
        feats = []
        for i, layer in enumerate(self.base_net):
            x = layer(x)
            if i in self.SOURCES:
                feats.append(x)
        for layer in self.extras:
            x = layer(x)
            feats.append(x)
        scores = [fl(h(f)) for f, h, fl in zip(feats, self.classification_headers, self.flatten_scores)]
        boxes = [fl(h(f)) for f, h, fl in zip(feats, self.regression_headers, self.flatten_boxes)]
        return torch.cat(scores, 1), torch.cat(boxes, 1)


def ultralight_face_slim() -> UltraLightFace:
    """The slim variant (``version-slim-320.pth``)."""
    return UltraLightFace(rfb=False)


def ultralight_face_rfb() -> UltraLightFace:
    """The RFB variant (``version-RFB-320.pth``)."""
    return UltraLightFace(rfb=True)


def priors(image_wh: Sequence[int] = IMAGE_WH) -> torch.Tensor:
    """SSD priors ``(A, 4)`` as normalised ``(cx, cy, w, h)``, in the order the heads emit them.

    :param image_wh: input (width, height) in pixels
    """
    w, h = int(image_wh[0]), int(image_wh[1])
    out = []
    for stride, sizes in zip(SHRINKAGE, MIN_BOXES):
        fw, fh = math.ceil(w / stride), math.ceil(h / stride)
        sw, sh = w / stride, h / stride
        ys, xs = torch.meshgrid(
            (torch.arange(fh, dtype=torch.float32) + 0.5) / sh,
            (torch.arange(fw, dtype=torch.float32) + 0.5) / sw,
            indexing="ij",
        )
        centres = torch.stack([xs, ys], -1).reshape(-1, 1, 2).expand(-1, len(sizes), 2)
        wh = torch.tensor([[s / w, s / h] for s in sizes], dtype=torch.float32).expand(centres.shape[0], -1, -1)
        out.append(torch.cat([centres, wh], -1).reshape(-1, 4))
    return torch.cat(out).clamp(0.0, 1.0)


def decode(
    scores: torch.Tensor, boxes: torch.Tensor, prior_boxes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw head outputs → (face probabilities ``(..., A)``, corner boxes ``(..., A, 4)`` in [0, 1]).

    :param scores: class logits ``(..., A, 2)`` (background, face)
    :param boxes: box offsets ``(..., A, 4)``
    :param prior_boxes: ``(A, 4)`` from :func:`priors` (default: 320×240)
    """
    p = priors() if prior_boxes is None else prior_boxes
    p = p.to(boxes.device, boxes.dtype)
    if boxes.shape[-2] != p.shape[0]:
        raise ValueError(f"{boxes.shape[-2]} box offsets for {p.shape[0]} priors: the input size is not the priors'")
    centre = boxes[..., :2] * CENTER_VARIANCE * p[:, 2:] + p[:, :2]
    size = torch.exp(boxes[..., 2:] * SIZE_VARIANCE) * p[:, 2:]
    corners = torch.cat([centre - size / 2, centre + size / 2], -1).clamp(0.0, 1.0)
    return F.softmax(scores, dim=-1)[..., 1], corners


def detect(
    outputs: tuple[torch.Tensor, torch.Tensor],
    score_threshold: float = 0.5,
    iou_threshold: float = 0.3,
    prior_boxes: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image: (boxes ``(K, 4)`` in [0, 1] corner form, scores ``(K,)``) after threshold and NMS.

    :param outputs: the model's raw ``(scores, boxes)`` for a batch
    :param score_threshold: keep faces with probability at least this
    :param iou_threshold: NMS IoU (0.3 as upstream)
    :param prior_boxes: priors (default: 320×240)
    """
    from autodfp.eval.detection import nms

    probs, corners = decode(outputs[0], outputs[1], prior_boxes)
    result = []
    for p, b in zip(probs, corners):
        keep = p >= score_threshold
        p, b = p[keep], b[keep]
        order = nms(b, p, iou_threshold)
        result.append((b[order], p[order]))
    return result
