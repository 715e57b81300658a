"""Compensating for pruned channels, without data.

A strategy predicts each pruned channel's post-activation from the kept ones,
``a_pruned ≈ A @ a_kept + c``, and :func:`fold_into_consumer` bakes that prediction into the layer
that reads the group: for every consumer output ``o``,
``Σ_c W[o, c] a_c ≈ Σ_k (W[o, k] + Σ_p W[o, p] A[p, k]) a_k + Σ_p W[o, p] c_p``.
So once the strategies are right per channel, pruning is a pure weight edit.

All strategies model the pre-activation ``y`` of the group as Gaussian (``N(mean, std²)`` per
channel, see :class:`~autodfp.analysis.similarity.ChannelStats`), or use caller-provided samples of ``y``.
Results are float64; callers cast to the model's dtype when folding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from autodfp.analysis.similarity import (
    ChannelAnalysis,
    ChannelStats,
    activation_covariance,
    activation_moments,
    apply_activation,
    expected_activation,
    pair_activation_covariance,
    pairwise_geometry,
)
from autodfp.errors import PlanError


@dataclass
class Compensation:
    """``a_pruned ≈ A @ a_kept + c`` (float64). ``A``: (n_pruned, n_kept); ``c``: (n_pruned,).

    ``partner`` (optional, nm/autodfp): the channel index (in the group, not in ``kept``) each
    pruned channel was merged into, or -1 when it was not merged.

    ``K``/``d`` (optional, set by :mod:`autodfp.compress.refine`): the kept channels' own correction,
    ``a_kept(original) ≈ K @ a_kept(pruned model) + d``. Without it the kept channels are assumed
    unchanged (``K = I``, ``d = 0``), which holds for a group pruned alone; once earlier layers are
    pruned too, their error reaches this group's kept channels and ``K``/``d`` can absorb it.
    """

    A: Tensor
    c: Tensor
    partner: Tensor | None = None
    info: dict = field(default_factory=dict)
    K: Tensor | None = None
    d: Tensor | None = None

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.c.shape != (self.A.shape[0],):
            raise ValueError(f"inconsistent compensation shapes A={tuple(self.A.shape)} c={tuple(self.c.shape)}")
        n_kept = self.A.shape[1]
        if (self.K is None) != (self.d is None):
            raise ValueError("kept-channel correction needs both K and d")
        if (
            self.K is not None
            and self.d is not None
            and (self.K.shape != (n_kept, n_kept) or self.d.shape != (n_kept,))
        ):
            raise ValueError(
                f"kept-channel correction K={tuple(self.K.shape)} d={tuple(self.d.shape)} does not "
                f"match {n_kept} kept channels"
            )

    def restrict(self, pruned_rows: Tensor, kept_cols: Tensor) -> Compensation:
        """The part that rebuilds the pruned channels ``pruned_rows`` (positions in ``pruned``)
        from the kept ones ``kept_cols`` (positions in ``kept``)."""
        k = None if self.K is None else self.K[kept_cols][:, kept_cols]
        d = None if self.d is None else self.d[kept_cols]
        return Compensation(self.A[pruned_rows][:, kept_cols], self.c[pruned_rows], K=k, d=d)


def blockwise(
    blocks: int,
    channels: int,
    kept: Tensor,
    pruned: Tensor,
    fit: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Compensation],
) -> Compensation:
    """One compensation per block of ``channels // blocks`` contiguous channels, put together
    block-diagonally.

    A grouped conv reads its input channel ``i`` only in the filters of conv group ``i // (C/G)``:
    a pruned channel can be rebuilt there only from kept channels of the same conv group, and a
    kept channel's correction only from its own group too. ``fit(idx, kept_local, pruned_local,
    kept_pos, pruned_pos)`` fits one block: ``idx`` its channels, ``kept_local``/``pruned_local``
    positions in ``idx``, ``kept_pos``/``pruned_pos`` positions in ``kept``/``pruned``.
    """
    kept = torch.as_tensor(kept, dtype=torch.long)
    pruned = torch.as_tensor(pruned, dtype=torch.long)
    per = channels // blocks
    a = torch.zeros(pruned.numel(), kept.numel(), dtype=torch.float64)
    c = torch.zeros(pruned.numel(), dtype=torch.float64)
    partner = torch.full((pruned.numel(),), -1, dtype=torch.long)
    has_partner = False
    k_full: Tensor | None = None
    d_full: Tensor | None = None
    for b in range(blocks):
        lo, hi = b * per, (b + 1) * per
        kpos = torch.nonzero((kept >= lo) & (kept < hi)).flatten()
        ppos = torch.nonzero((pruned >= lo) & (pruned < hi)).flatten()
        comp = fit(torch.arange(lo, hi), kept[kpos] - lo, pruned[ppos] - lo, kpos, ppos)
        a[ppos[:, None], kpos[None, :]] = comp.A.to(torch.float64)
        c[ppos] = comp.c.to(torch.float64)
        if comp.partner is not None:
            has_partner = True
            local = comp.partner.to(torch.long)
            partner[ppos] = torch.where(local >= 0, local + lo, local)
        if comp.K is not None and comp.d is not None:
            if k_full is None or d_full is None:
                k_full = torch.eye(kept.numel(), dtype=torch.float64)
                d_full = torch.zeros(kept.numel(), dtype=torch.float64)
            k_full[kpos[:, None], kpos[None, :]] = comp.K.to(torch.float64)
            d_full[kpos] = comp.d.to(torch.float64)
    return Compensation(a, c, partner if has_partner else None, {"blocks": blocks}, k_full, d_full)


# ----------------------------------------------------------------------------------------------
# folding
# ----------------------------------------------------------------------------------------------
def fold_into_consumer(weight: Tensor, comp: Compensation, kept: Tensor, pruned: Tensor) -> tuple[Tensor, Tensor]:
    """Consumer weight for the kept input channels and the constant it must absorb.

    ``weight`` is (O, C, *kernel) for a ``groups=1`` conv or (O, C) for a Linear. Returns
    ``(W_kept, bias_delta)`` with ``W_kept[:, j] = W[:, kept[j]] + Σ_p A[p, j] W[:, pruned[p]]`` (per
    kernel tap, because the prediction holds at every spatial position) and
    ``bias_delta[o] = Σ_p c_p Σ_taps W[o, pruned[p], taps]``: add it to the consumer's bias, or
    subtract it from the running mean of a BN that follows the consumer. With a kept-channel
    correction the kept columns become ``W[:, kept] @ K`` and ``Σ_j d_j Σ_taps W[o, kept[j], taps]``
    joins the constant.

    The constant term is exact wherever the whole receptive field lies inside the feature map;
    at zero-padded borders the pruned channel contributed 0 for the padded taps, but the folded
    constant is applied in full, which is the usual (small) border approximation.
    """
    kept = torch.as_tensor(kept, dtype=torch.long)
    pruned = torch.as_tensor(pruned, dtype=torch.long)
    if weight.dim() < 2:
        raise ValueError(f"consumer weight must be (O, C, ...), got shape {tuple(weight.shape)}")
    if comp.A.shape != (pruned.numel(), kept.numel()):
        raise ValueError(f"compensation A is {tuple(comp.A.shape)}, expected ({pruned.numel()}, {kept.numel()})")
    w = weight.detach().to(torch.float64)
    a = comp.A.to(torch.float64)
    wk = w[:, kept]
    wp = w[:, pruned]
    # (O, P, *k) x (P, K) -> (O, K, *k)
    new = torch.einsum("op...,pk->ok...", wp, a)
    delta = torch.einsum("op...,p->o", wp, comp.c.to(torch.float64))
    if comp.K is None:
        new = new + wk
    else:
        assert comp.d is not None  # Compensation pairs K with d
        new = new + torch.einsum("oj...,jk->ok...", wk, comp.K.to(torch.float64))
        delta = delta + torch.einsum("oj...,j->o", wk, comp.d.to(torch.float64))
    return new.to(weight.dtype), delta.to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _check_partition(stats: ChannelStats, kept: Tensor, pruned: Tensor) -> tuple[Tensor, Tensor]:
    c = stats.num_channels
    kept = torch.as_tensor(kept, dtype=torch.long).flatten()
    pruned = torch.as_tensor(pruned, dtype=torch.long).flatten()
    both = torch.cat([kept, pruned])
    if both.numel() and (int(both.min()) < 0 or int(both.max()) >= c):
        raise PlanError(f"channel index out of range for a group of {c} channels")
    if torch.unique(both).numel() != both.numel():
        raise PlanError("kept and pruned channels overlap or repeat")
    if kept.numel() == 0 and pruned.numel() > 0:
        raise PlanError("cannot prune every channel of a group")
    return kept, pruned


def _post_means(stats: ChannelStats, samples: Tensor | None) -> Tensor:
    """E[act(y)] per channel: closed form under the Gaussian model, or empirical from samples."""
    if samples is not None:
        return apply_activation(_check_samples(stats, samples), stats.activation).mean(0)
    return expected_activation(stats.mean, stats.std, stats.activation)


def _check_samples(stats: ChannelStats, samples: Tensor) -> Tensor:
    if samples.dim() != 2 or samples.shape[1] != stats.num_channels or samples.shape[0] < 2:
        raise ValueError(f"samples must be (N>=2, {stats.num_channels}), got {tuple(samples.shape)}")
    return samples.detach().to(torch.float64)


def _need_analysis(name: str, analysis: ChannelAnalysis | None) -> ChannelAnalysis:
    if analysis is None:
        raise PlanError(f"the '{name}' strategy needs a channel analysis (similarity.analyze)")
    return analysis


def _empty(kept: Tensor, pruned: Tensor) -> Compensation:
    return Compensation(
        torch.zeros(pruned.numel(), kept.numel(), dtype=torch.float64), torch.zeros(pruned.numel(), dtype=torch.float64)
    )


# ----------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------
def strategy_none(stats: ChannelStats, analysis: ChannelAnalysis | None, kept: Tensor, pruned: Tensor) -> Compensation:
    """Plain pruning: the pruned channels' contribution is dropped."""
    kept, pruned = _check_partition(stats, kept, pruned)
    return _empty(kept, pruned)


