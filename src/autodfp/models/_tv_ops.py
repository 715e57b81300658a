"""Pure-torch stand-ins for torchvision's ``nms``/``qnms`` when its compiled ops cannot load.

A torchvision wheel built for another torch (a CUDA build next to a CPU-only torch, say) cannot
load its ``_C`` extension. torchvision tolerates that, but its ``_meta_registrations`` then
registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and
``import torchvision`` (and so ``import timm``) dies with ``operator torchvision::nms does not
exist``.

:func:`ensure_torchvision_ops` fixes that without importing torchvision. It installs a one-shot
import hook on ``torchvision.extension``: right after that module has tried to load ``_C`` (and
before ``_meta_registrations`` runs), the two op schemas are defined with :mod:`torch.library`,
backed by :func:`nms`, **only if** the compiled library did not provide them. Defining them
any earlier would be wrong: a working ``_C`` defines the same schemas when it loads, and a
duplicate definition inside a library's static initialiser aborts the process. A second hook on
``torchvision.ops`` lets ``torchvision.ops.nms`` (and ``batched_nms``, which calls it) skip
torchvision's "Couldn't load custom C++ ops" check, but only when the fallback is active; the
other compiled ops (``roi_align``, ``deform_conv2d`` …) keep torchvision's own error.

If torchvision is already (partly) imported when this runs, the ops are defined at once when
they are missing, so a retried ``import torchvision`` succeeds.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB: torch.library.Library | None = None  # keeps our registrations alive
_FINDER: _PostImportFinder | None = None


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression with torchvision's semantics, in pure torch.

    ``boxes`` (N, 4) as ``(x1, y1, x2, y2)``, ``scores`` (N,). Returns the int64 indices of the
    kept boxes in decreasing score order (ties in input order). A box is dropped when its IoU
    with an already kept, higher-scoring box is strictly greater than ``iou_threshold``; areas are
    ``(x2 − x1)·(y2 − y1)`` without a +1, as in torchvision. Time O(K·N) for K kept boxes, memory
    O(N).
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes should be a (N, 4) tensor, got shape {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores should be a ({boxes.shape[0]},) tensor, got shape {tuple(scores.shape)}")
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    if not b.is_floating_point():
        b = b.double()
    x1, y1, x2, y2 = b.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    alive = torch.ones(n, dtype=torch.bool, device=boxes.device)
    keep: list[int] = []
    for i in range(n):  # the loop only visits boxes still alive, i.e. K iterations of real work
        if not bool(alive[i]):
            continue
        keep.append(i)
        rest = slice(i + 1, n)
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp_min(0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp_min(0)
        inter = w * h
        iou = inter / (area[i] + area[rest] - inter)
        alive[rest] &= ~(iou > iou_threshold)  # NaN (0/0 for empty boxes) never suppresses
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def _qnms(dets: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    # torchvision passes the integer representation; IoU is invariant to the shared scale and
    # zero point, so plain NMS on the integers is the quantised result.
    return nms(dets.double(), scores.double(), iou_threshold)


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def fallback_active() -> bool:
    """Whether the ops were defined here (torchvision's compiled library did not provide them)."""
    return _LIB is not None


def define_missing_ops() -> list[str]:
    """Define whichever of ``torchvision::nms``/``qnms`` does not exist yet; returns their names.

    Only call this once torchvision's own ``_C`` has had its chance to load (or when torchvision is
    not going to be imported): see the module docstring.
    """
    global _LIB
    missing = [name for name in _SCHEMAS if not _has_op(name)]
    if not missing:
        return []
    lib = _LIB if _LIB is not None else torch.library.Library("torchvision", "FRAGMENT")
    impls = {"nms": nms, "qnms": _qnms}
    for name in missing:
        lib.define(_SCHEMAS[name])
        lib.impl(name, impls[name], "CompositeExplicitAutograd")
    _LIB = lib
    return missing


def _ops_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.nms`` without the compiled-ops check (the fallback serves both ops)."""
    if not torch.jit.is_scripting() and boxes.is_quantized:
        return torch.ops.torchvision.qnms(boxes.int_repr(), scores.int_repr(), iou_threshold)
    return torch.ops.torchvision.nms(boxes, scores, iou_threshold)


def _after_extension(module: object) -> None:
    has_ops = getattr(module, "_has_ops", None)
    if has_ops is None or not has_ops():
        define_missing_ops()


def _after_ops(module: Any) -> None:
    if not fallback_active():
        return
    boxes: Any = sys.modules.get("torchvision.ops.boxes")
    original = getattr(boxes, "nms", None)
    if original is None or original is _ops_nms:
        return
    _ops_nms.__doc__ = original.__doc__
    boxes.nms = _ops_nms  # batched_nms looks nms up here at call time
    if getattr(module, "nms", None) is original:
        module.nms = _ops_nms


_HOOKS: dict[str, Callable[[object], None]] = {
    "torchvision.extension": _after_extension,
    "torchvision.ops": _after_ops,
}


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, hook: Callable[[object], None]) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._hook(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs a hook right after the named modules execute; delegates the finding to the others."""

    def find_spec(self, fullname, path, target=None):
        hook = _HOOKS.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookedLoader(spec.loader, hook)
        return spec


def ensure_torchvision_ops() -> None:
    """Make ``import torchvision`` work without its compiled ops; cheap, never imports torchvision.

    Idempotent. Installs the import hooks described in the module docstring; where torchvision's
    modules are already loaded, applies their effect at once.
    """
    global _FINDER
    ext = sys.modules.get("torchvision.extension")
    if ext is not None:
        _after_extension(ext)
    ops = sys.modules.get("torchvision.ops")
    if ops is not None:
        _after_ops(ops)
    if _FINDER is None and not all(m in sys.modules for m in _HOOKS):
        if importlib.util.find_spec("torchvision") is None:
            return  # not installed: nothing will need the ops
        _FINDER = _PostImportFinder()
        sys.meta_path.insert(0, _FINDER)


__all__ = ["define_missing_ops", "ensure_torchvision_ops", "fallback_active", "nms"]
