"""The plan of work (issue 26): the stages a prune will run, its synthetic batches and their cache
state, an estimate made before any work, and ``autodfp prune --dry-run``, which only prints it."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import autodfp
from autodfp.api import plan_work
from autodfp.config import Config
from autodfp.synth.distill import cache_entry_paths, synthetic_batch
from autodfp.workplan import STAGES, WorkPlan, format_duration

SHAPE = (3, 16, 16)
#: every synthesis short, so a plan's batches are cheap to make for real
QUICK: dict[str, Any] = {
    "synth_steps": 2,
    "refine_inputs": 8,
    "reward_inputs": 8,
    "calibration_inputs": 8,
    "select_inputs": 8,
}


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache of synthetic inputs of the test's own (``$AUTODFP_HOME``)."""
    monkeypatch.setenv("AUTODFP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _plan(model: nn.Module, config: Config, **budget: Any) -> WorkPlan:
    return plan_work(model, input_shape=SHAPE, config=config, device="cpu", **budget)


def _check_figures(work: WorkPlan) -> None:
    """Every estimate positive and finite, the total their sum, the dict JSON and the text a line a stage."""
    assert work.stages and all(math.isfinite(s.seconds) and s.seconds >= 0 for s in work.stages)
    assert work.total_seconds > 0 and math.isfinite(work.total_seconds)
    assert work.total_seconds == pytest.approx(sum(s.seconds for s in work.stages))
    d = json.loads(json.dumps(work.to_dict(), allow_nan=False))
    assert d["total_seconds"] == pytest.approx(sum(s["seconds"] for s in d["stages"]), abs=0.05)
    assert [s["name"] for s in d["stages"]] == work.names
    lines = work.render().splitlines()
    assert lines[0].startswith("plan of work (estimated on cpu") and lines[1 + len(work.stages)].split()[0] == "total"
    assert lines[2 + len(work.stages) :] == [f"  note: {n}" for n in work.notes]
    assert [ln.split()[0] for ln in lines[1 : 1 + len(work.stages)]] == [s.split()[0] for s in work.names]
    assert work.names == [s for s in STAGES if s in work.names], "stages come in the order they run"


@pytest.mark.parametrize(
    ("budget", "changes", "stages"),
    [
        ({"uniform": 0.5}, {}, ["synthesis", "pruning", "refinement", "final choice"]),
        ({"macs_ratio": 0.6}, {"episodes": 3}, ["synthesis", "search", "pruning", "refinement", "final choice"]),
        ({"uniform": 0.5}, {"refine": False}, ["pruning"]),  # BN statistics only: no batch at all
        ({"uniform": 0.5}, {"refine": False, "strategy": "none"}, ["pruning"]),
        ({"uniform": 0.5}, {"final_choice": False, "refine_dims_ridge": 3.0}, ["synthesis", "pruning", "refinement"]),
        ({"macs_ratio": 0.6}, {"episodes": 3, "refine": False}, ["synthesis", "search", "pruning", "final choice"]),
        (
            {"uniform": 0.5},
            {"distill_steps": 3, "distill_inputs": 8},
            ["synthesis", "pruning", "refinement", "final choice", "distillation"],
        ),
    ],
)
def test_the_plan_lists_the_stages_that_will_run(
    tiny_cnn: nn.Module, home: Path, budget: dict, changes: dict, stages: list[str]
) -> None:
    work = _plan(tiny_cnn, Config(effort="fast", **QUICK, **changes), **budget)
    assert work.names == stages
    _check_figures(work)


def test_the_batches_follow_the_run_and_the_cache_flag_flips_once_made(tiny_cnn: nn.Module, home: Path) -> None:
    cfg = Config(effort="fast", distill_steps=2, distill_inputs=8, **QUICK)
    before = _plan(tiny_cnn, cfg, uniform=0.5)
    purposes = [b.purpose for b in before.batches]
    assert purposes == [
        "calibration",
        "refinement",
        "reward (final choice)",
        "distillation pool: reward batch",
        "distillation pool: refinement batch",
        "distillation pool",
    ]
    assert not any(b.cached for b in before.batches)
    # the refinement batch is the calibration's (same seed and size); the pool reuses it, and the
    # final choice's reward batch (as many inputs and steps here)
    assert [b.reused for b in before.batches] == [False, True, False, True, True, False]
    assert before.stage("synthesis") is not None and before.stage("synthesis").seconds > 0  # type: ignore[union-attr]

    result = autodfp.prune(tiny_cnn, input_shape=SHAPE, uniform=0.5, config=cfg, device="cpu", progress=False)
    assert [s["name"] for s in result.report["work_plan"]["stages"]] == before.names
    assert set(result.report["stage_seconds"]) <= set(STAGES) and "synthesis" in result.report["stage_seconds"]

    after = _plan(tiny_cnn, cfg, uniform=0.5)
    assert all(b.cached for b in after.batches), [b.describe() for b in after.batches]
    assert after.stage("synthesis").seconds == 0  # type: ignore[union-attr]
    assert {c.path for b in after.batches for c in b.chunks} <= {str(p) for p in (home / "synthetic").iterdir()}


def test_the_cache_path_function_names_the_files_the_synthesis_writes(tiny_cnn: nn.Module, tmp_path: Path) -> None:
    shape = (3, 64, 64)  # large enough for a half-size stage, which is part of the key
    kwargs: dict[str, Any] = {"n": 70, "seed": 5, "steps": 1, "low_res": 0.5, "cache_dir": tmp_path}
    expected = cache_entry_paths(tiny_cnn, "tiny", shape, **kwargs)
    assert len(expected) == 2 and not any(p.exists() for p in expected)  # 64 + 6 inputs
    synthetic_batch(tiny_cnn, "tiny", shape, **kwargs)
    assert sorted(expected) == sorted(tmp_path.iterdir())
    other = cache_entry_paths(tiny_cnn, "tiny", shape, **{**kwargs, "low_res": 0.0})
    assert not set(other) & set(expected), "the low-resolution share is part of the key"


def test_a_long_run_is_probed_and_the_probe_leaves_the_run_unchanged(tiny_cnn: nn.Module, home: Path) -> None:
    cfg = Config(effort="balanced", episodes=500, distill_steps=4000, synth_steps=500, refine_inputs=64)
    state = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    torch.manual_seed(7)
    plan_work(tiny_cnn, input_shape=SHAPE, config=cfg, device="cpu", macs_ratio=0.6, probe=False)
    unprobed = torch.get_rng_state()
    torch.manual_seed(7)
    work = _plan(tiny_cnn, cfg, macs_ratio=0.6)
    assert torch.equal(torch.get_rng_state(), unprobed), "the probe forks the RNG"
    assert all(torch.equal(state[k], v) for k, v in tiny_cnn.state_dict().items()), "and trains only copies"
    assert work.names == ["synthesis", "search", "pruning", "refinement", "final choice", "distillation"]
    assert {"synthesis at 16x16", "refinement", "decisions", "distillation", "SAC step"} <= set(work.probes)
    assert all(work.stage(s).measured for s in ("synthesis", "search", "distillation"))  # type: ignore[union-attr]
    assert not work.notes, work.notes
    _check_figures(work)
    # a short run is not worth probing: only its one forward pass is timed
    short = _plan(tiny_cnn, Config(effort="fast", episodes=2, **QUICK), macs_ratio=0.6)
    assert set(short.probes) == {"forward pass"}
    _check_figures(short)


def test_a_plan_without_probes_runs_nothing_but_is_complete(tiny_cnn: nn.Module, home: Path) -> None:
    work = plan_work(tiny_cnn, input_shape=SHAPE, uniform=0.5, config=Config(effort="fast"), device="cpu", probe=False)
    assert not work.probes and work.notes
    _check_figures(work)


def test_the_plan_refuses_what_the_run_refuses(tiny_cnn: nn.Module) -> None:
    with pytest.raises(autodfp.AutoDFPError, match="exactly one of"):
        plan_work(tiny_cnn, input_shape=SHAPE)
    with pytest.raises(autodfp.AutoDFPError, match="unknown reward"):
        plan_work(tiny_cnn, input_shape=SHAPE, uniform=0.5, reward="magic")


def test_a_uniform_search_plays_one_episode(tiny_cnn: nn.Module, home: Path) -> None:
    work = _plan(tiny_cnn, Config(effort="fast", **QUICK), macs_ratio=0.6, search="uniform")
    search = work.stage("search")
    assert search is not None and search.sizes["episodes"] == 1 and search.sizes["method"] == "uniform"


def test_every_progress_bar_says_its_stage(tiny_cnn: nn.Module, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import autodfp._progress as progress

    labels: list[str] = []
    real = progress.progress_bar

    def recording(*args: Any, **kwargs: Any) -> Any:
        labels.append(kwargs.get("desc", ""))
        return real(*args, **{**kwargs, "enabled": False})

    monkeypatch.setattr(progress, "progress_bar", recording)
    cfg = Config(effort="fast", episodes=2, search="random", distill_steps=2, distill_inputs=0, tol=0.1, **QUICK)
    autodfp.prune(tiny_cnn, input_shape=SHAPE, macs_ratio=0.6, config=cfg, device="cpu", progress=True)
    assert set(labels) == {"synthesis (bn)", "search (random)", "refinement", "distillation"}, labels


def test_durations_read_as_estimates_and_the_agent_probe_matches_the_agent() -> None:
    from autodfp.search.env import OBS_NAMES
    from autodfp.workplan import SAC_INPUTS

    assert SAC_INPUTS == len(OBS_NAMES) + 2, "a critic reads the observation and the action"
    assert [format_duration(s) for s in (4.2, 250, 1140, 9000)] == ["~4 s", "~4.2 min", "~19 min", "~2.5 h"]


@pytest.fixture()
def cli_logging() -> Iterator[None]:
    """The CLI configures the ``autodfp`` logger for its process: put it back for the other tests."""
    logger = logging.getLogger("autodfp")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_dry_run_prints_the_plan_writes_nothing_and_still_refuses_bad_input(
    tmp_path: Path, home: Path, cli_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from autodfp.cli.app import main

    out = tmp_path / "out"
    base = ["prune", "resnet20_cifar10", "--out", str(out), "--dry-run", "--synth-steps", "2"]
    assert main([*base, "--macs-ratio", "0.5", "--episodes", "3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("plan of work") and "search" in text and "total" in text.splitlines()[-1]
    assert not out.exists() and not (home / "synthetic").exists(), "a dry run synthesises and writes nothing"

    assert main([*base, "--uniform", "0.5", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["work_plan"]
    assert [s["name"] for s in plan["stages"]] == ["synthesis", "pruning", "refinement", "final choice"]
    assert not out.exists()

    for bad in (["--uniform", "0.01"], ["--uniform", "0.5", "--reward", "magic"], ["--uniform", "1.5"]):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err
        assert not out.exists()
    # a dry run needs no --out: it writes nothing
    no_out = ["prune", "resnet20_cifar10", "--dry-run", "--synth-steps", "2", "--uniform", "0.5"]
    assert main(no_out) == 0
    assert capsys.readouterr().out.startswith("plan of work")
    (out / "mine").mkdir(parents=True)  # a folder of the user's: a run would be refused there
    assert main([*base, "--uniform", "0.5"]) == 2
    assert "not an autodfp output" in capsys.readouterr().err


def test_the_distillation_is_timed_on_a_student_of_the_budgets_size(tiny_cnn: nn.Module) -> None:
    """The estimate times a step on a uniformly pruned copy: narrow layers run below their MACs'
    share of the time on a CPU, so the unpruned model's step scaled by the MACs came out short."""
    from autodfp.analysis.graph import find_groups
    from autodfp.compress.surgery import Pruner
    from autodfp.eval.metrics import profile
    from autodfp.search.budget import MacsModel
    from autodfp.workplan import _uniform_student

    graph = find_groups(tiny_cnn, SHAPE)
    student = _uniform_student(Pruner(tiny_cnn, SHAPE, graph=graph), graph, 0.5, None)
    assert student is not None
    share = profile(student, SHAPE).total_macs / MacsModel(tiny_cnn, graph, SHAPE).total_macs
    assert 0.35 < share < 0.65, share
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in tiny_cnn.parameters())
    assert student(torch.zeros(2, *SHAPE)).shape == tiny_cnn(torch.zeros(2, *SHAPE)).shape
