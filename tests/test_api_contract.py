"""The Python API's contract with its caller (issue 25): the model passed in keeps its train/eval
flags, every failure a caller can cause is an :class:`AutoDFPError`, and the CLI prints no raw
control character and never lets user code choose its exit code.

Each test names the item of the issue's second battery that it keeps fixed.
"""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import autodfp
from autodfp import Config
from autodfp.cli import main
from autodfp.errors import AutoDFPError, ConfigError, ModelError, PlanError, printable
from autodfp.models.resnet_cifar import resnet20

CHEAP = Config(synth_steps=2, calibration_inputs=8, refine_inputs=8, select_inputs=8, reward_inputs=8)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _net_with_dropout() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(8, 4),
    ).train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(16, 3, 16, 16))
    return net


# -- item 7: the caller's model is never modified, its modes included --------------------------
@pytest.mark.parametrize("mode", ["train", "mixed"])
def test_prune_keeps_the_callers_train_flags(mode: str) -> None:
    net = _net_with_dropout()
    if mode == "mixed":
        net.eval()
        net[1].train()  # one BN in training mode, the rest in eval: each flag must come back as it was
    flags = [m.training for m in net.modules()]
    state = copy.deepcopy(net.state_dict())
    result = autodfp.prune(net, input_shape=(3, 16, 16), uniform=0.5, config=CHEAP, progress=False)
    assert [m.training for m in net.modules()] == flags
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert not result.model.training  # the pruned model is handed back ready for inference


def test_evaluate_and_load_keep_the_callers_train_flags(tmp_path: Path) -> None:
    net = _net_with_dropout()
    result = autodfp.prune(net, input_shape=(3, 16, 16), uniform=0.5, config=CHEAP, progress=False)
    autodfp.save(result, tmp_path / "out")
    original = _net_with_dropout()
    assert original.training
    autodfp.load(tmp_path / "out", model=original)
    assert all(m.training for m in original.modules())


def test_a_failing_prune_still_restores_the_flags() -> None:
    net = _net_with_dropout()
    with pytest.raises(PlanError):
        autodfp.prune(net, input_shape=(3, 16, 16), uniform=1.5, config=CHEAP, progress=False)
    with pytest.raises(AutoDFPError):
        autodfp.prune(net, input_shape=(3, 16, 16), plan={"groups": {"nope": {"ratio": 0.5}}}, progress=False)
    assert all(m.training for m in net.modules())


# -- item 20: every caller-caused failure is an AutoDFPError ---------------------------------
def test_a_model_on_the_meta_device_is_a_model_error() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(ModelError, match="meta device"):
        autodfp.prune(net, input_shape=(3, 16, 16), uniform=0.5, config=CHEAP, progress=False)


@pytest.mark.parametrize("value", [None, "0.5", float("nan"), True, [1.0]])
def test_a_reward_callable_must_return_a_finite_number(value: object) -> None:
    with pytest.raises(PlanError, match="reward callable returned"):
        autodfp.prune(
            resnet20(),
            input_shape=(3, 32, 32),
            macs_ratio=0.6,
            search="random",
            reward=lambda m: value,
            config=CHEAP.replace(episodes=2, warmup=1, refine=False),
            progress=False,
        )


def test_a_reward_callable_may_return_a_tensor() -> None:
    res = autodfp.prune(
        resnet20(),
        input_shape=(3, 32, 32),
        macs_ratio=0.6,
        search="random",
        reward=lambda m: torch.tensor(0.25),
        config=CHEAP.replace(episodes=2, warmup=1, refine=False),
        progress=False,
    )
    assert res.report["best_reward"] == pytest.approx(0.25)


def test_an_unknown_config_field_names_the_closest_one() -> None:
    with pytest.raises(ConfigError, match="no field 'episode'; did you mean 'episodes'") as info:
        Config(episode=10)
    assert isinstance(info.value, TypeError) and isinstance(info.value, AutoDFPError)
    with pytest.raises(TypeError, match="zzz"):
        Config().replace(zzz=1)
    assert Config(episodes=10).episodes == 10