def strategy_mean(
    stats: ChannelStats, analysis: ChannelAnalysis | None, kept: Tensor, pruned: Tensor, samples: Tensor | None = None
) -> Compensation:
    """Replace each pruned channel by its expected activation (ablation: the constant part only).

    Exact for constant channels (std → 0) and for dead ones (expectation ≈ 0). It matters far
    more than merging: a ReLU channel's mean is typically comparable to its std, so dropping it
    shifts every consumer output. Pruning 30 % of one MobileNet-V1 pointwise group, the constant
    alone cut the KL divergence to the original logits from 4–14 to 0.3–1.3 (Neuron Merging,
    which has no constant, stayed at 3–13).
    """
    kept, pruned = _check_partition(stats, kept, pruned)
    comp = _empty(kept, pruned)
    comp.c = _post_means(stats, samples)[pruned].clone()
    return comp


def strategy_nm(
    stats: ChannelStats,
    analysis: ChannelAnalysis | None,
    kept: Tensor,
    pruned: Tensor,
    lam: float = 0.85,
    threshold: float = 0.1,
    slope: str = "projection",
) -> Compensation:
    """Neuron Merging (Kim et al., NeurIPS 2020) for conv → BN → ReLU, on BN-folded filters.

    Partner of pruned ``p`` among kept ``k`` with ``cos[p,k] > 0``:
    ``argmin_k lam·(1 − cos[p,k]) + (1 − lam)·minmax_k(|b_p − α_pk b_k| / α_pk)``, the bias term being
    the offset between the two channels' zero crossings expressed in ``k``'s pre-activation units
    (the official code divides it once more by its slope), min-max normalised over the candidates
    as in the official code (``lam = 0.85``,
    cosine-similarity ``threshold = 0.1`` are the official ResNet-56 settings). If the best partner's
    cosine is below ``threshold`` (or no kept channel has ``cos > 0``), ``p`` is not merged.

    ``A[p, k] = α``, the first-principles slope on folded filters: if ``f_p = α f_k`` with ``α > 0``
    and ``b_p = α b_k``, then ``ReLU(y_p) = α ReLU(y_k)``. ``slope="projection"`` (default) uses the
    least-squares ``α = <f_p,f_k>/|f_k|²``; ``slope="norm_ratio"`` uses ``|f_p|/|f_k|`` as NM does (the
    two agree for exact duplicates). The official NM code builds its BN slope from raw-filter norms
    times ``(γ_k/γ_p)·(σ_p/σ_k)`` with ``σ`` the running *variance* — the γ/σ ratio inverted and
    variance in place of std; we use the folded-filter slope, which is what makes the merge exact.
    ``c = 0``: NM carries no constant.
    """
    kept, pruned = _check_partition(stats, kept, pruned)
    analysis = _need_analysis("nm", analysis)
    if not 0.0 <= lam <= 1.0:
        raise PlanError(f"nm lam must be in [0, 1], got {lam}")
    if slope not in ("projection", "norm_ratio"):
        raise PlanError(f"nm slope must be 'projection' or 'norm_ratio', got '{slope}'")
    comp = _empty(kept, pruned)
    partner = torch.full((pruned.numel(),), -1, dtype=torch.long)
    if kept.numel() == 0 or pruned.numel() == 0:
        comp.partner = partner
        return comp
    cos = analysis.cosine[pruned][:, kept]
    alpha = analysis.scale[pruned][:, kept]
    if slope == "norm_ratio":
        n = analysis.norms
        alpha = torch.where(cos > 0, n[pruned][:, None] / n[kept][None, :].clamp_min(1e-300), alpha)
    b = stats.bias.detach().to(torch.float64)
    valid = (cos > 0) & (alpha > 0)
    bias_term = (b[pruned][:, None] - alpha * b[kept][None, :]).abs() / torch.where(
        valid, alpha, torch.ones_like(alpha)
    )
    for i in range(pruned.numel()):
        v = valid[i]
        if not bool(v.any()):
            continue
        bt = bias_term[i][v]
        span = bt.max() - bt.min()
        bt = (bt - bt.min()) / span if span > 0 else torch.zeros_like(bt)
        score = lam * (1.0 - cos[i][v]) + (1.0 - lam) * bt
        j = torch.nonzero(v).flatten()[int(torch.argmin(score))]
        if float(cos[i, j]) < threshold:
            continue
        comp.A[i, j] = alpha[i, j]
        partner[i] = kept[j]
    comp.partner = partner
    return comp


