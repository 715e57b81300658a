"""Every input autodfp reads is bounded and checked: any value gives a result or a one-line error.

Issue 25, items 8, 10, 11, 12, 16 and 17, each test named after the item it keeps fixed, and
property tests (hypothesis) that random JSON values, random bytes, random preprocessing records
and random :class:`~autodfp.config.Config` keywords never escape as anything but an
:class:`~autodfp.errors.AutoDFPError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autodfp._jsonio import parse_json
from autodfp.analysis.graph import find_groups
from autodfp.cli import main
from autodfp.compress.plan import Plan
from autodfp.config import Config
from autodfp.errors import AutoDFPError, CacheWarning, DataError, PlanError, WeightsError
from autodfp.models.resnet_cifar import resnet20

R20, R56 = "resnet20_cifar10", "resnet56_cifar10"
ARCH = "autodfp.models.resnet_cifar:resnet20"
CIFAR = (3, 32, 32)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    return text


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the CLI in-process; the exit code and its stderr."""
    code = main(list(args))
    return code, capsys.readouterr().err


def _assert_refused(code: int, err: str, needle: str) -> None:
    """Exit 2 with exactly one ``error:`` line, the last, holding ``needle``; no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1 and lines[-1].startswith("error:"), err
    assert needle in lines[-1], lines[-1]


# ------------------------------------------------------------------------------------------------
# items 16/17: a plan (or any JSON) nested 100,000 deep, or holding a 5,001-digit number


def test_item16_a_plan_nested_100000_levels_is_a_plan_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"groups": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(PlanError, match="nested more than") as err:
        Plan.load(path)
    assert str(path) in _one_line(err.value)


def test_item17_a_ratio_of_5001_digits_is_a_plan_error(tmp_path: Path) -> None:
    path = tmp_path / "long.json"
    path.write_text('{"groups": {"layer1.0.conv1": ' + "9" * 5001 + "}}")
    with pytest.raises(PlanError, match="number of 5001 characters") as err:
        Plan.load(path)
    assert str(path) in _one_line(err.value)
    # from Python the same ratio is an int: refused, never an OverflowError
    with pytest.raises(PlanError, match="must be a number, got an integer of about 5001 digits") as err:
        Plan.from_dict({"groups": {"layer1.0.conv1": 10**5000}})
    _one_line(err.value)


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({"groups": {"a": 0.5}, "stratgy": "none"}, "unknown plan field 'stratgy'"),
        ({"groups": {"a": 0.5}, "format": "autodfp.plan/9"}, "'format' must be"),
        ({"groups": {"a": 1.5}}, "preserved ratio for 'a' must be in (0, 1]"),
        ({"groups": {"a": 0}}, "must be in (0, 1]"),
        ({"groups": {"a": -1e-300}}, "must be in (0, 1]"),
        ({"groups": {3: 0.5}}, "group names in a plan must be non-empty printable strings"),
        ({"groups": {"": 0.5}}, "non-empty printable strings"),
        ({"groups": {"a\nb": 0.5}}, "non-empty printable strings"),
        ({"groups": {"a": {"ratio": 0.5, 7: 1}}}, "parameter names in group 'a' must be strings"),
        ({"groups": {"a": 0.5}, "params": {"strength": 10**400}}, "'strength' in 'params'"),
        ({"groups": {"a": 0.5}, "params": {"strength": math.inf}}, "'strength' in 'params' must be a number"),
        ([1, 2], "a plan must be a JSON object"),
        (None, "a plan must be a JSON object"),
    ],
)
def test_item16_plan_fields_are_checked_strictly(doc: Any, needle: str) -> None:
    with pytest.raises(PlanError) as err:
        Plan.from_dict(doc)
    assert needle in _one_line(err.value)


def test_item16_a_plan_written_by_autodfp_still_round_trips(tmp_path: Path) -> None:
    graph = find_groups(resnet20().eval(), CIFAR)
    plan = Plan.uniform(graph, 0.5, model=R20, params={"strength": 0.5})
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json").to_dict() == plan.to_dict()


def test_item17_coco_annotations_are_read_bounded(tmp_path: Path) -> None:
    from autodfp.eval.detection import read_coco

    (tmp_path / "imgs").mkdir()
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested more than") as err:
        read_coco(deep, tmp_path / "imgs")
    _one_line(err.value)
    long = tmp_path / "long.json"
    long.write_text('{"images": [{"id": ' + "1" * 5001 + "}]}")
    with pytest.raises(DataError, match="number of 5001 characters"):
        read_coco(long, tmp_path / "imgs")
    with pytest.raises(DataError, match="COCO annotations not found"):
        read_coco(tmp_path / "missing.json", tmp_path / "imgs")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(DataError, match="is not a COCO instances json"):
        read_coco(listed, tmp_path / "imgs")


def test_item16_cli_deep_plan_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "deep.json"
    plan.write_text("[" * 100_000 + "]" * 100_000)
    out = tmp_path / "out"
    code, err = _cli(capsys, "prune", R20, "--plan", str(plan), "--no-refine", "--no-eval", "--out", str(out))
    _assert_refused(code, err, "nested more than")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# item 8: a plan for another model


@pytest.fixture(scope="module")
def r20_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A uniform plan saved for ResNet-20: its group names are a subset of ResNet-56's."""
    graph = find_groups(resnet20().eval(), CIFAR)
    path = tmp_path_factory.mktemp("plans") / "resnet20plan.json"
    Plan.uniform(graph, 0.5, model=R20).save(path)
    return path


