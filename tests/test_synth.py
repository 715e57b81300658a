"""Data-free input synthesis: convergence, determinism, the no-BN fallback and the disk cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from autodfp.config import SYNTH_SETTINGS
from autodfp.errors import CacheWarning
from autodfp.synth import distill as synth
from autodfp.synth.distill import bn_stat_loss, distill, resolve_method, synthesize, synthetic_batch


def _bn_net(seed: int = 0) -> nn.Module:
    """A small conv net with non-trivial running statistics, as a trained net would have."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.3, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    from autodfp.errors import WeightsError
    from autodfp.models import load_model

    try:
        return load_model("resnet20_cifar10")[0]
    except WeightsError as exc:  # no asset mirror or cache on this machine
        pytest.skip(f"ResNet-20 weights unavailable: {exc}")


def _plain_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
    ).eval()


def test_bn_distillation_matches_running_statistics() -> None:
    net = _bn_net()
    res = distill(net, (3, 16, 16), n=16, steps=60, lr=0.1, seed=0)
    assert res.method == "bn"
    assert res.images.shape == (16, 3, 16, 16)
    noise = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert res.initial_loss == pytest.approx(bn_stat_loss(net, noise), rel=1e-4)
    assert bn_stat_loss(net, res.images) == pytest.approx(res.final_loss, rel=1e-4)
    assert res.final_loss < 0.5 * res.initial_loss


def test_synthesis_leaves_the_model_untouched() -> None:
    net = _bn_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    synthesize(net, (3, 8, 8), n=4, steps=3, seed=0)
    assert net.training, "the caller's train/eval flag is restored"
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed (BN stats must not update during distillation)"


