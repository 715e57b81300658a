"""The one bounded JSON reader: every JSON file autodfp reads (a plan, a manifest, a search state,
a report) goes through :func:`read_json` or :func:`parse_json`.

``json.loads`` trusts its input: a document nested 100,000 levels deep raises ``RecursionError``,
a 5,001-digit integer raises ``ValueError`` past Python's int-conversion limit, and a file of
gigabytes is read whole into memory. None of these is an :class:`~autodfp.errors.AutoDFPError`,
so each reached the user as an ``internal error``. Here every such input fails *before* parsing
(size, depth) or *during* it (number length) with one line naming the file, raised as the error
type the caller passes (``PlanError`` for a plan, ``WeightsError`` for a manifest, ...), so each
caller keeps its own error class and message prefix.

The limits are far above anything autodfp writes (a plan of a 1,000-group model is ~60 kB and
five levels deep) and far below what could hurt.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from autodfp.errors import AutoDFPError

#: largest JSON file read, in bytes (a search state of 3,000 episodes is ~2 MB)
MAX_BYTES = 64 << 20
#: deepest nesting of arrays and objects
MAX_DEPTH = 64
#: most characters in one number literal (a float64 needs at most ~25)
MAX_NUMBER_CHARS = 64


def _check_depth(text: str, max_depth: int) -> int:
    """The deepest nesting of ``[``/``{`` outside strings, stopping as soon as ``max_depth`` is passed.

    A linear scan that never recurses, so it cannot itself overflow the stack.
    """
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > max_depth:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(
    text: str | bytes,
    what: str,
    *,
    error: type[AutoDFPError] = AutoDFPError,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_number_chars: int = MAX_NUMBER_CHARS,
) -> Any:
    """Parse ``text`` as JSON within the limits, or raise ``error`` with one line naming ``what``.

    NaN and Infinity literals (which Python's ``json`` accepts but JSON does not) are refused too:
    no value autodfp reads may be non-finite.

    :param what: how the message names the document, e.g. ``"plan file runs/a/plan.json"``
    :param error: the :class:`AutoDFPError` subclass to raise
    """
    if isinstance(text, bytes):
        if len(text) > max_bytes:
            raise error(f"{what} is too large ({len(text)} bytes; at most {max_bytes})")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"{what} is not UTF-8 text") from None
    if len(text) > max_bytes:
        raise error(f"{what} is too large ({len(text)} characters; at most {max_bytes})")
    if _check_depth(text, max_depth) > max_depth:
        raise error(f"{what} is nested more than {max_depth} levels deep")

    def number(s: str) -> float | int:
        if len(s) > max_number_chars:
            raise error(f"{what} holds a number of {len(s)} characters (at most {max_number_chars})")
        value: float | int = float(s) if any(c in s for c in ".eE") else int(s)
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{what} holds a number out of range ({s[:20]}...)")
        return value

    def constant(s: str) -> Any:
        raise error(f"{what} holds {s}, which is not a JSON number")

    try:
        return json.loads(text, parse_int=number, parse_float=number, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:  # defence in depth: the scan above bounds the depth first
        raise error(f"{what} is nested too deeply") from None


def read_json(
    path: str | os.PathLike,
    what: str | None = None,
    *,
    error: type[AutoDFPError] = AutoDFPError,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Read and parse the JSON file ``path`` within the limits (see :func:`parse_json`).

    Only a regular file is read (a FIFO would block forever, a directory or device is no document),
    and never more than ``max_bytes + 1`` bytes of it.
    """
    path = Path(path)
    what = what or f"JSON file {path}"
    try:
        if not path.is_file():
            raise error(f"{what} not found" if not path.exists() else f"{what} is not a regular file")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {what} ({exc.strerror or exc})") from None
    return parse_json(data, what, error=error, max_bytes=max_bytes, max_depth=max_depth)
