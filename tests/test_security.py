"""No code runs from a file the user did not trust, and hostile files are refused before they cost memory.

Every payload here creates a marker file when unpickled; each test asserts that the marker does
not exist afterwards, so a refusal that came *after* the payload ran would still fail.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from autodfp.compress.surgery import Pruner
from autodfp.errors import AutoDFPError, CheckpointError
from autodfp.models import load_model
from autodfp.search.driver import search
from autodfp.search.rewards import AgreementReward

CIFAR = (3, 32, 32)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the file's existence proves the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text, text
    return text


# ------------------------------------------------------------------------------------------------
# search checkpoints


@pytest.fixture(scope="module")
def sac_checkpoint(tmp_path_factory):
    """A real two-episode SAC checkpoint, and the arguments that resume it."""
    net, _ = load_model("resnet20_cifar10")
    pruner = Pruner(net, CIFAR)
    reward = AgreementReward(net, torch.randn(4, *CIFAR, generator=torch.Generator().manual_seed(0)))
    root = tmp_path_factory.mktemp("ckpt") / "search"
    kw = dict(method="sac", warmup=1, reward=reward, seed=0, checkpoint_every=2, progress=False)
    search(pruner, 0.5, episodes=2, checkpoint_dir=root, **kw)
    return pruner, root, kw


def _copy(sac_checkpoint, tmp_path: Path) -> tuple[Path, Path]:
    _, root, _ = sac_checkpoint
    dst = tmp_path / "search"
    shutil.copytree(root, dst)
    return dst, dst / json.loads((dst / "latest.json").read_text())["dir"]


def _resume(sac_checkpoint, root: Path):
    pruner, _, kw = sac_checkpoint
    return search(pruner, 0.5, episodes=4, checkpoint_dir=root, resume=True, **kw)


def test_checkpoint_holds_only_data(sac_checkpoint):
    _, root, _ = sac_checkpoint
    ckpt = root / json.loads((root / "latest.json").read_text())["dir"]
    assert {p.name for p in ckpt.iterdir()} == {"state.json", "sac.pt", "replay.npz"}
    torch.load(ckpt / "sac.pt", weights_only=True)  # would raise on any pickled object
    import numpy as np

    with np.load(ckpt / "replay.npz", allow_pickle=False) as npz:
        assert {"observations", "actions", "rewards", "episode_rewards"} <= set(npz.files)


def test_pickle_in_place_of_the_replay_buffer_does_not_run(sac_checkpoint, tmp_path):
    root, ckpt = _copy(sac_checkpoint, tmp_path)
    marker = tmp_path / "pwned"
    (ckpt / "replay.npz").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="replay.npz") as err:
        _resume(sac_checkpoint, root)
    _one_line(err.value)
    assert not marker.exists()


def test_pickle_inside_the_agent_file_does_not_run(sac_checkpoint, tmp_path):
    root, ckpt = _copy(sac_checkpoint, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"policy": _Payload(marker)}, ckpt / "sac.pt")  # a zip with a hostile data.pkl
    with pytest.raises(CheckpointError, match="sac.pt") as err:
        _resume(sac_checkpoint, root)
    _one_line(err.value)
    assert not marker.exists()


def test_legacy_pickled_checkpoint_is_refused_unread(sac_checkpoint, tmp_path):
    """The layout older versions wrote: SB3's zip (cloudpickled entries) and a pickled buffer."""
    root, ckpt = _copy(sac_checkpoint, tmp_path)
    marker = tmp_path / "pwned"
    for f in ("sac.pt", "replay.npz"):
        (ckpt / f).unlink()
    (ckpt / "replay.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    blob = base64.b64encode(pickle.dumps(_Payload(marker))).decode()
    data = {"policy_class": {":type:": "<class 'abc.ABCMeta'>", ":serialized:": blob}}
    with zipfile.ZipFile(ckpt / "sac.zip", "w") as z:
        z.writestr("data", json.dumps(data))
        z.writestr("_stable_baselines3_version", "2.9.2")
    state = json.loads((ckpt / "state.json").read_text())
    state["format"] = "autodfp.search-checkpoint/1"
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="older autodfp") as err:
        _resume(sac_checkpoint, root)
    _one_line(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_latest_pointer_cannot_leave_the_checkpoint_dir(sac_checkpoint, tmp_path, where):
    root, ckpt = _copy(sac_checkpoint, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.copytree(ckpt, outside / ckpt.name)  # a valid checkpoint, but not ours to follow
    if where == "absolute":
        name = str(outside / ckpt.name)
    elif where == "dotdot":
        name = f"../elsewhere/{ckpt.name}"
    else:
        shutil.rmtree(ckpt)
        ckpt.symlink_to(outside / ckpt.name)
        name = ckpt.name
    (root / "latest.json").write_text(json.dumps({"dir": name, "episodes": 2}))
    with pytest.raises(CheckpointError, match="latest.json") as err:
        _resume(sac_checkpoint, root)
    _one_line(err.value)


@pytest.mark.parametrize(
    "damage",
    [
        "state-garbage",
        "state-fields",
        "state-rng",
        "agent-truncated",
        "agent-wrong-shapes",
        "replay-truncated",
        "replay-wrong-shapes",
    ],
)
def test_damaged_checkpoint_is_a_one_line_error_naming_the_file(sac_checkpoint, tmp_path, damage):
    root, ckpt = _copy(sac_checkpoint, tmp_path)
    state_file = ckpt / "state.json"
    state = json.loads(state_file.read_text())
    if damage == "state-garbage":
        state_file.write_bytes(b"\xff\xfe{not json")
        expect = "state.json"
    elif damage == "state-fields":
        state["tracker"]["history"] = "abc"
        state_file.write_text(json.dumps(state))
        expect = "state.json"
    elif damage == "state-rng":
        state["rng"]["torch"] = [1, 2, 3]
        state_file.write_text(json.dumps(state))
        expect = "state.json"
    elif damage == "agent-truncated":
        data = (ckpt / "sac.pt").read_bytes()
        (ckpt / "sac.pt").write_bytes(data[: len(data) // 2])
        expect = "sac.pt"
    elif damage == "agent-wrong-shapes":
        blob = torch.load(ckpt / "sac.pt", weights_only=True)
        blob["policy"] = {k: torch.zeros(3) for k in blob["policy"]}
        torch.save(blob, ckpt / "sac.pt")
        expect = "sac.pt"
    elif damage == "replay-truncated":
        data = (ckpt / "replay.npz").read_bytes()
        (ckpt / "replay.npz").write_bytes(data[: len(data) // 2])
        expect = "replay.npz"
    else:
        import numpy as np

        with np.load(ckpt / "replay.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        arrays["observations"] = arrays["observations"][..., :2]
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        (ckpt / "replay.npz").write_bytes(buf.getvalue())
        expect = "replay.npz"
    with pytest.raises(CheckpointError, match=expect) as err:
        _resume(sac_checkpoint, root)
    assert isinstance(err.value, AutoDFPError)
    _one_line(err.value)


# ------------------------------------------------------------------------------------------------
# decompression bombs


def _bomb_png(path: Path, side: int) -> None:
    """A 1-bit greyscale PNG of side x side zero pixels: tiny on disk, huge once decoded.

    Written chunk by chunk with zlib so that the test itself never holds the decoded image.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [14000, 10000])  # over twice PIL's limit (its error); over the limit (a warning)
def test_decompression_bomb_image_is_a_data_error_naming_the_file(tmp_path, side):
    from autodfp.data.datasets import ImageFolderDataset, UnlabeledImageDir
    from autodfp.errors import DataError

    bomb = tmp_path / "data" / "cat" / "bomb.png"
    _bomb_png(bomb, side)
    assert bomb.stat().st_size < 1_000_000
    for ds in (ImageFolderDataset(tmp_path / "data"), UnlabeledImageDir(tmp_path / "data")):
        with pytest.raises(DataError, match="bomb.png") as err:
            ds[0]
        _one_line(err.value)


# ------------------------------------------------------------------------------------------------
# oversized checkpoints

_PEAK_SCRIPT = r"""
import json, resource, sys
from autodfp.errors import AutoDFPError
from autodfp.models import load_model
load_model("resnet20_cifar10", pretrained=False)  # imports and first allocations happen here
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}
for path in sys.argv[1:]:
    try:
        load_model("resnet20_cifar10", weights=path)
        out[path] = ["loaded", ""]
    except AutoDFPError as exc:
        out[path] = [type(exc).__name__, str(exc)]
out["grew_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(out))
"""


def test_oversized_tensors_are_refused_before_they_are_read(tmp_path):
    """A 128 MiB tensor where the model has 432 numbers: refused by its shape, its bytes never read.

    ``plain.th`` is what torch.save writes (memory-mapped, then refused by the shape check);
    ``deflated.th`` is the same zip re-packed with compression: 130 KB that would inflate to
    128 MiB, refused from the zip directory. The peak memory of a fresh process must not grow by
    anything like the tensor's size.
    """
    import os
    import subprocess
    import sys

    from autodfp.models.resnet_cifar import resnet20

    state = resnet20().state_dict()
    # zeros, not ``torch.empty``: reused memory can hold anything, and the deflated copy below must
    # compress to almost nothing (with recycled bytes it came out at 6 MB once, under load)
    state["conv1.weight"] = torch.zeros(32 * 1024 * 1024)
    plain, deflated = tmp_path / "plain.th", tmp_path / "deflated.th"
    torch.save(state, plain)
    del state
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            with zin.open(info) as src, zout.open(info.filename, "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    assert deflated.stat().st_size < 2_000_000 < plain.stat().st_size

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(plain), str(deflated)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["grew_mib"] < 48, out
    kind, msg = out[str(plain)]
    assert kind == "ModelError" and "shape mismatch at conv1.weight" in msg and "plain.th" in msg
    kind, msg = out[str(deflated)]
    assert kind == "WeightsError" and "compressed record" in msg and "deflated.th" in msg and "\n" not in msg
