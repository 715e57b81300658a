"""Resolve pretrained weight files: explicit path → offline mirror → user cache → download.

The order mirrors torch.hub, with one addition: ``$AUTODFP_ASSETS`` points at an offline mirror
laid out like ``shared/assets`` (``weights/<file>``), for air-gapped machines and CI. The sha256 is
verified at every step, so a truncated download or a swapped file is caught before it is used.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from autodfp._io import atomic_path
from autodfp.errors import WeightsError

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
) -> Path:
    """Return a verified local path to ``filename``.

    An explicit path is checked against ``sha256`` only when it has the zoo's file name: a user's
    own fine-tuned file under another name is trusted as given.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        return _check_hash(path, sha256, "--weights") if path.name == filename else path

    mirror = assets_dir()
    if mirror is not None:
        candidate = mirror / "weights" / filename
        if candidate.is_file():
            return _check_hash(candidate, sha256, f"${ENV_ASSETS}")

    cached = cache_dir() / "weights" / filename
    if cached.is_file():
        return _check_hash(cached, sha256, "cache")

    if url is None or not download:
        raise WeightsError(
            f"weights '{filename}' not found: place it at {cached} "
            f"or set {ENV_ASSETS} to a mirror containing weights/{filename}"
        )
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
