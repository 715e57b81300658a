"""Detection quality: COCO mAP (pycocotools) and recall, against labels or the unpruned detector.

Data specs (``data`` of :func:`evaluate_detection`):

* ``self:DIR[,DIR…]`` — unlabelled photographs. The *reference* (unpruned) model's own detections
  (score ≥ 0.5 after NMS at IoU 0.3, upstream's test settings) are the ground truth, so the numbers
  say how much detection quality pruning lost, not how good the detector is. The face detectors'
  default (``shared/assets``: ``sample-images`` then ``coco128-val2017/images``) is of this kind.
* ``yolo:DIR`` — YOLO labels: ``DIR/images/<id>.<ext>`` with ``DIR/labels/<id>.txt`` (one box a line:
  class, centre x, centre y, width, height, normalised), or images and ``.txt`` side by side in DIR.
  An image without a label file has no objects.
* ``coco:JSON:IMAGES`` — a COCO instances json and the folder holding its ``file_name`` images.

Every box is kept in corner form normalised to the image, ``(x1, y1, x2, y2)`` in [0, 1]: a detector
input is the whole image resized (no crop), so input and image coordinates agree. For pycocotools
boxes are scaled to the original image's pixels, so its area ranges mean what they mean in COCO.

The model side is a *predictor*, ``predict(batch) -> [(boxes, scores, labels), …]`` per image (boxes
as above). :func:`predictor_for` builds one for the Ultra-Light face detectors (raw ``(logits,
offsets)`` outputs decoded with SSD priors); any other detector passes its own.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from autodfp._jsonio import read_json
from autodfp._modes import eval_mode
from autodfp.errors import DataError, ModelError
from autodfp.models.registry import ModelConfig, Preprocessing

#: the ground-truth rule for unlabelled data (upstream's test settings, with a 0.5 threshold)
SCORE_THRESHOLD = 0.5
NMS_IOU = 0.3
#: a reference object counts as found when a prediction with score ≥ SCORE_THRESHOLD overlaps it this much
MATCH_IOU = 0.5
SPEC_KINDS = ("self", "yolo", "coco")

Detections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # boxes (K, 4), scores (K,), labels (K,)
Predictor = Callable[[torch.Tensor], list[Detections]]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes NMS keeps, best first: torchvision's op if it imports, else the pure-torch one.

    :param boxes: ``(N, 4)`` corner boxes
    :param scores: ``(N,)``
    :param iou_threshold: a box overlapping a kept one by more than this is dropped
    """
    try:
        from torchvision.ops import nms as tv_nms

        return tv_nms(boxes, scores, float(iou_threshold))
    except Exception:  # not installed, or its compiled ops missing
        from autodfp.models._tv_ops import nms as pure_nms

        return pure_nms(boxes, scores, float(iou_threshold))


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass
class DetectionData:
    """Images and, when labelled, their boxes (normalised corners) and class labels.

    :param images: image paths, in evaluation order
    :param boxes: per image ``(K, 4)``; ``None`` for ``self:`` data (the reference model supplies them)
    :param labels: per image ``(K,)`` class ids
    :param source: the spec, for messages
    """

    images: list[Path]
    boxes: list[torch.Tensor] | None = None
    labels: list[torch.Tensor] | None = None
    source: str = ""
    sizes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.boxes is not None

    def head(self, limit: int | None) -> DetectionData:
        """The first ``limit`` images (all with ``None``)."""
        if limit is None:
            return self
        if limit < 1:
            raise DataError(f"limit must be at least 1, got {limit}")
        cut = lambda xs: None if xs is None else xs[:limit]
        return DetectionData(self.images[:limit], cut(self.boxes), cut(self.labels), self.source, self.sizes[:limit])


_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _images_in(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"image directory not found: {root}")
    from autodfp.data.walk import iter_images  # the one walker: regular files only, sorted, hidden skipped

    paths = list(iter_images(root, recursive=False))
    if not paths:
        raise DataError(f"no images ({', '.join(_IMAGE_EXT)}) in {root}")
    return paths


