"""Sequential drift correction: re-fit every consumer, in forward order, on a batch of inputs.

The strategies of :mod:`autodfp.compress.reconstruct` compensate each group as if it were the only one
pruned: they predict the pruned channels from the kept ones *of the original model*. When every
group is pruned, that no longer holds downstream. The errors of earlier groups travel through
the residual stream (or the plain chain, in MobileNet) and the kept channels of a later group
no longer carry their original values, so its compensation is built on inputs that have
drifted.

:func:`refine` walks the prunable groups in the order the forward pass reaches their consumers.
For each group it fits, by ridge least squares, the map from the *pruned* model's kept channels
to *all* channels of the *original* model. The fit is done on a batch of inputs: synthesised from
BN statistics by default, so it stays data-free. It regularises towards the strategy's own
compensation, so with no drift nothing changes. The map is folded into the consumer like any
other :class:`~autodfp.compress.reconstruct.Compensation`, with ``K``/``d`` correcting the kept channels.
Because ordinary least squares commutes with linear maps of the target, fitting channels is the
same as fitting a 1×1 consumer's outputs; for k×k consumers it is the per-tap fit.

Groups the plan leaves whole are corrected too (``include_unpruned``): their inputs have
drifted as well, and the edit stays a weight edit, with no change in shape or MACs.

An inner group's consumers all read the same tensor, so one fit at its first consumer serves
them all. A coupled group (a residual stream) is read by each consumer at a different depth, as
a different sum over the residual adds; so each consumer is a fitting unit of its own, re-fitted
in forward order on what it reads in the pruned model against what it read in the original, and
its fit goes into ``GroupDecision.per_consumer``. An SE-gated chain is fitted the same way, per
consumer: ``fc1`` on the pooled channels it reads (one position per image, so its fit leans on
the dims ridge and stays close to the strategy's compensation), then the project conv on the
gated maps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from autodfp._modes import eval_mode
from autodfp.compress.reconstruct import Compensation, blockwise, fit_drift
from autodfp.config import DEFAULTS
from autodfp.errors import PlanError

if TYPE_CHECKING:  # pragma: no cover
    from autodfp.compress.surgery import GroupDecision, Pruner


def _positions(
    x: torch.Tensor, channels: int, max_positions: int, seed: int, channels_last: bool = False
) -> torch.Tensor | None:
    """(P, C) samples of a consumer input, or None when its layout is not (N, C[, H, W]) (or, for
    a Linear consumer, ``channels_last``, (N, …, C))."""
    if x.dim() == 2 and x.shape[1] == channels:
        flat = x.detach()
    elif channels_last and x.dim() > 2 and x.shape[-1] == channels:
        flat = x.detach().reshape(-1, channels)
    elif not channels_last and x.dim() == 4 and x.shape[1] == channels:
        flat = x.detach().transpose(0, 1).reshape(channels, -1).t()
    else:
        return None
    if flat.shape[0] > max_positions:
        gen = torch.Generator().manual_seed(seed)
        flat = flat[torch.randperm(flat.shape[0], generator=gen).to(flat.device)[:max_positions]]
    return flat.cpu().to(torch.float64)  # the fits run in float64 on the CPU, wherever the forward ran


def _full_decision(pruner: Pruner, name: str, decisions: dict[str, GroupDecision]) -> GroupDecision:
    from autodfp.compress.surgery import GroupDecision

    if name in decisions:
        return decisions[name]
    c = pruner.graph.get(name).channels
    return GroupDecision(
        torch.arange(c),
        torch.zeros(0, dtype=torch.long),
        Compensation(torch.zeros(0, c, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)),
    )


#: the dims ridge of searches, bench and proxy-check, and of prunes given ``--refine-dims-ridge``
DEFAULT_DIMS_RIDGE = DEFAULTS.search_dims_ridge


class Refiner:
    """Re-fits decisions on a fixed batch; the original model's activations are captured once.

    A search that refines every episode's plan would otherwise pay a forward pass of the original
    model each time. ``inputs`` is processed as one batch: the fit of a group must see the pruned
    model up to that group, so the batch cannot be split into independent chunks.

    The ridge of a group's fit is ``ridge + dims_ridge × n_kept / n_positions`` (relative to the
    mean kept variance). The second term grows where a fit has many regressors for few samples
    (wide, low-resolution late layers of a 224-px model fitted on a small batch), which is where
    a least-squares fit on a few synthetic images overfits. Defaults from ``autodfp bench`` with
    ``--refine-ridge``/``--refine-dims-ridge`` (docs/RESULTS.md): at uniform 0.8 MobileNet-V1 goes
    from 40.2 % (dims_ridge 0) to 51.5 % (3), while ResNet-56 at 0.5 stays within one image.

    :param pruner: the model's pruner (its model is never modified)
    :param inputs: the refinement batch, (N, *input_shape)
    :param ridge: ridge relative to the mean kept variance
    :param max_positions: spatial positions sampled per layer for a fit
    :param include_unpruned: also correct groups the plan leaves whole (their inputs drift too)
    :param dims_ridge: the dimension-scaled ridge term
    :param device: where the forward passes run (a copy of the model lives there); fits stay on the CPU
    :param progress: a progress bar over the groups on stderr
    """

    def __init__(
        self,
        pruner: Pruner,
        inputs: torch.Tensor,
        ridge: float = DEFAULTS.refine_ridge,
        max_positions: int = DEFAULTS.refine_max_positions,
        include_unpruned: bool = True,
        dims_ridge: float = DEFAULT_DIMS_RIDGE,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> None:
        if ridge < 0 or dims_ridge < 0:
            raise PlanError(f"refine ridges must be non-negative, got {ridge} and {dims_ridge}")
        if inputs.dim() != len(pruner.input_shape) + 1 or tuple(inputs.shape[1:]) != pruner.input_shape:
            raise PlanError(
                f"refinement inputs must be (N, {', '.join(map(str, pruner.input_shape))}), got {tuple(inputs.shape)}"
            )
        self.pruner = pruner
        self.inputs = inputs
        self.ridge = float(ridge)
        self.dims_ridge = float(dims_ridge)
        self.max_positions = int(max_positions)
        self.include_unpruned = include_unpruned
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.progress = progress
        self._target: dict[str, torch.Tensor | None] | None = None
        self._work: nn.Module | None = None

    def _units(self, names: list[str]) -> list[tuple[str, str, str]]:
        """(key, group, consumer) fitting units: an inner group's first consumer, or each of a stream's."""
        units = []
        for n in names:
            g = self.pruner.graph.get(n)
            if g.coupled:
                units += [(f"{n}@{c}", n, c) for c in g.consumers]
            else:
                units.append((n, n, g.consumers[0]))
        return units

    def _sample(self, key: str, x: torch.Tensor) -> torch.Tensor | None:
        name, _, cons = key.partition("@")
        prunable = [g.name for g in self.pruner.graph.prunable]
        order = prunable.index(name)
        g = self.pruner.graph.get(name)
        linear = isinstance(self.pruner.model.get_submodule(cons or g.consumers[0]), nn.Linear)
        if cons:  # a stream consumer: seeds after every group's own
            order = len(prunable) + [u[0] for u in self._units(prunable)].index(key)
            if x.dim() >= 2:  # the group's part of the input (all of it, unless a concat)
                cols = slice(g.offset(cons), g.offset(cons) + g.channels)
                x = x[..., cols] if linear else x[:, cols]
        return _positions(x, g.channels, self.max_positions, seed=order, channels_last=linear)

    @torch.no_grad()
    def targets(self) -> dict[str, torch.Tensor | None]:
        """What every fitting unit's consumer sees in the original model (sampled), by unit key."""
        if self._target is None:
            target: dict[str, torch.Tensor | None] = {}
            names = [g.name for g in self.pruner.graph.prunable]

            def capture(name: str):
                def hook(mod: nn.Module, args: tuple) -> None:
                    if name not in target:
                        target[name] = self._sample(name, args[0])

                return hook

            model = self._work_model()  # holds the original's weights between calls
            handles = [
                model.get_submodule(cons).register_forward_pre_hook(capture(key)) for key, _, cons in self._units(names)
            ]
            try:
                with eval_mode(model):  # targets are the deployed (running-statistics) model's activations
                    model(self.inputs.to(self.device))
            finally:
                for h in handles:
                    h.remove()
            self._target = target
        return self._target

    @torch.no_grad()
    def __call__(
        self,
        decisions: dict[str, GroupDecision],
        dims_ridge: float | None = None,
    ) -> dict[str, GroupDecision]:
        """Decisions whose compensations also absorb the drift of earlier groups (see module doc).

        Groups whose consumer input is not (N, C[, H, W]) keep their decision unchanged.
        ``dims_ridge`` overrides the refiner's own for this call (:func:`select_dims_ridge`).
        """
        dims_ridge = self.dims_ridge if dims_ridge is None else float(dims_ridge)
        if dims_ridge < 0:
            raise PlanError(f"refine ridges must be non-negative, got dims_ridge {dims_ridge}")
        pruner = self.pruner
        names = [g.name for g in pruner.graph.prunable if self.include_unpruned or g.name in decisions]
        if not names:
            return dict(decisions)
        target = self.targets()
        # a masked copy of the pruned model, re-fitted group by group as the forward pass arrives
        work = self._work_model()
        originals = {n: v for n, v in list(pruner.model.named_parameters()) + list(pruner.model.named_buffers())}

        touched: set[str] = set()

        from autodfp.compress.surgery import set_tensor  # surgery imports this module

        def write(edits: Mapping[str, torch.Tensor | None]) -> None:
            for tname, value in edits.items():
                set_tensor(work, tname, value)
                touched.add(tname)

        write(pruner.masked_state(decisions))
        refined: dict[str, GroupDecision] = dict(decisions)
        done: set[str] = set()

        def refit(key: str, name: str, cons: str):
            def hook(mod: nn.Module, args: tuple) -> None:
                if key in done:
                    return
                done.add(key)
                want = target.get(key)
                have = self._sample(key, args[0])
                if want is None or have is None:
                    return
                dec = refined[name] if name in refined else _full_decision(pruner, name, decisions)
                comp = dec.for_consumer(cons)
                if comp is None:  # strategy "none": start from "pruned channels contribute nothing"
                    comp = Compensation(
                        torch.zeros(dec.pruned.numel(), dec.kept.numel(), dtype=torch.float64),
                        torch.zeros(dec.pruned.numel(), dtype=torch.float64),
                    )
                group = pruner.graph.get(name)
                if group.blockwise:  # a grouped conv reads them: one fit per conv group

                    def one(idx, k, p, kpos, ppos, w=want, h=have, base=comp) -> Compensation:
                        r = self.ridge + dims_ridge * k.numel() / h.shape[0]
                        return fit_drift(w[:, idx], h[:, idx], base.restrict(ppos, kpos), k, p, r)

                    fit = blockwise(group.granularity, group.channels, dec.kept, dec.pruned, one)
                else:
                    ridge = self.ridge + dims_ridge * dec.kept.numel() / have.shape[0]
                    fit = fit_drift(want, have, comp, dec.kept, dec.pruned, ridge)
                if "@" in key:  # one consumer of a stream
                    new = type(dec)(dec.kept, dec.pruned, dec.compensation, {**(dec.per_consumer or {}), cons: fit})
                else:
                    new = type(dec)(dec.kept, dec.pruned, fit)
                refined[name] = new
                write(pruner.masked_state(refined, only=[name]))
                if bar is not None:
                    bar.update(1)

            return hook

        units = self._units(names)
        bar = None
        if self.progress:
            from autodfp._progress import progress_bar

            bar = progress_bar(total=len(units), desc="refinement", unit="layer")

        handles = [
            work.get_submodule(cons).register_forward_pre_hook(refit(key, name, cons)) for key, name, cons in units
        ]
        try:
            work(self.inputs.to(self.device))
        finally:
            if bar is not None:
                bar.close()
            for h in handles:
                h.remove()
            # the copy is reused: restore it (a bias the refinement added goes away again)
            write({n: (originals[n].detach() if n in originals else None) for n in list(touched)})
        return refined

    def _work_model(self) -> nn.Module:
        """A copy of the original on :attr:`device`; each call edits it and then restores it."""
        if self._work is None:
            self._work = copy.deepcopy(self.pruner.model).to(self.device).eval()
        return self._work


