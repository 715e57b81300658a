"""The ``autodfp`` command line: parse flags, build the :class:`~autodfp.config.Config`, call the
API (:mod:`autodfp.api`), render tables and JSON.

Every user-caused failure, usage errors included, surfaces as one ``error: …`` line on stderr and
exit code 2; set ``AUTODFP_DEBUG=1`` to see the traceback of unexpected errors. With ``--json`` the
last line of stdout is one JSON object and all human-readable output goes to stderr, so the
command pipes cleanly into ``jq`` or a benchmark script. Progress (distillation, search,
refinement) always goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from autodfp.errors import AutoDFPError, PlanError, printable

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Automatic data-free structured pruning of pretrained CNNs (AutoDFP).",
)


class _PrintableConsole(Console):
    """A rich console that escapes control characters in the strings it prints (file and folder
    names a user chose); rich itself strips only a few (BEL, backspace), not ESC."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(printable(o) if isinstance(o, str) else o for o in objects), **kwargs)


# Outside a terminal rich assumes 80 columns and folds table cells (group names) to fit; a log or a
# pipe has no width, so it gets every name whole.
_out = _PrintableConsole(width=None if sys.stdout.isatty() else 400)
_err = _PrintableConsole(stderr=True, width=None if sys.stderr.isatty() else 400)


def _console(as_json: bool) -> Console:
    return _err if as_json else _out


def _emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(_json_safe(obj), sort_keys=False, allow_nan=False) + "\n")
    sys.stdout.flush()


