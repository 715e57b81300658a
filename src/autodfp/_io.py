"""Atomic file writes: a crash or Ctrl-C never leaves a half-written artefact behind."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

_UMASK: int | None = None


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file: ``mkstemp`` ignores the umask (0600)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)  # the only portable way to read it: set and restore at once
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(dest: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Run ``writer(tmp_path)`` and atomically move the result to ``dest``."""
    with atomic_path(dest) as tmp:
        writer(tmp)
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike, text: str) -> Path:
    def write(p: Path) -> None:
        p.write_text(text)

    return atomic_write(dest, write)


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    def write(p: Path) -> None:
        p.write_bytes(data)

    return atomic_write(dest, write)
