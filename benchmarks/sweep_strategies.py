"""One generality-sweep model, pruned to 0.7x MACs (uniform plan) with each reconstruction stage.

Where the sweep (``benchmarks/generality.py``) shows reconstruction doing harm, this tells whether
the fit or the sweep's cheap synthesis is to blame: the same random-init model (BN statistics from
64 real images), pruned with no compensation, ``mean``, ``lsq`` without refinement, ``lsq`` with
refinement on the sweep's synthesis (8 inputs, 5 steps) and on a better one (32 inputs, 50 steps).
Each row prints the MACs ratio, top-1 agreement and relative output error against the unpruned
model on 200 other real images, and what the final step chose.

    AUTODFP_ASSETS=/work/shared/assets PYTHONPATH=src python benchmarks/sweep_strategies.py tv:regnet_x_400mf --px 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generality as sweep  # the sweep's model builder, images and measures

ROWS: list[tuple[str, dict]] = [
    ("none", dict(strategy="none", refine=False)),
    ("mean", dict(strategy="mean", refine=False)),
    ("lsq", dict(strategy="lsq", refine=False)),
    ("lsq+refine", dict(strategy="lsq")),
    (
        "lsq+refine, 32 inputs, 50 steps",
        dict(strategy="lsq", synth_steps=50, calibration_inputs=32, refine_inputs=32, reward_inputs=32),
    ),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="tv:NAME, timm:NAME or tvdet:NAME")
    ap.add_argument("--px", type=int, default=128)
    args = ap.parse_args(argv)
    import autodfp

    root = Path(os.environ.get("AUTODFP_ASSETS", "/work/shared/assets")) / "imagenet" / "val-1300"
    torch.manual_seed(0)
    model = sweep.build(args.spec)
    bn_x, ev_x = sweep.images(root, args.px, 64, 200)
    sweep.set_bn_statistics(model, bn_x)
    model.eval()
    ref = sweep.forward(model, ev_x)
    shape = (3, args.px, args.px)
    for key, overrides in ROWS:
        cfg = autodfp.Config(**{**sweep.CHEAP, **overrides})  # type: ignore[arg-type]
        t = time.perf_counter()
        res = autodfp.prune(
            model, input_shape=shape, macs_ratio=0.7, search="uniform", config=cfg, progress=False,
            name=f"strategies-{args.spec.replace(':', '-')}-{args.px}",
        )  # fmt: skip
        top1, rel = sweep.agreement(ref, sweep.forward(res.model, ev_x))
        print(
            f"{key:34s} MACs {res.report['macs_ratio_achieved']:.3f}  top-1 agreement {top1}  rel. err {rel:.3f}  "
            f"final step {res.report.get('final_step')}  {time.perf_counter() - t:.0f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
