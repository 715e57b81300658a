"""Bad input through the CLI, in-process: exit 2, one ``error:`` line, no traceback, nothing written.

Every case here is refused before any expensive work (distillation, search), so the table is cheap.
Each row names the issue-11 item it keeps fixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autodfp.cli import main
from autodfp.models.resnet_cifar import resnet20

R20 = "resnet20_cifar10"
ARCH = "autodfp.models.resnet_cifar:resnet20"


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    files: dict[str, Path] = {}
    a_file = d / "a_file"
    a_file.write_text("x")
    files["a_file"] = a_file
    sd = resnet20().state_dict()
    nan = {k: v.clone() for k, v in sd.items()}
    nan["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(nan, d / "nan.pt")
    files["nan"] = d / "nan.pt"
    var = {k: v.clone() for k, v in sd.items()}
    var["layer1.0.bn1.running_var"][3] = -1.0
    torch.save(var, d / "var.pt")
    files["var"] = d / "var.pt"
    torch.save({1: torch.zeros(1)}, d / "intkeys.pt")
    files["intkeys"] = d / "intkeys.pt"
    for name, groups in (
        ("keep_str", {"layer1.0.conv1": {"ratio": 0.5, "keep": ["a"]}}),
        ("keep_int", {"layer1.0.conv1": {"ratio": 0.5, "keep": 5}}),
        ("ratio_bool", {"layer1.0.conv1": {"ratio": True}}),
    ):
        (d / f"{name}.json").write_text(json.dumps({"groups": groups}))
        files[name] = d / f"{name}.json"
    (d / "params_list.json").write_text(json.dumps({"groups": {"layer1.0.conv1": 0.5}, "params": [1, 2]}))
    files["params_list"] = d / "params_list.json"
    (d / "strength_str.json").write_text(json.dumps({"groups": {"layer1.0.conv1": {"ratio": 0.5, "strength": "abc"}}}))
    files["strength_str"] = d / "strength_str.json"
    (d / "latin1.json").write_bytes('{"groups": {"é": 0.5}}'.encode("latin-1"))
    files["latin1"] = d / "latin1.json"
    (d / "mods").mkdir()
    (d / "mods" / "needs_arg.py").write_text("def build(width):\n    return None\n")
    (d / "mods" / "raises.py").write_text("def build():\n    raise RuntimeError('boom')\n")
    (d / "mods" / "broken.py").write_text("def build(:\n")
    files["mods"] = d / "mods"
    # CIFAR layouts: float pixels in [0, 1], string labels; a class list too short for the model
    for name, data, labels in (
        ("cifar_float", np.random.rand(4, 3072).astype(np.float32), [0, 1, 2, 3]),
        ("cifar_strlabels", np.zeros((4, 3072), np.uint8), ["a", "b", "c", "d"]),
    ):
        root = d / name / "cifar-10-batches-py"
        root.mkdir(parents=True)
        import pickle

        with open(root / "test_batch", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        files[name] = d / name
    folder = d / "folder"
    for cls in ("n01", "n02"):
        (folder / cls).mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (32, 32), (10, 20, 30)).save(folder / cls / "0.png")
    (d / "two.txt").write_text("n01\nn02\n")
    files["folder"] = folder
    files["two"] = d / "two.txt"
    return files


CASES = [
    # (item, args, substring of the one error line); "OUT" is replaced by a fresh path
    ("12 usage: not a number", ["prune", R20, "--uniform", "abc", "--out", "OUT"], "'--uniform'"),
    ("12 usage: missing --out", ["prune", R20, "--uniform", "0.5"], "--out DIR is required"),
    ("12 usage: unknown flag", ["prune", R20, "--uniform", "0.5", "--nope", "--out", "OUT"], "No such option"),
    ("10 seed < 0", ["prune", R20, "--uniform", "0.5", "--seed", "-1", "--out", "OUT"], "--seed"),
    ("10 seed ≥ 2**32", ["prune", R20, "--uniform", "0.5", "--seed", "4294967296", "--out", "OUT"], "--seed"),
    ("6 NaN ridge", ["prune", R20, "--uniform", "0.5", "--refine-ridge", "nan", "--out", "OUT"], "--refine-ridge"),
    (
        "6 Inf dims ridge",
        ["prune", R20, "--uniform", "0.5", "--refine-dims-ridge", "inf", "--out", "OUT"],
        "--refine-dims-ridge",
    ),
    ("6 NaN ratio", ["prune", R20, "--uniform", "nan", "--out", "OUT"], "--uniform"),
    ("6 NaN strength", ["prune", R20, "--uniform", "0.5", "--strength", "nan", "--out", "OUT"], "--strength"),
    ("16 warmup < 0", ["prune", R20, "--macs-ratio", "0.5", "--warmup", "-1", "--out", "OUT"], "--warmup"),
    (
        "16 search flags without a search",
        ["prune", R20, "--uniform", "0.5", "--episodes", "9", "--out", "OUT"],
        "only apply to a search",
    ),
    ("16 empty --ratios", ["bench", R20, "--ratios", "", "--out", "OUT"], "--ratios is empty"),
    ("16 empty --methods", ["bench", R20, "--methods", " , ", "--out", "OUT"], "--methods is empty"),
    ("11 proxy-check --plans 0", ["proxy-check", R20, "--plans", "0", "--out", "OUT"], "--plans"),
    ("10 --out is a file", ["prune", R20, "--uniform", "0.5", "--out", "{a_file}"], "is a file"),
    ("10 --out under a file", ["prune", R20, "--uniform", "0.5", "--out", "{a_file}/sub"], "lies under"),
    (
        "5 NaN weight",
        ["prune", "mine", "--arch", ARCH, "--weights", "{nan}", "--like", R20, "--uniform", "0.7", "--out", "OUT"],
        "layer1.0.conv1.weight",
    ),
    (
        "5 negative BN variance",
        ["eval", "mine", "--arch", ARCH, "--weights", "{var}", "--like", R20],
        "layer1.0.bn1.running_var",
    ),
    (
        "11 state-dict keys not strings",
        ["eval", "mine", "--arch", ARCH, "--weights", "{intkeys}", "--like", R20],
        "intkeys.pt",
    ),
    ("11 --arch :", ["eval", "mine", "--arch", ":", "--like", R20], "package.module:factory"),
    ("11 factory needs an argument", ["eval", "mine", "--arch", "needs_arg:build", "--like", R20], "needs_arg:build"),
    ("11 factory raises", ["eval", "mine", "--arch", "raises:build", "--like", R20], "boom"),
    ("11 module with a SyntaxError", ["eval", "mine", "--arch", "broken:build", "--like", R20], "syntax error"),
    ("11 keep of strings", ["prune", R20, "--plan", "{keep_str}", "--out", "OUT"], "keep"),
    ("11 keep of an int", ["prune", R20, "--plan", "{keep_int}", "--out", "OUT"], "keep"),
    ("11 params a list", ["prune", R20, "--plan", "{params_list}", "--out", "OUT"], "params"),
    ("11 strength a string", ["prune", R20, "--plan", "{strength_str}", "--out", "OUT"], "strength"),
    ("11 ratio a bool", ["prune", R20, "--plan", "{ratio_bool}", "--out", "OUT"], "ratio"),
    ("11 plan not UTF-8", ["prune", R20, "--plan", "{latin1}", "--out", "OUT"], "UTF-8"),
    ("8 CIFAR floats", ["eval", R20, "--data", "cifar10:{cifar_float}"], "float"),
    ("11 CIFAR string labels", ["eval", R20, "--data", "cifar10:{cifar_strlabels}"], "label"),
    ("9 class list too short", ["eval", R20, "--data", "folder:{folder}:{two}"], "the model has 10"),
    ("device", ["prune", R20, "--uniform", "0.5", "--device", "tpu", "--out", "OUT"], "unknown --device"),
]


@pytest.mark.parametrize("item,args,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(
    item: str,
    args: list[str],
    needle: str,
    bad_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    monkeypatch.chdir(bad_files["mods"])
    argv = [a.replace("OUT", str(out)).format(**{k: str(v) for k, v in bad_files.items()}) for a in args]
    before = {p: _files(p) for p in (tmp_path, bad_files["a_file"].parent)}
    code, stdout, err = _cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1 and lines[-1].startswith("error:"), err
    assert needle in lines[-1], lines[-1]
    assert not out.exists(), "a refused run wrote its output directory"
    assert {p: _files(p) for p in before} == before


# -- items that need a model or more than one process ---------------------------------------------------
def _prune_args(out: Path, ratio: str = "0.5") -> list[str]:
    return ["prune", R20, "--uniform", ratio, "--no-refine", "--no-eval", "--out", str(out)]


def test_item7_a_mixed_set_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli(capsys, *_prune_args(a, "0.7"))[0] == 0
    assert _cli(capsys, *_prune_args(b, "0.5"))[0] == 0
    (a / "pruned.pt").write_bytes((b / "pruned.pt").read_bytes())  # what an interrupted overwrite left
    code, _, err = _cli(capsys, "eval", str(a), "--limit", "8")
    assert code == 2 and "does not match manifest.json" in err.strip().splitlines()[-1], err
    (a / "manifest.json").unlink()
    code, _, err = _cli(capsys, "eval", str(a), "--limit", "8")
    assert code == 2 and "manifest.json is missing" in err, err


def test_item7_a_second_run_cannot_share_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from autodfp.eval.export import OutputLock

    out = tmp_path / "o"
    with OutputLock(out):
        code, _, err = _cli(capsys, *_prune_args(out))
    assert code == 2 and "in use by another autodfp run" in err, err
    assert _files(out) == set(), "the refused run wrote nothing"


def test_item7_a_kill_during_the_save_never_leaves_a_loadable_mix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Simulate the kill at each step of the swap: whatever is on disk either loads as one set or is refused."""
    from autodfp.errors import AutoDFPError
    from autodfp.eval import export

    out = tmp_path / "o"
    assert _cli(capsys, *_prune_args(out, "0.7"))[0] == 0
    old = {n: (out / n).read_bytes() for n in ("pruned.pt", "model.ts")}
    real_replace = os.replace
    for stop_after in range(4):
        calls = {"n": 0}

        def dying_replace(src: os.PathLike, dst: os.PathLike, _stop: int = stop_after, calls: dict = calls) -> None:
            if calls["n"] == _stop:
                raise KeyboardInterrupt  # the kill
            calls["n"] += 1
            real_replace(src, dst)

        export.os.replace = dying_replace  # type: ignore[assignment]
        try:
            with pytest.raises(KeyboardInterrupt):
                from autodfp.api import prune, save
                from autodfp.models import load_model

                net, cfg = load_model(R20)
                from autodfp.config import Config

                save(prune(net, model_config=cfg, uniform=0.5, config=Config(refine=False), progress=False), out)
        finally:
            export.os.replace = real_replace  # type: ignore[assignment]
        try:
            net2, _, plan = export.load_pruned(out)
        except AutoDFPError:
            continue  # refused: fine
        assert {n: (out / n).read_bytes() for n in old} == old or set(plan.ratios.values()) == {0.5}