# -- item 15: user code never chooses autodfp's exit code ------------------------------------
@pytest.mark.parametrize("where", ["factory", "import"])
def test_an_arch_that_calls_sys_exit_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    body = "sys.exit(0)" if where == "import" else ""
    (tmp_path / "exiting_arch.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            {body}
            def build():
                sys.exit(0)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("exiting_arch", None)
    code, out, err = _cli(capsys, "info", "mine", "--arch", "exiting_arch:build", "--input-size", "16")
    assert code == 2
    assert err.startswith("error:") and "SystemExit" in err and len(err.strip().splitlines()) == 1


# -- item 14: no raw control character reaches the terminal ----------------------------------
def test_printable_escapes_every_control_character() -> None:
    nasty = "a\x1b]0;title\x07\x1b[2J\nb\r\t\x9bc\x7f"
    out = printable(nasty)
    assert all(ch.isprintable() for ch in out)
    assert out == "a\\x1b]0;title\\x07\\x1b[2J\\nb\\r\\t\\x9bc\\x7f"
    assert printable("plain é ü 名") == "plain é ü 名"


def test_a_folder_name_with_escape_sequences_is_escaped_in_the_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = tmp_path / "\x1b]0;pwned\x07\x1b[2Jdata"
    code, out, err = _cli(capsys, "eval", "resnet20_cifar10", "--data", f"folder:{evil}", "--limit", "8")
    assert code == 2 and err.startswith("error:")
    assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err
    assert len(err.strip().splitlines()) == 1


# -- issue 28 item 3 / 6: the budget is checked on the pruned model; a readable report ---------
def test_a_budget_missed_by_the_counted_macs_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import autodfp.api as api

    counts = iter([(1000, 10), (800, 8)])  # before, after: 0.8x delivered for 0.5x asked
    monkeypatch.setattr(api, "_count", lambda model, shape: next(counts))
    with pytest.raises(PlanError, match=r"keeps 0.8000x the MACs, outside ±1% of the 0.5000x"):
        autodfp.prune(
            resnet20(),
            input_shape=(3, 32, 32),
            macs_ratio=0.5,
            search="uniform",
            config=CHEAP.replace(refine=False),
            progress=False,
        )


def test_the_report_prints_as_a_short_summary(tiny_cnn: nn.Module) -> None:
    import json

    res = autodfp.prune(tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=CHEAP, progress=False)
    text = str(res.report)
    assert text.startswith("autodfp report:") and "MACs" in text and "params" in text and "time" in text
    assert "config" not in text and len(text.splitlines()) < 12
    assert isinstance(res.report, dict) and "config" in res.report  # still the whole record, JSON-ready
    assert json.loads(json.dumps(res.report))["macs_after"] == res.report["macs_after"]


def test_library_messages_reach_a_plain_python_caller(
    tiny_cnn: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without logging set up, prune(progress=True) shows the synthesis lines (issue 28 item 6)."""
    import logging

    monkeypatch.setenv("AUTODFP_HOME", str(tmp_path))
    root, lib = logging.getLogger(), logging.getLogger("autodfp")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(lib, "handlers", [])
    monkeypatch.setattr(lib, "propagate", True)
    autodfp.prune(tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=CHEAP, progress=True)
    assert "autodfp: synthe" in capsys.readouterr().err
    assert lib.handlers == []  # nothing left attached after the call
    autodfp.prune(tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=CHEAP, progress=False)
    assert "autodfp:" not in capsys.readouterr().err


def test_a_config_strategy_replaces_the_given_plans_own(tiny_cnn: nn.Module) -> None:
    """plan= with Config(strategy="none", refine=False) prunes with no reconstruction (issue 28)."""
    plan = autodfp.prune(tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=CHEAP, progress=False).plan
    assert plan.strategy != "none"
    res = autodfp.prune(
        tiny_cnn,
        input_shape=(3, 16, 16),
        plan=plan.to_dict(),
        config=CHEAP.replace(strategy="none", refine=False),
        progress=False,
    )
    assert res.plan.strategy == "none" and res.report["strategy"] == "none"


def test_groups_lists_every_group_with_its_reason(tiny_cnn: nn.Module) -> None:
    gs = autodfp.groups(tiny_cnn, input_shape=(3, 16, 16))
    assert [(g["name"], g["prunable"]) for g in gs] == [("0", True), ("3", False), ("8", False)]
    assert all({"name", "kind", "channels", "prunable", "reason"} <= set(g) for g in gs)
    assert gs[1]["reason"] == "feeds the classifier" and gs[0]["channels"] == 8
    r20 = autodfp.groups("resnet20_cifar10")
    whole = [g for g in r20 if not g["prunable"]]
    assert whole and all(g["reason"] for g in whole)


def test_eval_of_a_pruned_directory_takes_like_mean_and_std(tiny_cnn: nn.Module, tmp_path: Path) -> None:
    """A directory saved from Python can be evaluated with its real preprocessing (issue 28)."""
    from autodfp.cli.app import _load

    res = autodfp.prune(tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, config=CHEAP, progress=False)
    autodfp.save(res, tmp_path / "out")
    _, guessed = _load(str(tmp_path / "out"), None, None, False, None)
    assert guessed.preprocessing.mean == (0.5, 0.5, 0.5)
    _, liked = _load(str(tmp_path / "out"), None, None, False, "resnet20_cifar10")
    assert liked.preprocessing == autodfp.get_config("resnet20_cifar10").preprocessing
    _, given = _load(str(tmp_path / "out"), None, None, False, None, None, "0.1,0.2,0.3", "0.4,0.5,0.6")
    assert given.preprocessing.mean == (0.1, 0.2, 0.3) and given.preprocessing.std == (0.4, 0.5, 0.6)
    with pytest.raises(PlanError, match="do not apply to a pruned directory"):
        _load(str(tmp_path / "out"), "w.pt", None, False, None)


def test_evaluate_finds_a_zoo_models_config_and_refuses_to_guess(tiny_cnn: nn.Module) -> None:
    net = autodfp.create_model("resnet20_cifar10")
    top1 = autodfp.evaluate(net, limit=32).top1  # the zoo module knows its own preprocessing and data
    assert top1 == autodfp.evaluate(net, limit=32, like="resnet20_cifar10").top1
    with pytest.raises(PlanError, match="needs the model's preprocessing"):
        autodfp.evaluate(tiny_cnn, limit=8)


# -- issue 28 item 5: exports that match the model ---------------------------------------------
class _ScriptsToATuple(nn.Module):
    """Eager eval returns a tensor; the scripted module would return a tuple (as GoogLeNet does)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor):
        y = self.head(self.body(x).flatten(1))
        if torch.jit.is_scripting():
            return (y, y)
        return y


class _Versioned(nn.Module):
    """Refuses a state dict without its per-module version, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 4, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError("version should be set to 1 or 2")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def _saved(net: nn.Module, out: Path, **save_kwargs: object) -> autodfp.PruningResult:
    res = autodfp.prune(
        net, input_shape=(3, 16, 16), uniform=0.5, config=CHEAP.replace(refine=False, strategy="none"), progress=False
    )
    autodfp.save(res, out, **save_kwargs)  # type: ignore[arg-type]
    return res


def test_model_ts_returns_what_the_module_returns(tmp_path: Path) -> None:
    net = _ScriptsToATuple().eval()
    res = _saved(net, tmp_path / "o")
    ts = torch.jit.load(str(tmp_path / "o" / "model.ts"))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert isinstance(ts(x), torch.Tensor)  # scripting would have returned a tuple: the trace was kept
        assert torch.allclose(ts(x), res.model(x), atol=1e-5)


def test_a_model_torchscript_cannot_export_is_still_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from autodfp.errors import ExportWarning

    def fails(*a: object, **k: object) -> None:
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(torch.jit, "script", fails)
    monkeypatch.setattr(torch.jit, "trace", fails)
    with pytest.warns(ExportWarning, match="no model.ts"):
        res = _saved(_Versioned().eval(), tmp_path / "o")
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert "model.ts" not in names and "pruned.pt" in names
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["torchscript"] is None
    back = autodfp.load(tmp_path / "o", model=_Versioned())  # the set still loads, from pruned.pt
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), res.model(x))


def test_save_without_torchscript_on_request_and_a_forged_manifest_is_refused(tmp_path: Path) -> None:
    import json

    from autodfp.errors import WeightsError

    _saved(_Versioned().eval(), tmp_path / "o", torchscript=False)
    assert not (tmp_path / "o" / "model.ts").exists()
    autodfp.load(tmp_path / "o", model=_Versioned())
    manifest = tmp_path / "o" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["torchscript"] = "elsewhere.ts"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(WeightsError, match="unexpected entry"):
        autodfp.load(tmp_path / "o", model=_Versioned())


def test_the_state_dict_keeps_its_module_versions(tmp_path: Path) -> None:
    """A module that checks its version on load (MNASNet) reloads from a saved set (issue 28)."""
    res = _saved(_Versioned().eval(), tmp_path / "o")
    back = autodfp.load(tmp_path / "o", model=_Versioned())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), res.model(x))


def test_info_warns_about_random_weights_and_a_defaulted_input_size(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["info", "mine", "--arch", "autodfp.models.resnet_cifar:resnet20", "--json"])
    err = capsys.readouterr().err
    assert code == 0
    assert "warning: no --weights" in err and "warning: no --input-size: assuming 224x224" in err


def test_a_user_models_synthetic_cache_is_keyed_by_its_weights_not_its_name(
    tiny_cnn: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The same weights pruned under two names synthesise once (issue 28)."""
    import logging

    monkeypatch.setenv("AUTODFP_HOME", str(tmp_path))
    caplog.set_level(logging.INFO, logger="autodfp")
    autodfp.prune(tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, name="from-python", config=CHEAP, progress=False)
    assert "synthesising" in caplog.text
    caplog.clear()
    autodfp.prune(tiny_cnn, input_shape=(3, 16, 16), uniform=0.5, name="from-the-cli", config=CHEAP, progress=False)
    assert "read from the cache" in caplog.text and "synthesising" not in caplog.text
    assert all(p.name.startswith("user-") for p in (tmp_path / "synthetic").iterdir() if p.suffix == ".pt")


def test_the_cli_reports_top1_before_distillation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    args = ["prune", "resnet20_cifar10", "--uniform", "0.5", "--distill", "3", "--synth-steps", "2"]
    args += ["--refine-inputs", "16", "--reward-inputs", "16", "--limit", "64", "--json", "--out", str(tmp_path / "o")]
    code = main(args)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    out = json.loads(cap.out.strip().splitlines()[-1])
    assert out["distill_steps"] == 3 and isinstance(out["top1_before_distillation"], float)
    assert "distill 3" in cap.err and "top-1 before distillation" in cap.err


def test_prune_help_groups_its_options_in_panels(capsys: pytest.CaptureFixture[str]) -> None:
    from autodfp.cli.app import PRUNE_PANELS

    main(["prune", "--help"])
    out = capsys.readouterr().out
    for panel in PRUNE_PANELS:
        assert panel in out
    assert out.index("Budget and effort") < out.index("--macs-ratio") < out.index("Search")
