"""Reconstruction strategies and consumer folding, checked by simulating producer → activation → consumer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autodfp.analysis.similarity import ChannelStats, analyze, apply_activation
from autodfp.compress.reconstruct import STRATEGIES, Compensation, fold_into_consumer, reconstruct
from autodfp.errors import PlanError

DT = torch.float64


def layer(filters: torch.Tensor, bias: torch.Tensor, activation: str = "relu") -> ChannelStats:
    """Stats of ``y = x @ filters.T + bias`` with ``x ~ N(0, I)``: the Gaussian model is exact."""
    return ChannelStats(filters=filters, bias=bias, mean=bias.clone(), std=filters.norm(dim=1), activation=activation)


def split(c: int, pruned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    kept = torch.tensor([i for i in range(c) if i not in pruned], dtype=torch.long)
    return kept, torch.tensor(sorted(pruned), dtype=torch.long)


def post_activation(stats: ChannelStats, x: torch.Tensor) -> torch.Tensor:
    """x: (..., D) -> activations (..., C)."""
    return apply_activation(x @ stats.filters.T + stats.bias, stats.activation)


def linear_outputs(
    stats: ChannelStats,
    comp: Compensation,
    kept: torch.Tensor,
    pruned: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    a = post_activation(stats, x)
    wk, delta = fold_into_consumer(w, comp, kept, pruned)
    return a @ w.T + b, a[:, kept] @ wk.T + b + delta


def conv_outputs(
    stats: ChannelStats,
    comp: Compensation,
    kept: torch.Tensor,
    pruned: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, H, W, D) per-position producer inputs; consumer conv with 'same' zero padding."""
    a = post_activation(stats, x).permute(0, 3, 1, 2)  # (N, C, H, W)
    pad = w.shape[-1] // 2
    wk, delta = fold_into_consumer(w, comp, kept, pruned)
    return F.conv2d(a, w, b, padding=pad), F.conv2d(a[:, kept], wk, b + delta, padding=pad)


def consumers(c: int, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "linear": (torch.randn(4, c, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)),
        "conv1x1": (torch.randn(4, c, 1, 1, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)),
        "conv3x3": (torch.randn(4, c, 3, 3, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)),
    }


def max_output_diff(
    stats: ChannelStats, comp: Compensation, kept: torch.Tensor, pruned: torch.Tensor, kind: str, x_seed: int = 2
) -> float:
    w, b = consumers(stats.num_channels)[kind]
    g = torch.Generator().manual_seed(x_seed)
    d = stats.filters.shape[1]
    if kind == "linear":
        full, pr = linear_outputs(stats, comp, kept, pruned, w, b, torch.randn(500, d, generator=g, dtype=DT))
    else:
        full, pr = conv_outputs(stats, comp, kept, pruned, w, b, torch.randn(8, 7, 7, d, generator=g, dtype=DT))
    return float((full - pr).abs().max())


