"""The ``autodfp`` command line.

Every user-caused failure surfaces as one ``error: …`` line on stderr and exit code 2; set
``AUTODFP_DEBUG=1`` to see the traceback of unexpected errors. With ``--json`` the last line of
stdout is one JSON object and all human-readable output goes to stderr, so the command pipes
cleanly into ``jq`` or a benchmark script.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from autodfp.errors import AutoDFPError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Automatic data-free structured pruning of pretrained CNNs (AutoDFP).")

_out = Console()
_err = Console(stderr=True)


def _console(as_json: bool) -> Console:
    return _err if as_json else _out


def _emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


# -- shared options ---------------------------------------------------------------------------
WeightsOpt = typer.Option(None, "--weights", help="Weight file (state dict, or full module with --trust-pickle).")
ArchOpt = typer.Option(None, "--arch", help="package.module:factory building a user model (with --weights).")
TrustOpt = typer.Option(False, "--trust-pickle", help="Allow unpickling a full module (runs arbitrary code).")
LikeOpt = typer.Option(None, "--like", help="Zoo model whose preprocessing/dataset a user model shares.")
DataOpt = typer.Option(None, "--data", help="cifar10:DIR | cifar100:DIR | folder:DIR[:CLASSLIST]; default: the model's own.")
LimitOpt = typer.Option(None, "--limit", help="Evaluate on the first N images only.")
BatchOpt = typer.Option(None, "--batch-size", help="Evaluation batch size (default: 256 for 32-px inputs, 8 for ImageNet-size).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object as the last stdout line.")


def _load(model: str, weights: Optional[str], arch: Optional[str], trust_pickle: bool, like: Optional[str]):
    """Zoo name, user model, or a directory/file written by ``autodfp prune``."""
    from autodfp.models import load_model

    p = Path(model)
    if (p.is_dir() and (p / "pruned.pt").is_file()) or (p.is_file() and p.name == "pruned.pt"):
        from autodfp.eval.export import load_pruned

        net, cfg, _ = load_pruned(p)
        return net, cfg
    return load_model(model, weights=weights, arch=arch, trust_pickle=trust_pickle, like=like)


def _input_shape(cfg) -> tuple[int, int, int]:
    s = cfg.preprocessing.input_size
    return (3, s, s)


def _batch_size(cfg, requested: Optional[int]) -> int:
    """Small batches are several times faster per image for 224-px CNNs on CPU (cache-resident)."""
    if requested is not None:
        return requested
    return 256 if cfg.preprocessing.input_size <= 64 else 8


def _fmt_m(x: float) -> str:
    return f"{x / 1e6:,.2f} M"


# -- commands ---------------------------------------------------------------------------------
@app.command()
def zoo(as_json: bool = JsonOpt) -> None:
    """List the built-in models."""
    from autodfp.models import get_config, list_models

    rows = [get_config(n) for n in list_models()]
    if as_json:
        _emit_json({"models": [c.to_dict() for c in rows]})
        return
    t = Table(title="autodfp model zoo")
    t.add_column("name", no_wrap=True)
    t.add_column("input", justify="right")
    t.add_column("classes", justify="right")
    t.add_column("default data", no_wrap=True)
    t.add_column("description")
    for c in rows:
        d = c.default_dataset
        t.add_row(c.name, str(c.preprocessing.input_size), str(c.num_classes),
                  f"{d.kind}:{d.path}" if d else "-", c.description)
    _out.print(t)


@app.command()
def info(model: str = typer.Argument(..., help="Zoo name, user model, or a pruned output directory."),
         weights: Optional[str] = WeightsOpt, arch: Optional[str] = ArchOpt, trust_pickle: bool = TrustOpt,
         like: Optional[str] = LikeOpt, as_json: bool = JsonOpt) -> None:
    """Per-layer shapes, MACs and params, and the prunable channel groups."""
    from autodfp.analysis.graph import find_groups
    from autodfp.eval.metrics import profile

    net, cfg = _load(model, weights, arch, trust_pickle, like)
    shape = _input_shape(cfg)
    prof = profile(net, shape)
    graph = find_groups(net, shape)
    if as_json:
        _emit_json({"model": cfg.name, "macs": prof.total_macs, "params": prof.total_params,
                    "layers": [lp.__dict__ for lp in prof.layers], "groups": [g.to_dict() for g in graph]})
        return
    t = Table(title=f"{cfg.name}: layers")
    for col in ("layer", "type", "input", "output", "MACs", "params"):
        t.add_column(col, justify="right" if col in ("MACs", "params") else "left")
    for lp in prof.layers:
        shp = lambda s: "x".join(map(str, s[1:])) if s else "-"  # noqa: E731
        t.add_row(lp.name, lp.type, shp(lp.input_shape), shp(lp.output_shape), f"{lp.macs:,}", f"{lp.params:,}")
    t.add_row("total", "", "", "", f"{prof.total_macs:,}", f"{prof.total_params:,}", style="bold")
    _out.print(t)
    g_t = Table(title=f"{cfg.name}: channel groups (torch-pruning dependency graph)")
    for col in ("group", "channels", "kind", "activation", "consumers", "prunable"):
        g_t.add_column(col)
    for g in graph:
        g_t.add_row(g.name, str(g.channels), g.kind, g.activation, ", ".join(g.consumers) or "-",
                    "yes" if g.prunable else f"no: {g.reason}")
    _out.print(g_t)
    _out.print(f"{len(graph.prunable)} prunable groups of {len(graph)}")


@app.command("eval")
def eval_cmd(model: str = typer.Argument(..., help="Zoo name, user model, or a pruned output directory."),
             weights: Optional[str] = WeightsOpt, arch: Optional[str] = ArchOpt, trust_pickle: bool = TrustOpt,
             like: Optional[str] = LikeOpt, data: Optional[str] = DataOpt, limit: Optional[int] = LimitOpt,
             batch_size: Optional[int] = BatchOpt, as_json: bool = JsonOpt) -> None:
    """Top-1/top-5 accuracy, MACs, params and CPU latency of a model."""
    from autodfp.data.datasets import make_loader, resolve_dataset
    from autodfp.eval.metrics import evaluate, latency_table, profile

    net, cfg = _load(model, weights, arch, trust_pickle, like)
    shape = _input_shape(cfg)
    loader = make_loader(resolve_dataset(data, cfg), batch_size=_batch_size(cfg, batch_size), limit=limit)
    res = evaluate(net, loader, label_offset=cfg.label_offset, progress=sys.stderr.isatty())
    prof = profile(net, shape)
    lat = latency_table(net, shape, batch_sizes=(1, 32))
    out = {"model": cfg.name, "top1": round(res.top1, 4), "top5": round(res.top5, 4), "n": res.n,
           "macs": prof.total_macs, "params": prof.total_params,
           "latency_ms_b1": round(lat[1], 3), "latency_ms_b32": round(lat[32], 3)}
    con = _console(as_json)
    t = Table(title=f"{cfg.name}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in (("images", f"{res.n}"), ("top-1", f"{res.top1:.2f} %"), ("top-5", f"{res.top5:.2f} %"),
                 ("MACs", _fmt_m(prof.total_macs)), ("params", _fmt_m(prof.total_params)),
                 ("latency b=1", f"{lat[1]:.2f} ms"), ("latency b=32", f"{lat[32]:.2f} ms")):
        t.add_row(k, v)
    con.print(t)
    if as_json:
        _emit_json(out)


def _needs_calibration(net, corr: str) -> bool:
    from autodfp.synth.distill import bn_layers

    return corr == "calibration" or not bn_layers(net)


@dataclasses.dataclass(frozen=True)
class SynthSettings:
    """Synthetic-input and refinement knobs shared by prune, proxy-check and bench."""

    steps: Optional[int] = None
    ridge: float = 1e-2
    #: None: searches, bench and proxy-check use refine.DEFAULT_DIMS_RIDGE and a prune's final
    #: refinement picks one from refine.DIMS_RIDGE_GRID by the reward
    dims_ridge: Optional[float] = None
    reward_inputs: Optional[int] = None
    refine_inputs: Optional[int] = None

    def __post_init__(self) -> None:
        from autodfp.errors import PlanError

        if self.steps is not None and self.steps < 0:
            raise PlanError(f"--synth-steps must be non-negative, got {self.steps}")
        if self.ridge < 0 or (self.dims_ridge is not None and self.dims_ridge < 0):
            raise PlanError("--refine-ridge and --refine-dims-ridge must be non-negative")
        if self.refine_inputs is not None and self.refine_inputs < 2:
            raise PlanError(f"--refine-inputs must be at least 2, got {self.refine_inputs}")
        if self.reward_inputs is not None and self.reward_inputs < 2:
            raise PlanError(f"--reward-inputs must be at least 2, got {self.reward_inputs}")


def _calibration_batch(net, cfg, shape, seed: int, n: int, quiet: bool, steps: Optional[int] = None):
    """Synthetic inputs (ZeroQ for BN models, the documented fallback otherwise), cached on disk."""
    from autodfp.synth.distill import synthetic_batch

    if not quiet:
        _err.print(f"synthesising {n} inputs from the model, seed {seed} (cached after the first run)…")
    return synthetic_batch(net, cfg.name, shape, n=n, seed=seed, label_offset=cfg.label_offset, steps=steps,
                           progress=sys.stderr.isatty())


#: The refinement batch uses its own seed, apart from the reward's batch (``seed``): a search scores
#: refined plans, and a fit scored on the very inputs it was fitted to would flatter the plans whose
#: fits overfit most.
REFINE_SEED_OFFSET = 1


#: A search refines every candidate plan, at a cost that grows with the batch, so it fits on the first
#: this many refinement inputs (at 224 px: the first distilled chunk); the chosen plan gets them all.
SEARCH_REFINE_INPUTS = 64


def _refiner(pruner, net, cfg, shape, seed: int, quiet: bool, synth: SynthSettings = SynthSettings()):
    from autodfp.compress.refine import DEFAULT_DIMS_RIDGE, Refiner

    n = synth.refine_inputs if synth.refine_inputs is not None else _by_input_size(shape, REFINE_INPUTS)
    batch = _calibration_batch(net, cfg, shape, seed + REFINE_SEED_OFFSET, n, quiet, synth.steps)
    dims_ridge = DEFAULT_DIMS_RIDGE if synth.dims_ridge is None else synth.dims_ridge
    return Refiner(pruner, batch, ridge=synth.ridge, dims_ridge=dims_ridge)


def _search_refiner(refiner):
    """The refiner a search scores candidates with: the final one on at most :data:`SEARCH_REFINE_INPUTS` inputs."""
    from autodfp.compress.refine import Refiner

    if refiner is None or len(refiner.inputs) <= SEARCH_REFINE_INPUTS:
        return refiner
    return Refiner(refiner.pruner, refiner.inputs[:SEARCH_REFINE_INPUTS], ridge=refiner.ridge,
                   max_positions=refiner.max_positions, include_unpruned=refiner.include_unpruned,
                   dims_ridge=refiner.dims_ridge)


def _make_pruner(net, cfg, shape, corr: str, seed: int, calib_n: int, quiet: bool, synthesising: bool = False,
                 synth: SynthSettings = SynthSettings()):
    """``corr="auto"``: measured correlations whenever the synthetic batch exists anyway.

    On ResNet-56, lsq with correlations measured on synthetic inputs beats the filter-geometry
    estimate by 1.4 points at uniform 0.7 and 13.0 points at 0.5 (docs/RESULTS.md), but making the
    batch costs minutes for 224-px models on a CPU, so plain uniform prunes keep the free estimate.
    """
    from autodfp.compress.surgery import Pruner

    if corr == "auto":
        corr = "calibration" if synthesising or _needs_calibration(net, "geometry") else "geometry"
    calib = _calibration_batch(net, cfg, shape, seed, calib_n, quiet, synth.steps) if _needs_calibration(net, corr) else None
    return Pruner(net, shape, calibration=calib, corr_source=corr)


def _eval_batches(cfg, data: Optional[str], limit: Optional[int], batch_size: int):
    from autodfp.eval.bench import cache_batches
    from autodfp.data.datasets import make_loader, resolve_dataset

    return cache_batches(make_loader(resolve_dataset(data, cfg), batch_size=_batch_size(cfg, batch_size), limit=limit))


CriterionOpt = typer.Option("l1", "--criterion", help="Channel selection: l1 | l2 | cluster | random.")
ReconOpt = typer.Option("lsq", "--reconstruct", help="Reconstruction: none | mean | nm | autodfp | lsq.")
CorrOpt = typer.Option("auto", "--corr", help="lsq correlations: geometry (weights) | calibration (synthetic inputs) | "
                       "auto (calibration when synthetic inputs are made anyway: searches, BN-free models).")
SeedOpt = typer.Option(0, "--seed", help="Seed for synthetic inputs, random criteria and the search.")
SynthStepsOpt = typer.Option(None, "--synth-steps", help="Optimisation steps per synthetic batch (default by input "
                             "size: 100 for ≤64 px, 200 for larger; each batch is cached).")
RefineRidgeOpt = typer.Option(1e-2, "--refine-ridge", help="Ridge of the refinement fits, relative to the kept variance.")
RefineDimsRidgeOpt = typer.Option(None, "--refine-dims-ridge",
                                  help="Extra ridge × kept channels / fitted positions (guards wide, low-resolution "
                                       "layers). Default: searches, bench and proxy-check use 3; a prune's final "
                                       "refinement tries 1, 3, 10 and 30 and keeps the one the reward scores best.")
RewardInputsOpt = typer.Option(None, "--reward-inputs", help="Synthetic inputs the reward compares the models on "
                               "(default 256 for ≤64-px inputs, 64 for larger ones).")
RefineInputsOpt = typer.Option(None, "--refine-inputs", help="Synthetic inputs the final refinement fits on (seed + 1; "
                               "default 64 for ≤64-px inputs, 256 for larger; more help wide low-resolution layers "
                               "but cost distillation time). Searches score candidates refined on the first "
                               f"{SEARCH_REFINE_INPUTS}.")
RefineOpt = typer.Option(True, "--refine/--no-refine",
                         help="Re-fit every consumer in forward order on synthetic inputs, so the kept channels also "
                              "absorb the error of earlier layers (data-free; searches score plans after it).")


@app.command()
def prune(model: str = typer.Argument(..., help="Zoo name or user model."),
          uniform: Optional[float] = typer.Option(None, "--uniform", help="One preserved ratio for every prunable group."),
          plan_file: Optional[Path] = typer.Option(None, "--plan", help="A plan JSON (per-group ratios)."),
          macs_ratio: Optional[float] = typer.Option(None, "--macs-ratio", help="Search a plan keeping this fraction of the MACs (0.5 halves them)."),
          search_method: str = typer.Option("sac", "--search", help="With --macs-ratio: sac | uniform | random."),
          episodes: int = typer.Option(300, "--episodes", help="Search episodes (sac, random)."),
          warmup: Optional[int] = typer.Option(None, "--warmup", help="Random-action episodes before SAC learns (default min(50, episodes/4))."),
          reward_spec: str = typer.Option("synthetic", "--reward", help="synthetic | unlabeled:DIR | labeled:SPEC (never the evaluation set)."),
          r_min: Optional[float] = typer.Option(None, "--r-min", help="Smallest preserved ratio the search may choose per group (default: chosen from the budget, at most 0.3)."),
          checkpoint_every: int = typer.Option(25, "--checkpoint-every", help="Write a resumable search checkpoint every K episodes."),
          resume: bool = typer.Option(False, "--resume", help="Continue an interrupted search from OUT/search/."),
          criterion: Optional[str] = typer.Option(None, "--criterion", help="l1 | l2 | cluster | random (default l1, or the plan's)."),
          reconstruct: Optional[str] = typer.Option(None, "--reconstruct", help="none | mean | nm | autodfp | lsq (default lsq, or the plan's)."),
          strength: Optional[float] = typer.Option(None, "--strength", help="Merge strength λ in [0, 1] for autodfp."),
          corr: str = CorrOpt, seed: int = SeedOpt, refine: bool = RefineOpt,
          synth_steps: Optional[int] = SynthStepsOpt, refine_ridge: float = RefineRidgeOpt,
          refine_dims_ridge: Optional[float] = RefineDimsRidgeOpt, reward_inputs: Optional[int] = RewardInputsOpt,
          refine_inputs: Optional[int] = RefineInputsOpt,
          out: Path = typer.Option(..., "--out", help="Output directory (model.ts, pruned.pt, plan.json)."),
          weights: Optional[str] = WeightsOpt, arch: Optional[str] = ArchOpt, trust_pickle: bool = TrustOpt,
          like: Optional[str] = LikeOpt, data: Optional[str] = DataOpt, limit: Optional[int] = LimitOpt,
          batch_size: Optional[int] = BatchOpt, no_eval: bool = typer.Option(False, "--no-eval", help="Skip accuracy evaluation."),
          as_json: bool = JsonOpt) -> None:
    """Prune a model with a uniform ratio or a plan file, reconstruct, and save it."""
    from autodfp.errors import PlanError
    from autodfp.eval.export import save_pruned
    from autodfp.eval.metrics import evaluate, latency_table, profile
    from autodfp.compress.plan import Plan

    if sum(x is not None for x in (uniform, plan_file, macs_ratio)) != 1:
        raise PlanError("give exactly one of --uniform R, --plan plan.json or --macs-ratio R")
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise PlanError(f"--strength must be in [0, 1], got {strength}")
    con = _console(as_json)
    net, cfg = _load(model, weights, arch, trust_pickle, like)
    shape = _input_shape(cfg)
    synth = SynthSettings(synth_steps, refine_ridge, refine_dims_ridge, reward_inputs, refine_inputs)
    pruner = _make_pruner(net, cfg, shape, corr, seed, 64, as_json,
                          synthesising=refine or (macs_ratio is not None and reward_spec == "synthetic"), synth=synth)
    refiner = _refiner(pruner, net, cfg, shape, seed, as_json, synth) if refine else None
    selecting = refiner is not None and synth.dims_ridge is None
    reward = (_reward(net, cfg, shape, reward_spec, data, seed, as_json, synth)
              if macs_ratio is not None or selecting else None)
    search_out: dict[str, Any] = {}
    if macs_ratio is not None:
        plan, search_out = _run_search(net, cfg, shape, pruner, macs_ratio, search_method, episodes, warmup,
                                       reward, seed, criterion or "l1", reconstruct, strength, r_min,
                                       out, checkpoint_every, resume, as_json, _search_refiner(refiner))
    elif plan_file is not None:
        plan = Plan.load(plan_file)
        plan.criterion = criterion or plan.criterion
        plan.strategy = reconstruct or plan.strategy
    else:
        plan = Plan.uniform(pruner.graph, uniform, criterion=criterion or "l1", strategy=reconstruct or "lsq")
    plan.model = cfg.name
    if strength is not None:
        plan.params["strength"] = strength
    if plan.criterion == "random":
        plan.params.setdefault("seed", seed)
    decisions = pruner.decide(plan)
    if selecting:
        decisions, search_out["refine_dims_ridge"] = _select_dims_ridge(pruner, refiner, decisions, reward, con)
    elif refiner is not None:
        decisions = refiner(decisions)
    result = pruner.apply(plan, decisions)
    paths = save_pruned(result, out, cfg, shape, arch=arch)

    before, after = profile(net, shape), profile(result.model, shape)
    lat_b, lat_a = latency_table(net, shape, (1,)), latency_table(result.model, shape, (1,))
    top1_b = top1_a = None
    if not no_eval:
        batches = _eval_batches(cfg, data, limit, batch_size)
        top1_b = evaluate(net, batches, cfg.label_offset, progress=False).top1
        top1_a = evaluate(result.model, batches, cfg.label_offset, progress=False).top1
    t = Table(title=f"{cfg.name}: {plan.strategy} + {plan.criterion}{' + refine' if refine else ''}")
    for col in ("", "before", "after", "ratio"):
        t.add_column(col, justify="right")
    t.add_row("MACs", _fmt_m(before.total_macs), _fmt_m(after.total_macs), f"{after.total_macs / before.total_macs:.3f}")
    t.add_row("params", _fmt_m(before.total_params), _fmt_m(after.total_params),
              f"{after.total_params / before.total_params:.3f}")
    if top1_b is not None:
        t.add_row("top-1", f"{top1_b:.2f} %", f"{top1_a:.2f} %", f"{top1_a - top1_b:+.2f} pt")
    t.add_row("latency b=1", f"{lat_b[1]:.2f} ms", f"{lat_a[1]:.2f} ms", f"speed-up {lat_b[1] / lat_a[1]:.2f}×")
    con.print(t)
    con.print(f"saved: {', '.join(str(p) for p in paths.values())}")
    if as_json:
        _emit_json({**search_out, "refine": refine, "macs_before": before.total_macs, "macs_after": after.total_macs,
                    "macs_ratio_achieved": round(after.total_macs / before.total_macs, 6),
                    "params_before": before.total_params, "params_after": after.total_params,
                    "top1_before": None if top1_b is None else round(top1_b, 4),
                    "top1_after": None if top1_a is None else round(top1_a, 4),
                    "latency_ms_b1_before": round(lat_b[1], 3), "latency_ms_b1_after": round(lat_a[1], 3),
                    "out": str(out)})


#: Synthetic inputs the reward compares on, by input size. On ResNet-56 at 0.5 MACs the proxy
#: check's Spearman rho rises from 0.873 with 64 inputs to 0.896 with 256, and 0.912 with the
#: current refinement defaults (docs/RESULTS.md); at 224 px each input costs ~50x more to distil
#: and to score, so 64 stay the default there.
REWARD_INPUTS = {"small": 256, "large": 64}


#: Synthetic inputs the final refinement fits on, by input size. On MobileNet-V1 at 224 px, 256
#: instead of 64 took the refined uniform 0.8 prune from 51.54 % to 54.38 % (docs/RESULTS.md), for
#: ~30 more minutes of one-off distillation on a 2-core CPU (then cached). Searches score
#: candidates on the first :data:`SEARCH_REFINE_INPUTS` only, so a search costs the same either way.
REFINE_INPUTS = {"small": 64, "large": 256}


def _by_input_size(shape, table: dict[str, int]) -> int:
    from autodfp.synth.distill import size_class

    return table[size_class(shape)]


def _reward_inputs(shape, synth: SynthSettings) -> int:
    if synth.reward_inputs is not None:
        return synth.reward_inputs
    return _by_input_size(shape, REWARD_INPUTS)


def _reward(net, cfg, shape, spec: str, eval_data: Optional[str], seed: int, quiet: bool,
            synth: SynthSettings = SynthSettings()):
    """Build the search reward from ``--reward``; the labelled set must not be the evaluation set."""
    import torch

    from autodfp.data.datasets import UnlabeledImageDir, build_transform, make_loader, resolve_dataset
    from autodfp.errors import DataError, PlanError
    from autodfp.search.rewards import AccuracyReward, AgreementReward

    kind, _, arg = spec.partition(":")
    if kind == "synthetic" and not arg:
        return AgreementReward(net, _calibration_batch(net, cfg, shape, seed, _reward_inputs(shape, synth), quiet,
                                                       synth.steps),
                               label_offset=cfg.label_offset)
    if kind == "unlabeled" and arg:
        ds = UnlabeledImageDir(arg, build_transform(cfg.preprocessing))
        n = min(len(ds), max(256, synth.reward_inputs or 0))
        if n == 0:
            raise DataError(f"no images found under {arg}")
        return AgreementReward(net, torch.stack([ds[i] for i in range(n)]), label_offset=cfg.label_offset)
    if kind == "labeled" and arg:
        if arg == eval_data or (eval_data is None and _is_default_eval(cfg, arg)):
            raise PlanError("--reward labeled: must not use the evaluation set; pass a held-out set")
        loader = make_loader(resolve_dataset(arg, cfg, split="train" if arg.startswith("cifar") else "test"),
                             batch_size=_batch_size(cfg, None), limit=512)
        return AccuracyReward([(x, y) for x, y in loader], label_offset=cfg.label_offset)
    raise PlanError(f"unknown --reward '{spec}'; use synthetic, unlabeled:DIR or labeled:SPEC")


def _is_default_eval(cfg, spec: str) -> bool:
    from autodfp.data.datasets import parse_spec
    from autodfp.models.hub import assets_dir

    ref = cfg.default_dataset
    if ref is None:
        return False
    _, root, _ = parse_spec(spec)
    base = assets_dir()
    return base is not None and root.resolve() == (base / ref.path).resolve()


def _select_dims_ridge(pruner, refiner, decisions, reward, con: Console):
    """The final refinement's dims ridge, chosen by the reward on its own (held-out) inputs."""
    from autodfp.search.env import MaskedModel
    from autodfp.compress.refine import select_dims_ridge

    def score(refined) -> float:
        return reward(MaskedModel(pruner.model, pruner.masked_state(refined)))

    chosen, refined, scores = select_dims_ridge(refiner, decisions, score)
    con.print("refinement dims ridge by reward: " + ", ".join(f"{k:g} → {v:.4f}" for k, v in scores.items())
              + f"; chose {chosen:g}")
    return refined, chosen


