"""A compact YOLO-style detector from torchvision parts, pruned with the defaults, judged by agreement.

Issue 26 (item 4) reports a compact COCO detector that the defaults break: ShuffleNetV2 backbone,
small FPN, YOLO-style heads; mAP@0.5 0.336 unpruned, 0.104 at 0.9× MACs (0.166 without
refinement), because the refinement on synthetic inputs drove its objectness logits from 4.9 to
21.9. We do not have it. This script builds the same kind of model with random weights:

- backbone: torchvision ``shufflenet_v2_x0_5(weights=None)``, stages 2–4 (strides 8, 16, 32);
- neck: a small FPN (1×1 laterals to 48 channels, top-down nearest upsampling and adds, a 3×3
  conv per level), Conv-BN-ReLU throughout;
- heads: per level a 1×1 Conv-BN-ReLU stem and a 1×1 prediction conv, 3 anchors × (5 + 80) channels (``x, y, w, h, obj, 80 classes``),
  raw maps returned as a tuple, YOLOv5 box decoding and sigmoid scores;
- BN statistics from train-mode forward passes (no gradients) over the first half of the COCO
  photos in ``$AUTODFP_ASSETS/detection/coco128-val2017/images``, then each head's weights scaled so
  its logits spread like a trained detector's (std 2.5 on those photos) around YOLOv5's prior biases
  (objectness ``log(8 / (640 / stride)^2)``, classes ``log(0.6 / 79)``); input 320×320.

It is then pruned with ``autodfp.prune`` at 0.9× and 0.8× MACs (``--search uniform`` by default;
``--search sac`` for the default search) with every other setting at its default, and judged on the
*other* half of the photos, which the method never sees: the unpruned model's detections
(max-class score ``sigmoid(obj) * sigmoid(cls)`` at or above the unpruned model's 99.5th
percentile over all anchors, class-wise NMS at IoU 0.5) are the ground truth; the pruned
model's detections (score ≥ 0.001, the best 1000 before NMS, at most 300 after) are scored against
them with pycocotools (mAP@0.5, mAP@0.5:0.95). Also reported: the largest objectness logit on those
photos, against the unpruned model's (the symptom of issue 26).

    AUTODFP_ASSETS=/work/shared/assets PYTHONPATH=src nice -n 10 python benchmarks/yolo_like.py \
        --ratios 0.9 0.8 --search uniform --out runs/yolo_like.json

``PYTHONPATH`` picks the code: run it once with an older ``src`` to compare before and after.

``--zoo NAME`` prunes a zoo face detector instead (``ultralight_face_rfb_320``,
``ultralight_face_slim_320``) and scores it against the unpruned model's own detections on the zoo's
default ``self:`` images (``autodfp.evaluate(..., reference=...)``, the first ``--limit``):

    AUTODFP_ASSETS=/work/shared/assets PYTHONPATH=src nice -n 10 python benchmarks/yolo_like.py \
        --zoo ultralight_face_slim_320 --ratios 0.8 --config '{"synth_steps": 40}' --out runs/face.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import autodfp  # before torchvision: it registers torchvision's ops on the pinned CPU torch

NUM_CLASSES = 80
ANCHORS = 3
PX = 320
#: YOLOv5's anchors (pixels at 640 px), halved for 320 px; one triple per stride 8, 16, 32
ANCHOR_WH = [
    [(5, 6.5), (8, 15), (16.5, 11.5)],
    [(15, 30.5), (31, 22.5), (29.5, 59.5)],
    [(58, 45), (78, 99), (186.5, 163)],
]
STRIDES = (8, 16, 32)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: the reference's score threshold: this percentile of the unpruned model's max-class scores
REF_PERCENTILE = 99.5
REF_PER_IMAGE = 1000
PRED_MIN_SCORE = 1e-3
PRED_PER_IMAGE = 300
#: candidates per image before NMS (the best-scoring ones)
PRE_NMS = 1000
NMS_IOU = 0.5
#: the spread of each head's logits on the calibration photos (a trained detector's are of this order)
HEAD_STD = 2.5


def _cbr(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class YoloLike(nn.Module):
    """ShuffleNetV2 backbone, small FPN, YOLO-style 1×1 heads; returns the raw head maps (P3, P4, P5).

    :param width: torchvision's ShuffleNetV2 factory (``shufflenet_v2_x0_5`` …)
    :param fpn: channels of every FPN level
    :param num_classes: classes per anchor
    :param stages: torchvision ``ShuffleNetV2(stages_repeats, stages_out_channels)`` to use instead of
        ``width`` (the tests' tiny version)
    """

    def __init__(
        self,
        width: str = "shufflenet_v2_x0_5",
        fpn: int = 48,
        num_classes: int = NUM_CLASSES,
        stages: tuple[list[int], list[int]] | None = None,
    ) -> None:
        super().__init__()
        import torchvision

        if stages is None:
            tv = getattr(torchvision.models, width)(weights=None)
        else:
            tv = torchvision.models.shufflenetv2.ShuffleNetV2(*stages)
        self.input = nn.Sequential(tv.conv1, tv.maxpool)
        self.stage2, self.stage3, self.stage4 = tv.stage2, tv.stage3, tv.stage4
        chans = [tv.stage2[-1].branch2[-3].out_channels * 2, 0, 0]
        chans[1] = tv.stage3[-1].branch2[-3].out_channels * 2
        chans[2] = tv.stage4[-1].branch2[-3].out_channels * 2
        self.lateral = nn.ModuleList(_cbr(c, fpn, 1) for c in chans)
        self.smooth = nn.ModuleList(_cbr(fpn, fpn, 3) for _ in chans)
        self.stem = nn.ModuleList(_cbr(fpn, fpn, 1) for _ in chans)
        self.heads = nn.ModuleList(nn.Conv2d(fpn, ANCHORS * (5 + num_classes), 1) for _ in chans)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c3 = self.stage2(self.input(x))
        c4 = self.stage3(c3)
        c5 = self.stage4(c4)
        p5 = self.lateral[2](c5)
        p4 = self.lateral[1](c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.lateral[0](c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        return tuple(h(t(s(p))) for h, t, s, p in zip(self.heads, self.stem, self.smooth, (p3, p4, p5)))


@torch.no_grad()
def calibrate(model: YoloLike, photos: torch.Tensor, batch: int = 16) -> YoloLike:
    """BN statistics from train-mode passes over ``photos`` (cumulative averages, no gradients),
    then each head scaled to logits of std :data:`HEAD_STD` with YOLOv5's prior biases."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for i in range(0, len(photos), batch):
        model(photos[i : i + batch])
    model.eval()
    feats: list[list[torch.Tensor]] = [[] for _ in model.heads]
    hooks = [h.register_forward_hook(lambda m, a, o, i=i: feats[i].append(o)) for i, h in enumerate(model.heads)]
    for i in range(0, len(photos), batch):
        model(photos[i : i + batch])
    for h in hooks:
        h.remove()
    nc = model.num_classes
    for i, head in enumerate(model.heads):
        out = torch.cat(feats[i])
        std = out.transpose(0, 1).reshape(out.shape[1], -1).std(1).clamp_min(1e-6)
        head.weight.mul_((HEAD_STD / std).view(-1, 1, 1, 1))
        bias = torch.zeros(ANCHORS, 5 + nc)
        bias[:, 4] = math.log(8 / (640 / STRIDES[i]) ** 2)
        bias[:, 5:] = math.log(0.6 / (nc - 0.99))
        head.bias.copy_(bias.view(-1))
    return model


def photos(root: Path, px: int = PX) -> torch.Tensor:
    """Every image of ``root``, resized to ``px``×``px`` and normalised (ImageNet mean and std)."""
    from PIL import Image

    files = sorted(p for p in root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    out = []
    for f in files:
        im = Image.open(f).convert("RGB").resize((px, px), Image.BILINEAR)
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(px, px, 3).permute(2, 0, 1)
        out.append((x.float() / 255 - mean) / std)
    return torch.stack(out)


def decode(maps: tuple[torch.Tensor, ...], px: int = PX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """YOLOv5 decoding: (boxes (N, K, 4) normalised corners, max-class scores (N, K), labels (N, K))."""
    boxes, scores, labels = [], [], []
    for level, m in enumerate(maps):
        n, _, h, w = m.shape
        t = m.view(n, ANCHORS, -1, h, w).permute(0, 1, 3, 4, 2)  # N, A, H, W, 5 + C
        gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        s = t.sigmoid()
        stride = STRIDES[level]
        cx = (s[..., 0] * 2 - 0.5 + gx) * stride
        cy = (s[..., 1] * 2 - 0.5 + gy) * stride
        anchor = torch.tensor(ANCHOR_WH[level]).view(1, ANCHORS, 1, 1, 2)
        wh = (s[..., 2:4] * 2) ** 2 * anchor
        b = torch.stack([cx - wh[..., 0] / 2, cy - wh[..., 1] / 2, cx + wh[..., 0] / 2, cy + wh[..., 1] / 2], -1)
        cls = s[..., 5:] * s[..., 4:5]
        sc, lab = cls.max(-1)
        boxes.append((b / px).clamp(0, 1).reshape(n, -1, 4))
        scores.append(sc.reshape(n, -1))
        labels.append(lab.reshape(n, -1))
    return torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1)


def detections(
    maps: tuple[torch.Tensor, ...], min_score: float, per_image: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per image: class-wise NMS over the anchors scoring at least ``min_score``, best ``per_image``."""
    from autodfp.eval.detection import nms

    boxes, scores, labels = decode(maps)
    out = []
    for b, s, lab in zip(boxes, scores, labels):
        # boxes clamped to under a pixel at the image border cannot be matched by IoU: not detections
        keep = (s >= min_score) & (b[:, 2] - b[:, 0] >= 1 / PX) & (b[:, 3] - b[:, 1] >= 1 / PX)
        b, s, lab = b[keep], s[keep], lab[keep]
        order = s.argsort(descending=True)[:PRE_NMS]
        b, s, lab = b[order], s[order], lab[order]
        idx = nms(b + lab.unsqueeze(1).float() * 2.0, s, NMS_IOU)[:per_image]  # offset: NMS per class
        out.append((b[idx], s[idx], lab[idx]))
    return out


@torch.no_grad()
def forward(model: nn.Module, x: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, ...]:
    model.eval()
    parts = [model(x[i : i + batch]) for i in range(0, len(x), batch)]
    return tuple(torch.cat([p[k] for p in parts]) for k in range(len(parts[0])))


def max_objectness(maps: tuple[torch.Tensor, ...]) -> float:
    return max(float(m.view(m.shape[0], ANCHORS, -1, *m.shape[-2:])[:, :, 4].max()) for m in maps)


def agreement(ref: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """mAP of ``out``'s detections against ``ref``'s top detections (module doc), and objectness."""
    from autodfp.eval.detection import coco_map

    _, ref_scores, _ = decode(ref)
    threshold = float(torch.quantile(ref_scores.flatten()[::7], REF_PERCENTILE / 100))
    gt = [(b, lab) for b, _, lab in detections(ref, threshold, REF_PER_IMAGE)]
    preds = detections(out, PRED_MIN_SCORE, PRED_PER_IMAGE)
    m50, m5095 = coco_map(gt, preds, [(PX, PX)] * len(gt))
    return {
        "map50": m50,
        "map50_95": m5095,
        "max_obj": max_objectness(out),
        "ref_boxes": float(sum(len(b) for b, _ in gt)),
        "ref_threshold": threshold,
    }


def build_calibrated(root: Path, seed: int = 0) -> tuple[YoloLike, torch.Tensor, torch.Tensor]:
    """The calibrated model, its BN photos and the held-out evaluation photos."""
    torch.manual_seed(seed)
    xs = photos(root)
    half = len(xs) // 2
    model = calibrate(YoloLike(), xs[:half])
    return model, xs[:half], xs[half:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8])
    ap.add_argument("--search", default="uniform")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="a name for this code revision in the output")
    ap.add_argument("--config", default="{}", help="Config overrides as JSON (default: none)")
    ap.add_argument("--variants", action="store_true", help="also prune with refine=False and strategy=none")
    ap.add_argument("--zoo", default=None, help="prune this zoo face detector instead")
    ap.add_argument("--limit", type=int, default=64, help="images of a zoo detector's evaluation")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.zoo:
        return zoo_main(args)

    root = Path(os.environ.get("AUTODFP_ASSETS", "/work/shared/assets")) / "detection/coco128-val2017/images"
    model, _, ev = build_calibrated(root, args.seed)
    ref = forward(model, ev)
    base = agreement(ref, ref)
    print(
        f"autodfp from {autodfp.__file__}; unpruned max obj logit {base['max_obj']:.2f}, "
        f"{base['ref_boxes']:.0f} reference boxes on {len(ev)} photos (score ≥ {base['ref_threshold']:.4f})"
    )
    overrides: dict[str, Any] = json.loads(args.config)
    variants: list[tuple[str, dict[str, Any]]] = [("default", {})]
    if args.variants:
        variants += [("no refinement", {"refine": False}), ("none", {"refine": False, "strategy": "none"})]
    rows = []
    for ratio in args.ratios:
        for vname, vcfg in variants:
            cfg = autodfp.Config(**{**overrides, **vcfg})
            t0 = time.perf_counter()
            res = autodfp.prune(
                model,
                input_shape=(3, PX, PX),
                macs_ratio=ratio,
                search=args.search,
                config=cfg,
                seed=args.seed,
                name="yolo-like-shufflenet",
                mean=MEAN,
                std=STD,
                progress=False,
            )
            wall = time.perf_counter() - t0
            row = {
                "label": args.label,
                "variant": vname,
                "search": args.search,
                "target": ratio,
                "macs": res.report["macs_ratio_achieved"],
                **agreement(ref, forward(res.model, ev)),
                "final_step": res.report.get("final_step"),
                "final_step_scores": res.report.get("final_step_scores"),
                "final_choice_groups": res.report.get("final_choice_groups"),
                "dims_ridge": res.report.get("refine_dims_ridge"),
                "reward_calls": res.report.get("final_choice_reward_calls"),
                "wall_s": round(wall, 1),
            }
            row["dims_ridge_scores"] = res.report.get("refine_dims_ridge_scores")
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": platform.platform(),
            "torch": torch.__version__,
            "load": os.getloadavg(),
            "argv": sys.argv,
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def zoo_main(args: argparse.Namespace) -> None:
    """``--zoo``: a zoo face detector at each ratio, mAP against its own unpruned detections."""
    model = autodfp.create_model(args.zoo)
    overrides: dict[str, Any] = json.loads(args.config)
    rows = []
    for ratio in args.ratios:
        t0 = time.perf_counter()
        res = autodfp.prune(
            model,
            macs_ratio=ratio,
            search=args.search,
            config=autodfp.Config(**overrides),
            seed=args.seed,
            progress=False,
        )
        wall = time.perf_counter() - t0
        ev = autodfp.evaluate(res.model, model_config=res.model_config, limit=args.limit, reference=model)
        row = {
            "label": args.label,
            "model": args.zoo,
            "search": args.search,
            "target": ratio,
            "macs": res.report["macs_ratio_achieved"],
            "map50": ev.map50,
            "map50_95": ev.map50_95,
            "recall": ev.recall,
            "final_step": res.report.get("final_step"),
            "final_step_scores": res.report.get("final_step_scores"),
            "final_choice_groups": res.report.get("final_choice_groups"),
            "dims_ridge": res.report.get("refine_dims_ridge"),
            "dims_ridge_scores": res.report.get("refine_dims_ridge_scores"),
            "wall_s": round(wall, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
