"""Synthesis inputs per second and search episodes per second with 1 and N Ray workers, in one run.

Issue 27: the chunks of a synthetic batch and the reward evaluations of a random or evolution
search are independent, so ``--workers N`` runs them on N Ray workers (:mod:`autodfp.distributed`).
This measures both on one model, for every worker count in ``--workers``, in one process and one
run, so the ratios compare like with like on the same machine under the same load:

- **synthesis**: a ``--chunks`` × 64-input batch distilled into a fresh cache directory (nothing
  read from a cache), with the steps a search's reward batch takes. The tensors of every count are
  checked against those of the first count (they must be equal).
- **search**: ``--episodes`` of ``--search`` at ``--macs-ratio`` with the pipeline's own pieces
  (:class:`autodfp.api.Pipeline`: the synthetic reward, the calibration, the search's refiner), as
  ``autodfp prune --macs-ratio`` runs it. Random search plays the same plans for every count, so
  the counts do the same work. The time to start the workers' copies of the environment is
  measured apart (``pool_start_s``): the serial part a search pays once.

Workers = 1 is the in-process path (no Ray), with torch's default threads on every core. The
batches the search needs are made (or read from the cache) before any timing.

    OMP_WAIT_POLICY=PASSIVE AUTODFP_ASSETS=/work/shared/assets \
        .venv/bin/python benchmarks/scaling.py resnet56_cifar10 --workers 1,2

(``OMP_WAIT_POLICY=PASSIVE`` as the Makefile exports it: this script imports torch before autodfp
could set it, and OpenMP threads that spin-wait on shared cores make every step many times slower.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

import torch

from autodfp.api import Pipeline, input_shape_of
from autodfp.config import Config
from autodfp.distributed import executor_for
from autodfp.models import load_model
from autodfp.synth.distill import CHUNK, resolve_method, synthetic_batch


def _synthesis(net: Any, name: str, shape: tuple[int, ...], cfg: Config, chunks: int, ex: Any) -> dict[str, Any]:
    steps = cfg.reward_steps_for(resolve_method(net, cfg.synth_method), shape)
    n = chunks * CHUNK
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        images = synthetic_batch(net, name, shape, n=n, seed=0, steps=steps, cache_dir=tmp, executor=ex)
        seconds = time.perf_counter() - t0
    return {"inputs": n, "steps": steps, "seconds": seconds, "inputs_per_s": n / seconds, "images": images}


class _Echo:
    """A worker that does nothing: what one call costs the head (submit, wait, receive)."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload

    def play(self, item: Any) -> Any:
        return item


def _round_trip(ex: Any, calls: int = 200) -> float:
    """Seconds per call of a no-op actor method, ``ex.workers`` in flight: the head's serial share of an
    episode on Ray (the genome out, the episode's record back)."""
    import numpy as np

    genome = np.zeros((60, 2), dtype=np.float32)
    with ex.pool(_Echo, None) as pool:
        list(pool.imap("play", [genome] * ex.workers))  # started
        t0 = time.perf_counter()
        list(pool.imap("play", [genome] * calls))
        return (time.perf_counter() - t0) / calls


