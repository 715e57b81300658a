"""Surgery invariants: identity at ratio 1, exact duplicate merges, analytic MACs, saved forms."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from autodfp.compress.plan import Plan, n_keep
from autodfp.compress.surgery import Pruner
from autodfp.errors import PlanError
from autodfp.eval.export import load_pruned, onnx_check, save_pruned
from autodfp.eval.metrics import profile
from autodfp.models import get_config, load_model
from autodfp.models.resnet_cifar import resnet20

ZOO = ["resnet20_cifar10", "resnet56_cifar10", "mobilenet_v1_075_imagenet", "mobilenet_v2_100_imagenet_bnfolded"]


def _shape(name: str) -> tuple[int, int, int]:
    s = get_config(name).preprocessing.input_size
    return (3, s, s)


@pytest.fixture(scope="module")
def resnet20_pretrained():
    return load_model("resnet20_cifar10")[0]


@pytest.mark.parametrize("name", ZOO)
def test_zero_ratio_prune_is_output_identical(name):
    net, _ = load_model(name)
    shape = _shape(name)
    calib = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    pruner = Pruner(net, shape, calibration=calib)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net(x)
        for strategy in ("none", "autodfp", "lsq"):
            out = pruner.apply(Plan.uniform(pruner.graph, 1.0, strategy=strategy)).model(x)
            assert (out - ref).abs().max().item() <= 1e-5
        assert torch.equal(net(x), ref)  # the original model is untouched


def _make_duplicate(net, block, p: int, k: int, alpha: float) -> None:
    """Channel p of ``block.conv1`` becomes an exact positive multiple α of channel k after BN."""
    with torch.no_grad():
        block.conv1.weight[p] = block.conv1.weight[k]
        bn = block.bn1
        bn.running_mean[p] = bn.running_mean[k]
        bn.running_var[p] = bn.running_var[k]
        bn.weight[p] = alpha * bn.weight[k]
        bn.bias[p] = alpha * bn.bias[k]


@pytest.mark.parametrize("strategy", ["nm", "autodfp"])
def test_pruning_an_exact_duplicate_with_reconstruction_is_output_identical(resnet20_pretrained, strategy):
    net = resnet20_pretrained
    import copy

    net = copy.deepcopy(net)
    block = net.layer2[1]
    p, k = 5, 11
    _make_duplicate(net, block, p, k, alpha=1.7)
    pruner = Pruner(net, (3, 32, 32))
    name = "layer2.1.conv1"
    keep = [i for i in range(32) if i != p]
    ratio = 31 / 32
    assert n_keep(32, ratio) == 31
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x)
        merged = pruner.apply(
            Plan(
                {name: ratio},
                strategy=strategy,
                keep={name: keep},
                params={"strength": 1.0} if strategy == "autodfp" else {},
            )
        ).model
        plain = pruner.apply(Plan({name: ratio}, strategy="none", keep={name: keep})).model
        assert merged.layer2[1].conv1.out_channels == 31
        assert (merged(x) - ref).abs().max().item() <= 1e-5
        assert (plain(x) - ref).abs().max().item() > 1e-3  # without the merge the output does change


def test_macs_after_uniform_prune_equal_the_analytic_count():
    net, _ = load_model("resnet56_cifar10")
    pruner = Pruner(net, (3, 32, 32))
    ratio = 0.5
    pruned = pruner.apply(Plan.uniform(pruner.graph, ratio, strategy="none")).model

    def analytic(r: float) -> int:
        total = 32 * 32 * 16 * 3 * 9 + 64 * 10  # stem conv + linear
        cin = 16
        for width, hw in ((16, 32), (32, 16), (64, 8)):
            k = n_keep(width, r)
            for _ in range(9):
                total += hw * hw * k * cin * 9 + hw * hw * width * k * 9  # conv1 (out pruned), conv2 (in pruned)
                cin = width
        return total

    assert analytic(1.0) == 125_485_696
    assert profile(pruned, (3, 32, 32)).total_macs == analytic(ratio)


def test_masked_state_computes_the_physically_pruned_function(resnet20_pretrained):
    pruner = Pruner(resnet20_pretrained, (3, 32, 32))
    plan = Plan.uniform(pruner.graph, 0.6, strategy="autodfp", params={"strength": 0.7})
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        physical = pruner.apply(plan).model(x)
        masked = functional_call(pruner.model, pruner.masked_state(plan), (x,))
    assert (physical - masked).abs().max().item() <= 1e-4


def test_mobilenet_v2_without_bn_needs_and_uses_a_calibration_batch():
    net, _ = load_model("mobilenet_v2_100_imagenet_bnfolded")
    shape = _shape("mobilenet_v2_100_imagenet_bnfolded")
    with pytest.raises(PlanError, match="calibration batch"):
        Pruner(net, shape).apply(Plan.uniform(Pruner(net, shape).graph, 0.9, strategy="autodfp"))
    calib = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    pruner = Pruner(net, shape, calibration=calib)
    out = pruner.apply(Plan.uniform(pruner.graph, 0.9, strategy="autodfp")).model(calib[:1])
    assert out.shape == (1, 1001) and torch.isfinite(out).all()


def test_saved_forms_reload_with_identical_outputs(tmp_path, resnet20_pretrained):
    cfg = get_config("resnet20_cifar10")
    pruner = Pruner(resnet20_pretrained, (3, 32, 32))
    result = pruner.apply(Plan.uniform(pruner.graph, 0.5, strategy="lsq", model=cfg.name))
    paths = save_pruned(result, tmp_path / "out", cfg, (3, 32, 32))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = result.model(x)
        ts = torch.jit.load(str(paths["torchscript"]))
        assert torch.equal(ts(x), ref)
        rebuilt, cfg2, plan2 = load_pruned(tmp_path / "out")
        assert torch.equal(rebuilt(x), ref)
    assert cfg2.name == cfg.name and plan2.ratios == result.plan.ratios
    assert Plan.load(paths["plan"]).to_dict() == result.plan.to_dict()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json",
        "model.ts",
        "plan.json",
        "pruned.pt",
    ]
    assert onnx_check(result.model, (3, 32, 32), tmp_path / "m.onnx") < 1e-4


def test_bad_plans_get_clear_errors():
    graph = Pruner(resnet20().eval(), (3, 32, 32)).graph
    cases = [
        (Plan({"layer9.conv1": 0.5}), "unknown group 'layer9.conv1'"),
        (Plan({"layer1.0.conv1": 1.5}), r"must be in \(0, 1\]"),
        (Plan({"layer1.0.conv1": 0.0}), r"must be in \(0, 1\]"),
        (Plan({"layer1.0.conv1": 0.01}), "would remove the whole layer"),
        (Plan({"conv1": 0.5}), "cannot be pruned: coupled"),
        (Plan({"layer1.0.conv1": 0.5}, strategy="magic"), "unknown strategy 'magic'"),
        (Plan({"layer1.0.conv1": 0.5}, criterion="taylor"), "unknown criterion 'taylor'"),
    ]
    for plan, msg in cases:
        with pytest.raises(PlanError, match=msg):
            plan.validate(graph)


def test_plan_json_round_trip_and_bad_files(tmp_path):
    plan = Plan(
        {"a": 0.5, "b": 0.75},
        criterion="cluster",
        strategy="autodfp",
        params={"strength": 0.5},
        layer_params={"a": {"strength": 0.25}},
        model="m",
    )
    plan.save(tmp_path / "p.json")
    again = Plan.load(tmp_path / "p.json")
    assert again.to_dict() == plan.to_dict() and again.params_for("a") == {"strength": 0.25}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.json")


def _bias_free_consumer_net() -> torch.nn.Module:
    """conv-BN-ReLU feeding a conv with neither bias nor BN (as DenseNet's conv2); channel 1 duplicates 0."""
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 12, 12))
        net[0].weight[1] = net[0].weight[0]
        for t in (net[1].weight, net[1].bias, net[1].running_mean, net[1].running_var):
            t[1] = t[0]
    return net.eval()


