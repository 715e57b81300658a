"""Effort presets (issue 26): one word sets the search, distillation and synthesis sizes; an explicit
field always wins; the default is ``balanced``; a run's report records the resolved values."""

from __future__ import annotations

import pytest

import autodfp
from autodfp.config import EFFORT_PRESETS, EFFORTS, Config
from autodfp.errors import PlanError

SMALL, LARGE = (3, 32, 32), (3, 224, 224)


def test_the_default_effort_is_balanced_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTODFP_EFFORT", raising=False)
    assert Config().effort == "balanced"
    monkeypatch.setenv("AUTODFP_EFFORT", "best")
    assert Config().effort == "best"
    monkeypatch.setenv("AUTODFP_EFFORT", "slow")
    with pytest.raises(PlanError, match=r"unknown effort 'slow' \(from \$AUTODFP_EFFORT\); choose from fast, balanced"):
        Config()


@pytest.mark.parametrize("effort", EFFORTS)
def test_a_preset_fills_only_the_fields_left_unset(effort: str) -> None:
    preset = EFFORT_PRESETS[effort]
    cfg = Config(effort=effort).resolved(SMALL, "cpu")
    assert cfg.episodes == preset["episodes"]["small"]
    assert cfg.distill_steps == preset["distill_steps"]["small"]
    assert cfg.distill_inputs == preset["distill_inputs"]["small"]
    mine = Config(effort=effort, episodes=7, distill_steps=11, distill_inputs=0, synth_low_res=0.5).resolved(LARGE)
    assert (mine.episodes, mine.distill_steps, mine.distill_inputs, mine.synth_low_res) == (7, 11, 0, 0.5)


def test_presets_grow_from_fast_to_best() -> None:
    for key in ("small", "large", "large_cpu"):
        steps = [EFFORT_PRESETS[e]["distill_steps"][key] for e in EFFORTS]
        assert steps == sorted(steps) and steps[0] == 0
    assert Config(effort="fast").resolved(SMALL).distill_steps == 0  # fast is the pipeline before presets


def test_large_inputs_are_distilled_on_an_accelerator_not_on_a_cpu_by_balanced() -> None:
    cpu = Config(effort="balanced").resolved(LARGE, "cpu")
    gpu = Config(effort="balanced").resolved(LARGE, "cuda")
    assert cpu.distill_steps == 0 < gpu.distill_steps
    fast = Config(effort="fast").resolved(LARGE, "cpu")
    # on a CPU, balanced at 224 px is the fast pipeline with full-size synthesis
    assert cpu == fast.replace(effort="balanced", synth_low_res=0.0)
    assert fast.synth_low_res is None and cpu.synth_low_res == 0.0
    best = Config(effort="best").resolved(LARGE, "cpu")
    assert best.synth_low_res == 0.0 and best.distill_steps > 0


def test_the_report_records_the_effort_and_the_resolved_values(tiny_cnn) -> None:
    cfg = Config(effort="balanced", distill_steps=2, distill_inputs=0, synth_steps=2, refine_inputs=8)
    res = autodfp.prune(tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=cfg, progress=False)
    recorded = res.report["config"]
    assert recorded["effort"] == "balanced" and recorded["distill_steps"] == 2
    assert recorded["episodes"] == EFFORT_PRESETS["balanced"]["episodes"]["small"]
    assert res.report["distill_steps"] == 2


def test_the_cli_flag_sets_the_effort(tmp_path, capsys) -> None:
    from autodfp.cli import main

    code = main(["prune", "resnet20_cifar10", "--uniform", "0.5", "--effort", "medium", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--effort" in err and "medium" in err
