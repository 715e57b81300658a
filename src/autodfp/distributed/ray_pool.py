"""The Ray back end of :mod:`autodfp.distributed.executor`: tasks, actor pools and worker faults.

Imported only when an executor on Ray is asked for, so a default run never loads Ray.

- **Start and stop.** With no address, :class:`RayExecutor` starts a local Ray instance of
  ``workers`` CPUs (no dashboard) and shuts it down on :meth:`~RayExecutor.close`, which the
  pipeline calls in a ``finally``: an error or Ctrl-C leaves no ``raylet`` or ``gcs_server``
  behind. With an address it joins the running cluster and on close only disconnects. A Ray
  already initialised in this process (a notebook, a test) is used as it is and left running.
- **Data once.** A task's ``shared`` argument and a pool's constructor arguments go into the object
  store once (``ray.put``); every task or actor receives a reference, never a copy per item.
- **Threads.** Each task and actor asks Ray for one CPU and sets ``torch.set_num_threads`` to its
  share of the machine's cores (on a cluster, 1): two workers on two cores do not each start two
  threads and fight over them.
- **Faults.** Actors are created with ``max_restarts`` and ``max_task_retries``, so Ray restarts a
  worker whose process dies and re-runs its call. An actor killed for good (``ray.kill``) is
  replaced here by a new one and its item is scored again. Calls are pure functions of their
  item, so a run with a fault ends exactly as one without. Tasks are retried by Ray
  (``max_retries``). A worker that dies again and again ends the run with one line.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from autodfp.distributed.executor import NOTHING, Executor, Pool
from autodfp.errors import AutoDFPError

log = logging.getLogger("autodfp")

#: restarts (by Ray) and replacements (here) of a dead worker, per worker, before the run gives up
MAX_RESTARTS = 3


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))


def _task(threads: int, fn: Callable[..., Any], has_shared: bool, shared: Any, item: Any) -> Any:
    """One task on a worker: ``fn(shared, item)`` (``fn(item)``) with the worker's thread share."""
    _set_threads(threads)
    return fn(shared, item) if has_shared else fn(item)


class _Holder:
    """One actor: builds ``factory(*args)`` once, then calls its methods on items."""

    def __init__(self, threads: int, factory: Callable[..., Any], *args: Any) -> None:
        _set_threads(threads)
        self.obj = factory(*args)

    def call(self, method: str, item: Any) -> Any:
        return getattr(self.obj, method)(item)

    def pid(self) -> int:
        return os.getpid()


_remote_task = ray.remote(_task)
_RemoteHolder = ray.remote(_Holder)


def _get(ref: Any) -> Any:
    """``ray.get``, with an error raised inside the work re-raised as itself: an
    :class:`~autodfp.errors.AutoDFPError` of the reward stays one line, not a Ray traceback."""
    try:
        return ray.get(ref)
    except RayActorError:
        raise
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception) and not isinstance(cause, RayActorError):
            raise cause from None
        raise


class RayPool(Pool):
    """``size`` Ray actors, each holding one ``factory(*args)`` built from object-store references.

    :param executor: the executor whose workers and thread share the actors take
    :param factory: a module-level class or function (workers import it by name)
    :param args: put into the object store once and handed to every actor by reference
    """

    def __init__(self, executor: RayExecutor, factory: Callable[..., Any], *args: Any) -> None:
        self._threads = executor.threads
        self._factory = factory
        self._refs = [ray.put(a) for a in args]
        #: the live actors, one per worker (a test may kill one)
        self.actors: list[Any] = [self._spawn() for _ in range(executor.workers)]
        #: actors replaced after they died for good
        self.replaced = 0

    def _spawn(self) -> Any:
        return _RemoteHolder.options(num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS).remote(
            self._threads, self._factory, *self._refs
        )

    @property
    def size(self) -> int:
        return len(self.actors)

    def _replace(self, slot: int, exc: BaseException) -> None:
        self.replaced += 1
        if self.replaced > MAX_RESTARTS * len(self.actors):
            raise AutoDFPError(f"Ray workers died {self.replaced} times; giving up ({_one_line(exc)})")
        log.warning(f"a Ray worker died ({_one_line(exc)}); a new one scores its item again")
        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[slot] = self._spawn()

    def imap(self, method: str, items: Iterable[Any]) -> Iterator[Any]:
        """``obj.method(item)`` on the actors, one call in flight per actor, results in item order.

        A call whose actor died for good goes to the actor that replaces it (:meth:`_replace`).
        """
        items = list(items)
        todo = deque(range(len(items)))
        free = deque(range(len(self.actors)))
        pending: dict[Any, tuple[int, int]] = {}
        done: dict[int, Any] = {}
        nxt = 0
        try:
            while nxt < len(items):
                while todo and free:
                    i, slot = todo.popleft(), free.popleft()
                    pending[self.actors[slot].call.remote(method, items[i])] = (i, slot)
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i, slot = pending.pop(ref)
                    try:
                        done[i] = _get(ref)
                    except RayActorError as exc:
                        self._replace(slot, exc)
                        todo.appendleft(i)
                    free.append(slot)
                while nxt in done:
                    yield done.pop(nxt)
                    nxt += 1
        finally:  # an error or Ctrl-C: nothing keeps running for a run that is over
            _cancel_unfinished(list(pending))

    def close(self) -> None:
        if ray.is_initialized():
            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    pass
        self.actors = []
        self._refs = []


