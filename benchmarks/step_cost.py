"""Seconds per synthesis step and per distillation step, whole batch against micro-batches.

A CPU runs a 224-px CNN faster per image in passes of a few images that stay in cache than in one
pass of 64 (:mod:`autodfp._micro`). Synthesis (the ZeroQ BN loss) and
distillation (the KL of the logits) split their steps so without changing the step: same loss, same
gradient. This times both ways on one zoo model, in one process, alternating, so that the machine's
load weighs on both alike; it also prints how far apart the two ways' losses and gradients are.
Nothing is cached or written; no real image is read.

    AUTODFP_ASSETS=/work/shared/assets PYTHONPATH=src python benchmarks/step_cost.py mobilenet_v1_075_imagenet

A ``tv:`` or ``timm:`` name builds that architecture with random weights at 224 px (as
``benchmarks/generality.py`` does): its running statistics are the initial ones, which is enough to
time a step and to compare the two ways.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from autodfp._micro import micro_batch_size
from autodfp.api import input_shape_of
from autodfp.compress.kd import _backward as kd_backward
from autodfp.models import load_model
from autodfp.synth.distill import _BNMoments, _BNStatLoss, _frozen, bn_layers


def synthesis_step(model: torch.nn.Module, x: torch.Tensor, size: int) -> tuple[float, torch.Tensor]:
    """One step's BN loss and input gradient, as :func:`autodfp.synth.distill.distill` computes them
    (the input prior, the same either way, left out)."""
    x = x.detach().requires_grad_(True)
    if size >= x.shape[0]:
        with _BNStatLoss(bn_layers(model)) as hook:
            model(x)
            loss = hook.pop()
        loss.backward()
    else:
        moments = _BNMoments(bn_layers(model))
        with moments:
            parts = x.split(size)
            loss = moments.loss(model, parts)
        moments.backward(loss)
    assert x.grad is not None
    return float(loss.detach()), x.grad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "model", help="zoo name, e.g. mobilenet_v1_075_imagenet, or tv:NAME / timm:NAME (random init, 224 px)"
    )
    ap.add_argument(
        "--batch", type=int, default=64, help="inputs per step (the pipeline's chunk and distillation batch)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per way and size, after one untimed")
    ap.add_argument("--sizes", default="", help="comma-separated input sides (default: the model's, then half of it)")
    args = ap.parse_args(argv)

    if ":" in args.model:  # tv:/timm: random-init models, as the generality sweep builds them
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from generality import build

        model, (channels, side) = build(args.model).eval(), (3, 224)
    else:
        model, config = load_model(args.model)
        channels, side = input_shape_of(config)[0], input_shape_of(config)[1]
    sides = [int(s) for s in args.sizes.split(",") if s] or [side, side // 2]
    cpu = torch.device("cpu")
    student = copy.deepcopy(model).eval()
    rows = []
    with _frozen(model):
        for s in sides:
            x = torch.randn((args.batch, channels, s, s), generator=torch.Generator().manual_seed(0))
            micro = micro_batch_size(x, cpu)
            ways = {"whole": args.batch, "micro": micro}
            times: dict[str, list[float]] = {"synth whole": [], "synth micro": [], "kd whole": [], "kd micro": []}
            results = {}
            for rep in range(args.repeats + 1):
                for way, size in ways.items():
                    t0 = time.perf_counter()
                    results[way] = synthesis_step(model, x, size)
                    t1 = time.perf_counter()
                    student.zero_grad(set_to_none=True)
                    kd_backward(student, model, x, 4.0, size)
                    t2 = time.perf_counter()
                    if rep:
                        times[f"synth {way}"].append(t1 - t0)
                        times[f"kd {way}"].append(t2 - t1)
            (l_whole, g_whole), (l_micro, g_micro) = results["whole"], results["micro"]
            row = {
                "side": s,
                "micro_batch": micro,
                **{k: round(sum(v) / len(v), 3) for k, v in times.items()},
                "loss_rel_diff": abs(l_micro - l_whole) / abs(l_whole),
                "grad_rel_diff": float((g_micro - g_whole).norm() / g_whole.norm()),
            }
            rows.append(row)
            print(
                f"{s} px, micro-batch {micro}: synthesis {row['synth whole']:.3f} → {row['synth micro']:.3f} s/step, "
                f"distillation {row['kd whole']:.3f} → {row['kd micro']:.3f} s/step; "
                f"loss differs by {row['loss_rel_diff']:.1e}, gradient by {row['grad_rel_diff']:.1e} (relative)",
                flush=True,
            )
    json.dump({"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(), "rows": rows}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
