"""The output directory (OUT): the one component that writes under it.

Users point ``--out`` (or :func:`autodfp.save`) at folders of their own: an empty variable, a
project folder, a link. Everything autodfp writes there goes through this module, under four rules.

**Only autodfp's own files are replaced or deleted.** An entry of OUT is autodfp's when the
manifest of an earlier set (``manifest.json``, validated) lists it and it is a regular file; so are
the lock file, ``.staging-*`` folders holding staged set files, and a ``search/`` folder with the
checkpoint layout of :mod:`autodfp.search.checkpoint`. Everything else is the user's. A folder
holding any of the user's entries is refused before a run does any work
(:func:`claim_output_dir`), unless the caller asks to write beside them (``overwrite=True``,
``--force``); even then they are kept, and a set that needs a name one of them holds is refused.

**One set, never a mix.** Files are staged in a fresh hidden folder inside OUT. Before the first
rename, a *pending* manifest lists every name the swap may touch (the old set's and the new one's)
so that a kill at any moment leaves a folder whose files are still known to be autodfp's, and
which loads refuse; the sealed manifest, written last, lists the new set with its sha256 digests.
:func:`verify_set` accepts only a sealed manifest that lists every file of the set present.

**No write through a link.** Files are created with ``O_EXCL | O_NOFOLLOW`` in the staging folder
and renamed into place (a rename replaces a link, never its target); the lock file is opened with
``O_NOFOLLOW``; a link at a name the set uses is the user's entry, never replaced. OUT itself may
be a link to a folder (a common setup): it is resolved once, so the set cannot end up split
between two folders if the link changes mid-write.

**Every path problem is one line.** An empty path, a name too long, a dangling link, a link loop,
a folder that cannot be created: each is an :class:`~autodfp.errors.OutputDirError` naming the
path and the reason, never an ``OSError`` traceback.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autodfp._jsonio import read_json
from autodfp.errors import AutoDFPError, OutputDirError, WeightsError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "autodfp.output/1"
#: a manifest written before the swap: it lists every name the swap may touch, and never loads
PENDING_FORMAT = "autodfp.output-pending/1"
LOCK = ".autodfp.lock"
#: where a resumable search keeps its checkpoints
SEARCH_DIR = "search"
#: every file a save may write; a save removes those of the old set it does not write, so no stale one survives
SET_FILES = ("pruned.pt", "model.ts", "plan.json", "report.json", "search.json", "ratios.png", "rewards.png")
#: the files without which a set cannot be loaded
REQUIRED_FILES = ("pruned.pt", "model.ts", "plan.json")
#: the sets of the other commands that write an OUT (``proxy-check``, ``bench``): the same rules,
#: their own file names, nothing required
REPORT_SETS: Mapping[str, tuple[str, ...]] = {
    "proxy": ("proxy.json", "proxy.png"),
    "bench": ("bench.md", "bench.json", "bench.png"),
    "latency": ("latency.json", "latency.png"),
}
#: every name any set may hold
ALL_SET_FILES = (*SET_FILES, *(n for names in REPORT_SETS.values() for n in names))
_STAGING = re.compile(r"\.staging-[a-z0-9_]{8}")  # what tempfile.mkdtemp(prefix=".staging-") makes
_SHA256 = re.compile(r"[0-9a-f]{64}")

#: flags that keep ``os.open`` from following a link at the last component (0 where the OS has none)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

_HELD: set[str] = set()  # the OUTs this process holds an OutputLock on (real paths)
_HELD_LOCK = threading.Lock()


# -- paths -----------------------------------------------------------------------------------------
def output_path(text: str | os.PathLike[str]) -> Path:
    """``text`` as an output directory path, refusing an empty one.

    ``Path("")`` is ``Path(".")``: an empty ``--out`` (an unset shell variable) would silently mean
    the working directory, and a save there replaced the user's files. The CLI parses ``--out``
    with this function, so the raw text is checked before it becomes a ``Path``.
    """
    raw = os.fsdecode(os.fspath(text))
    if not raw.strip():
        raise OutputDirError("the output directory path is empty; name a directory")
    if "\0" in raw:
        raise OutputDirError(f"output directory {raw!r} contains a NUL character")
    return Path(raw)


def _reason(exc: OSError) -> str:
    """The words for an ``OSError`` on a path: short, and the same for every caller."""
    if exc.errno == errno.ENAMETOOLONG:
        return "name too long"
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return exc.strerror or exc.__class__.__name__


def _path_error(
    path: Path,
    exc: OSError,
    doing: str | None = None,
    what: str = "output directory",
    error: type[AutoDFPError] = OutputDirError,
) -> AutoDFPError:
    """One line for an ``OSError`` on ``path``: ``what path: reason`` or ``what path doing (reason)``."""
    reason = _reason(exc)
    if doing is None or exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):
        return error(f"{what} {path}: {reason}")
    return error(f"{what} {path} {doing} ({reason})")


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of ``path`` that exists: it must be a directory (a parent created later
    would fail), and a dangling link on the way is named rather than reported as "File exists"."""
    for parent in path.parents:
        try:
            st = os.stat(parent)
        except (FileNotFoundError, NotADirectoryError):
            if os.path.islink(parent):
                raise OutputDirError(f"output directory {path} lies under {parent}, a dangling symbolic link") from None
            continue
        except OSError as exc:
            raise _path_error(path, exc) from None
        if not stat.S_ISDIR(st.st_mode):
            raise OutputDirError(f"output directory {path} lies under {parent}, which is a file, not a directory")
        return parent
    return Path(".")  # not reached: "/" or "." always exists