@pytest.fixture
def duplicate_layer() -> ChannelStats:
    """Channel 3 = 2.5 × channel 1, filter and bias: ReLU(y_3) = 2.5·ReLU(y_1) exactly."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 10, generator=g, dtype=DT)
    b = 0.5 * torch.randn(6, generator=g, dtype=DT)
    f[3] = 2.5 * f[1]
    b[3] = 2.5 * b[1]
    return layer(f, b)


# ---------------------------------------------------------------- exact duplicate
@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
@pytest.mark.parametrize("name", ["nm", "autodfp"])
def test_exact_duplicate_is_lossless(duplicate_layer: ChannelStats, name: str, kind: str) -> None:
    stats = duplicate_layer
    a = analyze(stats)
    kept, pruned = split(6, [3])
    comp = reconstruct(name, stats, a, kept, pruned)
    assert int(comp.partner[0]) == 1
    col = int((kept == 1).nonzero())
    assert float(comp.A[0, col]) == pytest.approx(2.5, abs=1e-12)
    assert float(comp.A.abs().sum()) == pytest.approx(2.5, abs=1e-12)  # only that one entry
    assert max_output_diff(stats, comp, kept, pruned, kind) <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_plain_pruning_of_the_duplicate_is_not_lossless(duplicate_layer: ChannelStats, kind: str) -> None:
    stats = duplicate_layer
    kept, pruned = split(6, [3])
    comp = reconstruct("none", stats, analyze(stats), kept, pruned)
    assert max_output_diff(stats, comp, kept, pruned, kind) > 0.1


def test_autodfp_strength_zero_is_mean(duplicate_layer: ChannelStats) -> None:
    stats = duplicate_layer
    a = analyze(stats)
    kept, pruned = split(6, [3, 4])
    c0 = reconstruct("autodfp", stats, a, kept, pruned, strength=0.0)
    cm = reconstruct("mean", stats, a, kept, pruned)
    assert torch.equal(c0.A, cm.A) and torch.allclose(c0.c, cm.c, atol=1e-15)
    half = reconstruct("autodfp", stats, a, kept, pruned, strength=0.5)
    full = reconstruct("autodfp", stats, a, kept, pruned, strength=1.0)
    assert torch.allclose(half.A, 0.5 * full.A)
    with pytest.raises(PlanError):
        reconstruct("autodfp", stats, a, kept, pruned, strength=1.5)


def test_nm_merges_nothing_without_a_positively_aligned_partner() -> None:
    f = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.05, 0.0], [0.0, 0.0, 1.0]], dtype=DT)
    stats = layer(f, torch.zeros(4, dtype=DT))
    a = analyze(stats)
    kept, pruned = split(4, [2])  # channel 2 is anti-parallel to 0, ~orthogonal to 1 and 3
    comp = reconstruct("nm", stats, a, kept, pruned)
    assert int(comp.partner[0]) == -1 and float(comp.A.abs().sum()) == 0.0
    # with a partner above the cosine threshold it merges, with NM's norm-ratio slope if asked
    f2 = f.clone()
    f2[2] = torch.tensor([2.0, 0.2, 0.0], dtype=DT)
    stats2 = layer(f2, torch.zeros(4, dtype=DT))
    a2 = analyze(stats2)
    proj = reconstruct("nm", stats2, a2, kept, pruned)
    ratio = reconstruct("nm", stats2, a2, kept, pruned, slope="norm_ratio")
    assert int(proj.partner[0]) == 0
    assert float(proj.A[0, 0]) == pytest.approx(2.0)
    assert float(ratio.A[0, 0]) == pytest.approx(float(f2[2].norm()))


# ---------------------------------------------------------------- dead and constant channels
def test_dead_channel_compensation_is_zero_and_lossless() -> None:
    g = torch.Generator().manual_seed(3)
    f = torch.randn(5, 8, generator=g, dtype=DT)
    b = 0.2 * torch.randn(5, generator=g, dtype=DT)
    f[2] = 0.9 * f[0]  # geometrically close to channel 0 ...
    b[2] = -40.0 * f[2].norm()  # ... but its pre-activation sits 40 std below zero: always off
    stats = layer(f, b)
    a = analyze(stats)
    kept, pruned = split(5, [2])
    for name in ("mean", "autodfp"):
        comp = reconstruct(name, stats, a, kept, pruned)
        assert float(comp.A.abs().max()) < 1e-12, name
        assert abs(float(comp.c[0])) < 1e-12, name
        for kind in ("linear", "conv3x3"):
            assert max_output_diff(stats, comp, kept, pruned, kind) <= 1e-5


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_constant_channel_is_exactly_replaced_by_its_mean(activation: str) -> None:
    g = torch.Generator().manual_seed(4)
    f = torch.randn(5, 8, generator=g, dtype=DT)
    b = 0.2 * torch.randn(5, generator=g, dtype=DT)
    f[1] = 0.0
    b[1] = 2.0  # y_1 ≡ 2: std 0, mean 2
    stats = layer(f, b, activation)
    assert float(stats.std[1]) == 0.0
    kept, pruned = split(5, [1])
    a = analyze(stats)
    comp = reconstruct("mean", stats, a, kept, pruned)
    assert float(comp.c[0]) == pytest.approx(2.0, abs=1e-12)
    for kind in ("linear", "conv1x1", "conv3x3"):
        # conv3x3 with zero padding: the folded constant is exact except at the border
        if kind == "conv3x3":
            w, bb = consumers(5)[kind]
            x = torch.randn(2, 7, 7, 8, generator=g, dtype=DT)
            full, pr = conv_outputs(stats, comp, kept, pruned, w, bb, x)
            assert float((full - pr)[..., 1:-1, 1:-1].abs().max()) <= 1e-5
            assert float((full - pr).abs().max()) > 1e-3  # the border really is approximate
        else:
            assert max_output_diff(stats, comp, kept, pruned, kind) <= 1e-5
    # autodfp cannot merge a zero filter, so it falls back to the same constant
    comp2 = reconstruct("autodfp", stats, a, kept, pruned)
    assert float(comp2.A.abs().max()) == 0.0 and float(comp2.c[0]) == pytest.approx(2.0)


# ---------------------------------------------------------------- least squares
def correlated_layer(seed: int = 5) -> ChannelStats:
    """16 channels whose filters share a 6-dim subspace plus noise: strongly correlated, none duplicate."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, 24, generator=g, dtype=DT)
    f = torch.randn(16, 6, generator=g, dtype=DT) @ basis + 0.3 * torch.randn(16, 24, generator=g, dtype=DT)
    b = 0.5 * f.norm(dim=1) * torch.randn(16, generator=g, dtype=DT)
    return layer(f, b)


