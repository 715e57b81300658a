"""Agreement and accuracy rewards: exact values at the extremes, strict order under damage."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from autodfp.search.rewards import MEASURES, AccuracyReward, AgreementReward


def _net(seed: int = 0, n_out: int = 7) -> nn.Module:
    """Random weights, but a head strong enough that predictions differ between inputs."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, n_out),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(0.3 * torch.randn(m.weight.shape, generator=gen))
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(8, generator=gen))
                m.bias.copy_(1 + 0.1 * torch.randn(8, generator=gen))
    return net.eval()


def _damage(net: nn.Module, channels: list[int]) -> nn.Module:
    """Zero whole channels the way uncompensated physical pruning does (conv rows and BN affine)."""
    out = copy.deepcopy(net)
    with torch.no_grad():
        out[0].weight[channels] = 0
        out[1].weight[channels] = 0
        out[1].bias[channels] = 0
    return out


@pytest.fixture()
def batch() -> torch.Tensor:
    return torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_identical_model_gets_the_maximum(batch: torch.Tensor) -> None:
    net = _net()
    reward = AgreementReward(net, batch)
    d = reward.details(copy.deepcopy(net))
    assert set(d) == set(MEASURES)
    assert d["kl"] == pytest.approx(0.0, abs=1e-6)
    assert d["top1"] == 1.0
    assert d["mse"] == pytest.approx(0.0, abs=1e-9)
    assert reward(net) == d["kl"]  # default measure


@pytest.mark.parametrize("measure", MEASURES)
def test_damage_lowers_every_measure_monotonically(batch: torch.Tensor, measure: str) -> None:
    net = _net()
    reward = AgreementReward(net, batch, measure=measure)
    perfect = reward(net)
    mild = reward(_damage(net, [0, 1]))
    severe = reward(_damage(net, [0, 1, 2, 3, 4, 5, 6]))
    assert severe < mild < perfect


def test_top1_counts_disagreements_exactly() -> None:
    class Fixed(nn.Module):
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("logits", logits)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits[x[:, 0].long()]

    idx = torch.arange(4).float().view(4, 1)
    orig = Fixed(torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]]))
    pruned = Fixed(torch.tensor([[5.0, 0, 0], [5, 0, 0], [0, 0, 5], [0, 5, 0]]))
    d = AgreementReward(orig, idx, temperature=1.0).details(pruned)
    assert d["top1"] == 0.5
    ref = orig.logits
    assert d["mse"] == pytest.approx(-float((pruned.logits - ref).pow(2).mean() / ref.var(unbiased=False)))
    p = ref.softmax(1)
    kl = (p * (p.log() - pruned.logits.log_softmax(1))).sum(1).mean()
    assert d["kl"] == pytest.approx(-float(kl), rel=1e-5)
    p2 = (ref / 2).softmax(1)
    kl2 = (p2 * (p2.log() - (pruned.logits / 2).log_softmax(1))).sum(1).mean()
    assert AgreementReward(orig, idx)(pruned) == pytest.approx(-float(kl2), rel=1e-5)  # default T=2


def test_label_offset_and_temperature() -> None:
    class Fixed(nn.Module):
        def __init__(self, logits: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("logits", logits)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits.expand(x.shape[0], -1)

    x = torch.zeros(3, 1)
    orig = Fixed(torch.tensor([[0.0, 1.0, 2.0]]))
    # only the "background" logit differs: invisible with label_offset=1
    other = Fixed(torch.tensor([[9.0, 1.0, 2.0]]))
    assert AgreementReward(orig, x, label_offset=1).details(other) == {"kl": 0.0, "top1": 1.0, "mse": -0.0}
    assert AgreementReward(orig, x).details(other)["top1"] == 0.0
    shifted = Fixed(torch.tensor([[0.0, 2.0, 1.0]]))
    hot = AgreementReward(orig, x, temperature=4.0)(shifted)
    cold = AgreementReward(orig, x, temperature=1.0)(shifted)
    assert hot > cold  # a higher temperature softens both distributions, shrinking the KL


def test_reward_restores_mode_and_rejects_bad_args(batch: torch.Tensor) -> None:
    net = _net().train()
    AgreementReward(net, batch)(net)
    assert net.training
    with pytest.raises(ValueError, match="measure"):
        AgreementReward(net, batch, measure="acc")
    with pytest.raises(ValueError, match="do not match"):
        AgreementReward(net, batch)(_net(n_out=5))


def test_eval_mode_restores_every_modules_own_flag() -> None:
    from autodfp._modes import eval_mode

    net = _net().eval()
    net[0].train()  # mixed flags, as a caller may leave them
    flags = [m.training for m in net.modules()]
    wrapper = torch.nn.Sequential(net)  # a new module starts in training mode, like env.MaskedModel
    with eval_mode(wrapper):
        assert not any(m.training for m in wrapper.modules())
    assert [m.training for m in net.modules()] == flags and wrapper.training
    AgreementReward(net, torch.randn(4, 3, 8, 8))(wrapper)
    assert [m.training for m in net.modules()] == flags, "scoring a wrapper must not switch the wrapped model"


def test_reward_runs_in_batches(batch: torch.Tensor) -> None:
    net = _net()
    damaged = _damage(net, [2, 5])
    whole = AgreementReward(net, batch).details(damaged)
    chunked = AgreementReward(net, batch, batch_size=10).details(damaged)
    for k in MEASURES:
        assert chunked[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-7)


def test_accuracy_reward_is_exact() -> None:
    # The model returns the first pixel's value as the index of the hot logit (after a background slot).
    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(x[:, 0].long() + 1, 5).float()

    xs = torch.tensor([[0.0], [1], [2], [3], [0], [1], [2], [3], [0], [1]])
    ys = torch.tensor([0, 1, 2, 0, 0, 0, 2, 3, 1, 1])  # 7 of 10 right
    loader = [(xs[i : i + 3], ys[i : i + 3]) for i in range(0, 10, 3)]
    assert AccuracyReward(loader, label_offset=1)(Lookup()) == pytest.approx(0.7)
    assert AccuracyReward(loader, label_offset=1, max_batches=2)(Lookup()) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="no samples"):
        AccuracyReward([], label_offset=1)(Lookup())
