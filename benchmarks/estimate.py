"""How far the plan of work's time estimate is from the real run, per model and effort preset.

``autodfp prune`` logs a plan of work before it starts, with an estimate of each stage's minutes on
this machine (:mod:`autodfp.workplan`), and records it in report.json as ``work_plan``, beside the
real ``seconds`` and each stage's real seconds (``stage_seconds``). This runs, for every model and
preset given::

    autodfp prune MODEL --macs-ratio R --effort E --seed 0 --json --out DIR [EXTRA...]

(R: 0.5 for the CIFAR ResNets, 0.6647 for MobileNet-V1, the MACs of its uniform 0.8) and prints a
Markdown table: model, preset, estimate, real wall time, the error of the estimate in percent of
the real time, and top-1 after pruning. Each run starts from an empty synthetic-input cache
(``AUTODFP_HOME`` a fresh temporary folder: a cold start, the case the estimate matters most for)
unless ``--home`` names one to share. ``--stages`` adds one row per stage.

A full grid takes hours on a CPU (MobileNet-V1 at ``best`` alone about one); a smoke test passes
tiny settings through::

    AUTODFP_ASSETS=/work/shared/assets PYTHONPATH=src python benchmarks/estimate.py resnet20_cifar10 \\
        --efforts fast -- --synth-steps 2 --episodes 2 --distill 2 --no-eval
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_MODELS = ("resnet20_cifar10", "resnet56_cifar10", "mobilenet_v1_075_imagenet")
DEFAULT_EFFORTS = ("fast", "balanced", "best")
#: the budget each model is pruned to: half the MACs for the CIFAR ResNets, uniform 0.8's for MobileNet-V1
RATIOS = {"mobilenet_v1_075_imagenet": 0.6647}
DEFAULT_RATIO = 0.5


def run_one(model: str, effort: str, home: Path, extra: list[str], keep: Path | None) -> dict[str, Any]:
    """One prune through the CLI; its report's estimate, real seconds and top-1."""
    with tempfile.TemporaryDirectory(prefix="autodfp-estimate-") as tmp:
        out = (keep / f"{model}-{effort}") if keep is not None else Path(tmp) / "out"
        cmd = [sys.executable, "-m", "autodfp.cli", "prune", model]
        cmd += ["--macs-ratio", str(RATIOS.get(model, DEFAULT_RATIO)), "--effort", effort, "--seed", "0"]
        cmd += ["--json", "--out", str(out), *extra]
        env = {**os.environ, "AUTODFP_HOME": str(home), "AUTODFP_PROGRESS": "0"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            return {"model": model, "effort": effort, "error": f"exit {proc.returncode}: {tail[0]}", "wall": wall}
        report = json.loads((out / "report.json").read_text())
        printed = json.loads(proc.stdout.strip().splitlines()[-1])
    plan = report.get("work_plan", {})
    return {
        "model": model,
        "effort": effort,
        "estimate": plan.get("total_seconds"),
        "real": report.get("seconds"),
        "wall": wall,
        "top1": printed.get("top1_after"),
        "stages": {s["name"]: s["seconds"] for s in plan.get("stages", [])},
        "stage_seconds": report.get("stage_seconds", {}),
        "probe_seconds": plan.get("probe_seconds"),
    }


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _error(estimate: float | None, real: float | None) -> str:
    if estimate is None or not real:
        return "–"
    return f"{100 * (estimate - real) / real:+.0f} %"


def table(rows: list[dict[str, Any]], stages: bool) -> str:
    """The Markdown table: one row per run, and with ``stages`` one per stage of each run."""
    lines = [
        "| model | preset | estimate | real | error | top-1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['effort']} | – | – | {r['error']} | – |")
            continue
        top1 = "–" if r["top1"] is None else f"{r['top1']:.2f} %"
        real = r["real"]
        lines.append(
            f"| {r['model']} | {r['effort']} | {_minutes(r['estimate'])} | {_minutes(real)} | "
            f"{_error(r['estimate'], real)} | {top1} |"
        )
        if stages:
            for name, seconds in r["stages"].items():
                done = r["stage_seconds"].get(name)
                lines.append(f"| ↳ {name} | | {_minutes(seconds)} | {_minutes(done)} | {_error(seconds, done)} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=list(DEFAULT_MODELS), help="zoo names (default: the three benchmarks)")
    ap.add_argument("--efforts", default=",".join(DEFAULT_EFFORTS), help="comma-separated presets")
    ap.add_argument("--home", type=Path, default=None, help="a synthetic-input cache to share (default: cold runs)")
    ap.add_argument("--keep", type=Path, default=None, help="keep every run's output folder under this one")
    ap.add_argument("--stages", action="store_true", help="a row per stage too: its estimate against its real time")
    ap.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    extra = argv[cut + 1 :]  # flags after -- go to every prune as they are
    rows = []
    for model in args.models:
        for effort in [e.strip() for e in args.efforts.split(",") if e.strip()]:
            with tempfile.TemporaryDirectory(prefix="autodfp-home-") as cold:
                home = args.home if args.home is not None else Path(cold)
                row = run_one(model, effort, home, extra, args.keep)
            rows.append(row)
            done = f"estimate {_minutes(row.get('estimate'))}, real {_minutes(row.get('real'))}"
            print(f"{model} {effort}: {row.get('error', done)}", file=sys.stderr, flush=True)
    print(table(rows, args.stages))
    if args.json:
        print(json.dumps(rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