def _directed_distance(analysis: ChannelAnalysis) -> Tensor:
    """``(1 − cos[p,k]) + w·mismatch[p,k]²``: how well ``k`` stands in for ``p`` (before symmetrising)."""
    return (1.0 - analysis.cosine) + analysis.bias_weight * analysis.bias_mismatch**2


def strategy_autodfp(
    stats: ChannelStats,
    analysis: ChannelAnalysis | None,
    kept: Tensor,
    pruned: Tensor,
    strength: float = 1.0,
    gate: bool = True,
    max_distance: float | None = None,
    samples: Tensor | None = None,
) -> Compensation:
    """Channel-similarity reconstruction: merge into the most similar kept channel, keep the rest as a constant.

    Partner of pruned ``p``: the kept member of ``p``'s DBSCAN cluster closest to ``p``; if ``p`` is
    noise or its cluster kept nothing, the closest kept channel overall. "Closest" uses the directed
    distance ``(1 − cos[p,k]) + w·mismatch[p,k]²`` (how well ``k`` explains ``p``; the symmetric
    ``analysis.distance`` is its max with the transpose). Then ``A[p, k] = λ·α_pk`` with
    ``α_pk = analysis.scale[p, k]`` and ``λ = strength ∈ [0, 1]``, and

        ``c_p = E[act(y_p)] − λ·α_pk·E[act(y_k)]``

    under ``y ~ N(mean, std²)`` with the real activation: the part of ``p`` the merge cannot carry
    (its offset seen through the activation, and the ``1 − λ`` share the agent chose not to merge),
    replaced by its expectation so the consumer's mean input is preserved.

    A merge is skipped (``A`` row 0, ``c_p = E[act(y_p)]``) when ``α ≤ 0``; when ``max_distance`` is
    given and the partner is farther; and, with ``gate`` (default), when it would *raise* the
    expected squared error of ``a_p`` over the constant alone, i.e. unless
    ``λα·(2·Cov(a_p, a_k) − λα·Var(a_k)) > 0`` under the pair's Gaussian model (correlation
    ``stats.corr`` or the filter cosine; moments from
    :func:`~autodfp.analysis.similarity.activation_covariance`). That is what stops a channel that is
    geometrically parallel to ``k`` but dead (its pre-activation far below zero, so ``a_p ≡ 0``)
    from inheriting ``α·(a_k − E a_k)``. With ``samples`` (N, C) of pre-activations the expectations
    and the gate's moments are empirical.
    """
    kept, pruned = _check_partition(stats, kept, pruned)
    analysis = _need_analysis("autodfp", analysis)
    if not 0.0 <= strength <= 1.0:
        raise PlanError(f"reconstruction strength must be in [0, 1], got {strength}")
    comp = _empty(kept, pruned)
    partner = torch.full((pruned.numel(),), -1, dtype=torch.long)
    ea = _post_means(stats, samples)
    comp.c = ea[pruned].clone()
    comp.partner = partner
    if kept.numel() == 0 or pruned.numel() == 0 or strength == 0.0:
        return comp
    d = _directed_distance(analysis)
    labels = torch.as_tensor(analysis.labels, dtype=torch.long)
    kept_labels = labels[kept]
    rows: list[int] = []
    cols: list[int] = []
    for i, p in enumerate(pruned.tolist()):
        lab = int(labels[p])
        cand = torch.nonzero(kept_labels == lab).flatten() if lab >= 0 else torch.empty(0, dtype=torch.long)
        if cand.numel() == 0:
            cand = torch.arange(kept.numel())
        j = int(cand[int(torch.argmin(d[p, kept[cand]]))])
        k = int(kept[j])
        if float(analysis.scale[p, k]) <= 0 or float(analysis.cosine[p, k]) <= 0:
            continue
        if max_distance is not None and float(d[p, k]) > max_distance:
            continue
        rows.append(i)
        cols.append(j)
    if not rows:
        return comp
    ri = torch.tensor(rows, dtype=torch.long)
    cj = torch.tensor(cols, dtype=torch.long)
    p_idx, k_idx = pruned[ri], kept[cj]
    slope = strength * analysis.scale[p_idx, k_idx]
    if gate:
        cov, var_k = _pair_moments(stats, p_idx, k_idx, samples)
        ok = slope * (2.0 * cov - slope * var_k) > 0
        ri, cj, p_idx, k_idx, slope = ri[ok], cj[ok], p_idx[ok], k_idx[ok], slope[ok]
    comp.A[ri, cj] = slope
    comp.c[ri] = ea[p_idx] - slope * ea[k_idx]
    partner[ri] = k_idx
    return comp