def read_yolo(root: str | os.PathLike) -> DetectionData:
    """YOLO-txt labels (see the module docstring); a malformed line is a DataError naming the file.

    :param root: the folder holding ``images/`` and ``labels/`` (or images and ``.txt`` side by side)
    """
    root = Path(root).expanduser()
    img_dir, lab_dir = (root / "images", root / "labels") if (root / "images").is_dir() else (root, root)
    images = _images_in(img_dir)
    boxes, labels = [], []
    for path in images:
        txt = lab_dir / f"{path.stem}.txt"
        rows: list[list[float]] = []
        if txt.is_file():
            for n, line in enumerate(txt.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    vals = [float(v) for v in parts[:5]]
                except ValueError:
                    vals = []
                if len(vals) != 5 or not all(math.isfinite(v) for v in vals) or vals[0] < 0 or vals[0] != int(vals[0]):
                    raise DataError(f"{txt}, line {n}: expected 'class cx cy w h' (normalised), got '{line.strip()}'")
                rows.append(vals)
        t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)
        cx, cy, w, h = t[:, 1], t[:, 2], t[:, 3], t[:, 4]
        boxes.append(torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).clamp(0, 1))
        labels.append(t[:, 0].long())
    return DetectionData(images, boxes, labels, f"yolo:{root}")


#: Largest COCO annotations file read (1 GiB): past any public one, and a bound on what is read.
COCO_MAX_BYTES = 1 << 30


def read_coco(annotations: str | os.PathLike, image_dir: str | os.PathLike) -> DetectionData:
    """A COCO instances json (``images``, ``annotations`` with pixel ``bbox`` x, y, w, h); crowd boxes are skipped.

    :param annotations: the json file
    :param image_dir: the folder holding the images' ``file_name``
    """
    annotations, image_dir = Path(annotations).expanduser(), Path(image_dir).expanduser()
    if not annotations.exists():
        raise DataError(f"COCO annotations not found: {annotations}")
    # bounded: a COCO file is user input (val2017's is 25 MB, the largest public ones ~0.5 GB)
    doc = read_json(annotations, f"COCO annotations {annotations}", error=DataError, max_bytes=COCO_MAX_BYTES)
    try:
        entries = {int(im["id"]): (str(im["file_name"]), int(im["width"]), int(im["height"])) for im in doc["images"]}
        anns = [
            (int(a["image_id"]), int(a["category_id"]), [float(v) for v in a["bbox"]])
            for a in doc.get("annotations", [])
            if not a.get("iscrowd", 0)
        ]
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        raise DataError(f"{annotations} is not a COCO instances json (images with id/file_name/width/height)") from None
    if not image_dir.is_dir():
        raise DataError(f"image directory not found: {image_dir}")
    per: dict[int, list[tuple[int, list[float]]]] = {i: [] for i in entries}
    for img_id, cat, bbox in anns:
        if img_id not in per or len(bbox) != 4:
            raise DataError(f"{annotations}: an annotation names image {img_id} or has a bbox of {len(bbox)} values")
        per[img_id].append((cat, bbox))
    images, boxes, labels, sizes = [], [], [], []
    for img_id in sorted(entries):
        name, w, h = entries[img_id]
        path = image_dir / name
        if not path.is_file():
            raise DataError(f"{annotations}: image '{name}' not found in {image_dir}")
        b = torch.tensor([bb for _, bb in per[img_id]], dtype=torch.float32).reshape(-1, 4)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        boxes.append((torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1) / scale).clamp(0, 1))
        labels.append(torch.tensor([c for c, _ in per[img_id]], dtype=torch.long))
        images.append(path)
        sizes.append((w, h))
    if not images:
        raise DataError(f"{annotations} lists no images")
    return DetectionData(images, boxes, labels, f"coco:{annotations}", sizes)


