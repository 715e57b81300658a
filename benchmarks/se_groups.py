"""SE-gated expansion groups: how far each SE model can now be pruned, and a masked = physical check.

For each model (random init, BN statistics from train-mode passes over noise): the number of
prunable groups and SE chains, and the MACs floor with every prunable group at the default
r_min (0.3 and 0.2), with and without the SE chains (the latter is the floor before they were prunable).
Then every SE chain at 0.5 with ``lsq`` on a small input: the physically pruned model against the
masked fast path, and its MACs against the analytic count.

    PYTHONPATH=src python benchmarks/se_groups.py
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.func import functional_call

import autodfp  # noqa: F401  (registers torchvision's missing ops)
from autodfp.analysis.graph import GroupGraph, find_groups
from autodfp.compress.plan import Plan
from autodfp.compress.surgery import Pruner
from autodfp.eval.metrics import profile
from autodfp.search.budget import MacsModel


def _models() -> dict[str, nn.Module]:
    import timm
    import torchvision

    torch.manual_seed(0)
    return {
        "tv mobilenet_v3_small": torchvision.models.mobilenet_v3_small(),
        "tv efficientnet_b0": torchvision.models.efficientnet_b0(),
        "timm mobilenetv3_large_100": timm.create_model("mobilenetv3_large_100"),
    }


@torch.no_grad()
def _calibrate(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        model(torch.randn(8, *shape, generator=g))
    return model.eval()


def _floor(model: nn.Module, graph: GroupGraph, shape: tuple[int, ...], with_se: bool, r_min: float) -> float:
    graph = copy.deepcopy(graph)
    if not with_se:
        for g in graph.groups:
            if g.kind == "se_chain":
                g.prunable = False
    mm = MacsModel(model, graph, shape)
    return mm.min_macs(r_min) / mm.total_macs


def main() -> None:
    for name, model in _models().items():
        model.eval()
        big = (3, 224, 224)
        graph = find_groups(model, big)
        se = [g for g in graph.prunable if g.kind == "se_chain"]
        print(f"{name}: {len(graph.prunable)} prunable groups ({len(se)} SE chains)")
        for r_min in (0.3, 0.2):
            print(
                f"  MACs floor at 224 px, r_min {r_min}: {_floor(model, graph, big, False, r_min):.4f}x without "
                f"SE chains, {_floor(model, graph, big, True, r_min):.4f}x with"
            )
        small = (3, 64, 64)
        model = _calibrate(model, small)
        pruner = Pruner(model, small, calibration=torch.randn(16, *small, generator=torch.Generator().manual_seed(1)))
        plan = Plan({g.name: 0.5 for g in pruner.graph.prunable if g.kind == "se_chain"}, strategy="lsq")
        decisions = pruner.decide(plan)
        pruned = pruner.apply(plan, decisions).model
        x = torch.randn(2, *small, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            diff = (pruned(x) - functional_call(model, pruner.masked_state(decisions), (x,))).abs().max().item()
            scale = model(x).abs().max().item()
        macs, analytic = profile(pruned, small).total_macs, MacsModel(model, pruner.graph, small).macs_for_plan(plan)
        print(
            f"  every SE chain at 0.5 (lsq, 64 px): max |physical - masked| {diff:.2e} (output max {scale:.2e}); "
            f"MACs {macs} == analytic {analytic}: {macs == analytic}"
        )


if __name__ == "__main__":
    main()
