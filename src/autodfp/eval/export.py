"""Saving pruned models in forms a user can load without autodfp's internals.

Two forms are written, atomically:

- ``model.ts``: TorchScript (scripted when possible, traced otherwise). ``torch.jit.load`` needs
  nothing but PyTorch.
- ``pruned.pt``: a weights-only checkpoint (state dict + plan + per-group channel counts + the zoo
  name or ``--arch`` factory). :func:`load_pruned` rebuilds the architecture from the zoo entry,
  shrinks it to the recorded widths and loads the tensors; ``torch.load(weights_only=True)``
  opens it safely.

:func:`onnx_check` exports to ONNX and compares onnxruntime's output with PyTorch's.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autodfp._io import atomic_path
from autodfp.errors import ModelError, WeightsError
from autodfp.analysis.graph import find_groups
from autodfp.models.load import build_from_arch, load_checkpoint, load_state_dict_strict
from autodfp.models.registry import ModelConfig, get_config
from autodfp.compress.plan import Plan
from autodfp.compress.surgery import PruneResult, prune_channels

FORMAT = "autodfp.pruned/1"


def to_torchscript(model: nn.Module, input_shape: tuple[int, ...]) -> torch.jit.ScriptModule:
    """Script the model (input-size independent); trace it at ``input_shape`` if scripting fails.

    TorchScript is deprecated upstream in favour of torch.export, but it is still the one format
    that loads with nothing but ``torch.jit.load`` across PyTorch versions, so we keep it.
    """
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return torch.jit.script(model)
        except Exception:  # dynamic Python that scripting cannot compile
            with torch.no_grad():
                return torch.jit.trace(model, torch.zeros(1, *input_shape))


def save_pruned(result: PruneResult, out_dir: str | os.PathLike, config: ModelConfig,
                input_shape: tuple[int, ...], arch: str | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = result.model.eval()
    payload: dict[str, Any] = {
        "format": FORMAT,
        "model": config.name,
        "arch": arch,
        "input_shape": list(input_shape),
        "plan": result.plan.to_dict(),
        "channels": {k: len(v) for k, v in result.kept.items()},
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    paths = {"checkpoint": out / "pruned.pt", "torchscript": out / "model.ts", "plan": out / "plan.json"}
    with atomic_path(paths["checkpoint"]) as tmp:
        torch.save(payload, tmp)
    ts = to_torchscript(model, input_shape)
    with atomic_path(paths["torchscript"]) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(ts, str(tmp))
    result.plan.save(paths["plan"])
    return paths


def load_pruned(path: str | os.PathLike) -> tuple[nn.Module, ModelConfig, Plan]:
    """Rebuild a model saved by :func:`save_pruned` (zoo or ``--arch`` architectures)."""
    path = Path(path)
    if path.is_dir():
        path = path / "pruned.pt"
    payload = load_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsError(f"{path} is not an autodfp pruned checkpoint (missing format '{FORMAT}')")
    if payload.get("arch"):
        net = build_from_arch(payload["arch"])
        config = get_config(payload["model"]) if payload.get("model") else None
    else:
        config = get_config(payload["model"])
        net = config.builder()
    input_shape = tuple(payload["input_shape"])
    graph = find_groups(net.eval(), input_shape)
    pruned = {}
    for name, kept in payload["channels"].items():
        try:
            g = graph.get(name)
        except KeyError:
            raise ModelError(f"{path} names group '{name}' that the rebuilt architecture does not have") from None
        pruned[name] = list(range(kept, g.channels))  # any indices: the widths matter, tensors are loaded next
    prune_channels(net, graph, pruned, input_shape)
    load_state_dict_strict(net, payload["state_dict"], str(path))
    plan = Plan.from_dict(payload["plan"])
    if config is None:
        raise ModelError(f"{path} records no zoo model for its configuration")
    return net.eval(), config, plan


def onnx_check(model: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike,
               atol: float = 1e-4) -> float:
    """Export to ONNX, run it with onnxruntime and return the max abs difference to PyTorch."""
    import numpy as np
    import onnxruntime as ort

    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), (x,), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    diff = float(np.abs(got - ref).max())
    if diff > atol:
        raise ModelError(f"ONNX export disagrees with PyTorch (max abs diff {diff:.2e} > {atol:g})")
    return diff