def parse_detection_spec(spec: str) -> DetectionData:
    """``self:DIR[,DIR…]``, ``yolo:DIR`` or ``coco:JSON:IMAGES`` → :class:`DetectionData`.

    :param spec: the data spec
    """
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in SPEC_KINDS or not rest:
        raise DataError(f"detection data spec '{spec}': use self:DIR[,DIR...], yolo:DIR or coco:JSON:IMAGES")
    if kind == "self":
        images = [p for d in rest.split(",") for p in _images_in(Path(d).expanduser())]
        return DetectionData(images, source=spec)
    if kind == "yolo":
        return read_yolo(rest)
    js, sep2, imgs = rest.rpartition(":")
    if not sep2 or not js or not imgs:
        raise DataError(f"detection data spec '{spec}': coco needs coco:JSON:IMAGES")
    return read_coco(js, imgs)


def default_detection_data(config: ModelConfig) -> str:
    """The model's default data as a spec, its paths found in the asset mirror or the user cache.

    :param config: a detection model's config
    """
    from autodfp.models.hub import ENV_ASSETS, assets_dir, cache_dir

    ref = config.default_dataset
    if ref is None:
        raise DataError(f"model '{config.name}' has no default detection data; pass a spec (self:DIR, yolo:DIR, ...)")
    roots = [r for r in (assets_dir(), cache_dir() / "datasets") if r is not None]
    found = []
    for part in ref.path.split(","):
        hit = next((r / part for r in roots if (r / part).exists()), None)
        if hit is None:
            raise DataError(
                f"detection data '{part}' not found (set ${ENV_ASSETS} to a mirror containing it, "
                f"or pass a data spec such as {ref.kind}:DIR)"
            )
        found.append(str(hit))
    return f"{ref.kind}:{','.join(found)}"


# ---------------------------------------------------------------------------------------------
# model side
# ---------------------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def ssd_face_predictor(
    model: nn.Module, score_threshold: float = 0.05, iou_threshold: float = NMS_IOU, top_k: int = 1000
) -> Predictor:
    """Decode an Ultra-Light face detector's raw ``(logits, offsets)``: softmax, SSD priors, NMS.

    mAP needs the score range below the ground truth's threshold too, so predictions keep every
    score above ``score_threshold`` (0.05, a common floor for mAP; the top ``top_k`` after NMS);
    ground truth and recall apply :data:`SCORE_THRESHOLD` themselves.

    :param model: the detector (pruned or not)
    :param score_threshold: drop faces below this probability before NMS
    :param iou_threshold: NMS IoU
    :param top_k: at most this many detections per image
    """
    from autodfp.models.face_ultralight import decode

    def predict(x: torch.Tensor) -> list[Detections]:
        with eval_mode(model), torch.inference_mode():
            out = model(x.to(_device_of(model)))
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ModelError("the face predictor needs a model returning (class logits, box offsets)")
        probs, corners = decode(out[0].float().cpu(), out[1].float().cpu())
        result = []
        for p, b in zip(probs, corners):
            keep = p > score_threshold
            p, b = p[keep], b[keep]
            # a pre-NMS cap keeps the cost bounded on a badly damaged model that scores every prior
            order = torch.argsort(p, descending=True)[: 4 * top_k]
            p, b = p[order], b[order]
            kept = nms(b, p, iou_threshold)[:top_k]
            result.append((b[kept], p[kept], torch.zeros(len(kept), dtype=torch.long)))
        return result

    return predict


def predictor_for(model: nn.Module, config: ModelConfig) -> Predictor:
    """The predictor of a known detector family (today the Ultra-Light face detectors).

    :param model: the detector
    :param config: its config (the name picks the decoder; a pruned copy keeps its zoo name)
    """
    if config.name.startswith("ultralight_face"):
        return ssd_face_predictor(model)
    from autodfp.models.face_ultralight import UltraLightFace

    if isinstance(model, UltraLightFace):
        return ssd_face_predictor(model)
    raise ModelError(
        f"no box decoder is known for '{config.name}'; call autodfp.eval.detection.evaluate_detection "
        "with predict=f(batch) -> [(boxes, scores, labels), ...]"
    )


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of corner boxes ``(N, 4)`` × ``(M, 4)``."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda t: (t[:, 2:] - t[:, :2]).clamp(min=0).prod(-1)
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp(min=1e-12)


