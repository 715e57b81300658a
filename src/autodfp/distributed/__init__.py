"""Scale-out: one executor interface, run in this process or on Ray workers.

The costly parts of a prune are independent pieces of work: the chunks of a synthetic batch, and
the reward evaluations of a random or evolution search. :func:`executor_for` gives the
executor a :class:`~autodfp.config.Config` asks for:

- ``workers=1`` and no ``ray_address`` (the default): :class:`LocalExecutor`, everything in this
  process exactly as before; Ray is never imported.
- ``workers=N``: :class:`RayExecutor` on a local Ray instance of ``N`` CPUs, shut down at the end.
- ``ray_address="auto"`` or ``"HOST:PORT"``: :class:`RayExecutor` joined to a running cluster
  (``ray start --head``), which is left running.

Ray is an optional extra: ``pip install 'autodfp[distributed]'``.
"""

from __future__ import annotations

from typing import Any

from autodfp.distributed.executor import Executor, LocalExecutor, Pool, executor_for, ray_available


def __getattr__(name: str) -> Any:  # Ray is imported only when its executor is asked for
    if name == "RayExecutor":
        from autodfp.distributed.ray_pool import RayExecutor

        return RayExecutor
    raise AttributeError(name)


__all__ = ["Executor", "LocalExecutor", "Pool", "RayExecutor", "executor_for", "ray_available"]
