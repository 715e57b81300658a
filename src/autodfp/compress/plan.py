"""Pruning plans: what to keep in each group and how to reconstruct, as plain JSON.

A plan is the contract between the search (agent, uniform, random) and the surgery: it says
nothing about *how* it was found, so a plan found once can be re-applied, edited by hand, or
shipped next to a pruned checkpoint to rebuild it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autodfp._io import atomic_write_text
from autodfp._jsonio import read_json
from autodfp.analysis.graph import GroupGraph, PrunableGroup
from autodfp.compress.criteria import criterion_names
from autodfp.compress.reconstruct import strategy_names
from autodfp.config import DEFAULTS
from autodfp.errors import PlanError, printable


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


#: The plan format :meth:`Plan.to_dict` writes; a plan naming another one is refused.
PLAN_FORMAT = "autodfp.plan/1"
#: Every top-level field of a plan. Anything else (a misspelt ``"stratgy"``) is refused, not ignored:
#: a hand-edited plan whose edit silently does nothing would prune with the defaults instead.
_PLAN_FIELDS = ("format", "model", "criterion", "strategy", "params", "groups")
#: The largest int a float can hold; a larger one is no usable ratio or strength.
_FLOAT_MAX = int(sys.float_info.max)


def _is_number(v: Any) -> bool:
    """A finite real that a float can hold, never a bool. An ``int`` past a float's range (400
    digits) is refused here, where ``math.isfinite`` or the surgery's ``float()`` would raise
    ``OverflowError``."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return abs(v) <= _FLOAT_MAX
    return isinstance(v, float) and math.isfinite(v)


def _is_integer(v: Any) -> bool:
    """An int that fits 64 bits (seeds, counts), never a bool."""
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**64