@pytest.mark.parametrize("strategy", ["mean", "lsq"])
def test_a_consumer_without_bias_or_bn_gets_a_bias(tmp_path, strategy):
    """The compensation's constant needs a home: a bias-free, BN-free consumer gets a bias, in the
    pruned model and in the masked fast path, and a saved model reloads it with identical outputs."""
    net = _bias_free_consumer_net()
    shape = (3, 12, 12)
    pruner = Pruner(net, shape)
    assert pruner.graph.get("0").prunable and pruner.graph.get("0").consumer_bns == [None]
    kept = [0, 2, 3, 4, 5, 6, 7]
    plan = Plan({"0": 7 / 8}, strategy=strategy, keep={"0": kept}, params={"ridge": 0.0} if strategy == "lsq" else {})
    result = pruner.apply(plan)
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        masked = functional_call(net, pruner.masked_state(pruner.decide(plan)), (x,))
        out = result.model(x)
        assert torch.allclose(out, masked, atol=1e-5), "physical == masked with the new bias"
        if strategy == "lsq":  # an exact duplicate: merged output-identically, no constant left
            assert torch.allclose(out, net(x), atol=1e-5)
        else:  # the mean of a ReLU channel is a positive constant: it must land in a bias
            assert result.model[3].bias is not None and float(result.model[3].bias.abs().max()) > 0
            assert result.model[3].bias.requires_grad == result.model[3].weight.requires_grad
    assert net[3].bias is None, "the original model is left unchanged"
    cfg = get_config("resnet20_cifar10")
    save_pruned(result, tmp_path / "o", cfg, shape)
    rebuilt, _, _ = load_pruned(tmp_path / "o", model=net)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)


def test_refinement_fits_a_bias_free_consumer_and_restores_its_working_copy():
    """The default pipeline (lsq + refinement + final choice) on a consumer with neither a bias nor a BN."""
    import autodfp
    from autodfp.api import Pipeline, user_model_config
    from autodfp.config import Config

    net = _bias_free_consumer_net()
    shape = (3, 12, 12)
    cfg = Config(synth_steps=2, calibration_inputs=16, refine_inputs=16, reward_inputs=16, select_inputs=16)
    res = autodfp.prune(net, input_shape=shape, uniform=0.5, config=cfg.replace(final_choice=False), progress=False)
    assert res.report["refine"] is True and res.model[3].bias is not None
    assert net[3].bias is None
    pipe = Pipeline(net, user_model_config(net, shape, "t"), shape, cfg, progress=False)
    pruner = pipe.pruner(synthesising=True)
    refiner = pipe.refiner(pruner)
    refined = refiner(pruner.decide(Plan.uniform(pruner.graph, 0.5)))
    assert refiner._work_model()[3].bias is None, "the reused working copy is restored"
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        physical = pruner.apply(Plan.uniform(pruner.graph, 0.5), refined).model(x)
        masked = functional_call(net, pruner.masked_state(refined), (x,))
    assert torch.allclose(physical, masked, atol=1e-5)
