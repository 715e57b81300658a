"""Group discovery on small random models: activations, fused BN layers, output guards, pooling."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from autodfp.analysis.graph import find_groups
from autodfp.compress.plan import Plan
from autodfp.compress.surgery import Pruner

SHAPE = (3, 32, 32)


def _calibrate(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters, then running statistics from forward passes (as a user would)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(0.5 + 2 * torch.rand(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(32, *SHAPE, generator=g))
    return net.eval()


class TinyCNN(nn.Module):
    """conv–BN–act ×3, global pool, linear head."""

    def __init__(self, act: type[nn.Module], inplace: bool) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act(inplace=inplace)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), act(inplace=inplace)
        self.conv3, self.bn3, self.act3 = nn.Conv2d(12, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), act(inplace=inplace)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.fc(self.pool(x).flatten(1))


def _pair(act: type[nn.Module]) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = _calibrate(TinyCNN(act, inplace=False))
    inplace = TinyCNN(act, inplace=True)
    inplace.load_state_dict(plain.state_dict())
    return plain, inplace.eval()


@pytest.mark.parametrize("act, expected", [(nn.ReLU, "relu"), (nn.ReLU6, "relu6"),
                                           (nn.Hardswish, "unknown"), (nn.SiLU, "unknown")])
def test_inplace_activations_read_like_their_out_of_place_versions(act, expected):
    plain, inplace = _pair(act)
    g_plain, g_inplace = find_groups(plain, SHAPE), find_groups(inplace, SHAPE)
    assert [g.to_dict() for g in g_inplace] == [g.to_dict() for g in g_plain]
    # an in-place activation overwrote the captured pre-activation: it read as "identity"
    assert g_inplace.get("conv1").activation == g_inplace.get("conv2").activation == expected
    assert g_inplace.get("conv1").prunable == (expected != "unknown")


def test_inplace_relu_model_prunes_to_the_same_function():
    plain, inplace = _pair(nn.ReLU)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for strategy in ("autodfp", "lsq"):
            outs = []
            for net in (plain, inplace):
                pruner = Pruner(net, SHAPE)
                outs.append(pruner.apply(Plan.uniform(pruner.graph, 0.5, strategy=strategy)).model(x))
            assert (outs[0] - outs[1]).abs().max().item() <= 1e-5
