"""Does reconstruction help when a max-pool sits between a group's activation and its consumer?

A random tiny VGG (conv–BN–ReLU ×6 with four 2×2 max-pools and a 2-layer MLP head) gets random BN
affine parameters and BN running statistics from forward passes over CIFAR-10 images (the first
600 of the asset mirror's test batch). The groups behind a max-pool ("pooled") and those feeding
their consumer directly ("plain") are pruned separately at 75 % and 50 % of their channels, with
every reconstruction strategy, with and without refinement (on 64 further images). The error is
the relative logit MSE ``mean((z − z₀)²) / var(z₀)`` on the remaining 317 images (top-1 agreement
is printed too, but a random network's logits are nearly flat, so it is noisy).

    PYTHONPATH=src python benchmarks/maxpool_passthrough.py [--seeds 3]

Results are quoted in :mod:`autodfp.analysis.graph`'s docstring. CPU, about a minute per seed.
"""

from __future__ import annotations

import argparse
import collections
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from autodfp.compress.plan import Plan
from autodfp.compress.refine import refine
from autodfp.compress.surgery import Pruner
from autodfp.data.datasets import read_cifar

CFG = [16, "M", 32, "M", 64, 64, "M", 128, 128, "M"]


def tiny_vgg(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = 3
    for v in CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    net = nn.Sequential(
        nn.Sequential(*layers), nn.Flatten(), nn.Sequential(nn.Linear(c * 4, 64), nn.ReLU(True), nn.Linear(64, 10))
    )
    g = torch.Generator().manual_seed(seed + 100)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.num_features, generator=g))
            m.momentum = None  # cumulative average over the calibration passes
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cifar", default=str(Path(os.environ.get("AUTODFP_ASSETS", "../shared/assets")) / "cifar10"))
    args = ap.parse_args()

    imgs, _ = read_cifar(args.cifar, "test")
    x = torch.tensor(imgs).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1)) / torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)
    calib, fit, test = x[:600], x[600:664], x[700:]

    rows = collections.defaultdict(list)
    for seed in range(args.seeds):
        net = tiny_vgg(seed).train()
        with torch.no_grad():
            for i in range(0, len(calib), 200):
                net(calib[i : i + 200])
            net.eval()
            ref = net(test)
        pruner = Pruner(net, (3, 32, 32))
        sets = {
            "pooled": [g.name for g in pruner.graph.prunable if g.pools],
            "plain": [g.name for g in pruner.graph.prunable if not g.pools and g.kind == "conv"],
        }
        if seed == 0:
            print({k: v for k, v in sets.items()})

        def score(model: nn.Module, ref: torch.Tensor = ref) -> tuple[float, float]:
            with torch.no_grad():
                z = model(test)
            return float(((z - ref) ** 2).mean() / ref.var()), float((z.argmax(1) == ref.argmax(1)).float().mean())

        for which, names in sets.items():
            for ratio in (0.75, 0.5):
                for strategy in ("none", "mean", "autodfp", "lsq"):
                    plan = Plan({n: ratio for n in names}, strategy=strategy)
                    e, a = score(pruner.apply(plan).model)
                    er, ar = score(pruner.apply(plan, refine(pruner, pruner.decide(plan), fit)).model)
                    rows[(which, ratio, strategy)].append((e, a, er, ar))
                    print(
                        f"seed {seed} {which:6s} keep {ratio:.2f} {strategy:8s} err {e:.4f} agree {a:.3f} "
                        f"| refined err {er:.4f} agree {ar:.3f}",
                        flush=True,
                    )

    print(f"\nmean over {args.seeds} seeds")
    print("| groups | keep | strategy | rel. logit MSE | top-1 agreement | MSE, refined | agreement, refined |")
    print("|---|---|---|---|---|---|---|")
    for (which, ratio, strategy), v in rows.items():
        m = np.mean(v, 0)
        print(f"| {which} | {ratio} | {strategy} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f} |")


if __name__ == "__main__":
    main()
