"""Searching per-layer pruning plans under a MACs budget: SAC agent, evolution, uniform and random baselines.

All methods drive the same :class:`~autodfp.search.env.PruningEnv`, so they obey the same clipping and
repair and differ only in how actions are chosen; the comparison between them is fair by
construction, and at equal episodes it is at equal cost (one episode is one plan scored by one
reward call).

Evolution is the cheap non-learned alternative to SAC: is a policy network worth its cost over
perturbing the best plans found so far? It starts from the same number of random episodes as SAC's
warm-up (the very episodes random search plays with the same seed), then mutates tournament winners
of an archive of the best plans (see :func:`_run_evolution`).

SAC credit assignment. The reward exists only for a finished plan. Following AMC, every
transition of an episode is stored with the *episode's* reward and marked terminal, so the critic
regresses ``Q(s, a) = E[R | s, a]`` directly instead of propagating a sparse terminal reward back
through 10–30 bootstrapped steps (``credit="terminal"`` keeps that textbook form, with γ = 1, for
comparison). Raw rewards are on an arbitrary scale (a KL of 0.3 or of 3), while SAC's entropy
temperature starts at a fixed value, so rewards are rank-normalised to ``[-1, 1]`` among all
episodes seen so far before they reach the critic (``reward_norm``); the ordering, which is all
the search needs, is unchanged.

Reproducibility. A run is a pure function of its seed: torch, numpy, python ``random``, SB3's
action space and the environment are all seeded, and learning proceeds in chunks of
``checkpoint_every`` episodes in fresh and resumed runs alike, so a run resumed from a checkpoint
(model, replay buffer, optimiser and RNG states) ends with the same plan as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.nn as nn

from autodfp._checks import check_seed
from autodfp._io import atomic_path
from autodfp.compress.plan import Plan
from autodfp.compress.surgery import Pruner
from autodfp.config import DEFAULTS, SEARCH_METHODS
from autodfp.distributed.executor import Executor, Pool
from autodfp.errors import AutoDFPError, CheckpointError, PlanError
from autodfp.search.budget import DEFAULT_TOL, MacsModel
from autodfp.search.checkpoint import (
    AGENT,
    CHECKPOINT_FORMAT,
    REPLAY,
    STATE,
    Checkpointer,
    agent_counters,
    load_agent,
    load_replay,
    reading,
    replay_meta,
    save_agent,
    save_replay,
)
from autodfp.search.env import MaskedModel, PruningEnv, RewardFn

METHODS = SEARCH_METHODS  #: one list for the library, the config and the CLI

log = logging.getLogger("autodfp")

#: SAC settings for a 10–30-step episodic problem with one reward per episode (see module doc).
#: γ and τ do not matter with per-episode credit (every target is terminal). One training round per
#: episode with as many gradient steps as it had transitions. Measured on ResNet-56 at 0.5 MACs
#: (KL reward, 150 episodes, 30 warm-up, seeds 0–3): these settings reached a mean best reward of
#: −1.52 against −1.61 with a 64×64 net at lr 1e-3, −1.59 without reward normalisation, −1.71
#: with a sparse terminal reward, and −1.70 for random search.
SAC_DEFAULTS: dict[str, Any] = {
    "learning_rate": 3e-4,
    "batch_size": 256,
    "buffer_size": 20_000,
    "gamma": 1.0,
    "tau": 0.01,
    "train_freq": (1, "episode"),
    "gradient_steps": -1,
    "ent_coef": "auto_0.1",
    "net_arch": [256, 256],
    "credit": "episode",  # "episode" (AMC) | "terminal" (sparse reward, bootstrapped)
    "reward_norm": "rank",  # "rank" | "zscore" | "none"
}


#: Evolution settings (see :func:`_run_evolution`); the population is the ``warmup`` argument, so that
#: evolution and SAC start from the same number of random episodes. ``sigma`` is the Gaussian
#: mutation's standard deviation in action space, decaying linearly from the first child to the
#: last: broad moves while the archive is still mostly random, fine-tuning of the best plans at the end.
EVOLUTION_DEFAULTS: dict[str, Any] = {
    "tournament": 3,
    "sigma": (0.3, 0.05),
    "p_mutate": 0.3,
}


class EpisodeRecord(NamedTuple):
    episode: int  # 1-based
    reward: float
    macs: int
    best_so_far: float


@dataclass
class SearchResult:
    best_plan: Plan
    best_reward: float
    best_macs: int
    history: list[EpisodeRecord]
    episodes: int
    seconds: float
    plateau_episode: int
    method: str = "sac"
    total_macs: int = 0

    @property
    def best_macs_ratio(self) -> float:
        return self.best_macs / self.total_macs if self.total_macs else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "best_reward": self.best_reward,
            "best_macs": self.best_macs,
            "best_macs_ratio": self.best_macs_ratio,
            "episodes": self.episodes,
            "seconds": self.seconds,
            "plateau_episode": self.plateau_episode,
            "best_plan": self.best_plan.to_dict(),
            "history": [r._asdict() for r in self.history],
        }


def plateau_episode(history: Sequence[EpisodeRecord], rel_tol: float = 0.01) -> int:
    """The first episode after which the best reward never improved by more than a tolerance.

    The tolerance is ``rel_tol`` (1 %) of the whole improvement of the run, from the first
    episode's reward to the final best: the returned episode is the first whose best-so-far lies
    within that distance of the final best, i.e. where the search had found 99 % of what it would
    ever find. A run that never improved plateaus at episode 1.
    """
    if not history:
        return 0
    final = history[-1].best_so_far
    tol = rel_tol * max(final - history[0].reward, 0.0) + 1e-12
    for rec in history:
        if rec.best_so_far >= final - tol:
            return rec.episode
    return history[-1].episode


# ---------------------------------------------------------------------------------------------
# Bookkeeping shared by all methods
# ---------------------------------------------------------------------------------------------
class _Tracker:
    def __init__(self, total: int, progress: bool, initial: int = 0, desc: str = "search") -> None:
        self.history: list[EpisodeRecord] = []
        self.best_plan: Plan | None = None
        self.best_reward = -math.inf
        self.best_macs = 0
        self.total_macs = 1
        #: workers scoring episodes at once, shown beside the best reward (None: in this process)
        self.workers: int | None = None
        self.bar = None
        if progress:
            from autodfp._progress import progress_bar

            self.bar = progress_bar(total=total, initial=initial, desc=desc, unit="ep")

    def record(self, info: dict[str, Any]) -> None:
        reward = float(info["reward"])
        if reward > self.best_reward:
            self.best_reward, self.best_plan, self.best_macs = reward, info["plan"], int(info["macs"])
        self.history.append(EpisodeRecord(len(self.history) + 1, reward, int(info["macs"]), self.best_reward))
        if self.bar is not None:
            self.bar.update(1)
            shown = {"best": f"{self.best_reward:.4g}", "macs": f"{self.best_macs / self.total_macs:.3f}x"}
            if self.workers is not None:
                shown["workers"] = str(self.workers)
            self.bar.set_postfix(shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def state(self) -> dict[str, Any]:
        return {
            "history": [list(r) for r in self.history],
            "best_reward": self.best_reward,
            "best_macs": self.best_macs,
            "best_plan": self.best_plan.to_dict() if self.best_plan else None,
        }

    def load(self, d: dict[str, Any]) -> None:
        self.history = [EpisodeRecord(int(e), float(r), int(m), float(b)) for e, r, m, b in d["history"]]
        self.best_reward = float(d["best_reward"])
        self.best_macs = int(d["best_macs"])
        self.best_plan = Plan.from_dict(d["best_plan"]) if d["best_plan"] else None
        if self.bar is not None:
            self.bar.reset(total=self.bar.total)
            self.bar.update(len(self.history))


# ---------------------------------------------------------------------------------------------
# RNG states (JSON-serialisable, so checkpoints hold no pickled RNG objects)
# ---------------------------------------------------------------------------------------------
def _rng_state(extra: dict[str, np.random.Generator]) -> dict[str, Any]:
    # numpy's stubs type the default (legacy) call as returning the dict form; the global
    # MT19937 state comes back as the legacy tuple
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    py = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
        "generators": {k: g.bit_generator.state for k, g in extra.items()},
    }


def _set_rng_state(d: dict[str, Any], extra: dict[str, np.random.Generator]) -> None:
    torch.set_rng_state(torch.tensor(d["torch"], dtype=torch.uint8))
    n = d["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = d["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    for k, g in extra.items():
        if k in d["generators"]:
            g.bit_generator.state = d["generators"][k]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# SAC pieces
# ---------------------------------------------------------------------------------------------
def _episode_buffer_class():
    from stable_baselines3.common.buffers import ReplayBuffer

    class EpisodeReplayBuffer(ReplayBuffer):
        """Holds an episode's transitions until its reward is known, then stores them.

        ``credit="episode"``: every transition gets the episode reward and ``done=True``.
        ``credit="terminal"``: rewards and dones as the environment gave them (sparse).
        Rewards are normalised at sampling time over all episodes seen so far (see module doc).
        """

        def __init__(self, *args: Any, credit: str = "episode", reward_norm: str = "rank", **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if credit not in ("episode", "terminal"):
                raise ValueError(f"unknown credit mode {credit!r}")
            if reward_norm not in ("rank", "zscore", "none"):
                raise ValueError(f"unknown reward normalisation {reward_norm!r}")
            self.credit = credit
            self.reward_norm = reward_norm
            self.pending: list[tuple] = []
            self.episode_rewards: list[float] = []
            self.episode_of = np.full((self.buffer_size,), -1, dtype=np.int64)
            self.is_final = np.zeros((self.buffer_size,), dtype=bool)

        def add(self, obs, next_obs, action, reward, done, infos) -> None:
            self.pending.append(
                (np.array(obs), np.array(next_obs), np.array(action), float(np.asarray(reward).reshape(-1)[0]))
            )
            if not bool(np.asarray(done).reshape(-1)[0]):
                return
            ep_reward = self.pending[-1][3]
            ep = len(self.episode_rewards)
            self.episode_rewards.append(ep_reward)
            n = len(self.pending)
            for i, (o, no, a, r) in enumerate(self.pending):
                last = i == n - 1
                if self.credit == "episode":
                    rew, dn = ep_reward, True
                else:
                    rew, dn = r, last
                self.episode_of[self.pos] = ep
                self.is_final[self.pos] = self.credit == "episode" or last
                super().add(
                    o, no, a, np.array([rew], dtype=np.float32), np.array([dn]), [{"TimeLimit.truncated": False}]
                )
            self.pending = []

        def _normalised(self) -> np.ndarray:
            r = np.asarray(self.episode_rewards, dtype=np.float64)
            if self.reward_norm == "none" or r.size == 0:
                return r
            if self.reward_norm == "zscore":
                sd = r.std()
                return (r - r.mean()) / (sd if sd > 1e-12 else 1.0)
            if r.size == 1:
                return np.zeros(1)
            from scipy.stats import rankdata

            return 2.0 * (rankdata(r) - 1.0) / (r.size - 1) - 1.0

        def _get_samples(self, batch_inds, env=None):
            samples = super()._get_samples(batch_inds, env)
            if self.reward_norm == "none":
                return samples
            norm = self._normalised()
            eps = self.episode_of[batch_inds]
            final = self.is_final[batch_inds]
            rew = np.where(final, norm[np.clip(eps, 0, None)], 0.0).astype(np.float32).reshape(-1, 1)
            return samples._replace(rewards=self.to_torch(rew))

    return EpisodeReplayBuffer


_BUFFER_CLASS = None


def episode_replay_buffer_class():
    """The replay buffer class (defined lazily: importing SB3 costs seconds)."""
    global _BUFFER_CLASS
    if _BUFFER_CLASS is None:
        _BUFFER_CLASS = _episode_buffer_class()
        _BUFFER_CLASS.__module__ = __name__
        _BUFFER_CLASS.__qualname__ = "EpisodeReplayBuffer"
        globals()["EpisodeReplayBuffer"] = _BUFFER_CLASS
    return _BUFFER_CLASS


def __getattr__(name: str) -> Any:  # the class is built on first use (importing SB3 is slow)
    if name == "EpisodeReplayBuffer":
        return episode_replay_buffer_class()
    raise AttributeError(name)


def _make_sac(vec_env: Any, cfg: dict[str, Any], seed: int, learning_starts: int):
    from stable_baselines3 import SAC

    kw = dict(cfg)
    credit = kw.pop("credit")
    reward_norm = kw.pop("reward_norm")
    net_arch = kw.pop("net_arch")
    train_freq = tuple(kw.pop("train_freq"))
    from stable_baselines3.common.logger import Logger

    agent = SAC(
        "MlpPolicy",
        vec_env,
        learning_starts=learning_starts,
        train_freq=train_freq,
        replay_buffer_class=episode_replay_buffer_class(),
        replay_buffer_kwargs={"credit": credit, "reward_norm": reward_norm},
        policy_kwargs={"net_arch": list(net_arch)},
        seed=seed,
        device="cpu",
        verbose=0,
        **kw,
    )
    # a logger with no outputs: SB3's default makes an empty SB3-<time> folder in the temp dir on
    # every learn() call, one per search, that nothing removes
    agent.set_logger(Logger(folder=None, output_formats=[]))
    return agent


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------
def _default_reward(pruner: Pruner, reward: RewardFn | None) -> RewardFn:
    if reward is not None:
        return reward
    if pruner.calibration is None:
        raise AutoDFPError(
            "search needs a reward: pass reward=... (e.g. AgreementReward on synthetic "
            "inputs) or give the Pruner a calibration batch"
        )
    from autodfp.search.rewards import AgreementReward

    return AgreementReward(pruner.model, pruner.calibration)


def search(
    pruner: Pruner,
    target_macs_ratio: float,
    method: str = "sac",
    episodes: int = 300,  # fixed, not $AUTODFP_EFFORT's: a keyword default must not change with the environment
    warmup: int | None = None,
    reward: RewardFn | None = None,
    seed: int = 0,
    strategy: str = DEFAULTS.strategy,
    r_min: float | None = None,
    criterion: str = DEFAULTS.criterion,
    params: dict[str, Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = DEFAULTS.checkpoint_every,
    resume: bool = False,
    progress: bool = True,
    tol: float = DEFAULT_TOL,
    sac_kwargs: dict[str, Any] | None = None,
    model_key: str | None = None,
    macs_model: MacsModel | None = None,
    refiner: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    reward_base: nn.Module | None = None,
    executor: Executor | None = None,
) -> SearchResult:
    """Find a plan at ``target_macs_ratio`` of the original MACs (within ``±tol``).

    ``warmup`` is the number of random-action episodes before SAC learns, and evolution's population
    (its random start and the size of its archive, at least 1); default ``min(50, episodes // 4)``,
    or the checkpoint's value when resuming. ``checkpoint_every`` is
    also SAC's learning chunk; chunking does not change the run, so it only sets how often state is
    written. ``resume=True`` continues from the latest checkpoint in ``checkpoint_dir`` (or starts
    afresh if there is none). ``r_min=None`` lets :meth:`MacsModel.auto_r_min` pick the smallest
    ratio for the target. Seeds python ``random``, numpy and torch globally, as SB3 does.
    ``refiner`` (:class:`autodfp.compress.refine.Refiner`) scores every plan after drift correction, as
    it will be delivered. ``reward_base`` is the original network the reward's forward passes run
    on (a copy on an accelerator); the pruner's own model by default.

    ``executor`` (:mod:`autodfp.distributed`): one that runs work on Ray workers scores the plans of
    a random or evolution search there, ``executor.workers`` at once, each worker holding a copy
    of the environment (the model, the pruner's analysis, the reward and its batch, the refiner),
    sent once. Random search plays the same plans in the same order for any worker count; evolution
    breeds ``workers`` children per generation from the same archive, so its plan depends on the
    count and is the same for the same seed and count (one worker: exactly the serial search). SAC
    plays its episodes one at a time in this process.
    """
    if method not in METHODS:
        raise PlanError(f"unknown search method '{method}'; choose from {', '.join(METHODS)}")
    if episodes < 1 and method != "uniform":
        raise PlanError(f"episodes must be at least 1, got {episodes}")
    if checkpoint_every < 1:
        raise PlanError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    seed = check_seed(seed)
    reward_fn = _default_reward(pruner, reward)
    env = PruningEnv(
        pruner,
        target_macs_ratio,
        reward_fn,
        r_min=r_min,
        strategy=strategy,
        criterion=criterion,
        params=params,
        tol=tol,
        macs_model=macs_model,
        model_key=model_key,
        refiner=refiner,
        reward_base=reward_base,
    )
    t0 = time.perf_counter()
    if method == "uniform":
        return _search_uniform(env, t0)
    if warmup is None:
        warmup = DEFAULTS.warmup_for(episodes)
        if resume and method in ("sac", "evolution"):  # the default depends on episodes; a resumed run keeps its own
            saved = _peek_config(checkpoint_dir)
            warmup = int(saved.get("warmup", warmup)) if saved else warmup
    warmup = int(warmup)
    if method == "evolution":
        warmup = max(warmup, 1)  # a child needs a parent
    cfg = {**SAC_DEFAULTS, **(sac_kwargs or {})}
    config = {
        "method": method,
        "seed": int(seed),
        "target_macs_ratio": float(target_macs_ratio),
        "strategy": strategy,
        "criterion": criterion,
        "r_min": env.r_min,
        "tol": float(tol),
        "params": params or {},
        "groups": env.groups,
        "checkpoint_every": int(checkpoint_every),
        "refine": refiner is not None,
    }
    if method == "sac":
        config.update({"warmup": warmup, "sac": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}})
    elif method == "evolution":
        config.update({"warmup": warmup, "evolution": dict(EVOLUTION_DEFAULTS)})
    ckpt = Checkpointer(checkpoint_dir, json.loads(json.dumps(config)))
    tracker = _Tracker(episodes, progress, desc=f"search ({method})")
    tracker.total_macs = env.mm.total_macs
    pool: Pool | None = None
    try:
        if method in ("random", "evolution") and executor is not None and executor.parallel:
            pool = executor.pool(_GenomePlayer, env)
        scorer: Scorer = _local_scorer(env) if pool is None else _pool_scorer(pool)
        width = 1 if pool is None else pool.size
        tracker.workers = None if pool is None else pool.size
        if method == "random":
            seconds = _run_random(env, tracker, episodes, seed, ckpt, checkpoint_every, resume, scorer)
        elif method == "evolution":
            seconds = _run_evolution(
                env, tracker, episodes, warmup, seed, ckpt, checkpoint_every, resume, scorer, width
            )
        else:
            if executor is not None and executor.parallel:
                log.info("search: SAC plays one episode at a time here; --search evolution or random use the workers")
            seconds = _run_sac(env, tracker, episodes, warmup, seed, cfg, ckpt, checkpoint_every, resume)
    finally:
        tracker.close()
        if pool is not None:
            pool.close()
    elapsed = seconds + (time.perf_counter() - t0)
    assert tracker.best_plan is not None
    return SearchResult(
        tracker.best_plan,
        tracker.best_reward,
        tracker.best_macs,
        tracker.history[:episodes],
        min(len(tracker.history), episodes),
        elapsed,
        plateau_episode(tracker.history[:episodes]),
        method,
        env.mm.total_macs,
    )


def _search_uniform(env: PruningEnv, t0: float) -> SearchResult:
    ratio = env.mm.fit_uniform(env.target, env.r_min, env.tol)
    keep = env.mm.ratio_keep(ratio)
    plan = Plan(
        {g: ratio for g in env.groups},
        criterion=env.criterion,
        strategy=env.strategy,
        params=dict(env.params),
        model=env.model_key,
    )
    if abs(env.mm.macs(keep) / env.target - 1) > env.tol:
        # the uniform steps are too coarse for the band (narrow groups; coupled groups rescale many
        # layers at once): move single channels onto it, as every other search's plan is
        keep = env.mm.repair(keep, env.target, env.tol, env.r_min)
        plan = env.make_plan(keep)
    reward = env.evaluate(plan)
    macs = env.mm.macs(keep)
    rec = EpisodeRecord(1, reward, macs, reward)
    return SearchResult(plan, reward, macs, [rec], 1, time.perf_counter() - t0, 1, "uniform", env.mm.total_macs)


def _peek_config(root: str | Path | None) -> dict[str, Any] | None:
    ckpt = Checkpointer(root, {})
    path = ckpt.latest()
    return None if path is None else ckpt.read_state(path)["config"]


def _resume_state(ckpt: Checkpointer, resume: bool) -> tuple[Path | None, dict[str, Any] | None]:
    if not resume:
        return None, None
    path = ckpt.latest()
    if path is None:
        return None, None
    return path, ckpt.load_state(path)


def _check_done(state: dict[str, Any], episodes: int, path: Path | None) -> int:
    done = int(state["episodes_done"])
    if done > episodes:
        raise CheckpointError(f"checkpoint {path} already holds {done} episodes, more than the {episodes} requested")
    return done


def _restore_common(
    state: dict[str, Any], path: Path, tracker: _Tracker, env: PruningEnv, generators: dict[str, np.random.Generator]
) -> float:
    """Restore what every method keeps in state.json; return the seconds already spent."""
    with reading(path / STATE):
        tracker.load(state["tracker"])
        _set_rng_state(state["rng"], generators)
        seconds = float(state.get("seconds", 0.0))
    env.episodes = int(state["episodes_done"])
    return seconds


def _resume_generators(
    ckpt: Checkpointer,
    resume: bool,
    episodes: int,
    tracker: _Tracker,
    env: PruningEnv,
    generators: dict[str, np.random.Generator],
) -> tuple[int, float, Path | None, dict[str, Any] | None]:
    """Episodes done, seconds spent, checkpoint path and state of a search whose whole state is its
    tracker and numpy generators (plus what the caller reads from ``state``); zeros and None afresh."""
    path, state = _resume_state(ckpt, resume)
    if state is None:
        return 0, 0.0, None, None
    assert path is not None
    done = _check_done(state, episodes, path)
    return done, _restore_common(state, path, tracker, env, generators), path, state


def _save_generators(
    ckpt: Checkpointer,
    done: int,
    tracker: _Tracker,
    generators: dict[str, np.random.Generator],
    seconds: float,
    **extra: Any,
) -> None:
    """The checkpoint :func:`_resume_generators` reads back."""
    ckpt.save(done, {"tracker": tracker.state(), "rng": _rng_state(generators), "seconds": seconds, **extra}, {})


def _play(env: PruningEnv, genome: np.ndarray) -> dict[str, Any]:
    """One episode with the genome's actions; an episode always takes one step per group."""
    env.reset()
    info: dict[str, Any] = {}
    terminated = False
    for action in genome:
        _, _, terminated, _, info = env.step(action)
    assert terminated
    return info


#: plays genomes and yields each one's episode info, in genome order
Scorer = Callable[[Sequence[np.ndarray]], Iterator[dict[str, Any]]]


def _local_scorer(env: PruningEnv) -> Scorer:
    """Genomes played one after the other on ``env``, in this process: the serial search."""
    return lambda genomes: (_play(env, g) for g in genomes)


class _GenomePlayer:
    """A worker's copy of the environment (model, pruner analysis, reward batch, refiner): plays a
    genome and sends back what the tracker records. The environment is deterministic and its
    decision cache only saves time, so a worker's episode is the one the head would have played."""

    def __init__(self, env: PruningEnv) -> None:
        self.env = env

    def play(self, genome: np.ndarray) -> dict[str, Any]:
        info = _play(self.env, genome)
        return {k: info[k] for k in ("plan", "macs", "macs_ratio", "reward")}


def _pool_scorer(pool: Pool) -> Scorer:
    """Genomes played on the pool's workers at once; results in genome order (:meth:`Pool.imap`)."""
    return lambda genomes: pool.imap("play", genomes)


def _run_random(
    env: PruningEnv,
    tracker: _Tracker,
    episodes: int,
    seed: int,
    ckpt: Checkpointer,
    every: int,
    resume: bool,
    scorer: Scorer | None = None,
) -> float:
    """Uniform random genomes, a checkpoint chunk drawn at once and scored by ``scorer`` (in this
    process by default): the draws do not depend on the rewards, so the plans, their order and the
    result are the same whether the chunk is played serially or on workers."""
    score = scorer if scorer is not None else _local_scorer(env)
    rng = np.random.default_rng(seed)
    done, prior, _, _ = _resume_generators(ckpt, resume, episodes, tracker, env, {"random": rng})
    t0 = time.perf_counter()
    while done < episodes:
        # one draw of every step's action: the same numbers, in the same order, as a draw per step
        genomes = [
            rng.uniform(-1.0, 1.0, size=(env.n_steps, 2)).astype(np.float32) for _ in range(min(every, episodes - done))
        ]
        for info in score(genomes):
            tracker.record(info)
            done += 1
        _save_generators(ckpt, done, tracker, {"random": rng}, prior + time.perf_counter() - t0)
    return prior


class _Individual(NamedTuple):
    reward: float
    episode: int  # 1-based; breaks reward ties in favour of the older plan
    genome: np.ndarray  # (steps, 2) float32: the actions fed to the environment


def _mutate(
    parent: np.ndarray, rng: np.random.Generator, sigma: float, p_mutate: float, active: np.ndarray
) -> np.ndarray:
    """Gaussian noise on a random subset of the genes the environment reads (at least one).

    The strength gene is read only by the ``autodfp`` strategy (``active``); mutating it otherwise
    would spend a reward call on a plan already scored. The noise is drawn for every gene whether
    used or not, so the generator advances by the same amount for every child.
    """
    mask = (rng.random(parent.shape) < p_mutate) & active
    noise = rng.normal(0.0, sigma, parent.shape)
    if not mask.any():
        mask.flat[int(rng.choice(np.flatnonzero(np.broadcast_to(active, parent.shape))))] = True
    return np.clip(parent + np.where(mask, noise, 0.0), -1.0, 1.0).astype(np.float32)


def _archive_state(archive: list[_Individual]) -> list[dict[str, Any]]:
    return [{"reward": i.reward, "episode": i.episode, "genome": i.genome.tolist()} for i in archive]


def _run_evolution(
    env: PruningEnv,
    tracker: _Tracker,
    episodes: int,
    population: int,
    seed: int,
    ckpt: Checkpointer,
    every: int,
    resume: bool,
    scorer: Scorer | None = None,
    width: int = 1,
) -> float:
    """A steady-state genetic search: one child per episode, so it is comparable at equal reward calls.

    An individual is the sequence of actions fed to the environment over one episode (``steps × 2``
    in ``[-1, 1]``), not the plan the environment made of them after clipping to the feasible range
    and repairing the budget: the environment is deterministic, so the genome reproduces its plan
    exactly, and a mutation of it always yields a plan on budget. A mutation in a clipped region
    changes nothing; that costs an evaluation now and then, not correctness.

    The first ``population`` episodes are uniform random genomes, drawn exactly as :func:`_run_random`
    draws its actions (same seed, same episodes). Every later episode picks a parent by tournament
    among the ``population`` best individuals so far (the archive), mutates it (see
    :data:`EVOLUTION_DEFAULTS`), plays it and offers it to the archive. The archive and the generator
    are checkpointed, so a run resumed with the episodes it was started with is exact; a finished run
    extended to more episodes continues with the mutation schedule of the new total.

    ``width`` children are bred from the same archive and scored together by ``scorer`` (on
    ``width`` workers), then offered to the archive in order. With ``width=1`` (the default) that
    is the steady-state search above; wider, each child of a generation misses its siblings, so the
    plan depends on the width, and the same seed and width give the same plan. The random start
    does not read the archive and is scored in batches as wide as the checkpoint chunk allows at
    any width. Generations never cross a checkpoint chunk, so a resumed run stays exact.
    """
    score = scorer if scorer is not None else _local_scorer(env)
    rng = np.random.default_rng(seed)
    shape = (env.n_steps, 2)
    active = np.array([True, env.strategy == "autodfp"])
    sigma0, sigma1 = (float(x) for x in EVOLUTION_DEFAULTS["sigma"])
    p_mutate = float(EVOLUTION_DEFAULTS["p_mutate"])
    tournament = int(EVOLUTION_DEFAULTS["tournament"])
    archive: list[_Individual] = []
    done, prior, path, state = _resume_generators(ckpt, resume, episodes, tracker, env, {"evolution": rng})
    if state is not None:
        assert path is not None
        with reading(path / STATE):
            archive = [
                _Individual(
                    float(d["reward"]), int(d["episode"]), np.asarray(d["genome"], dtype=np.float32).reshape(shape)
                )
                for d in state["archive"]
            ]
    t0 = time.perf_counter()
    while done < episodes:
        end = done + min(every, episodes - done)
        while done < end:
            # the random start reads no archive: one batch; then generations of `width` children
            size = min(end, population) - done if done < population else min(max(int(width), 1), end - done)
            genomes = []
            for episode in range(done, done + size):
                if episode < population:
                    genome = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
                else:
                    # the archive is sorted best first, so the best contestant has the smallest index
                    picks = rng.choice(len(archive), size=min(tournament, len(archive)), replace=False)
                    frac = min((episode - population) / max(episodes - population - 1, 1), 1.0)
                    sigma = sigma0 + (sigma1 - sigma0) * frac
                    genome = _mutate(archive[int(picks.min())].genome, rng, sigma, p_mutate, active)
                genomes.append(genome)
            for genome, info in zip(genomes, score(genomes)):
                tracker.record(info)
                done += 1
                archive.append(_Individual(float(info["reward"]), done, genome))
                archive.sort(key=lambda i: (-i.reward, i.episode))
                del archive[population:]
        _save_generators(
            ckpt, done, tracker, {"evolution": rng}, prior + time.perf_counter() - t0, archive=_archive_state(archive)
        )
    return prior


def _run_sac(
    env: PruningEnv,
    tracker: _Tracker,
    episodes: int,
    warmup: int,
    seed: int,
    cfg: dict[str, Any],
    ckpt: Checkpointer,
    every: int,
    resume: bool,
) -> float:
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    class _Record(BaseCallback):
        def _on_step(self) -> bool:
            for info, d in zip(self.locals["infos"], self.locals["dones"]):
                if d:
                    tracker.record(info)
            return True

    steps = env.n_steps
    vec_env = DummyVecEnv([lambda: env])
    path, state = _resume_state(ckpt, resume)
    done, prior = 0, 0.0
    if state is None:
        _seed_all(seed)
        model = _make_sac(vec_env, cfg, seed, learning_starts=warmup * steps)
    else:
        assert path is not None
        done = _check_done(state, episodes, path)
        # The agent is rebuilt from the configuration (which the checkpoint was checked to share) and
        # only its states are read back: nothing in the checkpoint names code to run.
        model = _make_sac(vec_env, cfg, seed, learning_starts=warmup * steps)
        with reading(path / STATE):
            counters, meta = state["agent"], state["replay"]
        load_agent(model, path, counters)
        load_replay(model.replay_buffer, path, meta)
        prior = _restore_common(state, path, tracker, env, {})
        # the env is fresh (at an episode start, as it was when the checkpoint was written)
        model._last_obs = vec_env.reset()
        model._last_episode_starts = np.ones((vec_env.num_envs,), dtype=bool)
        with reading(path / STATE):
            _set_rng_state(state["rng"], {})
            model.action_space.np_random.bit_generator.state = state["rng"]["action_space"]
    callback = _Record()
    t0 = time.perf_counter()
    while done < episodes:
        chunk = min(every, episodes - done)
        model.learn(
            total_timesteps=chunk * steps,
            reset_num_timesteps=done == 0 and state is None,
            callback=callback,
            log_interval=None,
            progress_bar=False,
        )
        done += chunk
        rng = _rng_state({})
        rng["action_space"] = model.action_space.np_random.bit_generator.state
        ckpt.save(
            done,
            {
                "tracker": tracker.state(),
                "rng": rng,
                "seconds": prior + time.perf_counter() - t0,
                "agent": agent_counters(model),
                "replay": replay_meta(model.replay_buffer),
            },
            {AGENT: lambda p: save_agent(model, p), REPLAY: lambda p: save_replay(model.replay_buffer, p)},
        )
    return prior


# ---------------------------------------------------------------------------------------------
# Proxy check and plots
# ---------------------------------------------------------------------------------------------
def proxy_check(
    pruner: Pruner,
    reward: RewardFn,
    accuracy_fn: Callable[[nn.Module], float],
    target_macs_ratio: float,
    k: int = 50,
    seed: int = 0,
    strategy: str = DEFAULTS.strategy,
    r_min: float | None = None,
    physical: bool = False,
    progress: bool = True,
    refiner: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[float | None, list[float], list[float]]:
    """Does the reward rank plans like real accuracy? Spearman ρ over ``k`` random feasible plans.

    Plans come from random actions through the same environment the search uses (same clipping
    and repair). ``accuracy_fn`` gets the masked model, or with ``physical=True`` a physically
    pruned copy (slower, same function). With ``refiner`` both the reward and the accuracy are
    those of the drift-corrected plan, as the search would deliver it.

    ``k`` must be at least 3: a rank correlation of two points is ±1 whatever they are. ρ is
    None when it is undefined (all rewards or all accuracies equal), never NaN, so that it can be
    written as JSON.
    """
    from scipy.stats import spearmanr

    if isinstance(k, bool) or not isinstance(k, int) or k < 3:
        raise PlanError(f"proxy check needs at least 3 plans to rank (k), got {k!r}")
    seed = check_seed(seed)
    env = PruningEnv(pruner, target_macs_ratio, reward, r_min=r_min, strategy=strategy, refiner=refiner)
    rng = np.random.default_rng(seed)
    rewards, accs = [], []
    tracker = _Tracker(k, progress, desc="proxy")
    try:
        for _ in range(k):
            env.reset()
            while True:
                _, _, terminated, _, info = env.step(rng.uniform(-1.0, 1.0, size=2).astype(np.float32))
                if terminated:
                    break
            plan = info["plan"]
            decisions = env.last_decisions  # the ones the reward just scored
            if physical:
                model = pruner.apply(plan, decisions).model
            else:
                model = MaskedModel(pruner.model, pruner.masked_state(decisions))
            rewards.append(float(info["reward"]))
            accs.append(float(accuracy_fn(model)))
            tracker.record(info)
    finally:
        tracker.close()
    with warnings.catch_warnings():  # scipy warns on constant input; that case is reported as None
        warnings.simplefilter("ignore")
        rho = float(spearmanr(rewards, accs).statistic)
    return (rho if math.isfinite(rho) else None), rewards, accs


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _figure().close(fig)
    return Path(path)


def plot_proxy(
    rewards: Sequence[float],
    accuracies: Sequence[float],
    path: str | Path,
    rho: float | None = None,
    title: str = "reward vs accuracy",
) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(rewards, accuracies, s=14, alpha=0.8)
    ax.set_xlabel("reward")
    ax.set_ylabel("accuracy")
    ax.set_title(title + (f" (Spearman ρ = {rho:.3f})" if rho is not None else ""))
    ax.grid(alpha=0.3)
    return _save_fig(fig, path)


def plot_ratios(
    plan: Plan, uniform_plan: Plan | None, path: str | Path, title: str = "preserved ratio per layer"
) -> Path:
    plt = _figure()
    names = list(plan.ratios)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names) + 2), 4))
    ax.bar(x, [plan.ratios[n] for n in names], width=0.8, label="searched", color="tab:blue")
    if uniform_plan is not None:
        ax.plot(
            x,
            [uniform_plan.ratios.get(n, 1.0) for n in names],
            color="tab:orange",
            marker=".",
            linestyle="--",
            label="uniform",
        )
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("preserved ratio")
    ax.set_title(title)
    ax.legend()
    return _save_fig(fig, path)


def plot_rewards(history: Sequence[EpisodeRecord], path: str | Path, title: str = "search progress") -> Path:
    plt = _figure()
    ep = [r.episode for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [r.reward for r in history], ".", alpha=0.5, label="episode reward")
    ax.plot(ep, [r.best_so_far for r in history], "-", label="best so far")
    ax.set_xlabel("episode")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_fig(fig, path)


__all__ = [
    "CHECKPOINT_FORMAT",
    "EVOLUTION_DEFAULTS",
    "EpisodeRecord",
    "METHODS",
    "SAC_DEFAULTS",
    "SearchResult",
    "plateau_episode",
    "plot_proxy",
    "plot_ratios",
    "plot_rewards",
    "proxy_check",
    "search",
]
