"""Saving pruned models as one complete set of files, and loading them back safely.

A pruned output directory holds:

- ``model.ts``: TorchScript (scripted when possible, traced otherwise); ``torch.jit.load`` needs
  nothing but PyTorch, and loading it imports no Python code.
- ``pruned.pt``: a weights-only checkpoint: state dict, plan, per-group channel counts, input
  shape, preprocessing and classes, and where the architecture came from (a zoo name, or the
  ``--arch`` factory for information).
- ``plan.json`` and, from :func:`autodfp.save`, ``report.json`` and the search's files.
- ``manifest.json``: the sha256 of every file of the set, written last.

**One set, never a mix.** The files are staged in a hidden folder inside OUT and renamed into
place, and the manifest is written last; a set without a matching, sealed manifest is refused by
:func:`load_pruned`. A kill or a full disk at any moment therefore leaves either the old set, or a
set that loads refuse, never a silent mix of two runs. Every write under OUT, the lock that keeps
two runs from sharing it, and the rule that only autodfp's own files are replaced or deleted, live
in :mod:`autodfp.eval.outdir` (its names are re-exported here for compatibility).

**No code from a file.** :func:`load_pruned` rebuilds a zoo architecture from the registry (our
code), a user architecture only from what the *caller* passes (``model=`` or ``arch=``), and
otherwise loads ``model.ts``. The factory a ``pruned.pt`` records is never imported on its own.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autodfp.analysis.graph import find_groups
from autodfp.compress.plan import Plan
from autodfp.compress.surgery import PruneResult, prune_channels
from autodfp.errors import ExportWarning, ModelError, PlanError, WeightsError
from autodfp.eval.outdir import (  # noqa: F401 (re-exported: these lived here before autodfp.eval.outdir)
    MANIFEST,
    MANIFEST_FORMAT,
    SET_FILES,
    OutputLock,
    check_output_dir,
    claim_output_dir,
    verify_set,
    write_output_set,
    write_set,
)
from autodfp.models.load import build_from_arch, check_finite, load_checkpoint, load_state_dict_strict
from autodfp.models.registry import (
    DatasetRef,
    ModelConfig,
    Preprocessing,
    check_input_shape,
    check_model_config,
    get_config,
    is_registered,
)

FORMAT = "autodfp.pruned/2"
_OLD_FORMATS = ("autodfp.pruned/1",)


def to_torchscript(model: nn.Module, input_shape: tuple[int, ...]) -> torch.jit.ScriptModule:
    """Script the model (input-size independent); trace it at ``input_shape`` if scripting fails.

    TorchScript is deprecated upstream in favour of torch.export, but it is still the one format
    that loads with nothing but ``torch.jit.load`` across PyTorch versions, so we keep it.
    """
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(model)
        except Exception:  # dynamic Python that scripting cannot compile
            with torch.no_grad():
                return torch.jit.trace(model, torch.zeros(1, *input_shape))


def _config_record(config: ModelConfig) -> dict[str, Any]:
    p = config.preprocessing
    ds = config.default_dataset
    return {
        "preprocessing": {
            "input_size": p.input_size,
            "mean": list(p.mean),
            "std": list(p.std),
            "resize": p.resize,
            "interpolation": p.interpolation,
            "input_hw": None if p.input_hw is None else list(p.input_hw),
            "guessed": p.guessed,
        },
        "num_classes": config.num_classes,
        "task": config.task,
        "label_offset": config.label_offset,
        "default_dataset": None if ds is None else {"kind": ds.kind, "path": ds.path, "class_list": ds.class_list},
        "description": config.description,
    }


def save_pruned(
    result: PruneResult | Any,
    out_dir: str | os.PathLike,
    config: ModelConfig,
    input_shape: tuple[int, ...],
    arch: str | None = None,
    zoo: bool | None = None,
    extra: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
    torchscript: bool = True,
    reparameterized: bool = False,
) -> dict[str, Path]:
    """Write the output set (see module doc) and return ``{kind: path}``.

    ``model.ts`` is written only when its outputs match the module's, in type and values
    (:func:`checked_torchscript`); a model TorchScript cannot export still gets the rest of its
    set, with a warning and ``"torchscript": null`` in the manifest, and so does ``torchscript=False``.

    :param result: anything with ``model``, ``plan`` and ``decisions`` (or ``kept``)
    :param config: the unpruned model's config; its preprocessing and classes are recorded
    :param arch: the factory that built a user architecture (recorded, never imported on load)
    :param zoo: whether ``config.name`` is a zoo entry the loader may rebuild (default: registered
        and no ``arch``)
    :param extra: more files of the set (``report.json``, ``search.json``, plots), as bytes
    :param overwrite: write beside files in ``out_dir`` that autodfp did not write (they are kept;
        see :func:`autodfp.eval.outdir.claim_output_dir`); without it such a folder is refused
    :param torchscript: also write ``model.ts`` (when the export matches the module)
    :param reparameterized: the model's branches were folded before pruning
        (:mod:`autodfp.models.reparam`): recorded, so a rebuilt architecture is folded the same way
        before it is shrunk
    """
    out = claim_output_dir(out_dir, overwrite=overwrite, kind="pruned")  # before the minutes of serialising
    model = result.model.eval()
    check_finite(model, "the pruned model")  # never save a model that cannot compute
    kept = (
        {k: len(d.kept) for k, d in result.decisions.items()}
        if hasattr(result, "decisions")
        else {k: len(v) for k, v in result.kept.items()}
    )
    zoo = (arch is None and is_registered(config.name)) if zoo is None else zoo
    full_state = model.state_dict()
    state: dict[str, torch.Tensor] = OrderedDict((k, v.detach().cpu().clone()) for k, v in full_state.items())
    # the per-module versions: a module that upgrades old checkpoints in _load_from_state_dict
    # (torchvision's MNASNet) refuses a state dict without them
    metadata = getattr(full_state, "_metadata", None)
    if metadata is not None:
        state._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
    payload: dict[str, Any] = {
        "format": FORMAT,
        "model": config.name,
        "zoo": bool(zoo),
        "arch": arch,
        "input_shape": [int(s) for s in input_shape],
        "plan": result.plan.to_dict(),
        "channels": kept,
        "reparameterized": bool(reparameterized),
        **_config_record(config),
        "state_dict": state,
    }
    # Serialise in memory first: torch's C++ writers abort the process on a full disk, and a
    # Python write raises an OSError we can report.
    files: dict[str, bytes] = {}
    buf = io.BytesIO()
    torch.save(payload, buf)
    files["pruned.pt"] = buf.getvalue()
    ts = checked_torchscript(model, input_shape) if torchscript else None
    if ts is not None:
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(ts, buf)
        files["model.ts"] = buf.getvalue()
    files["plan.json"] = (json.dumps(result.plan.to_dict(), indent=2) + "\n").encode()
    for name, data in (extra or {}).items():
        if name not in SET_FILES:
            raise ValueError(f"{name} is not a file of the output set")
        files[name] = data
    write_output_set(out, files, overwrite=overwrite)
    return {
        "checkpoint": out / "pruned.pt",
        **({"torchscript": out / "model.ts"} if "model.ts" in files else {}),
        "plan": out / "plan.json",
        **{Path(n).stem: out / n for n in files if n not in ("pruned.pt", "model.ts", "plan.json")},
    }


def _same_outputs(a: Any, b: Any, where: str = "output") -> str | None:
    """Why two outputs differ (type, structure, shape or values), or None when they match."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where} is a {type(a).__name__} in the module and a {type(b).__name__} in TorchScript"
        if a.shape != b.shape:
            return f"{where} has shape {tuple(a.shape)} in the module and {tuple(b.shape)} in TorchScript"
        scale = float(a.abs().max()) if a.numel() and a.is_floating_point() else 1.0
        if a.numel() and a.is_floating_point() and float((a - b).abs().max()) > 1e-4 * max(scale, 1.0):
            return f"{where} differs by {float((a - b).abs().max()):.3g}"
        return None
    if type(a) is not type(b) and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))):
        return f"{where} is a {type(a).__name__} in the module and a {type(b).__name__} in TorchScript"
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return f"{where} is a {type(a).__name__} of {len(a)} in the module, a {type(b).__name__} of {len(b)} in TorchScript"
        for i, (x, y) in enumerate(zip(a, b)):
            why = _same_outputs(x, y, f"{where}[{i}]")
            if why:
                return why
    if isinstance(a, dict):
        if set(a) != set(b):
            return f"{where} has keys {sorted(a)} in the module and {sorted(b)} in TorchScript"
        for k in a:
            why = _same_outputs(a[k], b[k], f"{where}[{k!r}]")
            if why:
                return why
    return None