def test_item8_plan_for_another_model_is_refused_by_the_api(r20_plan: Path) -> None:
    from autodfp import api

    with pytest.raises(PlanError) as err:
        api.prune(R56, plan=r20_plan, config=Config(refine=False), progress=False)
    msg = _one_line(err.value)
    assert f"'{R20}'" in msg and f"'{R56}'" in msg and '"model" field' in msg
    # a Plan object and its dict are checked the same way
    with pytest.raises(PlanError, match="made for model"):
        api.prune(R56, plan=Plan.load(r20_plan), config=Config(refine=False), progress=False)
    with pytest.raises(PlanError, match="made for model"):
        api.prune(R56, plan=Plan.load(r20_plan).to_dict(), config=Config(refine=False), progress=False)


def test_item8_plan_naming_groups_the_model_lacks_lists_them() -> None:
    from autodfp import api
    from autodfp.models import load_model

    graph56 = find_groups(load_model(R56)[0], CIFAR)
    plan = Plan.uniform(graph56, 0.5)  # records no model: judged by its groups alone
    with pytest.raises(PlanError) as err:
        api.prune(R20, plan=plan, config=Config(refine=False), progress=False)
    msg = _one_line(err.value)
    assert msg.startswith("unknown groups 'layer1.3.conv1', 'layer1.4.conv1', 'layer1.5.conv1' and "), msg


def test_item8_a_partial_plan_for_the_same_model_applies(tmp_path: Path) -> None:
    from autodfp import api

    plan = Plan({"layer1.0.conv1": 0.5}, model=R20)
    result = api.prune(R20, plan=plan, config=Config(refine=False), progress=False)
    assert result.plan.model == R20 and result.model.get_submodule("layer1.0.conv1").out_channels == 8