def output_mse(stats: ChannelStats, comp: Compensation, kept: torch.Tensor, pruned: torch.Tensor) -> float:
    w, b = consumers(stats.num_channels, seed=6)["linear"]
    x = torch.randn(20000, stats.filters.shape[1], generator=torch.Generator().manual_seed(7), dtype=DT)
    full, pr = linear_outputs(stats, comp, kept, pruned, w, b, x)
    return float(((full - pr) ** 2).mean())


def test_lsq_beats_mean_beats_none_on_a_gaussian_layer() -> None:
    stats = correlated_layer()
    a = analyze(stats)
    kept, pruned = split(16, [1, 4, 7, 10, 13])
    mse = {
        name: output_mse(stats, reconstruct(name, stats, a, kept, pruned), kept, pruned)
        for name in ("none", "mean", "autodfp", "lsq")
    }
    # measured (seed 5): none 412, mean 248, autodfp 193, lsq 94
    assert mse["lsq"] < 0.6 * mse["mean"]
    assert mse["mean"] < 0.75 * mse["none"]
    assert mse["autodfp"] < mse["mean"]


def test_lsq_quadrature_agrees_with_monte_carlo() -> None:
    stats = correlated_layer()
    a = analyze(stats)
    kept, pruned = split(16, [1, 4, 7, 10, 13])
    q = reconstruct("lsq", stats, a, kept, pruned)
    mc = reconstruct("lsq", stats, a, kept, pruned, method="mc", n_samples=200_000, chunk=50_000)
    assert torch.allclose(q.A, mc.A, atol=0.03)
    assert torch.allclose(q.c, mc.c, atol=0.03 * float(stats.std.mean()))
    # the covariance is cached on the stats and reused, also without an analysis
    assert any(k[0] == "post_cov" for k in stats.cache)
    again = reconstruct("lsq", stats, None, kept, pruned)
    assert torch.equal(again.A, q.A)


def test_lsq_from_samples_recovers_a_linear_dependence() -> None:
    """Identity activation, channel 4 = 2·y_0 − y_1 + 3 exactly: empirical lsq with no ridge is exact."""
    g = torch.Generator().manual_seed(8)
    f = torch.randn(5, 12, generator=g, dtype=DT)
    b = torch.randn(5, generator=g, dtype=DT)
    f[4] = 2 * f[0] - f[1]
    b[4] = 2 * b[0] - b[1] + 3
    stats = layer(f, b, "identity")
    kept, pruned = split(5, [4])
    samples = torch.randn(300, 12, generator=g, dtype=DT) @ f.T + b
    comp = reconstruct("lsq", stats, analyze(stats), kept, pruned, samples=samples, ridge=0.0)
    assert torch.allclose(comp.A[0], torch.tensor([2.0, -1.0, 0.0, 0.0], dtype=DT), atol=1e-8)
    assert float(comp.c[0]) == pytest.approx(3.0, abs=1e-8)
    assert max_output_diff(stats, comp, kept, pruned, "conv1x1") <= 1e-5


def test_lsq_ridge_shrinks_towards_mean() -> None:
    stats = correlated_layer()
    a = analyze(stats)
    kept, pruned = split(16, [2, 9])
    small = reconstruct("lsq", stats, a, kept, pruned, ridge=1e-3)
    big = reconstruct("lsq", stats, a, kept, pruned, ridge=1e3)
    mean = reconstruct("mean", stats, a, kept, pruned)
    assert float(big.A.abs().max()) < 1e-2 * float(small.A.abs().max())
    assert torch.allclose(big.c, mean.c, atol=0.05)