def checked_torchscript(model: nn.Module, input_shape: tuple[int, ...]) -> torch.jit.ScriptModule | None:
    """A TorchScript export of ``model`` whose outputs match the module's, or None with a warning.

    Scripting compiles every branch, so a model whose eval-mode forward returns a tensor can come
    back as a namedtuple (GoogLeNet, Inception-v3 keep their auxiliary outputs), and some dynamic
    Python cannot be scripted at all (MobileViT's attention). So the export is checked on one
    input against the module, in type, structure and values; scripting falls back to tracing, and
    a model neither matches is saved without ``model.ts`` rather than with a wrong one.
    """
    work = copy.deepcopy(model).cpu().eval()
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = work(x)
    reasons = []
    for how in ("script", "trace"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ts = torch.jit.script(work) if how == "script" else torch.jit.trace(work, x[:1], check_trace=False)
                with torch.no_grad():
                    got = ts(x)
        except Exception as exc:  # an export failure is reported, never a crash of the whole save
            reasons.append(f"{how}: {' '.join(str(exc).split())[:80] or exc.__class__.__name__}")
            continue
        why = _same_outputs(expected, got)
        if why is None:
            return ts
        reasons.append(f"{how}: {why}")
    warnings.warn(
        f"no model.ts: TorchScript cannot reproduce this model ({'; '.join(reasons)}); pruned.pt and the rest "
        "of the set are saved, and load(dir, model=...) or arch= rebuilds it",
        ExportWarning,
        stacklevel=3,
    )
    return None


def _str(payload: dict[str, Any], key: str, path: Path, optional: bool = False) -> str | None:
    v = payload.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise WeightsError(f"{path}: field '{key}' must be a string")
    return v


#: The fields of a recorded preprocessing (what :func:`_config_record` writes).
_PRE_FIELDS = ("input_size", "mean", "std", "resize", "interpolation", "input_hw", "guessed")


def _record_config(payload: dict[str, Any], path: Path) -> ModelConfig:
    """The model config recorded in the checkpoint: no registry needed.

    A ``pruned.pt`` can be edited and re-sealed (the manifest is only a hash list), so its record
    is as untrusted as a command line: every field is checked by the same function that checks
    ``--mean/--std/--input-size`` (:func:`~autodfp.models.registry.check_model_config`), and no
    value is coerced on the way (``int("7")`` or a one-value mean broadcast to three channels
    would turn a damaged record into a run that scores nonsense).
    """
    where = f"{path}: "
    name = _str(payload, "model", path) or "model"
    p = payload.get("preprocessing")
    if not isinstance(p, dict):
        raise WeightsError(f"{where}field 'preprocessing' must be an object")
    odd = next((k for k in p if k not in _PRE_FIELDS), None)
    if odd is not None:
        raise WeightsError(f"{where}field 'preprocessing' holds an unknown entry {str(odd)[:40]!r}")
    lacking = next((k for k in ("input_size", "mean", "std") if k not in p), None)
    if lacking is not None:
        raise WeightsError(f"{where}field 'preprocessing' has no '{lacking}'")

    def seq(v: Any) -> Any:  # a JSON-like list becomes the dataclass's tuple; anything else is checked as it is
        return tuple(v) if isinstance(v, list) else v

    pre = Preprocessing(
        p["input_size"],
        seq(p["mean"]),
        seq(p["std"]),
        p.get("resize"),
        p.get("interpolation", "bilinear"),
        None if p.get("input_hw") is None else seq(p["input_hw"]),
        p.get("guessed", False) is True,
    )
    ds = payload.get("default_dataset")
    if ds is not None and (not isinstance(ds, dict) or "kind" not in ds or "path" not in ds):
        raise WeightsError(f"{where}field 'default_dataset' must be an object with 'kind' and 'path'")
    config = ModelConfig(
        name=name,
        builder=_no_builder,
        weights=None,
        preprocessing=pre,
        num_classes=payload.get("num_classes", 0),
        label_offset=payload.get("label_offset", 0),
        default_dataset=None if ds is None else DatasetRef(ds["kind"], ds["path"], ds.get("class_list")),
        description=payload.get("description", ""),
        task=payload.get("task", "classification"),
    )
    check_model_config(config, error=WeightsError, where=where)
    # the checks passed: the numbers are reals, stored as floats like a freshly made config's
    (m0, m1, m2), (s0, s1, s2) = pre.mean, pre.std
    floats = dataclasses.replace(pre, mean=(float(m0), float(m1), float(m2)), std=(float(s0), float(s1), float(s2)))
    return dataclasses.replace(config, preprocessing=floats)


def _no_builder() -> nn.Module:
    raise ModelError("a model loaded from a pruned directory has no builder")


def _add_absorbing_biases(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Zero biases on the conv/linear layers that reconstruction gave one (they had none).

    A consumer with neither a bias nor a BN absorbs a compensation's constant in a bias it gets
    at pruning time (:mod:`autodfp.compress.surgery`); the rebuilt architecture lacks it. Only a
    1-D tensor of the layer's output width qualifies, so a checkpoint of another architecture
    still fails the strict load.
    """
    for key, value in state.items():
        mod_name, _, attr = key.rpartition(".")
        if attr != "bias" or value.dim() != 1:
            continue
        try:
            module = net.get_submodule(mod_name)
        except AttributeError:
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is None:
            width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            if value.numel() == width:
                module.bias = nn.Parameter(torch.zeros(width, dtype=module.weight.dtype))


def load_pruned(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    arch: str | None = None,
) -> tuple[nn.Module, ModelConfig, Plan]:
    """Rebuild a model saved by :func:`save_pruned`, checking the set's manifest first.

    The architecture comes from, in order: ``model`` (an unpruned instance, shrunk to the recorded
    widths), ``arch`` (a factory the *caller* names), the zoo entry the checkpoint names, and
    otherwise ``model.ts`` (TorchScript: it runs, but cannot be pruned again). The factory the
    checkpoint itself records is never imported: a crafted file must not choose code to run.
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    ckpt = directory / "pruned.pt"
    if not ckpt.is_file():
        raise WeightsError(f"{directory} holds no pruned.pt; is it a directory written by 'autodfp prune'?")
    verify_set(directory)
    payload = load_checkpoint(ckpt)
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, *_OLD_FORMATS):
        raise WeightsError(f"{ckpt} is not an autodfp pruned checkpoint (missing format '{FORMAT}')")
    name = _str(payload, "model", ckpt)
    recorded_arch = _str(payload, "arch", ckpt, optional=True)
    shape = payload.get("input_shape")
    if not isinstance(shape, list):
        raise WeightsError(f"{ckpt}: field 'input_shape' must be a list of 3 positive integers")
    shape = list(check_input_shape(shape, error=WeightsError, where=f"{ckpt}: "))  # bounded: no 2^20 sides
    channels = payload.get("channels")
    if not isinstance(channels, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0 for k, v in channels.items()
    ):
        raise WeightsError(f"{ckpt}: field 'channels' must map group names to positive channel counts")
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(f"{ckpt}: field 'state_dict' must map names to tensors")
    if not isinstance(payload.get("plan"), dict):
        raise WeightsError(f"{ckpt}: field 'plan' must be an object")
    try:
        plan = Plan.from_dict(payload["plan"])
    except PlanError as exc:
        raise WeightsError(f"{ckpt}: the recorded plan is malformed ({exc})") from None
    zoo = bool(payload.get("zoo", payload.get("format") in _OLD_FORMATS and not recorded_arch))
    if "preprocessing" in payload:
        config = _record_config(payload, ckpt)
    elif zoo:
        config = get_config(str(name))
    else:
        raise WeightsError(f"{ckpt} records no preprocessing for its user model; prune again")

    if model is not None:
        net = copy.deepcopy(model).eval()
    elif arch is not None:
        net = build_from_arch(arch)
    elif zoo and is_registered(str(name)):
        net = get_config(str(name)).builder()
    else:
        ts = directory / "model.ts"
        if not ts.is_file():
            raise ModelError(
                f"{ckpt} was built by '{recorded_arch or name}', and autodfp does not import code that a "
                "file names; pass the architecture yourself (arch=package.module:factory) if you trust it"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = torch.jit.load(str(ts), map_location="cpu")
        except Exception as exc:  # a damaged archive: report it, never a traceback
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
            raise WeightsError(f"{ts} cannot be loaded ({first})") from None
        return scripted.eval(), config, plan

    if payload.get("reparameterized") is True:
        from autodfp.models.reparam import reparameterize

        net = reparameterize(net, tuple(shape))  # as before pruning: the saved widths are the folded model's
    graph = find_groups(net.eval(), tuple(shape))
    pruned = {}
    for gname, kept in channels.items():
        try:
            g = graph.get(gname)
        except KeyError:
            raise ModelError(f"{ckpt} names group '{gname}' that the rebuilt architecture does not have") from None
        if kept > g.channels:
            raise ModelError(f"{ckpt} keeps {kept} channels of group '{gname}', which has only {g.channels}")
        pruned[gname] = list(range(kept, g.channels))  # any indices: the widths matter, tensors are loaded next
    prune_channels(net, graph, pruned, tuple(shape))
    _add_absorbing_biases(net, state)
    load_state_dict_strict(net, state, str(ckpt))
    check_finite(net, str(ckpt))
    return net.eval(), config, plan


def onnx_check(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike, atol: float = 1e-4) -> float:
    """Export to ONNX, run it with onnxruntime and return the max abs difference to PyTorch."""
    import numpy as np
    import onnxruntime as ort

    from autodfp._io import atomic_path

    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (x,),
            str(tmp),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    diff = float(np.abs(got - ref).max())
    if diff > atol:
        raise ModelError(f"ONNX export disagrees with PyTorch (max abs diff {diff:.2e} > {atol:g})")
    return diff


__all__ = [
    "FORMAT",
    "MANIFEST",
    "OutputLock",
    "check_output_dir",
    "load_pruned",
    "onnx_check",
    "save_pruned",
    "to_torchscript",
    "verify_set",
    "write_set",
]