def _pair_moments(stats: ChannelStats, p_idx: Tensor, k_idx: Tensor, samples: Tensor | None) -> tuple[Tensor, Tensor]:
    """(Cov(a_p, a_k), Var(a_k)) for paired index lists, Gaussian model or empirical."""
    if samples is not None:
        a = apply_activation(_check_samples(stats, samples), stats.activation)
        ac = a - a.mean(0)
        n = a.shape[0] - 1
        return (ac[:, p_idx] * ac[:, k_idx]).sum(0) / n, (ac[:, k_idx] ** 2).sum(0) / n
    if stats.corr is not None:
        rho = stats.corr.detach().to(torch.float64)[p_idx, k_idx]
    else:
        f = stats.filters.detach().to(torch.float64)
        fp, fk = f[p_idx], f[k_idx]
        den = fp.norm(dim=1) * fk.norm(dim=1)
        rho = torch.where(den > 0, (fp * fk).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))
    mu = stats.mean.detach().to(torch.float64)
    sd = stats.std.detach().to(torch.float64)
    cov = pair_activation_covariance(mu, sd, rho, p_idx, k_idx, stats.activation)
    var_k = activation_moments(mu[k_idx], sd[k_idx], stats.activation)[1]
    return cov, var_k


def gaussian_correlation(stats: ChannelStats, jitter: float = 1e-6) -> Tensor:
    """Pre-activation correlation: ``stats.corr`` if given, else the cosine of the folded filters.

    For inputs with identity covariance ``Cov(y_p, y_k) = <f_p, f_k>`` and ``Var(y_p) = |f_p|²``, so
    the correlation is exactly the filter cosine; it is the only data-free estimate the weights
    offer. Real inputs are correlated: on ResNet-56 the empirical pre-activation correlations
    track the cosines (r ≈ 0.77 over pairs) but are ~1.3× larger; the ridge in
    :func:`strategy_lsq` hedges against the mismatch. The cosine matrix is a Gram matrix, hence
    already a valid correlation; a user-supplied one is symmetrised, given a unit diagonal and,
    if it is not positive semi-definite, projected onto the PSD cone (eigenvalues clipped at
    ``jitter``) and re-normalised.
    """
    if stats.corr is None:
        return pairwise_geometry(stats.filters)[0]
    r = stats.corr.detach().to(torch.float64)
    r = (0.5 * (r + r.T)).clamp(-1.0, 1.0)
    r.fill_diagonal_(1.0)
    eye = torch.eye(r.shape[0], dtype=torch.float64)
    if int(torch.linalg.cholesky_ex(r + jitter * eye).info) == 0:
        return r
    evals, evecs = torch.linalg.eigh(r)
    r = (evecs * evals.clamp_min(jitter)) @ evecs.T
    d = r.diagonal().sqrt()
    r = r / d[:, None] / d[None, :]
    return 0.5 * (r + r.T)


