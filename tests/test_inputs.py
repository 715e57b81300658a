"""Bad inputs get a one-line AutoDFPError naming the file or parameter, before any work is done."""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from autodfp.errors import DataError, ModelError, PlanError, WeightsError
from autodfp.models import load_model
from autodfp.models.load import build_from_arch, check_finite
from autodfp.models.resnet_cifar import resnet20


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------------------
# non-finite weights and impossible BN statistics


@pytest.mark.parametrize(
    "tensor, value, message",
    [
        ("layer1.0.bn1.running_var", math.nan, "tensor 'layer1.0.bn1.running_var' has non-finite values"),
        ("linear.weight", math.inf, "tensor 'linear.weight' has non-finite values"),
        ("bn1.running_mean", -math.inf, "tensor 'bn1.running_mean' has non-finite values"),
        ("layer2.1.bn2.running_var", -1.0, "tensor 'layer2.1.bn2.running_var' has negative values"),
    ],
)
def test_non_finite_weights_are_a_model_error_naming_the_tensor(tmp_path, tensor, value, message):
    state = resnet20().state_dict()
    state[tensor].view(-1)[3] = value
    path = tmp_path / "weights.th"
    torch.save({"state_dict": state}, path)
    # the zoo entry with user weights, and a user architecture with the same file
    for kw in ({"model": "resnet20_cifar10"}, {"model": "mine", "arch": "autodfp.models.resnet_cifar:resnet20"}):
        with pytest.raises(ModelError, match=f"weights.th: {message}") as err:
            load_model(weights=path, **kw)
        _one_line(err.value)


def test_non_finite_trusted_pickle_and_python_models_are_refused(tmp_path):
    net = resnet20()
    with torch.no_grad():
        net.conv1.weight[0, 0, 0, 0] = math.nan
    path = tmp_path / "model.pt"
    torch.save(net, path)
    with pytest.raises(ModelError, match="model.pt: tensor 'conv1.weight' has non-finite values"):
        load_model(str(path), trust_pickle=True)
    with pytest.raises(ModelError, match="from Python: tensor 'conv1.weight'"):
        check_finite(net, "model from Python")


def test_dead_bn_channels_are_not_mistaken_for_damage():
    """Channels dead in training decay to variance 0; with eps > 0 BatchNorm is still finite."""
    net = resnet20()
    net.bn1.running_var[2] = 0.0
    check_finite(net, "x")  # no error
    net.bn1.eps = 0.0
    with pytest.raises(ModelError, match="'bn1.running_var' has zeros and eps is 0"):
        check_finite(net, "x")


# ------------------------------------------------------------------------------------------------
# state dicts and --arch factories


def test_state_dict_keys_that_are_not_strings(tmp_path):
    state = resnet20().state_dict()
    state[7] = torch.zeros(1)
    path = tmp_path / "intkeys.th"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="intkeys.th: state dict key 7 is a int, not a string") as err:
        load_model("mine", weights=path, arch="autodfp.models.resnet_cifar:resnet20")
    _one_line(err.value)


