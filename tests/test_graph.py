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
        self.conv1, self.bn1, self.act1 = (
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            act(inplace=inplace),
        )
        self.conv2, self.bn2, self.act2 = (
            nn.Conv2d(8, 12, 3, padding=1, bias=False),
            nn.BatchNorm2d(12),
            act(inplace=inplace),
        )
        self.conv3, self.bn3, self.act3 = (
            nn.Conv2d(12, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            act(inplace=inplace),
        )
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


@pytest.mark.parametrize(
    "act, expected", [(nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.Hardswish, "hardswish"), (nn.SiLU, "silu")]
)
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


def _fused_net(act: type[nn.Module]) -> tuple[nn.Module, nn.Module]:
    """The same weights as conv → timm BatchNormAct2d and as conv → BatchNorm2d → act."""
    timm_layers = pytest.importorskip("timm.layers")

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = (
                nn.Conv2d(3, 8, 3, padding=1, bias=False),
                timm_layers.BatchNormAct2d(8, act_layer=act),
            )
            self.conv2, self.bn2 = (
                nn.Conv2d(8, 12, 3, padding=1, bias=False),
                timm_layers.BatchNormAct2d(12, act_layer=act),
            )
            self.conv3 = nn.Conv2d(12, 16, 3, padding=1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
            return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
            self.conv3 = nn.Conv2d(12, 16, 3, padding=1)
            self.fc = nn.Linear(16, 10)
            self.act = act()

        def forward(self, x):
            x = self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))
            return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))

    torch.manual_seed(0)
    fused = _calibrate(Fused())
    plain = Plain()
    plain.load_state_dict(fused.state_dict())
    return fused, plain.eval()


def test_timm_batchnorm_act_is_a_bn_with_its_activation():
    fused, plain = _fused_net(nn.ReLU)
    g = find_groups(fused, SHAPE)
    for name, bn, cons, cbn in (("conv1", "bn1", "conv2", "bn2"), ("conv2", "bn2", "conv3", None)):
        grp = g.get(name)
        assert grp.producer.bn == bn and grp.consumers == [cons] and grp.consumer_bns == [cbn]
        assert grp.activation == "relu" and grp.prunable
    # same groups and the same pruned function as the unfused model, without any calibration batch
    assert [grp.to_dict() for grp in g] == [grp.to_dict() for grp in find_groups(plain, SHAPE)]
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = [
            Pruner(n, SHAPE).apply(Plan.uniform(find_groups(n, SHAPE), 0.5, strategy="lsq")).model(x)
            for n in (fused, plain)
        ]
        assert (outs[0] - outs[1]).abs().max().item() <= 1e-5
        # calibration moments hook the pre-activation (the input of the fused ``act``)
        calib = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(2))
        from autodfp.analysis.fold import empirical_moments

        m_fused = empirical_moments(fused, g, calib)
        m_plain = empirical_moments(plain, find_groups(plain, SHAPE), calib)
        for name in ("conv1", "conv2"):
            assert torch.allclose(m_fused[name][0], m_plain[name][0]) and torch.allclose(
                m_fused[name][1], m_plain[name][1]
            )
            assert (m_fused[name][0] < 0).any()  # a pre-activation, not a ReLU output


def test_timm_batchnorm_act_with_an_unsupported_activation_is_not_identity():
    fused, _ = _fused_net(nn.SELU)  # λ·ELU: not in the table (ELU's α fits, the slope λ does not)
    g = find_groups(fused, SHAPE).get("conv1")
    assert g.producer.bn == "bn1" and g.activation == "unknown" and not g.prunable
    fused, _ = _fused_net(nn.SiLU)
    g = find_groups(fused, SHAPE).get("conv1")
    assert g.producer.bn == "bn1" and g.activation == "silu" and g.prunable


class TinyVGG(nn.Module):
    """conv–BN–ReLU blocks with max-pools, then a flatten and a 2-Linear classifier MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 4, 32), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _vgg() -> nn.Module:
    torch.manual_seed(0)
    return _calibrate(TinyVGG())


def test_the_output_layer_and_its_feeder_are_never_pruned():
    net = _vgg()
    graph = find_groups(net, SHAPE)
    head, hidden = graph.get("classifier.3"), graph.get("classifier.0")
    assert not head.prunable and head.reason == "model output"
    assert not hidden.prunable and hidden.reason == "feeds the classifier"
    assert hidden.activation == "relu"  # the dropout (identity in eval) is no obstacle
    pruner = Pruner(net, SHAPE)
    pruned = pruner.apply(Plan.uniform(pruner.graph, 0.5, strategy="lsq")).model
    assert pruned.classifier[0].out_features == 32 and pruned.classifier[3].in_features == 32
    assert pruned(torch.randn(2, *SHAPE)).shape == (2, 10)


def test_a_conv_whose_output_is_a_model_output_is_not_prunable():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 6, 1)

        def forward(self, x):
            f = torch.relu(self.body(x))
            return {"features": f, "out": self.head(f)}  # body's channels are an output too

    graph = find_groups(TwoHeads().eval(), SHAPE)
    assert [(g.name, g.prunable, g.reason) for g in graph] == [
        ("body", False, "model output"),
        ("head", False, "model output"),
    ]


def test_max_pool_between_conv_and_consumer_is_a_pass_through():
    net = _vgg()
    graph = find_groups(net, SHAPE)
    first, third = graph.get("features.0"), graph.get("features.7")
    for g in (first, third):
        assert g.prunable and g.activation == "relu" and g.pools == ["max_pool2d(k=2, s=2)"]
    assert graph.get("features.4").prunable and graph.get("features.4").pools == []
    last = graph.get("features.11")  # behind an adaptive average pool and a flatten
    assert not last.prunable
    # zero ratio is output-identical, and an exact duplicate behind the pool merges exactly
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3))
    pruner = Pruner(net, SHAPE)
    with torch.no_grad():
        ref = net(x)
        same = pruner.apply(Plan.uniform(pruner.graph, 1.0, strategy="autodfp")).model(x)
        assert (same - ref).abs().max().item() <= 1e-5
        conv, bn = net.features[0], net.features[1]
        conv.weight[5] = conv.weight[2]
        conv.bias[5] = conv.bias[2]
        bn.running_mean[5], bn.running_var[5] = bn.running_mean[2], bn.running_var[2]
        bn.weight[5], bn.bias[5] = 1.7 * bn.weight[2], 1.7 * bn.bias[2]
        ref = net(x)
        pruner = Pruner(net, SHAPE)
        keep = [i for i in range(8) if i != 5]
        plan = Plan({"features.0": 7 / 8}, strategy="autodfp", keep={"features.0": keep}, params={"strength": 1.0})
        merged = pruner.apply(plan).model
        assert merged.features[0].out_channels == 7
        assert (merged(x) - ref).abs().max().item() <= 1e-4
