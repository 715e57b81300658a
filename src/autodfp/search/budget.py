"""MACs budgets in closed form: what a plan costs, which ratios keep a target reachable.

The search evaluates budgets thousands of times per run (every step clips its action to a
feasible range, every episode is repaired onto the target), so profiling a pruned copy each time
is out of the question. Pruning a group only shrinks dimensions of whole layers, so the pruned
model's MACs are an exact function of the kept channel counts.

Each prunable group lists its *footprint* (:attr:`~autodfp.analysis.graph.PrunableGroup.footprint`):
every MAC-counted layer its channels pass and how many of that layer's output rows, input columns
or (depthwise) channels they occupy, read off torch-pruning's group, i.e. exactly what the
physical prune removes. A layer's MACs are ``H·W·C_out·(C_in/groups)·k²`` (a depthwise conv's
``H·W·C·k²``), so they scale by ``(C_out − removed rows)/C_out`` times ``(C_in − removed columns)/C_in``,
each dimension losing what every group in it removes. That one rule covers all structures:

* an inner group scales its producer's rows and its consumers' columns, a MobileNet pointwise conv
  that consumes one chain and produces the next by both groups;
* a depthwise pass-through conv scales once, by its channels;
* a grouped conv (ResNeXt, RegNet) loses as many channels in each conv group: its group is counted
  in channels per conv group, each unit taking ``granularity`` channels of the layer;
* a coupled group (a residual stream) scales every producer writing into the stream and every
  consumer reading it; a conv that does both (a downsample conv reading one stream and writing the
  next, or a RepVGG conv reading and writing the same stream) scales by both dimensions, so twice
  by the same group where it reads and writes one stream;
* a concat group (DenseNet, SqueezeNet, Inception) is a block of each consumer's input columns:
  the blocks of every group a consumer reads come off its one input count (a sum, not a product);
* a part of a split or slice (``kind == "split"``) is a block of its producer's rows, so the parts
  of one producer come off its row count the same way; a ghost module's consumer reads each
  channel twice (the channel and its depthwise copy) and loses two columns per channel;
* an SE-gated chain scales its expand conv, its depthwise conv, the SE ``fc2`` rows (the chain's
  channels) and both consumers, ``fc1`` and the project conv.

Each layer's MACs are divisible by the dimensions that scale them, so the count is computed in
integers and matches :func:`autodfp.eval.metrics.profile` of the physically pruned model exactly.
With every other group fixed the count is non-decreasing in one group's kept channels (linear
unless a layer reads and writes the same group), which :meth:`MacsModel.feasible_keep` solves in
closed form and then settles exactly on the integer boundary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

import torch.nn as nn

from autodfp.analysis.graph import GroupGraph
from autodfp.compress.plan import Plan, n_keep
from autodfp.config import DEFAULTS
from autodfp.errors import PlanError
from autodfp.eval.metrics import profile

#: Smallest preserved ratio for the budget helpers when none is given; the search chooses its own
#: with :meth:`MacsModel.auto_r_min` unless told otherwise. (ResNet-56's floor at 0.2 is 0.196x.)
DEFAULT_R_MIN = 0.2
#: :meth:`MacsModel.auto_r_min`: the largest r_min ≤ ``AUTO_R_MIN_MAX`` (grid step 0.01, down to
#: ``AUTO_R_MIN_LOW``) whose MACs floor is at most ``AUTO_HEADROOM`` × the target. Measured on
#: ResNet-56 at 0.5 MACs (lsq, 100 episodes, seeds 0/1): r_min 0.3 (floor 0.31x = 0.62 × target)
#: gave best rewards −1.14/−1.12 and top-1 73.6/73.6 % with SAC, against −1.37/−1.32 and
#: 61.3/67.8 % at r_min 0.2 and −1.23/69.0 % at 0.1; random search showed the same order. A
#: narrower range wastes fewer episodes on plans that gut one layer to afford another.
AUTO_R_MIN_MAX = 0.3
AUTO_R_MIN_LOW = 0.05
AUTO_HEADROOM = 0.65
#: Relative budget tolerance: a plan is on budget within ±1 % of the target MACs.
DEFAULT_TOL = DEFAULTS.tol


@dataclass(frozen=True)
class _Term:
    """One counted layer: ``macs · Π_f (W_f − Σ_g m_g·(units_g − keep_g)) / W_f``.

    Each factor ``f`` is one dimension of the layer (its rows, its columns, or a depthwise conv's
    channels) of width ``W_f``; each group ``g`` in it removes ``m_g`` of that dimension per unit it
    loses (a channel, or a channel per conv group; two for a channel a consumer reads twice).
    """

    name: str
    macs: int
    factors: tuple[tuple[int, tuple[tuple[str, int | Fraction], ...]], ...]

    @property
    def groups(self) -> set[str]:
        return {g for _, parts in self.factors for g, _ in parts}


def _width(layer: nn.Module, role: str) -> int:
    """The size of a layer's dimension that ``role`` names (see :attr:`PrunableGroup.footprint`)."""
    if isinstance(layer, nn.Linear):
        return int(layer.out_features if role == "out" else layer.in_features)
    return int(getattr(layer, "in_channels" if role == "in" else "out_channels"))