def test_item15_outputs_get_the_umask_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    old = os.umask(0o022)
    try:
        assert _cli(capsys, *_prune_args(out))[0] == 0
    finally:
        os.umask(old)
    for name in ("pruned.pt", "model.ts", "plan.json", "manifest.json", "report.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_item13_plan_without_strategy_uses_the_one_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from autodfp.config import DEFAULTS

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"groups": {"layer1.0.conv1": 0.5}}))
    out = tmp_path / "o"
    code, _, err = _cli(capsys, "prune", R20, "--plan", str(plan), "--no-refine", "--no-eval", "--out", str(out))
    assert code == 0, err
    assert json.loads((out / "plan.json").read_text())["strategy"] == DEFAULTS.strategy == "lsq"


def test_item11_pruned_checkpoint_with_a_channels_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert _cli(capsys, *_prune_args(out))[0] == 0
    payload = torch.load(out / "pruned.pt", weights_only=True)
    payload["channels"] = [1, 2, 3]
    torch.save(payload, out / "pruned.pt")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["pruned.pt"] = hashlib.sha256((out / "pruned.pt").read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _cli(capsys, "eval", str(out), "--limit", "8")
    assert code == 2 and "'channels'" in err.strip().splitlines()[-1], err


def test_item11_full_disk_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from autodfp.errors import AutoDFPError
    from autodfp.eval import export, outdir

    real = outdir._write_new  # every file of the set is staged through it

    def full(path: Path, data: bytes) -> None:
        if path.name == "model.ts":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(outdir, "_write_new", full)
    out = tmp_path / "o"
    code, _, err = _cli(capsys, *_prune_args(out))
    assert code == 2 and "no space left" in err.strip().splitlines()[-1], err
    assert not any(p.name.startswith(".staging") for p in out.iterdir()) if out.exists() else True
    with pytest.raises(AutoDFPError):
        export.load_pruned(out)


def test_item16_resume_without_checkpoint_and_ctrl_c_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import autodfp.api as api

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "prune", interrupted)
    code, _, err = _cli(capsys, "prune", R20, "--macs-ratio", "0.5", "--resume", "--out", str(tmp_path / "o"))
    assert code == 130
    assert "no checkpoint" in err and err.strip().splitlines()[-1] == "interrupted", err


