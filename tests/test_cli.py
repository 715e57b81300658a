"""The CLI end to end, as a user runs it: exit codes, one-line errors, JSON contracts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "autodfp.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=600,
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], err


def test_zoo_lists_the_models():
    proc = run("zoo", "--json")
    assert proc.returncode == 0
    names = [m["name"] for m in last_json(proc.stdout)["models"]]
    assert names == [
        "mobilenet_v1_075_imagenet",
        "mobilenet_v2_100_imagenet_bnfolded",
        "resnet20_cifar10",
        "resnet56_cifar10",
        "ultralight_face_rfb_320",
        "ultralight_face_slim_320",
    ]


def test_eval_json_contract():
    proc = run("eval", "resnet20_cifar10", "--limit", "200", "--json")
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert set(out) >= {"model", "top1", "top5", "n", "macs", "params", "latency_ms_b1"}
    assert out["n"] == 200 and out["model"] == "resnet20_cifar10"
    assert 80.0 < out["top1"] <= 100.0 and out["top5"] >= out["top1"]
    # ResNet-20 analytic MACs: stem + 3 stages of 6 3x3 convs (the first of stages 2/3 strided) + linear
    stages = (
        32 * 32 * 16 * 16 * 9 * 6
        + (16 * 16 * 32 * 16 * 9 + 16 * 16 * 32 * 32 * 9 * 5)
        + (8 * 8 * 64 * 32 * 9 + 8 * 8 * 64 * 64 * 9 * 5)
    )
    assert out["macs"] == 32 * 32 * 16 * 27 + stages + 64 * 10
    assert out["latency_ms_b1"] > 0


def test_info_lists_prunable_groups():
    proc = run("info", "resnet20_cifar10", "--json")
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    prunable = [g["name"] for g in out["groups"] if g["prunable"]]
    assert len(prunable) == 9 and all(n.endswith(".conv1") for n in prunable)
    assert out["macs"] == sum(layer["macs"] for layer in out["layers"])


def test_prune_json_contract_and_reload(tmp_path):
    out_dir = tmp_path / "p"
    proc = run(
        "prune",
        "resnet20_cifar10",
        "--uniform",
        "0.5",
        "--reconstruct",
        "lsq",
        "--out",
        str(out_dir),
        "--limit",
        "200",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert set(out) >= {"macs_before", "macs_after", "params_before", "params_after", "top1_before", "top1_after"}
    assert out["macs_after"] < out["macs_before"] and out["params_after"] < out["params_before"]
    assert out["refine_dims_ridge"] in (1.0, 3.0, 10.0, 30.0), "the final refinement picks its ridge by the reward"
    again = run("eval", str(out_dir), "--limit", "200", "--json")
    assert again.returncode == 0, again.stderr
    assert abs(last_json(again.stdout)["top1"] - out["top1_after"]) < 1e-6
    assert last_json(again.stdout)["macs"] == out["macs_after"]
    report = json.loads((out_dir / "report.json").read_text())
    assert report["config"]["strategy"] == "lsq" and report["config"]["synth_method"] == "auto"


def test_synth_method_reaches_the_pipeline(tmp_path):
    """--synth-method noise: no optimisation, and the report says which method made the inputs."""
    out_dir = tmp_path / "p"
    args = (
        "prune",
        "resnet20_cifar10",
        "--uniform",
        "0.7",
        "--synth-method",
        "noise",
        "--out",
        str(out_dir),
        "--no-eval",
    )
    proc = run(*args, env={"AUTODFP_HOME": str(tmp_path / "home")})  # an empty cache: the batch is made here
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out_dir / "report.json").read_text())["config"]["synth_method"] == "noise"
    assert "(noise, " in proc.stderr, "the synthesis log names the method"


def test_prune_search_json_contract_and_artifacts(tmp_path):
    out_dir = tmp_path / "s"
    proc = run(
        "prune",
        "resnet20_cifar10",
        "--macs-ratio",
        "0.6",
        "--search",
        "random",
        "--episodes",
        "3",
        "--reward-inputs",
        "16",
        "--out",
        str(out_dir),
        "--limit",
        "100",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert set(out) >= {"macs_ratio_achieved", "top1_before", "top1_after", "episodes", "search_seconds", "best_reward"}
    assert abs(out["macs_ratio_achieved"] - 0.6) <= 0.006 and out["episodes"] == 3 and out["refine"] is True
    for name in ("plan.json", "ratios.png", "rewards.png", "search.json", "pruned.pt"):
        assert (out_dir / name).is_file(), name
    plain = run(
        "prune",
        "resnet20_cifar10",
        "--plan",
        str(out_dir / "plan.json"),
        "--no-refine",
        "--out",
        str(tmp_path / "plain"),
        "--limit",
        "100",
        "--json",
    )
    assert plain.returncode == 0, plain.stderr
    assert last_json(plain.stdout)["refine"] is False and "refine_dims_ridge" not in last_json(plain.stdout)
    assert last_json(plain.stdout)["macs_after"] == out["macs_after"]  # refinement edits weights, not shapes


def test_proxy_check_json_contract_and_artifacts(tmp_path):
    out_dir = tmp_path / "proxy"
    proc = run(
        "proxy-check",
        "resnet20_cifar10",
        "--macs-ratio",
        "0.6",
        "--plans",
        "3",
        "--reward-inputs",
        "16",
        "--refine-inputs",
        "8",
        "--out",
        str(out_dir),
        "--limit",
        "100",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert out["plans"] == 3 and -1.0 <= out["rho"] <= 1.0 and out["top1_min"] <= out["top1_max"]
    saved = json.loads((out_dir / "proxy.json").read_text())
    assert len(saved["rewards"]) == len(saved["top1"]) == 3
    assert saved["refine_inputs"] == 8  # plans are refined on the batch asked for, not a larger one sliced
    assert (out_dir / "proxy.png").is_file()


@pytest.mark.parametrize(
    "args,pattern",
    [
        (("eval", "nope"), "unknown model 'nope'"),
        (("eval", "resnet20_cifar10", "--weights", "/nonexistent/w.th"), "weights file not found"),
        (("eval", "resnet20_cifar10", "--data", "cifar10:/nonexistent"), "/nonexistent"),
        (("eval", "resnet20_cifar10", "--data", "imagenet:/tmp"), "unknown data spec kind"),
        (("prune", "resnet20_cifar10", "--out", "x"), "exactly one of --uniform"),
        (("prune", "resnet20_cifar10", "--uniform", "1.5", "--out", "x", "--no-eval"), "must be in (0, 1]"),
        (("prune", "resnet20_cifar10", "--uniform", "0.01", "--out", "x", "--no-eval"), "would remove the whole layer"),
        (
            ("prune", "resnet20_cifar10", "--uniform", "0.5", "--reconstruct", "magic", "--out", "x"),
            "unknown --reconstruct",
        ),
        (("prune", "resnet20_cifar10", "--uniform", "0.5", "--synth-steps", "-1", "--out", "x"), "--synth-steps"),
        (("prune", "resnet20_cifar10", "--uniform", "0.5", "--synth-low-res", "1", "--out", "x"), "--synth-low-res"),
        (
            ("prune", "resnet20_cifar10", "--uniform", "0.5", "--synth-low-res-levels", "0", "--out", "x"),
            "--synth-low-res-levels",
        ),
        (("bench", "resnet20_cifar10", "--methods", "lsq+l1+refine", "--refine-ridge", "-1"), "--refine-ridge"),
        (("prune", "resnet20_cifar10", "--uniform", "0.5", "--refine-inputs", "1", "--out", "x"), "--refine-inputs"),
        (("prune", "resnet20_cifar10", "--uniform", "0.5", "--reward-inputs", "1", "--out", "x"), "--reward-inputs"),
        (
            ("prune", "resnet20_cifar10", "--uniform", "0.5", "--cluster-eps-quantile", "2", "--out", "x"),
            "--cluster-eps-quantile",
        ),
        (("prune", "resnet20_cifar10", "--uniform", "0.5", "--distill-inputs", "1", "--out", "x"), "--distill-inputs"),
        (("prune", "resnet20_cifar10", "--uniform", "0.5", "--distill-lr", "0", "--out", "x"), "--distill-lr"),
        (("prune", "resnet20_cifar10", "--uniform", "0.5", "--distill-fresh", "-1", "--out", "x"), "--distill-fresh"),
        (
            ("prune", "resnet20_cifar10", "--uniform", "0.5", "--synth-method", "magic", "--out", "x"),
            "unknown --synth-method 'magic'",
        ),
        (
            ("prune", "resnet20_cifar10", "--uniform", "0.5", "--refine-data", "/nonexistent/imgs", "--out", "x"),
            "image directory not found",
        ),
    ],
)
def test_bad_input_gets_one_line_errors(args, pattern):
    assert_one_line_error(run(*args), pattern)


def test_corrupt_and_wrong_layout_inputs(tmp_path):
    bad = tmp_path / "resnet20-12fca82f.th"
    bad.write_bytes(b"\x00" * 100)
    assert_one_line_error(run("eval", "resnet20_cifar10", "--weights", str(bad)), "sha256 mismatch")
    other = tmp_path / "other.th"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, other)
    assert_one_line_error(run("eval", "resnet20_cifar10", "--weights", str(other)), "does not match the architecture")
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    assert_one_line_error(run("eval", "resnet20_cifar10", "--data", f"cifar10:{tmp_path / 'imgs'}"), "error")
    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text(json.dumps({"groups": {"layer9.conv1": 0.5}}))
    assert_one_line_error(
        run("prune", "resnet20_cifar10", "--plan", str(bad_plan), "--out", str(tmp_path / "o")),
        "unknown group 'layer9.conv1'",
    )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
