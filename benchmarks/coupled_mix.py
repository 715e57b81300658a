"""Where coupled groups cost accuracy: single streams, and stream width traded for inner width.

Diagnosis for docs/RESULTS.md, "Coupled groups" (the evaluation set is only looked at, nothing is chosen on
it). Uses the pipeline's own synthetic batches (seed 0), lsq, the default refinement (dims ridge 3),
and the masked fast path. Usage::

    AUTODFP_ASSETS=... PYTHONPATH=src python benchmarks/coupled_mix.py resnet20_cifar10
"""

from __future__ import annotations

import sys

from autodfp.api import Pipeline
from autodfp.compress.plan import Plan
from autodfp.config import Config
from autodfp.data.datasets import make_loader, resolve_dataset
from autodfp.eval.metrics import evaluate
from autodfp.models import get_config, load_model
from autodfp.search.budget import MacsModel
from autodfp.search.env import MaskedModel


def main(name: str, target: float = 0.5) -> None:
    net, _ = load_model(name)
    mc = get_config(name)
    s = mc.preprocessing.input_size
    shape = (3, s, s)
    pipe = Pipeline(net, mc, shape, Config(coupled=True), seed=0, device="cpu", progress=False)
    pruner = pipe.pruner(True)
    refiner = pipe.refiner(pruner)
    loader = list(make_loader(resolve_dataset(None, mc), batch_size=256))
    mm = MacsModel(net, pruner.graph, shape)
    streams = [g.name for g in pruner.graph.prunable if g.coupled]
    inner = [g.name for g in pruner.graph.prunable if not g.coupled]

    def top1(plan: Plan) -> tuple[float, float]:
        dec = pruner.decide(plan)
        raw = evaluate(MaskedModel(net, pruner.masked_state(dec)), loader, progress=False).top1
        ref = evaluate(MaskedModel(net, pruner.masked_state(refiner(dec))), loader, progress=False).top1
        return raw, ref

    rows = [(f"stream {g} 0.75 only", {g: 0.75}) for g in streams] + [("inner 0.75 only", {g: 0.75 for g in inner})]
    for s_ratio in (1.0, 0.875, 0.75, 0.625):
        best = min(
            (
                abs(
                    mm.macs_for_plan(Plan({**dict.fromkeys(streams, s_ratio), **dict.fromkeys(inner, k / 100)}))
                    - target * mm.total_macs
                ),
                k / 100,
            )
            for k in range(10, 101)
        )[1]
        rows.append(
            (f"streams {s_ratio}, inner {best}", {**dict.fromkeys(streams, s_ratio), **dict.fromkeys(inner, best)})
        )
    for label, ratios in rows:
        plan = Plan(ratios, strategy="lsq")
        raw, ref = top1(plan)
        print(f"| {label} | {mm.macs_for_plan(plan) / mm.total_macs:.3f} | {raw:.2f} | {ref:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