def _mc_post_covariance(
    stats: ChannelStats, corr: Tensor, rows: Tensor, cols: Tensor, n_samples: int, seed: int, chunk: int
) -> Tensor:
    """Monte-Carlo Cov(act(y)[rows], act(y)[cols]); a cross-check of the quadrature, not the default."""
    evals, evecs = torch.linalg.eigh(corr)
    factor = evecs * evals.clamp_min(0.0).sqrt()  # R = factor @ factor.T
    mu = stats.mean.detach().to(torch.float64)
    sd = stats.std.detach().to(torch.float64)
    shift = expected_activation(mu, sd, stats.activation)  # centring with the exact mean avoids cancellation
    g = torch.Generator().manual_seed(int(seed))
    acc = torch.zeros(rows.numel(), cols.numel(), dtype=torch.float64)
    s_rows = torch.zeros(rows.numel(), dtype=torch.float64)
    s_cols = torch.zeros(cols.numel(), dtype=torch.float64)
    done = 0
    while done < n_samples:
        m = min(chunk, n_samples - done)
        z = torch.randn(m, stats.num_channels, generator=g, dtype=torch.float64) @ factor.T
        a = apply_activation(mu + sd * z, stats.activation) - shift
        ar, ac = a[:, rows], a[:, cols]
        acc += ar.T @ ac
        s_rows += ar.sum(0)
        s_cols += ac.sum(0)
        done += m
    return acc / n_samples - torch.outer(s_rows / n_samples, s_cols / n_samples)