def _json_safe(obj: Any) -> Any:
    """NaN/Inf are not JSON: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _notice(msg: str) -> None:
    print(printable(msg), file=sys.stderr, flush=True)  # one line, never wrapped: scripts match it


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C for the length of the block (or of the command it decorates).

    ``kill``, a batch scheduler's time limit and a container's stop send SIGTERM, whose default
    kills the process at once: no message, the lock not released. Raised as ``KeyboardInterrupt``
    in the main thread, it unwinds like Ctrl-C: the search keeps its last checkpoint for
    ``--resume``, OUT is unlocked, and :func:`main` prints ``interrupted`` and exits 130. The
    previous handler comes back afterwards. Outside the main thread (where Python cannot install
    handlers) the block runs unchanged.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _out_path(text: str) -> Path:
    """``--out`` parsed from its raw text, so an empty one is refused (``Path("")`` would be ``.``)."""
    from autodfp.eval.outdir import output_path

    return output_path(text)


# -- flags → config ------------------------------------------------------------------------------
#: config field → the flag that sets it, so library messages (which name parameters) read as flags
FLAGS = {
    "effort": "--effort",
    "synth_steps": "--synth-steps",
    "synth_method": "--synth-method",
    "synth_low_res": "--synth-low-res",
    "synth_low_res_levels": "--synth-low-res-levels",
    "refine_ridge": "--refine-ridge",
    "refine_dims_ridge": "--refine-dims-ridge",
    "reward_inputs": "--reward-inputs",
    "refine_inputs": "--refine-inputs",
    "strength": "--strength",
    "cluster_eps_quantile": "--cluster-eps-quantile",
    "criterion": "--criterion",
    "strategy": "--reconstruct",
    "corr": "--corr",
    "search": "--search",
    "episodes": "--episodes",
    "warmup": "--warmup",
    "r_min": "--r-min",
    "checkpoint_every": "--checkpoint-every",
    "eval_batch_size": "--batch-size",
    "macs_ratio": "--macs-ratio",
    "uniform": "--uniform",
    "seed": "--seed",
    "device": "--device",
    "distill_steps": "--distill",
    "distill_inputs": "--distill-inputs",
    "distill_lr": "--distill-lr",
    "distill_fresh": "--distill-fresh",
    "distill_compete": "--distill-compete",
    "distill_features": "--distill-features",
    "reward_tail": "--reward-tail",
    "refine_data": "--refine-data",
    "workers": "--workers",
    "ray_address": "--ray-address",
}


def _as_flags(msg: str) -> str:
    """``refine_ridge must be …`` → ``--refine-ridge must be …``, ``unknown synth_method …`` →
    ``unknown --synth-method …`` (only the subject is a parameter name)."""
    lead = "unknown " if msg.startswith("unknown ") else ""
    field = msg[len(lead) :].split(" ", 1)[0]
    return lead + FLAGS[field] + msg[len(lead) + len(field) :] if field in FLAGS else msg


def _config(**flags: Any):
    """The :class:`Config` of the flags the user gave (``None`` keeps the library default)."""
    from autodfp.config import Config

    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return Config(**given)
    except PlanError as exc:
        raise PlanError(_as_flags(str(exc))) from None


def _checked(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except PlanError as exc:
        raise PlanError(_as_flags(str(exc))) from None


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is *when it emits*: ``main()`` may run many
    times in one process (tests, notebooks) with stderr replaced in between, and a handler holding
    the first stream would write to a closed file."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _PrintableFormatter(logging.Formatter):
    """Library messages name user files: their control characters are escaped, never sent raw."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def _setup_logging() -> None:
    """Library messages (``autodfp`` logger) as plain lines on stderr, with or without --json."""
    logger = logging.getLogger("autodfp")
    if not any(getattr(h, "_autodfp_cli", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_PrintableFormatter("%(message)s"))
        setattr(handler, "_autodfp_cli", True)  # noqa: B010 (a marker attribute on a stdlib object)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


# -- shared options ---------------------------------------------------------------------------
ReparameterizeOpt = typer.Option(
    None,
    "--reparameterize/--no-reparameterize",
    help="Fold training-time branches (RepVGG, MobileOne: reparameterize()/switch_to_deploy()) into single "
    "convs first, checked to compute the same; the pruned model is the folded one (default: off).",
)

WeightsOpt = typer.Option(None, "--weights", help="Weight file (state dict, or full module with --trust-pickle).")
ArchOpt = typer.Option(
    None,
    "--arch",
    help="package.module:factory building a user model (with --weights); "
    "modules are found in the current directory too. For a pruned directory: rebuild it with "
    "this factory instead of loading its TorchScript.",
)
TrustOpt = typer.Option(False, "--trust-pickle", help="Allow unpickling a full module (runs arbitrary code).")
LikeOpt = typer.Option(None, "--like", help="Zoo model whose preprocessing/dataset a user model shares.")
InputSizeOpt = typer.Option(
    None, "--input-size", help="Input height = width of a user model (default 224, or --like's)."
)
MeanOpt = typer.Option(None, "--mean", help="Per-channel mean of a user model's preprocessing, e.g. 0.485,0.456,0.406.")
StdOpt = typer.Option(None, "--std", help="Per-channel std of a user model's preprocessing, e.g. 0.229,0.224,0.225.")
DataOpt = typer.Option(
    None, "--data", help="cifar10:DIR | cifar100:DIR | folder:DIR[:CLASSLIST]; default: the model's own."
)
LimitOpt = typer.Option(None, "--limit", help="Evaluate on the first N images only.")
BatchOpt = typer.Option(
    None, "--batch-size", help="Evaluation batch size (default: 256 for 32-px inputs, 8 for ImageNet-size)."
)
JsonOpt = typer.Option(False, "--json", help="Print one JSON object as the last stdout line.")
DeviceOpt = typer.Option(
    "auto",
    "--device",
    help="auto | cpu | cuda | mps: where distillation, rewards, refinement "
    "and evaluation run (auto: CUDA, then MPS, then CPU).",
)


def _floats3(text: Optional[str], flag: str) -> Optional[tuple[float, float, float]]:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise PlanError(f"{flag} must be three comma-separated numbers, got '{text}'") from None
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise PlanError(f"{flag} must be three finite comma-separated numbers, got '{text}'")
    if flag == "--std" and min(vals) <= 0:
        raise PlanError(f"--std must be positive, got '{text}'")
    return vals[0], vals[1], vals[2]


def _load(
    model: str,
    weights: Optional[str],
    arch: Optional[str],
    trust_pickle: bool,
    like: Optional[str],
    input_size: Optional[int] = None,
    mean: Optional[str] = None,
    std: Optional[str] = None,
):
    """Zoo name, user model, or a directory/file written by ``autodfp prune``."""
    from dataclasses import replace

    from autodfp.models import load_model
    from autodfp.models.load import check_finite

    p = Path(model)
    if (p.is_dir() and (p / "pruned.pt").is_file()) or (p.is_file() and p.name == "pruned.pt"):
        from autodfp.eval.export import load_pruned

        if weights is not None or trust_pickle:
            raise PlanError("--weights and --trust-pickle do not apply to a pruned directory (its weights are in it)")
        net, cfg, _ = load_pruned(p, arch=arch)
        if like is not None:  # a directory saved from Python may carry a guessed preprocessing
            from autodfp.models.registry import get_config

            base = get_config(like)
            cfg = replace(
                cfg,
                preprocessing=base.preprocessing,
                label_offset=base.label_offset,
                default_dataset=base.default_dataset,
                num_classes=base.num_classes,
            )
    elif p.is_dir() and (p / "model.ts").is_file():
        raise AutoDFPError(f"{p} holds no pruned.pt: it is not a complete autodfp output directory")
    else:
        net, cfg = load_model(model, weights=weights, arch=arch, trust_pickle=trust_pickle, like=like)
    m, s = _floats3(mean, "--mean"), _floats3(std, "--std")
    if input_size is not None or m is not None or s is not None:
        from autodfp.models.registry import check_preprocessing

        pre = cfg.preprocessing
        pre = replace(
            pre,
            input_size=pre.input_size if input_size is None else input_size,
            mean=m or pre.mean,
            std=s or pre.std,
            resize=pre.resize if input_size is None else None,
            guessed=pre.guessed and (m is None or s is None),
        )
        # the one check of these fields, shared with the pruned.pt loader (bounds, 3 values, std > 0)
        flags = {"input_size": "--input-size", "mean": "--mean", "std": "--std"}
        cfg = replace(cfg, preprocessing=check_preprocessing(pre, error=PlanError, names=flags))
    check_finite(net, weights or model)
    return net, cfg


def _fmt_m(x: float) -> str:
    return f"{x / 1e6:,.2f} M"


def _progress_on() -> bool:
    return os.environ.get("AUTODFP_PROGRESS", "1") != "0"


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
        t.add_row(
            c.name,
            "x".join(map(str, c.preprocessing.input_hw))
            if c.preprocessing.input_hw
            else str(c.preprocessing.input_size),
            str(c.num_classes),
            f"{d.kind}:{d.path}" if d else "-",
            c.description,
        )
    _out.print(t)


@app.command()
def info(
    model: str = typer.Argument(..., help="Zoo name, user model, or a pruned output directory."),
    weights: Optional[str] = WeightsOpt,
    arch: Optional[str] = ArchOpt,
    trust_pickle: bool = TrustOpt,
    like: Optional[str] = LikeOpt,
    input_size: Optional[int] = InputSizeOpt,
    reparameterize: Optional[bool] = ReparameterizeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Per-layer shapes, MACs and params, and the prunable channel groups."""
    import torch

    from autodfp.analysis.graph import find_groups
    from autodfp.api import input_shape_of
    from autodfp.eval.metrics import profile

    net, cfg = _load(model, weights, arch, trust_pickle, like, input_size)
    shape = input_shape_of(cfg)
    if arch is not None and not Path(model).is_dir():  # a user model built here, not a saved set
        if weights is None:
            _notice("warning: no --weights: the model has the factory's random weights (shapes are right, values not)")
        if input_size is None and like is None:
            _notice(f"warning: no --input-size: assuming {shape[1]}x{shape[2]} inputs; MACs depend on it")
    if reparameterize and not isinstance(net, torch.jit.ScriptModule):
        from autodfp.models.reparam import reparameterize as fold

        net = _checked(fold, net, shape)  # what `prune --reparameterize` prunes
    prof = profile(net, shape)
    if isinstance(net, torch.jit.ScriptModule):
        msg = (
            f"{model} is loaded from its TorchScript (its architecture is not rebuilt from code): totals only; "
            "pass --arch package.module:factory for layers and groups"
        )
        if as_json:
            _err.print(msg)
            _emit_json(
                {"model": cfg.name, "macs": prof.total_macs, "params": prof.total_params, "layers": [], "groups": None}
            )
        else:
            _out.print(f"{cfg.name}: {prof.total_macs:,} MACs, {prof.total_params:,} params\n{msg}")
        return
    graph = find_groups(net, shape)
    if as_json:
        _emit_json(
            {
                "model": cfg.name,
                "macs": prof.total_macs,
                "params": prof.total_params,
                "layers": [lp.__dict__ for lp in prof.layers],
                "groups": [g.to_dict() for g in graph],
            }
        )
        return
    t = Table(title=f"{cfg.name}: layers")
    for col in ("layer", "type", "input", "output", "MACs", "params"):
        t.add_column(col, justify="right" if col in ("MACs", "params") else "left")
    for lp in prof.layers:
        shp = lambda s: "x".join(map(str, s[1:])) if s else "-"
        t.add_row(lp.name, lp.type, shp(lp.input_shape), shp(lp.output_shape), f"{lp.macs:,}", f"{lp.params:,}")
    t.add_row("total", "", "", "", f"{prof.total_macs:,}", f"{prof.total_params:,}", style="bold")
    _out.print(t)
    g_t = Table(title=f"{cfg.name}: channel groups (torch-pruning dependency graph)")
    for col in ("group", "channels", "kind", "activation", "consumers", "prunable"):
        g_t.add_column(col)
    for g in graph:
        g_t.add_row(
            g.name,
            # a grouped conv's channels leave in equal numbers per conv group
            str(g.channels) if g.granularity == 1 else f"{g.channels} ({g.granularity} groups of {g.units})",
            g.kind,
            g.activation,
            ", ".join(g.consumers) or "-",
            "yes" if g.prunable else f"no: {g.reason}",
        )
    _out.print(g_t)
    _out.print(f"{len(graph.prunable)} prunable groups of {len(graph)}")


def _eval_batches(cfg, data: Optional[str], limit: Optional[int], batch_size: int):
    from autodfp.data.datasets import make_loader, resolve_dataset
    from autodfp.eval.bench import cache_batches

    return cache_batches(make_loader(resolve_dataset(data, cfg, limit=limit), batch_size=batch_size, limit=limit))


def _check_run(seed: int, device: str, limit: Optional[int], batch_size: Optional[int]) -> None:
    """The checks every command that does work runs first, before loading anything."""
    from autodfp._checks import check_seed
    from autodfp.api import resolve_device

    _checked(check_seed, seed)
    _checked(resolve_device, device)
    _check_limit(limit, batch_size)


def _check_limit(limit: Optional[int], batch_size: Optional[int]) -> None:
    if limit is not None and limit < 1:
        raise PlanError(f"--limit must be at least 1, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise PlanError(f"--batch-size must be at least 1, got {batch_size}")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Zoo name, user model, or a pruned output directory."),
    weights: Optional[str] = WeightsOpt,
    arch: Optional[str] = ArchOpt,
    trust_pickle: bool = TrustOpt,
    like: Optional[str] = LikeOpt,
    input_size: Optional[int] = InputSizeOpt,
    mean: Optional[str] = MeanOpt,
    std: Optional[str] = StdOpt,
    data: Optional[str] = DataOpt,
    limit: Optional[int] = LimitOpt,
    batch_size: Optional[int] = BatchOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Top-1/top-5 accuracy, MACs, params and CPU latency of a model."""
    from autodfp.api import evaluate, input_shape_of, resolve_device
    from autodfp.eval.metrics import latency_table, profile

    _check_limit(limit, batch_size)
    _checked(resolve_device, device)
    net, cfg = _load(model, weights, arch, trust_pickle, like, input_size, mean, std)
    shape = input_shape_of(cfg)
    res = evaluate(
        net,
        data,
        model_config=cfg,
        limit=limit,
        batch_size=batch_size,
        device=device,
        progress=_progress_on() and sys.stderr.isatty(),
    )
    prof = profile(net, shape)
    lat = latency_table(net, shape, batch_sizes=(1, 32))
    if cfg.task == "detection":
        against = "the unpruned model's detections" if res.reference == "self" else "labels"
        rows = [
            ("images", f"{res.n}"),
            (f"objects ({against})", f"{res.objects}"),
            ("mAP@0.5", f"{res.map50:.4f}"),
            ("mAP@0.5:0.95", f"{res.map50_95:.4f}"),
            ("faces kept" if res.reference == "self" else "recall", f"{100 * res.recall:.2f} %"),
        ]
        fields = _det_row(res)
    else:
        rows = [("images", f"{res.n}"), ("top-1", f"{res.top1:.2f} %"), ("top-5", f"{res.top5:.2f} %")]
        fields = {"top1": round(res.top1, 4), "top5": round(res.top5, 4), "n": res.n}
    _render_eval(cfg.name, rows, fields, prof, lat, as_json)


def _det_row(res) -> dict:
    """A detection result's JSON fields (fractions; NaN, for no reference object, as null)."""
    r = lambda x: None if x != x else round(float(x), 4)
    return {
        "map50": r(res.map50),
        "map50_95": r(res.map50_95),
        "faces_kept": r(res.recall),
        "reference_objects": res.objects,
        "n": res.n,
    }


def _render_eval(name: str, rows: list[tuple[str, str]], fields: dict, prof, lat, as_json: bool) -> None:
    """``eval``'s table and JSON: the task's own metrics, then the cost every model reports."""
    con = _console(as_json)
    t = Table(title=name)
    t.add_column("metric")
    t.add_column("value", justify="right")
    cost = [
        ("MACs", _fmt_m(prof.total_macs)),
        ("params", _fmt_m(prof.total_params)),
        ("latency b=1", f"{lat[1]:.2f} ms"),
        ("latency b=32", f"{lat[32]:.2f} ms"),
    ]
    for k, v in rows + cost:
        t.add_row(k, v)
    con.print(t)
    if as_json:
        _emit_json(
            {
                "model": name,
                **fields,
                "macs": prof.total_macs,
                "params": prof.total_params,
                "latency_ms_b1": round(lat[1], 3),
                "latency_ms_b32": round(lat[32], 3),
            }
        )


CriterionOpt = typer.Option(
    None, "--criterion", help="Channel selection: l1 | l2 | cluster | random (default l1, or the plan's)."
)
ReconOpt = typer.Option(
    None, "--reconstruct", help="Reconstruction: none | mean | nm | autodfp | lsq (default lsq, or the plan's)."
)
CorrOpt = typer.Option(
    None,
    "--corr",
    help="lsq correlations: geometry (weights) | calibration (synthetic inputs) | "
    "auto (default: calibration when synthetic inputs are made anyway: searches, BN-free models).",
)
SeedOpt = typer.Option(0, "--seed", help="Seed for synthetic inputs, random criteria and the search.")
SynthMethodOpt = typer.Option(
    None,
    "--synth-method",
    help="How synthetic inputs are made: auto (bn with BatchNorm, else inversion) | bn (ZeroQ) | deepinversion "
    "(bn + class targets + jitter) | inversion | noise. Each method's batches are cached apart.",
)
SynthStepsOpt = typer.Option(
    None,
    "--synth-steps",
    help="Optimisation steps per synthetic batch (default by input "
    "size: 100 for ≤64 px, 200 for larger; the reward's batch gets half of them, a quarter above 64 px where it "
    "only picks a uniform prune's ridge and step; each batch is cached).",
)
SynthLowResOpt = typer.Option(
    None,
    "--synth-low-res",
    help="Share of the synthesis steps run at half the height and width (cheaper) before the batch is "
    "finished at full size (default 0.75 above 64x64 px, where it halved the time; 0 for smaller inputs).",
)
SynthLowResLevelsOpt = typer.Option(
    None,
    "--synth-low-res-levels",
    help="Reduced sizes those steps are shared by: 2 (the default above 64x64 px) runs the first half of them at "
    "a quarter of the height and width, then the rest at half; 1 runs them all at half size.",
)
RefineRidgeOpt = typer.Option(
    None, "--refine-ridge", help="Ridge of the refinement fits, relative to the kept variance (default 0.01)."
)
RefineDimsRidgeOpt = typer.Option(
    None,
    "--refine-dims-ridge",
    help="Extra ridge × kept channels / fitted positions (guards wide, low-resolution "
    "layers). Default: searches, bench and proxy-check use 3; a prune's final "
    "refinement tries 1, 3, 10 and 30 and keeps the one the reward scores best.",
)
RewardInputsOpt = typer.Option(
    None,
    "--reward-inputs",
    help="Synthetic inputs the reward compares the models on (default 256 for ≤64-px inputs, 64 for larger ones).",
)
RefineInputsOpt = typer.Option(
    None,
    "--refine-inputs",
    help="Synthetic inputs the final refinement fits on (seed + 1; "
    "default 64 for ≤64-px inputs, 256 for larger). Searches score candidates refined on "
    "the first 64.",
)
RefineOpt = typer.Option(
    True,
    "--refine/--no-refine",
    help="Re-fit every consumer in forward order on synthetic inputs, so the kept channels also "
    "absorb the error of earlier layers (data-free; searches score plans after it).",
)

ClusterEpsOpt = typer.Option(
    None,
    "--cluster-eps-quantile",
    help="DBSCAN radius per layer: this quantile of the layer's nearest-neighbour channel distances "
    "(default: an absolute radius of 0.15, which finds no near-duplicates in trained layers).",
)
RefineDataOpt = typer.Option(
    None,
    "--refine-data",
    help="A directory of real unlabelled images to calibrate and refine on instead of synthetic inputs. "
    "Not data-free: for users who hold some images, and to measure the ceiling of synthesis.",
)
FinalChoiceOpt = typer.Option(
    None,
    "--final-choice/--no-final-choice",
    help="Also score the plan unrefined and uncompensated at the end and keep whichever the reward "
    "rates best (default: on; off keeps the fit whatever the reward says).",
)
RewardTailOpt = typer.Option(
    None,
    "--reward-tail",
    help="Detectors: also weigh each output channel's top SHARE of positions in the data-free score "
    "(e.g. 0.01; default off: on the slim face detector it chose a worse plan).",
)
FinalChoicePerGroupOpt = typer.Option(
    None,
    "--final-choice-per-group/--no-final-choice-per-group",
    help="After the final choice, try each group's other variants (refined, unrefined, uncompensated) and keep "
    "one where the held-apart data-free score rises (default: off; on ResNet-56 it cost 3.7 points).",
)

CoupledOpt = typer.Option(
    None,
    "--coupled/--no-coupled",
    help="Also prune residual-stream widths (coupled groups: ResNet stages, inverted-residual outputs), "
    "compensating every consumer on measured stream moments (default: off).",
)

#: search flags that mean nothing without --macs-ratio (a notice says so instead of ignoring them)
_SEARCH_FLAGS = ("--search", "--episodes", "--warmup", "--r-min", "--checkpoint-every", "--resume")


@app.command()
@sigterm_as_interrupt()
def prune(
    model: str = typer.Argument(..., help="Zoo name or user model."),
    uniform: Optional[float] = typer.Option(None, "--uniform", help="One preserved ratio for every prunable group."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="A plan JSON (per-group ratios)."),
    macs_ratio: Optional[float] = typer.Option(
        None, "--macs-ratio", help="Search a plan keeping this fraction of the MACs (0.5 halves them)."
    ),
    search_method: Optional[str] = typer.Option(
        None, "--search", help="With --macs-ratio: sac (default) | uniform | random | evolution."
    ),
    episodes: Optional[int] = typer.Option(
        None, "--episodes", help="Search episodes (sac, random, evolution; default: --effort's, 100 balanced)."
    ),
    warmup: Optional[int] = typer.Option(
        None,
        "--warmup",
        help="Random-action episodes before SAC learns, and evolution's population (default min(50, episodes/4)).",
    ),
    reward_spec: str = typer.Option(
        "synthetic", "--reward", help="synthetic | unlabeled:DIR | labeled:SPEC (never the evaluation set)."
    ),
    r_min: Optional[float] = typer.Option(
        None,
        "--r-min",
        help="Smallest preserved ratio the search may choose per group (default: chosen from the budget, at most 0.3).",
    ),
    checkpoint_every: Optional[int] = typer.Option(
        None, "--checkpoint-every", help="Write a resumable search checkpoint every K episodes (default 25)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted search from OUT/search/."),
    effort: Optional[str] = typer.Option(
        None,
        "--effort",
        help="fast | balanced | best: search episodes, distillation and synthesis sizes in one word "
        "(default balanced, or $AUTODFP_EFFORT); any flag below overrides its preset value.",
    ),
    criterion: Optional[str] = CriterionOpt,
    reconstruct: Optional[str] = ReconOpt,
    strength: Optional[float] = typer.Option(None, "--strength", help="Merge strength λ in [0, 1] for autodfp."),
    cluster_eps_quantile: Optional[float] = ClusterEpsOpt,
    corr: Optional[str] = CorrOpt,
    seed: int = SeedOpt,
    refine: bool = RefineOpt,
    refine_data: Optional[str] = RefineDataOpt,
    final_choice: Optional[bool] = FinalChoiceOpt,
    final_choice_per_group: Optional[bool] = FinalChoicePerGroupOpt,
    reward_tail: Optional[float] = RewardTailOpt,
    coupled: Optional[bool] = CoupledOpt,
    reparameterize: Optional[bool] = ReparameterizeOpt,
    distill_steps: Optional[int] = typer.Option(
        None,
        "--distill",
        help="Steps of data-free knowledge distillation after refinement: the pruned model learns the original's "
        "outputs on the synthetic inputs (default: --effort's; balanced distils 32-px models 1500 steps, 0: off).",
    ),
    distill_inputs: Optional[int] = typer.Option(
        None,
        "--distill-inputs",
        help="Extra synthetic inputs distilled for --distill alone, added to the pipeline's batches "
        "(default: --effort's; balanced adds 256 for 32-px models).",
    ),
    distill_lr: Optional[float] = typer.Option(
        None,
        "--distill-lr",
        help="Adam's first learning rate for --distill, cosine-decayed, divided by ten where the loss diverges "
        "(default 1e-3).",
    ),
    distill_augment: Optional[bool] = typer.Option(
        None,
        "--distill-augment/--no-distill-augment",
        help="Random flips and shifts of the distillation's inputs at every step (default: on up to 64x64 px).",
    ),
    distill_fresh: Optional[int] = typer.Option(
        None,
        "--distill-fresh",
        help="Batches of 64 fresh synthetic inputs made during --distill, each aimed at where the pruned model "
        "still disagrees with the original (not cached; default 0). --distill-inputs paid more on ResNet-20.",
    ),
    distill_compete: Optional[float] = typer.Option(
        None,
        "--distill-compete",
        help="Weight of that disagreement term in the fresh inputs' objective (default 0.03; 0: BN statistics alone).",
    ),
    distill_features: Optional[float] = typer.Option(
        None,
        "--distill-features",
        help="Weight of feature matching in --distill: the outputs of the pruned groups' consumers learn the "
        "original's too, normalised per channel (default 0: the model's outputs only).",
    ),
    synth_method: Optional[str] = SynthMethodOpt,
    synth_steps: Optional[int] = SynthStepsOpt,
    synth_low_res: Optional[float] = SynthLowResOpt,
    synth_low_res_levels: Optional[int] = SynthLowResLevelsOpt,
    refine_ridge: Optional[float] = RefineRidgeOpt,
    refine_dims_ridge: Optional[float] = RefineDimsRidgeOpt,
    reward_inputs: Optional[int] = RewardInputsOpt,
    refine_inputs: Optional[int] = RefineInputsOpt,
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        parser=_out_path,
        help="Output directory (model.ts, pruned.pt, plan.json, manifest.json); required unless --dry-run.",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Write into an --out that holds files autodfp did not write; they are kept (one with a name of the "
        "output set is still refused). autodfp only ever replaces its own earlier output.",
    ),
    weights: Optional[str] = WeightsOpt,
    arch: Optional[str] = ArchOpt,
    trust_pickle: bool = TrustOpt,
    like: Optional[str] = LikeOpt,
    input_size: Optional[int] = InputSizeOpt,
    mean: Optional[str] = MeanOpt,
    std: Optional[str] = StdOpt,
    data: Optional[str] = DataOpt,
    limit: Optional[int] = LimitOpt,
    batch_size: Optional[int] = BatchOpt,
    device: str = DeviceOpt,
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip accuracy evaluation."),
    no_torchscript: bool = typer.Option(
        False, "--no-torchscript", help="Save no model.ts (it is left out anyway when it would not match the model)."
    ),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        help="Pieces of work at once on Ray workers: synthesis chunks, and the plans of --search random or "
        "evolution (default 1: all in this process; more need Ray, the package's 'distributed' extra).",
    ),
    ray_address: Optional[str] = typer.Option(
        None,
        "--ray-address",
        help="Join a running Ray cluster instead of starting one: auto, or HOST:PORT of its head "
        "(ray start --head); --workers workers are used on it.",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Check every input, print the plan of work (each stage, its sizes and an estimate of its minutes on "
        "this machine) and exit: nothing is synthesised, and nothing is written to --out.",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Prune a model with a uniform ratio, a plan file or a searched plan, reconstruct, and save it."""
    import autodfp.api as api
    from autodfp.compress.plan import Plan
    from autodfp.eval.export import OutputLock, check_output_dir
    from autodfp.eval.metrics import latency_table

    # every check that needs no model comes first: nothing is computed for a run that cannot finish
    if sum(x is not None for x in (uniform, plan_file, macs_ratio)) != 1:
        raise PlanError("give exactly one of --uniform R, --plan plan.json or --macs-ratio R")
    for name, value in (("uniform", uniform), ("macs_ratio", macs_ratio)):
        if value is not None:
            _checked(api.check_ratio, name, value)
    _check_run(seed, device, limit, batch_size)
    config = _config(
        effort=effort,
        criterion=criterion,
        strategy=reconstruct,
        strength=strength,
        cluster_eps_quantile=cluster_eps_quantile,
        corr=corr,
        refine=refine,
        refine_data=refine_data,
        final_choice=final_choice,
        final_choice_per_group=final_choice_per_group,
        reward_tail=reward_tail,
        coupled=coupled,
        reparameterize=reparameterize,
        distill_steps=distill_steps,
        distill_inputs=distill_inputs,
        distill_lr=distill_lr,
        distill_augment=distill_augment,
        distill_fresh=distill_fresh,
        distill_compete=distill_compete,
        distill_features=distill_features,
        synth_method=synth_method,
        synth_steps=synth_steps,
        synth_low_res=synth_low_res,
        synth_low_res_levels=synth_low_res_levels,
        refine_ridge=refine_ridge,
        refine_dims_ridge=refine_dims_ridge,
        reward_inputs=reward_inputs,
        refine_inputs=refine_inputs,
        search=search_method,
        episodes=episodes,
        warmup=warmup,
        r_min=r_min,
        checkpoint_every=checkpoint_every,
        eval_batch_size=batch_size,
        workers=workers,
        ray_address=ray_address,
    )
    if macs_ratio is None:
        ignored = [
            f
            for f, v in zip(_SEARCH_FLAGS, (search_method, episodes, warmup, r_min, checkpoint_every, resume or None))
            if v is not None
        ]
        if ignored:
            raise PlanError(f"{', '.join(ignored)} only apply to a search (--macs-ratio)")
    plan = None
    if plan_file is not None:
        plan = Plan.load(plan_file)
        plan.criterion = criterion or plan.criterion
        plan.strategy = reconstruct or plan.strategy
        if strength is not None:  # as before the API existed: --strength overrides the plan's own
            plan.params["strength"] = strength
        _checked(plan.check_names)
    if out is None and not dry_run:
        raise PlanError("--out DIR is required: where the pruned model and its report go")
    if out is not None:
        check_output_dir(out)
    con = _console(as_json)
    _setup_logging()
    # what the run and its dry run share, so a dry run plans exactly the run it stands for
    run_args: dict[str, Any] = dict(
        macs_ratio=macs_ratio,
        uniform=uniform,
        plan=plan,
        reward=reward_spec,
        config=config,
        seed=seed,
        device=device,
        eval_data=data,
    )
    if dry_run:
        _dry_run(out, force, as_json, (model, weights, arch, trust_pickle, like, input_size, mean, std), **run_args)
        return
    assert out is not None  # checked above
    with OutputLock(out, overwrite=force, search=macs_ratio is not None):
        net, cfg = _load(model, weights, arch, trust_pickle, like, input_size, mean, std)
        if resume and not (out / "search").is_dir():
            _notice(f"--resume: no checkpoint in {out / 'search'}; starting a new search")
        result = _checked(
            api.prune,
            net,
            model_config=cfg,
            progress=_progress_on(),
            checkpoint_dir=out / "search",
            resume=resume,
            arch=arch,
            **run_args,
        )
        paths = api.save(result, out, overwrite=force, torchscript=not no_torchscript)
    shape = result.input_shape
    report = result.report
    lat_b, lat_a = latency_table(net, shape, (1,)), latency_table(result.model, shape, (1,))
    top1_b = top1_a = top1_u = None
    det = None
    if not no_eval and cfg.task == "detection":
        # the unpruned detector is the reference: its own score is 1 by construction
        det = api.evaluate(
            result.model, data, model_config=cfg, limit=limit, batch_size=batch_size, device=device, reference=net
        )
    elif not no_eval:
        top1_b = api.evaluate(net, data, model_config=cfg, limit=limit, batch_size=batch_size, device=device).top1
        top1_a = api.evaluate(
            result.model, data, model_config=cfg, limit=limit, batch_size=batch_size, device=device
        ).top1
        if result.undistilled is not None:  # what the distillation added, on the same images
            top1_u = api.evaluate(
                result.undistilled, data, model_config=cfg, limit=limit, batch_size=batch_size, device=device
            ).top1
    plan = result.plan
    steps = f" + distill {report['distill_steps']}" if report.get("distill_steps") else ""
    t = Table(title=f"{cfg.name}: {plan.strategy} + {plan.criterion}{' + refine' if report['refine'] else ''}{steps}")
    for col in ("", "before", "after", "ratio"):
        t.add_column(col, justify="right")
    mb, ma, pb, pa = report["macs_before"], report["macs_after"], report["params_before"], report["params_after"]
    t.add_row("MACs", _fmt_m(mb), _fmt_m(ma), f"{ma / mb:.3f}")
    t.add_row("params", _fmt_m(pb), _fmt_m(pa), f"{pa / pb:.3f}")
    if top1_b is not None and top1_a is not None:
        if top1_u is not None:
            t.add_row("top-1 before distillation", f"{top1_b:.2f} %", f"{top1_u:.2f} %", f"{top1_u - top1_b:+.2f} pt")
        t.add_row("top-1", f"{top1_b:.2f} %", f"{top1_a:.2f} %", f"{top1_a - top1_b:+.2f} pt")
    if det is not None:
        against = "vs unpruned" if det.reference == "self" else "on labels"
        t.add_row(f"mAP@0.5 ({against})", "", f"{det.map50:.4f}", "")
        t.add_row(f"mAP@0.5:0.95 ({against})", "", f"{det.map50_95:.4f}", "")
        t.add_row("faces kept" if det.reference == "self" else "recall", "", f"{100 * det.recall:.2f} %", "")
    t.add_row("latency b=1", f"{lat_b[1]:.2f} ms", f"{lat_a[1]:.2f} ms", f"speed-up {lat_b[1] / lat_a[1]:.2f}×")
    con.print(t)
    con.print(f"saved: {', '.join(str(p) for p in paths.values())}")
    if as_json:
        keys = (
            "search",
            "episodes",
            "search_seconds",
            "best_reward",
            "plateau_episode",
            "refine_dims_ridge",
            "final_step",
            "distill_steps",
        )
        _emit_json(
            {
                **{k: report[k] for k in keys if k in report},
                "refine": report["refine"],
                "macs_before": mb,
                "macs_after": ma,
                "macs_ratio_achieved": report["macs_ratio_achieved"],
                "params_before": pb,
                "params_after": pa,
                "top1_before": None if top1_b is None else round(top1_b, 4),
                "top1_after": None if top1_a is None else round(top1_a, 4),
                "top1_before_distillation": None if top1_u is None else round(top1_u, 4),
                **({"detection": _det_row(det)} if det is not None else {}),
                "latency_ms_b1_before": round(lat_b[1], 3),
                "latency_ms_b1_after": round(lat_a[1], 3),
                "out": str(out),
            }
        )


def _dry_run(out: Path | None, force: bool, as_json: bool, source: tuple[Any, ...], **prune_args: Any) -> None:
    """``prune --dry-run``: the plan of work on stdout, after the checks the run would make.

    OUT, when given, is checked (where a run would be refused, so is the dry run) but never created or locked:
    a dry run leaves no trace. With ``--json`` the plan is one JSON object.
    """
    import autodfp.api as api
    from autodfp.eval.outdir import claim_output_dir

    if out is not None:  # reads only
        claim_output_dir(out, overwrite=force, search=prune_args["macs_ratio"] is not None, kind="pruned")
    net, cfg = _load(*source)
    work = _checked(api.plan_work, net, model_config=cfg, **prune_args)
    if as_json:
        _emit_json({"work_plan": work.to_dict()})
    else:
        sys.stdout.write("".join(printable(line) + "\n" for line in work.render().splitlines()))
        sys.stdout.flush()


#: ``autodfp prune --help`` in panels, one per stage of the pipeline: 50 options in one list hid
#: the few a user needs (the budget, the effort, the output) among the tuning knobs.
PRUNE_PANELS = {
    "Budget and effort": ("uniform", "plan_file", "macs_ratio", "effort", "seed"),
    "Search": ("search_method", "episodes", "warmup", "reward_spec", "reward_tail", "r_min", "checkpoint_every", "resume"),
    "Reconstruction": (
        "criterion", "reconstruct", "strength", "cluster_eps_quantile", "corr", "refine", "refine_data",
        "final_choice", "final_choice_per_group", "coupled", "refine_ridge", "refine_dims_ridge", "refine_inputs",
    ),
    "Synthesis": ("synth_method", "synth_steps", "synth_low_res", "synth_low_res_levels", "reward_inputs"),
    "Distillation": ("distill_steps", "distill_inputs", "distill_lr", "distill_augment", "distill_fresh", "distill_compete",
                     "distill_features"),
    "Model": ("weights", "arch", "trust_pickle", "like", "input_size", "mean", "std", "reparameterize"),
    "Evaluation": ("data", "limit", "batch_size", "device", "no_eval"),
    "Workers (Ray)": ("workers", "ray_address"),
    "Output": ("out", "force", "no_torchscript", "dry_run", "as_json"),
}  # fmt: skip


def _set_panels(command: Any, panels: dict[str, tuple[str, ...]]) -> None:
    """Give each option of ``command`` its help panel (typer reads it when the CLI is built).

    The option objects are shared with other commands (``--seed``, ``--device``): in those, a panel
    just groups the option the same way.
    """
    import inspect

    params = inspect.signature(command).parameters
    for panel, names in panels.items():
        for name in names:
            params[name].default.rich_help_panel = panel


_set_panels(prune, PRUNE_PANELS)


@app.command("proxy-check")
def proxy_check_cmd(
    model: str = typer.Argument(..., help="Zoo name or user model."),
    macs_ratio: float = typer.Option(0.5, "--macs-ratio", help="Budget of the sampled plans."),
    plans: int = typer.Option(50, "--plans", help="Number of random feasible plans (K ≥ 3)."),
    reward_spec: str = typer.Option("synthetic", "--reward", help="synthetic | unlabeled:DIR | labeled:SPEC."),
    reconstruct: Optional[str] = ReconOpt,
    corr: Optional[str] = CorrOpt,
    seed: int = SeedOpt,
    refine: bool = RefineOpt,
    synth_method: Optional[str] = SynthMethodOpt,
    synth_steps: Optional[int] = SynthStepsOpt,
    synth_low_res: Optional[float] = SynthLowResOpt,
    synth_low_res_levels: Optional[int] = SynthLowResLevelsOpt,
    refine_ridge: Optional[float] = RefineRidgeOpt,
    refine_dims_ridge: Optional[float] = RefineDimsRidgeOpt,
    reward_inputs: Optional[int] = RewardInputsOpt,
    refine_inputs: Optional[int] = typer.Option(
        None,
        "--refine-inputs",
        help="Synthetic inputs each plan is refined on (seed + 1); default: what searches score candidates with (64).",
    ),
    out: Path = typer.Option(Path("runs/proxy"), "--out", parser=_out_path, help="Directory for proxy.png/json."),
    weights: Optional[str] = WeightsOpt,
    arch: Optional[str] = ArchOpt,
    trust_pickle: bool = TrustOpt,
    like: Optional[str] = LikeOpt,
    input_size: Optional[int] = InputSizeOpt,
    data: Optional[str] = DataOpt,
    limit: Optional[int] = LimitOpt,
    batch_size: Optional[int] = BatchOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Can the data-free reward be trusted? Spearman ρ of reward vs real accuracy over K plans."""
    from autodfp.api import Pipeline, check_ratio, input_shape_of
    from autodfp.eval.metrics import evaluate
    from autodfp.eval.outdir import claim_output_dir, write_output_set
    from autodfp.search.driver import plot_proxy, proxy_check

    if plans < 3:
        raise PlanError(f"--plans must be at least 3 for a rank correlation, got {plans}")
    _checked(check_ratio, "macs_ratio", macs_ratio)
    _check_run(seed, device, limit, batch_size)
    config = _config(
        strategy=reconstruct,
        corr=corr,
        refine=refine,
        synth_method=synth_method,
        synth_steps=synth_steps,
        synth_low_res=synth_low_res,
        synth_low_res_levels=synth_low_res_levels,
        refine_ridge=refine_ridge,
        refine_dims_ridge=refine_dims_ridge,
        reward_inputs=reward_inputs,
        refine_inputs=refine_inputs,
        eval_batch_size=batch_size,
    )
    claim_output_dir(out, kind="proxy")  # a folder of the user's is refused now, not after the work
    _setup_logging()
    net, cfg = _load(model, weights, arch, trust_pickle, like, input_size)
    pipe = Pipeline(net, cfg, input_shape_of(cfg), config, seed=seed, device=device, progress=_progress_on())
    pruner = pipe.pruner(synthesising=config.refine or reward_spec == "synthetic")
    n_refine = config.refine_inputs if config.refine_inputs is not None else config.search_refine_inputs
    refiner = pipe.refiner(pruner, n=n_refine) if config.refine else None
    reward = _checked(pipe.reward, reward_spec, data)
    batches = _eval_batches(cfg, data, limit, config.eval_batch_size_for(pipe.shape))
    acc = lambda m: evaluate(m, batches, cfg.label_offset, progress=False).top1
    rho, rewards, accs = proxy_check(
        pruner,
        reward,
        acc,
        macs_ratio,
        k=plans,
        seed=seed,
        strategy=config.strategy,
        progress=_progress_on(),
        refiner=refiner,
    )
    rho_txt = "undefined" if rho is None or not math.isfinite(rho) else f"{rho:.3f}"
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "proxy.png"
        plot_proxy(rewards, accs, png, title=f"{cfg.name} @ {macs_ratio:g} MACs: Spearman ρ = {rho_txt}")
        files["proxy.png"] = png.read_bytes()
    files["proxy.json"] = (
        json.dumps(
            _json_safe(
                {
                    "model": cfg.name,
                    "macs_ratio": macs_ratio,
                    "plans": plans,
                    "reward": reward_spec,
                    "refine": config.refine,
                    "refine_inputs": len(refiner.inputs) if refiner else 0,
                    "rho": rho,
                    "rewards": rewards,
                    "top1": accs,
                }
            ),
            indent=2,
        )
        + "\n"
    ).encode()
    write_output_set(out, files, kind="proxy")
    _console(as_json).print(
        f"Spearman ρ (reward vs top-1, {plans} plans) = {rho_txt}; top-1 range "
        f"{min(accs):.2f}–{max(accs):.2f} %; wrote {out / 'proxy.png'}"
    )
    if as_json:
        _emit_json({"model": cfg.name, "rho": rho, "plans": plans, "top1_min": min(accs), "top1_max": max(accs)})


@app.command()
def bench(
    model: str = typer.Argument(..., help="Zoo name or user model."),
    ratios: str = typer.Option("0.9,0.7,0.5", "--ratios", help="Comma-separated uniform preserved ratios."),
    methods: str = typer.Option(
        "none+l1,mean+l1,nm+l1,autodfp+l1,lsq+l1,lsq+l1+refine",
        "--methods",
        help="Comma-separated strategy+criterion[+refine]; +refine adds the "
        "sequential drift correction on synthetic inputs.",
    ),
    strength: float = typer.Option(1.0, "--strength", help="Merge strength λ for autodfp."),
    cluster_eps_quantile: Optional[float] = ClusterEpsOpt,
    corr: Optional[str] = CorrOpt,
    seed: int = SeedOpt,
    synth_method: Optional[str] = SynthMethodOpt,
    synth_steps: Optional[int] = SynthStepsOpt,
    synth_low_res: Optional[float] = SynthLowResOpt,
    synth_low_res_levels: Optional[int] = SynthLowResLevelsOpt,
    refine_ridge: Optional[float] = RefineRidgeOpt,
    refine_dims_ridge: Optional[float] = RefineDimsRidgeOpt,
    refine_inputs: Optional[int] = RefineInputsOpt,
    out: Path = typer.Option(Path("runs/bench"), "--out", parser=_out_path, help="Directory for bench.md/json/png."),
    weights: Optional[str] = WeightsOpt,
    arch: Optional[str] = ArchOpt,
    trust_pickle: bool = TrustOpt,
    like: Optional[str] = LikeOpt,
    input_size: Optional[int] = InputSizeOpt,
    data: Optional[str] = DataOpt,
    limit: Optional[int] = LimitOpt,
    batch_size: Optional[int] = BatchOpt,
    device: str = DeviceOpt,
) -> None:
    """Grid of methods × uniform ratios: Markdown table and accuracy-vs-MACs plot."""
    from autodfp.api import Pipeline, check_ratio, input_shape_of
    from autodfp.eval.bench import parse_method, run_grid, write_report
    from autodfp.eval.outdir import claim_output_dir

    try:
        ratio_list = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise PlanError(f"--ratios must be comma-separated numbers, got '{ratios}'") from None
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    if not ratio_list:
        raise PlanError("--ratios is empty; give at least one ratio, e.g. --ratios 0.7")
    if not method_list:
        raise PlanError("--methods is empty; give at least one method, e.g. --methods lsq+l1+refine")
    for r in ratio_list:
        _checked(check_ratio, "ratios", r)
    for m in method_list:
        parse_method(m)
    _check_run(seed, device, limit, batch_size)
    config = _config(
        strength=strength,
        cluster_eps_quantile=cluster_eps_quantile,
        corr=corr,
        synth_method=synth_method,
        synth_steps=synth_steps,
        synth_low_res=synth_low_res,
        synth_low_res_levels=synth_low_res_levels,
        refine_ridge=refine_ridge,
        refine_dims_ridge=refine_dims_ridge,
        refine_inputs=refine_inputs,
        eval_batch_size=batch_size,
    )
    claim_output_dir(out, kind="bench")  # a folder of the user's is refused now, not after the work
    _setup_logging()
    net, cfg = _load(model, weights, arch, trust_pickle, like, input_size)
    refining = any(parse_method(m)[2] for m in method_list)
    pipe = Pipeline(net, cfg, input_shape_of(cfg), config, seed=seed, device=device, progress=_progress_on())
    pruner = pipe.pruner(synthesising=refining)
    refiner = pipe.refiner(pruner, dims_ridge=config.refine_dims_ridge) if refining else None
    batches = _eval_batches(cfg, data, limit, config.eval_batch_size_for(pipe.shape))
    n = sum(len(y) for _, y in batches)

    def report(row) -> None:
        _err.print(
            f"  {row.method:16s} ratio {row.ratio:<5g} top-1 {row.top1:6.2f} %  MACs {row.macs / 1e6:8.2f} M"
            f"  ({row.seconds:.1f} s)"
        )

    baseline, rows = run_grid(
        pruner,
        batches,
        method_list,
        ratio_list,
        cfg.label_offset,
        params={"strength": strength},
        progress=report,
        refiner=refiner,
    )
    data_desc = f"{data or 'default dataset of ' + cfg.name} ({n} images)"
    command = "autodfp bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else f"autodfp bench {model}"
    paths = write_report(out, cfg.name, data_desc, baseline, rows, command)
    _out.print(paths["markdown"].read_text())
    _out.print(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command("bench-latency")
def bench_latency(
    model: str = typer.Argument(..., help="A pruned output directory, or any model (zoo name, user model) to time."),
    against: Optional[str] = typer.Option(
        None,
        "--against",
        help="The model to compare with (zoo name or pruned directory); default: the zoo model "
        "a pruned directory was pruned from.",
    ),
    runtime: str = typer.Option(
        "torch", "--runtime", help="torch | torchscript | onnxruntime | all (all: those installed here)."
    ),
    batch_sizes: str = typer.Option("1,8,32", "--batch-sizes", help="Comma-separated batch sizes to time."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto: where the models run (default cpu)."),
    repeats: int = typer.Option(
        20, "--repeats", help="Timed runs per model and batch size (at least 20), alternated between the models."
    ),
    warmup: int = typer.Option(5, "--warmup", help="Untimed runs per model and batch size before timing."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="Intra-op threads of every runtime (default: PyTorch's)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", parser=_out_path, help="Directory for latency.png (latency vs batch size) and latency.json."
    ),
    arch: Optional[str] = ArchOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Measured latency before and after pruning: median and spread per runtime and batch size."""
    from autodfp.api import input_shape_of, resolve_device
    from autodfp.eval import latency as lat

    if runtime.strip().lower() == "all":
        runtimes = lat.available_runtimes()
    elif runtime.strip().lower() in lat.RUNTIMES:
        runtimes = (runtime.strip().lower(),)
    else:
        raise PlanError(f"unknown --runtime '{runtime}'; choose one of {', '.join(lat.RUNTIMES)} or all")
    sizes = lat.parse_batch_sizes(batch_sizes, "--batch-sizes")
    if repeats < lat.MIN_REPEATS:
        raise PlanError(
            f"--repeats must be at least {lat.MIN_REPEATS} (a median of fewer runs moves with one slow run)"
        )
    if warmup < 0:
        raise PlanError(f"--warmup must be at least 0, got {warmup}")
    if threads is not None and threads < 1:
        raise PlanError(f"--threads must be at least 1, got {threads}")
    _checked(resolve_device, device)
    if out is not None:  # the user's folder, or a pruned model's, is refused before the timing
        from autodfp.eval.outdir import claim_output_dir

        claim_output_dir(out, kind="latency")
    net, cfg = _load(model, None, arch, False, None)
    shape = input_shape_of(cfg)
    original, against_name = None, None
    if against is not None:
        original, acfg = _load(against, None, None, False, None)
        against_name = acfg.name
        if tuple(input_shape_of(acfg)) != tuple(shape):
            raise PlanError(f"--against {against} takes {input_shape_of(acfg)} inputs, {model} takes {shape}")
    elif Path(model).is_dir() or Path(model).name == "pruned.pt":
        from autodfp.models import load_model
        from autodfp.models.registry import is_registered

        if not is_registered(cfg.name):
            raise PlanError(f"{model} was not pruned from a zoo model; name the original model with --against")
        original, _ = load_model(cfg.name, pretrained=False)  # weights do not change the time
        against_name = cfg.name
    _notice(
        f"timing {'2 models' if original is not None else '1 model'} ({', '.join(runtimes)}; batch sizes "
        f"{', '.join(map(str, sizes))}; {repeats} alternated runs each after {warmup} untimed)"
    )
    section = lat.latency_section(original, net, shape, runtimes, sizes, device, warmup, repeats, threads)
    con = _console(as_json)
    t = Table(title=f"{cfg.name}: ms per batch, median (p10–p90)", caption=f"on {section['device_name']}")
    for col in ("runtime", "batch", "threads") + (
        ("original", "pruned", "speed-up") if original is not None else ("model",)
    ):
        t.add_column(col, justify="left" if col == "runtime" else "right")
    span = lambda x: f"{x['median_ms']:.3f} ({x['p10_ms']:.3f}–{x['p90_ms']:.3f})"
    for rt, entry in section["runtimes"].items():
        for row in entry["batches"]:
            cells = [rt, str(row["batch"]), str(entry["threads"])]
            if original is not None:
                cells += [span(row["before"]), span(row["after"]), f"{row['speedup']:.2f}x"]
            else:
                cells.append(span(row["after"]))
            t.add_row(*cells)
    con.print(t)
    if out is not None:
        from autodfp.eval.outdir import write_output_set

        files = {
            "latency.json": (json.dumps(_json_safe(section), indent=2, allow_nan=False) + "\n").encode(),
            "latency.png": lat.plot_latency(section, title=f"{cfg.name} ({section['device_name']})"),
        }
        write_output_set(out, files, kind="latency")
        con.print(f"wrote {out / 'latency.png'}, {out / 'latency.json'}")
    if as_json:
        _emit_json({"model": cfg.name, "against": against_name, **section})


#: library parameters, as the library's messages name them → the CLI's flags
_PARAM_WORDS = {
    "trust_pickle=True": "--trust-pickle",
    "arch=package.module:factory": "--arch package.module:factory",
    "overwrite=True": "--force",
}


def _cli_words(msg: str) -> str:
    for word, flag in _PARAM_WORDS.items():
        msg = msg.replace(word, flag)
    return msg


def _one_line_warnings() -> None:
    """Our own warnings (an unusable cache, say) as one ``warning:`` line; scripts match ``^warning:``."""
    import warnings

    from autodfp.errors import CacheWarning

    default = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, CacheWarning) or filename.startswith(str(Path(__file__).parents[1])):
            print(f"warning: {printable(' '.join(str(message).split()))}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Entry point: one ``error:`` line and exit 2 for anything the user caused, usage errors included."""
    _one_line_warnings()
    # typer ships its own copy of click: take the usage-error type from where typer's come from
    usage_error = sys.modules[typer.BadParameter.__module__].UsageError

    command = typer.main.get_command(app)
    try:
        result = command.main(
            args=argv if argv is not None else sys.argv[1:], prog_name="autodfp", standalone_mode=False
        )
    except usage_error as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed: nothing went wrong
            return 0
        msg = printable(" ".join(exc.format_message().split()))
        print(
            f"error: {msg} (see 'autodfp {exc.ctx.info_name if exc.ctx and exc.ctx.parent else ''} --help')".replace(
                "autodfp  --help", "autodfp --help"
            ),
            file=sys.stderr,
        )
        return 2
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except AutoDFPError as exc:
        print(f"error: {printable(_cli_words(' '.join(str(exc).split())))}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not bad input: keep it to one line unless debugging
        if os.environ.get("AUTODFP_DEBUG"):
            raise
        msg = printable(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
        print(
            f"internal error: {exc.__class__.__name__}: {msg} (set AUTODFP_DEBUG=1 for the traceback)", file=sys.stderr
        )
        return 1
    if result == 130:  # typer turns Ctrl-C into exit code 130 without a word
        print("interrupted", file=sys.stderr)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