def test_item14_proxy_json_is_valid_with_undefined_rho() -> None:
    from autodfp.cli.app import _json_safe

    text = json.dumps(_json_safe({"rho": float("nan"), "x": [float("inf"), 1.0]}), allow_nan=False)
    assert json.loads(text) == {"rho": None, "x": [None, 1.0]}


def test_item10_unwritable_home_is_a_warning_not_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.write_text("not a directory")
    monkeypatch.setenv("AUTODFP_HOME", str(home))
    code, _, err = _cli(
        capsys,
        "prune",
        R20,
        "--uniform",
        "0.7",
        "--synth-steps",
        "2",
        "--refine-inputs",
        "8",
        "--reward-inputs",
        "8",
        "--no-eval",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0, err
    warnings_ = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert warnings_ and "cache" in warnings_[0], err


def test_concurrent_prunes_into_one_out_never_both_succeed(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "autodfp.cli", *_prune_args(out)]
    env = {**os.environ, "AUTODFP_PROGRESS": "0"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)]
    time.sleep(1.5)  # the first holds the lock by now (it takes it before loading the model)
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes in ([0, 0], [0, 2]), results
    if codes == [0, 2]:
        assert any("in use by another autodfp run" in r[1] for r in results)
    from autodfp.eval.export import load_pruned

    load_pruned(out)  # whatever happened, the set on disk is whole
    assert threading.active_count() >= 1