def post_activation_covariance(stats: ChannelStats, nodes: int = 16) -> Tensor:
    """Full (C, C) Cov(act(y)) under the Gaussian model, cached on ``stats``.

    The covariance does not depend on which channels are kept, so an agent that tries many
    pruning plans on one group pays the quadrature once (reuse the same ChannelStats object).
    """
    key = ("post_cov", int(nodes))
    if key not in stats.cache:
        stats.cache[key] = activation_covariance(
            stats.mean, stats.std, gaussian_correlation(stats), stats.activation, nodes=nodes
        )
    return stats.cache[key]


def strategy_lsq(
    stats: ChannelStats,
    analysis: ChannelAnalysis | None,
    kept: Tensor,
    pruned: Tensor,
    ridge: float = 1e-2,
    strength: float = 1.0,
    samples: Tensor | None = None,
    dims_ridge: float = 3.0,
    method: str = "quadrature",
    nodes: int = 16,
    n_samples: int = 32768,
    seed: int = 0,
    chunk: int = 4096,
) -> Compensation:
    """Best linear prediction of every pruned activation from all kept ones, under a Gaussian model.

    ``A = Cov(a_p, a_k) (Cov(a_k, a_k) + ρ·mean(diag Cov(a_k, a_k))·I)⁻¹`` and
    ``c = E[a_p] − A E[a_k]`` (both scaled by ``strength``: ``A → λA``, ``c = E[a_p] − λA E[a_k]``).
    Moments of ``a = act(y)`` come from ``y ~ N(mean, diag(std) R diag(std))`` with ``R`` from
    :func:`gaussian_correlation`: means in closed form, covariances by the deterministic
    Price-theorem quadrature of :func:`~autodfp.analysis.similarity.activation_covariance` (``nodes``
    Gauss–Legendre points; cached on ``stats``, see :func:`post_activation_covariance`), or with
    ``method="mc"`` by Monte Carlo (``n_samples`` draws, fixed ``seed``, chunked). With ``samples``
    (N, C) of real or synthetic pre-activations the moments are empirical instead.

    ``ridge`` is relative to the average kept variance so it means the same in every layer; it
    shrinks ``A`` toward 0 (the ``mean`` strategy), the safe direction when the assumed
    correlations are wrong. On ResNet-56 (30 % of every block's inner channels pruned) accuracy
    is flat for ridge in [1e-3, 1e-1] and degrades slowly above; 1e-2 is the default.

    When the correlations are a measurement on ``stats.measured_from`` positions (the calibration
    batch's: a group's pre-activations, or a residual stream's or an SE chain's consumer inputs),
    the ridge grows by ``dims_ridge`` (default 3, the refinement's search value) × kept channels /
    positions, as the refinement's does: a covariance of ``k`` channels from ``n`` samples has its
    small eigenvalues pulled towards zero by about ``k/n``, and an SE block's ``fc1`` reads (and
    its squeeze channels are) one pooled position per input, often fewer than its channels. On a
    batch of 20,000 positions the extra ridge is negligible. Without the shrinkage such a fit
    reproduces the batch and does worse on other inputs.
    """
    kept, pruned = _check_partition(stats, kept, pruned)
    if ridge < 0:
        raise PlanError(f"ridge must be non-negative, got {ridge}")
    if dims_ridge < 0:
        raise PlanError(f"dims_ridge must be non-negative, got {dims_ridge}")
    if stats.measured_from:
        ridge = ridge + dims_ridge * kept.numel() / stats.measured_from
    if not 0.0 <= strength <= 1.0:
        raise PlanError(f"reconstruction strength must be in [0, 1], got {strength}")
    if method not in ("quadrature", "mc"):
        raise PlanError(f"lsq method must be 'quadrature' or 'mc', got '{method}'")
    comp = _empty(kept, pruned)
    if pruned.numel() == 0:
        return comp
    if samples is not None:
        y = _check_samples(stats, samples)
        a = apply_activation(y, stats.activation)
        ea = a.mean(0)
        ac = a - ea
        cov_pk = ac[:, pruned].T @ ac[:, kept] / (a.shape[0] - 1)
        cov_kk = ac[:, kept].T @ ac[:, kept] / (a.shape[0] - 1)
    else:
        ea = expected_activation(stats.mean, stats.std, stats.activation)
        if method == "mc":
            cov = _mc_post_covariance(
                stats, gaussian_correlation(stats), torch.cat([pruned, kept]), kept, n_samples, seed, chunk
            )
            cov_pk, cov_kk = cov[: pruned.numel()], cov[pruned.numel() :]
        else:
            full = post_activation_covariance(stats, nodes)
            cov_pk, cov_kk = full[pruned][:, kept], full[kept][:, kept]
    cov_kk = 0.5 * (cov_kk + cov_kk.T)
    scale = float(cov_kk.diagonal().mean()) if kept.numel() else 0.0
    if scale <= 0:
        comp.c = ea[pruned].clone()
        comp.info["degenerate"] = True
        return comp
    k_mat = cov_kk + (ridge + 1e-12) * scale * torch.eye(kept.numel(), dtype=torch.float64)
    a_mat = torch.linalg.solve(k_mat, cov_pk.T).T * strength
    comp.A = a_mat
    comp.c = ea[pruned] - a_mat @ ea[kept]
    return comp


