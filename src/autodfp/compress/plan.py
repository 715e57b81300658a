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
from autodfp.analysis.graph import GroupGraph, PrunableGroup
from autodfp.compress.criteria import criterion_names
from autodfp.compress.reconstruct import strategy_names
from autodfp.config import DEFAULTS
from autodfp.errors import PlanError


def n_keep(channels: int, ratio: float) -> int:
    """Channels kept at a preserved ``ratio``: rounded half up, so 0.97 of 48 keeps 47."""
    return int(math.floor(channels * ratio + 0.5))


def kept_channels(group: PrunableGroup, ratio: float) -> int:
    """Channels a group keeps at a preserved ``ratio``.

    A ratio is a fraction of the group's :attr:`~PrunableGroup.units`: channels that a grouped
    conv produces or reads keep the same number in each of its conv groups, or the pruned conv
    would no longer split into equal groups.
    """
    return n_keep(group.units, ratio) * group.granularity


#: Types of the strategy parameters a plan may set (see autodfp.compress.reconstruct's strategies).
_PARAM_TYPES: dict[str, str] = {
    "strength": "number",
    "lam": "number",
    "threshold": "number",
    "ridge": "number",
    "max_distance": "number or null",
    "gate": "boolean",
    "slope": "string",
    "method": "string",
    "nodes": "integer",
    "n_samples": "integer",
    "seed": "integer",
    "chunk": "integer",
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _show(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (str, int, float, bool, list, dict, type(None))) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_params(params: dict[str, Any], where: str) -> None:
    for key, value in params.items():
        want = _PARAM_TYPES.get(key)
        ok = {
            None: isinstance(value, (str, int, float, bool, type(None)))
            and (not isinstance(value, float) or math.isfinite(value)),
            "number": _is_number(value),
            "number or null": value is None or _is_number(value),
            "boolean": isinstance(value, bool),
            "string": isinstance(value, str),
            "integer": isinstance(value, int) and not isinstance(value, bool),
        }[want]
        if not ok:
            raise PlanError(
                f"parameter '{key}' in {where} must be a {want or 'finite JSON scalar'}, got {_show(value)}"
            )


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
    def uniform(cls, graph: GroupGraph, ratio: float, **kw: Any) -> Plan:
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
            if n_keep(g.units, float(ratio)) < 1:
                per = f" per conv group, {g.granularity} groups" if g.granularity > 1 else ""
                raise PlanError(
                    f"ratio {ratio} for '{name}' would remove the whole layer ({g.units} channels{per}); "
                    f"the smallest usable ratio there is {0.5 / g.units + 1e-9:.4f}"
                )
        for name, idx in self.keep.items():
            if name not in self.ratios:
                raise PlanError(f"'keep' names group '{name}' that has no ratio in the plan")
            g = known[name]
            c = g.channels
            if len(set(idx)) != len(idx) or any(not (0 <= i < c) for i in idx):
                raise PlanError(f"'keep' for '{name}' must be distinct indices in [0, {c})")
            want = kept_channels(g, self.ratios[name])
            if len(idx) != want:
                raise PlanError(f"'keep' for '{name}' lists {len(idx)} channels but the ratio keeps {want}")
            per_group = [sum(1 for i in idx if i // g.units == k) for k in range(g.granularity)]
            if len(set(per_group)) > 1:
                raise PlanError(
                    f"'keep' for '{name}' must keep as many channels in each of its {g.granularity} conv groups "
                    f"(it keeps {per_group})"
                )
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
        return {
            "format": "autodfp.plan/1",
            "model": self.model,
            "criterion": self.criterion,
            "strategy": self.strategy,
            "params": self.params,
            "groups": groups,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Read a plan from parsed JSON, checking every field's type.

        Plans are edited by hand and shipped inside pruned checkpoints, so a wrong type must be a
        PlanError naming the field here, not a TypeError deep inside the surgery. ``true`` is a
        number to Python but never a ratio, index or strength, so booleans are refused explicitly.
        """
        if not isinstance(d, dict) or not isinstance(d.get("groups"), dict):
            raise PlanError("a plan must be a JSON object with a 'groups' mapping")
        for key in ("criterion", "strategy"):
            if key in d and not isinstance(d[key], str):
                raise PlanError(f"plan field '{key}' must be a string, got {_show(d[key])}")
        if d.get("model") is not None and not isinstance(d["model"], str):
            raise PlanError(f"plan field 'model' must be a string, got {_show(d['model'])}")
        params = d.get("params") or {}
        if not isinstance(params, dict):
            raise PlanError(f"plan field 'params' must be an object, got {_show(params)}")
        _check_params(params, "'params'")
        ratios, layer_params, keep = {}, {}, {}
        for name, entry in d["groups"].items():
            if _is_number(entry):
                entry = {"ratio": entry}
            if not isinstance(entry, dict) or "ratio" not in entry:
                raise PlanError(f"group '{name}' in plan needs a 'ratio'")
            entry = dict(entry)
            ratio = entry.pop("ratio")
            if not _is_number(ratio):
                raise PlanError(f"ratio of group '{name}' must be a number, got {_show(ratio)}")
            ratios[name] = ratio
            if "keep" in entry:
                idx = entry.pop("keep")
                if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
                    raise PlanError(f"'keep' of group '{name}' must be a list of channel indices, got {_show(idx)}")
                keep[name] = list(idx)
            _check_params(entry, f"group '{name}'")
            if entry:
                layer_params[name] = entry
        return cls(
            ratios=ratios,
            criterion=d.get("criterion", DEFAULTS.criterion),
            strategy=d.get("strategy", DEFAULTS.strategy),
            params=dict(params),
            layer_params=layer_params,
            keep=keep,
            model=d.get("model"),
        )

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PlanError(f"plan file {path} is not UTF-8 text") from None
        except OSError as exc:
            raise PlanError(f"cannot read plan file {path} ({exc.strerror or exc})") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except PlanError as exc:
            raise PlanError(f"plan file {path}: {exc}") from None