def test_same_seed_same_batch_different_seed_different_batch() -> None:
    net = _bn_net()
    a = synthesize(net, (3, 8, 8), n=8, steps=5, seed=3)
    b = synthesize(net, (3, 8, 8), n=8, steps=5, seed=3)
    c = synthesize(net, (3, 8, 8), n=8, steps=5, seed=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_global_rng_is_not_disturbed() -> None:
    net = _bn_net()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    synthesize(net, (3, 8, 8), n=4, steps=2, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_deepinversion_is_deterministic_and_lowers_the_bn_loss() -> None:
    net = _bn_net()
    res = distill(net, (3, 16, 16), n=16, steps=60, lr=0.1, seed=0, method="deepinversion")
    assert res.method == "deepinversion" and res.images.shape == (16, 3, 16, 16)
    assert res.final_loss < 0.9 * res.initial_loss  # reported loss: the BN term alone, as for "bn"
    again = distill(net, (3, 16, 16), n=16, steps=60, lr=0.1, seed=0, method="deepinversion")
    assert torch.equal(res.images, again.images)  # jitter and targets come from the seeded generator
    with pytest.raises(ValueError, match="BatchNorm"):
        synthesize(_plain_net(), (3, 8, 8), n=4, steps=1, method="deepinversion")


def test_deepinversion_images_carry_their_target_classes(resnet20: nn.Module) -> None:
    n, shape = 8, (3, 32, 32)
    gen = torch.Generator().manual_seed(0)  # replay distill's generator: initial noise, then targets
    torch.randn((n, *shape), generator=gen)
    targets = torch.randint(0, 10, (n,), generator=gen)
    with torch.no_grad():
        di = resnet20(distill(resnet20, shape, n=n, steps=15, lr=0.2, seed=0, method="deepinversion").images)
        bn = resnet20(distill(resnet20, shape, n=n, steps=15, lr=0.2, seed=0, method="bn").images)
    assert (di.argmax(1) == targets).float().mean() >= 0.75
    assert (bn.argmax(1) == targets).float().mean() < 0.75  # BN matching alone does not aim at classes


def test_model_without_bn_falls_back_to_inversion() -> None:
    net = _plain_net()
    assert resolve_method(net) == synth.NO_BN_FALLBACK == "inversion"
    res = distill(net, (3, 12, 12), n=8, steps=30, lr=0.1, seed=0, label_offset=1)
    assert res.method == "inversion"
    assert res.images.shape == (8, 3, 12, 12)
    assert torch.isfinite(res.images).all()
    assert res.final_loss < res.initial_loss
    with pytest.raises(ValueError, match="BatchNorm"):
        synthesize(net, (3, 8, 8), n=4, steps=1, method="bn")


def test_defaults_depend_on_input_size_and_work_under_no_grad() -> None:
    assert synth.default_settings("bn", (3, 32, 32)) == SYNTH_SETTINGS["bn"]["small"]
    assert synth.default_settings("bn", (3, 224, 224)) == SYNTH_SETTINGS["bn"]["large"]
    assert synth.default_settings("bn", (3, 64, 64)) == SYNTH_SETTINGS["bn"]["small"]  # the boundary is inclusive
    assert synth.default_settings("bn", (3, 65, 64)) == SYNTH_SETTINGS["bn"]["large"]
    net = _bn_net()
    with torch.no_grad():
        res = distill(net, (3, 8, 8), n=4, steps=2, seed=0)
    assert res.steps == 2 and res.final_loss < res.initial_loss


def test_noise_method_is_standard_gaussian() -> None:
    x = synthesize(_bn_net(), (3, 16, 16), n=32, method="noise", seed=0)
    assert x.shape == (32, 3, 16, 16)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


def test_resnet20_bn_loss_drops(resnet20: nn.Module) -> None:
    res = distill(resnet20, (3, 32, 32), n=16, steps=25, seed=0)
    assert res.final_loss < 0.5 * res.initial_loss


def test_cache_reuses_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = _bn_net()
    calls = []
    real_distill = synth._distill

    def counting(*args, **kwargs):
        calls.append(1)
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(synth, "_distill", counting)
    a = synthetic_batch(net, "tiny/net", (3, 8, 8), n=6, seed=1, cache_dir=tmp_path, steps=4)
    files = list(tmp_path.iterdir())
    assert len(calls) == 1 and len(files) == 1 and files[0].suffix == ".pt"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")], "atomic write leaves no temp file"
    b = synthetic_batch(net, "tiny/net", (3, 8, 8), n=6, seed=1, cache_dir=tmp_path, steps=4)
    assert len(calls) == 1, "second call must load from disk"
    assert torch.equal(a, b)
    loaded = torch.load(files[0], weights_only=True)
    assert torch.equal(loaded["images"], a) and loaded["method"] == "bn"

    # Anything that changes the batch gets its own entry: seed, steps, and the weights themselves.
    synthetic_batch(net, "tiny/net", (3, 8, 8), n=6, seed=2, cache_dir=tmp_path, steps=4)
    synthetic_batch(net, "tiny/net", (3, 8, 8), n=6, seed=1, cache_dir=tmp_path, steps=5)
    with torch.no_grad():
        net[1].running_mean += 1.0
    synthetic_batch(net, "tiny/net", (3, 8, 8), n=6, seed=1, cache_dir=tmp_path, steps=4)
    assert len(calls) == 4 and len(list(tmp_path.glob("*.pt"))) == 4


def test_cache_default_location_and_corrupt_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTODFP_HOME", str(tmp_path))
    net = _plain_net()
    a = synthetic_batch(net, "plain", (3, 8, 8), n=4, seed=0, method="noise")
    (entry,) = (tmp_path / "synthetic").glob("*.pt")
    entry.write_bytes(b"not a checkpoint")
    with pytest.warns(CacheWarning, match="is corrupt .*; recomputing"):
        b = synthetic_batch(net, "plain", (3, 8, 8), n=4, seed=0, method="noise")
    assert torch.equal(a, b)
    assert torch.load(entry, weights_only=True)["method"] == "noise"


def test_chunk_sizes() -> None:
    large = (3, 72, 72)
    assert synth.chunk_sizes(256, (3, 32, 32)) == [64] * 4, "small inputs are chunked too"
    assert synth.chunk_sizes(64, large) == [64]
    assert synth.chunk_sizes(256, large) == [64] * 4
    assert synth.chunk_sizes(100, large) == [64, 36]
    assert synth.chunk_sizes(129, large) == [64, 65], "a chunk of one has no batch variance"
    assert synth.chunk_sizes(65, large) == [65]
    for n in (2, 63, 100, 129, 200, 257):
        assert sum(synth.chunk_sizes(n, large)) == n and min(synth.chunk_sizes(n, large)) >= 2


def test_large_batches_are_chunks_and_extend_smaller_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "CHUNK", 4)
    net, shape = _bn_net(), (3, 72, 72)
    calls = []
    real_distill = synth._distill

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(synth, "_distill", counting)
    small = synthetic_batch(net, "tiny/net", shape, n=4, seed=3, cache_dir=tmp_path, steps=2)
    big = synthetic_batch(net, "tiny/net", shape, n=10, seed=3, cache_dir=tmp_path, steps=2)
    assert big.shape == (10, *shape)
    assert torch.equal(big[:4], small), "the first chunk of a larger batch is the smaller batch of the same seed"
    assert calls == [4, 4, 2], "the first chunk came from the cache; the others were distilled once each"
    assert len(list(tmp_path.glob("*.pt"))) == 3
    assert not torch.equal(big[4:8], big[:4]), "chunks use different seeds"
    assert torch.equal(synthetic_batch(net, "tiny/net", shape, n=10, seed=3, cache_dir=tmp_path, steps=2), big)
    assert calls == [4, 4, 2]


def _sized_net() -> nn.Module:
    """A BN net tied to its 64-px input: a flatten into a Linear refuses any other size."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 16 * 16, 5),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.3, 2.0)
    return net.eval()


def test_low_resolution_stage_runs_every_step_and_finishes_at_full_size() -> None:
    net, shape = _bn_net(), (3, 64, 64)
    seen: list[int] = []
    staged = distill(net, shape, n=8, steps=40, lr=0.1, seed=0, low_res=0.75, callback=lambda i, _: seen.append(i))
    assert seen == list(range(40)), "both stages together run the requested steps, numbered in order"
    assert staged.images.shape == (8, *shape) and staged.steps == 40
    assert bn_stat_loss(net, staged.images) == pytest.approx(staged.final_loss, rel=1e-4), "judged at full size"
    assert staged.final_loss < 0.7 * staged.initial_loss
    plain = distill(net, shape, n=8, steps=40, lr=0.1, seed=0)
    assert not torch.allclose(staged.images, plain.images), "the half-size stage changed the batch"
    again = distill(net, shape, n=8, steps=40, lr=0.1, seed=0, low_res=0.75)
    assert torch.equal(staged.images, again.images)
    with pytest.raises(ValueError, match="share"):
        distill(net, shape, n=8, steps=4, seed=0, low_res=1.0)


def test_low_resolution_is_skipped_where_it_cannot_apply() -> None:
    # below twice LOW_RES_MIN_SIDE a side: every step at full size, the very same batch
    small = (3, 2 * synth.LOW_RES_MIN_SIDE - 1, 2 * synth.LOW_RES_MIN_SIDE - 1)
    net = _bn_net()
    assert torch.equal(
        synthesize(net, small, n=4, steps=6, seed=1, low_res=0.5), synthesize(net, small, n=4, steps=6, seed=1)
    )
    # a model tied to its input size refuses half-size inputs: also every step at full size
    sized = _sized_net().train()
    before = {k: v.clone() for k, v in sized.state_dict().items()}
    staged = synthesize(sized, (3, 64, 64), n=4, steps=6, seed=1, low_res=0.5)
    assert torch.equal(staged, synthesize(sized, (3, 64, 64), n=4, steps=6, seed=1))
    for k, v in sized.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed: the size probe must run in eval mode"


def test_low_resolution_share_is_part_of_the_cache_key(tmp_path: Path) -> None:
    net = _bn_net()
    a = synthetic_batch(net, "tiny/net", (3, 64, 64), n=4, seed=0, cache_dir=tmp_path, steps=4)
    b = synthetic_batch(net, "tiny/net", (3, 64, 64), n=4, seed=0, cache_dir=tmp_path, steps=4, low_res=0.5)
    assert not torch.equal(a, b) and len(list(tmp_path.glob("*.pt"))) == 2
    # where no stage can run at half size, the share changes nothing, and neither does the key
    synthetic_batch(net, "tiny/net", (3, 8, 8), n=4, seed=0, cache_dir=tmp_path, steps=4)
    synthetic_batch(net, "tiny/net", (3, 8, 8), n=4, seed=0, cache_dir=tmp_path, steps=4, low_res=0.5)
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_low_resolution_levels_share_the_steps_smallest_size_first() -> None:
    cpu, net = torch.device("cpu"), _bn_net()
    stages = synth._stages(net, (3, 224, 224), "bn", 200, 0.75, 2, cpu)
    assert stages == [((3, 56, 56), 75), ((3, 112, 112), 75), ((3, 224, 224), 50)]
    assert synth._stages(net, (3, 224, 224), "bn", 50, 0.75, 2, cpu) == [
        ((3, 56, 56), 19),
        ((3, 112, 112), 19),
        ((3, 224, 224), 12),
    ], "38 reduced steps: the smaller size takes the rounding down"
    assert synth._stages(net, (3, 224, 224), "bn", 200, 0.75, 1, cpu) == [((3, 112, 112), 150), ((3, 224, 224), 50)]
    # sizes under LOW_RES_MIN_SIDE a side are left out; 240x320 at three levels keeps two
    assert [s for s, _ in synth._stages(net, (3, 240, 320), "bn", 8, 0.5, 3, cpu)] == [
        (3, 60, 80),
        (3, 120, 160),
        (3, 240, 320),
    ]
    assert synth._stages(net, (3, 224, 224), "bn", 200, 0.0, 2, cpu) == [((3, 224, 224), 200)]
    assert synth._stages(net, (3, 224, 224), "noise", 0, 0.75, 2, cpu) == [((3, 224, 224), 0)]
    assert synth._stages(_sized_net(), (3, 64, 64), "bn", 8, 0.5, 2, cpu) == [((3, 64, 64), 8)], "refused size"


def test_two_low_resolution_levels_run_every_step_and_change_the_batch_only_where_they_apply(tmp_path: Path) -> None:
    net, shape = _bn_net(), (3, 128, 128)
    seen: list[int] = []
    two = distill(
        net, shape, n=8, steps=16, lr=0.1, seed=0, low_res=0.5, low_res_levels=2, callback=lambda i, _: seen.append(i)
    )
    assert seen == list(range(16)) and two.images.shape == (8, *shape)
    assert bn_stat_loss(net, two.images) == pytest.approx(two.final_loss, rel=1e-4), "judged at full size"
    one = distill(net, shape, n=8, steps=16, lr=0.1, seed=0, low_res=0.5)
    assert not torch.equal(two.images, one.images), "the quarter-size stage changed the batch"
    with pytest.raises(ValueError, match="low_res_levels"):
        distill(net, shape, n=8, steps=4, seed=0, low_res=0.5, low_res_levels=0)
    # at 64 px the quarter size (16) is under LOW_RES_MIN_SIDE: the same batch as one level, the same key
    kw = {"n": 4, "seed": 0, "cache_dir": tmp_path, "steps": 4, "low_res": 0.5}
    a = synthetic_batch(net, "tiny/net", (3, 64, 64), **kw)
    assert torch.equal(synthetic_batch(net, "tiny/net", (3, 64, 64), low_res_levels=2, **kw), a)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    b = synthetic_batch(net, "tiny/net", shape, low_res_levels=2, **kw)
    assert not torch.equal(b, synthetic_batch(net, "tiny/net", shape, **kw))
    assert len(list(tmp_path.glob("*.pt"))) == 3, "two reduced sizes have a key of their own"


def test_low_resolution_share_in_the_config_and_flag() -> None:
    from autodfp.config import LOW_RES_LEVELS, LOW_RES_SHARE, Config
    from autodfp.errors import PlanError

    assert Config().synth_low_res_for((3, 224, 224)) == LOW_RES_SHARE["large"]
    assert Config().synth_low_res_for((3, 32, 32)) == LOW_RES_SHARE["small"] == 0.0
    assert Config(synth_low_res=0.5).synth_low_res_for((3, 32, 32)) == 0.5
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(PlanError, match="synth_low_res"):
            Config(synth_low_res=bad)
    assert Config().synth_low_res_levels_for((3, 224, 224)) == LOW_RES_LEVELS["large"] == 2
    assert Config().synth_low_res_levels_for((3, 32, 32)) == LOW_RES_LEVELS["small"] == 1
    assert Config(synth_low_res_levels=1).synth_low_res_levels_for((3, 224, 224)) == 1
    for bad_levels in (0, 1.5, True):
        with pytest.raises(PlanError, match="synth_low_res_levels"):
            Config(synth_low_res_levels=bad_levels)  # type: ignore[arg-type]


def test_disagreement_is_bounded_and_zero_for_agreement() -> None:
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    assert float(synth.disagreement(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    far = float(synth.disagreement(logits * 50, -logits * 50))
    assert 0.9 < far <= 1.0, "opposite confident predictions are near the bound"
    g = torch.Generator().manual_seed(1)
    maps = (torch.randn(2, 3, 4, generator=g), {"b": torch.randn(2, 5, generator=g)})
    assert float(synth.disagreement(maps, maps)) == 0.0
    moved = (maps[0] + 0.5, {"b": maps[1]["b"]})
    assert 0.0 < float(synth.disagreement(maps, moved)) < 1.0


def test_competition_moves_the_batch_to_where_the_student_disagrees() -> None:
    """Adaptive DeepInversion: with a student and a weight, the batch raises their disagreement;
    neither network is changed, and the student's gradient flags come back as they were."""
    teacher, student = _bn_net(0), _bn_net(1)
    student.requires_grad_(True)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    plain = distill(teacher, (3, 16, 16), n=8, steps=40, seed=3, method="bn")
    rival = distill(teacher, (3, 16, 16), n=8, steps=40, seed=3, method="bn", student=student, compete=5.0)
    again = distill(teacher, (3, 16, 16), n=8, steps=40, seed=3, method="bn", student=student, compete=5.0)
    assert torch.equal(rival.images, again.images), "deterministic for a seed"
    with torch.no_grad():
        d_plain = float(synth.disagreement(teacher(plain.images), student(plain.images)))
        d_rival = float(synth.disagreement(teacher(rival.images), student(rival.images)))
    assert d_rival > d_plain
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.requires_grad for p in student.parameters())
    unused = distill(teacher, (3, 16, 16), n=8, steps=40, seed=3, method="bn", student=student, compete=0.0)
    assert torch.equal(unused.images, plain.images), "weight 0 is the plain objective"
    with pytest.raises(ValueError, match="compete"):
        distill(teacher, (3, 16, 16), n=8, steps=2, student=student, compete=-1.0)


