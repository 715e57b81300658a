"""Measured latency (:mod:`autodfp.eval.latency`): alternation, spread, the per-layer table and its
cache, the report section's schema and ``autodfp bench-latency``.

No test compares a measured time with anything: the machines running the suite are shared, so a
timed assertion would be a coin flip. Times that a test reasons about come from injected timers.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from autodfp.analysis.graph import find_groups
from autodfp.cli.app import main
from autodfp.errors import AutoDFPError, CacheWarning, PlanError
from autodfp.eval import latency as lat
from autodfp.models.resnet_cifar import resnet20

SHAPE = (3, 32, 32)


def small_net(width: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 4),
    ).eval()


def fake_layer_time(spec: lat.LayerSpec) -> float:
    """Bilinear in the two widths, so interpolating between grid points is exact."""
    return 1e-3 * spec.in_channels * spec.out_channels + 0.01 * len(spec.name)


@pytest.fixture(scope="module")
def r20() -> tuple[nn.Module, Any]:
    net = resnet20().eval()
    return net, find_groups(net, SHAPE, coupled=True)


# -- whole models ---------------------------------------------------------------------------------
def test_models_are_alternated_and_the_threads_recorded() -> None:
    calls: list[str] = []
    ran: list[object] = []

    def timer(name: str, run: Callable[[], object]) -> float:
        calls.append(name)
        if len(ran) < 2:
            ran.append(run())  # the callable is a real forward pass
        return float(len(calls))

    rep = lat.measure_latency(
        {"A": small_net(8), "B": small_net(4)}, (3, 8, 8), batch_sizes=(1, 3), warmup=1, repeats=20, timer=timer
    )
    assert calls == ["A", "B"] * 40, "one timed run of each model in turn, at each batch size"
    assert [tuple(t.shape) for t in ran] == [(1, 4), (1, 4)]  # type: ignore[attr-defined]
    assert rep.threads == torch.get_num_threads() and rep.provider is None
    a1 = rep.timings["A"][1]
    assert a1.runs == 20 and a1.median_ms == 20.0  # A got the odd calls 1, 3, ..., 39
    assert a1.p10_ms <= a1.median_ms <= a1.p90_ms and a1.iqr_ms > 0
    assert rep.speedup("A", "B")[1] == pytest.approx(20.0 / 21.0)
    json.dumps(rep.to_dict(), allow_nan=False)


def test_threads_are_set_for_the_run_and_restored() -> None:
    before = torch.get_num_threads()
    rep = lat.measure_latency({"m": small_net()}, (3, 8, 8), batch_sizes=(1,), threads=1, timer=lambda n, r: 1.0)
    assert rep.threads == 1 and torch.get_num_threads() == before


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"batch_sizes": (0,)}, "from 1 to"),
        ({"batch_sizes": (1, 1)}, "twice"),
        ({"batch_sizes": ()}, "empty"),
        ({"repeats": 5}, "at least 20"),
        ({"runtime": "tensorrt"}, "unknown runtime"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_measurement_settings_are_refused(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(PlanError, match=needle):
        lat.measure_latency({"m": small_net()}, (3, 8, 8), **{"timer": lambda n, r: 1.0, **kwargs})


def test_onnxruntime_runs_and_reports_positive_times() -> None:
    pytest.importorskip("onnxruntime")
    rep = lat.measure_latency({"a": small_net(8), "b": small_net(4)}, (3, 8, 8), "onnxruntime", (1, 2), warmup=1)
    assert rep.provider == "CPUExecutionProvider" and rep.threads >= 1
    for per in rep.timings.values():
        for t in per.values():
            assert t.median_ms > 0 and t.p90_ms > 0 and t.runs == 20


def test_missing_onnxruntime_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(AutoDFPError, match="pip install onnxruntime") as info:
        lat.measure_latency({"m": small_net()}, (3, 8, 8), "onnxruntime", (1,), timer=lambda n, r: 1.0)
    assert "\n" not in str(info.value)


# -- per-layer table ------------------------------------------------------------------------------
def test_plan_widths_match_the_physically_pruned_model(r20: tuple[nn.Module, Any]) -> None:
    net, graph = r20
    specs = {s.name: s for s in lat.layer_specs(net, SHAPE)}
    keep = {g.name: max(1, g.units // 2 - 1) for g in graph.prunable}
    pruned = lat._pruned_copy(net, graph, keep, SHAPE)
    real = {s.name: (s.in_channels, s.out_channels) for s in lat.layer_specs(pruned, SHAPE)}
    assert lat.layer_widths(graph, keep, specs) == real
    with pytest.raises(PlanError, match="unknown group"):
        lat.layer_widths(graph, {"nope": 1}, specs)


def test_table_predicts_the_sum_of_its_layer_times(r20: tuple[nn.Module, Any], tmp_path: Path) -> None:
    net, graph = r20
    specs = {s.name: s for s in lat.layer_specs(net, SHAPE)}
    widths = lat.candidate_widths(graph, specs, lat.ratio_keeps(graph, (0.5, 1.0)))
    table = lat.LatencyTable.build(
        net, SHAPE, widths, timer=fake_layer_time, model_timer=lambda m: 50.0, cache_dir=tmp_path
    )
    full_sum = sum(fake_layer_time(s) for s in specs.values())
    assert table.overhead_ms == pytest.approx(50.0 - full_sum)
    assert table.predict() == pytest.approx(50.0), "exact at full width"
    for ratio in (0.5, 0.75):  # 0.75 was not measured: interpolated (exactly, for a bilinear cost)
        keep = {g.name: max(1, round(g.units * ratio)) for g in graph.prunable}
        per_layer = lat.layer_widths(graph, keep, specs)
        expected = 50.0 - full_sum + sum(fake_layer_time(specs[n].at(*w)) for n, w in per_layer.items())
        assert lat.plan_latency(table, graph, keep) == pytest.approx(expected)
    with pytest.raises(LookupError, match="outside the measured widths"):
        table.layer_ms("layer1.0.conv2", 2, 16)  # below the smallest candidate


def test_table_cache_round_trips_and_recomputes_a_damaged_entry(tmp_path: Path) -> None:
    net = small_net(8)
    timed: list[tuple[str, int, int]] = []

    def timer(spec: lat.LayerSpec) -> float:
        timed.append((spec.name, spec.in_channels, spec.out_channels))
        return fake_layer_time(spec)

    widths = {"3": [(4, 8), (8, 4), (4, 4)]}

    def build() -> lat.LatencyTable:
        return lat.LatencyTable.build(
            net, (3, 8, 8), widths, timer=timer, model_timer=lambda m: 9.0, cache_dir=tmp_path
        )

    first = build()
    assert len(timed) == first.measured - 1 == 3 + 3  # three layers at full width, three more widths of "3"
    assert first.path is not None and first.path.parent == tmp_path
    timed.clear()
    second = build()
    assert timed == [] and second.measured == 0, "everything came from the cache"
    assert second.times == first.times and second.model_ms == 9.0

    blob = json.loads(first.path.read_text())
    blob["layers"]["3"]["4x4"] = -1.0  # a damaged value
    first.path.write_text(json.dumps(blob))
    with pytest.warns(CacheWarning, match="damaged"):
        third = build()
    assert timed == [("3", 4, 4)], "only the damaged entry is re-measured"
    assert third.times == first.times
    timed.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build()  # and written back whole
    assert timed == []

    first.path.write_text("{ not json")
    with pytest.warns(CacheWarning, match="re-measuring"):
        build()
    assert len(timed) == 6


def test_table_cache_key_follows_runtime_batch_and_threads(tmp_path: Path) -> None:
    net = small_net(4)
    build = lambda **kw: lat.LatencyTable.build(
        net, (3, 8, 8), timer=fake_layer_time, model_timer=lambda m: 1.0, cache_dir=tmp_path, **kw
    )
    keys = {build().key, build(batch=2).key, build(threads=1).key, build(runtime="torchscript").key}
    assert len(keys) == 4 and len(list(tmp_path.glob("*.json"))) == 4
    bare = build(calibrate=False)  # no overhead term: the bare sum over layers
    assert bare.model_ms is None and bare.predict() == pytest.approx(sum(map(fake_layer_time, bare.specs.values())))


def test_onnxruntime_table_times_are_positive(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    table = lat.LatencyTable.build(small_net(4), (3, 8, 8), {"0": [(3, 2)]}, "onnxruntime", warmup=1, cache=False)
    assert all(ms > 0 for per in table.times.values() for ms in per.values())
    assert table.model_ms is not None and table.model_ms > 0 and len(table.times["0"]) == 2


def test_prediction_error_rows(r20: tuple[nn.Module, Any]) -> None:
    net, graph = r20
    specs = {s.name: s for s in lat.layer_specs(net, SHAPE)}
    keeps = lat.ratio_keeps(graph, (0.5, 1.0))
    table = lat.LatencyTable.build(
        net,
        SHAPE,
        lat.candidate_widths(graph, specs, keeps),
        timer=fake_layer_time,
        model_timer=lambda m: 50.0,
        cache=False,
    )
    half = {g: min(k) for g, k in keeps.items()}
    rows = lat.prediction_error(table, net, graph, [half], warmup=0, timer=lambda n, r: 40.0)
    assert [r["plan"] for r in rows] == ["full", "plan0"]
    assert rows[0]["error_pct"] == pytest.approx(25.0)  # predicted 50 against a (mocked) 40
    assert rows[1]["predicted_ms"] == pytest.approx(lat.plan_latency(table, graph, half))


# -- report section ------------------------------------------------------------------------------
def _fixed(name: str, run: Callable[[], object]) -> float:
    return 2.0 if name == "before" else 1.0


def test_section_schema() -> None:
    section = lat.latency_section(
        small_net(8), small_net(4), (3, 8, 8), ("torch", "torchscript"), (1, 4), warmup=0, timer=_fixed
    )
    lat.check_section(section)
    assert set(section) == {
        "format",
        "device",
        "device_name",
        "torch_version",
        "onnxruntime_version",
        "input_shape",
        "batch_sizes",
        "warmup",
        "repeats",
        "runtimes",
    }
    assert section["format"] == lat.FORMAT and section["input_shape"] == [3, 8, 8] and section["batch_sizes"] == [1, 4]
    assert isinstance(section["device_name"], str) and isinstance(section["repeats"], int)
    for entry in section["runtimes"].values():
        assert set(entry) == {"threads", "provider", "batches"} and isinstance(entry["threads"], int)
        for row in entry["batches"]:
            assert set(row) == {"batch", "before", "after", "speedup"}
            assert set(row["after"]) == {"median_ms", "p10_ms", "p90_ms", "iqr_ms", "runs"}
            assert row["speedup"] == 2.0 and isinstance(row["after"]["runs"], int)
    json.dumps(section, allow_nan=False)
    assert lat.plot_latency(section).startswith(b"\x89PNG")

    alone = lat.latency_section(None, small_net(4), (3, 8, 8), batch_sizes=(1,), warmup=0, timer=_fixed)
    lat.check_section(alone)
    assert alone["runtimes"]["torch"]["batches"][0]["before"] is None
    assert alone["runtimes"]["torch"]["batches"][0]["speedup"] is None

    broken = json.loads(json.dumps(section))
    del broken["runtimes"]["torch"]["batches"][0]["after"]["p90_ms"]
    with pytest.raises(ValueError, match="p90_ms"):
        lat.check_section(broken)
    with pytest.raises(ValueError, match="format"):
        lat.check_section({**section, "format": "other"})


# -- command line ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory: pytest.TempPathFactory, r20: tuple[nn.Module, Any]) -> Path:
    from autodfp.compress.plan import Plan
    from autodfp.compress.surgery import Pruner
    from autodfp.eval.export import save_pruned
    from autodfp.models import get_config

    net, _ = r20
    pruner = Pruner(net, SHAPE)
    result = pruner.apply(Plan.uniform(pruner.graph, 0.5, strategy="none"))
    out = tmp_path_factory.mktemp("lat") / "pruned"
    save_pruned(result, out, get_config("resnet20_cifar10"), SHAPE)
    return out


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["bench-latency", *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_reports_every_runtime_and_writes_the_plot(
    pruned_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lat, "wall_timer", lambda device: _fixed)  # no timed work: only the exports run
    plots = tmp_path / "plots"
    code, out, err = _cli(
        capsys,
        str(pruned_dir),
        "--runtime",
        "all",
        "--batch-sizes",
        "1,2",
        "--warmup",
        "0",
        "--out",
        str(plots),
        "--json",
    )
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["model"] == report["against"] == "resnet20_cifar10"
    section = {k: v for k, v in report.items() if k not in ("model", "against")}
    lat.check_section(section)
    assert tuple(section["runtimes"]) == lat.available_runtimes()
    assert all(row["speedup"] == 2.0 for e in section["runtimes"].values() for row in e["batches"])
    assert (plots / "latency.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((plots / "latency.json").read_text()) == section


def test_cli_times_for_real(pruned_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, str(pruned_dir), "--batch-sizes", "1", "--warmup", "1", "--json")
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])["runtimes"]["torch"]["batches"][0]
    assert row["before"]["median_ms"] > 0 and row["after"]["median_ms"] > 0 and row["speedup"] > 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--batch-sizes", "0"), "--batch-sizes must be integers from 1"),
        (("--batch-sizes", "1,x"), "--batch-sizes must be comma-separated integers"),
        (("--runtime", "tensorrt"), "unknown --runtime 'tensorrt'"),
        (("--repeats", "3"), "--repeats must be at least 20"),
        (("--threads", "0"), "--threads must be at least 1"),
    ],
)
def test_cli_bad_input_is_one_error_line(
    pruned_dir: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], needle: str
) -> None:
    code, _, err = _cli(capsys, str(pruned_dir), *args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_cli_refuses_to_write_into_the_pruned_set(pruned_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, str(pruned_dir), "--out", str(pruned_dir))
    assert (
        code == 2 and err.startswith("error: ") and "holds another kind of autodfp output" in err and "pruned.pt" in err
    )