class MacsModel:
    """Exact MACs of any per-group channel count, built once from one profile of the model."""

    def __init__(self, model: nn.Module, graph: GroupGraph, input_shape: tuple[int, ...]) -> None:
        self.input_shape = tuple(input_shape)
        prof = profile(model, self.input_shape)
        self.total_macs: int = int(prof.total_macs)
        self.groups: list[str] = [g.name for g in graph.prunable]
        #: what a group's preserved ratio counts: channels, or channels per conv group next to a
        #: grouped conv (:attr:`~autodfp.analysis.graph.PrunableGroup.units`); every ``keep`` here is in
        #: these units, and a layer's MACs scale by what its dimensions lose all the same
        self.channels: dict[str, int] = {g.name: int(g.units) for g in graph.prunable}
        dims: dict[tuple[str, str], list[tuple[str, int | Fraction]]] = {}
        for g in graph.prunable:
            for layer, role, count in g.footprint:
                per_unit = Fraction(int(count), int(g.units))
                m = int(per_unit) if per_unit.denominator == 1 else per_unit
                dims.setdefault((layer, role), []).append((g.name, m))
        by_layer: dict[str, list[tuple[int, tuple[tuple[str, int | Fraction], ...]]]] = {}
        for (layer, role), parts in dims.items():
            by_layer.setdefault(layer, []).append((_width(model.get_submodule(layer), role), tuple(parts)))
        terms: list[_Term] = []
        fixed = 0
        for lp in prof.layers:
            if lp.macs == 0:
                continue
            if lp.name in by_layer:
                terms.append(_Term(lp.name, int(lp.macs), tuple(by_layer[lp.name])))
            else:
                fixed += int(lp.macs)
        self.fixed_macs: int = fixed
        #: per-layer profile at full width (shapes and MACs), for observation features
        self.layers = {lp.name: lp for lp in prof.layers}
        self._terms = terms
        self._by_group: dict[str, list[int]] = {g: [] for g in self.groups}
        for i, t in enumerate(terms):
            for gname in t.groups:
                self._by_group[gname].append(i)

    # -- counting ----------------------------------------------------------------------------
    def _term_macs(self, t: _Term, keep: Mapping[str, int]) -> Fraction | int:
        num: int | Fraction = t.macs
        den = 1
        for width, parts in t.factors:
            removed: int | Fraction = 0
            for g, m in parts:
                k = keep.get(g)
                if k is not None:
                    removed += m * (self.channels[g] - int(k))
            if removed:
                num *= width - removed
                den *= width
        if isinstance(num, Fraction):
            return num / den
        return num // den if num % den == 0 else Fraction(num, den)

    def macs(self, keep: Mapping[str, int]) -> int:
        """MACs with ``keep[g]`` channels in each listed group (missing groups keep all)."""
        total: Fraction | int = self.fixed_macs
        for t in self._terms:
            total += self._term_macs(t, keep)
        return int(round(total))

    def keep_for_plan(self, plan: Plan) -> dict[str, int]:
        return {g: n_keep(self.channels[g], float(r)) for g, r in plan.ratios.items() if g in self.channels}

    def macs_for_plan(self, plan: Plan) -> int:
        return self.macs(self.keep_for_plan(plan))

    def group_macs(self, name: str) -> int:
        """MACs of the layers that group ``name`` rescales, at full width (an observation feature)."""
        return sum(self._terms[i].macs for i in self._by_group[name])

    @property
    def prunable_macs(self) -> int:
        """MACs of every layer that some prunable group rescales (the rest is fixed cost)."""
        return self.total_macs - self.fixed_macs

    def min_keep(self, r_min: float = DEFAULT_R_MIN) -> dict[str, int]:
        return {g: max(1, n_keep(c, r_min)) for g, c in self.channels.items()}

    def min_macs(self, r_min: float = DEFAULT_R_MIN) -> int:
        """The fewest MACs reachable with every prunable group at ``r_min``."""
        return self.macs(self.min_keep(r_min))

    def auto_r_min(self, target_macs: float) -> float:
        """The search's default smallest ratio for this target (see :data:`AUTO_R_MIN_MAX`).

        Falls back to the largest r_min that can reach the target at all, and to
        ``AUTO_R_MIN_LOW`` when none can (so :meth:`check_target` reports the true floor).
        """
        steps = int(round((AUTO_R_MIN_MAX - AUTO_R_MIN_LOW) / 0.01))
        grid = [round(AUTO_R_MIN_MAX - 0.01 * i, 2) for i in range(steps + 1)]
        for bound in (AUTO_HEADROOM * target_macs, target_macs):
            for r in grid:
                if self.min_macs(r) <= bound:
                    return r
        return AUTO_R_MIN_LOW

    def ratio_keep(self, ratio: float) -> dict[str, int]:
        """Kept channels when every group uses the same preserved ``ratio`` (at least one)."""
        return {g: max(1, n_keep(c, ratio)) for g, c in self.channels.items()}

    # -- budgets -----------------------------------------------------------------------------
    def check_target(self, target_macs: float, r_min: float = DEFAULT_R_MIN, tol: float = DEFAULT_TOL) -> None:
        """Raise :class:`PlanError` unless some plan with ratios in [r_min, 1] lands within ±tol."""
        if not (r_min > 0 and r_min <= 1):
            raise PlanError(f"r_min must be in (0, 1], got {r_min}")
        lowest = self.min_macs(r_min)
        lo_ratio = lowest / self.total_macs
        t_ratio = target_macs / self.total_macs
        if not math.isfinite(target_macs) or target_macs <= 0:
            raise PlanError(f"target MACs must be positive, got {target_macs}")
        if target_macs > self.total_macs * (1 + 1e-12):
            raise PlanError(
                f"target of {t_ratio:.4f}x the original MACs is above the original model; "
                f"reachable MACs ratios are {lo_ratio:.4f} to 1.0"
            )
        if lowest > target_macs * (1 + tol):
            raise PlanError(
                f"target of {t_ratio:.4f}x the original MACs is unreachable: with every prunable "
                f"group at r_min={r_min:g} the model keeps {lo_ratio:.4f}x ({lowest:,} of "
                f"{self.total_macs:,} MACs); the minimum reachable MACs ratio is {lo_ratio:.4f}"
            )

    def feasible_keep(
        self,
        chosen: Mapping[str, int],
        group: str,
        target_macs: float,
        r_min: float = DEFAULT_R_MIN,
        tol: float = DEFAULT_TOL,
    ) -> tuple[int, int]:
        """Kept-channel range ``[lo, hi]`` for ``group`` that keeps the target reachable.

        Groups in ``chosen`` are fixed; every other group (except ``group``) is "remaining".
        ``hi``: the most channels such that the remaining groups at ``r_min`` still get MACs ≤ target.
        ``lo``: the fewest such that the remaining groups at full width still reach target·(1 − tol).
        If the target sits below the floor (possible within ``tol`` of it), ``hi`` falls back to the
        minimum; the range is never empty.
        """
        c = self.channels[group]
        kmin = self.min_keep(r_min)
        k_lo_bound = kmin[group]
        rest_min = {g: (chosen[g] if g in chosen else kmin[g]) for g in self.groups if g != group}
        rest_max = {g: (chosen[g] if g in chosen else self.channels[g]) for g in self.groups if g != group}

        def solve(rest: dict[str, int], bound: float, upper: bool) -> int:
            m0 = self.macs({**rest, group: 0})
            m1 = self.macs({**rest, group: c})
            slope = (m1 - m0) / c
            if slope <= 0:  # the group costs nothing here: any count satisfies or none does
                ok = m0 <= bound if upper else m0 >= bound
                return (c if upper else k_lo_bound) if ok else (k_lo_bound - 1 if upper else c + 1)
            k = (bound - m0) / slope
            k = math.floor(k) if upper else math.ceil(k)
            k = min(max(k, k_lo_bound - 1), c + 1)
            # float rounding in the solve: step to the exact integer boundary
            if upper:
                while k >= k_lo_bound and self.macs({**rest, group: k}) > bound:
                    k -= 1
                while k + 1 <= c and self.macs({**rest, group: k + 1}) <= bound:
                    k += 1
            else:
                while k <= c and k >= k_lo_bound and self.macs({**rest, group: k}) < bound:
                    k += 1
                while k - 1 >= k_lo_bound and self.macs({**rest, group: k - 1}) >= bound:
                    k -= 1
            return k

        hi = solve(rest_min, target_macs, upper=True)
        lo = solve(rest_max, target_macs * (1 - tol), upper=False)
        hi = min(max(hi, k_lo_bound), c)
        lo = min(max(lo, k_lo_bound), c)
        if lo > hi:  # integer granularity: prefer staying under the budget
            lo = hi
        return lo, hi

    def feasible_range(
        self,
        chosen: Mapping[str, int],
        group: str,
        target_macs: float,
        r_min: float = DEFAULT_R_MIN,
        tol: float = DEFAULT_TOL,
    ) -> tuple[float, float]:
        """:meth:`feasible_keep` as preserved ratios (``k / C``, which :func:`n_keep` maps back to ``k``)."""
        lo, hi = self.feasible_keep(chosen, group, target_macs, r_min, tol)
        c = self.channels[group]
        return lo / c, hi / c

    def _uniform_candidates(self, r_min: float) -> list[float]:
        """One ratio per distinct uniform keep-vector in [r_min, 1], ascending."""
        points = {r_min, 1.0}
        for c in set(self.channels.values()):
            for k in range(1, c + 1):
                b = (k - 0.5) / c  # n_keep(c, ·) steps from k-1 to k here
                if r_min < b < 1.0:
                    points.add(b)
        edges = sorted(points)
        cands = [edges[0]]
        for a, b in zip(edges[1:], edges[2:]):
            cands.append(1.0 if b >= 1.0 else _simple_ratio(a, b))
        return cands

    def fit_uniform(self, target_macs: float, r_min: float = DEFAULT_R_MIN, tol: float = DEFAULT_TOL) -> float:
        """The single preserved ratio whose MACs are closest to ``target_macs`` (ties: the cheaper).

        MACs are a non-decreasing step function of a uniform ratio, so the search bisects over
        the ratios where some group's channel count steps, then checks the two neighbours. The
        returned ratio is the shortest decimal inside its step, so plans read ``0.5`` not ``0.49479``.
        """
        self.check_target(target_macs, r_min, tol)
        cands = self._uniform_candidates(r_min)
        macs: list[int | None] = [None] * len(cands)

        def m(i: int) -> int:
            v = macs[i]
            if v is None:
                v = macs[i] = self.macs(self.ratio_keep(cands[i]))
            return v

        lo, hi = 0, len(cands) - 1
        while lo < hi:  # first candidate with MACs >= target
            mid = (lo + hi) // 2
            if m(mid) >= target_macs:
                hi = mid
            else:
                lo = mid + 1
        best = min(
            (i for i in (lo - 1, lo, lo + 1) if 0 <= i < len(cands)), key=lambda i: (abs(m(i) - target_macs), m(i))
        )
        return cands[best]

    def _pair_search(
        self, keep: Mapping[str, int], lower: float, upper: float, kmin: Mapping[str, int], budget: int = 200_000
    ) -> dict[str, int] | None:
        """Two groups' widths changed together, for models with so few, narrow groups that no
        single-group move lands in the band (bounded: skipped when it would cost over ``budget``
        MACs evaluations)."""
        pairs = [(a, b) for i, a in enumerate(self.groups) for b in self.groups[i + 1 :]]
        cost = sum((self.channels[a] - kmin[a] + 1) * (self.channels[b] - kmin[b] + 1) for a, b in pairs)
        if cost > budget:
            return None
        mid = (lower + upper) / 2
        found: tuple[float, dict[str, int]] | None = None
        for a, b in pairs:
            for ka in range(kmin[a], self.channels[a] + 1):
                for kb in range(kmin[b], self.channels[b] + 1):
                    trial = {**keep, a: ka, b: kb}
                    m = self.macs(trial)
                    if lower <= m <= upper and (found is None or abs(m - mid) < found[0]):
                        found = (abs(m - mid), trial)
        return None if found is None else found[1]

    def _coordinate_descent(
        self, keep: Mapping[str, int], target_macs: float, kmin: Mapping[str, int], sweeps: int = 8
    ) -> dict[str, int]:
        """Each group in turn set to the width that brings the MACs closest to the target."""
        keep = dict(keep)
        for _ in range(sweeps):
            changed = False
            for g in self.groups:
                best_k = min(
                    range(kmin[g], self.channels[g] + 1),
                    key=lambda k: (abs(self.macs({**keep, g: k}) - target_macs), -k),
                )
                if best_k != keep[g]:
                    keep[g], changed = best_k, True
            if not changed:
                break
        return keep

    def repair(
        self, keep: Mapping[str, int], target_macs: float, tol: float = DEFAULT_TOL, r_min: float = DEFAULT_R_MIN
    ) -> dict[str, int]:
        """Move single channels until the MACs lie within ``target·(1 ± tol)``.

        Each move takes the group whose channel is worth the most MACs without jumping past the
        band (if every move would, the smallest one), so a plan that rounding pushed just
        outside changes in as few channels as possible. Plans already inside are returned as is.
        """
        keep = {g: int(keep.get(g, self.channels[g])) for g in self.groups}
        lower, upper = target_macs * (1 - tol), target_macs * (1 + tol)
        kmin = self.min_keep(r_min)
        cur = self.macs(keep)
        for _ in range(sum(self.channels.values()) * 2 + 1):
            if lower <= cur <= upper:
                return keep
            down = cur > upper
            moves = []
            for g in self.groups:
                k = keep[g] + (-1 if down else 1)
                if k < kmin[g] or k > self.channels[g]:
                    continue
                new = self.macs({**keep, g: k})
                moves.append((abs(new - cur), g, k, new))
            if not moves:
                break
            inside = [mv for mv in moves if (mv[3] >= lower if down else mv[3] <= upper)]
            _, g, k, new = max(inside) if inside else min(moves)
            keep[g], cur = k, new
        # Single-channel moves can oscillate around a band that coarse groups (few, narrow layers)
        # only reach by moving two groups at once: fall back to coordinate descent, setting each
        # group in turn to its best width given the others, from the plan the caller asked for.
        best = self._coordinate_descent(keep, target_macs, kmin)
        cur = self.macs(best)
        if lower <= cur <= upper:
            return best
        paired = self._pair_search(best, lower, upper, kmin)
        if paired is not None:
            return paired
        raise PlanError(
            f"could not bring the plan within ±{tol:.0%} of {target_macs / self.total_macs:.4f}x "
            f"the original MACs (reached {cur / self.total_macs:.4f}x)"
        )


