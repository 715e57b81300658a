"""Does the final step's choice (refined / unrefined / uncompensated) follow real-image agreement?

Issue 12 found that on squeeze-and-excitation models a fit can make the pruned model much worse
than no compensation at all, while the synthetic reward did not notice. ``prune`` now scores the
plan refined, unrefined and uncompensated at the end and keeps the reward's best. This script
checks that choice where it matters: random-init SE models (torchvision ``weights=None``, timm
``pretrained=False``, seed 0) whose BN statistics come from forward passes over real images (as in
``benchmarks/generality.py``). For each model it prunes once with the defaults (the final choice
on) and once per candidate with the choice pinned, then measures each candidate's top-1
agreement and relative logit error against the unpruned model on real val-1300 images the method
never sees.

    AUTODFP_ASSETS=/work/shared/assets PYTHONPATH=src python benchmarks/final_step.py --out runs/final_step.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generality import agreement, build, forward, images, set_bn_statistics

#: (spec, input px, uniform ratio): SE models, each at a ratio its unprunable SE/stream groups allow
MODELS: list[tuple[str, int, float]] = [
    ("tv:mobilenet_v3_small", 224, 0.7),
    ("tv:efficientnet_b0", 128, 0.7),
    ("timm:mobilenetv3_large_100", 160, 0.7),
]
#: cheap synthesis, as in the generality sweep (quoted in the output)
CHEAP = {
    "effort": "fast",
    "synth_steps": 20,
    "calibration_inputs": 16,
    "refine_inputs": 16,
    "reward_inputs": 16,
    "select_inputs": 16,
}


def run_model(spec: str, px: int, ratio: float, root: Path, n_bn: int, n_eval: int) -> list[dict]:
    import autodfp

    model = build(spec)
    bn_x, ev_x = images(root, px, n_bn, n_eval)
    set_bn_statistics(model, bn_x)
    model.eval()
    ref = forward(model, ev_x)
    cfg = autodfp.Config(**CHEAP)  # type: ignore[arg-type]
    common = {"input_shape": (3, px, px), "uniform": ratio, "progress": False, "name": f"fs-{spec}-{px}"}
    chosen = autodfp.prune(model, config=cfg, **common)  # type: ignore[arg-type]
    scores = chosen.report.get("final_step_scores", {})
    ridge = chosen.report.get("refine_dims_ridge", 3.0)
    pinned = {
        "refined": cfg.replace(final_choice=False, refine_dims_ridge=ridge),
        "unrefined": cfg.replace(final_choice=False, refine=False),
        "uncompensated": cfg.replace(final_choice=False, refine=False, strategy="none"),
    }
    rows = []
    for label, c in pinned.items():
        t0 = time.perf_counter()
        res = autodfp.prune(model, config=c, **common)  # type: ignore[arg-type]
        top1, rel = agreement(ref, forward(res.model, ev_x))
        rows.append(
            {
                "model": spec,
                "px": px,
                "uniform": ratio,
                "macs_ratio": res.report["macs_ratio_achieved"],
                "candidate": label,
                "reward": scores.get(label),
                "top1_agreement": top1,
                "rel_err": rel,
                "chosen": label == chosen.report.get("final_step"),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    return rows


def render(rows: list[dict], argv: list[str], n_eval: int) -> str:
    lines = [
        "| model (px, uniform) | MACs × | candidate | synthetic reward | top-1 agreement | rel. logit error | chosen |",
        "|---|---:|---|---:|---:|---:|:-:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | – | – | – | – | – | error: {r['error']} |")
            continue
        reward = "–" if r["reward"] is None else f"{r['reward']:.4f}"
        lines.append(
            f"| {r['model']} ({r['px']}, {r['uniform']}) | {r['macs_ratio']:.3f} | {r['candidate']} | {reward} | "
            f"{r['top1_agreement']:.3f} | {r['rel_err']:.3f} | {'✓' if r['chosen'] else ''} |"
        )
    head = [
        f"- command: `python benchmarks/final_step.py {' '.join(argv)}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        f"- synthesis: `Config({', '.join(f'{k}={v}' for k, v in CHEAP.items())})`; agreement on {n_eval} real "
        "val-1300 images the method never sees",
        "",
    ]
    return "\n".join(head + lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/final_step.md"))
    ap.add_argument("--models", nargs="*", help="SPEC=PX=RATIO (default: the SE models above)")
    ap.add_argument("--bn-images", type=int, default=64)
    ap.add_argument("--eval-images", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("SWEEP_THREADS", "2")))
    root = Path(os.environ.get("AUTODFP_ASSETS", "/work/shared/assets")) / "imagenet" / "val-1300"
    todo = MODELS
    if args.models:
        todo = [(s, int(p), float(r)) for s, p, r in (m.split("=") for m in args.models)]
    rows: list[dict] = []
    for spec, px, ratio in todo:
        try:
            rows += run_model(spec, px, ratio, root, args.bn_images, args.eval_images)
        except Exception as exc:  # one line per failed model; the others still run
            rows.append({"model": spec, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"})
        print(json.dumps(rows[-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(rows, argv, args.eval_images))
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
