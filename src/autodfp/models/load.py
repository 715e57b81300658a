"""Turn a model spec (zoo name, ``--arch`` factory + state dict, or trusted pickle) into a module.

Checkpoints are loaded with ``weights_only=True`` unless the user opts in with ``trust_pickle``:
a pickle can run arbitrary code, and a pretrained-model tool is exactly where one would hide.
They are also memory-mapped, so a tensor's shape is checked against the model before its bytes
are read: a hostile file cannot make us allocate what it claims to hold. A loaded model is checked
for NaN/Inf and impossible BatchNorm variances, which would otherwise prune and score as if fine.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pickle
import sys
import weakref
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autodfp.errors import ModelError, WeightsError
from autodfp.models.hub import resolve_weights
from autodfp.models.layers import ChannelPadShortcut
from autodfp.models.registry import TF_IMAGENET_PRE, ModelConfig, get_config, is_registered


def _check_records(path: Path) -> bool:
    """Whether ``path`` is a zip checkpoint; refuse one whose records are compressed.

    ``torch.save`` stores every record uncompressed (that is what lets it be memory-mapped). A
    deflated record is a re-packed or crafted file, and one of a few megabytes can inflate to
    gigabytes when read, so it is refused from the zip directory alone, before any data is read.
    """
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise WeightsError(
                        f"{path} has a compressed record '{info.filename}' ({info.file_size} bytes "
                        "once inflated); torch.save never compresses, so the file was re-packed or "
                        "crafted: refusing it"
                    )
    except (zipfile.BadZipFile, OSError, ValueError):
        return True  # let torch.load report the damage in its own words
    return True


def load_checkpoint(path: str | os.PathLike, trust_pickle: bool = False, mmap: bool | None = None) -> Any:
    """Read a checkpoint on the CPU, refusing pickled code unless ``trust_pickle``.

    ``mmap`` (default: on for weights-only loads of zip checkpoints) maps tensors from the file
    instead of reading them, so nothing is allocated until a tensor is copied; copy tensors out
    (``load_state_dict`` does) rather than keeping them, since they are backed by the file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    is_zip = _check_records(path)
    use_mmap = (not trust_pickle if mmap is None else mmap) and is_zip
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        if not trust_pickle and ("Unsupported global" in str(exc) or "GLOBAL" in str(exc)):
            raise WeightsError(
                f"{path} is not a weights-only checkpoint (it contains pickled code objects); "
                "load it with trust_pickle=True only if you trust its source"
            ) from None
        raise WeightsError(f"{path} is corrupt or not a PyTorch checkpoint (cannot unpickle it)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise WeightsError(f"{path} is corrupt or not a PyTorch checkpoint ({first})") from None


def extract_state_dict(obj: Any, key: str | None = None, source: str | None = None) -> dict[str, torch.Tensor]:
    """Unwrap common checkpoint containers and strip DataParallel's ``module.`` prefix."""
    where = f"{source}: " if source else ""
    if key is not None and isinstance(obj, dict) and key in obj:
        obj = obj[key]
    elif isinstance(obj, dict):
        for k in ("state_dict", "model_state_dict", "model"):
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{where}checkpoint does not contain a state dict of tensors")
    bad = next((k for k in obj if not isinstance(k, str)), None)
    if bad is not None:
        shown = " ".join(repr(bad).split())[:60]
        raise WeightsError(f"{where}state dict key {shown} is a {type(bad).__name__}, not a string")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _dtype_compatible(want: torch.dtype, got: torch.dtype) -> bool:
    """Whether a checkpoint tensor of dtype ``got`` may be copied into a model tensor of ``want``.

    Between floating dtypes (float16, bfloat16, float64 into float32) the copy is a rounding and
    fine. Anything else changes the values' meaning while ``copy_`` casts silently: int32 weights
    into float parameters loaded and scored 10.94 % with no message, and a complex64 state dict
    lost its imaginary part with only a torch warning. Integer buffers (BN's ``num_batches_tracked``,
    int64) take any integer dtype, never a float or a bool.
    """
    if got.is_complex or got == torch.bool:
        return want == got
    if want.is_floating_point:
        return got.is_floating_point
    if want == torch.bool or want.is_complex:
        return want == got
    return not got.is_floating_point  # an integer (or quantised) buffer: any integer dtype


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``: the same keys (less optional buffers), shapes and dtype kinds.

    ``load_state_dict(strict=True)`` reports missing keys but casts any dtype silently; a mismatch
    of keys or shapes is a :class:`ModelError` (another architecture), a dtype that cannot hold the
    model's values a :class:`WeightsError` naming the first such key (see :func:`_dtype_compatible`).
    """
    own = model.state_dict()
    # Buffers whose defaults are right for an unpruned model may be absent from upstream files:
    # BN's step counter, and the channel map of the option-A shortcut (added by this library).
    optional = {f"{name}.src" for name, m in model.named_modules() if isinstance(m, ChannelPadShortcut)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked") and k not in optional]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}")
        if shape:
            k = shape[0]
            parts.append(f"shape mismatch at {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise ModelError(f"{source} does not match the architecture: " + "; ".join(parts))
    bad = next((k for k in own if k in state and not _dtype_compatible(own[k].dtype, state[k].dtype)), None)
    if bad is not None:
        got, want = str(state[bad].dtype).removeprefix("torch."), str(own[bad].dtype).removeprefix("torch.")
        raise WeightsError(
            f"{source}: tensor '{bad}' is {got} but the model's is {want}; refusing to cast it (the values "
            "would change meaning: a float weight read as integers, a complex one without its imaginary part)"
        )
    model.load_state_dict(state, strict=False)


@contextlib.contextmanager
def _cwd_on_path() -> Any:
    """Let ``import`` find modules in the working directory, as ``python -m`` does, for one import."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written since the last import must be seen
    try:
        yield
    finally:
        try:
            sys.path.remove(cwd)  # the first occurrence: the one inserted above
        except ValueError:
            pass


def _exc_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def build_from_arch(arch: str) -> nn.Module:
    """Call ``package.module:factory`` and return the module it builds.

    The user's own code is imported and run here, so anything it does wrong (a syntax error, an
    exception at import or call time, a factory that needs arguments) is reported as a ModelError
    naming ``arch`` rather than escaping as an internal error.
    """
    mod_name, sep, fn_name = str(arch).partition(":")
    mod_name, fn_name = mod_name.strip(), fn_name.strip()
    if (
        not sep
        or not mod_name
        or not fn_name
        or not all(p.isidentifier() for p in mod_name.split("."))
        or not fn_name.isidentifier()
    ):
        raise ModelError(f"arch must look like package.module:factory, got '{arch}'")
    try:
        with _cwd_on_path():
            module = importlib.import_module(mod_name)
    except SyntaxError as exc:
        where = f"{Path(exc.filename).name}, line {exc.lineno}" if exc.filename else f"line {exc.lineno}"
        raise ModelError(f"cannot import '{mod_name}' for arch {arch}: syntax error ({where})") from None
    except (Exception, SystemExit) as exc:  # the user's module ran and failed (or exited): report it
        raise ModelError(f"cannot import '{mod_name}' for arch {arch} ({_exc_line(exc)})") from None
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise ModelError(f"'{fn_name}' is not a callable in '{mod_name}' (arch {arch})")
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        required = [
            p.name
            for p in sig.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        if required:
            raise ModelError(
                f"arch {arch}: '{fn_name}' needs arguments ({', '.join(required)}); "
                "arch must name a factory that can be called without arguments"
            )
    try:
        model = factory()
    except (Exception, SystemExit) as exc:  # sys.exit() in a factory must not end autodfp with its code
        raise ModelError(f"arch {arch}: calling '{fn_name}()' failed ({_exc_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"arch {arch} returned {type(model).__name__}, not an nn.Module")
    return model


#: modules built from a zoo entry, so that a module passed on keeps its preprocessing and classes
_ZOO_MODULES: weakref.WeakKeyDictionary[nn.Module, ModelConfig] = weakref.WeakKeyDictionary()


def zoo_config_of(module: nn.Module) -> ModelConfig | None:
    """The zoo config a module was built from by :func:`load_model`, if it was."""
    return _ZOO_MODULES.get(module)


_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse a model whose weights or statistics are NaN/Inf, or whose BN variances are negative.

    Such a model runs without error: every channel scores the same, so nothing is pruned, and its
    accuracy is reported as if it were a result. ``source`` (a file, or a description of where the
    model came from) starts the message. A BN variance of exactly 0 is accepted when ``eps`` is
    positive: channels that were dead in training decay to 0 (MobileNet-V1 has variances of 4e-35),
    and BN stays finite for them; a negative variance, or ``var + eps <= 0``, cannot be.
    """
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:  # shapes without storage: every later step would fail with a raw RuntimeError
            raise ModelError(
                f"{source}: tensor '{name}' is on the meta device (allocated, never loaded); materialise the "
                "model first (model.to_empty(device='cpu') and load_state_dict)"
            )
        if t.is_floating_point() or t.is_complex():
            if not bool(torch.isfinite(t.detach()).all()):
                raise ModelError(f"{source}: tensor '{name}' has non-finite values")
    for name, m in model.named_modules():
        running_var = getattr(m, "running_var", None) if isinstance(m, _BN_TYPES) else None
        if running_var is not None:
            var = running_var.detach()
            tensor = f"{name}.running_var" if name else "running_var"
            if bool((var < 0).any()):
                raise ModelError(f"{source}: tensor '{tensor}' has negative values (a BatchNorm variance cannot be)")
            if bool((var + m.eps <= 0).any()):
                raise ModelError(
                    f"{source}: tensor '{tensor}' has zeros and eps is {m.eps:g}: BatchNorm would divide by zero"
                )


def load_model(
    model: str,
    weights: str | os.PathLike | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    like: str | None = None,
    pretrained: bool = True,
) -> tuple[nn.Module, ModelConfig]:
    """Build a model in eval mode with its config.

    ``model`` is a zoo name, or (with ``arch`` or ``trust_pickle``) a label for the user's model.
    ``like`` borrows preprocessing, classes and default dataset from a zoo entry for user models.
    """
    if is_registered(model) and arch is None:
        cfg = get_config(model)
        net = cfg.builder()
        if pretrained and cfg.weights is not None:
            path = resolve_weights(
                cfg.weights.filename, cfg.weights.sha256, cfg.weights.url, weights, subdir=cfg.weights.subdir
            )
            state = extract_state_dict(load_checkpoint(path), cfg.weights.key, str(path))
            load_state_dict_strict(net, state, str(path))
            check_finite(net, str(path))
        _ZOO_MODULES[net] = cfg
        return net.eval(), cfg

    base = get_config(like) if like else None
    if arch is not None:
        net = build_from_arch(arch)
        source = f"arch {arch}"
        if weights is not None:
            source = str(weights)
            state = extract_state_dict(load_checkpoint(weights, trust_pickle=False), source=source)
            load_state_dict_strict(net, state, source)
    elif trust_pickle:
        src = weights if weights is not None else model
        obj = load_checkpoint(src, trust_pickle=True)
        if not isinstance(obj, nn.Module):
            raise ModelError(f"{src} does not contain a pickled nn.Module (got {type(obj).__name__})")
        net, source = obj, str(src)
    else:
        if Path(model).suffix in {".pt", ".pth", ".th", ".pkl"} or Path(model).is_file():
            raise ModelError(
                f"'{model}' is not a zoo model; pass arch=package.module:factory to load it as a state dict, "
                "or trust_pickle=True to unpickle a full module (this can run arbitrary code)"
            )
        get_config(model)  # raises the 'unknown model' error with the list of known names
        raise AssertionError("unreachable")

    check_finite(net, source)

    if base is not None:
        cfg = replace(base, name=model, builder=lambda: net, weights=None)
    else:
        cfg = ModelConfig(
            name=model,
            builder=lambda: net,
            weights=None,
            preprocessing=replace(TF_IMAGENET_PRE, guessed=True),
            num_classes=0,
            description="user model",
        )
    return net.eval(), cfg