class _TwiceBN(nn.Module):
    """One BN layer run twice per forward pass: two terms of the loss, as the hooks see them."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _bn_net(1)[:3]
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        y = self.body[1](self.conv(y))  # the same BN again, on other activations
        return self.head(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("make_net", [_bn_net, _TwiceBN])
@pytest.mark.parametrize("size", [1, 3, 7])
def test_micro_batches_give_the_whole_batch_loss_and_gradient(make_net: type, size: int) -> None:
    net = make_net().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = (torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 1.5 + 0.3).requires_grad_(True)
    with synth._BNStatLoss(synth.bn_layers(net)) as whole:
        net(x)
        expected = whole.pop()
    expected.backward()
    assert x.grad is not None
    grad, x.grad = x.grad.clone(), None
    moments = synth._BNMoments(synth.bn_layers(net))
    with moments:
        parts = x.split(size)
        loss = moments.loss(net, parts)
    moments.backward(loss)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert torch.allclose(x.grad, grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()))
    assert float(grad.abs().max()) > 0


def test_micro_batched_synthesis_converges_like_the_whole_batch() -> None:
    net, shape = _bn_net(), (3, 16, 16)
    whole = distill(net, shape, n=12, steps=30, lr=0.1, seed=2, method="bn", micro_batch=0)
    parts = distill(net, shape, n=12, steps=30, lr=0.1, seed=2, method="bn", micro_batch=5)
    assert parts.initial_loss == pytest.approx(whole.initial_loss, rel=1e-5)
    assert parts.final_loss == pytest.approx(whole.final_loss, rel=1e-2), "the same objective, step for step"
    assert parts.final_loss < 0.7 * parts.initial_loss
    assert bn_stat_loss(net, parts.images) == pytest.approx(parts.final_loss, rel=1e-4)
    assert float((parts.images - whole.images).abs().mean()) < 1e-3, "only float rounding tells them apart"


def test_micro_batch_size_by_input_size_and_device() -> None:
    from autodfp._micro import micro_batch_size
    from autodfp.config import MICRO_BATCH_MIN_PARTS, MICRO_BATCH_PIXELS

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    big, small = torch.empty(64, 3, 224, 224), torch.empty(64, 3, 32, 32)
    assert micro_batch_size(big, cpu) == MICRO_BATCH_PIXELS // (224 * 224) < 64
    part = MICRO_BATCH_PIXELS // (112 * 112)
    few = torch.empty(part * (MICRO_BATCH_MIN_PARTS - 1), 3, 112, 112)
    assert micro_batch_size(few, cpu) == few.shape[0], "too few parts to repay a split"
    assert micro_batch_size(torch.empty(part * MICRO_BATCH_MIN_PARTS, 3, 112, 112), cpu) == part
    assert micro_batch_size(small, cpu) >= 64, "CIFAR-size batches are never split"
    assert micro_batch_size(big, cuda) == 64, "an accelerator runs the whole batch"
    assert micro_batch_size(big, cpu, 0) == 64
    assert micro_batch_size(small, cpu, 5) == 5
    assert micro_batch_size(torch.empty(64, 10), cpu) == 64, "no spatial dimensions, nothing to gain"