def _run_search(net, cfg, shape, pruner, macs_ratio, method, episodes, warmup, reward, seed,
                criterion, reconstruct, strength, r_min, out: Path, checkpoint_every, resume, quiet, refiner=None):
    from autodfp.search.driver import plot_ratios, plot_rewards, search

    params = {"strength": strength} if strength is not None else None
    result = search(pruner, macs_ratio, method=method, episodes=episodes, warmup=warmup, reward=reward, seed=seed,
                    strategy=reconstruct or "lsq", criterion=criterion, params=params,
                    r_min=r_min, checkpoint_dir=out / "search",
                    checkpoint_every=checkpoint_every, resume=resume, progress=not quiet or sys.stderr.isatty(),
                    model_key=cfg.name, refiner=refiner)
    out.mkdir(parents=True, exist_ok=True)
    uniform = search(pruner, macs_ratio, method="uniform", reward=reward, strategy=reconstruct or "lsq",
                     criterion=criterion, progress=False, model_key=cfg.name).best_plan
    plot_ratios(result.best_plan, uniform, out / "ratios.png", title=f"{cfg.name}: preserved ratio per group")
    if result.history:
        plot_rewards(result.history, out / "rewards.png", title=f"{cfg.name}: {method} search")
    from autodfp._io import atomic_write_text

    atomic_write_text(out / "search.json", json.dumps(result.to_dict(), indent=2) + "\n")
    _console(quiet).print(f"search: {method}, {result.episodes} episodes in {result.seconds:.1f} s, best reward "
                          f"{result.best_reward:.4f} (plateau at episode {result.plateau_episode})")
    return result.best_plan, {"episodes": result.episodes, "search_seconds": round(result.seconds, 2),
                              "best_reward": result.best_reward, "plateau_episode": result.plateau_episode,
                              "search": method}