# ---------------------------------------------------------------- folding
def test_fold_into_consumer_hand_computed() -> None:
    w = torch.tensor(
        [
            [[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]],
            [[[0.0, -1.0]], [[1.0, 0.0]], [[2.0, 2.0]]],
        ]
    )  # (O=2, C=3, 1, 2)
    comp = Compensation(A=torch.tensor([[0.5, 2.0]], dtype=DT), c=torch.tensor([3.0], dtype=DT))
    kept, pruned = torch.tensor([0, 2]), torch.tensor([1])
    wk, delta = fold_into_consumer(w, comp, kept, pruned)
    expected = torch.tensor(
        [
            [[[1.0 + 1.5, 2.0 + 2.0]], [[5.0 + 6.0, 6.0 + 8.0]]],
            [[[0.0 + 0.5, -1.0 + 0.0]], [[2.0 + 2.0, 2.0 + 0.0]]],
        ]
    )
    assert wk.dtype == w.dtype and wk.shape == (2, 2, 1, 2)
    assert torch.equal(wk, expected)
    assert torch.equal(delta, torch.tensor([3.0 * (3 + 4), 3.0 * (1 + 0)]))


def test_fold_rejects_mismatched_shapes() -> None:
    comp = Compensation(A=torch.zeros(1, 2, dtype=DT), c=torch.zeros(1, dtype=DT))
    with pytest.raises(ValueError):
        fold_into_consumer(torch.zeros(2, 4), comp, torch.tensor([0, 1, 2]), torch.tensor([3]))


# ---------------------------------------------------------------- errors and edge cases
def test_unknown_strategy_and_bad_partitions(duplicate_layer: ChannelStats) -> None:
    stats = duplicate_layer
    a = analyze(stats)
    kept, pruned = split(6, [3])
    with pytest.raises(PlanError):
        reconstruct("magic", stats, a, kept, pruned)
    with pytest.raises(PlanError):
        reconstruct("mean", stats, a, torch.tensor([0, 1, 3]), torch.tensor([3]))
    with pytest.raises(PlanError):
        reconstruct("mean", stats, a, torch.tensor([0]), torch.tensor([6]))
    with pytest.raises(PlanError):
        reconstruct("nm", stats, a, kept, pruned, lam=2.0)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_handles_nothing_pruned_and_returns_float64(duplicate_layer: ChannelStats, name: str) -> None:
    stats = duplicate_layer
    a = analyze(stats)
    comp = reconstruct(name, stats, a, torch.arange(6), torch.empty(0, dtype=torch.long))
    assert comp.A.shape == (0, 6) and comp.c.shape == (0,)
    kept, pruned = split(6, [0, 5])
    comp = reconstruct(name, stats, a, kept, pruned)
    assert comp.A.shape == (2, 4) and comp.A.dtype == DT and comp.c.dtype == DT
    assert torch.isfinite(comp.A).all() and torch.isfinite(comp.c).all()


def test_lsq_on_a_few_measured_positions_is_shrunk_and_predicts_new_inputs_better() -> None:
    """A correlation measured on fewer positions than channels (an SE fc1 reads one per input):
    without the kept/positions ridge the fit reproduces those positions and fails on others."""
    gen = torch.Generator().manual_seed(0)
    c, n = 24, 12
    mix = torch.randn(c, c, generator=gen, dtype=torch.float64)  # correlated channels
    train = torch.randn(n, c, generator=gen, dtype=torch.float64) @ mix.T
    test = torch.randn(2000, c, generator=gen, dtype=torch.float64) @ mix.T
    mean, std = train.mean(0), train.std(0, unbiased=False)
    corr = torch.corrcoef(train.T)

    def stats(measured: int | None) -> ChannelStats:
        return ChannelStats(
            filters=torch.eye(c, dtype=torch.float64),
            bias=torch.zeros(c, dtype=torch.float64),
            mean=mean,
            std=std,
            activation="identity",
            corr=corr,
            measured_from=measured,
        )

    kept, pruned = torch.arange(4, c), torch.arange(4)

    def test_error(comp: Compensation) -> float:
        pred = test[:, kept] @ comp.A.T + comp.c
        return float((pred - test[:, pruned]).square().mean())

    raw = reconstruct("lsq", stats(None), None, kept, pruned)
    shrunk = reconstruct("lsq", stats(n), None, kept, pruned)
    off = reconstruct("lsq", stats(n), None, kept, pruned, dims_ridge=0.0)
    assert torch.allclose(off.A, raw.A), "dims_ridge=0 is the plain fit"
    assert float(shrunk.A.norm()) < float(raw.A.norm())
    assert test_error(shrunk) < test_error(raw)
    with pytest.raises(PlanError, match="dims_ridge"):
        reconstruct("lsq", stats(n), None, kept, pruned, dims_ridge=-1.0)