_COUNTER = itertools.count()


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module into a fresh working directory; yield a function that returns its name."""
    monkeypatch.chdir(tmp_path)
    names = []

    def write(source: str) -> str:
        name = f"autodfp_test_arch_{os.getpid()}_{next(_COUNTER)}"
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_arch_module_in_the_working_directory_is_found(user_module):
    name = user_module("import torch.nn as nn\ndef net():\n    return nn.Sequential(nn.Conv2d(3, 4, 3))\n")
    path_before = list(sys.path)
    assert isinstance(build_from_arch(f"{name}:net"), nn.Module)
    assert sys.path == path_before  # the working directory was on the path for that import only


@pytest.mark.parametrize(
    "source, arch, message",
    [
        ("def net(width):\n    pass\n", "{m}:net", r"'net' needs arguments \(width\)"),
        ("def net():\n    raise RuntimeError('boom')\n", "{m}:net", r"calling 'net\(\)' failed \(RuntimeError: boom\)"),
        ("def net(:\n", "{m}:net", r"syntax error \(.*\.py, line 1\)"),
        ("raise ImportError('no torch here')\n", "{m}:net", "cannot import .* no torch here"),
        ("x = 1\n", "{m}:x", "'x' is not a callable"),
        ("def net():\n    return 3\n", "{m}:net", "returned int, not an nn.Module"),
        ("", ":", "arch must look like package.module:factory, got ':'"),
        ("", "{m}:", "arch must look like package.module:factory"),
        ("", ":net", "arch must look like package.module:factory"),
        ("", "{m}", "arch must look like package.module:factory"),
        ("", "a..b:net", "arch must look like package.module:factory"),
        ("", "no_such_module_xyz:net", "cannot import 'no_such_module_xyz'"),
    ],
)
def test_bad_arch_is_a_model_error(user_module, source, arch, message):
    name = user_module(source)
    with pytest.raises(ModelError, match=message) as err:
        build_from_arch(arch.format(m=name))
    _one_line(err.value)


# ------------------------------------------------------------------------------------------------
# plans


@pytest.mark.parametrize(
    "groups, extra, message",
    [
        ({"layer1.0.conv1": {"ratio": 0.5, "keep": ["a"]}}, {}, "'keep' of group 'layer1.0.conv1' must be a"),
        ({"layer1.0.conv1": {"ratio": 0.5, "keep": 5}}, {}, "'keep' of group 'layer1.0.conv1' must be a list"),
        ({"layer1.0.conv1": {"ratio": 0.5, "keep": [True]}}, {}, "must be a list of channel indices"),
        ({"layer1.0.conv1": 0.5}, {"params": [1, 2]}, "'params' must be an object"),
        ({"layer1.0.conv1": {"ratio": 0.5, "strength": "abc"}}, {}, "'strength' in group '.*' must be a number"),
        ({"layer1.0.conv1": {"ratio": 0.5, "strength": True}}, {}, "'strength' .* must be a number, got true"),
        ({"layer1.0.conv1": 0.5}, {"params": {"strength": "abc"}}, "'strength' in 'params' must be a number"),
        ({"layer1.0.conv1": 0.5}, {"params": {"ridge": [1]}}, "'ridge' in 'params' must be a number"),
        ({"layer1.0.conv1": {"ratio": True}}, {}, "ratio of group 'layer1.0.conv1' must be a number, got true"),
        ({"layer1.0.conv1": True}, {}, "group 'layer1.0.conv1' in plan needs a 'ratio'"),
        ({"layer1.0.conv1": {"ratio": "0.5"}}, {}, "ratio of group .* must be a number"),
        ({"layer1.0.conv1": {"ratio": math.nan}}, {}, "ratio of group .* must be a number, got NaN"),
        ({"layer1.0.conv1": 0.5}, {"strategy": ["lsq"]}, "'strategy' must be a string"),
        ({"layer1.0.conv1": 0.5}, {"model": 3}, "'model' must be a string"),
    ],
)
def test_plan_fields_of_the_wrong_type_are_plan_errors(tmp_path, groups, extra, message):
    from autodfp.compress.plan import Plan

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"groups": groups, **extra}))
    # NaN is not JSON: the bounded reader refuses it before the plan's fields are read
    with pytest.raises(PlanError, match="holds NaN" if "NaN" in message else message) as err:
        Plan.load(path)
    assert _one_line(err.value).startswith(f"plan file {path}")
    with pytest.raises(PlanError, match=message):
        Plan.from_dict({"groups": groups, **extra})


def test_plan_file_that_is_not_utf8(tmp_path):
    from autodfp.compress.plan import Plan

    path = tmp_path / "plan.json"
    path.write_bytes(b'{"groups": {"\xff\xfe": 0.5}}')
    with pytest.raises(PlanError, match="plan.json is not UTF-8 text") as err:
        Plan.load(path)
    _one_line(err.value)


def test_well_typed_plan_still_loads(tmp_path):
    from autodfp.compress.plan import Plan

    d = {
        "strategy": "lsq",
        "params": {"ridge": 0.01, "seed": 3, "gate": True, "max_distance": None},
        "groups": {"layer1.0.conv1": {"ratio": 0.5, "strength": 1, "keep": [0, 2]}, "layer2.0.conv1": 1},
    }
    plan = Plan.from_dict(d)
    assert plan.keep == {"layer1.0.conv1": [0, 2]} and plan.ratios["layer2.0.conv1"] == 1
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


# ------------------------------------------------------------------------------------------------
# datasets


def _cifar_dir(tmp_path: Path, data: object, labels: object) -> Path:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)
    return root


@pytest.mark.parametrize(
    "labels, message",
    [
        (["cat", "dog", "cat"], "labels must be integers, found str 'cat'"),
        ([1.0, math.nan, 2.0], "labels must be integers, found nan"),
        ([1.5, 2.0, 3.0], "labels must be integers, found 1.5"),
        ([0, 1, 10], r"labels must be in 0\.\.9, found 10"),
        ([0, -1, 2], r"labels must be in 0\.\.9, found -1"),
        ([0, None, 2], "labels must be integers"),
    ],
)
def test_cifar_labels_that_are_not_class_indices(tmp_path, labels, message):
    from autodfp.data.datasets import read_cifar

    root = _cifar_dir(tmp_path, np.zeros((3, 3072), np.uint8), labels)
    with pytest.raises(DataError, match=message) as err:
        read_cifar(root)
    assert "test_batch" in _one_line(err.value)


def test_cifar_float_pixels_in_unit_range_are_refused(tmp_path):
    from autodfp.data.datasets import read_cifar

    rng = np.random.default_rng(0)
    root = _cifar_dir(tmp_path, rng.random((3, 3072)).astype(np.float32), [0, 1, 2])
    with pytest.raises(DataError, match=r"test_batch: pixel data are floats in \[0, 1\]") as err:
        read_cifar(root)
    _one_line(err.value)
    # whole-number floats in 0..255 are the same pixels in another dtype: still read
    root = _cifar_dir(tmp_path / "b", np.full((3, 3072), 200.0), [0, 1, 2])
    images, labels = read_cifar(root)
    assert images.dtype == np.uint8 and int(images.max()) == 200 and labels.tolist() == [0, 1, 2]


def test_class_list_that_does_not_cover_the_model(tmp_path):
    from PIL import Image

    from autodfp.data.datasets import ImageFolderDataset, check_label_coverage, resolve_dataset
    from autodfp.models import get_config

    for cls in ("cat", "dog"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "data" / cls / "1.png")
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    spec = f"folder:{tmp_path / 'data'}:{tmp_path / 'two.txt'}"
    with pytest.raises(
        DataError,
        match="labels do not cover the model's classes: the class list .*two.txt name 2 classes, the model has 10",
    ) as err:
        resolve_dataset(spec, get_config("resnet20_cifar10"))
    _one_line(err.value)
    # without a class list: sorted folder names are only right when every class is present
    with pytest.raises(DataError, match="its class folders name 2 classes, the model has 10; pass a class list"):
        resolve_dataset(f"folder:{tmp_path / 'data'}", get_config("resnet20_cifar10"))
    ds = ImageFolderDataset(tmp_path / "data")
    check_label_coverage(ds, 2)  # a two-class model is covered
    check_label_coverage(ds, 3, label_offset=1)  # so is one with a background output
    check_label_coverage(ds, 0)  # unknown class count: nothing to check
    with pytest.raises(DataError, match="label 1 is outside the model's 1 classes"):
        check_label_coverage(torch.utils.data.Subset(_Labelled([0, 1]), [0, 1]), 1)


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)


# ------------------------------------------------------------------------------------------------
# seeds and proxy checks: refused before any work


def _tiny_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "3"])
def test_bad_seed_is_refused_before_synthesis(tmp_path, monkeypatch, seed):
    from autodfp.synth import distill as d

    monkeypatch.setattr(d, "_distill", _no_work)
    with pytest.raises(PlanError, match="seed must be") as err:
        d.synthetic_batch(_tiny_bn_net(), "tiny", (3, 8, 8), n=4, seed=seed, cache_dir=tmp_path)
    _one_line(err.value)
    with pytest.raises(PlanError, match="seed must be"):
        d.distill(_tiny_bn_net(), (3, 8, 8), n=4, seed=seed)


def test_chunk_seeds_past_the_user_limit_are_fine(tmp_path):
    """Large batches are distilled in chunks seeded ``seed + i * stride``: only the user's seed is checked."""
    from autodfp.synth.distill import synthetic_batch

    x = synthetic_batch(_tiny_bn_net(), "tiny", (3, 72, 72), n=130, seed=2**32 - 1, cache_dir=tmp_path, method="noise")
    assert x.shape == (130, 3, 72, 72)


