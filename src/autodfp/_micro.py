"""How many inputs a CPU forward and backward pass should take at a time.

A 224-px CNN runs slower per image on a CPU with 64 images in one pass than in passes of a few
images whose activations stay in cache (MobileNet-V1 on 2 cores: a synthesis step 3.97 s whole and
3.04 s in eights, a distillation step 4.41 s and 2.84 s; ``benchmarks/step_cost.py``,
docs/RESULTS.md; EfficientNet-B0 gains more, 2.2x and 1.8x, ResNet-18 less, 1.2x and 1.06x). So
synthesis and distillation run their 224-px batches in micro-batches, each in a way that leaves
the step's loss and gradient those of the whole batch (:class:`autodfp.synth.distill._BNMoments`,
:func:`autodfp.compress.kd.distill`). An accelerator is fastest on whole batches, and CIFAR-size
batches already fit, so neither is split.
"""

from __future__ import annotations

import math

import torch

from autodfp.config import MICRO_BATCH_MIN_PARTS, MICRO_BATCH_PIXELS


def micro_batch_size(batch: torch.Tensor, device: torch.device, size: int | None = None) -> int:
    """Inputs per pass for ``batch`` on ``device``: ``size`` if given (0: the whole batch).

    By default, on a CPU, as many as hold :data:`~autodfp.config.MICRO_BATCH_PIXELS` input pixels
    (at least one), when the batch holds at least :data:`~autodfp.config.MICRO_BATCH_MIN_PARTS`
    such parts (a split into two or three gained nothing at 112 px); the whole batch on an
    accelerator, and for inputs without spatial dimensions.
    """
    n = int(batch.shape[0])
    if size is not None:
        return n if int(size) <= 0 else int(size)
    if device.type != "cpu" or batch.dim() < 3:
        return n
    part = max(1, MICRO_BATCH_PIXELS // max(1, math.prod(batch.shape[2:])))
    return part if n >= MICRO_BATCH_MIN_PARTS * part else n