#: dims ridges the final refinement chooses among (:func:`select_dims_ridge`): log-spaced around the
#: fixed default of 3, which stays what searches score their candidates with.
DIMS_RIDGE_GRID = DEFAULTS.dims_ridge_grid


def select_dims_ridge(
    refiner: Refiner,
    decisions: dict[str, GroupDecision],
    score: Callable[[dict[str, GroupDecision]], float],
    grid: Sequence[float] = DIMS_RIDGE_GRID,
) -> tuple[float, dict[str, GroupDecision], dict[float, float]]:
    """Refine with every dims ridge in ``grid`` and keep the one ``score`` rates highest.

    How much a fit should be shrunk depends on the plan (how many channels each layer keeps) and on
    how far the refinement batch is from real data, so no single value suits every plan. ``score``
    must judge the refined model on inputs the fit did not see: the CLI uses the search reward,
    whose synthetic batch (seed ``s``) is apart from the refinement batch (seed ``s + 1``), so the
    choice stays data-free. On MobileNet-V1's searched plan at 0.66× MACs the reward's first choice
    (10) was also real top-1's, 0.6 points above the fixed default of 3 (docs/RESULTS.md). Returns
    ``(chosen, refined decisions, scores)``; ties keep the earlier (smaller) value.
    """
    if not grid:
        raise PlanError("the dims-ridge grid is empty")
    scores: dict[float, float] = {}
    best: tuple[float, dict[str, GroupDecision]] | None = None
    for value in grid:
        refined = refiner(decisions, dims_ridge=value)
        scores[float(value)] = float(score(refined))
        if best is None or scores[float(value)] > scores[best[0]]:
            best = (float(value), refined)
    assert best is not None
    return best[0], best[1], scores


def refine(
    pruner: Pruner,
    decisions: dict[str, GroupDecision],
    inputs: torch.Tensor,
    ridge: float = DEFAULTS.refine_ridge,
    max_positions: int = DEFAULTS.refine_max_positions,
    include_unpruned: bool = True,
    dims_ridge: float = DEFAULT_DIMS_RIDGE,
) -> dict[str, GroupDecision]:
    """One-shot :class:`Refiner`: decisions re-fitted on ``inputs`` (synthetic by default upstream)."""
    return Refiner(pruner, inputs, ridge, max_positions, include_unpruned, dims_ridge)(decisions)


__all__ = ["DEFAULT_DIMS_RIDGE", "DIMS_RIDGE_GRID", "Refiner", "refine", "select_dims_ridge"]