@app.command("proxy-check")
def proxy_check_cmd(model: str = typer.Argument(..., help="Zoo name or user model."),
                    macs_ratio: float = typer.Option(0.5, "--macs-ratio", help="Budget of the sampled plans."),
                    plans: int = typer.Option(50, "--plans", help="Number of random feasible plans (K)."),
                    reward_spec: str = typer.Option("synthetic", "--reward", help="synthetic | unlabeled:DIR | labeled:SPEC."),
                    reconstruct: str = typer.Option("lsq", "--reconstruct", help="Strategy used by the plans."),
                    corr: str = CorrOpt, seed: int = SeedOpt, refine: bool = RefineOpt,
                    synth_steps: Optional[int] = SynthStepsOpt, refine_ridge: float = RefineRidgeOpt,
                    refine_dims_ridge: Optional[float] = RefineDimsRidgeOpt, reward_inputs: Optional[int] = RewardInputsOpt,
                    refine_inputs: int = typer.Option(SEARCH_REFINE_INPUTS, "--refine-inputs",
                                                      help="Synthetic inputs each plan is refined on (seed + 1); "
                                                           "the default is what searches score candidates with."),
                    out: Path = typer.Option(Path("runs/proxy"), "--out", help="Directory for proxy.png/json."),
                    weights: Optional[str] = WeightsOpt, arch: Optional[str] = ArchOpt, trust_pickle: bool = TrustOpt,
                    like: Optional[str] = LikeOpt, data: Optional[str] = DataOpt, limit: Optional[int] = LimitOpt,
                    batch_size: Optional[int] = BatchOpt, as_json: bool = JsonOpt) -> None:
    """Can the data-free reward be trusted? Spearman ρ of reward vs real accuracy over K plans."""
    from autodfp._io import atomic_write_text
    from autodfp.eval.metrics import evaluate
    from autodfp.search.driver import plot_proxy, proxy_check

    net, cfg = _load(model, weights, arch, trust_pickle, like)
    shape = _input_shape(cfg)
    synth = SynthSettings(synth_steps, refine_ridge, refine_dims_ridge, reward_inputs, refine_inputs)
    pruner = _make_pruner(net, cfg, shape, corr, seed, 64, as_json, synthesising=refine or reward_spec == "synthetic",
                          synth=synth)
    refiner = _refiner(pruner, net, cfg, shape, seed, as_json, synth) if refine else None
    reward = _reward(net, cfg, shape, reward_spec, data, seed, as_json, synth)
    batches = _eval_batches(cfg, data, limit, batch_size)
    acc = lambda m: evaluate(m, batches, cfg.label_offset, progress=False).top1  # noqa: E731
    rho, rewards, accs = proxy_check(pruner, reward, acc, macs_ratio, k=plans, seed=seed, strategy=reconstruct,
                                     progress=not as_json or sys.stderr.isatty(), refiner=refiner)
    out.mkdir(parents=True, exist_ok=True)
    plot_proxy(rewards, accs, out / "proxy.png", title=f"{cfg.name} @ {macs_ratio:g} MACs: Spearman ρ = {rho:.3f}")
    atomic_write_text(out / "proxy.json", json.dumps({"model": cfg.name, "macs_ratio": macs_ratio, "plans": plans,
                                                       "reward": reward_spec, "refine": refine,
                                                       "refine_inputs": len(refiner.inputs) if refiner else 0,
                                                       "rho": rho,
                                                       "rewards": rewards,
                                                       "top1": accs}, indent=2) + "\n")
    _console(as_json).print(f"Spearman ρ (reward vs top-1, {plans} plans) = {rho:.3f}; top-1 range "
                            f"{min(accs):.2f}–{max(accs):.2f} %; wrote {out / 'proxy.png'}")
    if as_json:
        _emit_json({"model": cfg.name, "rho": rho, "plans": plans, "top1_min": min(accs), "top1_max": max(accs)})