def recall(
    gt: Sequence[tuple[torch.Tensor, torch.Tensor]],
    preds: Sequence[Detections],
    iou: float = MATCH_IOU,
    score_threshold: float = SCORE_THRESHOLD,
) -> float:
    """Share of ground-truth boxes found: greedy one-to-one matches, best score first, same class.

    :param gt: per image (boxes, labels)
    :param preds: per image (boxes, scores, labels)
    :param iou: a match needs at least this IoU
    :param score_threshold: predictions below this score do not count
    """
    found = total = 0
    for (gb, gl), (pb, ps, pl) in zip(gt, preds):
        total += len(gb)
        keep = ps >= score_threshold
        pb, ps, pl = pb[keep], ps[keep], pl[keep]
        if len(gb) == 0 or len(pb) == 0:
            continue
        ious = box_iou(pb[torch.argsort(ps, descending=True)], gb)
        pl = pl[torch.argsort(ps, descending=True)]
        taken = torch.zeros(len(gb), dtype=torch.bool)
        for i in range(len(ious)):
            cand = ious[i].clone()
            cand[taken | (gl != pl[i])] = -1.0
            j = int(cand.argmax())
            if float(cand[j]) >= iou:
                taken[j] = True
        found += int(taken.sum())
    return found / total if total else float("nan")