def test_item8_cli_refuses_a_plan_for_another_model(
    r20_plan: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, err = _cli(capsys, "prune", R56, "--plan", str(r20_plan), "--no-refine", "--no-eval", "--out", str(out))
    _assert_refused(code, err, f"the plan was made for model '{R20}', not '{R56}'")
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------------
# item 10: the recorded preprocessing and input shape of a re-sealed pruned.pt


@pytest.fixture(scope="module")
def pruned_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "o"
    code = main(["prune", R20, "--uniform", "0.5", "--no-refine", "--no-eval", "--out", str(out)])
    assert code == 0
    return out


def _reseal(src: Path, dst: Path, edit: Any) -> Path:
    """Copy the set, change pruned.pt's payload with ``edit(payload)`` and re-seal the manifest."""
    shutil.copytree(src, dst)
    payload = torch.load(dst / "pruned.pt", weights_only=True)
    edit(payload)
    torch.save(payload, dst / "pruned.pt")
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["pruned.pt"] = hashlib.sha256((dst / "pruned.pt").read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _set_pre(key: str, value: Any) -> Any:
    return lambda payload: payload["preprocessing"].__setitem__(key, value)


def _set(key: str, value: Any) -> Any:
    return lambda payload: payload.__setitem__(key, value)


BAD_RECORDS = [
    ("mean of one value", _set_pre("mean", [0.5]), "'mean' must be 3 finite numbers"),
    ("std of zeros", _set_pre("std", [0.0, 0.0, 0.0]), "'std' must be positive"),
    ("std negative", _set_pre("std", [0.2, -0.2, 0.2]), "'std' must be positive"),
    ("mean NaN", _set_pre("mean", [0.5, math.nan, 0.5]), "'mean' must be 3 finite numbers"),
    ("mean strings", _set_pre("mean", ["0.5", "0.5", "0.5"]), "'mean' must be 3 finite numbers"),
    ("mean of bools", _set_pre("mean", [True, False, True]), "'mean' must be 3 finite numbers"),
    ("input_size 0", _set_pre("input_size", 0), "'input_size' must be an integer in [1, 4096]"),
    ("input_size huge", _set_pre("input_size", 2**20), "'input_size' must be an integer in [1, 4096]"),
    ("input_size a float", _set_pre("input_size", 32.0), "'input_size' must be an integer"),
    ("resize below the crop", _set_pre("resize", 16), "'resize' must be an integer in [32, 4096]"),
    ("interpolation", _set_pre("interpolation", "cubic"), "'interpolation' must be one of"),
    ("input_hw", _set_pre("input_hw", [0, 5]), "'input_hw' must be an integer"),
    ("unknown entry", _set_pre("gamma", 2.2), "unknown entry 'gamma'"),
    ("preprocessing a list", _set("preprocessing", [1, 2]), "'preprocessing' must be an object"),
    ("num_classes negative", _set("num_classes", -1), "'num_classes' must be an integer in [0, 1000000]"),
    ("num_classes a string", _set("num_classes", "10"), "'num_classes' must be an integer"),
    ("label_offset huge", _set("label_offset", 10**30), "'label_offset' must be an integer"),
    ("task", _set("task", "segmentation"), "'task' must be one of classification, detection"),
    ("input_shape 2^20", _set("input_shape", [3, 2**20, 2**20]), "input_shape must be (channels, height, width)"),
    ("input_shape channels", _set("input_shape", [10**6, 32, 32]), "channels in [1, 4096]"),
    ("plan", _set("plan", {"groups": {"layer1.0.conv1": 2.0}}), "the recorded plan is malformed"),
]


@pytest.mark.parametrize("case, edit, needle", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_item10_bad_recorded_fields_are_weights_errors(
    pruned_set: Path, tmp_path: Path, case: str, edit: Any, needle: str
) -> None:
    from autodfp.eval.export import load_pruned

    bad = _reseal(pruned_set, tmp_path / "bad", edit)
    with pytest.raises(WeightsError) as err:
        load_pruned(bad)
    msg = _one_line(err.value)
    assert needle in msg and "pruned.pt" in msg, msg


@pytest.mark.parametrize("case", ["mean of one value", "std of zeros", "input_shape 2^20"])
def test_item10_cli_refuses_a_bad_record(
    pruned_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    _, edit, needle = next(c for c in BAD_RECORDS if c[0] == case)
    bad = _reseal(pruned_set, tmp_path / "bad", edit)
    code, err = _cli(capsys, "eval", str(bad), "--limit", "8")
    _assert_refused(code, err, needle)


def test_item10_the_good_record_still_loads(pruned_set: Path) -> None:
    from autodfp.eval.export import load_pruned

    net, cfg, plan = load_pruned(pruned_set)
    assert cfg.preprocessing.mean == (0.485, 0.456, 0.406) and isinstance(cfg.preprocessing.std[0], float)
    assert plan.model == R20


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--std", "0,0,0"], "--std must be positive"),
        (["--input-size", "0"], "--input-size must be an integer in [1, 4096]"),
        (["--input-size", "5000"], "--input-size must be an integer in [1, 4096]"),
        (["--mean", "0.5"], "--mean must be three"),
    ],
)
def test_item10_the_flags_share_the_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    code, err = _cli(capsys, "eval", R20, *flags, "--limit", "8")
    _assert_refused(code, err, needle)


def test_item10_user_model_config_uses_the_same_check() -> None:
    from autodfp.api import user_model_config
    from autodfp.models.registry import Preprocessing

    net = resnet20()
    with pytest.raises(PlanError, match="input_shape must be"):
        user_model_config(net, (3, 2**20, 2**20))
    with pytest.raises(PlanError, match="'std' must be positive"):
        user_model_config(net, CIFAR, preprocessing=Preprocessing(32, (0.5, 0.5, 0.5), (0.0, 0.0, 0.0)))
    assert user_model_config(net, (1, 28, 28)).preprocessing.input_size == 28


# ------------------------------------------------------------------------------------------------
# item 11: weights of the wrong dtype


def _state_as(dtype: torch.dtype, key: str | None = None) -> dict[str, torch.Tensor]:
    state = resnet20().state_dict()
    for k, v in state.items():
        if v.is_floating_point() and (key is None or k == key):
            state[k] = v.to(dtype) if not dtype.is_complex else torch.complex(v, torch.zeros_like(v)).to(dtype)
    return state


@pytest.mark.parametrize(
    "state, needle",
    [
        (lambda: _state_as(torch.int32), "tensor 'conv1.weight' is int32 but the model's is float32"),
        (lambda: _state_as(torch.complex64), "tensor 'conv1.weight' is complex64 but the model's is float32"),
        (lambda: _state_as(torch.bool, "bn1.running_var"), "tensor 'bn1.running_var' is bool"),
        (
            lambda: {**_state_as(torch.float32), "bn1.num_batches_tracked": torch.tensor(3.0)},
            "tensor 'bn1.num_batches_tracked' is float32 but the model's is int64",
        ),
    ],
    ids=["int32", "complex64", "bool", "float counter"],
)
def test_item11_weights_of_another_dtype_kind_are_refused(tmp_path: Path, state: Any, needle: str) -> None:
    from autodfp.models.load import load_model, load_state_dict_strict

    with pytest.raises(WeightsError) as err:
        load_state_dict_strict(resnet20(), state(), "w.pt")
    assert needle in _one_line(err.value)
    path = tmp_path / "w.pt"
    torch.save(state(), path)
    with pytest.raises(WeightsError, match="refusing to cast"):
        load_model("r20", weights=path, arch=ARCH)


def test_item11_float_dtypes_and_integer_counters_still_load() -> None:
    from autodfp.models.load import load_state_dict_strict

    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        net = resnet20()
        state = _state_as(dtype)
        state["bn1.num_batches_tracked"] = torch.tensor(7, dtype=torch.int32)
        load_state_dict_strict(net, state, "w.pt")
        got = net.state_dict()
        assert got["conv1.weight"].dtype == torch.float32 and int(got["bn1.num_batches_tracked"]) == 7
        assert torch.equal(got["conv1.weight"], state["conv1.weight"].float())


def test_item11_cli_refuses_int32_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.pt"
    torch.save(_state_as(torch.int32), path)
    code, err = _cli(capsys, "eval", "r20", "--arch", ARCH, "--weights", str(path), "--limit", "8")
    _assert_refused(code, err, "is int32 but the model's is float32")


# ------------------------------------------------------------------------------------------------
# item 12: a corrupt synthetic-input cache entry is recomputed, with a warning


def _tiny_bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(16, 3, 8, 8))
    return net.eval()


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda x: {"images": torch.full_like(x, math.nan)}, "non-finite values"),
        (lambda x: {"images": x.clone().index_fill_(0, torch.tensor([2]), math.inf)}, "non-finite values"),
        (lambda x: {"images": x * 1e6}, "values beyond"),
        (lambda x: {"images": x.to(torch.int64)}, "not floating point"),
        (lambda x: {"images": x[:3]}, "shape (3, 3, 8, 8), expected (6, 3, 8, 8)"),
        (lambda x: {"images": [1, 2]}, "no images tensor"),
        (lambda x: [x], "no images tensor"),
    ],
    ids=["nan", "inf", "huge", "int", "shape", "not a tensor", "not a dict"],
)
def test_item12_corrupt_cache_entry_is_recomputed(tmp_path: Path, damage: Any, problem: str) -> None:
    from autodfp.synth.distill import synthetic_batch

    net = _tiny_bn_net()
    kw: dict[str, Any] = {"n": 6, "seed": 1, "cache_dir": tmp_path, "steps": 3}
    good = synthetic_batch(net, "tiny/net", (3, 8, 8), **kw)
    (entry,) = tmp_path.glob("*.pt")
    torch.save(damage(good), entry)
    with pytest.warns(CacheWarning) as record:
        again = synthetic_batch(net, "tiny/net", (3, 8, 8), **kw)
    (msg,) = [str(w.message) for w in record if issubclass(w.category, CacheWarning)]
    assert f"synthetic cache entry {entry} is corrupt" in msg and problem in msg and msg.endswith("recomputing")
    assert "\n" not in msg
    assert torch.equal(again, good), "recomputed deterministically"
    assert torch.equal(torch.load(entry, weights_only=True)["images"], good), "the entry was replaced"


