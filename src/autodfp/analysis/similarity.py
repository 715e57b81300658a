"""Channel similarity of one prunable group, computed from weights alone.

Two channels ``p`` and ``k`` of a group are redundant for the consumer when the post-activation
``a_p`` is a positive multiple of ``a_k``. With BN folded, the pre-activation of channel ``c`` is
``y_c = f_c · x + b_c``. If ``f_p = α f_k`` with ``α > 0`` then ``y_p = α y_k + (b_p − α b_k)``, and
``act(y_p) = α act(y_k)`` for ReLU exactly when the offset ``δ = b_p − α b_k`` is zero (for ReLU6 the
clip at 6 also needs ``α = 1``; we ignore that second-order effect). Everything here measures how
far a pair is from that situation: the angle between the folded filters (``cosine``), the slope
(``scale``) and the offset, in units of the pre-activation's spread (``bias_mismatch``).

**Depthwise chains.** MobileNet's consumers see a channel only after pointwise conv → BN → act →
depthwise conv → BN → act. The caller passes, per channel, the outer product of the folded
pointwise filter and the folded depthwise kernel. The analysis is then *defined* on that product:
``cos = cos_pw · cos_dw``, ``|f| = |pw|·|dw|``, and the slope/offset refer to the depthwise BN's
folded bias. This ignores the intermediate activation (the pass-through is exact only when that
activation is in its linear regime), which is the usual data-free approximation.

The module also holds the Gaussian activation moments that :mod:`autodfp.compress.reconstruct` builds on:
means/variances of ``act(y)`` for ``y ~ N(μ, σ²)`` and the covariance of two activations of
correlated Gaussians, for every activation of :data:`ACTIVATIONS` (ReLU, ReLU6, identity,
LeakyReLU, SiLU/Swish, Hardswish, GELU and its tanh form, Sigmoid, Hardsigmoid, Tanh, Mish, ELU).
The piecewise-linear ones have closed forms (covariances by a Price-theorem quadrature); the
others use a composite Gauss–Legendre quadrature against the normal density for the moments and
Mehler's Hermite series for the covariances. Only ReLU and LeakyReLU are positively homogeneous,
so only for them is a merge with slope α ≠ 1 exact; an exact duplicate (α = 1) merges exactly
under every activation.

All math runs in float64: the quantities of interest are small differences (``1 − cos`` of
near-parallel filters, ``b_p − α b_k``) that float32 rounds away in wide layers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from autodfp.errors import PlanError

#: DBSCAN neighbourhood radius on :attr:`ChannelAnalysis.distance` (see :func:`analyze`).
DEFAULT_EPS = 0.15
#: weight of the squared normalised offset in the distance (see :func:`analyze`).
DEFAULT_BIAS_WEIGHT = 0.5
#: normalised offsets are clipped here: beyond ~3 pre-activation stds a merge is simply wrong, and
#: unbounded values would let one pathological channel dominate the agent's features.
MISMATCH_CAP = 3.0
#: channels whose std is below this fraction of the layer's median std are normalised by the floor
#: instead (a nearly constant channel would otherwise turn any offset into an infinite mismatch).
STD_FLOOR = 0.1
#: a channel is "dead" if its pre-activation is positive with probability below this.
DEAD_PROB = 0.01

FEATURE_NAMES: list[str] = [
    "cluster_share",  # share of channels in non-singleton DBSCAN clusters
    "clusters_per_channel",  # number of clusters / C
    "nn_dist_mean",  # mean nearest-neighbour distance (/2, clipped to [0, 1])
    "nn_dist_median",  # median nearest-neighbour distance (/2, clipped)
    "nn_dist_min",  # smallest nearest-neighbour distance (/2, clipped)
    "nn_cos_mean",  # mean cosine to the nearest neighbour, clipped to [0, 1]
    "nn_mismatch_mean",  # mean normalised offset at the nearest neighbour (/cap)
    "nn_mismatch_median",  # median normalised offset at the nearest neighbour (/cap)
    "norm_cv",  # coefficient of variation of filter norms, squashed cv/(1+cv)
    "dead_share",  # share of channels with P(pre-activation > 0) < 1 %
]


@dataclass
class ChannelStats:
    """Per-group tensors extracted from the model (see the module docstring for the chain case).

    ``mean``/``std`` model the pre-activation the consumer sees through ``activation`` as
    ``N(mean, std²)``; with BN that is ``N(β, γ²)``, for BN-free models an estimate.
    ``corr`` (optional) is a better pre-activation correlation estimate than filter geometry.
    """

    filters: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor
    activation: str = "relu"
    corr: Tensor | None = None
    #: positions ``corr`` was measured on, when it is a measurement on a batch (``None``: a model);
    #: ``lsq`` shrinks its fit by kept channels / positions, see :func:`~autodfp.compress.reconstruct.strategy_lsq`
    measured_from: int | None = None
    #: derived per-group quantities (e.g. the post-activation covariance ``lsq`` needs), computed
    #: once and reused across plans; treat a ChannelStats as immutable once it has been used.
    cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.filters.dim() != 2:
            raise ValueError(f"filters must be (C, D), got shape {tuple(self.filters.shape)}")
        c = self.filters.shape[0]
        if c < 1:
            raise ValueError("a channel group needs at least one channel")
        for name in ("bias", "mean", "std"):
            t = getattr(self, name)
            if t.shape != (c,):
                raise ValueError(f"{name} must have shape ({c},), got {tuple(t.shape)}")
        if self.corr is not None and self.corr.shape != (c, c):
            raise ValueError(f"corr must have shape ({c}, {c}), got {tuple(self.corr.shape)}")
        parse_activation(self.activation)  # raises PlanError for an unsupported one
        if bool((self.std < 0).any()):
            raise ValueError("std must be non-negative")

    @property
    def num_channels(self) -> int:
        return int(self.filters.shape[0])

    def subset(self, idx: Tensor) -> ChannelStats:
        """The statistics of channels ``idx`` alone (one conv group of a grouped consumer's input)."""
        return ChannelStats(
            filters=self.filters[idx],
            bias=self.bias[idx],
            mean=self.mean[idx],
            std=self.std[idx],
            activation=self.activation,
            corr=None if self.corr is None else self.corr[idx][:, idx],
            measured_from=self.measured_from,
        )


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------
#: activation names a group may carry; ``leaky_relu`` (and ``elu``) carry their parameter in the
#: name, e.g. ``"leaky_relu(0.01)"`` (see :func:`activation_name`).
ACTIVATIONS = (
    "relu",
    "relu6",
    "identity",
    "leaky_relu",
    "silu",
    "hardswish",
    "gelu",
    "gelu_tanh",
    "sigmoid",
    "hardsigmoid",
    "tanh",
    "mish",
    "elu",
)
#: activations with a parameter, and its default
_PARAM_DEFAULT = {"leaky_relu": 0.01, "elu": 1.0}
_NAME_RE = re.compile(r"^([a-z0-9_]+)(?:\(([-+0-9.eE]+)\))?$")


def activation_name(kind: str, param: float | None = None) -> str:
    """The canonical name of an activation, ``"leaky_relu(0.2)"`` for a parametrised one."""
    if kind in _PARAM_DEFAULT:
        return f"{kind}({float(_PARAM_DEFAULT[kind] if param is None else param):g})"
    return kind


def parse_activation(name: str) -> tuple[str, float]:
    """``"leaky_relu(0.2)"`` → ``("leaky_relu", 0.2)``; a bare name gets the default parameter (0 if none).

    :param name: an activation name (see :data:`ACTIVATIONS`)
    :raises PlanError: for a name that is not supported (``"unknown"`` included)
    """
    m = _NAME_RE.match(str(name))
    kind = m.group(1) if m else str(name)
    if m is None or kind not in ACTIVATIONS or (m.group(2) is not None and kind not in _PARAM_DEFAULT):
        raise PlanError(f"unsupported activation '{name}' (expected one of {', '.join(ACTIVATIONS)})")
    if m.group(2) is None:
        return kind, float(_PARAM_DEFAULT.get(kind, 0.0))
    try:
        return kind, float(m.group(2))
    except ValueError:
        raise PlanError(f"unsupported activation '{name}': bad parameter") from None


def _act_fn(kind: str, p: float, x: Tensor) -> Tensor:
    if kind == "relu":
        return x.clamp_min(0.0)
    if kind == "relu6":
        return x.clamp(0.0, 6.0)
    if kind == "identity":
        return x
    if kind == "leaky_relu":
        return torch.where(x >= 0, x, p * x)
    if kind == "silu":
        return x * torch.sigmoid(x)
    if kind == "hardswish":
        return x * (x + 3.0).clamp(0.0, 6.0) / 6.0
    if kind == "gelu":
        return x * torch.special.ndtr(x)
    if kind == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "hardsigmoid":
        return (x + 3.0).clamp(0.0, 6.0) / 6.0
    if kind == "tanh":
        return torch.tanh(x)
    if kind == "mish":
        return x * torch.tanh(torch.nn.functional.softplus(x))
    if kind == "elu":
        return torch.where(x > 0, x, p * torch.expm1(x.clamp_max(0.0)))
    raise PlanError(f"unsupported activation '{kind}'")  # pragma: no cover - parse_activation guards


def apply_activation(x: Tensor, activation: str) -> Tensor:
    """``act(x)`` element-wise, for any name of :data:`ACTIVATIONS` (parametrised ones included)."""
    kind, p = parse_activation(activation)
    return _act_fn(kind, p, x)


# ----------------------------------------------------------------------------------------------
# Gaussian activation moments
# ----------------------------------------------------------------------------------------------
_SQRT_2PI = math.sqrt(2.0 * math.pi)
_TINY_STD = 1e-12
#: quadrature: standardised range, panels of equal width over it, Gauss–Legendre nodes per panel
_Q_RANGE = 10.0
_Q_PANELS = 20
_Q_NODES = 16
#: where the smooth activations bend (their scale is 1): extra panel edges so a wide Gaussian
#: (the bend squeezed into a small part of the standardised range) is still resolved
_SMOOTH_BENDS = (-8.0, -3.0, -1.0, 0.0, 1.0, 3.0, 8.0)
_KINKS = {"hardswish": (-3.0, 3.0), "elu": (0.0,) + _SMOOTH_BENDS}
#: Hermite terms of the covariance series (see :func:`pair_activation_covariance`)
HERMITE_TERMS = 48


def _pdf(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) / _SQRT_2PI


def _clip_moments(mu: Tensor, sigma: Tensor, lo: float, hi: float | None) -> tuple[Tensor, Tensor]:
    """E[clip(X, lo, hi)] and E[clip(X, lo, hi)²] for X ~ N(mu, sigma²), in closed form.

    Uses the truncated moments E[Z 1{α<Z<β}] = φ(α) − φ(β) and
    E[Z² 1{α<Z<β}] = Φ(β) − Φ(α) + αφ(α) − βφ(β); an infinite upper bound is handled explicitly
    because ``β φ(β)`` is ``inf · 0`` there.
    """
    degenerate = sigma <= _TINY_STD
    s = torch.where(degenerate, torch.ones_like(sigma), sigma)
    a = (lo - mu) / s
    pa, phia = torch.special.ndtr(a), _pdf(a)
    if hi is None:
        pb, phib, bphib = torch.ones_like(mu), torch.zeros_like(mu), torch.zeros_like(mu)
    else:
        b = (hi - mu) / s
        pb, phib = torch.special.ndtr(b), _pdf(b)
        bphib = b * phib
    p_mid = (pb - pa).clamp_min(0.0)
    ez = phia - phib
    ez2 = p_mid + a * phia - bphib
    m1 = lo * pa + mu * p_mid + s * ez
    m2 = lo * lo * pa + mu * mu * p_mid + 2 * mu * s * ez + s * s * ez2
    if hi is not None:
        tail = 1.0 - pb
        m1 = m1 + hi * tail
        m2 = m2 + hi * hi * tail
    clipped = mu.clamp(min=lo) if hi is None else mu.clamp(min=lo, max=hi)
    m1 = torch.where(degenerate, clipped, m1)
    m2 = torch.where(degenerate, clipped * clipped, m2)
    return m1, m2


def _as64(x: Tensor | float) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _quadrature(mu: Tensor, sigma: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Standardised nodes ``z`` and weights ``w`` (both (C, K)) with ``Σ w g(μ+σz) ≈ E[g(μ+σZ)]``.

    Composite Gauss–Legendre against the normal density on ``[−10, 10]``: 20 equal panels, plus
    panel edges at the activation's kinks and bends mapped to ``z = (y − μ)/σ``. Plain
    Gauss–Hermite converges slowly for kinked integrands (Hardswish, ELU) and for a bend that a
    wide Gaussian squeezes between two nodes (SiLU with σ = 50); splitting there makes each panel's
    integrand smooth, so 16 nodes per panel reach ~1e-12 relative on the moments.
    """
    x_np, w_np = np.polynomial.legendre.leggauss(_Q_NODES)
    x = torch.as_tensor(x_np, dtype=torch.float64)
    w = torch.as_tensor(w_np, dtype=torch.float64)
    s = torch.where(sigma > _TINY_STD, sigma, torch.ones_like(sigma))
    bends = torch.as_tensor(_KINKS.get(kind, _SMOOTH_BENDS), dtype=torch.float64)
    feat = ((bends[None, :] - mu[:, None]) / s[:, None]).clamp(-_Q_RANGE, _Q_RANGE)
    base = torch.linspace(-_Q_RANGE, _Q_RANGE, _Q_PANELS + 1, dtype=torch.float64).expand(mu.numel(), -1)
    edges = torch.cat([base, feat], dim=1).sort(dim=1).values
    lo, hi = edges[:, :-1, None], edges[:, 1:, None]
    half = 0.5 * (hi - lo)
    z = lo + half * (x + 1.0)
    wz = half * w * _pdf(z)
    return z.reshape(mu.numel(), -1), wz.reshape(mu.numel(), -1)


def _quad_moments(mu: Tensor, sigma: Tensor, kind: str, p: float) -> tuple[Tensor, Tensor]:
    shape = mu.shape
    mu, sigma = mu.reshape(-1), sigma.reshape(-1)
    z, w = _quadrature(mu, sigma, kind)
    g = _act_fn(kind, p, mu[:, None] + sigma[:, None] * z)
    m1 = (w * g).sum(1)
    var = (w * (g - m1[:, None]).square()).sum(1)
    flat = sigma <= _TINY_STD
    m1 = torch.where(flat, _act_fn(kind, p, mu), m1)
    var = torch.where(flat, torch.zeros_like(var), var)
    return m1.reshape(shape), var.reshape(shape)


def activation_moments(mean: Tensor | float, std: Tensor | float, activation: str) -> tuple[Tensor, Tensor]:
    """(E[act(X)], Var[act(X)]) for X ~ N(mean, std²), float64.

    ``std = 0`` is allowed and gives the deterministic value ``act(mean)`` with zero variance.
    Closed forms for the piecewise-linear activations: ReLU is ``clip(X, 0, ∞)``, ReLU6
    ``clip(X, 0, 6)``, Hardsigmoid ``(clip(X, −3, 3) + 3)/6`` and LeakyReLU(s)
    ``s·X + (1 − s)·ReLU(X)`` with ``Cov(X, ReLU(X)) = σ²Φ(μ/σ)`` (Stein's lemma). Every other
    activation (SiLU, Hardswish, GELU, Sigmoid, Tanh, Mish, ELU) by the composite quadrature of
    :func:`_quadrature`.
    """
    kind, p = parse_activation(activation)
    mu, sigma = _as64(mean), _as64(std).clamp_min(0.0)
    mu, sigma = torch.broadcast_tensors(mu, sigma)
    if kind == "identity":
        return mu.clone(), sigma * sigma
    if kind in _BOUNDS:
        lo, hi, a, b = _BOUNDS[kind]
        m1, m2 = _clip_moments(mu, sigma, lo, hi)
        return a * m1 + b, a * a * (m2 - m1 * m1).clamp_min(0.0)
    if kind == "leaky_relu":
        m1, m2 = _clip_moments(mu, sigma, 0.0, None)
        var_r = (m2 - m1 * m1).clamp_min(0.0)
        cross = sigma * sigma * _linear_probability(mu, sigma)  # Cov(X, ReLU X)
        mean_out = p * mu + (1.0 - p) * m1
        var = p * p * sigma * sigma + 2.0 * p * (1.0 - p) * cross + (1.0 - p) ** 2 * var_r
        return mean_out, var.clamp_min(0.0)
    return _quad_moments(mu, sigma, kind, p)


def expected_activation(mean: Tensor | float, std: Tensor | float, activation: str) -> Tensor:
    """E[act(X)] for X ~ N(mean, std²), float64 (ReLU: μΦ(μ/σ) + σφ(μ/σ)); see :func:`activation_moments`."""
    return activation_moments(mean, std, activation)[0]


def _linear_probability(mu: Tensor, sigma: Tensor, lo: float = 0.0) -> Tensor:
    """P(X > lo) for X ~ N(mu, sigma²), with the degenerate limit at sigma = 0."""
    degenerate = sigma <= _TINY_STD
    p = torch.special.ndtr((mu - lo) / torch.where(degenerate, torch.ones_like(sigma), sigma))
    return torch.where(degenerate, (mu > lo).to(mu.dtype), p)


#: clip-type activations: ``a·clip(y, lo, hi) + b`` as (lo, hi, a, b)
_BOUNDS: dict[str, tuple[float, float | None, float, float]] = {
    "relu": (0.0, None, 1.0, 0.0),
    "relu6": (0.0, 6.0, 1.0, 0.0),
    "hardsigmoid": (-3.0, 3.0, 1.0 / 6.0, 0.5),
}


def hermite_coefficients(mean: Tensor, std: Tensor, activation: str, terms: int = HERMITE_TERMS) -> Tensor:
    """(C, terms) coefficients ``a_n = E[act(μ + σZ) h_n(Z)]``, ``h_n = He_n/√n!``, n = 1..terms.

    ``act(μ + σZ) = E[act] + Σ_n a_n h_n(Z)`` in L²(N(0, 1)), so ``Σ a_n² = Var[act]`` and, by
    Mehler's formula, two channels whose standardised pre-activations have correlation ρ have
    ``Cov = Σ_n a_n a'_n ρⁿ``. Computed with the quadrature of :func:`_quadrature`.
    """
    kind, p = parse_activation(activation)
    mu, sigma = _as64(mean).reshape(-1), _as64(std).clamp_min(0.0).reshape(-1)
    z, w = _quadrature(mu, sigma, kind)
    g = _act_fn(kind, p, mu[:, None] + sigma[:, None] * z)
    g = g - (w * g).sum(1, keepdim=True)
    out = torch.zeros(mu.numel(), terms, dtype=torch.float64)
    h_prev, h = torch.ones_like(z), z.clone()
    for n in range(1, terms + 1):
        out[:, n - 1] = (w * g * h).sum(1)
        h_prev, h = h, (z * h - math.sqrt(n) * h_prev) / math.sqrt(n + 1)
    return torch.where((sigma > _TINY_STD)[:, None], out, torch.zeros_like(out))


def activation_covariance(
    mean: Tensor,
    std: Tensor,
    corr: Tensor,
    activation: str,
    rows: Tensor | None = None,
    cols: Tensor | None = None,
    nodes: int = 16,
    block: int = 1 << 15,
) -> Tensor:
    """Cov(act(y_i), act(y_j)) for i in ``rows``, j in ``cols``, y ~ N(mean, diag(std)·corr·diag(std)).

    Deterministic. For ``act = clip(·, lo, hi)`` (ReLU, ReLU6, Hardsigmoid up to an affine map) by
    Price's theorem: ``∂E[g(y_i)h(y_j)]/∂Cov(y_i, y_j) = E[g'(y_i)h'(y_j)]``, and the derivative is
    the probability that both pre-activations are in the linear range. Integrating from ρ = 0
    (where the covariance is 0)::

        Cov = σ_i σ_j [ρ·P_i P_j + Σ_corners ± ∫_0^{asin ρ} (ρ − sin θ) exp(−(h² − 2hk sin θ + k²)/(2cos²θ))/(2π) dθ]

    with ``P`` the marginal in-range probabilities and ``(h, k)`` the standardised corners of the
    in-range box (+ for like corners, − for mixed). The substitution ``s = sin θ`` removes the
    ``1/√(1−s²)`` singularity of the bivariate density, so Gauss–Legendre converges fast even at
    ρ = ±1: 16 nodes are within ~4e-7 of the variance scale, 32 within ~1e-9 (the diagonal
    reproduces :func:`activation_moments`' variance). Cost is ``nodes`` exponentials per pair and
    corner (one corner for ReLU, four for ReLU6), in blocks of ``block`` pairs; with neither
    ``rows`` nor ``cols`` the full symmetric matrix is computed from its upper triangle.

    LeakyReLU(s) ``= s·y + (1 − s)·ReLU(y)`` reduces to the ReLU case exactly, with
    ``Cov(y_i, ReLU(y_j)) = ρσ_iσ_j Φ(μ_j/σ_j)`` (Stein's lemma). Every other activation uses the
    Hermite series of :func:`hermite_coefficients` (see :func:`pair_activation_covariance`).
    """
    kind, _ = parse_activation(activation)
    mu = _as64(mean)
    sd = _as64(std).clamp_min(0.0)
    r = _as64(corr)
    c = mu.numel()
    if rows is None and cols is None:
        if kind not in _BOUNDS and kind not in ("identity", "leaky_relu"):
            return _hermite_full(mu, sd, r.clamp(-1.0, 1.0), activation)
        # symmetric: compute the upper triangle only
        iu, ju = torch.triu_indices(c, c)
        vals = pair_activation_covariance(mu, sd, r[iu, ju], iu, ju, activation, nodes, block)
        out = torch.zeros(c, c, dtype=torch.float64)
        out[iu, ju] = vals
        out[ju, iu] = vals
        return out
    rows = torch.arange(c) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    cols = torch.arange(c) if cols is None else torch.as_tensor(cols, dtype=torch.long)
    ri = rows.repeat_interleave(cols.numel())
    ci = cols.repeat(rows.numel())
    vals = pair_activation_covariance(mu, sd, r[ri, ci], ri, ci, activation, nodes, block)
    return vals.reshape(rows.numel(), cols.numel())


def _hermite_parts(mu: Tensor, sd: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """Hermite coefficients and the variance their truncation leaves out, per channel."""
    a = hermite_coefficients(mu, sd, activation)
    var = activation_moments(mu, sd, activation)[1].reshape(-1)
    tail = (var - a.square().sum(1)).clamp_min(0.0)
    return a, tail.sqrt()


def _hermite_full(mu: Tensor, sd: Tensor, rho: Tensor, activation: str) -> Tensor:
    a, t = _hermite_parts(mu, sd, activation)
    out = torch.zeros_like(rho)
    power = torch.ones_like(rho)
    for n in range(a.shape[1]):
        power = power * rho
        out += torch.outer(a[:, n], a[:, n]) * power
    return out + torch.outer(t, t) * power * rho


def pair_activation_covariance(
    mu: Tensor, sd: Tensor, rho: Tensor, ri: Tensor, ci: Tensor, activation: str, nodes: int = 16, block: int = 1 << 15
) -> Tensor:
    """The covariance of :func:`activation_covariance` for a flat list of pairs.

    ``rho[n]`` is the pre-activation correlation of channels ``ri[n]`` and ``ci[n]``; ``mu``/``sd``
    are per channel. Returns Cov(act(y_ri[n]), act(y_ci[n])) for each n.

    Activations that are not piecewise linear use Mehler's series
    ``Cov = Σ_{n≤48} a_n a'_n ρⁿ + t t' ρ⁴⁹`` (:func:`hermite_coefficients`), where ``t² = Var − Σ a_n²``
    is the variance the truncated series misses. That tail term makes the series exact on the
    diagonal and for two identical channels (ρ = 1), which is what an exact duplicate's merge
    needs, and keeps the matrix positive semi-definite (a Schur product of PSD matrices); off
    the diagonal it errs by at most ``2 t t' |ρ|⁴⁹``, below 1e-3 of the variance scale for
    the kinked Hardswish and ~1e-6 for the smooth ones at the usual spreads (tests check against
    Monte Carlo).
    """
    kind, slope = parse_activation(activation)
    mu, sd, rho = _as64(mu), _as64(sd).clamp_min(0.0), _as64(rho)
    ri = torch.as_tensor(ri, dtype=torch.long)
    ci = torch.as_tensor(ci, dtype=torch.long)
    rho = rho.clamp(-1.0, 1.0)
    scale = sd[ri] * sd[ci]
    if kind == "identity":
        return rho * scale
    if kind in _BOUNDS:
        lo, hi, gain, _ = _BOUNDS[kind]
        return gain * gain * _clip_pair_covariance(mu, sd, rho, ri, ci, lo, hi, nodes, block)
    if kind == "leaky_relu":
        relu = _clip_pair_covariance(mu, sd, rho, ri, ci, 0.0, None, nodes, block)
        pin = _linear_probability(mu, sd)
        lin = rho * scale
        return slope * slope * lin + slope * (1.0 - slope) * lin * (pin[ri] + pin[ci]) + (1.0 - slope) ** 2 * relu
    used, inv = torch.unique(torch.cat([ri, ci]), return_inverse=True)
    a, t = _hermite_parts(mu[used], sd[used], activation)
    i, j = inv[: ri.numel()], inv[ri.numel() :]
    out = torch.empty_like(rho)
    for start in range(0, rho.numel(), block):
        sl = slice(start, start + block)
        powers = torch.cumprod(rho[sl, None].expand(-1, a.shape[1] + 1), dim=1)
        acc = (a[i[sl]] * a[j[sl]] * powers[:, :-1]).sum(1)
        out[sl] = acc + t[i[sl]] * t[j[sl]] * powers[:, -1]
    return out


def _clip_pair_covariance(
    mu: Tensor,
    sd: Tensor,
    rho: Tensor,
    ri: Tensor,
    ci: Tensor,
    lo: float,
    hi: float | None,
    nodes: int,
    block: int,
) -> Tensor:
    """Price-theorem quadrature for ``clip(·, lo, hi)`` (see :func:`activation_covariance`)."""
    scale = sd[ri] * sd[ci]
    live = sd > _TINY_STD
    s = torch.where(live, sd, torch.ones_like(sd))
    # standardised bounds per channel; an infinite upper bound contributes no corner
    h_lo = (lo - mu) / s
    p_in = 1.0 - torch.special.ndtr(h_lo)
    corners: list[tuple[Tensor, Tensor, float]] = [(h_lo, h_lo, 1.0)]
    if hi is not None:
        h_hi = (hi - mu) / s
        p_in = torch.special.ndtr(h_hi) - torch.special.ndtr(h_lo)
        corners += [(h_hi, h_hi, 1.0), (h_lo, h_hi, -1.0), (h_hi, h_lo, -1.0)]
    x_np, w_np = np.polynomial.legendre.leggauss(nodes)
    x = torch.as_tensor(x_np, dtype=torch.float64)
    w = torch.as_tensor(w_np, dtype=torch.float64)
    out = rho * p_in[ri] * p_in[ci]
    for start in range(0, rho.numel(), block):
        sl = slice(start, start + block)
        rr = rho[sl]
        top = torch.asin(rr)  # θ runs over [0, asin ρ]: Gauss–Legendre mapped to that interval
        theta = 0.5 * top[:, None] * (x[None, :] + 1.0)
        sin_t = torch.sin(theta)
        inv = -0.5 / torch.cos(theta).square().clamp_min(1e-300)
        lever = (rr[:, None] - sin_t) * w[None, :]
        acc = torch.zeros_like(rr)
        for hv, kv, sign in corners:
            h = hv[ri[sl]]
            k = kv[ci[sl]]
            expo = ((h * h + k * k)[:, None] - (2.0 * h * k)[:, None] * sin_t) * inv
            acc = acc + sign * (lever * torch.exp(expo)).sum(1)
        out[sl] = out[sl] + acc * (0.5 * top) / (2.0 * math.pi)
    out = out * scale
    return torch.where(live[ri] & live[ci], out, torch.zeros_like(out))


def active_probability(mean: Tensor, std: Tensor, activation: str) -> Tensor:
    """How often the channel passes something on: P(pre-activation > 0) for the ReLU family.

    ReLU, ReLU6, LeakyReLU, SiLU, GELU, Mish and ELU (all ≈ 0 or a small slope below zero):
    ``P(y > 0)``; Hardswish and Hardsigmoid (exactly constant below −3): ``P(y > −3)``; identity,
    Sigmoid and Tanh: 1 (no dead region).
    """
    kind, _ = parse_activation(activation)
    mu, sigma = _as64(mean), _as64(std)
    if kind in ("identity", "sigmoid", "tanh"):
        return torch.ones_like(mu)
    return _linear_probability(mu, sigma, -3.0 if kind in ("hardswish", "hardsigmoid") else 0.0)


# ----------------------------------------------------------------------------------------------
# Pairwise analysis
# ----------------------------------------------------------------------------------------------
@dataclass
class ChannelAnalysis:
    """Pairwise geometry of one group; all (C, C) matrices are indexed ``[p, k]``.

    ``scale[p, k]`` is the least-squares slope of ``f_p`` on ``f_k`` (``f_p ≈ scale[p, k]·f_k``), so
    row ``p`` is the channel being explained and column ``k`` the one explaining it.
    ``bias_mismatch`` uses the same orientation; ``distance`` is the symmetrised combination.
    """

    cosine: Tensor
    scale: Tensor
    bias_mismatch: Tensor
    distance: Tensor
    labels: np.ndarray
    nearest: Tensor
    nearest_dist: Tensor
    norms: Tensor
    active_prob: Tensor
    eps: float
    bias_weight: float = DEFAULT_BIAS_WEIGHT
    #: the stats this analysis was computed from
    stats: ChannelStats | None = field(default=None, repr=False)

    @property
    def num_channels(self) -> int:
        return int(self.norms.shape[0])

    def clusters(self) -> dict[int, list[int]]:
        """Cluster id → member channels (noise excluded)."""
        out: dict[int, list[int]] = {}
        for i, lab in enumerate(self.labels.tolist()):
            if lab >= 0:
                out.setdefault(int(lab), []).append(i)
        return out

    def features(self) -> np.ndarray:
        """A fixed-length state vector for the agent; see :data:`FEATURE_NAMES` (all in [0, 1]).

        Distances are divided by 2 (``1 − cos`` of orthogonal filters is 1, of opposite ones 2),
        offsets by the mismatch cap, and the norm CV squashed as ``cv/(1+cv)``, so layers of any
        width and scale land on the same footing.
        """
        c = self.num_channels
        labels = self.labels
        in_cluster = labels >= 0
        n_clusters = len(set(labels[in_cluster].tolist()))
        if c > 1:
            nd = (self.nearest_dist.clamp(max=2.0) / 2.0).numpy()
            idx = self.nearest.numpy()
            rows = np.arange(c)
            nn_cos = self.cosine.numpy()[rows, idx].clip(0.0, 1.0)
            mm = self.bias_mismatch.numpy()[rows, idx] / MISMATCH_CAP
        else:
            nd = np.ones(1)
            nn_cos = np.zeros(1)
            mm = np.ones(1)
        norms = self.norms.numpy()
        mean_norm = float(norms.mean())
        cv = float(norms.std() / mean_norm) if mean_norm > 0 else 0.0
        feats = np.array(
            [
                in_cluster.mean(),
                n_clusters / c,
                nd.mean(),
                np.median(nd),
                nd.min(),
                nn_cos.mean(),
                mm.mean(),
                np.median(mm),
                cv / (1.0 + cv),
                float((self.active_prob < DEAD_PROB).double().mean()),
            ],
            dtype=np.float64,
        )
        return np.clip(feats, 0.0, 1.0).astype(np.float32)


def pairwise_geometry(filters: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(cosine, scale, norms) of the rows of ``filters``; zero filters are orthogonal to everything."""
    f = filters.detach().to(torch.float64)
    gram = f @ f.T
    sq = gram.diagonal().clone()
    norms = sq.clamp_min(0.0).sqrt()
    nz = norms > 0
    safe = torch.where(nz, norms, torch.ones_like(norms))
    cos = (gram / safe[:, None] / safe[None, :]).clamp(-1.0, 1.0)
    cos = torch.where(nz[:, None] & nz[None, :], cos, torch.zeros_like(cos))
    cos.fill_diagonal_(1.0)
    # scale[p, k] = <f_p, f_k> / |f_k|^2 : column k divides
    scale = torch.where(nz[None, :], gram / (safe * safe)[None, :], torch.zeros_like(gram))
    return cos, scale, norms


def analyze(
    stats: ChannelStats,
    eps: float = DEFAULT_EPS,
    min_samples: int = 2,
    bias_weight: float = DEFAULT_BIAS_WEIGHT,
    eps_quantile: float | None = None,
) -> ChannelAnalysis:
    """Pairwise similarity, DBSCAN clusters and nearest neighbours of one channel group.

    Formulas (``f`` folded filters, ``b`` folded biases, ``σ`` pre-activation stds):

    - ``cosine[p,k] = <f_p,f_k> / (|f_p||f_k|)``.
    - ``scale[p,k] = α_pk = <f_p,f_k> / |f_k|²`` — the slope that best explains ``f_p`` by ``f_k``.
    - ``bias_mismatch[p,k] = min(|b_p − α_pk b_k| / σ̃_p, 3)``, ``σ̃_p = max(σ_p, 0.1·median(σ))``.
      The offset shifts ``y_p`` before the activation, so its harm is governed by how large it is
      relative to ``y_p``'s own spread: normalising by ``σ_p`` makes it a dimensionless z-shift that is
      comparable across layers and channels. The floor stops nearly constant channels from turning
      any offset into an infinite mismatch; pairs with ``cos ≤ 0`` get the cap (no positive slope
      exists, and ``ReLU(−y)`` is not a multiple of ``ReLU(y)``).
    - directed ``d[p,k] = (1 − cos[p,k]) + w·bias_mismatch[p,k]²`` with ``w = bias_weight = 0.5``.
      Under whitened inputs, explaining ``y_p`` by ``α_pk·y_k`` leaves a filter residual whose
      variance is ``sin²θ ≈ 2(1 − cos)`` of ``Var(y_p)`` (small angles) plus the offset
      ``δ = b_p − α_pk b_k``, i.e. ``m²`` in the same units; ``d`` is therefore ≈ half the relative
      squared pre-activation error of the merge, with both terms weighted consistently.
    - ``distance = max(d, dᵀ)``: a pair is close only if *each* member can stand in for the other
      (which of the two gets pruned is decided later, by the criterion), diagonal 0. Max rather
      than mean keeps DBSCAN from chaining a channel to one that explains it only one way.

    ``eps`` (default 0.15) is an absolute radius on that scale: with zero offset it admits pairs
    with ``cos ≥ 0.85`` (the merge explains ≥ 72 % of ``Var(y_p)``), with parallel filters offsets
    up to ≈ 0.55σ. An absolute radius keeps the cluster features meaningful for the agent: a
    layer without near-duplicates reports none. Measured on the real checkpoints: no pair in any
    ResNet-56 block (conv1 groups) or MobileNet-V1 pointwise→depthwise group comes within 0.2
    (only MobileNet's stem has pairs within 0.3; nearest-neighbour distances have medians 0.6–2.1, nearest cosines ≈ 0.1–0.4), so the default
    clusters nothing there — trained filters are not near-duplicates — and ``cluster`` selection
    falls back to norm order. ``eps_quantile = q`` raises the radius to the q-quantile of the
    layer's nearest-neighbour distances (never below ``eps``), forcing the "relatively most
    similar" channels into clusters; on ResNet-56 (30 % pruned, ``cluster`` criterion) that made
    the pruned network worse than plain L1 order (KL to the original 0.29 at q = 0.2 and 0.57 at
    q = 0.5 vs 0.22, with ``lsq``), which is why it is off by default.
    """
    c = stats.num_channels
    cos, scale, norms = pairwise_geometry(stats.filters)
    b = stats.bias.detach().to(torch.float64)
    std = stats.std.detach().to(torch.float64)
    med = float(std.median())
    floor = STD_FLOOR * med if med > 0 else 1.0  # all-constant group: offsets in absolute units
    denom = std.clamp_min(floor)
    offset = (b[:, None] - scale * b[None, :]).abs()
    mismatch = (offset / denom[:, None]).clamp(max=MISMATCH_CAP)
    mismatch = torch.where(cos > 0, mismatch, torch.full_like(mismatch, MISMATCH_CAP))
    mismatch.fill_diagonal_(0.0)
    directed = (1.0 - cos) + bias_weight * mismatch * mismatch
    dist = torch.maximum(directed, directed.T)
    dist.fill_diagonal_(0.0)
    dist = dist.clamp_min(0.0)

    if c > 1:
        off = dist + torch.diag(torch.full((c,), float("inf"), dtype=dist.dtype))
        nearest_dist, nearest = off.min(dim=1)
    else:
        nearest = torch.full((1,), -1, dtype=torch.long)
        nearest_dist = torch.full((1,), float("inf"), dtype=torch.float64)
    if eps_quantile is not None and c > 1:
        if not 0.0 <= eps_quantile <= 1.0:
            raise ValueError(f"eps_quantile must be in [0, 1], got {eps_quantile}")
        eps = max(float(eps), float(torch.quantile(nearest_dist, eps_quantile)) * (1 + 1e-9))
    labels = _dbscan(dist, eps, min_samples)
    act_p = active_probability(stats.mean, stats.std, stats.activation)
    return ChannelAnalysis(
        cosine=cos,
        scale=scale,
        bias_mismatch=mismatch,
        distance=dist,
        labels=labels,
        nearest=nearest,
        nearest_dist=nearest_dist,
        norms=norms,
        active_prob=act_p,
        eps=float(eps),
        bias_weight=float(bias_weight),
        stats=stats,
    )


def _dbscan(dist: Tensor, eps: float, min_samples: int) -> np.ndarray:
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if dist.shape[0] == 1:
        return np.full(1, -1, dtype=np.int64)
    from sklearn.cluster import DBSCAN

    d = dist.numpy()
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(d)
    return labels.astype(np.int64)
