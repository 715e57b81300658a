"""How well the plan of work's distillation probe predicts a real distillation step, in one process.

The plan of work (:mod:`autodfp.workplan`) times a distillation step before anything is pruned, on
a copy of the model pruned uniformly to the budget. This script times, one after another in one
process (so load shifts all three alike), that probe, the same probe on the real pruned student
of a finished run, and the real step of :func:`autodfp.compress.kd.distill` on that student:

    AUTODFP_ASSETS=../shared/assets python benchmarks/estimate_probe.py resnet56_cifar10 runs/r56 --share 0.5

Prints seconds per step of 64 inputs for each.
"""

from __future__ import annotations

import argparse
import time

import torch

import autodfp
from autodfp.analysis.graph import find_groups
from autodfp.api import input_shape_of
from autodfp.compress.kd import distill
from autodfp.compress.surgery import Pruner
from autodfp.models import load_model
from autodfp.workplan import _Probe, _uniform_student


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="zoo name of the unpruned model")
    ap.add_argument("pruned", help="output directory of a prune of that model")
    ap.add_argument("--share", type=float, default=0.5, help="the prune's MACs ratio")
    ap.add_argument("--steps", type=int, default=30, help="real distillation steps timed (the first 5 are warm-up)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    teacher, config = load_model(args.model)
    teacher.eval()
    pruned = autodfp.load(args.pruned).eval()
    shape = input_shape_of(config)
    graph = find_groups(teacher, shape)
    small = _uniform_student(Pruner(teacher, shape, graph=graph), graph, args.share, None)
    assert small is not None, "no uniform student at this share"
    probe = _Probe(teacher, torch.device("cpu"), shape, True)
    batch = probe.batch_size(shape)
    uniform = probe.distillation_step(2.0, small) * batch
    searched = probe.distillation_step(2.0, pruned) * batch
    stamps: list[float] = []
    distill(
        pruned,
        teacher,
        torch.randn(9 * batch, *shape),
        args.steps,
        callback=lambda _step, _loss: stamps.append(time.perf_counter()),
    )
    real = (stamps[-1] - stamps[4]) / (len(stamps) - 5)
    print(
        f"seconds per step of {batch}: probe on the uniform student {uniform:.3f}, "
        f"probe on the pruned student {searched:.3f}, real distillation step {real:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
