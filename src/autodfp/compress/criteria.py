"""Which channels of a group to keep.

Every criterion returns ``(kept, pruned)`` as sorted ``LongTensor``s that partition ``range(C)``.
Ties are broken by channel index (stable sort), so a plan is reproducible across runs.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from autodfp.analysis.similarity import ChannelAnalysis, ChannelStats
from autodfp.errors import PlanError

#: a criterion maps (stats, analysis, raw filters, seed) to channel indices, most important first
CriterionFn = Callable[[ChannelStats, ChannelAnalysis | None, Tensor | None, int], Tensor]


def _split(order: Tensor, n_keep: int, granularity: int = 1) -> tuple[Tensor, Tensor]:
    """``order`` lists channels from most to least important; with ``granularity`` G > 1 the
    channels form G equal contiguous blocks (a grouped conv's groups) and each keeps its own
    ``n_keep / G`` most important."""
    if granularity > 1:
        c = order.numel()
        rank = torch.empty_like(order)
        rank[order] = torch.arange(c, device=order.device)
        per = c // granularity
        best = rank.view(granularity, per).argsort(dim=1, stable=True)[:, : n_keep // granularity]
        kept = (best + torch.arange(granularity, device=order.device)[:, None] * per).flatten().sort().values
        mask = torch.ones(c, dtype=torch.bool, device=order.device)
        mask[kept] = False
        return kept.to(torch.long), torch.arange(c, device=order.device)[mask].to(torch.long)
    kept = order[:n_keep].sort().values
    pruned = order[n_keep:].sort().values
    return kept.to(torch.long), pruned.to(torch.long)


def _by_score(score: Tensor) -> Tensor:
    """Indices by descending score; equal scores keep the lower channel index first."""
    return torch.sort(-score.to(torch.float64), stable=True).indices


def _norm_score(stats: ChannelStats, raw_filters: Tensor | None, p: int) -> Tensor:
    f = stats.filters if raw_filters is None else raw_filters
    f = f.detach().reshape(f.shape[0], -1).to(torch.float64)
    if f.shape[0] != stats.num_channels:
        raise ValueError(f"raw_filters has {f.shape[0]} rows for a group of {stats.num_channels} channels")
    return f.abs().sum(1) if p == 1 else f.norm(dim=1)


def select_channels(
    criterion: str,
    stats: ChannelStats,
    analysis: ChannelAnalysis | None,
    n_keep: int,
    raw_filters: Tensor | None = None,
    seed: int = 0,
    granularity: int = 1,
) -> tuple[Tensor, Tensor]:
    """Split a group into kept and pruned channels.

    ``granularity`` G > 1 (a grouped conv produces or reads the channels, :attr:`~autodfp.analysis.graph.PrunableGroup.granularity`):
    the channels form G equal contiguous blocks, ``n_keep`` must be a multiple of G, and each block
    keeps its ``n_keep / G`` channels ranked highest by the criterion.

    - ``l1`` / ``l2``: norm of each channel's filter. The textbook criterion (Li et al., 2017) uses
      the *raw* producer filter, so pass ``raw_filters`` (C, …) to reproduce it; without it the
      BN-folded filters are used. Pass them: on ResNet-56 with 30 % of every block's inner
      channels pruned, raw L1 kept 83.0 % top-1 (no reconstruction) / 89.7 % (``lsq``) where
      folded L1 kept 59.5 % / 81.4 % — the folded norm inflates channels whose raw response is
      small but amplified by ``γ/σ``, and those are not the important ones. Post-activation
      std (from the BN Gaussian), with or without the consumer's weight norm, was also worse
      than raw L1 once a reconstruction was applied.
    - ``cluster``: first one representative per DBSCAN cluster (its highest-norm member), then
      noise points, then the other cluster members, each tier by descending norm (L1 of
      ``raw_filters`` if given, else L2 of the folded filters, as for ``l1``/``l2``). The
      non-representatives of a cluster are near-duplicates of a kept channel, so they are the
      cheapest to prune (and the best served by a merge).
    - ``random``: a uniformly random subset from ``torch.Generator().manual_seed(seed)``; baseline.
    """
    c = stats.num_channels
    if isinstance(n_keep, bool):
        raise PlanError(f"n_keep must be an integer, got {n_keep!r}")
    try:
        n_keep = operator.index(n_keep)  # accepts numpy integers, rejects floats
    except TypeError:
        raise PlanError(f"n_keep must be an integer, got {n_keep!r}") from None
    if not 1 <= n_keep <= c:
        raise PlanError(f"n_keep must be in [1, {c}] for a group of {c} channels, got {n_keep}")
    if granularity < 1 or c % granularity or n_keep % granularity:
        raise PlanError(f"n_keep {n_keep} and the group's {c} channels must both split into {granularity} equal groups")
    fn = _CRITERIA.get(criterion)
    if fn is None:
        raise PlanError(f"unknown pruning criterion '{criterion}' (expected one of {', '.join(_CRITERIA)})")
    order = fn(stats, analysis, raw_filters, seed)
    return _split(order, n_keep, granularity)


def _l1(stats: ChannelStats, analysis: ChannelAnalysis | None, raw: Tensor | None, seed: int) -> Tensor:
    return _by_score(_norm_score(stats, raw, 1))


def _l2(stats: ChannelStats, analysis: ChannelAnalysis | None, raw: Tensor | None, seed: int) -> Tensor:
    return _by_score(_norm_score(stats, raw, 2))


def _cluster(stats: ChannelStats, analysis: ChannelAnalysis | None, raw: Tensor | None, seed: int) -> Tensor:
    if analysis is None:
        raise PlanError("the 'cluster' criterion needs a channel analysis")
    norms = analysis.norms if raw is None else _norm_score(stats, raw, 1)
    c = norms.shape[0]
    tier = torch.ones(c, dtype=torch.long)  # 0 representative, 1 noise, 2 redundant member
    for members in analysis.clusters().values():
        idx = torch.tensor(members, dtype=torch.long)
        rep = idx[torch.argmax(norms[idx])]  # argmax returns the first maximum: lowest index wins ties
        tier[idx] = 2
        tier[rep] = 0
    order = _by_score(norms)
    # stable sort of the norm order by tier keeps the norm order within each tier
    return order[torch.sort(tier[order], stable=True).indices]


def _random(stats: ChannelStats, analysis: ChannelAnalysis | None, raw: Tensor | None, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(stats.num_channels, generator=g)


_CRITERIA: dict[str, CriterionFn] = {}


def register_criterion(name: str, fn: CriterionFn | None = None) -> Any:
    """Add a channel-selection criterion under ``name`` (usable as a decorator), as timm registers models.

    ``fn(stats, analysis, raw_filters, seed)`` returns every channel index, most important first;
    plans, the CLI's ``--criterion`` and the config accept the name once it is registered.
    """

    def add(f: CriterionFn) -> CriterionFn:
        if name in _CRITERIA:
            raise ValueError(f"criterion {name!r} is already registered")
        _CRITERIA[name] = f
        return f

    return add(fn) if fn is not None else add


def criterion_names() -> tuple[str, ...]:
    """The registered criteria, in registration order (the built-ins first)."""
    return tuple(_CRITERIA)


for _name, _fn in (("l1", _l1), ("l2", _l2), ("cluster", _cluster), ("random", _random)):
    register_criterion(_name, _fn)


__all__ = ["CriterionFn", "criterion_names", "register_criterion", "select_channels"]