# ------------------------------------------------------------------------------------------------
# properties: no input escapes as anything but an AutoDFPError

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=0, max_value=5000).map(lambda k: 10**k)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
_GROUP_NAMES = st.sampled_from(["layer1.0.conv1", "a", ""]) | st.text(max_size=6)
_GROUP_ENTRY = JSON_VALUES | st.fixed_dictionaries(
    {"ratio": JSON_VALUES},
    optional={"keep": JSON_VALUES, "strength": JSON_VALUES, "seed": JSON_VALUES, "x": JSON_VALUES},
)
#: plan-shaped documents, so that the checks past the first one are reached too
PLAN_DOCS = st.fixed_dictionaries(
    {"groups": st.dictionaries(_GROUP_NAMES, _GROUP_ENTRY, max_size=3)},
    optional={
        "format": st.just("autodfp.plan/1") | JSON_VALUES,
        "model": st.none() | st.text(max_size=6) | JSON_VALUES,
        "criterion": st.just("l1") | JSON_VALUES,
        "strategy": st.just("lsq") | JSON_VALUES,
        "params": st.dictionaries(st.sampled_from(["strength", "ridge", "gate", "seed", "zz"]), JSON_VALUES),
        "extra": JSON_VALUES,
    },
)


@PROPERTY
@given(doc=JSON_VALUES | PLAN_DOCS)
def test_property_plan_from_dict_gives_a_plan_or_a_plan_error(doc: Any) -> None:
    try:
        plan = Plan.from_dict(doc)
    except PlanError as exc:
        _one_line(exc)
        return
    assert all(isinstance(k, str) and 0 < v <= 1 for k, v in plan.ratios.items())
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


