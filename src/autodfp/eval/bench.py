"""Method × ratio grids on one model: the evidence behind every accuracy claim.

A *method* is ``strategy+criterion`` (``lsq+l1``, ``none+l1`` …). Each grid cell applies the same
uniform plan to the same model and evaluates it on the same cached batches, so differences between
cells are due to the method alone. Results are written as JSON (machine-readable), a Markdown
table (for ``docs/RESULTS.md``) and a PNG of accuracy against MACs, one curve per method.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

from autodfp._io import atomic_path
from autodfp.compress.criteria import criterion_names
from autodfp.compress.plan import Plan
from autodfp.compress.reconstruct import strategy_names
from autodfp.compress.surgery import Pruner
from autodfp.errors import PlanError
from autodfp.eval.metrics import evaluate, profile


@dataclass
class BenchRow:
    method: str
    ratio: float
    top1: float
    top5: float
    macs: int
    params: int
    seconds: float


def parse_method(spec: str) -> tuple[str, str, bool]:
    """``strategy[+criterion][+refine]`` → (strategy, criterion, refine); criterion defaults to l1."""
    parts = spec.split("+")
    refine = parts[-1] == "refine" and len(parts) > 1
    if refine:
        parts = parts[:-1]
    if len(parts) > 2:
        raise PlanError(f"method '{spec}' must look like strategy+criterion[+refine], e.g. lsq+l1+refine")
    strategy = parts[0]
    criterion = parts[1] if len(parts) > 1 else "l1"
    if strategy not in strategy_names():
        raise PlanError(f"unknown strategy '{strategy}' in method '{spec}'; choose from {', '.join(strategy_names())}")
    if criterion not in criterion_names():
        raise PlanError(
            f"unknown criterion '{criterion}' in method '{spec}'; choose from {', '.join(criterion_names())}"
        )
    return strategy, criterion, refine


def run_grid(
    pruner: Pruner,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    methods: Iterable[str],
    ratios: Iterable[float],
    label_offset: int = 0,
    params: dict[str, Any] | None = None,
    progress: Any = None,
    refiner: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[BenchRow, list[BenchRow]]:
    """Evaluate the unpruned baseline and every (method, ratio) cell.

    Methods ending in ``+refine`` need ``refiner`` (:class:`autodfp.compress.refine.Refiner`).
    """
    shape = pruner.input_shape
    t0 = time.perf_counter()
    base_eval = evaluate(pruner.model, batches, label_offset, progress=False)
    base_prof = profile(pruner.model, shape)
    baseline = BenchRow(
        "original",
        1.0,
        base_eval.top1,
        base_eval.top5,
        base_prof.total_macs,
        base_prof.total_params,
        time.perf_counter() - t0,
    )
    rows = []
    for method in methods:
        strategy, criterion, refine = parse_method(method)
        if refine and refiner is None:
            raise PlanError(f"method '{method}' asks for refinement but no refiner was given")
        for ratio in ratios:
            t0 = time.perf_counter()
            plan = Plan.uniform(pruner.graph, ratio, criterion=criterion, strategy=strategy, params=dict(params or {}))
            decisions = pruner.decide(plan)
            if refine and refiner is not None:  # refine without a refiner was refused above
                decisions = refiner(decisions)
            model = pruner.apply(plan, decisions).model
            ev = evaluate(model, batches, label_offset, progress=False)
            prof = profile(model, shape)
            rows.append(
                BenchRow(
                    method, float(ratio), ev.top1, ev.top5, prof.total_macs, prof.total_params, time.perf_counter() - t0
                )
            )
            if progress is not None:
                progress(rows[-1])
    return baseline, rows


def markdown_table(baseline: BenchRow, rows: list[BenchRow]) -> str:
    ratios = sorted({r.ratio for r in rows}, reverse=True)
    methods = list(dict.fromkeys(r.method for r in rows))
    cell = {(r.method, r.ratio): r for r in rows}
    lines = ["| method | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |", "|---|" + "---:|" * len(ratios)]
    macs_line = (
        "| MACs (reduction) | "
        + " | ".join(
            f"{cell[(methods[0], r)].macs / 1e6:.2f} M (−{100 * (1 - cell[(methods[0], r)].macs / baseline.macs):.1f} %)"
            for r in ratios
        )
        + " |"
    )
    lines.append(macs_line)
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{cell[(m, r)].top1:.2f}" for r in ratios) + " |")
    lines.append(
        f"\nOriginal: top-1 {baseline.top1:.2f} %, {baseline.macs / 1e6:.2f} M MACs, "
        f"{baseline.params / 1e6:.3f} M params. Cells: top-1 % after pruning, no data, no fine-tuning."
    )
    return "\n".join(lines) + "\n"


def plot(baseline: BenchRow, rows: list[BenchRow], path: str | os.PathLike, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for m in dict.fromkeys(r.method for r in rows):
        pts = sorted((r.macs / 1e6, r.top1) for r in rows if r.method == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.scatter([baseline.macs / 1e6], [baseline.top1], marker="*", s=120, color="black", label="original", zorder=5)
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def write_report(
    out_dir: str | os.PathLike, model_name: str, data_desc: str, baseline: BenchRow, rows: list[BenchRow], command: str
) -> dict[str, Path]:
    """Write ``bench.md``, ``bench.json`` and ``bench.png`` into ``out_dir`` as one sealed set.

    The files go through :mod:`autodfp.eval.outdir` like a pruned model's: a folder of the user's
    is refused, and the three files land together or not at all.
    """
    from autodfp.eval.outdir import write_output_set

    out = Path(out_dir)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    header = (
        f"## {model_name} — uniform pruning grid\n\n"
        f"- command: `{command}`\n- date: {date.today().isoformat()}\n- machine: {machine}\n"
        f"- evaluation data: {data_desc}\n\n"
    )
    paths = {"markdown": out / "bench.md", "json": out / "bench.json", "plot": out / "bench.png"}
    files = {"bench.md": (header + markdown_table(baseline, rows)).encode()}
    files["bench.json"] = (
        json.dumps(
            {
                "model": model_name,
                "data": data_desc,
                "command": command,
                "machine": machine,
                "baseline": asdict(baseline),
                "rows": [asdict(r) for r in rows],
            },
            indent=2,
        )
        + "\n"
    ).encode()
    with tempfile.TemporaryDirectory() as tmp:
        png = plot(baseline, rows, Path(tmp) / "bench.png", f"{model_name}: top-1 vs MACs (no data, no fine-tuning)")
        files["bench.png"] = png.read_bytes()
    write_output_set(out, files, kind="bench")
    return paths


def cache_batches(loader: Iterable) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode the evaluation set once; every grid cell then reuses the same tensors."""
    return [(x, y) for x, y in loader]