def coco_map(
    gt: Sequence[tuple[torch.Tensor, torch.Tensor]],
    preds: Sequence[Detections],
    sizes: Sequence[tuple[int, int]],
) -> tuple[float, float]:
    """(mAP@0.5, mAP@0.5:0.95) by pycocotools (all areas, up to 1000 detections per image).

    NaN when there is no ground-truth box at all (COCO's -1); 0 when there is no prediction.

    :param gt: per image (boxes normalised, labels)
    :param preds: per image (boxes normalised, scores, labels)
    :param sizes: per image (width, height) in pixels
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    cats: set[int] = set()
    for i, ((gb, gl), (pb, ps, pl), (w, h)) in enumerate(zip(gt, preds, sizes)):
        images.append({"id": i, "width": w, "height": h})
        scale = torch.tensor([w, h, w, h], dtype=torch.float64)
        for b, c in zip(gb.double() * scale, gl.tolist()):
            x1, y1, x2, y2 = b.tolist()
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(c),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
            cats.add(int(c))
        for b, s, c in zip(pb.double() * scale, ps.tolist(), pl.tolist()):
            x1, y1, x2, y2 = b.tolist()
            dets.append({"image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})
            cats.add(int(c))
    if not anns:
        return float("nan"), float("nan")
    if not dets:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(cats)]}
        truth.createIndex()
        ev = COCOeval(truth, truth.loadRes(dets), "bbox")
        # one area range and one detection cap: the summary's small/medium/large split would
        # quadruple pycocotools' (pure-Python) matching and is not reported
        ev.params.maxDets = [1000]
        ev.params.areaRng = [[0.0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, 0]  # IoU thresholds × recall points × classes
    per_iou = [float(p[p > -1].mean()) if (p > -1).any() else float("nan") for p in precision]
    return per_iou[0], float(np.nanmean(per_iou))


# ---------------------------------------------------------------------------------------------
# the evaluation
# ---------------------------------------------------------------------------------------------
@dataclass
class DetectionResult:
    """What :func:`evaluate_detection` measured.

    :param map50: mAP at IoU 0.5 (a fraction, not a percentage)
    :param map50_95: mAP averaged over IoU 0.5:0.95
    :param recall: share of ground-truth objects found (IoU ≥ 0.5, score ≥ 0.5); for ``self:``
        data the share of the reference model's faces the evaluated model still finds
    :param n: images evaluated
    :param objects: ground-truth objects
    :param detections: the evaluated model's detections with score ≥ 0.5
    :param reference: ``self`` (against the reference model's detections) or ``labels``
    """

    map50: float
    map50_95: float
    recall: float
    n: int
    objects: int
    detections: int
    reference: str


def _load_batch(paths: Sequence[Path], transform: Callable[[Any], torch.Tensor]) -> tuple[torch.Tensor, list]:
    from autodfp.data.datasets import _load_image

    xs, sizes = [], []
    for p in paths:
        img = _load_image(p)
        sizes.append(img.size)
        xs.append(transform(img))
    return torch.stack(xs), sizes


def _detector_pre(pre: Preprocessing) -> Preprocessing:
    """Whole-image resize to the input size (a detector sees the full image, never a crop)."""
    return pre if pre.input_hw is not None else replace(pre, input_hw=(pre.input_size, pre.input_size))


def predict_images(
    predict: Predictor, images: Sequence[Path], pre: Preprocessing, batch_size: int = 8
) -> tuple[list[Detections], list[tuple[int, int]]]:
    """Run ``predict`` over image files; returns detections and (width, height) per image.

    :param predict: the predictor
    :param images: image paths
    :param pre: the model's preprocessing
    :param batch_size: images per forward pass
    """
    from autodfp.data.datasets import build_transform

    transform = build_transform(_detector_pre(pre))
    preds: list[Detections] = []
    sizes: list[tuple[int, int]] = []
    for i in range(0, len(images), batch_size):
        x, s = _load_batch(images[i : i + batch_size], transform)
        preds.extend(predict(x))
        sizes.extend(s)
    return preds, sizes


def evaluate_detection(
    model: nn.Module,
    data: str | DetectionData,
    model_config: ModelConfig,
    *,
    reference: nn.Module | None = None,
    predict: Predictor | None = None,
    reference_predict: Predictor | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> DetectionResult:
    """mAP@0.5, mAP@0.5:0.95 and recall of ``model`` on labelled data, or against ``reference`` on ``self:`` data.

    :param model: the detector to evaluate
    :param data: a spec (``self:DIR[,DIR…]``, ``yolo:DIR``, ``coco:JSON:IMAGES``) or parsed data
    :param model_config: preprocessing and name (which picks the decoder)
    :param reference: the unpruned detector whose detections are the truth on ``self:`` data
        (default: ``model`` itself, which scores 1.0 by construction)
    :param predict: the model's predictor (default :func:`predictor_for`)
    :param reference_predict: the reference's predictor (default :func:`predictor_for`)
    :param limit: evaluate the first N images only
    :param batch_size: images per forward pass
    """
    ds = (parse_detection_spec(data) if isinstance(data, str) else data).head(limit)
    pre = model_config.preprocessing
    predict = predict or predictor_for(model, model_config)
    preds, sizes = predict_images(predict, ds.images, pre, batch_size)
    if ds.labelled:
        assert ds.boxes is not None and ds.labels is not None
        gt = list(zip(ds.boxes, ds.labels))
        kind = "labels"
        sizes = ds.sizes or sizes
    else:
        if reference is None or reference is model:
            ref_preds = preds
        else:
            ref_predict = reference_predict or predictor_for(reference, model_config)
            ref_preds = predict_images(ref_predict, ds.images, pre, batch_size)[0]
        gt = [(b[s >= SCORE_THRESHOLD], lab[s >= SCORE_THRESHOLD]) for b, s, lab in ref_preds]
        kind = "self"
    map50, map5095 = coco_map(gt, preds, sizes)
    return DetectionResult(
        map50=map50,
        map50_95=map5095,
        recall=recall(gt, preds),
        n=len(ds.images),
        objects=sum(len(b) for b, _ in gt),
        detections=sum(int((s >= SCORE_THRESHOLD).sum()) for _, s, _ in preds),
        reference=kind,
    )


__all__ = [
    "DetectionData",
    "DetectionResult",
    "box_iou",
    "coco_map",
    "default_detection_data",
    "evaluate_detection",
    "nms",
    "parse_detection_spec",
    "predict_images",
    "predictor_for",
    "read_coco",
    "read_yolo",
    "recall",
    "ssd_face_predictor",
]
