"""The ``autodfp`` command line.

Every user-caused failure surfaces as one ``error: …`` line on stderr and exit code 2; set
``AUTODFP_DEBUG=1`` to see the traceback of unexpected errors. With ``--json`` the last line of
stdout is one JSON object and all human-readable output goes to stderr, so the command pipes
cleanly into ``jq`` or a benchmark script.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import AutoDFPError

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
BatchOpt = typer.Option(128, "--batch-size", help="Evaluation batch size.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object as the last stdout line.")


def _load(model: str, weights: Optional[str], arch: Optional[str], trust_pickle: bool, like: Optional[str]):
    """Zoo name, user model, or a directory/file written by ``autodfp prune``."""
    from .models import load_model

    p = Path(model)
    if (p.is_dir() and (p / "pruned.pt").is_file()) or (p.is_file() and p.name == "pruned.pt"):
        from .export import load_pruned

        net, cfg, _ = load_pruned(p)
        return net, cfg
    return load_model(model, weights=weights, arch=arch, trust_pickle=trust_pickle, like=like)


def _input_shape(cfg) -> tuple[int, int, int]:
    s = cfg.preprocessing.input_size
    return (3, s, s)


def _fmt_m(x: float) -> str:
    return f"{x / 1e6:,.2f} M"


# -- commands ---------------------------------------------------------------------------------
@app.command()
def zoo(as_json: bool = JsonOpt) -> None:
    """List the built-in models."""
    from .models import get_config, list_models

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
    from .graph import find_groups
    from .metrics import profile

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
             batch_size: int = BatchOpt, as_json: bool = JsonOpt) -> None:
    """Top-1/top-5 accuracy, MACs, params and CPU latency of a model."""
    from .data import make_loader, resolve_dataset
    from .metrics import evaluate, latency_table, profile

    net, cfg = _load(model, weights, arch, trust_pickle, like)
    shape = _input_shape(cfg)
    loader = make_loader(resolve_dataset(data, cfg), batch_size=batch_size, limit=limit)
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