def check_output_dir(out: str | os.PathLike[str]) -> Path:
    """Fail now, not after a search: OUT must be a directory (or creatable) that we can write.

    Checks the path only (it writes nothing, so a refused run leaves no trace); whose files OUT
    holds is :func:`claim_output_dir`'s question. Returns OUT as the caller named it.
    """
    path = output_path(out)
    try:
        st: os.stat_result | None = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError):
            raise OutputDirError(f"output directory {path!r} is not a valid path") from None
        raise _path_error(path, exc) from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise OutputDirError(f"output directory {path} is a dangling symbolic link") from None
        except OSError as exc:
            raise _path_error(path, exc) from None
    if st is None:
        where = _existing_ancestor(path)
    elif not stat.S_ISDIR(st.st_mode):
        raise OutputDirError(f"output directory {path} is a file, not a directory")
    else:
        where = path
    if not os.access(where, os.W_OK | os.X_OK):
        raise OutputDirError(f"output directory {path} cannot be written (no write permission on {where})")
    return path


def _create(path: Path) -> None:
    """``mkdir -p`` with every failure as one line (a path under ``/proc``, a read-only disk)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _path_error(path, exc, "cannot be created") from None


def ensure_dir(path: str | os.PathLike[str], *, what: str, error: type[AutoDFPError] = OutputDirError) -> Path:
    """Create ``path`` (and its parents) and check that it is a real directory, not a link.

    For folders autodfp writes inside OUT (the search checkpoints): a link planted at their name
    would send the writes outside OUT, so it is refused rather than followed.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a link or a file: named below
    except OSError as exc:
        raise _path_error(path, exc, "cannot be created", what=what, error=error) from None
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise _path_error(path, exc, what=what, error=error) from None
    if stat.S_ISLNK(st.st_mode):
        raise error(f"{what} {path} is a symbolic link; autodfp does not write through links (remove it)")
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is not a directory")
    return path


# -- manifests -------------------------------------------------------------------------------------
def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: what a manifest may hold besides ``format`` and ``files``: ``"torchscript": null`` says the set
#: has no ``model.ts`` on purpose (the model could not be exported, or the caller asked for none)
_MANIFEST_KEYS = ("format", "files", "torchscript")