@pytest.fixture(scope="module")
def resnet20_pruner():
    from autodfp.compress.surgery import Pruner
    from autodfp.search.rewards import AgreementReward

    net, _ = load_model("resnet20_cifar10")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return Pruner(net, (3, 32, 32)), AgreementReward(net, x)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_bad_seed_is_refused_before_search(resnet20_pruner, monkeypatch, seed):
    from autodfp.search import driver

    pruner, reward = resnet20_pruner
    monkeypatch.setattr(driver, "PruningEnv", _no_work)
    for method in ("sac", "random"):
        with pytest.raises(PlanError, match=r"seed must be in \[0, 2\*\*32\)"):
            driver.search(pruner, 0.5, method=method, episodes=2, reward=reward, seed=seed, progress=False)
    with pytest.raises(PlanError, match="seed must be"):
        driver.proxy_check(pruner, reward, lambda m: 0.0, 0.5, k=3, seed=seed, progress=False)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_proxy_check_needs_three_plans(resnet20_pruner, monkeypatch, k):
    from autodfp.search import driver

    pruner, reward = resnet20_pruner
    monkeypatch.setattr(driver, "PruningEnv", _no_work)
    with pytest.raises(PlanError, match=f"at least 3 plans to rank \\(k\\), got {k}") as err:
        driver.proxy_check(pruner, reward, lambda m: 0.0, 0.5, k=k, progress=False)
    _one_line(err.value)


