"""The output directory (issue 25): autodfp replaces or deletes only files it wrote itself, never
writes through a link, and reports every path problem as one line.

Each test names the item of the issue it keeps fixed. The CLI cases run in-process and are refused
before any model is loaded; the saves use a two-conv network, or byte payloads written through
:mod:`autodfp.eval.outdir` directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autodfp
from autodfp.cli import main
from autodfp.errors import AutoDFPError, CheckpointError, OutputDirError, WeightsError
from autodfp.eval import outdir
from autodfp.eval.export import load_pruned
from autodfp.eval.outdir import (
    LOCK,
    MANIFEST,
    SET_FILES,
    OutputLock,
    claim_output_dir,
    verify_set,
    write_output_set,
    write_set,
)
from autodfp.search.checkpoint import Checkpointer, is_checkpoint_root
from conftest import CHEAP, make_tiny_cnn

ROOT = Path(__file__).resolve().parents[1]
R20 = "resnet20_cifar10"
#: a set of byte payloads: what write_set needs, without a model
PAYLOAD = {"pruned.pt": b"weights", "model.ts": b"script", "plan.json": b"{}\n"}


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def _one_error(code: int, err: str) -> str:
    """The single ``error:`` line of a refused command."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], err
    return lines[-1]


def _snapshot(root: Path) -> dict[str, tuple[str, Any]]:
    """Every entry under ``root`` (links not followed): kind and content or link target."""
    snap: dict[str, tuple[str, Any]] = {}
    if not os.path.lexists(root):
        return snap
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                snap[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(mode):
                snap[rel] = ("file", path.read_bytes())
            else:
                snap[rel] = ("dir", None)
    return snap


def _forbid_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any model loading fail loudly: the refusals below must come before it."""
    app = sys.modules["autodfp.cli.app"]  # the package's ``app`` attribute is the Typer object

    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("the run did work before refusing its output directory")

    monkeypatch.setattr(app, "_load", no_work)


@pytest.fixture(scope="module")
def tiny_result() -> autodfp.PruningResult:
    """A pruned two-conv network: a real result to save, in well under a second."""
    config = autodfp.Config(refine=False, **CHEAP)  # type: ignore[arg-type]
    return autodfp.prune(make_tiny_cnn(), input_shape=(3, 16, 16), uniform=0.5, config=config, progress=False)


# -- 1: an empty path --------------------------------------------------------------------------------
@pytest.mark.parametrize("empty", ["", "   ", "\t"])
def test_item1_an_empty_out_is_refused(
    empty: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ratios.png").write_bytes(b"the user's plot")
    monkeypatch.chdir(tmp_path)
    _forbid_work(monkeypatch)
    before = _snapshot(tmp_path)
    line = _one_error(*_cli(capsys, "prune", R20, "--uniform", "0.7", "--out", empty))
    assert "output directory path is empty" in line, line
    assert _snapshot(tmp_path) == before


def test_item1_an_empty_path_is_refused_by_the_api(
    tiny_result: autodfp.PruningResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for empty in ("", " "):
        with pytest.raises(OutputDirError, match="path is empty"):
            autodfp.save(tiny_result, empty, overwrite=True)
    assert list(tmp_path.iterdir()) == []


# -- 2, 3: a folder of the user's ---------------------------------------------------------------------
def test_item2_a_folder_of_the_users_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "myproject"
    project.mkdir()
    for name in ("report.json", "ratios.png", "search.json"):
        (project / name).write_text(f"the user's {name}")
    _forbid_work(monkeypatch)
    before = _snapshot(project)
    line = _one_error(*_cli(capsys, "prune", R20, "--uniform", "0.7", "--out", str(project)))
    assert "not an autodfp output" in line and "--force" in line, line
    # --force writes beside the user's files, never over them: these names belong to the set
    line = _one_error(*_cli(capsys, "prune", R20, "--uniform", "0.7", "--force", "--out", str(project)))
    assert "ratios.png" in line and "never replaces" in line, line
    assert _snapshot(project) == before


def test_item2_force_writes_beside_the_users_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "myproject"
    (project / "data").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    (project / "data" / "x.csv").write_text("1,2")
    before = _snapshot(project)
    args = ("prune", R20, "--uniform", "0.7", "--no-refine", "--no-eval", "--out", str(project))
    code, err = _cli(capsys, *args, "--force")
    assert code == 0, err
    verify_set(project)
    after = _snapshot(project)
    assert {k: v for k, v in after.items() if k in before} == before, "the user's files are kept as they were"
    assert set(after) - set(before) <= {*SET_FILES, MANIFEST}
    assert "not an autodfp output" in _one_error(*_cli(capsys, *args)), "still the user's folder without --force"


def test_item3_save_refuses_a_folder_of_the_users(tiny_result: autodfp.PruningResult, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "search.json").write_text('{"mine": 1}')
    (d / "rewards.png").write_bytes(b"my plot")
    before = _snapshot(d)
    with pytest.raises(OutputDirError, match="not an autodfp output.*overwrite=True"):
        autodfp.save(tiny_result, d)
    with pytest.raises(OutputDirError, match="holds rewards.png, which autodfp did not write"):
        autodfp.save(tiny_result, d, overwrite=True)
    assert _snapshot(d) == before


def test_item3_save_replaces_its_own_set_and_keeps_the_users_files(
    tiny_result: autodfp.PruningResult, tmp_path: Path
) -> None:
    d = tmp_path / "d"
    write_set(d, {**PAYLOAD, "rewards.png": b"an old run's plot"})  # an earlier set of autodfp's
    autodfp.save(tiny_result, d)  # only autodfp's files: no overwrite needed
    assert not (d / "rewards.png").exists(), "the old set's file that the new set lacks is removed"
    assert set(verify_set(d)) == {"pruned.pt", "model.ts", "plan.json", "report.json"}
    (d / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="notes.txt"):
        autodfp.save(tiny_result, d)
    autodfp.save(tiny_result, d, overwrite=True)
    assert (d / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["manifest.json", "model.ts", "notes.txt", "plan.json", "pruned.pt", "report.json"]
    )
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(autodfp.load(d)(x), tiny_result.model(x))


def test_autodfps_own_leftovers_are_not_the_users(tmp_path: Path) -> None:
    """The lock file, a killed save's staging folder and a search's checkpoints are autodfp's."""
    out = tmp_path / "o"
    ckpt = Checkpointer(out / "search", {"method": "random"})
    ckpt.save(2, {"tracker": {}, "rng": {}}, {})
    assert is_checkpoint_root(out / "search")
    (out / LOCK).write_bytes(b"")
    (out / ".staging-abcd1234").mkdir()
    (out / ".staging-abcd1234" / "pruned.pt").write_bytes(b"half")
    assert claim_output_dir(out) == out
    write_output_set(out, PAYLOAD)
    assert not (out / ".staging-abcd1234").exists() and not (out / LOCK).exists()
    assert is_checkpoint_root(out / "search"), "the search's checkpoints are kept for --resume"
    (out / "search" / "mine.txt").write_text("x")  # no longer the checkpoint layout: the user's folder
    assert not is_checkpoint_root(out / "search")
    with pytest.raises(OutputDirError, match="search"):
        claim_output_dir(out)
    with pytest.raises(OutputDirError, match="holds search"):
        claim_output_dir(out, overwrite=True, search=True)
    assert claim_output_dir(out, overwrite=True) == out  # a run without a search leaves it alone


def test_a_killed_save_leaves_a_folder_that_is_still_autodfps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed mid-swap: loads refuse the folder, and the next save may still replace every file in it."""
    out = tmp_path / "o"
    write_set(out, {**PAYLOAD, "ratios.png": b"old"})
    real_place = outdir._place
    calls = {"n": 0}

    def dying_place(src: Path, dst: Path, ours: bool) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # after the pending manifest and one file
            raise KeyboardInterrupt
        real_place(src, dst, ours)

    monkeypatch.setattr(outdir, "_place", dying_place)
    with pytest.raises(KeyboardInterrupt):
        write_set(out, {**PAYLOAD, "search.json": b"{}", "pruned.pt": b"new weights"})
    monkeypatch.setattr(outdir, "_place", real_place)
    with pytest.raises(WeightsError, match="interrupted save"):
        verify_set(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".staging-")]
    claim_output_dir(out)  # every file there is still known to be autodfp's
    write_set(out, PAYLOAD)
    assert set(verify_set(out)) == set(PAYLOAD)
    assert sorted(p.name for p in out.iterdir()) == sorted([*PAYLOAD, MANIFEST])


# -- 9: the manifest lists the whole set ------------------------------------------------------------
def _rewrite_manifest(d: Path, edit: Any) -> None:
    manifest = json.loads((d / MANIFEST).read_text())
    edit(manifest)
    (d / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda m: m.update(files={}), "does not list pruned.pt"),
        (lambda m: m["files"].pop("model.ts"), "does not list model.ts"),
        (lambda m: m["files"].pop("plan.json"), "does not list plan.json"),
        (lambda m: m["files"].pop("report.json"), "report.json is not listed"),
        (lambda m: m["files"].update({"pruned.pt": "ab" * 31}), "64 hex digits"),
        (lambda m: m["files"].update({"pruned.pt": 7}), "64 hex digits"),
        (lambda m: m["files"].update({"../x": "0" * 64}), "unexpected file"),
        (lambda m: m.update(files=["pruned.pt"]), "'files' is not an object"),
        (lambda m: m.update(format=["autodfp.output/1"]), "not an autodfp manifest"),
        (lambda m: m.update(format="autodfp.output-pending/1"), "interrupted save"),
    ],
)
def test_item9_the_manifest_must_list_every_file_of_the_set(
    edit: Any, needle: str, tiny_result: autodfp.PruningResult, tmp_path: Path
) -> None:
    d = tmp_path / "d"
    autodfp.save(tiny_result, d)
    _rewrite_manifest(d, edit)
    with pytest.raises(WeightsError, match=needle):
        load_pruned(d)


def test_item9_another_runs_pruned_pt_beside_an_empty_manifest_is_refused(
    tiny_result: autodfp.PruningResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tmp_path / "a"
    assert _cli(capsys, "prune", R20, "--uniform", "0.5", "--no-refine", "--no-eval", "--out", str(a))[0] == 0
    (a / MANIFEST).write_text(json.dumps({"format": "autodfp.output/1", "files": {}}))
    line = _one_error(*_cli(capsys, "eval", str(a), "--limit", "8"))
    assert "does not list pruned.pt" in line, line


# -- 13: links -------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["missing", "exists"])
def test_item13_a_lock_file_that_is_a_link_is_refused(target: str, tmp_path: Path) -> None:
    out, outside = tmp_path / "o", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    victim = outside / "victim"
    if target == "exists":
        victim.write_bytes(b"precious")
    (out / LOCK).symlink_to(victim)
    before = _snapshot(outside)
    with pytest.raises(OutputDirError, match="lock file .* is a symbolic link"):
        with OutputLock(out):
            pass
    with pytest.raises(OutputDirError, match=r"holds \.autodfp\.lock, which autodfp did not write"):
        write_output_set(out, PAYLOAD, overwrite=True)
    assert _snapshot(outside) == before, "nothing was created or changed outside OUT"


def test_item13_a_lock_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "o"
    (out / LOCK).mkdir(parents=True)
    with pytest.raises(OutputDirError, match="not a regular file"):
        with OutputLock(out):
            pass
    os.rmdir(out / LOCK)
    os.mkfifo(out / LOCK)
    with pytest.raises(OutputDirError, match="not a regular file"):
        with OutputLock(out):
            pass


@pytest.mark.parametrize("name", ["pruned.pt", "manifest.json", "report.json"])
def test_item13_a_link_at_a_name_of_the_set_is_never_written_through(name: str, tmp_path: Path) -> None:
    out, outside = tmp_path / "o", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    (out / name).symlink_to(outside / "victim")
    before = _snapshot(tmp_path)
    with pytest.raises(OutputDirError, match=f"holds {name}, which autodfp did not write"):
        write_output_set(out, {**PAYLOAD, "report.json": b"{}"}, overwrite=True)
    with pytest.raises(OutputDirError, match=f"holds {name}"):
        write_set(out, PAYLOAD)  # the low-level write refuses it too, whoever calls it
    assert _snapshot(tmp_path) == before


def test_item13_out_may_be_a_link_to_a_directory(tiny_result: autodfp.PruningResult, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    autodfp.save(tiny_result, tmp_path / "link")
    assert set(verify_set(real)) == {"pruned.pt", "model.ts", "plan.json", "report.json"}
    assert (tmp_path / "link").is_symlink(), "the user's link is kept"


def test_item13_a_search_folder_that_is_a_link_is_never_written_into(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, outside = tmp_path / "o", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "search").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckpointError, match="symbolic link"):
        Checkpointer(out / "search", {}).save(1, {"tracker": {}, "rng": {}}, {})
    with pytest.raises(CheckpointError, match="symbolic link"):
        Checkpointer(out / "search", {}).latest()
    _forbid_work(monkeypatch)
    args = ("prune", R20, "--macs-ratio", "0.5", "--search", "random", "--out", str(out))
    assert "not an autodfp output" in _one_error(*_cli(capsys, *args))
    assert "holds search" in _one_error(*_cli(capsys, *args, "--force"))
    assert list(outside.iterdir()) == []


# -- 18: paths that cannot be used -------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda t: t / ("x" * 300), "name too long"),
        (lambda t: t / ("x" * 300) / "sub", "name too long"),
        (lambda t: (t / "dangling").symlink_to(t / "nowhere") or t / "dangling", "is a dangling symbolic link"),
        (lambda t: (t / "d2").symlink_to(t / "nowhere") or t / "d2" / "sub", "lies under"),
        (lambda t: (t / "loop").symlink_to(t / "loop") or t / "loop", "symbolic link loop"),
        (lambda t: (t / "loop2").symlink_to(t / "loop2") or t / "loop2" / "sub", "symbolic link loop"),
        (lambda t: Path("/proc/autodfp-no-such-dir"), "cannot be created"),
        (lambda t: Path("/proc/self/autodfp/sub"), "cannot be"),  # created, or written (not as root)
        (lambda t: (t / "f").write_text("x") and t / "f", "is a file, not a directory"),
        (lambda t: (t / "g").write_text("x") and t / "g" / "sub", "lies under"),
    ],
    ids=[
        "long",
        "long-parent",
        "dangling",
        "under-dangling",
        "loop",
        "under-loop",
        "proc",
        "proc-self",
        "file",
        "under-file",
    ],
)
def test_item18_unusable_paths_are_one_line_errors(
    make: Any, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = make(tmp_path)
    _forbid_work(monkeypatch)
    before = _snapshot(tmp_path)
    line = _one_error(*_cli(capsys, "prune", R20, "--uniform", "0.7", "--out", str(out)))
    assert needle in line, line
    assert _snapshot(tmp_path) == before
    with pytest.raises(OutputDirError, match=needle):
        write_output_set(out, PAYLOAD, overwrite=True)


# -- 19: SIGTERM -----------------------------------------------------------------------------------
def test_item19_sigterm_is_an_interrupt_that_leaves_a_resumable_search(tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = ["prune", R20, "--macs-ratio", "0.5", "--search", "random", "--episodes", "500"]
    args += ["--checkpoint-every", "1", "--synth-steps", "2", "--reward-inputs", "8", "--no-refine", "--no-eval"]
    env = {**os.environ, "AUTODFP_PROGRESS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "autodfp.cli", *args, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 300  # generous: only a hung run reaches it
        while not (out / "search" / "latest.json").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted", err
    assert not (out / LOCK).exists(), "the lock was released"
    assert is_checkpoint_root(out / "search")
    latest = Checkpointer(out / "search", {}).latest()
    assert latest is not None and Checkpointer(out / "search", {}).read_state(latest)["episodes_done"] >= 1
    assert claim_output_dir(out) == out, "--resume may use this OUT: everything in it is autodfp's"


def test_item19_sigterm_handler_is_restored() -> None:
    from autodfp.cli.app import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this at once
    assert signal.getsignal(signal.SIGTERM) == before


# -- properties ------------------------------------------------------------------------------------
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_NAME = st.sampled_from([*SET_FILES, "../pruned.pt", "", "x"])
_DIGEST = st.one_of(st.text(alphabet="0123456789abcdef", min_size=63, max_size=65), _JSON)


@st.composite
def _manifests(draw: st.DrawFn, real: dict[str, Any]) -> bytes:
    """Random bytes, random JSON, or the real manifest with a few fields damaged."""
    kind = draw(st.sampled_from(["bytes", "json", "edit"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(_JSON)).encode()
    doc = json.loads(json.dumps(real))
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["format", "drop", "add", "files"]))
        if what == "format":
            doc["format"] = draw(st.sampled_from(["autodfp.output/1", "autodfp.output-pending/1", "x"]) | _JSON)
        elif what == "drop" and doc.get("files") and isinstance(doc["files"], dict):
            doc["files"].pop(draw(st.sampled_from(sorted(doc["files"]))))
        elif what == "add" and isinstance(doc.get("files"), dict):
            doc["files"][draw(_NAME)] = draw(_DIGEST)
        elif what == "files":
            doc["files"] = draw(_JSON)
    return json.dumps(doc).encode()


@pytest.fixture(scope="module")
def saved_set(tiny_result: autodfp.PruningResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("set") / "d"
    autodfp.save(tiny_result, d)
    return d


def test_property_any_manifest_loads_or_is_an_autodfp_error(saved_set: Path) -> None:
    real_bytes = (saved_set / MANIFEST).read_bytes()
    real = json.loads(real_bytes)

    @settings(
        max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(data=_manifests(real))
    def check(data: bytes) -> None:
        (saved_set / MANIFEST).write_bytes(data)
        for load in (verify_set, load_pruned):
            try:
                load(saved_set)
            except AutoDFPError as exc:
                assert "\n" not in str(exc)

    try:
        check()
    finally:
        (saved_set / MANIFEST).write_bytes(real_bytes)
    load_pruned(saved_set)  # the real manifest still loads


_TREE_NAMES = [*SET_FILES, MANIFEST, LOCK, "search", ".staging-abcd1234", "notes.txt", "sub"]
_KINDS = ["file", "dir", "link_file", "link_dir", "dangling", "loop"]
_SPECIAL = {MANIFEST: ["manifest"], "search": ["checkpoints"], ".staging-abcd1234": ["staging"]}
_tree = st.lists(
    st.sampled_from(_TREE_NAMES).flatmap(
        lambda n: st.tuples(st.just(n), st.sampled_from(_KINDS + _SPECIAL.get(n, [])))
    ),
    max_size=6,
    unique_by=lambda e: e[0],
)


def _build(out: Path, outside: Path, tree: list[tuple[str, str]], listed: set[str]) -> set[str]:
    """Make ``tree`` in ``out``; return the names that are autodfp's under the rule (the test's oracle)."""
    ours: set[str] = set()
    kinds = dict(tree)
    for name, kind in tree:
        path = out / name
        if kind == "file":
            path.write_bytes(b"user's " + name.encode())
            ours |= {name} if name == LOCK else set()
        elif kind == "dir":
            path.mkdir()
            (path / "f").write_bytes(b"user's")
        elif kind == "link_file":
            path.symlink_to(outside / "target.txt")
        elif kind == "link_dir":
            path.symlink_to(outside / "tdir", target_is_directory=True)
        elif kind == "dangling":
            path.symlink_to(outside / "missing")
        elif kind == "loop":
            path.symlink_to(name)
        elif kind == "manifest":
            files = {n: hashlib.sha256(n.encode()).hexdigest() for n in listed}
            path.write_text(json.dumps({"format": "autodfp.output/1", "files": files}))
            ours |= {name} | {n for n in listed if kinds.get(n) == "file"}
        elif kind == "checkpoints":
            Checkpointer(path, {}).save(1, {"tracker": {}, "rng": {}}, {})
            ours.add(name)
        elif kind == "staging":
            path.mkdir()
            (path / "model.ts").write_bytes(b"half")
            ours.add(name)
    return ours


@settings(max_examples=60, deadline=None, database=None)
@given(
    exists=st.booleans(),
    tree=_tree,
    listed=st.sets(st.sampled_from(SET_FILES)),
    extra=st.sets(st.sampled_from(SET_FILES[3:])),
    overwrite=st.booleans(),
)
def test_property_a_save_touches_only_its_own_files(
    exists: bool, tree: list[tuple[str, str]], listed: set[str], extra: set[str], overwrite: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out, outside = root / "out", root / "outside"
        (outside / "tdir").mkdir(parents=True)
        (outside / "target.txt").write_bytes(b"outside")
        (outside / "tdir" / "f").write_bytes(b"outside")
        ours: set[str] = set()
        if exists:
            out.mkdir()
            ours = _build(out, outside, tree, listed)
        foreign = {n for n, _ in tree if n not in ours} if exists else set()
        files = {**PAYLOAD, **{n: n.encode() * 3 for n in extra}}
        before, before_outside = _snapshot(out), _snapshot(outside)
        try:
            write_output_set(out, files, overwrite=overwrite)
            ok = True
        except AutoDFPError as exc:
            assert "\n" not in str(exc)
            ok = False
        # the oracle: refused exactly when the rule says so
        blocked = foreign & {*SET_FILES, MANIFEST, LOCK}
        assert ok == (not foreign or (overwrite and not blocked)), (tree, foreign, overwrite)
        assert _snapshot(outside) == before_outside, "nothing outside OUT changes"
        assert sorted(os.listdir(root)) == (["out", "outside"] if ok or exists else ["outside"])
        after = _snapshot(out)
        for rel, entry in before.items():
            if rel.split(os.sep)[0] in foreign:
                assert after.get(rel) == entry, f"the user's {rel} changed"
        if ok:
            assert verify_set(out) == {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
            leftovers = {n for n in os.listdir(out) if n.startswith(".staging-") or n == LOCK} - foreign
            assert not leftovers, "a save leaves no staging folder and no lock behind"
        else:
            assert {k: v for k, v in after.items() if k != LOCK} == {k: v for k, v in before.items() if k != LOCK}
        assert not outdir._HELD


@pytest.mark.parametrize("command", ["proxy-check", "bench"])
def test_report_commands_refuse_a_folder_of_the_users_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """proxy-check and bench write through the same component as prune: the user's folder is refused."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "proxy.json").write_text("my own")
    (out / "bench.md").write_text("my own")
    args = [command, "resnet20_cifar10", "--out", str(out)]
    code = main(args + (["--plans", "3"] if command == "proxy-check" else []))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "not an autodfp output" in err
    assert (out / "proxy.json").read_text() == "my own" and (out / "bench.md").read_text() == "my own"
    assert sorted(p.name for p in out.iterdir()) == ["bench.md", "proxy.json"]


def test_a_report_set_is_sealed_and_replaced_by_the_next_run(tmp_path: Path) -> None:
    from autodfp.eval.outdir import scan, write_output_set

    out = tmp_path / "proxy"
    write_output_set(out, {"proxy.json": b"{}", "proxy.png": b"png"}, kind="proxy")
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["proxy.json", "proxy.png"]
    assert not scan(out).foreign  # all of it is autodfp's: a second run may replace it
    write_output_set(out, {"proxy.json": b'{"a": 1}'}, kind="proxy")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "proxy.json"]
    with pytest.raises(ValueError, match="not a file of the proxy output set"):
        write_output_set(out, {"pruned.pt": b""}, kind="proxy")