def _parse_manifest(path: Path, error: type[AutoDFPError]) -> tuple[str, dict[str, str]]:
    """``(format, files)`` of the manifest at ``path``, its types checked strictly.

    Read with the bounded JSON reader, so a huge or deeply nested file is one line too.
    """
    what = f"manifest {path}"
    doc = read_json(path, what, error=error)
    if not isinstance(doc, dict):
        raise error(f"{what} is damaged (not a JSON object); prune again")
    fmt, files = doc.get("format"), doc.get("files")
    if fmt not in (MANIFEST_FORMAT, PENDING_FORMAT):
        raise error(f"{what} is not an autodfp manifest (format {_short(fmt)}); prune again")
    if not isinstance(files, dict):
        raise error(f"{what} is damaged ('files' is not an object); prune again")
    odd = next((k for k in doc if k not in _MANIFEST_KEYS), None)
    if odd is not None or ("torchscript" in doc and doc["torchscript"] is not None):
        raise error(f"{what} is damaged (unexpected entry {_short(odd or 'torchscript')}); prune again")
    for name, digest in files.items():
        if name not in ALL_SET_FILES:
            raise error(f"{what} lists an unexpected file {_short(name)}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise error(f"{what} is damaged (the sha256 of {name} is not 64 hex digits); prune again")
    return str(fmt), dict(files)


def _manifest_bytes(fmt: str, files: Mapping[str, str], torchscript: bool = True) -> bytes:
    doc: dict[str, Any] = {"format": fmt, "files": dict(sorted(files.items()))}
    if not torchscript:
        doc["torchscript"] = None
    return (json.dumps(doc, indent=2) + "\n").encode()


def declares_no_torchscript(directory: str | os.PathLike[str]) -> bool:
    """Whether the sealed manifest in ``directory`` says the set has no ``model.ts`` on purpose."""
    try:
        return read_json(Path(directory) / MANIFEST, "manifest", error=WeightsError).get("torchscript", "") is None
    except (AutoDFPError, AttributeError):
        return False


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_set(directory: str | os.PathLike[str]) -> dict[str, str]:
    """The manifest's hashes, after checking that the folder holds exactly one complete set.

    The manifest must be sealed, list at least ``pruned.pt``, ``model.ts`` and ``plan.json``, list
    every file of the set the folder holds (an unlisted one is another run's: a mix), and every
    listed file must match its sha256. Anything else is a :class:`WeightsError`, so a folder that
    is not one whole set is never loaded.
    """
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not os.path.lexists(mpath):
        raise WeightsError(
            f"{directory} is not a complete autodfp output: {MANIFEST} is missing (an interrupted "
            "save, or a directory from autodfp < 0.2); prune again"
        )
    fmt, files = _parse_manifest(mpath, WeightsError)
    if fmt == PENDING_FORMAT:
        raise WeightsError(f"{directory} holds an interrupted save ({MANIFEST} was never sealed); prune again")
    required = [n for n in REQUIRED_FILES if not (n == "model.ts" and declares_no_torchscript(directory))]
    missing = [n for n in required if n not in files]
    if missing:
        raise WeightsError(f"{mpath} does not list {missing[0]}: not a complete autodfp output; prune again")
    unlisted = [n for n in SET_FILES if n not in files and os.path.lexists(directory / n)]
    if unlisted:
        raise WeightsError(
            f"{directory} mixes two sets: {unlisted[0]} is not listed in {MANIFEST} (another run's file); prune again"
        )
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise WeightsError(f"{directory} is incomplete: {name} is missing; prune again")
        try:
            actual = _sha256_file(path)
        except OSError as exc:
            raise WeightsError(f"cannot read {path} ({_reason(exc)})") from None
        if actual != digest:
            raise WeightsError(
                f"{path} does not match {MANIFEST} (the set was modified or mixed with another "
                "run's files); prune again"
            )
    return files


# -- whose files -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contents:
    """What OUT holds, split by who wrote it."""

    #: entries autodfp wrote: the only ones it may replace or delete
    ours: frozenset[str]
    #: the earlier set's files that are ours (name → sha256 from its manifest)
    listed: dict[str, str]
    #: the user's entries, sorted: never replaced or deleted
    foreign: tuple[str, ...]


def _listed_files(out: Path) -> dict[str, str] | None:
    """The files the manifest in ``out`` lists, or None where there is none we wrote (missing,
    not a regular file, or not a valid manifest: then it is the user's file)."""
    path = out / MANIFEST
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        return _parse_manifest(path, OutputDirError)[1]
    except (OSError, AutoDFPError):
        return None


def _is_staging(path: Path) -> bool:
    """A folder of staged set files, left by a killed save."""
    try:
        return all(
            e.is_file(follow_symlinks=False) and (e.name in ALL_SET_FILES or e.name == MANIFEST)
            for e in os.scandir(path)
        )
    except OSError:
        return False


def scan(out: str | os.PathLike[str]) -> Contents:
    """Classify the entries of the existing directory ``out`` (see the module doc for the rule)."""
    from autodfp.search.checkpoint import is_checkpoint_root

    out = Path(out)
    listed = _listed_files(out)
    ours: set[str] = set()
    foreign: list[str] = []
    try:
        entries = sorted(os.listdir(out))
    except OSError as exc:
        raise _path_error(out, exc, "cannot be read") from None
    for name in entries:
        path = out / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _path_error(path, exc, what="output file") from None
        regular, directory = stat.S_ISREG(mode), stat.S_ISDIR(mode)
        if (
            (name == MANIFEST and listed is not None)
            or (name == LOCK and regular)
            or (listed is not None and name in listed and regular)
            or (directory and _STAGING.fullmatch(name) and _is_staging(path))
            or (name == SEARCH_DIR and is_checkpoint_root(path))
        ):
            ours.add(name)
        else:
            foreign.append(name)
    kept = {n: d for n, d in (listed or {}).items() if n in ours}
    return Contents(frozenset(ours), kept, tuple(foreign))


def _names(names: tuple[str, ...] | list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _taken(out: Path, name: str) -> OutputDirError:
    return OutputDirError(
        f"output directory {out} holds {name}, which autodfp did not write and never replaces, even with "
        "overwrite=True; move it away or choose another output directory"
    )


def claim_output_dir(
    out: str | os.PathLike[str], *, overwrite: bool = False, search: bool = False, kind: str | None = None
) -> Path:
    """Check, before any work, that a run may write its set in OUT; return OUT.

    An absent or empty OUT, or one holding only autodfp's own files, is fine. A folder holding
    files autodfp did not write is refused, unless ``overwrite``: then the set is written beside
    them and they are kept, but a name the set may use (a file of the set, the manifest, and
    ``search/`` when ``search``, the run checkpointing a search) must not be one of them.
    """
    path = check_output_dir(out)
    if not os.path.lexists(path):
        return path
    contents = scan(Path(os.path.realpath(path)))
    if kind is not None:
        _refuse_other_kind(path, contents, SET_FILES if kind == "pruned" else REPORT_SETS[kind])
    if not contents.foreign:
        return path
    if not overwrite:
        raise OutputDirError(
            f"output directory {path} is not an autodfp output: it holds files autodfp did not write "
            f"({_names(contents.foreign)}); choose a new or empty directory, or pass overwrite=True to "
            "write beside them (they are kept)"
        )
    reserved = (*ALL_SET_FILES, MANIFEST, LOCK, *((SEARCH_DIR,) if search else ()))
    taken = [n for n in contents.foreign if n in reserved]
    if taken:
        raise _taken(path, taken[0])
    return path


# -- the lock --------------------------------------------------------------------------------------
def _open_lock(path: Path) -> int:
    """Open (creating) the lock file without following a link: a link planted at its name would
    otherwise make autodfp create or open a file outside OUT."""
    flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputDirError(f"lock file {path} is a symbolic link; refused (remove it)") from None
        if exc.errno == errno.EISDIR:
            raise OutputDirError(f"lock file {path} is not a regular file; refused (remove it)") from None
        raise _path_error(path, exc, "cannot be opened", what="lock file") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputDirError(f"lock file {path} is not a regular file; refused (remove it)")
    return fd


class OutputLock:
    """An exclusive lock on an output directory for the length of a run, and the run's claim on it.

    Two runs writing one OUT would interleave their files; the second one is refused at once,
    before it spends minutes of work. The lock is an ``flock`` on ``OUT/.autodfp.lock``, released
    by the kernel if the process dies, so a killed run never leaves OUT locked. Once locked, OUT
    is claimed (:func:`claim_output_dir` with ``overwrite`` and ``search``).
    """

    def __init__(
        self, out_dir: str | os.PathLike[str], *, overwrite: bool = False, search: bool = False, kind: str = "pruned"
    ) -> None:
        self.kind = kind
        self.out = output_path(out_dir)
        self.overwrite = overwrite
        self.search = search
        self._fd: int | None = None
        self._real: Path | None = None
        self._created = False

    def __enter__(self) -> OutputLock:
        import fcntl

        check_output_dir(self.out)
        self._created = not os.path.lexists(self.out)
        _create(self.out)
        real = Path(os.path.realpath(self.out))
        fd = _open_lock(real / LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputDirError(
                f"{self.out} is in use by another autodfp run; wait for it or choose another output directory"
            ) from None
        self._fd, self._real = fd, real
        with _HELD_LOCK:
            _HELD.add(str(real))
        try:
            claim_output_dir(self.out, overwrite=self.overwrite, search=self.search, kind=self.kind)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        """Release, and leave no trace: the lock file goes, and so does an OUT this run created
        if a failure left it empty."""
        if self._fd is None or self._real is None:
            return
        lock = self._real / LOCK
        with contextlib.suppress(OSError):
            if os.path.samestat(os.lstat(lock), os.fstat(self._fd)):  # still our file, not one put in its place
                lock.unlink()
        with _HELD_LOCK:
            _HELD.discard(str(self._real))
        os.close(self._fd)
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only succeeds when empty


@contextlib.contextmanager
def hold(out: str | os.PathLike[str], *, overwrite: bool = False, kind: str = "pruned") -> Iterator[Path]:
    """The lock on OUT for a save: taken here, unless this process already holds it.

    The CLI locks OUT for its whole run and then saves through the API, which locks too; a second
    ``flock`` from the same process would refuse the save, so a held OUT is used as it is.
    """
    path = check_output_dir(out)
    with _HELD_LOCK:
        held = os.path.realpath(path) in _HELD
    if held:
        yield path
        return
    with OutputLock(path, overwrite=overwrite, kind=kind):
        yield path


# -- writing a set ---------------------------------------------------------------------------------
def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` and write ``data``: never an existing file, never through a link.

    The mode is what an ordinary ``open`` would give (0666 less the umask).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _place(src: Path, dst: Path, ours: bool) -> None:
    """Rename ``src`` to ``dst``: over ``dst`` only where it is ours; otherwise only where nothing
    is there (a hard link fails if a file appeared meanwhile), so a user's file is never replaced."""
    if ours:
        os.replace(src, dst)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise _taken(dst.parent, dst.name) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(dst):  # a file system without hard links: check, then rename
            raise _taken(dst.parent, dst.name) from None
        os.replace(src, dst)
    else:
        os.unlink(src)


def _unlink_ours(path: Path) -> None:
    """Delete an old set's file, if it is still the regular file the scan found."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISREG(os.lstat(path).st_mode):
            path.unlink()


def write_set(out: str | os.PathLike[str], files: Mapping[str, bytes], *, kind: str = "pruned") -> None:
    """Replace the output set in ``out`` by ``files``; the manifest, written last, seals it.

    Only autodfp's own files are replaced or deleted (see the module doc); a name of the set held
    by a user's entry refuses the whole write before anything changes. Callers hold the lock
    (:func:`hold`) and have claimed OUT (:func:`claim_output_dir`).

    :param kind: ``"pruned"`` (a loadable model: :data:`SET_FILES`, :data:`REQUIRED_FILES` among
        them) or a report set of :data:`REPORT_SETS` (``"proxy"``, ``"bench"``)
    """
    names: tuple[str, ...] = SET_FILES if kind == "pruned" else REPORT_SETS[kind]
    required: tuple[str, ...] = REQUIRED_FILES if kind == "pruned" else ()
    torchscript = "model.ts" in files or kind != "pruned"  # a pruned set without one says so in its manifest
    required = tuple(n for n in required if n != "model.ts" or torchscript)
    unknown = [n for n in files if n not in names]
    if unknown:
        raise ValueError(f"{unknown[0]} is not a file of the {kind} output set")
    if any(n not in files for n in required):
        raise ValueError(f"an output set needs {', '.join(required)}")
    path = check_output_dir(out)
    _create(path)
    real = Path(os.path.realpath(path))  # resolved once: the set lands in one folder
    contents = scan(real)
    blocked = [n for n in contents.foreign if n in ALL_SET_FILES or n == MANIFEST]
    if blocked:  # a user's file of a set name would be replaced, or make the new set a mix
        raise _taken(path, blocked[0])
    _refuse_other_kind(path, contents, names)
    digests = {n: hashlib.sha256(d).hexdigest() for n, d in sorted(files.items())}
    try:
        stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=real))
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        try:
            for name, data in files.items():
                _write_new(stage / name, data)
            # from here on the folder does not load until sealed, and every name touched is listed
            _write_new(stage / MANIFEST, _manifest_bytes(PENDING_FORMAT, {**contents.listed, **digests}))
            _place(stage / MANIFEST, real / MANIFEST, MANIFEST in contents.ours)
            for name in contents.listed:
                if name not in files:
                    _unlink_ours(real / name)
            for name in files:
                _place(stage / name, real / name, name in contents.ours)
            _write_new(stage / MANIFEST, _manifest_bytes(MANIFEST_FORMAT, digests, torchscript))
            os.replace(stage / MANIFEST, real / MANIFEST)
        except OSError as exc:
            raise _write_error(path, exc) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for name in contents.ours:  # staging folders of killed saves: ours, and useless now
        if _STAGING.fullmatch(name):
            shutil.rmtree(real / name, ignore_errors=True)


def _write_error(out: Path, exc: OSError) -> OutputDirError:
    if exc.errno == errno.ENOSPC:
        return OutputDirError(
            f"no space left on the device while writing the outputs to {out}; free some space and run again"
        )
    return OutputDirError(f"cannot write the outputs to {out} ({_reason(exc)})")


def _refuse_other_kind(path: Path, contents: Contents, names: tuple[str, ...]) -> None:
    """A set replaces an earlier set of its own kind only: a report written into a pruned model's
    folder would otherwise delete the model (the earlier set's files not in the new one go)."""
    other = [n for n in contents.listed if n not in names]
    if other:
        raise OutputDirError(
            f"output directory {path} holds another kind of autodfp output ({_names(sorted(other))}); "
            "choose another directory for this one"
        )


def write_output_set(
    out: str | os.PathLike[str], files: Mapping[str, bytes], *, overwrite: bool = False, kind: str = "pruned"
) -> Path:
    """Claim OUT, lock it and write ``files`` as its set: what a save does once its bytes are ready."""
    path = claim_output_dir(out, overwrite=overwrite, kind=kind)
    with hold(path, overwrite=overwrite, kind=kind):
        write_set(path, files, kind=kind)
    return path


__all__ = [
    "ALL_SET_FILES",
    "LOCK",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "PENDING_FORMAT",
    "REPORT_SETS",
    "REQUIRED_FILES",
    "SEARCH_DIR",
    "SET_FILES",
    "Contents",
    "OutputLock",
    "check_output_dir",
    "claim_output_dir",
    "declares_no_torchscript",
    "ensure_dir",
    "hold",
    "output_path",
    "scan",
    "verify_set",
    "write_output_set",
    "write_set",
]
