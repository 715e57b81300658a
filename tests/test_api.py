"""The Python API: the README example as written, user models end to end, one config, devices."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import autodfp
from autodfp.api import resolve_device
from autodfp.config import DEFAULTS, Config

ROOT = Path(__file__).resolve().parents[1]

USER_MODEL = textwrap.dedent("""
    import torch.nn as nn

    def build():
        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
        net = nn.Sequential(*block(3, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 32),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        return net
""")


def _readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README shows a Python example"
    return blocks[0]


def test_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    code = _readme_python_example()
    assert 'create_model("resnet20_cifar10")' in code, "the example prunes resnet20_cifar10"
    code += (
        "\nimport json\nprint(json.dumps({'ratio': result.report['macs_ratio_achieved'], 'ts': type(same).__name__}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "AUTODFP_PROGRESS": "0"},
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(out["ratio"] - 0.5) <= 0.005 + 1e-9, out  # the budget is met within ±1 % of the target
    saved = next(p for p in tmp_path.rglob("manifest.json")).parent
    assert {"pruned.pt", "model.ts", "plan.json", "report.json"} <= {p.name for p in saved.iterdir()}


def _runner(tmp_path: Path) -> list[str]:
    """Run the CLI as the console script does: sys.path[0] is the script's folder, not the cwd."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "autodfp_cli.py"
    script.write_text("import sys\nfrom autodfp.cli import main\nsys.exit(main())\n")
    return [sys.executable, str(script)]


def _run(cmd: list[str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, cwd=cwd, timeout=900, env={**os.environ, "AUTODFP_PROGRESS": "0"}
    )


@pytest.fixture()
def user_model_dir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "mymodel.py").write_text(USER_MODEL)
    sys.path.insert(0, str(work))
    try:
        import importlib

        import mymodel  # type: ignore[import-not-found]

        importlib.reload(mymodel)
        torch.manual_seed(0)
        net = mymodel.build().train()
        with torch.no_grad():  # BN statistics from forward passes, as a trained net would have
            for _ in range(5):
                net(torch.randn(64, 3, 32, 32))
        torch.save(net.eval().state_dict(), work / "w.pt")
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("mymodel", None)
    return work


def test_user_model_prune_eval_and_load_from_its_folder(tmp_path: Path, user_model_dir: Path) -> None:
    cmd = _runner(tmp_path)
    out = user_model_dir / "out"
    proc = _run(
        cmd,
        user_model_dir,
        "prune",
        "mine",
        "--arch",
        "mymodel:build",
        "--weights",
        "w.pt",
        "--like",
        "resnet20_cifar10",
        "--uniform",
        "0.7",
        "--synth-steps",
        "20",
        "--out",
        str(out),
        "--limit",
        "64",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pruned = json.loads(proc.stdout.strip().splitlines()[-1])
    ev = _run(cmd, tmp_path, "eval", str(out), "--limit", "64", "--json")  # another folder: no import needed
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["top1"] == pruned["top1_after"]
    info = _run(cmd, tmp_path, "info", str(out), "--json")
    assert info.returncode == 0, info.stderr[-3000:]
    assert json.loads(info.stdout.strip().splitlines()[-1])["macs"] == pruned["macs_after"]

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ts = torch.jit.load(str(out / "model.ts"))
    loaded = autodfp.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(x), ts(x))
    sys.path.insert(0, str(user_model_dir))
    try:  # rebuilt eagerly from the factory the caller names: same function
        eager = autodfp.load(out, arch="mymodel:build")
        with torch.no_grad():
            assert torch.allclose(eager(x), ts(x), atol=1e-5)
        assert not isinstance(eager, torch.jit.ScriptModule)
    finally:
        sys.path.remove(str(user_model_dir))
        sys.modules.pop("mymodel", None)


def _forge(out: Path, arch: str) -> None:
    """Rewrite pruned.pt to name ``arch`` and re-seal the manifest, as an attacker could."""
    import hashlib

    payload = torch.load(out / "pruned.pt", weights_only=True)
    payload["arch"] = arch
    payload["zoo"] = False
    torch.save(payload, out / "pruned.pt")
    manifest = json.loads((out / "manifest.json").read_text())
    for name in list(manifest["files"]):
        if not (out / name).exists():
            del manifest["files"][name]
        else:
            manifest["files"][name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_recorded_architecture_is_never_imported(tmp_path: Path) -> None:
    from autodfp.compress.plan import Plan
    from autodfp.compress.surgery import Pruner
    from autodfp.eval.export import save_pruned
    from autodfp.models import get_config
    from autodfp.models.resnet_cifar import resnet20

    net = resnet20().eval()
    pruner = Pruner(net, (3, 32, 32))
    result = pruner.apply(Plan.uniform(pruner.graph, 0.5, strategy="none"))
    out = tmp_path / "out"
    save_pruned(result, out, get_config("resnet20_cifar10"), (3, 32, 32))
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "ran"
    (evil / "payload.py").write_text(f"def boom():\n    open({str(marker)!r}, 'w').close()\n    raise SystemExit(0)\n")
    _forge(out, "payload:boom")
    cmd = _runner(tmp_path)
    ok = _run(cmd, evil, "eval", str(out), "--limit", "16", "--json")  # model.ts is there: it is used instead
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert not marker.exists()
    (out / "model.ts").unlink()
    _forge(out, "payload:boom")
    bad = _run(cmd, evil, "eval", str(out), "--limit", "16")
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    # a set without model.ts is not a complete set (issue 25, item 9): refused before pruned.pt is read;
    # load_pruned's own refusal to import the recorded factory ("payload:boom") stays as a second line of defence
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not list model.ts" in lines[0], bad.stderr
    assert not marker.exists(), "the recorded callable ran"


def test_one_config_holds_the_defaults_and_the_cli_builds_it() -> None:
    from autodfp.cli.app import _config
    from autodfp.compress.plan import Plan
    from autodfp.compress.refine import DEFAULT_DIMS_RIDGE, DIMS_RIDGE_GRID, Refiner
    from autodfp.search.budget import DEFAULT_TOL

    assert _config() == Config() == DEFAULTS
    assert Plan({}).strategy == Plan.from_dict({"groups": {}}).strategy == DEFAULTS.strategy == "lsq"
    assert DEFAULT_DIMS_RIDGE == DEFAULTS.search_dims_ridge and DIMS_RIDGE_GRID == DEFAULTS.dims_ridge_grid
    assert DEFAULT_TOL == DEFAULTS.tol
    import inspect

    assert inspect.signature(Refiner).parameters["ridge"].default == DEFAULTS.refine_ridge
    assert _config(refine_ridge=0.5) == Config(refine_ridge=0.5)
    with pytest.raises(autodfp.AutoDFPError, match="--refine-ridge must be a finite number"):
        _config(refine_ridge=float("nan"))
    with pytest.raises(autodfp.AutoDFPError, match="^refine_ridge must be a finite number"):
        Config(refine_ridge=float("inf"))


def test_prune_a_plain_module_needs_no_registry(tmp_path: Path, tiny_cnn: nn.Module) -> None:
    net = tiny_cnn
    config = Config(refine=False)
    same = autodfp.prune(net, input_shape=(3, 16, 16), uniform=1.0, config=config, progress=False)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(same.model(x), net(x)), "a zero-ratio prune is output-identical"
    half = autodfp.prune(net, input_shape=(3, 16, 16), uniform=0.5, config=config, progress=False)
    assert half.report["macs_after"] < half.report["macs_before"]
    assert half.model[0].out_channels == 4 and net[0].out_channels == 8, "the input model is left unchanged"
    paths = autodfp.save(half, tmp_path / "o")
    assert paths["checkpoint"].is_file()
    with torch.no_grad():
        assert torch.equal(autodfp.load(tmp_path / "o")(x), half.model(x))
    with pytest.raises(autodfp.AutoDFPError, match="input_shape"):
        autodfp.prune(net, uniform=0.5)
    bad = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    bad[1].running_var[0] = float("nan")
    with pytest.raises(autodfp.AutoDFPError, match="1.running_var"):
        autodfp.prune(bad, input_shape=(3, 8, 8), uniform=0.5)


def test_final_step_keeps_what_the_reward_rates_best(tiny_cnn: nn.Module) -> None:
    """The final choice follows the reward: the unfitted plan wins when it scores higher, and then
    the model is exactly the uncompensated, unrefined prune (and its plan says so)."""
    net, shape = tiny_cnn, (3, 16, 16)
    # the per-group pass (tests/test_final_choice.py) would add calls and mix the candidates
    cheap = Config(synth_steps=2, calibration_inputs=8, refine_inputs=8, select_inputs=8, final_choice_per_group=False)
    calls: list[int] = []

    def rising(model: nn.Module) -> float:  # every later candidate scores higher
        calls.append(1)
        return float(len(calls))

    res = autodfp.prune(net, input_shape=shape, uniform=0.5, reward=rising, config=cheap, progress=False)
    grid = len(cheap.dims_ridge_grid)
    assert len(calls) == grid + 2, "each dims ridge, then the unrefined and the uncompensated plan"
    assert res.report["final_step"] == "uncompensated" and res.report["refine"] is False
    assert res.plan.strategy == "none"
    bare = autodfp.prune(net, input_shape=shape, uniform=0.5, config=cheap.replace(strategy="none", refine=False))
    x = torch.randn(6, *shape)
    with torch.no_grad():
        assert torch.equal(res.model(x), bare.model(x))

    def falling(model: nn.Module) -> float:  # the first candidate (dims ridge 1, refined) is best
        calls.append(1)
        return -float(len(calls))

    kept = autodfp.prune(net, input_shape=shape, uniform=0.5, reward=falling, config=cheap, progress=False)
    assert kept.report["final_step"] == "refined" and kept.report["refine"] is True
    assert kept.plan.strategy == "lsq" and kept.report["refine_dims_ridge"] == cheap.dims_ridge_grid[0]
    fixed = autodfp.prune(
        net,
        input_shape=shape,
        uniform=0.5,
        config=cheap.replace(final_choice=False, refine_dims_ridge=cheap.dims_ridge_grid[0]),
        progress=False,
    )
    assert "final_step" not in fixed.report
    with torch.no_grad():
        assert torch.equal(kept.model(x), fixed.model(x))


def test_device_option() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(autodfp.AutoDFPError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(autodfp.AutoDFPError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_result() -> None:
    model = autodfp.create_model("resnet20_cifar10")
    config = Config(synth_steps=20)
    cpu = autodfp.prune(model, uniform=0.7, config=config, device="cpu", progress=False)
    gpu = autodfp.prune(model, uniform=0.7, config=config, device="cuda", progress=False)
    assert cpu.report["macs_after"] == gpu.report["macs_after"]
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        agree = (cpu.model(x).argmax(1) == gpu.model.cpu()(x).argmax(1)).float().mean()
    assert agree >= 0.9, "float rounding on the GPU may move a few decisions, not the model"


def test_batches_share_inputs_and_the_reward_ranks_on_fewer_steps(
    tiny_cnn: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first prune distils the refinement batch (the calibration is its prefix) and a reward batch
    with half the steps; nothing else."""
    from autodfp.api import Pipeline, user_model_config

    shape = (3, 16, 16)
    cfg = Config(calibration_inputs=8, refine_inputs=16, reward_inputs=16, select_inputs=8)
    pipe = Pipeline(tiny_cnn, user_model_config(tiny_cnn, shape, "tiny"), shape, cfg, progress=False)
    seen: list[tuple[int, int, int | None]] = []

    def spy(self: Pipeline, seed: int, n: int, steps: int | None = None) -> torch.Tensor:
        seen.append((seed, n, steps))
        return torch.zeros(n, *shape)

    monkeypatch.setattr(Pipeline, "batch", spy)
    pipe.calibration_batch()
    pipe.reward_batch(8)
    assert seen == [(1, 8, None), (0, 8, 50)], "calibration: seed + 1 (the refinement's); reward: half of 100 steps"
    assert cfg.replace(synth_steps=7).reward_steps_for("bn", shape) == 7, "--synth-steps sets every batch"
    assert cfg.reward_steps_for("bn", (3, 224, 224)) == 100, "large inputs: half of 200 steps too"
    assert cfg.reward_steps_for("bn", (3, 224, 224), select=True) == 50, "a choice of a few: a quarter"
    assert cfg.reward_steps_for("bn", shape, select=True) == 50, "small inputs: the search's batch"


def test_batches_of_large_inputs_start_at_half_size(tiny_cnn: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline hands the low-resolution share of the input's size class to every batch it distils."""
    import autodfp.synth.distill as synth
    from autodfp.api import Pipeline, user_model_config
    from autodfp.config import LOW_RES_SHARE

    shares: list[tuple[float, int]] = []

    def spy(*args: object, low_res: float = 0.0, low_res_levels: int = 1, **kwargs: object) -> torch.Tensor:
        shares.append((low_res, low_res_levels))
        return torch.zeros(2, 3, 8, 8)

    monkeypatch.setattr(synth, "synthetic_batch", spy)
    for shape, cfg in (
        ((3, 16, 16), Config()),
        ((3, 96, 96), Config()),
        ((3, 96, 96), Config(synth_low_res=0.25, synth_low_res_levels=1)),
    ):
        Pipeline(tiny_cnn, user_model_config(tiny_cnn, shape, "tiny"), shape, cfg, progress=False).batch(0, 2)
    assert shares == [(LOW_RES_SHARE["small"], 1), (LOW_RES_SHARE["large"], 2), (0.25, 1)]
    assert LOW_RES_SHARE["small"] == 0.0 < LOW_RES_SHARE["large"]


def test_cluster_eps_quantile_reaches_the_analysis(tiny_cnn: nn.Module) -> None:
    """A per-layer DBSCAN radius from the config: the q = 1 quantile clusters every channel."""
    from autodfp.analysis.similarity import DEFAULT_EPS
    from autodfp.api import Pipeline, user_model_config

    shape = (3, 16, 16)
    mc = user_model_config(tiny_cnn, shape, "tiny")
    plain = Pipeline(tiny_cnn, mc, shape, Config(), progress=False).pruner(synthesising=False)
    wide = Pipeline(tiny_cnn, mc, shape, Config(cluster_eps_quantile=1.0), progress=False).pruner(synthesising=False)
    name = plain.graph.prunable[0].name
    assert plain.analysis(name).eps == DEFAULT_EPS
    assert wide.analysis(name).eps >= float(wide.analysis(name).nearest_dist.max())
    assert (wide.analysis(name).labels >= 0).all(), "every channel is within the widest radius of its neighbour"
    with pytest.raises(autodfp.AutoDFPError, match="cluster_eps_quantile"):
        Config(cluster_eps_quantile=1.5)


def test_refine_data_fits_on_real_images_apart_from_the_reward(tmp_path: Path, tiny_cnn: nn.Module) -> None:
    """--refine-data: the fit reads a seeded sample from the tail, the unlabelled reward from the
    head of the same order, so one class-sorted folder gives both, disjoint and of every class."""
    from PIL import Image

    from autodfp.api import Pipeline, user_model_config

    shape = (3, 16, 16)
    for c in range(4):  # class-sorted folders; each image is one flat colour: its class and index
        (tmp_path / f"class{c}").mkdir()
        for i in range(6):
            Image.new("RGB", (16, 16), (60 * c, 10 * i, 0)).save(tmp_path / f"class{c}" / f"{i}.png")
    cfg = Config(refine_data=str(tmp_path), refine_inputs=8, calibration_inputs=8, unlabeled_reward_inputs=12)
    pipe = Pipeline(tiny_cnn, user_model_config(tiny_cnn, shape, "tiny"), shape, cfg, progress=False)
    fit = pipe.fit_batch(8)
    head = pipe.real_images(str(tmp_path), 12)
    assert fit.shape == (8, *shape) and head.shape == (12, *shape)
    key = lambda t: tuple(round(float(v), 4) for v in t[:, 0, 0])  # the pixel names the image
    assert not {key(x) for x in fit} & {key(x) for x in head}, "the fit never sees the reward's images"
    assert len({round(float(x[0, 0, 0]), 4) for x in head}) > 1, "a seeded sample, not the first class folder"
    assert torch.equal(pipe.calibration_batch(), fit), "the calibration is the fit batch's head"
    res = autodfp.prune(
        tiny_cnn,
        input_shape=shape,
        uniform=0.5,
        reward=f"unlabeled:{tmp_path}",
        config=cfg.replace(final_choice=False, refine_dims_ridge=3.0),
        progress=False,
    )
    assert res.report["refine"] is True
    with pytest.raises(autodfp.AutoDFPError, match="image directory not found"):
        autodfp.prune(tiny_cnn, input_shape=shape, uniform=0.5, config=cfg.replace(refine_data=str(tmp_path / "no")))
