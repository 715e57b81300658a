"""Generality sweep: the structural checks of issue 12 over random-init torchvision/timm models.

For every architecture the random-init model (torchvision ``weights=None``, timm
``pretrained=False``, seed 0) gets BatchNorm statistics from forward passes in train mode over
real images (``--bn-images`` of ``imagenet/val-1300``, cumulative average), then, through the
public API only:

- ``find_groups``: prunable groups (inner / coupled), the unprunable ones with their reasons, and
  the activations found;
- zero-ratio identity: ``prune(uniform=1.0)`` against the model, max |Δ| on 8 evaluation images;
- ``prune(macs_ratio=0.7, search="uniform")`` with the defaults (``lsq`` + refinement) and with
  ``Config(strategy="none", refine=False)``: the MACs ratio reached and the top-1 agreement with the
  unpruned model on ``--eval-images`` other val-1300 images (a dict output: relative L2 error);
- ``save``/``load(model=<unpruned instance>)``: max |Δ| of the reloaded pruned model.

A step that fails reports the exception's one line (an AutoDFPError's message, otherwise
``Class: first line``); the next steps go on where they can. Synthesis is kept cheap (see
:data:`CHEAP`) and each model runs in its own process, one at a time, with a timeout.

    AUTODFP_ASSETS=/work/shared/assets PYTHONPATH=src python benchmarks/generality.py \\
        --out runs/generality.md [--models tv:resnet18 timm:resnet18 ...]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

#: cheap synthesis for the sweep (quoted in the table header)
CHEAP = {"effort": "fast", "synth_steps": 5, "calibration_inputs": 8, "refine_inputs": 8, "reward_inputs": 8}
#: (spec, input px): heavy models run at smaller inputs to keep the sweep near 30 min on 2 cores
MODELS: list[tuple[str, int]] = [
    ("tv:resnet18", 128),
    ("tv:resnet50", 128),
    ("tv:vgg11_bn", 128),
    ("tv:mobilenet_v2", 160),
    ("tv:mobilenet_v3_small", 224),
    ("tv:efficientnet_b0", 128),
    ("tv:regnet_x_400mf", 160),
    ("tv:regnet_y_400mf", 160),
    ("tv:resnext50_32x4d", 128),
    ("tv:shufflenet_v2_x0_5", 224),
    ("tv:densenet121", 128),
    ("tv:convnext_tiny", 128),
    ("tv:squeezenet1_0", 160),
    ("timm:resnet18", 128),
    ("timm:efficientnet_lite0", 160),
    ("timm:mobilenetv3_large_100", 160),
    ("tvdet:fasterrcnn_mobilenet_v3_large_fpn", 160),
]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build(spec: str) -> nn.Module:
    """The random-init model of ``spec`` (``tv:``, ``timm:`` or ``tvdet:`` + name), seed 0, with
    residual branches that start silenced given unit scale (:func:`unsilence`)."""
    kind, _, name = spec.partition(":")
    torch.manual_seed(0)
    if kind == "tv":
        import torchvision

        return unsilence(torchvision.models.get_model(name, weights=None))
    if kind == "timm":
        import timm

        return unsilence(timm.create_model(name, pretrained=False))
    if kind == "tvdet":
        import torchvision

        det = torchvision.models.get_model(name, weights=None, weights_backbone=None)
        return unsilence(det.backbone)
    raise SystemExit(f"error: unknown model kind in '{spec}' (tv:, timm: or tvdet:)")


def unsilence(model: nn.Module) -> nn.Module:
    """Set to 1 the scales that start a residual branch at (almost) zero.

    ConvNeXt's layer scale starts at 1e-6 and timm zero-initialises each residual block's last BN
    scale, so a random-init block adds nothing and pruning inside it changes no output: the
    agreement columns would check nothing there. A trained model's scales are far from zero.
    """
    with torch.no_grad():
        for mod in model.modules():
            for p_name, p in mod.named_parameters(recurse=False):
                zero_bn = isinstance(mod, nn.modules.batchnorm._BatchNorm) and p_name == "weight"
                if (zero_bn or p_name in ("layer_scale", "gamma")) and p.numel() and float(p.abs().max()) <= 1e-5:
                    p.fill_(1.0)
    return model


def images(root: Path, px: int, n_bn: int, n_eval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint, fixed subsets of val-1300, ImageNet preprocessing (resize px/0.875, centre crop)."""
    from PIL import Image

    files = sorted(root.rglob("*.JPEG"))
    if len(files) < n_bn + n_eval:
        raise SystemExit(f"error: {root} has {len(files)} images, need {n_bn + n_eval}")
    order = np.random.default_rng(0).permutation(len(files))
    resize = round(px / 0.875)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    def load(idx: np.ndarray) -> torch.Tensor:
        out = []
        for i in idx:
            im = Image.open(files[int(i)]).convert("RGB")
            w, h = im.size
            s = resize / min(w, h)
            im = im.resize((max(resize, round(w * s)), max(resize, round(h * s))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - px) // 2, (h - px) // 2
            im = im.crop((left, top, left + px, top + px))
            t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out.append((t - mean) / std)
        return torch.stack(out)

    return load(order[:n_bn]), load(order[n_bn : n_bn + n_eval])


@torch.no_grad()
def set_bn_statistics(model: nn.Module, x: torch.Tensor, batch: int = 32) -> int:
    """Running statistics from forward passes in train mode (cumulative average); returns #BN layers."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for i in range(0, len(x), batch):
        model(x[i : i + batch])
    return len(bns)


@torch.no_grad()
def forward(model: nn.Module, x: torch.Tensor, batch: int = 50):
    model.eval()
    outs = [model(x[i : i + batch]) for i in range(0, len(x), batch)]
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    if isinstance(outs[0], (tuple, list)):
        return [torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))]
    return torch.cat(outs)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, (tuple, list)):
        return list(out)
    return [out]


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(_flat(a), _flat(b), strict=True))


def agreement(ref, out) -> tuple[float | None, float]:
    """(top-1 agreement for a logits tensor else None, relative L2 error over all outputs)."""
    num = sum(float((x - y).square().sum()) for x, y in zip(_flat(ref), _flat(out), strict=True))
    den = sum(float(x.square().sum()) for x in _flat(ref))
    rel = (num / den) ** 0.5 if den > 0 else float("nan")
    if isinstance(ref, torch.Tensor) and ref.dim() == 2:
        return float((ref.argmax(1) == out.argmax(1)).double().mean()), rel
    return None, rel


def one_line(exc: BaseException) -> str:
    from autodfp.errors import AutoDFPError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, AutoDFPError) else f"{type(exc).__name__}: {text}"


def run_one(spec: str, px: int, root: Path, n_bn: int, n_eval: int) -> dict:
    import autodfp
    from autodfp.analysis.graph import find_groups
    from autodfp.eval.metrics import profile

    torch.set_num_threads(int(os.environ.get("SWEEP_THREADS", "2")))
    t0 = time.perf_counter()
    row: dict = {"model": spec, "px": px}
    shape = (3, px, px)
    model = build(spec)
    bn_x, ev_x = images(root, px, n_bn, n_eval)
    row["bn_layers"] = set_bn_statistics(model, bn_x)
    model.eval()
    ref = forward(model, ev_x)
    try:
        row["gmacs"] = profile(model, shape).total_macs / 1e9
    except Exception as exc:
        row["gmacs_error"] = one_line(exc)

    try:
        graph = find_groups(model, shape)
        groups = list(graph)
        row["groups"] = len(groups)
        row["inner"] = sum(1 for g in groups if g.prunable and not g.coupled)
        row["coupled_prunable"] = sum(1 for g in groups if g.prunable and g.coupled)
        row["coupled"] = sum(1 for g in groups if g.coupled)
        row["unprunable"] = reason_counts(groups)
        row["activations"] = dict(collections.Counter(g.activation for g in groups if g.prunable).most_common())
        row["unknown_activation"] = sum(1 for g in groups if g.activation == "unknown")
    except Exception as exc:
        row["groups_error"] = one_line(exc)

    name = f"sweep-{spec.replace(':', '-')}-{px}"
    cheap = autodfp.Config(**CHEAP)  # type: ignore[arg-type]
    common = {"input_shape": shape, "progress": False, "name": name}
    try:
        res = autodfp.prune(model, uniform=1.0, config=autodfp.Config(refine=False, **CHEAP), **common)  # type: ignore[arg-type]
        row["zero_ratio_maxdiff"] = max_diff(forward(res.model, ev_x[:8]), _slice(ref, 8))
    except Exception as exc:
        row["zero_ratio_error"] = one_line(exc)

    for key, cfg in (("none", autodfp.Config(strategy="none", refine=False, **CHEAP)), ("lsq", cheap)):  # type: ignore[arg-type]
        t1 = time.perf_counter()
        try:
            res = autodfp.prune(model, macs_ratio=0.7, search="uniform", config=cfg, **common)
            out = forward(res.model, ev_x)
            top1, rel = agreement(ref, out)
            row[f"{key}_macs_ratio"] = res.report["macs_ratio_achieved"]
            row[f"{key}_top1"] = top1
            row[f"{key}_rel_err"] = rel
            row[f"{key}_seconds"] = round(time.perf_counter() - t1, 1)
            if key == "lsq":
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        autodfp.save(res, tmp, plots=False)
                        back = autodfp.load(tmp, model=build(spec))
                        row["reload_maxdiff"] = max_diff(forward(back, ev_x[:8]), forward(res.model, ev_x[:8]))
                    except Exception as exc:
                        row["reload_error"] = one_line(exc)
        except Exception as exc:
            row[f"{key}_error"] = one_line(exc)
            row[f"{key}_seconds"] = round(time.perf_counter() - t1, 1)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _slice(out, n: int):
    if isinstance(out, dict):
        return {k: v[:n] for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return [v[:n] for v in out]
    return out[:n]


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def render(rows: list[dict], command: str, n_bn: int, n_eval: int) -> str:
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cpu = platform.processor() or platform.machine()
    lines = [
        "# Generality sweep (issue 12)",
        "",
        f"Command: `{command}`  ",
        f"Date: {date}; machine: {platform.machine()} {cpu}, {os.cpu_count()} CPUs visible "
        f"({os.environ.get('SWEEP_THREADS', '2')} threads), torch {torch.__version__}.",
        "",
        "Random-init models (torchvision `weights=None`, timm `pretrained=False`, seed 0); BatchNorm "
        f"statistics from train-mode forward passes over {n_bn} val-1300 images; agreement measured on "
        f"{n_eval} other val-1300 images at the input size in the `px` column (all below 224 px except the smallest, to keep the sweep near 30 min on 2 shared cores). **Synthesis kept cheap**: "
        f"`Config({', '.join(f'{k}={v}' for k, v in CHEAP.items())})`; the 0.7× prunes use "
        '`search="uniform"`. "none": `Config(strategy="none", refine=False)`; "lsq+refine": the '
        "defaults. Top-1 agreement is with the unpruned random-init model (flat logits make it "
        "noisy); rel. err is ‖Δout‖/‖out‖ over all outputs (the only measure for a dict output).",
        "",
        "| model | px | GMACs | prunable inner / coupled of all groups | unprunable (reason: n) | activations (prunable) "
        "| zero-ratio max\\|Δ\\| | 0.7× MACs reached (none / lsq+refine) | top-1 agree none / lsq+refine "
        "| rel. err none / lsq+refine | save/reload max\\|Δ\\| | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for r in rows:
        if "crash" in r:
            lines.append(f"| {r['model']} | {r.get('px', '')} | | | | | | | | | | {r['crash']} |")
            continue
        if "groups_error" in r:
            groups = unp = acts = f"**{r['groups_error']}**"
        else:
            groups = f"{r['inner']} / {r['coupled_prunable']} of {r['groups']}"
            unp = "; ".join(f"{k}: {v}" for k, v in r["unprunable"].items()) or "–"
            acts = ", ".join(f"{k}: {v}" for k, v in r["activations"].items()) or "–"
        zero = f"{r['zero_ratio_maxdiff']:.1e}" if "zero_ratio_maxdiff" in r else f"**{r.get('zero_ratio_error')}**"
        cells = {}
        if r.get("none_error") is not None and r.get("none_error") == r.get("lsq_error"):
            r = {**r, "lsq_error": "same"}
        for key in ("none", "lsq"):
            if f"{key}_error" in r:
                cells[key] = (f"**{r[f'{key}_error']}**", "–", "–")
            else:
                ratio = r[f"{key}_macs_ratio"]
                ok = "" if abs(ratio - 0.7) <= 0.01 else " (miss)"  # Config.tol: ±0.01
                cells[key] = (f"{ratio:.3f}{ok}", _fmt(r[f"{key}_top1"]), _fmt(r[f"{key}_rel_err"]))
        if "reload_maxdiff" in r:
            reload = f"{r['reload_maxdiff']:.1e}"
        elif "reload_error" in r:
            reload = f"**{r['reload_error']}**"
        else:
            reload = "–"
        lines.append(
            f"| {r['model']} | {r['px']} | {_fmt(r.get('gmacs'), '.2f')} | {groups} | {unp} | {acts} | {zero} "
            f"| {cells['none'][0]} / {cells['lsq'][0]} | {cells['none'][1]} / {cells['lsq'][1]} "
            f"| {cells['none'][2]} / {cells['lsq'][2]} | {reload} | {r['seconds']:.0f} |"
        )
    lines += ["", *notes]
    return "\n".join(lines) + "\n"


def reason_counts(groups: list) -> dict[str, int]:
    """Unprunable groups per kind of reason (the names of the layers a reason quotes left out)."""
    kinds = (re.sub(r" '[^']*'( \(\d+ groups\))?", "", g.reason) for g in groups if not g.prunable)
    return dict(collections.Counter(kinds).most_common())


def groups_only(specs: list[str], px: int) -> int:
    """Print, per model, the prunable groups, unprunable reasons and activations (random init, eval)."""
    import autodfp  # noqa: F401 - declares torchvision's ops before torchvision is imported
    from autodfp.analysis.graph import find_groups

    for spec in specs:
        spec = spec.partition("=")[0]
        try:
            groups = list(find_groups(build(spec).eval(), (3, px, px)))
            reasons = reason_counts(groups)
            acts = dict(collections.Counter(g.activation for g in groups))
            print(f"{spec}: {sum(g.prunable for g in groups)}/{len(groups)} prunable; {reasons}; {acts}", flush=True)
        except Exception as exc:
            print(f"{spec}: {one_line(exc)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="tv:NAME, timm:NAME or tvdet:NAME[=PX] (default: the issue's list)")
    ap.add_argument("--out", default="runs/generality.md")
    ap.add_argument("--bn-images", type=int, default=64)
    ap.add_argument("--eval-images", type=int, default=200)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model")
    ap.add_argument("--groups-only", type=int, metavar="PX", help="only find_groups at PX on each model (seconds)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model, print its JSON row
    ap.add_argument("--px", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    assets = Path(os.environ.get("AUTODFP_ASSETS", "/work/shared/assets"))
    root = assets / "imagenet" / "val-1300"
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, args.px, root, args.bn_images, args.eval_images)), flush=True)
        return 0
    if args.groups_only:
        return groups_only(args.models or [m for m, _ in MODELS], args.groups_only)
    default_px = dict(MODELS)
    todo = []
    for item in args.models or [m for m, _ in MODELS]:
        spec, _, px = item.partition("=")
        todo.append((spec, int(px) if px else default_px.get(spec, 224)))
    rows = []
    out = Path(args.out)
    command = "python benchmarks/generality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for spec, px in todo:
        cmd = [sys.executable, __file__, "--one", spec, "--px", str(px)]
        cmd += ["--bn-images", str(args.bn_images), "--eval-images", str(args.eval_images)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            if found:
                row = json.loads(found[-1][4:])
            else:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"model": spec, "px": px, "crash": f"process failed: {tail}"}
        except subprocess.TimeoutExpired:
            row = {"model": spec, "px": px, "crash": f"timed out after {args.timeout} s"}
        print(f"{spec} ({time.perf_counter() - t0:.0f} s): {json.dumps(row)}", flush=True)
        rows.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(rows, command, args.bn_images, args.eval_images))
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
