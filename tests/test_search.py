"""Search: every plan on budget, the fast-path reward is the real model's, seeded runs repeat, resume is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autodfp.compress.surgery import Pruner
from autodfp.errors import PlanError
from autodfp.models import load_model
from autodfp.search.driver import EpisodeRecord, plateau_episode, plot_ratios, plot_rewards, proxy_check, search
from autodfp.search.env import OBS_NAMES, MaskedModel, PruningEnv
from autodfp.search.rewards import AgreementReward

CIFAR = (3, 32, 32)


@pytest.fixture(scope="module")
def resnet20():
    net, _ = load_model("resnet20_cifar10")
    pruner = Pruner(net, CIFAR)
    x = torch.randn(8, *CIFAR, generator=torch.Generator().manual_seed(0))
    return pruner, AgreementReward(net, x)


def _constant(model: torch.nn.Module) -> float:
    return 0.0


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_every_episode_meets_the_budget(resnet20, ratio):
    pruner, _ = resnet20
    result = search(
        pruner,
        ratio,
        method="random",
        episodes=3,
        reward=_constant,
        seed=int(ratio * 10),
        strategy="none",
        progress=False,
    )
    assert len(result.history) == 3
    for rec in result.history:
        assert abs(rec.macs / (ratio * result.total_macs) - 1) <= 0.01
    assert abs(result.best_macs_ratio / ratio - 1) <= 0.01


def test_mobilenet_budget_is_met_by_the_environment():
    net, _ = load_model("mobilenet_v1_075_imagenet")
    pruner = Pruner(net, (3, 224, 224))
    env = PruningEnv(pruner, 0.4, _constant, strategy="none")
    rng = np.random.default_rng(0)
    for _ in range(3):
        obs, _ = env.reset()
        assert obs.shape == (len(OBS_NAMES),) and obs.dtype == np.float32 and env.observation_space.contains(obs)
        for _ in range(env.n_steps):
            obs, reward, terminated, _, info = env.step(rng.uniform(-1, 1, 2))
        assert terminated
        assert abs(info["macs"] / env.target - 1) <= 0.01
        assert info["macs"] == env.mm.macs_for_plan(info["plan"])


def test_fast_path_reward_equals_the_physically_pruned_models(resnet20):
    pruner, reward = resnet20
    result = search(pruner, 0.5, method="random", episodes=2, reward=reward, seed=0, progress=False, strategy="autodfp")
    physical = pruner.apply(result.best_plan).model
    assert reward(physical) == pytest.approx(result.best_reward, abs=1e-4)
    assert result.best_plan.strategy == "autodfp"
    strengths = [p["strength"] for p in result.best_plan.layer_params.values()]
    assert len(strengths) == len(result.best_plan.ratios) and all(0 <= s <= 1 for s in strengths)
    assert len(set(result.best_plan.ratios.values())) > 1  # per-layer ratios, not a uniform plan


def test_search_leaves_the_original_in_eval_mode_and_unchanged(resnet20):
    """The reward wraps the original in a MaskedModel: restoring the wrapper's mode must not flip the original.

    A network left in training mode normalises with batch statistics and overwrites its BN running
    statistics at its next forward pass (a refinement fitted after the search did exactly that).
    """
    pruner, reward = resnet20
    before = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    search(pruner, 0.5, method="random", episodes=2, reward=reward, seed=0, progress=False)
    assert not any(m.training for m in pruner.model.modules())
    with torch.no_grad():
        pruner.model(torch.randn(4, *CIFAR))
    assert all(torch.equal(v, before[k]) for k, v in pruner.model.state_dict().items())


def test_same_seed_same_plan_and_resume_is_exact(resnet20, tmp_path):
    pruner, reward = resnet20
    kw = dict(method="sac", warmup=3, reward=reward, progress=False)
    a = search(pruner, 0.5, episodes=6, seed=7, **kw)
    b = search(pruner, 0.5, episodes=6, seed=7, **kw)
    assert a.best_plan.to_dict() == b.best_plan.to_dict() and a.history == b.history
    # episodes 4-6 come from the learned policy; a different seed gives different plans
    c = search(pruner, 0.5, episodes=6, seed=8, **kw)
    assert [r.reward for r in c.history] != [r.reward for r in a.history]

    full = search(pruner, 0.5, episodes=8, seed=3, checkpoint_every=2, **kw)
    ckpt = tmp_path / "ckpt"
    search(pruner, 0.5, episodes=4, seed=3, checkpoint_every=2, checkpoint_dir=ckpt, **kw)  # "interrupted"
    latest = json.loads((ckpt / "latest.json").read_text())
    assert latest["episodes"] == 4
    assert {p.name for p in (ckpt / latest["dir"]).iterdir()} == {"sac.pt", "replay.npz", "state.json"}
    # warmup left at its default: a resumed run takes the checkpoint's (3), not min(50, 8 // 4)
    resumed = search(
        pruner,
        0.5,
        method="sac",
        reward=reward,
        progress=False,
        episodes=8,
        seed=3,
        checkpoint_every=2,
        checkpoint_dir=ckpt,
        resume=True,
    )
    assert resumed.history == full.history
    assert resumed.best_plan.to_dict() == full.best_plan.to_dict()
    with pytest.raises(Exception, match="seed=3"):  # a checkpoint from another configuration is refused
        search(pruner, 0.5, episodes=8, seed=4, checkpoint_every=2, checkpoint_dir=ckpt, resume=True, **kw)


def test_random_search_resumes_exactly(resnet20, tmp_path):
    pruner, reward = resnet20
    kw = dict(method="random", reward=reward, seed=5, checkpoint_every=2, progress=False)
    full = search(pruner, 0.6, episodes=5, **kw)
    search(pruner, 0.6, episodes=2, checkpoint_dir=tmp_path, **kw)
    resumed = search(pruner, 0.6, episodes=5, checkpoint_dir=tmp_path, resume=True, **kw)
    assert resumed.history == full.history and resumed.best_plan.to_dict() == full.best_plan.to_dict()
    with pytest.raises(Exception, match="more than the 3 requested"):
        search(pruner, 0.6, episodes=3, checkpoint_dir=tmp_path, resume=True, **kw)


def test_impossible_budget_is_a_clear_plan_error(resnet20):
    pruner, _ = resnet20
    with pytest.raises(PlanError, match="r_min=0.2 .* minimum reachable MACs ratio is 0.2"):
        search(pruner, 0.1, method="random", episodes=1, reward=_constant, r_min=0.2, progress=False)
    with pytest.raises(PlanError, match=r"r_min=0.05 .* minimum reachable MACs ratio is 0.0\d"):
        search(pruner, 0.03, method="sac", episodes=1, reward=_constant, progress=False)  # automatic r_min
    with pytest.raises(PlanError, match="above the original"):
        search(pruner, 1.5, method="uniform", reward=_constant, progress=False)


def test_uniform_method_and_plots(resnet20, tmp_path):
    pruner, reward = resnet20
    uni = search(pruner, 0.5, method="uniform", reward=reward, progress=False)
    assert len(set(uni.best_plan.ratios.values())) == 1 and uni.episodes == 1
    assert abs(uni.best_macs_ratio / 0.5 - 1) <= 0.01
    rnd = search(pruner, 0.5, method="random", episodes=2, reward=reward, seed=1, progress=False)
    for path in (
        plot_ratios(rnd.best_plan, uni.best_plan, tmp_path / "r.png"),
        plot_rewards(rnd.history, tmp_path / "h.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_proxy_check_ranks_rewards_against_accuracy(resnet20):
    pruner, reward = resnet20
    top1 = AgreementReward(pruner.model, reward.inputs, measure="top1")
    rho, rewards, accs = proxy_check(pruner, reward, top1, 0.5, k=4, seed=0, progress=False)
    assert len(rewards) == len(accs) == 4 and (rho is None or -1.0 <= rho <= 1.0)
    assert all(0.0 <= a <= 1.0 for a in accs)


def test_plateau_episode_definition():
    def hist(rewards):
        best, out = -np.inf, []
        for i, r in enumerate(rewards, 1):
            best = max(best, r)
            out.append(EpisodeRecord(i, r, 0, best))
        return out

    assert plateau_episode(hist([0.0, 0.5, 0.2, 0.995, 0.3, 1.0])) == 4  # 0.995 is within 1 % of the gain
    assert plateau_episode(hist([1.0, 0.5, 0.2])) == 1
    assert isinstance(MaskedModel, type)


def test_a_sac_search_leaves_nothing_in_the_temp_dir(resnet20, tmp_path, monkeypatch):
    """SB3's default logger makes an empty SB3-<time> folder in the temp dir per learn() call."""
    import tempfile

    pruner, reward = resnet20
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    search(pruner, 0.5, method="sac", episodes=3, warmup=1, reward=reward, seed=0, progress=False)
    assert list(scratch.iterdir()) == []