def _search(pipe: Pipeline, pieces: dict[str, Any], args: argparse.Namespace, ex: Any) -> dict[str, Any]:
    from autodfp.search.driver import _GenomePlayer, search

    pool_start = round_trip = None
    if ex.parallel:
        round_trip = _round_trip(ex)  # what starting the workers' environments costs, apart from the episodes
        from autodfp.search.env import PruningEnv

        env = PruningEnv(
            pieces["pruner"],
            args.macs_ratio,
            pieces["reward"],
            strategy=pipe.config.strategy,
            refiner=pieces["refiner"],
            reward_base=pipe.device_model,
        )
        t0 = time.perf_counter()
        with ex.pool(_GenomePlayer, env) as pool:
            import ray

            ray.get([a.pid.remote() for a in pool.actors])
            pool_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = search(
        pieces["pruner"],
        args.macs_ratio,
        method=args.search,
        episodes=args.episodes,
        reward=pieces["reward"],
        seed=0,
        strategy=pipe.config.strategy,
        refiner=pieces["refiner"],
        reward_base=pipe.device_model,
        progress=False,
        executor=ex,
    )
    seconds = time.perf_counter() - t0
    return {
        "episodes": result.episodes,
        "seconds": seconds,
        "episodes_per_s": result.episodes / seconds,
        "pool_start_s": pool_start,
        "round_trip_s": round_trip,
        "best_reward": result.best_reward,
        "best_macs_ratio": result.best_macs_ratio,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="zoo name, e.g. resnet56_cifar10")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (1: in process, no Ray)")
    ap.add_argument("--chunks", type=int, default=4, help="64-input chunks synthesised per count (default 4)")
    ap.add_argument("--episodes", type=int, default=40, help="search episodes per count (default 40)")
    ap.add_argument("--search", default="random", choices=("random", "evolution"))
    ap.add_argument("--macs-ratio", type=float, default=0.5)
    ap.add_argument("--skip", default="", help="'synthesis' or 'search' to leave one out")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)

    counts = [int(w) for w in args.workers.split(",")]
    if any(w > 1 for w in counts):  # this script's _Echo goes to the workers by value, not by import
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    net, mc = load_model(args.model)
    shape = input_shape_of(mc)
    cfg = Config(effort="fast")
    pipe = Pipeline(net, mc, shape, cfg, seed=0, device="cpu", progress=False)
    pieces: dict[str, Any] = {}
    if "search" not in args.skip:  # the search's batches before any timing (cached after the first run)
        from autodfp.search.env import PruningEnv

        pieces["pruner"] = pipe.pruner(synthesising=True)
        pipe.refiner(pieces["pruner"])  # its batch, distilled or read now
        pieces["reward"] = pipe.reward("synthetic")
        # the pruner's channel analyses (the environment's features), computed once for every count
        PruningEnv(pieces["pruner"], args.macs_ratio, pieces["reward"], strategy=cfg.strategy)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads_in_process": torch.get_num_threads(),
        "load_before": os.getloadavg(),
        "argv": sys.argv,
    }
    print(json.dumps(meta))
    rows, first = [], None
    for w in counts:
        with executor_for(w) as ex:
            row: dict[str, Any] = {"workers": w, "threads_per_worker": getattr(ex, "threads", torch.get_num_threads())}
            if "synthesis" not in args.skip:
                syn = _synthesis(net, mc.name, shape, cfg, args.chunks, ex)
                images = syn.pop("images")
                first = images if first is None else first
                syn["same_tensors_as_first"] = bool(torch.equal(images, first))
                row["synthesis"] = syn
            if "search" not in args.skip:
                # a fresh refiner per count: its reference activations are computed by whoever scores
                # (the head, or each worker), never inherited warm from the previous count
                pieces["refiner"] = pipe.search_refiner(pipe.refiner(pieces["pruner"]))
                row["search"] = _search(pipe, pieces, args, ex)
        row["load_after"] = os.getloadavg()
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print(
        f"\n{args.model}: {args.chunks} chunks of {CHUNK}, {args.episodes} {args.search} episodes at {args.macs_ratio}"
    )
    print(f"{'workers':>8} {'synth in/s':>11} {'speed-up':>9} {'episodes/s':>11} {'speed-up':>9} {'pool start':>11}")
    for row in rows:
        s, e = row.get("synthesis"), row.get("search")
        cells = [f"{row['workers']:>8}"]
        cells.append(
            f"{s['inputs_per_s']:>11.3f} {s['inputs_per_s'] / base['synthesis']['inputs_per_s']:>8.2f}x"
            if s
            else " " * 21
        )
        cells.append(
            f"{e['episodes_per_s']:>11.3f} {e['episodes_per_s'] / base['search']['episodes_per_s']:>8.2f}x"
            if e
            else " " * 21
        )
        cells.append(f"{e['pool_start_s']:>10.1f}s" if e and e["pool_start_s"] is not None else f"{'-':>11}")
        print(" ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
