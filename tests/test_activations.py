"""Every supported activation: Gaussian moments against Monte Carlo, detection, exact merges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from autodfp.analysis.graph import find_groups
from autodfp.analysis.similarity import (
    activation_covariance,
    activation_moments,
    active_probability,
    apply_activation,
    hermite_coefficients,
    parse_activation,
)
from autodfp.compress.plan import Plan
from autodfp.compress.surgery import Pruner
from autodfp.errors import PlanError

NAMES = [
    "relu",
    "relu6",
    "identity",
    "leaky_relu(0.1)",
    "silu",
    "hardswish",
    "gelu",
    "gelu_tanh",
    "sigmoid",
    "hardsigmoid",
    "tanh",
    "mish",
    "elu(0.5)",
]
DT = torch.float64


# ---------------------------------------------------------------- moments
@pytest.mark.parametrize("name", NAMES)
def test_moments_match_monte_carlo(name: str) -> None:
    # includes a wide Gaussian (σ = 30: the smooth bends squeezed into a sliver of the range)
    mu = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.5, 5.5, 8.0, 0.3, -2.9], dtype=DT)
    sd = torch.tensor([1.0, 0.3, 2.0, 1.5, 4.0, 1.0, 0.5, 30.0, 0.2], dtype=DT)
    g = torch.Generator().manual_seed(1)
    a = apply_activation(mu + sd * torch.randn(400_000, mu.numel(), generator=g, dtype=DT), name)
    e, v = activation_moments(mu, sd, name)
    n = a.shape[0]
    se_mean = a.std(0) / np.sqrt(n)
    se_var = (a - a.mean(0)).square().std(0) / np.sqrt(n)
    assert torch.all((e - a.mean(0)).abs() <= 5 * se_mean + 1e-12)
    assert torch.all((v - a.var(0)).abs() <= 5 * se_var + 1e-12)
    # degenerate std: the deterministic value
    e0, v0 = activation_moments(mu, torch.zeros_like(sd), name)
    assert torch.allclose(e0, apply_activation(mu, name)) and torch.equal(v0, torch.zeros_like(v0))


@pytest.mark.parametrize("name", NAMES)
def test_covariance_matches_monte_carlo(name: str) -> None:
    mu = torch.tensor([-1.0, 0.0, 0.5, 2.0, 5.0, 3.0], dtype=DT)
    sd = torch.tensor([1.0, 2.0, 0.5, 1.5, 2.0, 4.0], dtype=DT)
    g = torch.Generator().manual_seed(2)
    f = torch.randn(6, 4, generator=g, dtype=DT)
    f[5] = f[4] + 0.01 * torch.randn(4, generator=g, dtype=DT)  # ρ ≈ 1
    f[3] = -f[2]  # ρ = -1
    nrm = f.norm(dim=1)
    corr = (f @ f.T) / nrm[:, None] / nrm[None, :]
    q = activation_covariance(mu, sd, corr, name)
    y = mu + sd * (torch.randn(300_000, 4, generator=g, dtype=DT) @ (f / nrm[:, None]).T)
    a = apply_activation(y, name)
    ac = a - a.mean(0)
    emp = ac.T @ ac / (a.shape[0] - 1)
    # the Monte-Carlo standard error of each entry, from the products' own spread
    se = torch.stack([(ac * ac[:, [j]]).std(0) for j in range(6)], 1) / np.sqrt(a.shape[0])
    scale = emp.diagonal().sqrt()
    assert torch.all((q - emp).abs() <= 5 * se + 1e-4 * torch.outer(scale, scale) + 1e-12)
    # the diagonal is the variance (to the clip quadrature's 16 nodes), a block equals the full matrix's
    var = activation_moments(mu, sd, name)[1]
    assert torch.allclose(q.diagonal(), var, rtol=0.0, atol=1e-6 * float(var.max()))
    rows, cols = torch.tensor([4, 0]), torch.tensor([5, 1, 2])
    assert torch.allclose(activation_covariance(mu, sd, corr, name, rows, cols), q[rows][:, cols], atol=1e-12)
    assert torch.all(torch.linalg.eigvalsh(q) >= -1e-9 * float(q.diagonal().max()))


def test_hermite_series_reproduces_the_exact_relu_covariance() -> None:
    """The series the smooth activations use, checked on ReLU against its Price-theorem quadrature."""
    from autodfp.analysis.similarity import _hermite_full

    g = torch.Generator().manual_seed(3)
    mu = 2 * torch.randn(30, generator=g, dtype=DT)
    sd = 3 * torch.rand(30, generator=g, dtype=DT) + 0.1
    f = torch.randn(30, 6, generator=g, dtype=DT)
    f[1] = f[0] + 0.05 * torch.randn(6, generator=g, dtype=DT)
    nrm = f.norm(dim=1)
    corr = (f @ f.T) / nrm[:, None] / nrm[None, :]
    for name in ("relu", "leaky_relu(0.1)", "hardsigmoid"):
        exact = activation_covariance(mu, sd, corr, name, nodes=64)
        series = _hermite_full(mu, sd, corr, name)
        s = exact.diagonal().sqrt()
        # within 1e-3 of each entry's own scale, except nearly dead channels (|μ/σ| > 3) whose
        # series converges slowly: those stay within 1e-3 of the layer's typical variance
        err = (exact - series).abs()
        assert torch.all(err <= 1e-3 * torch.outer(s, s) + 1e-3 * float(s.square().median()))
        live = (mu / sd).abs() < 3
        assert float((err / torch.outer(s, s))[live][:, live].max()) < 1e-3
    # Σ a_n² approaches the variance; the tail the series leaves is small for a smooth activation
    a = hermite_coefficients(mu, sd, "silu")
    var = activation_moments(mu, sd, "silu")[1]
    assert torch.all(a.square().sum(1) <= var * (1 + 1e-9)) and torch.all(a.square().sum(1) >= 0.99 * var)


def test_names_and_active_probability() -> None:
    assert parse_activation("leaky_relu(0.2)") == ("leaky_relu", 0.2)
    assert parse_activation("leaky_relu") == ("leaky_relu", 0.01)
    for bad in ("unknown", "relu(0.1)", "swish", "leaky_relu(x)"):
        with pytest.raises(PlanError):
            parse_activation(bad)
    mu, sd = torch.tensor([-4.0, -1.0, 2.0], dtype=DT), torch.ones(3, dtype=DT)
    assert torch.equal(active_probability(mu, sd, "sigmoid"), torch.ones(3, dtype=DT))
    assert float(active_probability(mu, sd, "hardswish")[1]) == pytest.approx(0.977, abs=1e-3)  # P(y > -3)
    assert float(active_probability(mu, sd, "silu")[1]) == pytest.approx(0.1587, abs=1e-3)  # P(y > 0)


# ---------------------------------------------------------------- detection and exact merges
MODULES = [
    (nn.ReLU(), "relu"),
    (nn.ReLU6(), "relu6"),
    (nn.LeakyReLU(0.2), "leaky_relu(0.2)"),
    (nn.SiLU(), "silu"),
    (nn.Hardswish(), "hardswish"),
    (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (nn.Sigmoid(), "sigmoid"),
    (nn.Hardsigmoid(), "hardsigmoid"),
    (nn.Tanh(), "tanh"),
    (nn.Mish(), "mish"),
    (nn.ELU(0.5), "elu(0.5)"),
]
SHAPE = (3, 12, 12)


def _tiny(act: nn.Module) -> nn.Sequential:
    """conv–BN–act–conv–BN–ReLU–pool–fc with varied BN statistics (so channels differ)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        act,
        nn.Conv2d(8, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (net[1], net[4]):
            c = bn.num_features
            bn.running_mean.copy_(0.3 * torch.randn(c, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
            bn.weight.copy_(0.5 + 2 * torch.rand(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
    return net.eval()


@pytest.mark.parametrize("act, name", MODULES, ids=[n for _, n in MODULES])
def test_activation_is_detected_zero_ratio_is_identity_and_a_duplicate_merges_exactly(act, name):
    net = _tiny(act)
    graph = find_groups(net, SHAPE)
    g = graph.get("0")
    assert g.activation == name and g.prunable
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net(x)
        pruner = Pruner(net, SHAPE, graph=graph)
        same = pruner.apply(Plan.uniform(graph, 1.0, strategy="lsq")).model(x)
        assert (same - ref).abs().max().item() <= 1e-5
        # channel 5 becomes an exact copy of channel 2 (conv and BN): act(y_5) = act(y_2) for any act
        conv, bn = net[0], net[1]
        conv.weight[5], conv.bias[5] = conv.weight[2], conv.bias[2]
        for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias):
            t[5] = t[2]
        ref = net(x)
        pruner = Pruner(net, SHAPE)
        keep = [i for i in range(8) if i != 5]
        plan = Plan({"0": 7 / 8}, strategy="lsq", keep={"0": keep}, params={"ridge": 0.0})
        merged = pruner.apply(plan).model
        assert merged[0].out_channels == 7
        assert (merged(x) - ref).abs().max().item() <= 1e-4
        # without compensation the same prune is visibly lossy
        lossy = pruner.apply(Plan({"0": 7 / 8}, strategy="none", keep={"0": keep})).model
        assert (lossy(x) - ref).abs().max().item() > 1e-3
