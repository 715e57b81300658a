"""The executor interface and its in-process back end; :mod:`autodfp.distributed.ray_pool` is the other.

Two kinds of work run on an executor:

- **tasks**, stateless: :meth:`Executor.imap` calls ``fn(shared, item)`` for every item and yields
  the results in item order. ``shared`` (a model) is sent to the workers once, not with every item.
  The chunks of a synthetic batch run this way.
- **pools**, stateful: :meth:`Executor.pool` builds ``factory(*args)`` once per worker (an object
  that holds the model, the pruner and the reward batch) and :meth:`Pool.imap` calls one of its
  methods on every item, results in item order. The reward evaluations of a search run this way:
  rebuilding a scorer per plan would resend megabytes per episode.

Results come back in item order whatever the order the workers finish in, so a caller that
consumes them in order does exactly what it did serially. The in-process back end runs the same
calls one after the other, in this process, with nothing to import.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from autodfp.errors import ConfigError

#: ``shared`` left out: the task is called as ``fn(item)``
NOTHING: Any = object()

INSTALL_HINT = "pip install 'autodfp[distributed]'"


def ray_available() -> bool:
    """Whether Ray can be imported, found without importing it (importing Ray costs a second)."""
    if "ray" in sys.modules:  # imported already, or blocked (``None``: ``import ray`` raises)
        return sys.modules["ray"] is not None
    return importlib.util.find_spec("ray") is not None


class Pool:
    """Stateful workers, each holding one ``factory(*args)``: the interface and its serial form.

    :param factory: builds a worker's object (a class, or a module-level function); called once
        per worker, with ``args``
    :param args: what every worker's object is built from (a model, a search environment)
    """

    def __init__(self, factory: Callable[..., Any], *args: Any) -> None:
        self._obj = factory(*args)

    @property
    def size(self) -> int:
        """How many objects score items at once (1 here)."""
        return 1

    def imap(self, method: str, items: Iterable[Any]) -> Iterator[Any]:
        """``obj.method(item)`` for each item, in item order, lazily (one call per item consumed).

        :param method: the name of the workers' method to call
        :param items: the arguments, one call each
        """
        fn = getattr(self._obj, method)
        return (fn(item) for item in items)

    def close(self) -> None:
        """Release the workers (nothing to do in-process)."""
        self._obj = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Executor:
    """Runs independent pieces of work: :class:`LocalExecutor` here, :class:`RayExecutor` on Ray.

    Use it as a context manager, so its workers are released whatever happens (an error, Ctrl-C).
    """

    #: how many pieces of work run at once; a search scores this many plans per generation
    workers: int = 1

    @property
    def parallel(self) -> bool:
        """Whether work leaves this process (False: every call is the serial code path)."""
        return False

    def imap(self, fn: Callable[..., Any], items: Iterable[Any], shared: Any = NOTHING) -> Iterator[Any]:
        """``fn(shared, item)`` (``fn(item)`` without ``shared``) for each item, in item order.

        :param fn: a module-level function (workers import it by name)
        :param items: one call each
        :param shared: sent to every worker once (a model), never once per item
        """
        if shared is NOTHING:
            return (fn(item) for item in items)
        return (fn(shared, item) for item in items)

    def map(self, fn: Callable[..., Any], items: Iterable[Any], shared: Any = NOTHING) -> list[Any]:
        """:meth:`imap` as a list."""
        return list(self.imap(fn, items, shared))

    def pool(self, factory: Callable[..., Any], *args: Any) -> Pool:
        """Stateful workers, each built once from ``factory(*args)`` (:class:`Pool`).

        :param factory: a module-level class or function
        :param args: what it is built from, sent to the workers once
        """
        return Pool(factory, *args)

    def close(self) -> None:
        """Release every worker; idempotent."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """Everything in this process, one piece after the other: the default, and exactly the code
    path of a run without an executor."""


def executor_for(workers: int = 1, ray_address: str | None = None) -> Executor:
    """The executor for ``Config.workers`` and ``Config.ray_address``.

    :param workers: pieces of work at once; 1 without an address stays in this process
    :param ray_address: ``"auto"`` or ``"HOST:PORT"`` of a running Ray cluster to join
    :raises ConfigError: Ray is needed and not installed
    """
    if int(workers) <= 1 and ray_address is None:
        return LocalExecutor()
    if not ray_available():
        raise ConfigError(f"workers > 1 and ray_address need Ray, which is not installed: {INSTALL_HINT}")
    from autodfp.distributed.ray_pool import RayExecutor

    return RayExecutor(int(workers), ray_address)


def __getattr__(name: str) -> Any:  # RayExecutor without importing Ray until it is asked for
    if name == "RayExecutor":
        from autodfp.distributed.ray_pool import RayExecutor

        return RayExecutor
    raise AttributeError(name)


__all__ = ["Executor", "LocalExecutor", "Pool", "executor_for", "ray_available"]
