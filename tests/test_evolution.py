"""Evolutionary search: on budget, a pure function of its seed, exact on resume, and better than its random start."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autodfp.compress.surgery import Pruner
from autodfp.errors import CheckpointError
from autodfp.models import load_model
from autodfp.search.driver import _mutate, search
from autodfp.search.env import MaskedModel
from test_cli import last_json, run

CIFAR = (3, 32, 32)

#: ResNet-20's prunable groups in forward order, by the consumer weight a pruned group zeroes
CONSUMERS = [f"layer{s}.{b}.conv2.weight" for s in (1, 2, 3) for b in range(3)]
WEIGHTS = np.linspace(1.0, -1.0, len(CONSUMERS))


def prefers_early(model: MaskedModel) -> float:
    """A reward with a known optimum: keep early layers, prune late ones (weights +1 … -1 by depth).

    Read from the masked state (``strategy="none"`` zeroes the consumer's pruned input channels),
    so it costs nothing and a search that exploits what it found beats random draws clearly.
    """
    total = 0.0
    for w, key in zip(WEIGHTS, CONSUMERS):
        t = model.state.get(key)
        kept = 1.0 if t is None else float((t.abs().sum(dim=(0, 2, 3)) > 0).float().mean())
        total += float(w) * kept
    return total


class Crash(RuntimeError):
    pass


class CrashingReward:
    """``prefers_early`` that dies at its ``at``-th call: a run interrupted for real, mid-chunk."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, model: MaskedModel) -> float:
        self.calls += 1
        if self.calls == self.at:
            raise Crash("interrupted")
        return prefers_early(model)


@pytest.fixture(scope="module")
def pruner():
    net, _ = load_model("resnet20_cifar10")
    return Pruner(net, CIFAR)


KW = dict(method="evolution", reward=prefers_early, strategy="none", progress=False)


@pytest.mark.parametrize("ratio, strategy", [(0.3, "none"), (0.7, "autodfp")])
def test_every_episode_meets_the_budget(pruner, ratio, strategy):
    result = search(pruner, ratio, **{**KW, "strategy": strategy}, episodes=10, warmup=3, seed=1)
    assert result.method == "evolution" and len(result.history) == 10
    for rec in result.history:
        assert abs(rec.macs / (ratio * result.total_macs) - 1) <= 0.01
    assert abs(result.best_macs_ratio / ratio - 1) <= 0.01


def test_same_seed_same_run_and_the_random_start_is_random_search(pruner):
    a = search(pruner, 0.5, episodes=16, warmup=6, seed=7, **KW)
    b = search(pruner, 0.5, episodes=16, warmup=6, seed=7, **KW)
    assert a.history == b.history and a.best_plan.to_dict() == b.best_plan.to_dict()
    c = search(pruner, 0.5, episodes=16, warmup=6, seed=8, **KW)
    assert [r.reward for r in c.history] != [r.reward for r in a.history]
    # the population's episodes are the very episodes random search plays with the same seed
    rnd = search(pruner, 0.5, **{**KW, "method": "random"}, episodes=6, seed=7)
    assert [(r.reward, r.macs) for r in a.history[:6]] == [(r.reward, r.macs) for r in rnd.history]
    assert [(r.reward, r.macs) for r in a.history[6:8]] != [(r.reward, r.macs) for r in rnd.history[:2]]


def test_children_improve_on_random_search_at_equal_episodes(pruner):
    """After the random start, children are mutants of the archive's best, not fresh draws.

    On a smooth reward they score far above random plans on average: a mean gap that would vanish
    if children were drawn at random, or taken from the worst of the archive.
    """
    for seed in (0, 1):
        evo = search(pruner, 0.5, episodes=40, warmup=10, seed=seed, **KW)
        rnd = search(pruner, 0.5, **{**KW, "method": "random"}, episodes=40, seed=seed)
        children = np.mean([r.reward for r in evo.history[20:]])
        assert children > np.mean([r.reward for r in rnd.history[20:]]) + 0.1
        assert children > np.mean([r.reward for r in evo.history[:10]]) + 0.1
        assert evo.best_reward >= max(r.reward for r in evo.history[:10])


def test_resume_after_a_crash_equals_an_uninterrupted_run(pruner, tmp_path):
    kw = {**KW, "seed": 5, "checkpoint_every": 3}
    full = search(pruner, 0.6, episodes=12, warmup=4, **kw)
    with pytest.raises(Crash):  # dies in episode 8: the checkpoint after episode 6 survives
        search(pruner, 0.6, episodes=12, warmup=4, checkpoint_dir=tmp_path, **{**kw, "reward": CrashingReward(8)})
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["episodes"] == 6
    state = json.loads((tmp_path / latest["dir"] / "state.json").read_text())
    archive = state["archive"]
    assert len(archive) == 4 and state["config"]["warmup"] == 4
    assert [a["reward"] for a in archive] == sorted((a["reward"] for a in archive), reverse=True)
    assert all(np.asarray(a["genome"]).shape == (9, 2) for a in archive)
    # warmup left at its default: the resumed run takes the checkpoint's population (4), not 12 // 4
    resumed = search(pruner, 0.6, episodes=12, checkpoint_dir=tmp_path, resume=True, **kw)
    assert resumed.history == full.history
    assert resumed.best_plan.to_dict() == full.best_plan.to_dict()
    with pytest.raises(CheckpointError, match="more than the 5 requested"):
        search(pruner, 0.6, episodes=5, checkpoint_dir=tmp_path, resume=True, **kw)
    with pytest.raises(CheckpointError, match="warmup=4"):  # another population is another search
        search(pruner, 0.6, episodes=12, warmup=5, checkpoint_dir=tmp_path, resume=True, **kw)


def test_mutation_touches_only_genes_the_environment_reads():
    rng = np.random.default_rng(0)
    parent = rng.uniform(-0.5, 0.5, size=(9, 2)).astype(np.float32)  # far from the clip at ±1
    for _ in range(50):
        child = _mutate(parent, rng, sigma=0.05, p_mutate=0.0, active=np.array([True, False]))
        assert child.dtype == np.float32 and child.shape == parent.shape
        assert np.array_equal(child[:, 1], parent[:, 1])  # λ is ignored unless the strategy is autodfp
        assert int((child[:, 0] != parent[:, 0]).sum()) == 1  # never a copy of the parent
    both = _mutate(parent, rng, sigma=0.05, p_mutate=1.0, active=np.array([True, True]))
    assert np.all(both != parent)
    clipped = _mutate(np.ones((9, 2), np.float32), rng, sigma=5.0, p_mutate=1.0, active=np.array([True, True]))
    assert np.all(np.abs(clipped) <= 1.0) and np.any(clipped < 1.0)


def test_cli_prune_with_evolution(tmp_path):
    out_dir = tmp_path / "evo"
    proc = run(
        "prune",
        "resnet20_cifar10",
        "--macs-ratio",
        "0.6",
        "--search",
        "evolution",
        "--episodes",
        "4",
        "--warmup",
        "2",
        "--reward-inputs",
        "16",
        "--no-refine",
        "--out",
        str(out_dir),
        "--limit",
        "50",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert out["episodes"] == 4 and abs(out["macs_ratio_achieved"] - 0.6) <= 0.006
    saved = json.loads((out_dir / "search.json").read_text())
    assert saved["method"] == "evolution" and len(saved["history"]) == 4
