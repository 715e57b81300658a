"""User-facing errors.

Anything a user can cause (a bad path, a corrupt checkpoint, an impossible budget) is raised as
:class:`AutoDFPError`, whose message is one self-contained line. The CLI prints it without a
traceback; library callers can catch it as one type.
"""

from __future__ import annotations

import os


class AutoDFPError(Exception):
    """An error caused by user input, reported as one line without a traceback."""


class WeightsError(AutoDFPError):
    """A weight file is missing, corrupt, unsafe to load or fails its hash check."""


class DataError(AutoDFPError):
    """A dataset is missing, empty or laid out in a way the reader does not understand."""


class ModelError(AutoDFPError):
    """An unknown model name, an unsupported layer, or an architecture/state-dict mismatch."""


class PlanError(AutoDFPError):
    """A pruning plan that cannot be applied: unknown group, ratio out of range, impossible budget."""


class CheckpointError(AutoDFPError):
    """A search checkpoint that is damaged, foreign, unsafe to load, or from another configuration."""


class OutputDirError(AutoDFPError):
    """An output directory that cannot be used: an empty or unusable path, a symbolic link where
    autodfp writes, a run already using it, or files in it that autodfp did not write."""


class CacheWarning(UserWarning):
    """The cache directory cannot be used; work goes on without caching (one line, no traceback)."""


class ExportWarning(UserWarning):
    """An export (TorchScript) was left out of a saved set because it would not match the model."""


class PreprocessingWarning(UserWarning):
    """Evaluation with a guessed input normalisation: it runs, and its accuracy may mean nothing."""


class ConfigError(PlanError, TypeError):
    """An unknown :class:`~autodfp.Config` field: an :class:`AutoDFPError`, and still the
    ``TypeError`` Python raises for an unexpected keyword, so ``except TypeError`` keeps working."""


_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def printable(text: object) -> str:
    """``text`` with every character a terminal would not show as itself escaped.

    Messages name user files and folders. A name holding terminal escape sequences would retitle
    the window or clear the screen when the message is printed, a newline would split the one-line
    error in two, an undecodable byte (carried by ``os.fsdecode`` as a lone surrogate) cannot even
    be written to a strict UTF-8 stream, and a format character such as the right-to-left override
    U+202E makes a name read as another. So: ``\\x1b`` for ESC, ``\\n`` for a newline, ``\\xNN``
    for an undecodable byte, ``\\u202e`` for a format character; printable characters,
    non-ASCII letters included, are kept as typed. Every line the CLI prints from a message goes
    through here.
    """
    s = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable():
            out.append(ch)
        elif ch in _NAMED:
            out.append(_NAMED[ch])
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # an undecodable byte, as os.fsdecode carries it
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(repr(ch)[1:-1] if repr(ch)[1:-1] != ch else f"\\u{ord(ch):04x}")
    return "".join(out)