@app.command()
def bench(model: str = typer.Argument(..., help="Zoo name or user model."),
          ratios: str = typer.Option("0.9,0.7,0.5", "--ratios", help="Comma-separated uniform preserved ratios."),
          methods: str = typer.Option("none+l1,mean+l1,nm+l1,autodfp+l1,lsq+l1,lsq+l1+refine", "--methods",
                                      help="Comma-separated strategy+criterion[+refine]; +refine adds the "
                                           "sequential drift correction on synthetic inputs."),
          strength: float = typer.Option(1.0, "--strength", help="Merge strength λ for autodfp."),
          corr: str = CorrOpt, seed: int = SeedOpt,
          synth_steps: Optional[int] = SynthStepsOpt, refine_ridge: float = RefineRidgeOpt,
          refine_dims_ridge: Optional[float] = RefineDimsRidgeOpt, refine_inputs: Optional[int] = RefineInputsOpt,
          out: Path = typer.Option(Path("runs/bench"), "--out", help="Directory for bench.md/json/png."),
          weights: Optional[str] = WeightsOpt, arch: Optional[str] = ArchOpt, trust_pickle: bool = TrustOpt,
          like: Optional[str] = LikeOpt, data: Optional[str] = DataOpt, limit: Optional[int] = LimitOpt,
          batch_size: Optional[int] = BatchOpt) -> None:
    """Grid of methods × uniform ratios: Markdown table and accuracy-vs-MACs plot."""
    from autodfp.eval.bench import parse_method, run_grid, write_report
    from autodfp.errors import PlanError

    try:
        ratio_list = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise PlanError(f"--ratios must be comma-separated numbers, got '{ratios}'") from None
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    for m in method_list:
        parse_method(m)
    net, cfg = _load(model, weights, arch, trust_pickle, like)
    shape = _input_shape(cfg)
    refining = any(parse_method(m)[2] for m in method_list)
    synth = SynthSettings(synth_steps, refine_ridge, refine_dims_ridge, refine_inputs=refine_inputs)
    pruner = _make_pruner(net, cfg, shape, corr, seed, 64, False, synthesising=refining, synth=synth)
    refiner = _refiner(pruner, net, cfg, shape, seed, False, synth) if refining else None
    batches = _eval_batches(cfg, data, limit, batch_size)
    n = sum(len(y) for _, y in batches)

    def report(row) -> None:
        _err.print(f"  {row.method:16s} ratio {row.ratio:<5g} top-1 {row.top1:6.2f} %  MACs {row.macs / 1e6:8.2f} M"
                   f"  ({row.seconds:.1f} s)")

    baseline, rows = run_grid(pruner, batches, method_list, ratio_list, cfg.label_offset,
                              params={"strength": strength}, progress=report, refiner=refiner)
    data_desc = f"{data or 'default dataset of ' + cfg.name} ({n} images)"
    command = "autodfp bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else f"autodfp bench {model}"
    paths = write_report(out, cfg.name, data_desc, baseline, rows, command)
    _out.print(paths["markdown"].read_text())
    _out.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def main(argv: list[str] | None = None) -> int:
    """Entry point. Typer's standalone mode handles usage errors (exit 2) and ``--help``."""
    try:
        app(args=argv, prog_name="autodfp")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        _err.print("interrupted")
        return 130
    except AutoDFPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not bad input: keep it to one line unless debugging
        if os.environ.get("AUTODFP_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"internal error: {exc.__class__.__name__}: {msg} (set AUTODFP_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
