"""What one synthetic chunk costs, and how close it gets to the BN statistics, per schedule.

A first prune of a 224-px model spends most of its time distilling inputs (issue 13: ~8 min per
64-input chunk at 200 steps on a 2-core CPU). This distils one chunk of a zoo model with each
low-resolution share (``--shares``: the share of the steps run at half the height and width before
the batch is upsampled and finished at full size) and each count of reduced sizes (``--levels``: 2
runs the first half of those steps at a quarter of the size) and prints, per row, the wall time, the seconds
per step, and the ZeroQ BN loss of the finished batch *at full size* (the objective every share is
judged by: a batch that matched the statistics only at half size would show it here), and the
share of the batch's spectral energy above half the Nyquist frequency (what a half-size start
cannot draw and the full-size steps must add: the first layers' fine-edge filters see only that).
No real image is read.

Each chunk goes through the pipeline's cache (``autodfp.synth.distill.synthetic_batch``, the model's
zoo name as key), so a prune with the same seed and share reads it instead of distilling it again:
the default seed, 1, is the refinement batch of a prune with ``--seed 0``. A chunk that was already
cached is marked so, and its time means nothing.

    AUTODFP_ASSETS=/work/shared/assets PYTHONPATH=src python benchmarks/synth_cost.py mobilenet_v1_075_imagenet --shares 0,0.75
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from autodfp.api import input_shape_of
from autodfp.config import Config
from autodfp.models import load_model
from autodfp.synth.distill import bn_stat_loss, resolve_method, synthetic_batch


def high_frequency_share(images: torch.Tensor) -> float:
    """Share of the spectral energy (the mean of each image excluded) at or above half the Nyquist
    frequency along either axis."""
    power = torch.fft.rfft2(images.double()).abs().pow(2)
    power[..., 0, 0] = 0.0
    fy = torch.fft.fftfreq(images.shape[-2], dtype=torch.float64).abs()[:, None]
    fx = torch.fft.rfftfreq(images.shape[-1], dtype=torch.float64)[None, :]
    high = torch.maximum(fy, fx) >= 0.25
    return float(power[..., high].sum() / power.sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="zoo name, e.g. mobilenet_v1_075_imagenet")
    ap.add_argument("--shares", default="0,0.75", help="comma-separated low-resolution shares")
    ap.add_argument(
        "--levels",
        default="1",
        help="comma-separated counts of reduced sizes (1: half size only; 2: a quarter, then half), each "
        "run with every share (default 1, the rows recorded before two levels existed)",
    )
    ap.add_argument("--n", type=int, default=64, help="inputs in the chunk (default 64, the pipeline's chunk)")
    ap.add_argument("--steps", type=int, default=None, help="steps (default: the pipeline's for this input size)")
    ap.add_argument(
        "--seed", type=int, default=1, help="the batch's seed (default 1: a --seed 0 prune's refinement batch)"
    )
    ap.add_argument("--json", dest="json_out", default=None, help="also write the rows here")
    args = ap.parse_args(argv)

    model, cfg = load_model(args.model)
    shape = input_shape_of(cfg)
    print(f"# {args.model}, input {shape}, n={args.n}, torch threads {torch.get_num_threads()}", flush=True)
    steps = args.steps if args.steps is not None else Config().synth_settings_for(resolve_method(model), shape)[0]
    print(
        "| low-res share | levels | steps | wall s | s/step | BN loss at full size | high-frequency energy | cached |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    shares = [float(v) for v in args.shares.split(",") if v.strip()]
    levels = [int(v) for v in args.levels.split(",") if v.strip()]
    for share, level in ((s, k) for k in levels for s in shares):
        lines: list[str] = []
        start = time.perf_counter()
        images = synthetic_batch(
            model,
            cfg.name,
            shape,
            n=args.n,
            seed=args.seed,
            steps=steps,
            low_res=share,
            low_res_levels=level,
            log=lines.append,
        )
        wall = time.perf_counter() - start
        cached = any("read from the cache" in line for line in lines)
        full = bn_stat_loss(model, images)
        high = high_frequency_share(images)
        row = dict(
            share=share,
            levels=level,
            steps=steps,
            wall_s=wall,
            s_per_step=wall / max(steps, 1),
            bn_loss=full,
            high_frequency_share=high,
            cached=cached,
        )
        rows.append(row)
        print(
            f"| {share:g} | {level} | {steps} | {wall:.1f} | {row['s_per_step']:.2f} | {full:.4f} | {high:.3f} | "
            f"{'yes' if cached else 'no'} |",
            flush=True,
        )
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(dict(model=args.model, n=args.n, seed=args.seed, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
