"""Is a coarse-to-fine synthesis schedule cheaper at equal quality? (issue 13, "a lower resolution first")

A 224-px synthetic batch costs minutes per 64 inputs on a CPU, and a first MobileNet-V1 prune
distils five of them. ``autodfp.synth.distill.distill(..., coarse=c)`` takes the first ``c`` share of
the steps at half the resolution (a quarter of the cost each), then upsamples and finishes at
full size. This script distils the same seed with several schedules and reports each batch's
ZeroQ objective *at full size* (what every later stage sees) and the time it took, so the
schedules can be compared at equal time.

    AUTODFP_ASSETS=/work/shared/assets PYTHONPATH=src python benchmarks/coarse_synthesis.py \
        mobilenet_v1_075_imagenet --n 8 --runs 200@0 100@0 200@0.75
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

import autodfp
from autodfp.models import get_config
from autodfp.synth.distill import bn_stat_loss, distill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a zoo model with BatchNorm")
    ap.add_argument("--n", type=int, default=8, help="inputs per batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs="+", default=["200@0", "100@0", "200@0.75"], help="STEPS@COARSE schedules")
    args = ap.parse_args()
    model = autodfp.create_model(args.model)
    cfg = get_config(args.model)
    shape = (3, *cfg.preprocessing.hw)
    print(
        f"# {args.model} {shape}, n={args.n}, seed {args.seed}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    )
    print(
        f"# {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print("| steps | coarse share | steps at half size | full-size BN loss (initial) | seconds |")
    print("|---:|---:|---:|---|---:|")
    for run in args.runs:
        steps_s, coarse_s = run.split("@")
        steps, coarse = int(steps_s), float(coarse_s)
        t0 = time.perf_counter()
        res = distill(model, shape, n=args.n, steps=steps, seed=args.seed, coarse=coarse)
        seconds = time.perf_counter() - t0
        loss = bn_stat_loss(model, res.images)
        half = int(round(coarse * steps))
        print(f"| {steps} | {coarse:g} | {half} | {loss:.4f} ({res.initial_loss:.3f}) | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