def fit_drift(
    target: Tensor, observed: Tensor, comp: Compensation, kept: Tensor, pruned: Tensor, ridge: float = 1e-2
) -> Compensation:
    """Re-fit ``comp`` so the kept channels of a pruned model predict the original activations.

    ``target`` (P, C): every channel of the group in the original model, ``observed`` (P, C): the
    same positions in the pruned model, of which only ``kept`` columns are used. With
    ``M0 = [K0; A]`` and ``m0 = [d0; c]`` the prior (``K0 = I``, ``d0 = 0`` unless ``comp`` already
    corrects the kept channels), the residual ``target - observed_kept @ M0ᵀ - m0`` is regressed on
    ``observed_kept`` with an intercept and a ridge of ``ridge × mean kept variance``. That
    regularises towards the prior, so a prior that is already exact (no drift, exact
    reconstruction) comes back unchanged.
    """
    kept = torch.as_tensor(kept, dtype=torch.long)
    pruned = torch.as_tensor(pruned, dtype=torch.long)
    c = kept.numel() + pruned.numel()
    if target.dim() != 2 or observed.shape != target.shape or target.shape[1] != c:
        raise ValueError(
            f"target/observed must both be (P, {c}), got {tuple(target.shape)} and {tuple(observed.shape)}"
        )
    if ridge < 0:
        raise PlanError(f"ridge must be non-negative, got {ridge}")
    n_kept = kept.numel()
    m0 = torch.zeros(c, n_kept, dtype=torch.float64)
    v0 = torch.zeros(c, dtype=torch.float64)
    m0[kept] = comp.K.to(torch.float64) if comp.K is not None else torch.eye(n_kept, dtype=torch.float64)
    v0[kept] = comp.d.to(torch.float64) if comp.d is not None else 0.0
    m0[pruned] = comp.A.to(torch.float64)
    v0[pruned] = comp.c.to(torch.float64)
    x = observed.to(torch.float64)[:, kept]
    resid = target.to(torch.float64) - x @ m0.T - v0
    mu_x, mu_r = x.mean(0), resid.mean(0)
    xc = x - mu_x
    cov_xx = xc.T @ xc / x.shape[0]
    cov_xr = xc.T @ (resid - mu_r) / x.shape[0]
    scale = float(cov_xx.diagonal().mean()) if n_kept else 0.0
    if scale > 0:
        delta = torch.linalg.solve(cov_xx + (ridge + 1e-12) * scale * torch.eye(n_kept, dtype=torch.float64), cov_xr).T
    else:
        delta = torch.zeros(c, n_kept, dtype=torch.float64)
    m = m0 + delta
    v = v0 + mu_r - delta @ mu_x
    info = dict(comp.info, refined=True, residual_before=float(resid.pow(2).mean()))
    return Compensation(m[pruned], v[pruned], partner=comp.partner, info=info, K=m[kept], d=v[kept])