def _simple_ratio(a: float, b: float) -> float:
    """The shortest decimal strictly inside ``(a, b)``.

    Breakpoints are ``(k − 0.5)/C``; a decimal with at most 7 digits differs from one by far more
    than float error, so :func:`n_keep` sees it unambiguously on the intended side.
    """
    for digits in range(1, 8):
        q = 10**digits
        r = (math.floor(a * q) + 1) / q
        if a < r < b:
            return r
    return (a + b) / 2


def target_from_ratio(macs_model: MacsModel, ratio: float) -> float:
    return float(ratio) * macs_model.total_macs


def fit_uniform(
    macs_model: MacsModel, target_macs: float, r_min: float = DEFAULT_R_MIN, tol: float = DEFAULT_TOL
) -> float:
    return macs_model.fit_uniform(target_macs, r_min, tol)


def feasible_range(
    macs_model: MacsModel,
    chosen: Mapping[str, int],
    group: str,
    target_macs: float,
    r_min: float = DEFAULT_R_MIN,
    tol: float = DEFAULT_TOL,
) -> tuple[float, float]:
    return macs_model.feasible_range(chosen, group, target_macs, r_min, tol)


def repair(
    macs_model: MacsModel,
    keep: Mapping[str, int],
    target_macs: float,
    tol: float = DEFAULT_TOL,
    r_min: float = DEFAULT_R_MIN,
) -> dict[str, int]:
    return macs_model.repair(keep, target_macs, tol, r_min)


def plan_from_keep(keep: Mapping[str, int], channels: Mapping[str, int], **kw: object) -> Plan:
    """A plan whose ratios ``k / C`` map back to exactly ``k`` channels under :func:`n_keep`."""
    ratios = {g: int(k) / channels[g] for g, k in keep.items()}
    for g, r in ratios.items():
        assert n_keep(channels[g], r) == int(keep[g])
    return Plan(ratios=ratios, **kw)  # type: ignore[arg-type]


__all__ = [
    "AUTO_R_MIN_MAX",
    "DEFAULT_R_MIN",
    "DEFAULT_TOL",
    "MacsModel",
    "feasible_range",
    "fit_uniform",
    "plan_from_keep",
    "repair",
    "target_from_ratio",
]