def test_proxy_check_rho_is_none_not_nan_when_undefined(resnet20_pruner):
    from autodfp.search.driver import proxy_check

    pruner, reward = resnet20_pruner
    rho, rewards, accs = proxy_check(pruner, reward, lambda m: 50.0, 0.5, k=3, strategy="none", progress=False)
    assert rho is None and len(rewards) == len(accs) == 3
    assert json.loads(json.dumps({"rho": rho})) == {"rho": None}


# ------------------------------------------------------------------------------------------------
# caches and file modes


def test_unusable_cache_for_synthetic_inputs(tmp_path, monkeypatch):
    from autodfp.errors import CacheWarning
    from autodfp.synth import distill as d

    home = tmp_path / "home"
    home.write_text("not a directory")
    monkeypatch.setenv("AUTODFP_HOME", str(home))
    real = d._distill
    calls: list[int] = []

    def distill_after_warning(*args, **kwargs):
        calls.append(len(caught))
        return real(*args, **kwargs)

    monkeypatch.setattr(d, "_distill", distill_after_warning)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = d.synthetic_batch(_tiny_bn_net(), "tiny", (3, 8, 8), n=4, steps=2)
    assert x.shape == (4, 3, 8, 8)
    cache_warnings = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert len(cache_warnings) == 1 and "home/synthetic cannot be used" in str(cache_warnings[0].message)
    assert "\n" not in str(cache_warnings[0].message)
    assert calls == [1]  # the warning came before the distillation
    assert home.read_text() == "not a directory"


def test_unusable_cache_for_downloaded_weights(tmp_path, monkeypatch):
    import io
    import urllib.request

    from autodfp.errors import CacheWarning
    from autodfp.models import hub

    home = tmp_path / "home"
    home.write_text("not a directory")
    monkeypatch.setenv("AUTODFP_HOME", str(home))
    monkeypatch.setenv("AUTODFP_ASSETS", str(tmp_path / "no-mirror"))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"weights"))
    with pytest.warns(CacheWarning, match="home/weights cannot be used"):
        path = hub.resolve_weights("w.th", None, url="https://example.invalid/w.th")
    assert path.read_bytes() == b"weights" and home not in path.parents


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writes_get_the_umask_mode(tmp_path, monkeypatch, mask):
    from autodfp import _io

    old = os.umask(mask)
    try:
        monkeypatch.setattr(_io, "_UMASK", None)
        path = _io.atomic_write_text(tmp_path / "a.json", "{}")
        torch_path = _io.atomic_write(tmp_path / "b.pt", lambda p: torch.save({"x": torch.zeros(1)}, p))
    finally:
        os.umask(old)
        _io._UMASK = None
    for p in (path, torch_path):
        assert (p.stat().st_mode & 0o777) == 0o666 & ~mask
