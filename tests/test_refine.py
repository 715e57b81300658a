"""Sequential drift correction: exact where it should be, an improvement where it claims to be."""

from __future__ import annotations

import copy

import pytest
import torch

from autodfp.compress.plan import Plan
from autodfp.compress.reconstruct import Compensation, fit_drift, fold_into_consumer
from autodfp.compress.refine import Refiner, refine
from autodfp.compress.surgery import Pruner
from autodfp.errors import PlanError
from autodfp.models.resnet_cifar import resnet20

SHAPE = (3, 32, 32)


def _randomised_resnet20(seed: int = 0) -> torch.nn.Module:
    """resnet20 with non-trivial BN statistics, so pruning actually changes its function."""
    torch.manual_seed(seed)
    net = resnet20()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.4)
    return net.eval()


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_fold_with_kept_correction_hand_computed() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], dtype=torch.float64)
    kept, pruned = torch.tensor([0, 2]), torch.tensor([1])
    comp = Compensation(
        torch.tensor([[0.5, 0.0]], dtype=torch.float64),
        torch.tensor([1.0], dtype=torch.float64),
        K=torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64),
        d=torch.tensor([0.0, -1.0], dtype=torch.float64),
    )
    new, delta = fold_into_consumer(w, comp, kept, pruned)
    # W_k K + W_p A: [[1,3],[0,4]] @ K + [[2],[-1]] @ [[0.5, 0]]
    assert torch.allclose(new, torch.tensor([[1 * 2 + 3 * 1 + 1.0, 3.0], [4.0 - 0.5, 4.0]], dtype=torch.float64))
    # W_p c + W_k d
    assert torch.allclose(delta, torch.tensor([2.0 - 3.0, -1.0 - 4.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        Compensation(comp.A, comp.c, K=torch.eye(3, dtype=torch.float64), d=torch.zeros(3, dtype=torch.float64))


def test_fit_drift_keeps_an_exact_prior_and_recovers_a_linear_drift() -> None:
    g = torch.Generator().manual_seed(0)
    kept, pruned = torch.tensor([0, 1, 3]), torch.tensor([2])
    x = torch.randn(500, 4, generator=g, dtype=torch.float64)
    x[:, 2] = 0.5 * x[:, 0] - x[:, 3] + 0.25  # the pruned channel is exactly predictable
    exact = Compensation(
        torch.tensor([[0.5, 0.0, -1.0]], dtype=torch.float64), torch.tensor([0.25], dtype=torch.float64)
    )
    same = fit_drift(x, x, exact, kept, pruned, ridge=1e-2)
    assert torch.allclose(same.A, exact.A) and torch.allclose(same.c, exact.c)
    assert torch.allclose(same.K, torch.eye(3, dtype=torch.float64)) and torch.allclose(
        same.d, torch.zeros(3, dtype=torch.float64)
    )

    drifted = x.clone()
    drifted[:, kept] = x[:, kept] * 0.5 - 1.0  # upstream pruning scaled and shifted the kept channels
    fixed = fit_drift(x, drifted, exact, kept, pruned, ridge=0.0)
    pred = drifted[:, kept] @ fixed.K.T + fixed.d
    assert torch.allclose(pred, x[:, kept], atol=1e-8)
    assert torch.allclose(drifted[:, kept] @ fixed.A.T + fixed.c, x[:, pruned], atol=1e-8)


def test_refine_of_a_zero_ratio_plan_is_output_identical() -> None:
    net = _randomised_resnet20()
    pruner = Pruner(net, SHAPE)
    plan = Plan.uniform(pruner.graph, 1.0, strategy="lsq")
    decisions = refine(pruner, pruner.decide(plan), _inputs(8, 1))
    x = _inputs(4, 2)
    with torch.no_grad():
        assert torch.allclose(pruner.apply(plan, decisions).model(x), net(x), atol=1e-5)


def test_refine_keeps_an_exact_duplicate_merge_output_identical() -> None:
    net = _randomised_resnet20()
    block = net.layer2[1]
    with torch.no_grad():  # channel 3 of conv1 becomes 2× channel 5 after BN
        block.conv1.weight[3] = block.conv1.weight[5]
        for name in ("running_mean", "running_var"):
            getattr(block.bn1, name)[3] = getattr(block.bn1, name)[5]
        block.bn1.weight[3] = 2 * block.bn1.weight[5]
        block.bn1.bias[3] = 2 * block.bn1.bias[5]
    pruner = Pruner(net, SHAPE)
    group = next(g.name for g in pruner.graph.prunable if g.producer.conv == "layer2.1.conv1")
    keep = [c for c in range(pruner.graph.get(group).channels) if c != 3]
    plan = Plan({group: len(keep) / pruner.graph.get(group).channels}, strategy="nm", keep={group: keep})
    decisions = refine(pruner, pruner.decide(plan), _inputs(16, 1), include_unpruned=False)
    assert decisions[group].compensation.info.get("refined")
    x = _inputs(4, 2)
    with torch.no_grad():
        assert torch.allclose(pruner.apply(plan, decisions).model(x), net(x), atol=1e-4)


def test_refine_reduces_the_output_error_of_a_deep_prune_and_matches_the_masked_model() -> None:
    net = _randomised_resnet20()
    pruner = Pruner(net, SHAPE)
    plan = Plan.uniform(pruner.graph, 0.5, strategy="lsq")
    calib, held_out = _inputs(32, 1), _inputs(32, 3)
    plain = pruner.decide(plan)
    refiner = Refiner(pruner, calib)
    refined = refiner(plain)
    assert refiner(plain).keys() == refined.keys()  # reusable: the working copy is restored
    with torch.no_grad():
        ref = net(held_out)
        err_plain = (pruner.apply(plan, plain).model(held_out) - ref).pow(2).mean()
        phys = pruner.apply(plan, refined).model
        err_refined = (phys(held_out) - ref).pow(2).mean()
        masked = torch.func.functional_call(net, pruner.masked_state(refined), (held_out,))
    assert err_refined < 0.7 * err_plain
    assert torch.allclose(phys(held_out), masked, atol=1e-4)
    assert torch.equal(net(held_out), ref)  # the original model is untouched


def test_refine_rejects_inputs_of_the_wrong_shape() -> None:
    pruner = Pruner(_randomised_resnet20(), SHAPE)
    with pytest.raises(PlanError, match="refinement inputs"):
        Refiner(pruner, torch.zeros(4, 3, 16, 16))
    with pytest.raises(PlanError, match="ridge"):
        Refiner(pruner, _inputs(2, 0), ridge=-1.0)
    with pytest.raises(PlanError, match="ridge"):
        Refiner(pruner, _inputs(2, 0), dims_ridge=-1.0)


def test_refine_is_deterministic() -> None:
    pruner = Pruner(_randomised_resnet20(), SHAPE)
    plan = Plan.uniform(pruner.graph, 0.6, strategy="lsq")
    calib = _inputs(16, 1)
    a = refine(pruner, pruner.decide(plan), calib)
    b = refine(copy.deepcopy(pruner), pruner.decide(plan), calib)
    for name in a:
        assert torch.equal(a[name].compensation.K, b[name].compensation.K)


def test_bench_methods_take_a_refine_suffix() -> None:
    from autodfp.eval.bench import parse_method

    assert parse_method("lsq+l1+refine") == ("lsq", "l1", True)
    assert parse_method("lsq+refine") == ("lsq", "l1", True)
    assert parse_method("nm+cluster") == ("nm", "cluster", False)
    with pytest.raises(PlanError, match="strategy\\+criterion"):
        parse_method("lsq+l1+refine+l2")
    with pytest.raises(PlanError, match="unknown criterion"):
        parse_method("lsq+fancy")


def test_a_huge_dims_ridge_leaves_the_prior_in_place() -> None:
    pruner = Pruner(_randomised_resnet20(), SHAPE)
    plan = Plan.uniform(pruner.graph, 0.5, strategy="lsq")
    plain = pruner.decide(plan)
    stiff = refine(pruner, plain, _inputs(8, 1), dims_ridge=1e12)
    for name, dec in stiff.items():
        k = dec.compensation.K
        assert torch.allclose(k, torch.eye(k.shape[0], dtype=k.dtype), atol=1e-6)
        if name in plain:
            assert torch.allclose(dec.compensation.A, plain[name].compensation.A, atol=1e-6)


def test_search_refiner_fits_on_the_first_inputs_only() -> None:
    from autodfp.api import Pipeline
    from autodfp.config import DEFAULTS
    from autodfp.models import get_config

    SEARCH_REFINE_INPUTS = DEFAULTS.search_refine_inputs
    net = _randomised_resnet20()
    _search_refiner = Pipeline(net, get_config("resnet20_cifar10"), SHAPE, device="cpu").search_refiner
    pruner = Pruner(net, SHAPE)
    small = Refiner(pruner, _inputs(SEARCH_REFINE_INPUTS, 0))
    assert _search_refiner(small) is small and _search_refiner(None) is None
    big = Refiner(pruner, _inputs(SEARCH_REFINE_INPUTS + 5, 0), ridge=0.5, dims_ridge=2.0)
    cut = _search_refiner(big)
    assert torch.equal(cut.inputs, big.inputs[:SEARCH_REFINE_INPUTS])
    assert (cut.ridge, cut.dims_ridge, cut.max_positions, cut.pruner) == (0.5, 2.0, big.max_positions, pruner)


def test_refinement_batch_size_defaults_by_input_size() -> None:
    from autodfp.config import REFINE_INPUTS, Config

    assert Config().refine_inputs_for((3, 32, 32)) == REFINE_INPUTS["small"] == 64
    assert Config().refine_inputs_for((3, 224, 224)) == REFINE_INPUTS["large"] == 128
    assert Config(refine_inputs=9).refine_inputs_for((3, 224, 224)) == 9
    with pytest.raises(PlanError, match="^refine_inputs must be"):
        Config(refine_inputs=1)


def test_refiner_targets_are_the_eval_mode_models_even_if_it_was_left_training() -> None:
    net = _randomised_resnet20()
    pruner = Pruner(net, SHAPE)
    plan = Plan.uniform(pruner.graph, 0.5, strategy="lsq")
    x = _inputs(8, 1)
    expected = Refiner(pruner, x)(pruner.decide(plan))
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()  # as a caller (or a bug upstream) may leave it
    got = Refiner(pruner, x)(pruner.decide(plan))
    assert net.training, "the caller's mode is restored"
    assert all(torch.equal(v, stats[k]) for k, v in net.state_dict().items()), "BN running stats untouched"
    for name, dec in expected.items():
        assert torch.allclose(got[name].compensation.K, dec.compensation.K)
        assert torch.allclose(got[name].compensation.A, dec.compensation.A)


def test_select_dims_ridge_keeps_what_the_score_prefers() -> None:
    from autodfp.compress.refine import select_dims_ridge

    pruner = Pruner(_randomised_resnet20(), SHAPE)
    decisions = pruner.decide(Plan.uniform(pruner.graph, 0.5, strategy="lsq"))
    refiner = Refiner(pruner, _inputs(16, 1))
    first = next(iter(decisions))

    prior = decisions[first].compensation.A

    def shrinkage(refined) -> float:
        """A stand-in score, larger the closer the first group's fit stays to its prior.

        Nothing upstream of the first group is pruned, so its fit is one ridge regression per pruned
        channel, whose distance from the prior shrinks monotonically as the ridge grows.
        """
        return -float((refined[first].compensation.A - prior).norm())

    chosen, refined, scores = select_dims_ridge(refiner, decisions, shrinkage, grid=(0.0, 3.0, 30.0))
    assert list(scores) == [0.0, 3.0, 30.0] and chosen == 30.0 == max(scores, key=scores.get)
    direct = Refiner(pruner, _inputs(16, 1), dims_ridge=30.0)(decisions)
    assert torch.allclose(refined[first].compensation.A, direct[first].compensation.A)
    assert refiner.dims_ridge == 3.0, "the override is per call"
    chosen, _, _ = select_dims_ridge(refiner, decisions, lambda d: 1.0, grid=(10.0, 1.0))
    assert chosen == 10.0, "ties keep the first value"
    with pytest.raises(PlanError):
        select_dims_ridge(refiner, decisions, shrinkage, grid=())
    with pytest.raises(PlanError):
        refiner(decisions, dims_ridge=-1.0)
