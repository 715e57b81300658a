"""CI subset of the generality sweep (benchmarks/generality.py) on small inputs.

One residual network (torchvision resnet18), one depthwise network with SE blocks (torchvision
mobilenet_v3_small), one concat network (torchvision squeezenet1_0), one with grouped convs
(torchvision regnet_x_400mf), one with channel shuffles (torchvision shufflenet_v2_x0_5) and one
BN-free LayerNorm CNN (built here; ConvNeXt-tiny is too heavy for CI). Random init, BN statistics from train-mode forward
passes over noise, 64-px inputs, synthesis cut to a few steps. Each model must prune to 0.7× MACs
within ±1 %, or stop with the one-line reason recorded here (the sweep's table has the same ones);
when a reason changes, this test says so.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import autodfp
from autodfp.analysis.graph import find_groups
from autodfp.errors import AutoDFPError
from conftest import bn_statistics_from_noise

torchvision = pytest.importorskip("torchvision")

SHAPE = (3, 64, 64)
CHEAP = {"synth_steps": 2, "calibration_inputs": 4, "reward_inputs": 4, "refine_inputs": 4}
#: the documented reason a model cannot reach 0.7× (None: it must reach it; no model here needs it today)
UNREACHABLE = "target of 0.7000x the original MACs is unreachable"


class TinyLayerNormCNN(nn.Module):
    """ConvNeXt-like, no BatchNorm at all: conv → channels-last LayerNorm → GELU → conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.norm1 = nn.GroupNorm(1, 32)  # a LayerNorm over (C, H, W)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 48, 3, stride=2, padding=1)
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = nn.functional.gelu(self.norm1(self.conv1(x)))
        x = nn.functional.gelu(self.conv2(x))
        x = nn.functional.gelu(self.conv3(x))
        return self.head(x.mean((2, 3)))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "layernorm_cnn":
        return TinyLayerNormCNN()
    return torchvision.models.get_model(name, weights=None)


def _calibrate(model: nn.Module) -> nn.Module:
    """BatchNorm statistics from forward passes in train mode (noise stands in for images in CI)."""
    return bn_statistics_from_noise(model, SHAPE, batches=2, n=8, reset=True)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("resnet18", None),
        ("mobilenet_v3_small", None),  # SE-gated expansions are prunable (residual streams stay coupled)
        ("squeezenet1_0", None),  # concatenated expand branches
        ("regnet_x_400mf", None),  # grouped convs, their outputs and the channels they read
        ("shufflenet_v2_x0_5", None),  # groups that meet the channel shuffle stay whole, the others prune
        ("layernorm_cnn", None),
    ],
)
def test_prunes_to_0_7_macs_or_says_why(name, reason, tmp_path):
    model = _calibrate(_build(name))
    graph = find_groups(model, SHAPE)
    assert graph.prunable, "no prunable group"
    for g in graph:
        assert g.prunable or g.reason  # every unprunable group says why
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(5))
    common = {"input_shape": SHAPE, "progress": False, "name": f"ci-{name}"}
    with torch.no_grad():
        ref = model(x)
        same = autodfp.prune(model, uniform=1.0, config=autodfp.Config(refine=False, **CHEAP), **common)
        assert (same.model(x) - ref).abs().max().item() <= 1e-5  # zero ratio: output-identical
    cfg = autodfp.Config(refine=False, **CHEAP)  # type: ignore[arg-type]
    try:
        res = autodfp.prune(model, macs_ratio=0.7, search="uniform", config=cfg, **common)
    except AutoDFPError as exc:
        assert reason is not None and str(exc).startswith(reason), f"unexpected: {exc}"
        return
    assert reason is None, f"{name} now reaches 0.7x: update the expected reason"
    assert abs(res.report["macs_ratio_achieved"] - 0.7) <= 0.01  # Config.tol
    with torch.no_grad():
        out = res.model(x)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        autodfp.save(res, tmp_path, plots=False)
        back = autodfp.load(tmp_path, model=_build(name))
        assert (back.eval()(x) - out).abs().max().item() <= 1e-5  # saved model reloads identically