def _show(v: Any) -> str:
    """``v`` as a short JSON-like text for a message, whatever it is (a huge int, a deep list)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**30:
        return f"an integer of about {int(abs(v).bit_length() * 0.30103) + 1} digits"
    if isinstance(v, (list, tuple)):
        return f"a list of {len(v)} items" if v else "[]"
    if isinstance(v, dict):
        return f"an object of {len(v)} keys" if v else "{}"
    try:
        text = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
    except (ValueError, TypeError):  # e.g. a float subclass whose repr fails
        text = type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _check_params(params: dict[str, Any], where: str) -> None:
    for key, value in params.items():
        if not isinstance(key, str):
            raise PlanError(f"parameter names in {where} must be strings, got {_show(key)}")
        want = _PARAM_TYPES.get(key)
        ok = {
            None: value is None or isinstance(value, (str, bool)) or _is_number(value),
            "number": _is_number(value),
            "number or null": value is None or _is_number(value),
            "boolean": isinstance(value, bool),
            "string": isinstance(value, str),
            "integer": _is_integer(value),
        }[want]
        if not ok:
            raise PlanError(
                f"parameter '{printable(key)[:40]}' in {where} must be a {want or 'finite JSON scalar'}, got {_show(value)}"
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

    def check_model(self, name: str) -> None:
        """Refuse a plan recorded for another model than ``name``, the model about to be pruned.

        Group names alone cannot tell two models apart: ResNet-20's groups are a subset of
        ResNet-56's, so a ResNet-20 plan applied to ResNet-56 validated and pruned 9 of its 27
        groups without a word. A plan that records no model (``null``, a hand-made plan) is applied
        as it is; its group names are still checked by :meth:`validate`.
        """
        if self.model is not None and self.model != name:
            raise PlanError(
                f"the plan was made for model '{printable(self.model)}', not '{name}'; to apply it to '{name}' "
                f'anyway, set the plan\'s "model" field to "{name}" (or to null)'
            )

    def validate(self, graph: GroupGraph) -> None:
        """Check the plan against the model's groups: names, ratios, pinned channels, per-group params."""
        self.check_names()
        known = {g.name: g for g in graph.groups}
        unknown = [name for name in self.ratios if name not in known]
        if unknown:
            shown = ", ".join(f"'{n}'" for n in unknown[:3]) + (
                f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            )
            prunable = ", ".join(g.name for g in graph.prunable[:4])
            raise PlanError(
                f"unknown group{'s' if len(unknown) > 1 else ''} {shown} in plan (a plan for another model?); "
                f"prunable groups include {prunable}…"
            )
        for name, ratio in self.ratios.items():
            g = known[name]
            if not g.prunable:
                raise PlanError(f"group '{name}' cannot be pruned: {g.reason}")
            if not _is_number(ratio) or not (0.0 < float(ratio) <= 1.0):
                raise PlanError(f"preserved ratio for '{name}' must be in (0, 1], got {_show(ratio)}")
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
    def from_dict(cls, d: Any) -> Plan:
        """Read a plan from parsed JSON, checking every field's type.

        Plans are edited by hand and shipped inside pruned checkpoints, so a wrong type must be a
        PlanError naming the field here, not a TypeError deep inside the surgery. ``true`` is a
        number to Python but never a ratio, index or strength, so booleans are refused explicitly.
        Any value at all (the result of parsing any JSON document) gives a :class:`Plan` or a
        :class:`PlanError`: ratios are finite reals in (0, 1], names are strings, and an unknown
        top-level field is refused (a misspelt field would otherwise be silently ignored).
        """
        if not isinstance(d, dict) or not isinstance(d.get("groups"), dict):
            raise PlanError("a plan must be a JSON object with a 'groups' mapping")
        extra = [k for k in d if k not in _PLAN_FIELDS]
        if extra:
            odd = f"'{printable(extra[0])[:40]}'" if isinstance(extra[0], str) else _show(extra[0])
            raise PlanError(f"unknown plan field {odd}; a plan has {', '.join(_PLAN_FIELDS)}")
        if "format" in d and d["format"] != PLAN_FORMAT:
            raise PlanError(f"plan field 'format' must be \"{PLAN_FORMAT}\", got {_show(d['format'])}")
        for key in ("criterion", "strategy"):
            if key in d and not isinstance(d[key], str):
                raise PlanError(f"plan field '{key}' must be a string, got {_show(d[key])}")
        if d.get("model") is not None and not isinstance(d["model"], str):
            raise PlanError(f"plan field 'model' must be a string, got {_show(d['model'])}")
        params = d.get("params") or {}
        if not isinstance(params, dict):
            raise PlanError(f"plan field 'params' must be an object, got {_show(params)}")
        _check_params(params, "'params'")
        ratios: dict[str, float] = {}
        layer_params: dict[str, dict[str, Any]] = {}
        keep: dict[str, list[int]] = {}
        for name, entry in d["groups"].items():
            if not isinstance(name, str) or not name or not name.isprintable():
                # a group is a module path: a control character cannot be one, and would break a message
                raise PlanError(f"group names in a plan must be non-empty printable strings, got {_show(name)}")
            if isinstance(entry, (int, float)) and not isinstance(entry, bool):  # a bare ratio, checked below
                entry = {"ratio": entry}
            if not isinstance(entry, dict) or "ratio" not in entry:
                raise PlanError(f"group '{name}' in plan needs a 'ratio'")
            entry = dict(entry)
            ratio = entry.pop("ratio")
            if not _is_number(ratio):
                raise PlanError(f"ratio of group '{name}' must be a number, got {_show(ratio)}")
            if not 0.0 < ratio <= 1.0:
                raise PlanError(f"preserved ratio for '{name}' must be in (0, 1], got {_show(ratio)}")
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
        """Read a plan file through the bounded JSON reader (:func:`autodfp._jsonio.read_json`).

        A plan is user input: a document nested 100,000 levels deep or a ratio of 5,001 digits
        must be a one-line :class:`PlanError` naming the file, not a ``RecursionError``.
        """
        path = Path(path)
        data = read_json(path, f"plan file {path}", error=PlanError)
        try:
            return cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"plan file {path}: {exc}") from None
