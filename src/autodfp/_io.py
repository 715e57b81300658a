"""Atomic file writes: a crash or Ctrl-C never leaves a half-written artefact behind.

Files are written to a ``mkstemp`` file and renamed into place. ``mkstemp`` creates files with
mode 0600 whatever the umask, so the finished file is given the mode an ordinary ``open`` would
have given it (0666 less the umask): artefacts and caches stay readable by whoever the user's
umask says should read them.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_UMASK: int | None = None
_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask, read once without changing it where the OS allows."""
    global _UMASK
    if _UMASK is None:
        with _UMASK_LOCK:
            if _UMASK is None:
                _UMASK = _read_umask()
    return _UMASK


def _read_umask() -> int:
    try:  # Linux >= 4.7 reports it; no window in which the umask is changed
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            m = re.search(r"^Umask:\s*([0-7]+)", f.read(), re.MULTILINE)
        if m:
            return int(m.group(1), 8)
    except OSError:
        pass
    old = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file."""
    return 0o666 & ~umask()


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
