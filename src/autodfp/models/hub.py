"""Resolve pretrained weight files: explicit path → offline mirror → user cache → download.

The order mirrors torch.hub, with one addition: ``$AUTODFP_ASSETS`` points at an offline mirror
laid out like ``shared/assets`` (``weights/<file>``), for air-gapped machines and CI. The sha256 is
verified at every step, so a truncated download or a swapped file is caught before it is used.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from autodfp._io import atomic_path
from autodfp.errors import CacheWarning, WeightsError

ENV_ASSETS = "AUTODFP_ASSETS"
ENV_HOME = "AUTODFP_HOME"


def assets_dir() -> Path | None:
    """The offline mirror root, if ``$AUTODFP_ASSETS`` is set."""
    value = os.environ.get(ENV_ASSETS)
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """The user cache (``$AUTODFP_HOME`` or ``~/.cache/autodfp``)."""
    value = os.environ.get(ENV_HOME)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "autodfp"


_WARNED: set[str] = set()


def cache_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot serve as a cache directory (created if missing), or None if it can."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "it is a file"
    except OSError as exc:
        return exc.strerror or exc.__class__.__name__
    if not path.is_dir():
        return "it is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return "it is not writable"
    return None


def usable_cache_dir(path: str | os.PathLike) -> Path | None:
    """``path`` if it can hold cache files, else None after a one-line CacheWarning.

    A cache only saves time, so a read-only home or an ``AUTODFP_HOME`` that names a file must not
    stop a run, least of all after minutes of work whose result could not be saved. Callers check
    this before the work, so the warning comes first; it is given once per directory.
    """
    problem = cache_problem(path)
    if problem is None:
        return Path(path)
    key = str(path)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"cache directory {path} cannot be used ({problem}); continuing without a cache", CacheWarning, stacklevel=2
        )
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_hash(path: Path, sha256: str | None, where: str) -> Path:
    if sha256 is None:
        return path
    digest = sha256_file(path)
    if not digest.startswith(sha256.lower()):
        raise WeightsError(
            f"sha256 mismatch for {path} ({where}): expected {sha256[:16]}…, got {digest[:16]}…; "
            "the file is corrupt or not the expected release"
        )
    return path


def resolve_weights(
    filename: str,
    sha256: str | None,
    url: str | None = None,
    explicit: str | os.PathLike | None = None,
    download: bool = True,
    subdir: str | None = None,
) -> Path:
    """Return a verified local path to ``filename``.

    An explicit path is checked against ``sha256`` only when it has the zoo's file name: a user's
    own fine-tuned file under another name is trusted as given. ``subdir`` is the file's folder in
    the mirror (default ``weights``); the user cache always keeps weights in ``weights/``.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        return _check_hash(path, sha256, "--weights") if path.name == filename else path

    mirror = assets_dir()
    if mirror is not None:
        candidate = mirror / (subdir or "weights") / filename
        if candidate.is_file():
            return _check_hash(candidate, sha256, f"${ENV_ASSETS}")

    cached = cache_dir() / "weights" / filename
    if cached.is_file():
        return _check_hash(cached, sha256, "cache")

    if url is None or not download:
        raise WeightsError(
            f"weights '{filename}' not found: place it at {cached} "
            f"or set {ENV_ASSETS} to a mirror containing {subdir or 'weights'}/{filename}"
        )
    if usable_cache_dir(cached.parent) is None:
        # download for this run only, into a directory removed when the process ends
        scratch = Path(tempfile.mkdtemp(prefix="autodfp-weights-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        cached = scratch / filename
    return _download(url, cached, sha256)


def _download(url: str, dest: Path, sha256: str | None) -> Path:
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out)
            _check_hash(tmp, sha256, f"download from {url}")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise WeightsError(
            f"could not download {url} ({exc.__class__.__name__}: {exc}); without network access, "
            f"place the file at {dest} or set {ENV_ASSETS} to a mirror containing weights/{dest.name}"
        ) from None
    return dest
