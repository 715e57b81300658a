"""Does the per-group final choice pay on a trained model? One plan, refined and chosen both ways.

    AUTODFP_ASSETS=../shared/assets python benchmarks/per_group_choice.py resnet56_cifar10 runs/demo/plan.json

Prunes the model to the given plan with ``final_choice_per_group`` off and on (no distillation, the
``fast`` preset otherwise), and prints for each the global choice, the groups switched, the
held-apart data-free score and the top-1 on the model's default evaluation set.
"""

from __future__ import annotations

import argparse

import autodfp
from autodfp.config import Config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="zoo name")
    ap.add_argument("plan", help="a plan.json for that model")
    args = ap.parse_args(argv)
    print("| per-group pass | global choice | groups switched | held-apart score | top-1 % |")
    print("|---|---|---:|---:|---:|")
    for per_group in (False, True):
        cfg = Config(effort="fast", distill_steps=0, final_choice_per_group=per_group)
        result = autodfp.prune(args.model, plan=args.plan, config=cfg, progress=False)
        metrics = autodfp.evaluate(result.model, model_config=result.model_config)
        top1 = getattr(metrics, "top1", metrics)
        report = result.report
        print(
            f"| {'on' if per_group else 'off'} | {report.get('final_step')} | "
            f"{len(report.get('final_choice_groups', {}))} | {report.get('final_choice_score', float('nan')):.4f} | "
            f"{top1:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
