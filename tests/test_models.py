"""Model definitions, the option-A shortcut under torch-pruning, and loading errors."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from autodfp.analysis.graph import find_groups
from autodfp.errors import AutoDFPError, ModelError, WeightsError
from autodfp.models import CUSTOM_PRUNERS, ChannelPadShortcut, Conv2dSame, load_model
from autodfp.models.hub import resolve_weights
from autodfp.models.resnet_cifar import resnet20


def test_channel_pad_shortcut_matches_option_a_lambda():
    x = torch.randn(2, 16, 8, 8)
    ref = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert torch.equal(ChannelPadShortcut(16, 32, 2)(x), ref)


def test_conv2d_same_is_tensorflow_asymmetric_padding():
    conv = Conv2dSame(3, 4, 3, stride=2, bias=False)
    x = torch.randn(1, 3, 224, 224)
    # TF SAME for k=3, s=2, H=224: total pad 1, all of it at the bottom/right
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    assert torch.allclose(conv(x), ref, atol=1e-6)
    assert conv(x).shape[-1] == 112


def _lambda_resnet20() -> nn.Module:
    """ResNet-20 with the classic lambda shortcut, to show what torch-pruning makes of it."""

    class Lambda(nn.Module):
        def __init__(self, planes: int):
            super().__init__()
            self.planes = planes

        def forward(self, x):
            return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.planes // 4, self.planes // 4))

    net = resnet20()
    for stage in (net.layer2, net.layer3):
        stage[0].shortcut = Lambda(stage[0].conv1.out_channels)
    return net.eval()


def _group_modules(net: nn.Module, dg: tp.DependencyGraph, module: nn.Module) -> set[str]:
    names = {m: n for n, m in net.named_modules()}
    group = dg.get_pruning_group(module, tp.prune_conv_out_channels, idxs=[0])
    return {names[d.target.module] for d, _ in group if d.target.module in names}


def test_lambda_shortcut_is_the_known_trap_and_the_module_fixes_it():
    x = torch.randn(1, 3, 32, 32)
    bad = _lambda_resnet20()
    dg_bad = tp.DependencyGraph().build_dependency(bad, example_inputs=x)
    bad_group = _group_modules(bad, dg_bad, bad.conv1)
    # With the lambda, the 16-channel stem stream is wrongly tied to stage-2/3 layers.
    assert any(n.startswith(("layer2", "layer3")) and "conv2" in n for n in bad_group)

    good = resnet20().eval()
    dg = tp.DependencyGraph().build_dependency(good, example_inputs=x, customized_pruners=CUSTOM_PRUNERS)
    group = _group_modules(good, dg, good.conv1)
    assert not any(n.startswith(("layer2", "layer3")) and "conv2" in n for n in group)
    assert "layer2.0.shortcut" in group  # the stage-1 stream ends at the shortcut's input side


def test_prune_inner_and_coupled_groups_with_the_shortcut_module():
    net = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=x, customized_pruners=CUSTOM_PRUNERS)
    dg.get_pruning_group(net.layer2[0].conv1, tp.prune_conv_out_channels, idxs=[0, 5, 7]).prune()
    assert net.layer2[0].conv1.out_channels == 29 and net.layer2[0].conv2.in_channels == 29
    # a coupled stage-2 residual channel crosses the shortcut's output side
    dg.get_pruning_group(net.layer2[0].conv2, tp.prune_conv_out_channels, idxs=[3, 20]).prune()
    assert net.layer2[0].shortcut.out_channels == 30 and net.layer3[0].conv1.in_channels == 30
    # and a stage-1 channel crosses its input side
    dg.get_pruning_group(net.conv1, tp.prune_conv_out_channels, idxs=[2]).prune()
    assert net.layer2[0].shortcut.in_channels == 15
    assert net(x).shape == (2, 10)


def test_graph_marks_resnet_inner_groups_only():
    net = resnet20().eval()
    graph = find_groups(net, (3, 32, 32))
    assert [g.name for g in graph.prunable] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    for g in graph.prunable:
        assert g.consumers == [g.name.replace("conv1", "conv2")] and g.activation == "relu"
        assert g.consumer_bns == [g.name.replace("conv1", "bn2")]
    stem = graph.get("conv1")
    assert stem.coupled and not stem.prunable


def test_unknown_model_is_a_one_line_error():
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        load_model("nope")


def test_weights_hash_mismatch_and_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTODFP_ASSETS", raising=False)
    monkeypatch.setenv("AUTODFP_HOME", str(tmp_path / "home"))
    f = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, f)
    good = hashlib.sha256(f.read_bytes()).hexdigest()
    assert resolve_weights("w.pt", good, explicit=f) == f
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve_weights("w.pt", "0" * 64, explicit=f)
    with pytest.raises(WeightsError, match="weights file not found"):
        resolve_weights("w.pt", good, explicit=tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match=r"place it at .*home/weights/w.pt"):
        resolve_weights("w.pt", good, url=None)


def test_resolution_order_mirror_then_cache(tmp_path, monkeypatch):
    payload = b"weights"
    sha = hashlib.sha256(payload).hexdigest()
    mirror, home = tmp_path / "mirror", tmp_path / "home"
    (mirror / "weights").mkdir(parents=True)
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "x.pt").write_bytes(payload)
    monkeypatch.setenv("AUTODFP_HOME", str(home))
    monkeypatch.setenv("AUTODFP_ASSETS", str(mirror))
    assert resolve_weights("x.pt", sha, url=None) == home / "weights" / "x.pt"
    (mirror / "weights" / "x.pt").write_bytes(payload)
    assert resolve_weights("x.pt", sha, url=None) == mirror / "weights" / "x.pt"
    (mirror / "weights" / "x.pt").write_bytes(b"tampered")
    with pytest.raises(WeightsError, match="AUTODFP_ASSETS"):
        resolve_weights("x.pt", sha, url=None)


def test_download_failure_says_where_to_place_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTODFP_ASSETS", raising=False)
    monkeypatch.setenv("AUTODFP_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"could not download .*place the file at"):
        resolve_weights("y.pt", None, url="http://127.0.0.1:9/y.pt")
    assert not list(tmp_path.rglob("*.tmp"))  # nothing half-written left behind


def test_unsafe_and_corrupt_checkpoints(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(WeightsError, match="trust_pickle=True"):
        load_model("mine", weights=evil, arch="autodfp.models.resnet_cifar:resnet20")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="corrupt"):
        load_model("mine", weights=junk, arch="autodfp.models.resnet_cifar:resnet20")


class _Evil:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_user_arch_with_state_dict_and_trusted_pickle(tmp_path):
    src = resnet20().eval()
    sd = tmp_path / "sd.pt"
    torch.save(src.state_dict(), sd)
    net, cfg = load_model("mine", weights=sd, arch="autodfp.models.resnet_cifar:resnet20", like="resnet20_cifar10")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(net(x), src(x)) and cfg.num_classes == 10
    full = tmp_path / "full.pt"
    torch.save(src, full)
    with pytest.raises(AutoDFPError):
        load_model(str(full))  # a path without --arch or --trust-pickle
    net2, _ = load_model(str(full), trust_pickle=True)
    assert torch.equal(net2(x), src(x))
    with pytest.raises(ModelError, match="does not match"):
        load_model("mine", weights=sd, arch="autodfp.models.resnet_cifar:resnet56")
    with pytest.raises(ModelError, match="package.module:factory"):
        load_model("mine", arch="no_colon")
