"""torchvision's nms/qnms are usable after ``import autodfp``, compiled ops or not."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autodfp.models._tv_ops import nms

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _reference_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            a, b = boxes[i].tolist(), boxes[j].tolist()
            w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = w * h
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if union > 0 and inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_pure_torch_nms_matches_a_reference():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 50
    wh = torch.rand(60, 2, generator=g) * 30 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(60, generator=g)
    for thr in (0.1, 0.3, 0.5, 0.7):
        assert nms(boxes, scores, thr).tolist() == _reference_nms(boxes, scores, thr)
    assert nms(boxes[:0], scores[:0], 0.5).dtype == torch.long and nms(boxes[:0], scores[:0], 0.5).numel() == 0


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_nms_works_after_importing_autodfp():
    code = (
        "import sys, torch, autodfp\n"
        "import torchvision\n"
        "b = torch.tensor([[0., 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]])\n"
        "s = torch.tensor([0.9, 0.8, 0.7, 0.95])\n"
        "print(torchvision.ops.nms(b, s, 0.5).tolist())\n"
        "print(torchvision.ops.batched_nms(b, s, torch.tensor([0, 1, 0, 0]), 0.5).tolist())\n"
        "print(torch.ops.torchvision.nms(b, s, 0.5).tolist())\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # box 3 (0.95) suppresses box 0 (IoU 0.9) and box 1 (IoU 0.63); box 2 is disjoint.
    # With per-class batching, box 1 (class 1) survives.
    assert out.stdout.split("\n")[:3] == ["[3, 2]", "[3, 1, 2]", "[3, 2]"]