#: name → strategy ``fn(stats, analysis, kept, pruned, **params) -> Compensation``; add with
#: :func:`register_strategy`
STRATEGIES: dict[str, Callable[..., Compensation]] = {}


def register_strategy(name: str, fn: Callable[..., Compensation] | None = None) -> Any:
    """Add a reconstruction strategy under ``name`` (usable as a decorator), as timm registers models.

    The function is called as ``fn(stats, analysis, kept, pruned, **params)`` and returns a
    :class:`Compensation`; the keyword parameters it declares are the ones a plan may set for it.
    """

    def add(f: Callable[..., Compensation]) -> Callable[..., Compensation]:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        STRATEGIES[name] = f
        return f

    return add(fn) if fn is not None else add


def strategy_names() -> tuple[str, ...]:
    """The registered strategies, in registration order (the built-ins first)."""
    return tuple(STRATEGIES)


for _name, _fn in (
    ("none", strategy_none),
    ("mean", strategy_mean),
    ("nm", strategy_nm),
    ("autodfp", strategy_autodfp),
    ("lsq", strategy_lsq),
):
    register_strategy(_name, _fn)


def reconstruct(
    name: str, stats: ChannelStats, analysis: ChannelAnalysis | None, kept: Tensor, pruned: Tensor, **params: object
) -> Compensation:
    """Run strategy ``name``; unknown names are a :class:`~autodfp.errors.PlanError`."""
    fn = STRATEGIES.get(name)
    if fn is None:
        raise PlanError(f"unknown reconstruction strategy '{name}' (expected one of {', '.join(STRATEGIES)})")
    return fn(stats, analysis, kept, pruned, **params)


__all__ = [
    "Compensation",
    "STRATEGIES",
    "fit_drift",
    "fold_into_consumer",
    "gaussian_correlation",
    "post_activation_covariance",
    "reconstruct",
    "register_strategy",
    "strategy_autodfp",
    "strategy_names",
    "strategy_lsq",
    "strategy_mean",
    "strategy_nm",
    "strategy_none",
]
