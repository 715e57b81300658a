"""MAC/parameter counting, accuracy, latency; plus the zoo's accuracy on the shared assets."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from autodfp.data.datasets import make_loader, resolve_dataset
from autodfp.errors import DataError
from autodfp.eval.metrics import EvalResult, evaluate, latency_ms, latency_table, profile
from autodfp.models import get_config, load_model


def _flop_counter_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(shape))
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2


def _resnet_cifar_closed_form(depth: int, num_classes: int = 10) -> tuple[int, int]:
    """(MACs, params) of the CIFAR ResNet straight from the paper's architecture description."""
    n = (depth - 2) // 6
    k = 9  # 3x3 kernels
    macs = 32 * 32 * 16 * 3 * k  # stem
    macs += 2 * n * (32 * 32 * 16 * 16 * k)  # stage 1
    macs += 16 * 16 * 32 * 16 * k + (2 * n - 1) * (16 * 16 * 32 * 32 * k)  # stage 2 (first conv strided)
    macs += 8 * 8 * 64 * 32 * k + (2 * n - 1) * (8 * 8 * 64 * 64 * k)  # stage 3
    macs += 64 * num_classes  # classifier
    bn = lambda c: 2 * c
    params = 3 * 16 * k + bn(16)
    params += 2 * n * (16 * 16 * k + bn(16))
    params += (16 * 32 * k + bn(32)) + (2 * n - 1) * (32 * 32 * k + bn(32))
    params += (32 * 64 * k + bn(64)) + (2 * n - 1) * (64 * 64 * k + bn(64))
    params += 64 * num_classes + num_classes
    return macs, params


# ------------------------------------------------------------------------------------------------
# profile


@pytest.mark.parametrize("name, depth", [("resnet20_cifar10", 20), ("resnet56_cifar10", 56)])
def test_resnet_cifar_macs_closed_form(name: str, depth: int) -> None:
    model = get_config(name).builder()
    prof = profile(model, 32)
    macs, params = _resnet_cifar_closed_form(depth)
    assert prof.total_macs == macs
    assert prof.total_params == params
    if depth == 56:
        assert round(prof.total_macs / 1e6, 2) == 125.49
        assert round(prof.total_params / 1e6, 2) == 0.85
    else:
        assert round(prof.total_macs / 1e6, 2) == 40.55
        assert round(prof.total_params / 1e6, 2) == 0.27


@pytest.mark.parametrize(
    "name, mmacs",
    [
        ("resnet56_cifar10", 125.49),
        ("mobilenet_v1_075_imagenet", 325.40),  # published: 325 M mult-adds
        ("mobilenet_v2_100_imagenet_bnfolded", 300.78),  # published: 300 M
    ],
)
def test_macs_equal_flop_counter_half(name: str, mmacs: float) -> None:
    cfg = get_config(name)
    model = cfg.builder()
    size = cfg.preprocessing.input_size
    prof = profile(model, size)
    assert prof.total_macs == _flop_counter_macs(model, (1, 3, size, size))
    assert round(prof.total_macs / 1e6, 2) == mmacs


def test_profile_layers() -> None:
    model = get_config("resnet20_cifar10").builder()
    prof = profile(model, (3, 32, 32))
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    by_name = {lp.name: lp for lp in prof.layers}
    assert set(convs) <= set(by_name)
    assert sum(lp.params for lp in prof.layers) == prof.total_params
    assert sum(lp.macs for lp in prof.layers) == prof.total_macs
    stem = by_name["conv1"]
    assert (stem.type, stem.input_shape, stem.output_shape) == ("Conv2d", (1, 3, 32, 32), (1, 16, 32, 32))
    assert stem.macs == 32 * 32 * 16 * 27 and stem.params == 16 * 27
    bn = by_name["bn1"]
    assert bn.macs == 0 and bn.params == 32
    assert by_name["linear"].macs == 640
    assert "total" in prof.table()


