"""Pruning plans: what to keep in each group and how to reconstruct, as plain JSON.

A plan is the contract between the search (agent, uniform, random) and the surgery: it says
nothing about *how* it was found, so a plan found once can be re-applied, edited by hand, or
shipped next to a pruned checkpoint to rebuild it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autodfp._io import atomic_write_text
from autodfp.compress.criteria import criterion_names
from autodfp.compress.reconstruct import strategy_names
from autodfp.config import DEFAULTS
from autodfp.errors import PlanError
from autodfp.analysis.graph import GroupGraph



def n_keep(channels: int, ratio: float) -> int:
    """Channels kept at a preserved ``ratio``: rounded half up, so 0.97 of 48 keeps 47."""
    return int(math.floor(channels * ratio + 0.5))


@dataclass
class Plan:
    """Per-group preserved ratios plus a selection criterion and a reconstruction strategy.

    ``layer_params`` overrides strategy parameters per group (the agent's per-layer strength λ);
    ``keep`` optionally pins exact channel indices for a group (tests, hand-made plans).
    """

    ratios: dict[str, float]
    criterion: str = DEFAULTS.criterion
    strategy: str = DEFAULTS.strategy
    params: dict[str, Any] = field(default_factory=dict)
    layer_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep: dict[str, list[int]] = field(default_factory=dict)
    model: str | None = None

    @classmethod
    def uniform(cls, graph: GroupGraph, ratio: float, **kw: Any) -> "Plan":
        return cls(ratios={g.name: float(ratio) for g in graph.prunable}, **kw)

    def params_for(self, group: str) -> dict[str, Any]:
        return {**self.params, **self.layer_params.get(group, {})}

    def check_names(self) -> None:
        """The criterion and strategy exist (checked before a model is even loaded)."""
        if self.criterion not in criterion_names():
            raise PlanError(f"unknown criterion '{self.criterion}'; choose from {', '.join(criterion_names())}")
        if self.strategy not in strategy_names():
            raise PlanError(f"unknown strategy '{self.strategy}'; choose from {', '.join(strategy_names())}")

    def validate(self, graph: GroupGraph) -> None:
        self.check_names()
        known = {g.name: g for g in graph.groups}
        for name, ratio in self.ratios.items():
            if name not in known:
                prunable = ", ".join(g.name for g in graph.prunable[:4])
                raise PlanError(f"unknown group '{name}' in plan; prunable groups include {prunable}…")
            g = known[name]
            if not g.prunable:
                raise PlanError(f"group '{name}' cannot be pruned: {g.reason}")
            if not isinstance(ratio, (int, float)) or not (0.0 < float(ratio) <= 1.0):
                raise PlanError(f"preserved ratio for '{name}' must be in (0, 1], got {ratio!r}")
            if n_keep(g.channels, float(ratio)) < 1:
                raise PlanError(
                    f"ratio {ratio} for '{name}' would remove the whole layer ({g.channels} channels); "
                    f"the smallest usable ratio there is {0.5 / g.channels + 1e-9:.4f}"
                )
        for name, idx in self.keep.items():
            if name not in self.ratios:
                raise PlanError(f"'keep' names group '{name}' that has no ratio in the plan")
            c = known[name].channels
            if len(set(idx)) != len(idx) or any(not (0 <= i < c) for i in idx):
                raise PlanError(f"'keep' for '{name}' must be distinct indices in [0, {c})")
            if len(idx) != n_keep(c, self.ratios[name]):
                raise PlanError(f"'keep' for '{name}' lists {len(idx)} channels but the ratio keeps "
                                f"{n_keep(c, self.ratios[name])}")
        for name in self.layer_params:
            if name not in self.ratios:
                raise PlanError(f"'layer_params' names group '{name}' that has no ratio in the plan")

    def to_dict(self) -> dict[str, Any]:
        groups = {}
        for name, r in self.ratios.items():
            entry: dict[str, Any] = {"ratio": r}
            entry.update(self.layer_params.get(name, {}))
            if name in self.keep:
                entry["keep"] = list(self.keep[name])
            groups[name] = entry
        return {"format": "autodfp.plan/1", "model": self.model, "criterion": self.criterion,
                "strategy": self.strategy, "params": self.params, "groups": groups}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict) or not isinstance(d.get("groups"), dict):
            raise PlanError("a plan must be a JSON object with a 'groups' mapping")
        ratios, layer_params, keep = {}, {}, {}
        for name, entry in d["groups"].items():
            if isinstance(entry, (int, float)):
                entry = {"ratio": entry}
            if not isinstance(entry, dict) or "ratio" not in entry:
                raise PlanError(f"group '{name}' in plan needs a 'ratio'")
            entry = dict(entry)
            ratios[name] = entry.pop("ratio")
            if "keep" in entry:
                keep[name] = [int(i) for i in entry.pop("keep")]
            if entry:
                layer_params[name] = entry
        return cls(ratios=ratios, criterion=d.get("criterion", DEFAULTS.criterion),
                   strategy=d.get("strategy", DEFAULTS.strategy),
                   params=dict(d.get("params") or {}), layer_params=layer_params, keep=keep, model=d.get("model"))

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
