"""Progress bars on stderr, the same everywhere: with an ETA, and quiet enough for a log file.

On a terminal the bar redraws in place and disappears when done. When stderr is a file or a pipe
(CI, ``2> log``, ``--json`` runs in scripts) a bar that redraws ten times a second would fill
the log, so it updates every :data:`LOG_INTERVAL` seconds and leaves its last line behind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

#: seconds between updates of a bar written to a file or a pipe
LOG_INTERVAL = 10.0


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
) -> Any:
    """A ``tqdm`` bar on stderr (disabled, it still iterates and accepts ``update``/``close``)."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        file=sys.stderr,
        disable=not enabled,
        leave=not tty,
        dynamic_ncols=tty,
        ncols=None if tty else 100,
        mininterval=0.1 if tty else LOG_INTERVAL,
    )


@contextlib.contextmanager
def messages_shown(enabled: bool) -> Iterator[None]:
    """Show the ``autodfp`` logger's INFO lines on stderr for the block, unless logging is set up.

    A library must not configure logging for its caller, so the CLI attaches its own handler and a
    program that configured ``logging`` gets the records through its own handlers. A plain script
    has neither, and Python's last-resort handler drops INFO: the lines that say a first run will
    spend minutes synthesising inputs (and that they are cached after it) never showed. Like the
    progress bars, they now appear for the length of the call when ``progress=True`` and nobody
    else handles them.
    """
    logger = logging.getLogger("autodfp")
    if not enabled or logger.hasHandlers():
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("autodfp: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


P = ParamSpec("P")
R = TypeVar("R")


def shows_messages(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a public function whose keyword-only ``progress`` (default True) also shows the
    library's messages for the call (:func:`messages_shown`)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with messages_shown(bool(kwargs.get("progress", True))):
            return fn(*args, **kwargs)

    return wrapper
