"""The final choice: refined, unrefined or uncompensated, for the whole plan and then group by group.

Compensation (``lsq``) and refinement are fits on synthetic statistics. Where those statistics
miss how a block behaves on real data (a squeeze-and-excitation gate, a detector head whose
objectness logits the refinement drives far above the original's), a fit can do more harm than the
error it corrects. So the last step scores the alternatives and keeps the best, in two passes:

1. **Globally** (:func:`final_choice`): the plan refined, unrefined (the strategy's own
   compensation) and uncompensated; two reward calls beyond the refined score the dims-ridge
   choice already has. Ties keep the fit (candidates are scored in that order).
2. **Per group** (``per_group=True``): starting from the global choice, each prunable group in
   turn, in forward order, tries its other variants (at most two) with every other group as it
   stands, and keeps one only where the score rises. The harm is often local (one head's fit, one
   SE chain) while the fits elsewhere pay; a per-model choice must then keep all or nothing. It
   costs at most two reward calls per group, and can only raise the score the global choice had
   on the same inputs (each switch is accepted only if it does).

Every score is taken on inputs no fit used (:func:`held_apart`): the fits are the calibration
(correlations for ``lsq``) and the refinement, on batch ``seed + refine_seed_offset``; the
reward's synthetic batch uses ``seed``. They are disjoint by default. They can overlap when the
caller makes them so (``refine_seed_offset=0`` with an explicit ``synth_steps``, or an
``unlabeled:DIR`` reward on the directory ``refine_data`` fits on, when it holds too few images
for both); then the rows the fits used are dropped from the score, and a warning says how many.
A score on the fit's own inputs flatters the fit: it is the fit's training error.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from autodfp.compress.plan import Plan
    from autodfp.compress.surgery import GroupDecision, Pruner

log = logging.getLogger("autodfp")

#: the candidates of the global choice, in the order ties are broken (the first wins)
CANDIDATES = ("refined", "unrefined", "uncompensated")

Decisions = dict[str, "GroupDecision"]


@dataclasses.dataclass
class FinalChoice:
    """What the final choice kept and why.

    :param step: the global choice, one of :data:`CANDIDATES`
    :param decisions: the decisions to apply (the global choice with the per-group switches)
    :param scores: the global candidates' scores
    :param groups: per group switched away from ``step``: ``{"chosen": label, "gain": score gain}``
    :param score: the final decisions' score (``scores[step]`` plus every accepted gain)
    :param reward_calls: reward calls this step made (the refined score is passed in, not called)
    :param held_apart: scoring inputs no fit used, and the scoring batch's size (``None``: unknown,
        a reward whose inputs are not visible, such as a user's callable)
    """

    step: str
    decisions: Decisions
    scores: dict[str, float]
    groups: dict[str, dict[str, Any]]
    score: float
    reward_calls: int
    held_apart: tuple[int, int] | None = None

    @property
    def uses_refinement(self) -> bool:
        """Whether any group keeps its refined decision."""
        return self.step == "refined" or any(g["chosen"] == "refined" for g in self.groups.values())

    @property
    def uncompensated(self) -> bool:
        """Whether every group is the bare, uncompensated prune (the plan with strategy ``none``)."""
        return self.step == "uncompensated" and not self.groups

    def report(self) -> dict[str, Any]:
        """The report's entries: the global step, its scores, the per-group switches, the cost."""
        out: dict[str, Any] = {
            "final_step": self.step,
            "final_step_scores": dict(self.scores),
            "final_choice_groups": {k: dict(v) for k, v in self.groups.items()},
            "final_choice_score": self.score,
            "final_choice_reward_calls": self.reward_calls,
        }
        if self.held_apart is not None:
            out["final_choice_held_apart"] = list(self.held_apart)
        return out


def _fingerprints(x: torch.Tensor) -> torch.Tensor:
    """One float64 per row: a fixed random projection, equal for equal rows."""
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64).cpu()
    w = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return flat @ w


def _identity(d: GroupDecision | None) -> bool:
    """Whether a group's decision leaves the model as it is: none, or nothing pruned and no
    kept-channel correction (a group at ratio 1 that no refinement touched)."""
    if d is None:
        return True
    comps = [d.compensation] + list((d.per_consumer or {}).values())
    return d.pruned.numel() == 0 and all(c is None or c.K is None for c in comps)


