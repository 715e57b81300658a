"""The one image-folder walker: every listing of image files in autodfp goes through here.

A dataset directory is user input, and a directory tree is not a tree once symlinks are followed:
``ln -s . a; ln -s . b`` inside a class folder makes ``os.walk(followlinks=True)`` exponential, a
single self-link counts every file three times, and a FIFO named ``x.png`` blocks the first
``open`` forever. The walker here therefore

* yields **regular files only** (a symlink to a regular file is fine; a FIFO, socket, device or
  directory named ``*.png`` is skipped and never opened),
* enters **each directory at most once** per walk, keyed by ``(st_dev, st_ino)``, and never one
  of the walk root's ancestors, so symlink cycles are cut and the work is linear in the size of
  the real tree,
* counts a file reached twice (through symlinks or hard links) **once**, keyed by its inode,
* is **lazy** (a generator, each directory sorted by name, so the order is deterministic and a
  ``limit`` stops the walk early), and
* is **bounded**: a :class:`WalkBudget` caps the number of directory entries examined, so a
  symlink to ``/`` costs a clear :class:`~autodfp.errors.DataError`, not an afternoon.

Hidden entries (names starting with ``.``) are skipped, files and folders alike, as before.
Symlinks that lead outside the root are followed (symlink farms are a common way to build an
evaluation subset); only the root's own ancestors are fenced off, since entering one always
re-enters the root.

:func:`printable` escapes control characters in names before they go into a message, so that a
folder named with terminal escape sequences cannot rewrite the user's terminal.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from autodfp.errors import DataError, printable

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_WALK_ENTRIES",
    "ImageFile",
    "WalkBudget",
    "dir_identity",
    "enclosing",
    "is_image_name",
    "iter_image_files",
    "iter_images",
    "list_dirs",
    "open_regular",
    "printable",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

#: Directory entries one dataset may examine before the walk is refused. ImageNet's train split
#: is 1.3 million files; ten million leaves room for any real evaluation set while a symlink to
#: ``/`` or a home directory is stopped after seconds.
MAX_WALK_ENTRIES = 10_000_000

_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_OPEN = os.O_RDONLY | _O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_O_OPEN |= getattr(os, "O_BINARY", 0)


def is_image_name(name: str) -> bool:
    """Whether ``name`` is listed as an image: a known extension and not hidden (``.*``).

    Hidden files are skipped because macOS's ``._photo.jpg`` resource forks and editors' backup
    files carry image extensions but hold no image.
    """
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class WalkBudget:
    """A cap on the directory entries examined, shared by all the walks that build one dataset.

    Cycle detection makes a walk linear in the real tree, but a symlink may still lead to a huge
    one (``/``); the budget turns that into one clear error instead of minutes of silent work.
    """

    def __init__(self, max_entries: int = MAX_WALK_ENTRIES) -> None:
        self.max_entries = max_entries
        self.left = max_entries

    def spend(self, root: str | os.PathLike[str]) -> None:
        """Count one directory entry; raise once more than ``max_entries`` have been examined."""
        self.left -= 1
        if self.left < 0:
            raise DataError(
                f"{printable(root)}: more than {self.max_entries} directory entries examined while "
                "looking for images; a symlink in it may lead to a very large tree (such as / or a home folder)"
            )


class ImageFile(NamedTuple):
    """One image file found by a walk.

    :param path: the path as reached from the walk's root (symlinks not resolved)
    :param key: the file's identity, ``st_dev`` and ``st_ino`` in one int (equal for two paths to one file)
    """

    path: Path
    key: int


def dir_identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the directory ``path`` (symlinks followed); ``None`` if it is none."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def enclosing(path: str | os.PathLike[str]) -> set[tuple[int, int]]:
    """Identities of the directory ``path`` and of its real ancestors.

    A walk below ``path`` must never enter one of these: each of them contains ``path`` again, so
    entering it repeats the walk (``up -> ..``) or widens it to the whole disk (``top -> /``).
    """
    out: set[tuple[int, int]] = set()
    ident = dir_identity(path)
    if ident is not None:
        out.add(ident)
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError):
        return out
    for parent in real.parents:
        ident = dir_identity(parent)
        if ident is not None:
            out.add(ident)
    return out


def _file_key(st: os.stat_result, path: str) -> int:
    if st.st_ino == 0:  # DirEntry.stat() on Windows leaves the inode out; os.stat fills it in
        try:
            st = os.stat(path)
        except OSError:
            pass
    return (st.st_dev << 64) | st.st_ino


def list_dirs(root: str | os.PathLike[str], budget: WalkBudget | None = None) -> list[str]:
    """Sorted names of the non-hidden sub-directories of ``root`` (a symlink to a directory counts).

    These are the class folders of an ImageFolder tree. Dangling or looping links are not
    directories. An unreadable ``root`` raises :class:`OSError`, for the caller to word.
    """
    budget = budget if budget is not None else WalkBudget()
    names: list[str] = []
    with os.scandir(root) as it:
        for entry in it:
            budget.spend(root)
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    names.append(entry.name)
            except OSError:
                continue
    return sorted(names)


def iter_image_files(
    root: str | os.PathLike[str],
    *,
    recursive: bool = True,
    budget: WalkBudget | None = None,
    exclude: Collection[tuple[int, int]] = (),
) -> Iterator[ImageFile]:
    """Regular image files under ``root``, lazily, in a deterministic order (duplicates included).

    The order is ``os.walk``'s top-down order with sorted names: a directory's own images, then
    each sub-directory in turn. Each directory is entered at most once (by ``(st_dev, st_ino)``)
    and never one of ``root``'s ancestors or an identity in ``exclude``, so the walk is linear in
    the real tree whatever its symlinks do. A file reached through two links is yielded twice
    with the same :attr:`ImageFile.key`; :func:`iter_images` removes those. Unreadable
    sub-directories and entries that vanish or dangle are skipped (as ``os.walk`` does); an
    unreadable or missing ``root`` yields nothing.

    :param recursive: descend into sub-directories (otherwise ``root``'s own images only)
    :param budget: the cap on entries examined, shared when several walks build one dataset
    :param exclude: directory identities never to enter (e.g. the dataset root, from a class folder)
    """
    budget = budget if budget is not None else WalkBudget()
    top = Path(root)
    start = dir_identity(top)
    if start is None:
        return
    visited = (enclosing(top) - {start}) | set(exclude)
    stack: list[tuple[Path, tuple[int, int]]] = [(top, start)]
    while stack:
        where, ident = stack.pop()
        if ident in visited:
            continue
        visited.add(ident)
        files: list[tuple[str, int]] = []
        dirs: list[tuple[str, tuple[int, int]]] = []
        try:
            with os.scandir(where) as it:
                for entry in it:
                    budget.spend(root)
                    name = entry.name
                    if name.startswith("."):
                        continue
                    image = is_image_name(name)
                    try:
                        if not image and not (recursive and entry.is_dir()):
                            continue
                        st = entry.stat()  # follows symlinks; never opens the file
                    except OSError:  # dangling link, link loop, vanished entry
                        continue
                    if stat.S_ISREG(st.st_mode):
                        if image:
                            files.append((name, _file_key(st, entry.path)))
                    elif recursive and stat.S_ISDIR(st.st_mode):
                        sub = (st.st_dev, st.st_ino)
                        if sub not in visited:
                            dirs.append((name, sub))
                    # FIFOs, sockets and devices fall through: never images, never opened
        except OSError:
            continue
        files.sort()
        for name, key in files:
            yield ImageFile(where / name, key)
        dirs.sort(reverse=True)  # popped in sorted order
        stack.extend((where / name, sub) for name, sub in dirs)


def iter_images(
    root: str | os.PathLike[str],
    *,
    recursive: bool = True,
    limit: int | None = None,
    budget: WalkBudget | None = None,
) -> Iterator[Path]:
    """Distinct regular image files under ``root``, lazily, in :func:`iter_image_files`' order.

    A file reached through several links is yielded once, at its first path. ``limit`` stops the
    walk after that many images, so ``--limit 8`` on a huge tree reads a few directories only.
    """
    if limit is not None and limit < 1:
        return
    seen: set[int] = set()
    for found in iter_image_files(root, recursive=recursive, budget=budget):
        if found.key in seen:
            continue
        seen.add(found.key)
        yield found.path
        if limit is not None and len(seen) >= limit:
            return


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file, without ever blocking.

    A FIFO blocks ``open`` until a writer appears and a device may never end, so the mode is
    checked with ``stat`` before opening, the open itself is non-blocking, and ``fstat`` checks
    the opened descriptor again (the path may have been swapped in between). Anything but a
    regular file, or a file that cannot be opened, is a one-line :class:`DataError` naming it.
    """
    shown = printable(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"cannot read image {shown}: it is {_kind(st.st_mode)}, not a regular file")
        fd = os.open(path, _O_OPEN)
    except OSError as exc:
        raise DataError(f"cannot read image {shown}: {printable(exc.strerror or exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"cannot read image {shown}: it is {_kind(st.st_mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
