"""Which group's compensation helps or hurts? One group pruned at a time, ``none`` against ``lsq``.

A diagnostic for a model whose fits do harm (issue 12: SE models): every prunable group alone at
``--ratio`` of its channels, no refinement, relative output error against the unpruned model on
real val-1300 images the method never sees. The calibration batch is the pipeline's synthetic one
(``--synth-steps`` and ``--calibration-inputs``), or with ``--real N`` the first N of the images
that set the BN statistics (the ceiling: what the same fit does on real inputs).

    AUTODFP_ASSETS=/work/shared/assets PYTHONPATH=src python benchmarks/per_group.py tv:mobilenet_v3_small \\
        --px 224 [--real 64]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generality import agreement, build, forward, images, set_bn_statistics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="tv:NAME, timm:NAME or tvdet:NAME")
    ap.add_argument("--px", type=int, default=224)
    ap.add_argument("--ratio", type=float, default=0.7)
    ap.add_argument("--synth-steps", type=int, default=20)
    ap.add_argument("--calibration-inputs", type=int, default=16)
    ap.add_argument("--real", type=int, help="calibrate on this many real images instead (not data-free)")
    ap.add_argument("--eval-images", type=int, default=100)
    args = ap.parse_args(argv)

    import autodfp
    from autodfp.api import Pipeline, user_model_config
    from autodfp.compress.plan import Plan
    from autodfp.compress.surgery import Pruner

    torch.set_num_threads(int(os.environ.get("SWEEP_THREADS", "2")))
    root = Path(os.environ.get("AUTODFP_ASSETS", "/work/shared/assets")) / "imagenet" / "val-1300"
    model = build(args.spec)
    bn_x, ev_x = images(root, args.px, 64, args.eval_images)
    set_bn_statistics(model, bn_x)
    model.eval()
    ref = forward(model, ev_x)
    shape = (3, args.px, args.px)
    if args.real:
        pruner = Pruner(model, shape, calibration=bn_x[: args.real], corr_source="calibration")
        source = f"{args.real} real images"
    else:
        cfg = autodfp.Config(synth_steps=args.synth_steps, calibration_inputs=args.calibration_inputs)
        name = f"fs-{args.spec}-{args.px}"  # shares the cache of benchmarks/final_step.py
        pipe = Pipeline(model, user_model_config(model, shape, name), shape, cfg, progress=False)
        pruner = pipe.pruner(synthesising=True)
        source = f"{args.calibration_inputs} synthetic inputs, {args.synth_steps} steps"
    print(f"{args.spec} at {args.px} px, each group alone at {args.ratio}; calibration: {source}")
    print("| group | kind | rel. error, none | rel. error, lsq |")
    print("|---|---|---:|---:|")
    for g in pruner.graph.prunable:
        err = {}
        for strategy in ("none", "lsq"):
            pruned = pruner.apply(Plan({g.name: args.ratio}, strategy=strategy)).model
            err[strategy] = agreement(ref, forward(pruned, ev_x))[1]
        print(f"| {g.name} | {g.kind} | {err['none']:.3f} | {err['lsq']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