def held_apart(inputs: torch.Tensor, fit_batches: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """A mask over ``inputs``: True for each row that appears in none of ``fit_batches``.

    Rows are matched exactly (a projection finds candidates, :func:`torch.equal` confirms), so a
    batch and its prefix (the calibration inputs are the refinement's first ones) match, and two
    distillations of one seed with different steps do not.

    :param inputs: the scoring batch ``(N, ...)``
    :param fit_batches: the batches fits were made on (``None`` entries are skipped)
    """
    keep = torch.ones(inputs.shape[0], dtype=torch.bool)
    fp = _fingerprints(inputs)
    for batch in fit_batches:
        if batch is None or batch.shape[1:] != inputs.shape[1:] or batch.shape[0] == 0:
            continue
        other = _fingerprints(batch)
        for i in range(inputs.shape[0]):
            if not keep[i]:
                continue
            for j in torch.nonzero(other == fp[i]).flatten().tolist():
                if torch.equal(inputs[i].cpu(), batch[j].cpu()):
                    keep[i] = False
                    break
    return keep


def held_apart_reward(
    reward_fn: Callable[[nn.Module], float],
    fit_batches: Sequence[torch.Tensor | None],
    original: nn.Module,
) -> tuple[Callable[[nn.Module], float], tuple[int, int] | None]:
    """``reward_fn`` scored on its rows that no fit used, and (rows kept, rows in all).

    An :class:`~autodfp.search.rewards.AgreementReward` whose batch shares rows with a fit batch
    is rebuilt on the other rows (one forward pass of ``original``); when every row is shared, it
    is kept as it is, with a warning, since no held-apart score exists. Any other reward (a
    user's callable, a labelled loader) is returned unchanged: its inputs are not the pipeline's.

    :param reward_fn: the pipeline's reward
    :param fit_batches: the calibration and refinement batches
    :param original: the unpruned model (the reference of a rebuilt reward)
    """
    from autodfp.search.rewards import AgreementReward

    if not isinstance(reward_fn, AgreementReward):
        return reward_fn, None
    keep = held_apart(reward_fn.inputs, fit_batches)
    n, kept = int(keep.numel()), int(keep.sum())
    if kept == n:
        return reward_fn, (n, n)
    if kept == 0:
        log.warning(
            "final choice: all %d scoring inputs are also fit inputs (refine_seed_offset / refine_data): "
            "the choice is scored on the fit's own inputs and will favour the fit",
            n,
        )
        return reward_fn, (0, n)
    log.warning("final choice: %d of %d scoring inputs are also fit inputs; scoring on the other %d", n - kept, n, kept)
    rebuilt = AgreementReward(
        original,
        reward_fn.inputs[keep],
        measure=reward_fn.measure,
        temperature=reward_fn.temperature,
        label_offset=reward_fn.label_offset,
        batch_size=reward_fn.batch_size,
        output_kinds=None if reward_fn.kinds is None else list(reward_fn.kinds.values()),
        tail=reward_fn.tail,
    )
    return rebuilt, (kept, n)


def decision_scorer(
    pruner: Pruner, reward_fn: Callable[[nn.Module], float], base: nn.Module
) -> Callable[[Decisions], float]:
    """``score(decisions)``: the reward of the original with the decisions' tensors substituted
    (:class:`~autodfp.search.env.MaskedModel`), so no candidate is physically pruned to be scored.

    :param pruner: the model's pruner
    :param reward_fn: higher is better
    :param base: the original on the reward's device
    """
    from autodfp.search.env import MaskedModel

    def score(d: Decisions) -> float:
        return float(reward_fn(MaskedModel(base, pruner.masked_state(d))))

    return score


def final_choice(
    pruner: Pruner,
    plan: Plan,
    decisions: Decisions,
    refined: Decisions | None,
    refined_score: float | None,
    score: Callable[[Decisions], float],
    per_group: bool = True,
    held: tuple[int, int] | None = None,
) -> FinalChoice:
    """Keep the plan refined, unrefined or uncompensated, whichever ``score`` rates best, then
    switch single groups to another variant where that raises the score (module doc).

    :param pruner: the model's pruner
    :param plan: the plan (its ``strategy="none"`` copy gives the uncompensated decisions)
    :param decisions: the strategy's decisions, unrefined
    :param refined: the refined decisions, or ``None`` without refinement
    :param refined_score: ``refined``'s score when already known (the dims-ridge choice), else scored
    :param score: higher is better, on inputs no fit used (:func:`decision_scorer`, :func:`held_apart_reward`)
    :param per_group: run the per-group pass after the global choice
    :param held: what :func:`held_apart_reward` found, for the report
    """
    calls = 0

    def scored(d: Decisions) -> float:
        nonlocal calls
        calls += 1
        return float(score(d))

    bare = pruner.decide(dataclasses.replace(plan, strategy="none"))
    variants: dict[str, Decisions] = {}
    if refined is not None:
        variants["refined"] = refined
    variants["unrefined"] = decisions
    variants["uncompensated"] = bare
    scores: dict[str, float] = {}
    best = next(iter(variants))
    for label, d in variants.items():
        known = refined_score if label == "refined" else None
        scores[label] = known if known is not None else scored(d)
        if scores[label] > scores[best]:
            best = label
    current = dict(variants[best])
    current_score = scores[best]
    log.info("final step by reward: " + ", ".join(f"{k} → {v:.4f}" for k, v in scores.items()) + f"; chose {best}")
    switched: dict[str, dict[str, Any]] = {}
    if per_group:
        for g in pruner.graph.prunable:
            name = g.name
            tried = [current.get(name)]
            for label, d in variants.items():
                alt = d.get(name)
                if label == best or any(alt is t or (_identity(alt) and _identity(t)) for t in tried):
                    continue  # the same decision (a group no fit touched): nothing to score
                tried.append(alt)
                trial = dict(current)
                if alt is None:
                    trial.pop(name, None)
                else:
                    trial[name] = alt
                s = scored(trial)
                if s > current_score:
                    prev = switched.get(name, {}).get("gain", 0.0)
                    switched[name] = {"chosen": label, "gain": prev + s - current_score}
                    current, current_score = trial, s
            if name in switched and switched[name]["chosen"] == best:  # switched, then back
                switched.pop(name)
        if switched:
            log.info(
                "final choice per group: "
                + ", ".join(f"{k} → {v['chosen']} (+{v['gain']:.4f})" for k, v in switched.items())
                + f"; score {scores[best]:.4f} → {current_score:.4f} in {calls} reward calls"
            )
    return FinalChoice(best, current, scores, switched, current_score, calls, held)


__all__ = ["CANDIDATES", "FinalChoice", "decision_scorer", "final_choice", "held_apart", "held_apart_reward"]
