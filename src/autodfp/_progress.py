"""Progress bars on stderr, the same everywhere: with an ETA, and quiet enough for a log file.

On a terminal the bar redraws in place and disappears when done. When stderr is a file or a pipe
(CI, ``2> log``, ``--json`` runs in scripts) a bar that redraws ten times a second would fill
the log, so it updates every :data:`LOG_INTERVAL` seconds and leaves its last line behind.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

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
