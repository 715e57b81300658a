"""Two diagnostics for pruned detectors (issue 12): what can be pruned, and which head breaks.

``groups``: per zoo detector, the prunable channel groups, the MACs floor with every group at
0.05 of its channels, and the MACs a uniform 0.7 plan keeps (from the analytic MACs model).

``heads``: a pruned face detector against the unpruned one, and two hybrids that take one head's
outputs from each model (pruned scores with the original's boxes, and the reverse), so the loss of
mAP splits into what the classification and the regression head cost.

    AUTODFP_ASSETS=/work/shared/assets PYTHONPATH=src python benchmarks/detector_diag.py groups
    AUTODFP_ASSETS=/work/shared/assets PYTHONPATH=src python benchmarks/detector_diag.py heads \
        ultralight_face_rfb_320 runs/det-0.7 --limit 64
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

import autodfp
from autodfp.analysis.graph import find_groups
from autodfp.models import get_config, load_model
from autodfp.search.budget import MacsModel

DETECTORS = ("ultralight_face_rfb_320", "ultralight_face_slim_320")


def groups() -> None:
    print("| detector | prunable / all groups | MACs floor (every group at 0.05) | uniform 0.7 keeps |")
    print("|---|---|---:|---:|")
    for name in DETECTORS:
        model = autodfp.create_model(name, pretrained=False)
        shape = (3, *get_config(name).preprocessing.hw)
        graph = find_groups(model, shape)
        mm = MacsModel(model, graph, shape)
        floor = mm.macs(mm.ratio_keep(0.05)) / mm.total_macs
        uniform = mm.macs(mm.ratio_keep(0.7)) / mm.total_macs
        print(f"| {name} | {len(graph.prunable)} / {len(graph.groups)} | {floor:.3f}× | {uniform:.3f}× |")


class _Hybrid(nn.Module):
    """Class scores from one detector, box offsets from another."""

    def __init__(self, scores: nn.Module, boxes: nn.Module) -> None:
        super().__init__()
        self.scores, self.boxes = scores, boxes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scores(x)[0], self.boxes(x)[1]


def heads(name: str, pruned_dir: str, limit: int) -> None:
    original = load_model(name)[0].eval()
    pruned = autodfp.load(pruned_dir).eval()
    cfg = get_config(name)
    print(f"# {name}, pruned: {pruned_dir}, {limit} images (reference: the unpruned model's detections)")
    print("| model | mAP@0.5 | mAP@0.5:0.95 | faces kept | detections ≥ 0.5 / reference faces |")
    print("|---|---:|---:|---:|---:|")
    rows = [
        ("pruned", pruned),
        ("pruned scores, original boxes", _Hybrid(pruned, original)),
        ("original scores, pruned boxes", _Hybrid(original, pruned)),
    ]
    for label, model in rows:
        r = autodfp.evaluate(model, model_config=cfg, limit=limit, reference=original)
        print(f"| {label} | {r.map50:.4f} | {r.map50_95:.4f} | {100 * r.recall:.1f} % | {r.detections} / {r.objects} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("groups")
    h = sub.add_parser("heads")
    h.add_argument("model", choices=DETECTORS)
    h.add_argument("pruned", help="an `autodfp prune` output directory")
    h.add_argument("--limit", type=int, default=64)
    args = ap.parse_args()
    if args.cmd == "groups":
        groups()
    else:
        heads(args.model, args.pruned, args.limit)


if __name__ == "__main__":
    main()
