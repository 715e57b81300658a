"""Detectors: the Ultra-Light face models, multi-output rewards, detection data specs and mAP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

from autodfp.errors import AutoDFPError, ModelError, WeightsError
from autodfp.eval.detection import (
    coco_map,
    evaluate_detection,
    parse_detection_spec,
    read_coco,
    read_yolo,
    recall,
)
from autodfp.models.face_ultralight import UltraLightFace, decode, detect, priors
from autodfp.models.registry import ModelConfig, Preprocessing
from autodfp.search.rewards import AgreementReward, model_outputs, tail_nmse

ASSETS = Path(os.environ.get("AUTODFP_ASSETS", "/nonexistent"))
FACES = ASSETS / "detection" / "face-ultralight"


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
def test_priors_match_the_heads():
    p = priors()
    assert p.shape == (40 * 30 * 3 + 20 * 15 * 2 + 10 * 8 * 2 + 5 * 4 * 3, 4)
    # first cell of the 40×30 map, 10-px prior: centre (0.5/40, 0.5/30), size 10/320 × 10/240
    assert torch.allclose(p[0], torch.tensor([0.5 / 40, 0.5 / 30, 10 / 320, 10 / 240]))
    for rfb in (False, True):
        scores, boxes = UltraLightFace(rfb=rfb).eval()(torch.zeros(1, 3, 240, 320))
        assert scores.shape == (1, len(p), 2) and boxes.shape == (1, len(p), 4)


def test_decode_zero_offsets_give_the_priors():
    p = priors()
    probs, corners = decode(torch.zeros(1, len(p), 2), torch.zeros(1, len(p), 4))
    assert torch.allclose(probs, torch.full_like(probs, 0.5))
    expect = torch.cat([p[:, :2] - p[:, 2:] / 2, p[:, :2] + p[:, 2:] / 2], 1).clamp(0, 1)
    assert torch.allclose(corners[0], expect)


@pytest.mark.skipif(not (FACES / "version-RFB-320.pth").is_file(), reason="face detector weights not available")
@pytest.mark.parametrize("name", ["ultralight_face_slim_320", "ultralight_face_rfb_320"])
def test_zoo_face_detector_finds_faces(name):
    from autodfp.api import input_shape_of
    from autodfp.data.datasets import build_transform
    from autodfp.models import load_model

    net, cfg = load_model(name)
    assert cfg.task == "detection" and input_shape_of(cfg) == (3, 240, 320)
    x = build_transform(cfg.preprocessing)(Image.open(FACES / "sample-images" / "9.jpg"))
    assert x.shape == (3, 240, 320)
    with torch.no_grad():
        boxes, scores = detect(net(x[None]))[0]
    assert len(scores) >= 1 and float(scores.min()) >= 0.5
    assert bool(((boxes >= 0) & (boxes <= 1)).all())


def test_weights_subdir_in_mirror(tmp_path, monkeypatch):
    from autodfp.models.hub import resolve_weights, sha256_file

    (tmp_path / "detection" / "x").mkdir(parents=True)
    f = tmp_path / "detection" / "x" / "w.pth"
    f.write_bytes(b"abc")
    monkeypatch.setenv("AUTODFP_ASSETS", str(tmp_path))
    monkeypatch.setenv("AUTODFP_HOME", str(tmp_path / "home"))
    assert resolve_weights("w.pth", sha256_file(f), subdir="detection/x", download=False) == f
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve_weights("w.pth", "0" * 64, subdir="detection/x", download=False)
    with pytest.raises(WeightsError, match="weights/w.pth"):
        resolve_weights("w.pth", None, download=False)


# ---------------------------------------------------------------------------------------------
# multi-output rewards
# ---------------------------------------------------------------------------------------------
class _TwoHeads(nn.Module):
    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.cls = nn.Conv2d(8, 2, 1)
        self.box = nn.Conv2d(8, 4, 1)
        self.as_dict = as_dict

    def forward(self, x):
        f = torch.relu(self.body(x))
        c = self.cls(f).flatten(2).transpose(1, 2)  # (N, A, 2)
        b = self.box(f).flatten(2).transpose(1, 2)  # (N, A, 4)
        return {"scores": c, "boxes": b} if self.as_dict else (c, b)


@pytest.mark.parametrize("as_dict", [False, True])
def test_multi_output_reward_identity_and_damage(as_dict):
    torch.manual_seed(0)
    net = _TwoHeads(as_dict).eval()
    x = torch.randn(6, 3, 8, 8)
    reward = AgreementReward(net, x, batch_size=4)
    assert reward.kinds is not None and sorted(reward.kinds.values()) == ["logits", "regression"]
    same = reward.details(net)
    assert same["kl"] == 0.0 and same["mse"] == 0.0 and same["top1"] == pytest.approx(0.5)  # (1 + 0)/2
    damaged = _TwoHeads(as_dict).eval()
    damaged.load_state_dict(net.state_dict())
    with torch.no_grad():
        damaged.box.weight.mul_(0.5)
    d = reward.details(damaged)
    # the class head is untouched: only the box regression's normalised MSE counts, halved by the mean
    outs_ref, outs = model_outputs(net, x, 6), model_outputs(damaged, x, 6)
    ref_b, b = list(outs_ref.values())[1], list(outs.values())[1]
    nmse = float((b - ref_b).pow(2).mean()) / float(ref_b.var(unbiased=False))
    assert d["kl"] == pytest.approx(-nmse / 2, rel=1e-5) and d["kl"] < 0
    # with the opt-in tail term: the per-channel, tail-aware error (tests/test_final_choice.py)
    tailed = AgreementReward(net, x, batch_size=4, tail=0.01).details(damaged)
    assert tailed["kl"] == pytest.approx(tail_nmse(ref_b, b, 0.01) / 2, rel=1e-5) and tailed["kl"] < 0


class _VaryingShape(nn.Module):
    def forward(self, x):
        k = int(x.shape[0])  # the number of "detections" depends on the batch
        return x.mean(dim=(1, 2, 3))[:, None].expand(-1, k), x[:, 0, 0, :2]


def test_reward_refuses_shapes_that_vary_with_the_input():
    with pytest.raises(ModelError, match="changes shape with the input"):
        AgreementReward(_VaryingShape(), torch.randn(5, 3, 4, 4), batch_size=3)


def test_reward_refuses_non_tensor_outputs():
    class Bad(nn.Module):
        def forward(self, x):
            return [{"boxes": x[:, 0]}, "label"]

    with pytest.raises(AutoDFPError, match="str"):
        AgreementReward(Bad(), torch.randn(2, 3, 4, 4))


def test_inversion_refuses_a_detector():
    from autodfp.synth.distill import distill

    with pytest.raises(ModelError, match="needs a classifier"):
        distill(_TwoHeads(), (3, 8, 8), n=2, steps=1, method="inversion", progress=False)


# ---------------------------------------------------------------------------------------------
# detection data and mAP
# ---------------------------------------------------------------------------------------------
#: normalised corner boxes per image, class labels
_GT = {
    "a": ([[0.1, 0.1, 0.4, 0.5], [0.6, 0.2, 0.9, 0.8]], [0, 1]),
    "b": ([[0.25, 0.25, 0.75, 0.75]], [1]),
}
_WH = (40, 20)


@pytest.fixture
def tiny_set(tmp_path):
    root = tmp_path / "yolo"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    coco: dict = {"images": [], "annotations": [], "categories": [{"id": 0}, {"id": 1}]}
    w, h = _WH
    for i, (name, (boxes, labels)) in enumerate(_GT.items()):
        Image.new("RGB", _WH, (i * 60, 10, 10)).save(root / "images" / f"{name}.png")
        lines = [
            f"{c} {(x1 + x2) / 2} {(y1 + y2) / 2} {x2 - x1} {y2 - y1}" for (x1, y1, x2, y2), c in zip(boxes, labels)
        ]
        (root / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
        coco["images"].append({"id": i + 1, "file_name": f"{name}.png", "width": w, "height": h})
        for (x1, y1, x2, y2), c in zip(boxes, labels):
            bbox = [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h]
            coco["annotations"].append(
                {"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": c, "bbox": bbox}
            )
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return root, tmp_path / "ann.json"


def _oracle(shift: float = 0.0, drop_second: bool = False):
    """A predictor returning the ground truth (optionally shifted, or missing image a's second box)."""
    calls = iter(list(_GT.values()))

    def predict(x):
        out = []
        for _ in range(len(x)):
            boxes, labels = next(calls)
            b, lab = torch.tensor(boxes) + shift, torch.tensor(labels)
            if drop_second and len(b) == 2:
                b, lab = b[:1], lab[:1]
            out.append((b, torch.full((len(b),), 0.9), lab))
        return out

    return predict


_CFG = ModelConfig("det", nn.Identity, None, Preprocessing(16, (0.5,) * 3, (0.5,) * 3), 2, task="detection")  # type: ignore[arg-type]


def test_yolo_and_coco_parse_to_the_same_boxes(tiny_set):
    root, ann = tiny_set
    y, c = read_yolo(root), read_coco(ann, root / "images")
    assert [p.name for p in y.images] == [p.name for p in c.images] == ["a.png", "b.png"]
    for yb, cb, (boxes, _) in zip(y.boxes or [], c.boxes or [], _GT.values()):
        assert torch.allclose(yb, torch.tensor(boxes), atol=1e-6) and torch.allclose(cb, yb, atol=1e-6)
    assert [t.tolist() for t in y.labels or []] == [[0, 1], [1]]
    assert parse_detection_spec(f"coco:{ann}:{root / 'images'}").sizes == [_WH, _WH]


@pytest.mark.parametrize("spec_kind", ["yolo", "coco"])
def test_map_of_an_oracle_is_one_and_misses_cost(tiny_set, spec_kind):
    root, ann = tiny_set
    spec = f"yolo:{root}" if spec_kind == "yolo" else f"coco:{ann}:{root / 'images'}"
    r = evaluate_detection(nn.Identity(), spec, _CFG, predict=_oracle(), batch_size=1)
    assert (r.map50, r.map50_95, r.recall, r.objects, r.n) == (pytest.approx(1.0), pytest.approx(1.0), 1.0, 3, 2)
    r = evaluate_detection(nn.Identity(), spec, _CFG, predict=_oracle(drop_second=True), batch_size=2)
    assert r.recall == pytest.approx(2 / 3) and r.map50 < 1.0
    # a shift of 0.02 keeps IoU ≥ 0.5 but not ≥ 0.95: mAP@0.5 stays 1, mAP@0.5:0.95 drops
    r = evaluate_detection(nn.Identity(), spec, _CFG, predict=_oracle(shift=0.02), batch_size=2)
    assert r.map50 == pytest.approx(1.0) and r.map50_95 < 0.95


def test_recall_and_map_edge_cases():
    gt = [(torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([0]))]
    low = [(torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([0.3]), torch.tensor([0]))]
    assert recall(gt, low) == 0.0  # found, but below the 0.5 score threshold
    wrong_class = [(low[0][0], torch.tensor([0.9]), torch.tensor([1]))]
    assert recall(gt, wrong_class) == 0.0
    none = [(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))]
    assert coco_map(gt, none, [(10, 10)]) == (0.0, 0.0)


def test_bad_specs_are_data_errors(tmp_path):
    from autodfp.errors import DataError

    with pytest.raises(DataError, match="yolo:DIR"):
        parse_detection_spec("voc:/x")
    (tmp_path / "a.png").write_bytes(b"")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("0 0.5 0.5 oops 0.1\n")
    with pytest.raises(DataError, match="a.txt, line 1"):
        read_yolo(tmp_path)
