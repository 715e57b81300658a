"""What each part of the pipeline adds: the issue-13 ablation, one ``autodfp prune`` per row.

Every row is the command a user would type (seed 0, ``--json``), run one after another in this
process's environment; the table gives its top-1, MACs ratio and wall time. The rows build up
from the paper's pipeline alone (SAC choosing ratio and λ, similarity merge with DBSCAN clusters,
no ``lsq``, no refinement) to the full default pipeline and its options. The ``uniform-*`` rows
build up the same stages on the uniform plan at the same MACs, for models where one search per
row costs too long. A row marked
``plan-of`` applies the plan another row found (``--plan``), so an option that only changes the
last stage (distillation) is not charged a second search.

    AUTODFP_ASSETS=/work/shared/assets python benchmarks/ablation.py resnet20_cifar10 \\
        --macs-ratio 0.5 --out runs/ablation-resnet20 [--rows paper,lsq,default,...] \\
        [--real $AUTODFP_ASSETS/cifar10-jpeg/train]

The ceiling rows are the only ones that use real images (unlabelled, never the evaluation set).

Writes ``OUT/ablation.md`` and ``OUT/ablation.json``; each row's own output set is ``OUT/<row>``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

#: row key → (label, extra flags, row whose plan it applies or None)
ROWS: dict[str, tuple[str, list[str], str | None]] = {
    "paper": (
        "paper's pipeline alone: SAC (ratio, λ), autodfp merge + DBSCAN cluster, no lsq, no refinement",
        ["--reconstruct", "autodfp", "--criterion", "cluster", "--no-refine"],
        None,
    ),
    "lsq": ("+ lsq reconstruction (no refinement)", ["--reconstruct", "lsq", "--no-refine"], None),
    "default": ("+ refinement (the default pipeline)", [], None),
    "coupled": ("+ coupled groups (`--coupled`)", ["--coupled"], None),
    "distill": (
        "+ distillation, 500 steps (`--distill 500`, on the default row's plan)",
        ["--distill", "500"],
        "default",
    ),
    "uniform-paper": (
        "uniform plan, the paper's reconstruction alone: autodfp merge + DBSCAN cluster, no lsq, no refinement",
        ["--search", "uniform", "--reconstruct", "autodfp", "--criterion", "cluster", "--no-refine"],
        None,
    ),
    "uniform-lsq": (
        "uniform plan, + lsq reconstruction (no refinement)",
        ["--search", "uniform", "--reconstruct", "lsq", "--no-refine"],
        None,
    ),
    "uniform": ("uniform plan (`--search uniform`), default pipeline", ["--search", "uniform"], None),
    "ceiling": (
        "ceiling: SAC, reward and refinement on real unlabelled images (`--reward unlabeled:REAL --refine-data REAL`)",
        ["--reward", "unlabeled:{real}", "--refine-data", "{real}"],
        None,
    ),
    "uniform-ceiling": (
        "ceiling, uniform plan: refinement and final choice on real unlabelled images",
        ["--search", "uniform", "--reward", "unlabeled:{real}", "--refine-data", "{real}"],
        None,
    ),
    "uniform-distill": (
        "uniform plan + distillation, 500 steps (on the uniform row's plan)",
        ["--distill", "500"],
        "uniform",
    ),
}


def run_row(
    model: str, key: str, macs_ratio: float, episodes: int | None, out: Path, done: dict, real: str | None
) -> dict:
    label, flags, plan_of = ROWS[key]
    if any("{real}" in f for f in flags):
        if real is None:
            return {"row": key, "label": label, "error": "needs --real DIR (unlabelled real images)"}
        flags = [f.replace("{real}", real) for f in flags]
    cmd = ["autodfp", "prune", model, "--effort", "fast", "--seed", "0", "--json", "--out", str(out / key)]
    if plan_of is not None:
        if plan_of not in done or "error" in done[plan_of]:
            return {"row": key, "label": label, "error": f"needs the '{plan_of}' row first"}
        cmd += ["--plan", str(out / plan_of / "plan.json")]
    else:
        cmd += ["--macs-ratio", f"{macs_ratio:g}"]
        if episodes is not None and "--search" not in flags:
            cmd += ["--episodes", str(episodes)]
    cmd += flags
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "autodfp.cli", *cmd[1:]], capture_output=True, text=True, env=os.environ.copy()
    )
    seconds = time.perf_counter() - t0
    row: dict = {"row": key, "label": label, "command": shlex.join(cmd), "seconds": round(seconds, 1)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        row["error"] = tail
        return row
    rep = json.loads(lines[-1])
    for k in ("top1_before", "top1_after", "macs_ratio_achieved", "best_reward", "search_seconds", "final_step"):
        if k in rep:
            row[k] = rep[k]
    return row


def render(model: str, macs_ratio: float, rows: list[dict], argv: list[str]) -> str:
    head = [
        f"### Ablation: {model} at `--macs-ratio {macs_ratio:g}`",
        "",
        f"- command: `python benchmarks/ablation.py {' '.join(argv)}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores; seed 0; no real image is used by the method",
        "",
        "| row | top-1 % | MACs × | best reward | final step | wall s (search s) | command |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    body = []
    for r in rows:
        if "error" in r:
            body.append(f"| {r['label']} | – | – | – | – | {r.get('seconds', '–')} | error: {r['error']} |")
            continue
        search = f" ({r['search_seconds']:.0f})" if "search_seconds" in r else ""
        reward = f"{r['best_reward']:.4f}" if "best_reward" in r else "–"
        body.append(
            f"| {r['label']} | {r.get('top1_after', '–')} | {r.get('macs_ratio_achieved', '–')} | {reward} | "
            f"{r.get('final_step', '–')} | {r['seconds']:.0f}{search} | `{r['command']}` |"
        )
    before = next((r["top1_before"] for r in rows if "top1_before" in r), None)
    tail = ["", f"Unpruned: {before} %."] if before is not None else []
    return "\n".join(head + body + tail) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--macs-ratio", type=float, default=0.5)
    ap.add_argument("--episodes", type=int, help="search episodes (default: the library's)")
    ap.add_argument("--rows", default="paper,lsq,default,coupled,distill,uniform,uniform-distill")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--real", help="unlabelled real images for the ceiling rows (never the evaluation set)")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    for key in keys:
        row = run_row(args.model, key, args.macs_ratio, args.episodes, args.out, done, args.real)
        done[key] = row
        print(json.dumps(row), flush=True)
        (args.out / "ablation.json").write_text(json.dumps(list(done.values()), indent=1) + "\n")
        (args.out / "ablation.md").write_text(render(args.model, args.macs_ratio, list(done.values()), argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