def _json_text(value: Any) -> str | None:
    try:
        return json.dumps(value)  # NaN/Infinity written as such: the reader must refuse them
    except ValueError:  # an int past the 4,300-digit limit cannot be written
        return None


_JSONISH = st.text(alphabet='[]{}",:0123456789.eE-+truefalsnNaIiy \\', max_size=60)
_DOCUMENTS = (
    st.binary(max_size=200)
    | _JSONISH.map(str.encode)
    | (JSON_VALUES | PLAN_DOCS).map(lambda v: (_json_text(v) or "null").encode())
)


@PROPERTY
@given(data=_DOCUMENTS)
def test_property_any_bytes_parse_or_raise_one_line(data: bytes) -> None:
    try:
        parse_json(data, "document", error=PlanError)
    except PlanError as exc:
        _one_line(exc)


@PROPERTY
@given(data=_DOCUMENTS)
def test_property_plan_load_of_any_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "plan.json"
        path.write_bytes(data)
        try:
            Plan.load(path)
        except PlanError as exc:
            assert _one_line(exc).startswith(f"plan file {path}")


_PRE_VALUES = {
    "input_size": st.integers(min_value=-2, max_value=5000) | JSON_VALUES,
    "mean": st.lists(st.floats(allow_nan=True), max_size=4) | JSON_VALUES,
    "std": st.lists(st.floats(min_value=-1, max_value=2), max_size=4) | JSON_VALUES,
    "resize": st.none() | st.integers(min_value=-1, max_value=5000) | JSON_VALUES,
    "interpolation": st.sampled_from(["bilinear", "bicubic", "cubic"]) | JSON_VALUES,
    "input_hw": st.none() | st.lists(st.integers(min_value=-1, max_value=5000), max_size=3) | JSON_VALUES,
    "gamma": JSON_VALUES,
}
_PAYLOADS = st.fixed_dictionaries(
    {"preprocessing": st.fixed_dictionaries({}, optional=_PRE_VALUES) | JSON_VALUES},
    optional={
        "model": st.just("m") | JSON_VALUES,
        "num_classes": st.integers(min_value=-1, max_value=10**7) | JSON_VALUES,
        "label_offset": JSON_VALUES,
        "task": st.sampled_from(["classification", "detection"]) | JSON_VALUES,
        "description": JSON_VALUES,
        "default_dataset": st.none()
        | st.fixed_dictionaries({"kind": JSON_VALUES, "path": JSON_VALUES}, optional={"class_list": JSON_VALUES})
        | JSON_VALUES,
    },
)


@PROPERTY
@given(payload=_PAYLOADS)
def test_property_record_config_gives_a_config_or_a_weights_error(payload: dict[str, Any]) -> None:
    from autodfp.eval.export import _record_config

    try:
        cfg = _record_config(payload, Path("pruned.pt"))
    except WeightsError as exc:
        _one_line(exc)
        return
    pre = cfg.preprocessing
    assert len(pre.mean) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in pre.mean)
    assert all(isinstance(v, float) and v > 0 for v in pre.std) and 1 <= pre.input_size <= 4096


_FIELDS = [f for f in Config.__dataclass_fields__]
_CONFIG_VALUES = JSON_VALUES | st.tuples(st.floats(allow_nan=True), st.floats()) | st.sampled_from(["l1", "lsq", "kl"])


@PROPERTY
@given(kwargs=st.dictionaries(st.sampled_from(_FIELDS), _CONFIG_VALUES, max_size=4))
def test_property_config_accepts_or_raises_an_autodfp_error(kwargs: dict[str, Any]) -> None:
    try:
        Config(**kwargs)
    except AutoDFPError as exc:
        _one_line(exc)
