"""Re-parameterisable models (RepVGG-style training branches): folded, checked, then pruned."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autodfp
from autodfp.config import Config
from autodfp.errors import AutoDFPError, ModelError
from autodfp.models.reparam import reparameterizable, reparameterize

SHAPE = (3, 16, 16)
QUICK = dict(synth_steps=2, calibration_inputs=8, refine_inputs=8, reward_inputs=8, select_inputs=8)


def _fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    return weight * (bn.weight / std).view(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std


class RepBlock(nn.Module):
    """RepVGG's block: 3x3 conv + BN, 1x1 conv + BN and an identity BN, added; folds into one 3x3 conv."""

    def __init__(self, c: int, exact: bool = True) -> None:
        super().__init__()
        self.c, self.exact = c, exact
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.bnid = nn.BatchNorm2d(c)
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return F.relu(self.fused(x))
        return F.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bnid(x))

    def reparameterize(self) -> None:
        w3, b3 = _fold_bn(self.conv3.weight, self.bn3)
        w1, b1 = _fold_bn(F.pad(self.conv1.weight, [1, 1, 1, 1]), self.bn1)
        eye = torch.zeros_like(self.conv3.weight)
        eye[range(self.c), range(self.c), 1, 1] = 1.0
        wi, bi = _fold_bn(eye, self.bnid)
        fused = nn.Conv2d(self.c, self.c, 3, padding=1, bias=True)
        with torch.no_grad():
            fused.weight.copy_(w3 + w1 + (wi if self.exact else 0))
            fused.bias.copy_(b3 + b1 + bi)
        self.fused = fused
        for name in ("conv3", "bn3", "conv1", "bn1", "bnid"):
            delattr(self, name)


class RepNet(nn.Module):
    def __init__(self, exact: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(RepBlock(8, exact), RepBlock(8, exact))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _rep_net(exact: bool = True) -> RepNet:
    torch.manual_seed(0)
    net = RepNet(exact).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, *SHAPE))
    return net.eval()


def test_folding_is_checked_and_leaves_the_original_alone() -> None:
    net = _rep_net()
    assert reparameterizable(net) == ["blocks.0", "blocks.1"]
    folded = reparameterize(net, SHAPE)
    assert reparameterizable(net) and all(b.fused is None for b in net.blocks)  # type: ignore[union-attr]
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-4)
    with pytest.raises(ModelError, match="does not compute what the original does"):
        reparameterize(_rep_net(exact=False), SHAPE)
    with pytest.raises(ModelError, match="no module with a reparameterize"):
        reparameterize(nn.Sequential(nn.Conv2d(3, 4, 1)), SHAPE)


def test_branches_leave_nothing_to_prune_and_the_error_says_how_to_fold_them() -> None:
    with pytest.raises(AutoDFPError, match="--reparameterize"):
        autodfp.prune(_rep_net(), input_shape=SHAPE, uniform=0.5, config=Config(**QUICK), progress=False)


def test_a_folded_model_prunes_saves_and_reloads(tmp_path: Path) -> None:
    net = _rep_net()
    cfg = Config(reparameterize=True, **QUICK)
    whole = autodfp.prune(net, input_shape=SHAPE, uniform=1.0, config=cfg, progress=False)
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(whole.model(x), net(x), atol=1e-4), "a zero-ratio prune computes the original"
    half = autodfp.prune(net, input_shape=SHAPE, uniform=0.5, config=cfg, progress=False)
    assert half.report["macs_after"] < 0.7 * half.report["macs_before"]
    autodfp.save(half, tmp_path / "out")
    again = autodfp.load(tmp_path / "out", model=_rep_net())
    assert not isinstance(again, torch.jit.ScriptModule), "rebuilt from the unpruned instance, folded first"
    with torch.no_grad():
        assert torch.equal(again(x), half.model(x))


def test_groups_lists_the_folded_models_groups() -> None:
    net = _rep_net()
    assert not any(g["prunable"] for g in autodfp.groups(net, SHAPE))
    folded = autodfp.groups(net, SHAPE, reparameterize=True)
    assert sum(g["prunable"] for g in folded) >= 2, folded