class RayExecutor(Executor):
    """Work on Ray: a local instance of ``workers`` CPUs, or a running cluster at ``address``.

    :param workers: tasks or actors at once (a local instance gets this many CPUs)
    :param address: ``"auto"`` or ``"HOST:PORT"`` of a cluster started with ``ray start --head``;
        ``None`` starts a local instance
    :param threads: torch threads per worker (default: this machine's cores shared among the
        workers of a local instance; 1 on a cluster)
    """

    def __init__(self, workers: int, address: str | None = None, threads: int | None = None) -> None:
        self.workers = max(1, int(workers))
        self._mode = "existing"
        if not ray.is_initialized():
            quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
            try:
                if address is None:
                    ray.init(num_cpus=self.workers, include_dashboard=False, **quiet)
                    self._mode = "local"
                else:
                    ray.init(address=address, **quiet)
                    self._mode = "joined"
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"join the Ray cluster at {address}" if address else "start a local Ray instance"
                raise AutoDFPError(f"could not {where}: {_one_line(exc)}") from None
        local = self._mode != "joined"
        self.threads = int(threads) if threads else (max(1, (os.cpu_count() or 1) // self.workers) if local else 1)
        log.info(
            f"Ray: {self.workers} workers, {self.threads} torch thread(s) each, "
            + {"local": "a local instance", "joined": f"cluster at {address}", "existing": "the running instance"}[
                self._mode
            ]
        )

    @property
    def parallel(self) -> bool:
        return True

    def imap(self, fn: Callable[..., Any], items: Iterable[Any], shared: Any = NOTHING) -> Iterator[Any]:
        """Every item submitted as a task now, one CPU each; results yielded in item order."""
        items = list(items)
        has_shared = shared is not NOTHING
        ref = ray.put(shared) if has_shared else None
        remote = _remote_task.options(num_cpus=1, max_retries=MAX_RESTARTS)
        refs = [remote.remote(self.threads, fn, has_shared, ref, item) for item in items]
        return self._ordered(refs)

    @staticmethod
    def _ordered(refs: list[Any]) -> Iterator[Any]:
        finished = 0
        try:
            for ref in refs:
                value = _get(ref)
                finished += 1  # before the yield: a caller that stops here has this result
                yield value
        finally:
            _cancel_unfinished(refs[finished:])

    def pool(self, factory: Callable[..., Any], *args: Any) -> RayPool:
        return RayPool(self, factory, *args)

    def close(self) -> None:
        """Shut down a local instance (every Ray process of it), disconnect from a cluster (which
        keeps running), leave a Ray this executor did not start as it was. Idempotent."""
        if self._mode in ("local", "joined") and ray.is_initialized():
            ray.shutdown()
        self._mode = "closed"


def _cancel_unfinished(refs: list[Any]) -> None:
    """Cancel the calls among ``refs`` that have not finished. Only those: Ray 2.60 aborts the whole
    process ("Tried to complete task that was not pending") when a finished task is cancelled as it
    completes, as a benchmark here found."""
    if not refs or not ray.is_initialized():
        return
    try:
        ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=0)
    except Exception:  # Ray going down: nothing left to cancel
        return
    for ref in waiting:
        try:
            ray.cancel(ref)
        except Exception:  # finished meanwhile, or Ray already down
            pass


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text[:200]


__all__ = ["MAX_RESTARTS", "RayExecutor", "RayPool"]