class _Odd(nn.Module):
    """Grouped/transposed convs, a linear over tokens, a module used twice and one never used."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.shared = nn.Conv2d(6, 6, 1)
        self.tok = nn.Linear(6, 5)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(self.shared(self.up(self.conv(x))))
        return self.tok(x.flatten(2).transpose(1, 2))


def test_profile_matches_flop_counter_on_odd_layers() -> None:
    model = _Odd()
    prof = profile(model, (4, 10, 12))
    assert prof.total_macs == _flop_counter_macs(model, (1, 4, 10, 12))
    by_name = {lp.name: lp for lp in prof.layers}
    assert by_name["shared"].macs == 2 * (6 * 10 * 12) * 6
    assert by_name["unused"].macs == 0 and by_name["unused"].output_shape is None
    assert prof.total_params == sum(p.numel() for p in model.parameters())


def test_profile_restores_mode() -> None:
    model = get_config("resnet20_cifar10").builder().train()
    profile(model, 32)
    assert model.training


# ------------------------------------------------------------------------------------------------
# evaluate


class _Lookup(nn.Module):
    """Returns a fixed logit row per sample index, and records the mode it was called in."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.table[x.view(-1).long()]


def test_evaluate_top1_top5_with_offset() -> None:
    # column 0 is "background" (label_offset=1); dataset classes are columns 1..6
    table = torch.tensor(
        [
            [9.0, 6, 5, 4, 3, 2, 1],  # ranks: class0 first
            [9.0, 1, 2, 3, 4, 5, 6],  # class5 first, class0 last (6th)
            [0.0, 1, 6, 2, 3, 4, 5],  # class1 first
        ]
    )
    labels = torch.tensor([0, 0, 2])  # hit@1, miss@5, hit@5 (class2 is 5th)
    model = _Lookup(table).train()
    loader = [(torch.arange(2).view(2, 1), labels[:2]), (torch.tensor([[2]]), labels[2:])]
    res = evaluate(model, loader, label_offset=1, progress=False)
    assert isinstance(res, EvalResult) and res.n == 3
    assert res.top1 == pytest.approx(100 / 3) and res.top5 == pytest.approx(200 / 3)
    assert model.modes == [False, False] and model.training  # ran in eval mode, mode restored
    assert evaluate(_Lookup(table), loader, progress=True).n == 3  # tqdm path works


def test_evaluate_rejects_bad_data() -> None:
    model = _Lookup(torch.zeros(2, 3))
    with pytest.raises(DataError, match="label 3 is out of range for a model with 3 classes"):
        evaluate(model, [(torch.zeros(1, 1), torch.tensor([3]))], progress=False)
    with pytest.raises(DataError, match="labelled data"):
        evaluate(model, [torch.zeros(2, 1)], progress=False)
    with pytest.raises(DataError, match="empty"):
        evaluate(model, [], progress=False)


# ------------------------------------------------------------------------------------------------
# latency (no timing assertions: shared CI machines are noisy)


def test_latency_positive_finite() -> None:
    model = get_config("resnet20_cifar10").builder()
    ms = latency_ms(model, 32, batch_size=1, warmup=1, repeats=3)
    assert isinstance(ms, float) and math.isfinite(ms) and ms > 0
    table = latency_table(model, 32, batch_sizes=(1, 2), warmup=0, repeats=1)
    assert set(table) == {1, 2} and all(math.isfinite(v) and v > 0 for v in table.values())


# ------------------------------------------------------------------------------------------------
# the zoo reproduces the accuracies measured independently (shared/assets/README.md)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, top1, batch",
    [
        ("resnet20_cifar10", 91.64, 256),
        ("resnet56_cifar10", 92.72, 256),
        ("mobilenet_v1_075_imagenet", 77.00, 8),
        ("mobilenet_v2_100_imagenet_bnfolded", 80.08, 4),
    ],
)
def test_zoo_accuracy_reproduces(assets, name: str, top1: float, batch: int) -> None:
    model, cfg = load_model(name)
    dataset = resolve_dataset(None, cfg)
    t0 = time.perf_counter()
    res = evaluate(model, make_loader(dataset, batch_size=batch), cfg.label_offset, progress=False)
    print(f"{name}: {res} in {time.perf_counter() - t0:.1f}s")
    assert res.n == len(dataset)
    assert abs(res.top1 - top1) <= 0.1, f"{name}: top-1 {res.top1:.2f} vs expected {top1:.2f}"
