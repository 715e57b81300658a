"""The one image-folder walker (:mod:`autodfp.data.walk`) and mode-aware, bounded decoding.

Issue 25, items 4 (a FIFO named ``x.png`` blocked the walk), 5 (symlink cycles made the walk
exponential and counted files several times; ``--limit`` did not bound it), 6 (16-bit PNGs were
clipped to white; decoding must be mode-aware and bounded) and 14 (names in messages are escaped),
each test named after its item, and property tests (hypothesis) over random trees of files,
directories, FIFOs and symlinks that building a dataset and reading from it either works or is an
:class:`~autodfp.errors.AutoDFPError`, never hangs, and never counts more images than exist.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from autodfp.data import walk
from autodfp.data.datasets import (
    ImageFolderDataset,
    UnlabeledImageDir,
    _load_image,
    _to_float_tensor,
    _to_rgb,
    build_transform,
    find_images,
    make_loader,
    resolve_dataset,
)
from autodfp.data.walk import WalkBudget, iter_image_files, iter_images, open_regular, printable
from autodfp.errors import AutoDFPError, DataError
from autodfp.models import get_config
from autodfp.models.registry import CIFAR_PRE

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
CIFAR_CLASSES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@contextmanager
def _no_hang(seconds: int = 20) -> Iterator[None]:
    """Fail (rather than block the suite) if the body runs longer than ``seconds``."""

    def boom(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: the walk or a read blocked")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    assert text.isprintable(), text
    return text


def _png(path: Path, value: int = 120, size: tuple[int, int] = (6, 5), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode in ("L", "1", "P") else (value, 255 - value, value // 2)).save(
        path, format="PNG"
    )
    return path


def _class_tree(root: Path, per_class: int, classes: list[str] | None = None) -> None:
    for c in classes or CIFAR_CLASSES:
        for i in range(per_class):
            _png(root / c / f"{i:03d}.png", value=(7 * i) % 256)


def _os_walk_order(root: Path) -> list[Path]:
    """The pre-walker listing (``os.walk`` with sorted names), for trees without links."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / n for n in sorted(filenames) if walk.is_image_name(n))
    return out


# ------------------------------------------------------------------------------------------------
# item 4: only regular files are images; opening never blocks


def test_item4_a_fifo_named_png_is_skipped_and_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _class_tree(root, 2)
    os.mkfifo(root / "cat" / "x.png")
    os.mkfifo(root / "cat" / "y.jpg")
    (root / "cat" / "dir.png").mkdir()  # a directory named like an image is walked, not read
    _png(root / "cat" / "dir.png" / "inner.png")
    (root / "cat" / "ok.png").symlink_to(_png(tmp_path / "elsewhere.png"))  # a link to a regular file is fine
    with _no_hang():
        ds = ImageFolderDataset(root, transform=build_transform(CIFAR_PRE))
        cat = [p.name for p, y in ds.samples if y == ds.class_to_idx["cat"]]
        assert cat == ["000.png", "001.png", "ok.png", "inner.png"]
        assert all(stat.S_ISREG(os.stat(p).st_mode) for p, _ in ds.samples)
        for i in range(len(ds)):
            ds[i]
        assert "x.png" not in {p.name for p in UnlabeledImageDir(root).paths}
        assert "x.png" not in {p.name for p in find_images(root)}


def test_item4_eval_loader_on_a_tree_with_a_fifo_does_not_block(tmp_path: Path) -> None:
    """The reported command, ``autodfp eval <model> --data folder:DIR --limit 64``, minus the model."""
    root = tmp_path / "data"
    _class_tree(root, 1)
    os.mkfifo(root / "bird" / "x.png")
    with _no_hang():
        loader = make_loader(resolve_dataset(f"folder:{root}", get_config("resnet20_cifar10"), limit=64), limit=64)
        assert sum(len(y) for _, y in loader) == 10


def test_item4_a_socket_named_png_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _png(root / "a.png")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "b.png"))
    except OSError:  # path too long for AF_UNIX on this machine
        pytest.skip("cannot bind a unix socket here")
    try:
        with _no_hang():
            assert [p.name for p in iter_images(root)] == ["a.png"]
    finally:
        sock.close()


def test_item4_loading_a_fifo_is_a_one_line_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with _no_hang(10), pytest.raises(DataError, match="x.png: it is a FIFO, not a regular file") as err:
        _load_image(fifo)
    _one_line(err.value)
    with pytest.raises(DataError, match="a directory"):
        _load_image(tmp_path)
    with pytest.raises(DataError, match="No such file"):
        _load_image(tmp_path / "missing.png")


def test_item4_the_opened_descriptor_is_checked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path swapped for a FIFO between ``stat`` and ``open``: the open does not block, fstat refuses it."""
    fifo, regular = tmp_path / "x.png", _png(tmp_path / "real.png")
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(walk.os, "stat", lambda p, *a, **k: real_stat(regular if Path(p) == fifo else p, *a, **k))
    with _no_hang(10), pytest.raises(DataError, match="FIFO"):
        open_regular(fifo)


# ------------------------------------------------------------------------------------------------
# item 5: symlink cycles are cut, duplicates count once, the walk is lazy and bounded


def test_item5_two_self_links_in_a_class_folder_are_linear_not_exponential(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _class_tree(root, 4)  # 40 images
    (root / "cat" / "a").symlink_to(".")
    (root / "cat" / "b").symlink_to(".")
    (root / "dog" / "up").symlink_to("..")  # the dataset root again
    (root / "dog" / "top").symlink_to("/")  # an ancestor of everything
    t0 = time.perf_counter()
    with _no_hang():
        ds = ImageFolderDataset(root)
        assert len(ds) == 40
        assert resolve_dataset(f"folder:{root}", get_config("resnet20_cifar10"), limit=8).targets == [0] * 4 + [1] * 4
    assert time.perf_counter() - t0 < 10


def test_item5_one_self_link_counts_40_files_as_40(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for i in range(40):
        _png(root / f"{i:02d}.png")
    (root / "self").symlink_to(".")
    assert len(UnlabeledImageDir(root)) == 40
    assert len(find_images(root)) == 40
    # the same directory reached twice: walked once, at its first (sorted) path
    (root / "sub").mkdir()
    _png(root / "sub" / "z.png")
    (root / "also").symlink_to("sub")
    assert [p.relative_to(root).as_posix() for p in find_images(root)][-1] == "also/z.png"
    assert len(find_images(root)) == 41


def test_item5_a_file_reached_through_links_counts_once(tmp_path: Path) -> None:
    root, outside = tmp_path / "data", tmp_path / "outside"
    _class_tree(root, 2, ["cat", "dog"])
    pic = _png(outside / "pic.png")
    (root / "cat" / "ext.png").symlink_to(pic)  # links that lead outside the root are followed
    (root / "cat" / "ext2.png").symlink_to(pic)
    (root / "cat" / "dup.png").symlink_to("000.png")
    os.link(root / "dog" / "000.png", root / "dog" / "hard.png")  # a hard link is the same file too
    ds = ImageFolderDataset(root)
    assert [(p.name, y) for p, y in ds.samples] == [
        ("000.png", 0),
        ("001.png", 0),
        ("ext.png", 0),
        ("000.png", 1),
        ("001.png", 1),
    ]


def test_item5_one_file_in_two_class_folders_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _class_tree(root, 1, ["cat", "dog"])
    (root / "dog" / "cat.png").symlink_to("../cat/000.png")
    with pytest.raises(DataError, match=r"dog/cat.png is also reached from class folder 'cat'") as err:
        ImageFolderDataset(root)
    _one_line(err.value)
    (root / "dog" / "cat.png").unlink()
    (root / "kitty").symlink_to("cat")  # a class folder that is another class folder
    with pytest.raises(DataError, match="two labels"):
        ImageFolderDataset(root)


def test_item5_a_root_level_self_link_is_an_empty_class_not_a_copy_of_every_class(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _class_tree(root, 2, ["cat", "dog"])
    (root / "all").symlink_to(".")
    ds = ImageFolderDataset(root)
    assert ds.classes == ["all", "cat", "dog"] and ds.targets == [1, 1, 2, 2]


def test_item5_limit_stops_the_walk_and_keeps_the_first_n_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    _class_tree(root, 3)
    for c in CIFAR_CLASSES:
        (root / c / "nested").mkdir()
        _png(root / c / "nested" / "deep.png")
        (root / c / ".hidden").mkdir()
        _png(root / c / ".hidden" / "no.png")
        _png(root / c / ".no.png")
    full = ImageFolderDataset(root)
    assert len(full) == 40 and not any(".hidden" in str(p) or p.name.startswith(".") for p, _ in full.samples)
    for n in (1, 3, 4, 9, 40, 100):
        assert ImageFolderDataset(root, limit=n).samples == full.samples[:n]
        assert UnlabeledImageDir(root, limit=n).paths == UnlabeledImageDir(root).paths[:n]
    cfg = get_config("resnet20_cifar10")
    limited = [y for _, y in make_loader(resolve_dataset(f"folder:{root}", cfg, limit=7), limit=7)]
    assert torch.cat(limited).tolist() == full.targets[:7]

    opened: list[str] = []
    real_scandir = os.scandir
    monkeypatch.setattr(walk.os, "scandir", lambda p: opened.append(str(p)) or real_scandir(p))
    assert len(ImageFolderDataset(root, limit=2)) == 2
    assert len(opened) <= 2, opened  # the root listing and the first class folder: nothing more


def test_item5_the_order_is_the_old_os_walk_order_on_trees_without_links(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for rel in ["b.png", "a.JPG", "z/1.png", "z/y/2.png", "m/3.webp", "m/n.txt", ".x/4.png", "m/.5.png", "c.bmp"]:
        _png(root / rel, mode="RGB") if not rel.endswith(".txt") else (root / rel).write_text("x")
    assert find_images(root) == _os_walk_order(root)
    assert [p.name for p in find_images(root)] == ["a.JPG", "b.png", "c.bmp", "3.webp", "1.png", "2.png"]
    assert [p.name for p in iter_images(root, recursive=False)] == ["a.JPG", "b.png", "c.bmp"]


def test_item5_the_walk_budget_is_a_one_line_error(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for i in range(30):
        _png(root / "cls" / f"{i}.png")
    with pytest.raises(DataError, match="more than 10 directory entries") as err:
        list(iter_images(root, budget=WalkBudget(10)))
    _one_line(err.value)
    assert len(list(iter_images(root, budget=WalkBudget(40)))) == 30
    assert len(list(iter_images(root, limit=3, budget=WalkBudget(40)))) == 3


def test_item5_dangling_and_looping_links_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _png(root / "a.png")
    (root / "gone.png").symlink_to(root / "nowhere.png")
    (root / "l1.png").symlink_to("l2.png")
    (root / "l2.png").symlink_to("l1.png")
    (root / "me.png").symlink_to("me.png")
    (root / "dloop").symlink_to("dloop")
    with _no_hang():
        assert [p.name for p in iter_images(root)] == ["a.png"]


def test_item5_detection_listing_uses_the_walker(tmp_path: Path) -> None:
    from autodfp.eval.detection import _images_in

    root = tmp_path / "imgs"
    _png(root / "b.png")
    _png(root / "a.jpg")
    _png(root / "sub" / "c.png")  # not recursive, as before
    os.mkfifo(root / "f.png")
    with _no_hang():
        assert [p.name for p in _images_in(root)] == ["a.jpg", "b.png"]


# ------------------------------------------------------------------------------------------------
# item 6: decoding is mode-aware and bounded


def _picture(h: int = 12, w: int = 17) -> np.ndarray:
    return ((np.arange(h * w).reshape(h, w) * 37) % 256).astype(np.uint8)


def test_item6_a_16bit_png_decodes_like_its_8bit_twin(tmp_path: Path) -> None:
    arr8 = _picture()
    p8, p16 = tmp_path / "l8.png", tmp_path / "l16.png"
    Image.fromarray(arr8, mode="L").save(p8)
    Image.fromarray(arr8.astype(np.uint16) * 257).save(p16)  # I;16
    assert Image.open(p16).mode in ("I;16", "I")
    a, b = _load_image(p8), _load_image(p16)
    assert a.mode == b.mode == "RGB"
    ta, tb = _to_float_tensor(np.asarray(a)), _to_float_tensor(np.asarray(b))
    assert (ta - tb).abs().max().item() <= 1 / 255 + 1e-7
    assert torch.equal(ta, tb)  # v * 257 scaled back by 1/257 is exact
    tr = build_transform(CIFAR_PRE)
    assert torch.allclose(tr(a), tr(b))
    assert tr(Image.open(p16)).max() > 1  # not clipped to white (all pixels at the top value)
    # a dataset of 16-bit pictures reads like one of 8-bit ones
    (tmp_path / "c8" / "x").mkdir(parents=True)
    (tmp_path / "c16" / "x").mkdir(parents=True)
    os.replace(p8, tmp_path / "c8" / "x" / "i.png")
    os.replace(p16, tmp_path / "c16" / "x" / "i.png")
    assert torch.equal(ImageFolderDataset(tmp_path / "c8")[0][0], ImageFolderDataset(tmp_path / "c16")[0][0])


@pytest.mark.parametrize("dtype", ["<u2", ">u2", "<i4"])
def test_item6_every_16bit_layout_is_scaled_by_1_over_257(dtype: str) -> None:
    arr8 = _picture()
    img = Image.fromarray((arr8.astype(np.int64) * 257).astype(dtype))
    assert img.mode in ("I;16", "I;16B", "I")
    assert np.array_equal(np.asarray(_to_rgb(img))[..., 0], arr8)


def test_item6_float_images_use_the_0_to_255_scale_and_are_clipped() -> None:
    vals = np.array([[-5.0, 0.0, 0.4, 127.6, 255.0, 300.0, np.nan, np.inf]], dtype=np.float32)
    out = np.asarray(_to_rgb(Image.fromarray(vals, mode="F")))[..., 0]
    assert out.tolist() == [[0, 0, 0, 128, 255, 255, 0, 255]]


def test_item6_palette_alpha_cmyk_and_bilevel(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 3))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.info["transparency"] = b"\x00\xff"  # palette transparency: PIL warns when converted to RGB directly
    path = tmp_path / "p.png"
    pal.save(path, transparency=b"\x00\xff")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = np.asarray(_load_image(path))
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[1, 1].tolist() == [200, 100, 50]  # alpha dropped

    rgba = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    assert np.asarray(_to_rgb(rgba))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(_to_rgb(Image.new("LA", (3, 3), (77, 0))))[0, 0].tolist() == [77, 77, 77]
    pa = Image.new("PA", (2, 2))
    pa.putpalette([9, 8, 7] * 256)
    assert np.asarray(_to_rgb(pa))[0, 0].tolist() == [9, 8, 7]

    cmyk = Image.new("CMYK", (5, 4), (0, 255, 255, 0))  # red
    cpath = tmp_path / "c.jpg"
    cmyk.save(cpath, quality=95)
    assert Image.open(cpath).mode == "CMYK"
    red = np.asarray(_load_image(cpath)).astype(int)
    assert red[..., 0].min() > 200 and red[..., 1:].max() < 60

    bilevel = Image.new("1", (8, 8), 0)
    bilevel.putpixel((3, 3), 1)
    bpath = tmp_path / "b.png"
    bilevel.save(bpath)
    out = np.asarray(_load_image(bpath))
    assert out[3, 3].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def _bomb_png(path: Path, side: int) -> None:
    """A 1-bit PNG of side x side pixels: tiny on disk, huge once decoded (written without decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_item6_a_bomb_is_refused_even_with_pils_limit_switched_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = tmp_path / "bomb.png"
    _bomb_png(bomb, 10000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="bomb.png is too large to decode") as err:
        _load_image(bomb)
    assert time.perf_counter() - t0 < 5
    _one_line(err.value)


def test_item6_truncated_and_corrupt_images_are_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "junk.jpg").write_bytes(os.urandom(300))
    (tmp_path / "empty.webp").write_bytes(b"")
    for name in ("cut.png", "junk.jpg", "empty.webp"):
        with pytest.raises(DataError, match=f"cannot read image .*{name}") as err:
            _load_image(tmp_path / name)
        _one_line(err.value)


# ------------------------------------------------------------------------------------------------
# item 14: names in messages are escaped


def test_item14_a_class_folder_named_with_escape_sequences_is_escaped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    evil = "\x1b]0;title\x07\x1b[2J\u202egnp"
    _png(root / evil / "a.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\n")
    with pytest.raises(DataError, match="is not in the class list") as err:
        ImageFolderDataset(root, classes)
    text = _one_line(err.value)
    assert "\x1b" not in text and "\x07" not in text and "\\x1b]0;title\\x07\\x1b[2J\\u202egnp" in text


def test_item14_a_file_named_with_control_characters_is_escaped(tmp_path: Path) -> None:
    bad = tmp_path / "evil\n\x1b[31m.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"evil\\n\\x1b\[31m.png") as err:
        _load_image(bad)
    _one_line(err.value)
    raw = tmp_path / os.fsdecode(b"\xff\xfe.png")  # not UTF-8: kept as surrogates by os.fsdecode
    raw.write_bytes(b"")
    with pytest.raises(DataError) as err:
        _load_image(raw)
    assert "\\xff\\xfe.png" in _one_line(err.value)


def test_item14_printable_keeps_ordinary_names() -> None:
    assert printable("plain é ü 名 \\ 'q'") == "plain é ü 名 \\ 'q'"
    assert printable(Path("a") / "b\tc") == "a/b\\tc"
    assert printable("\u202e\x9b\x7f") == "\\u202e\\x9b\\x7f"


# ------------------------------------------------------------------------------------------------
# property tests: random trees never escape as anything but an AutoDFPError, never hang, never
# count more images than there are regular files


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


_PAL = Image.new("P", (4, 4), 1)
_PAL.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
CONTENTS = {
    "png8": _encoded(Image.fromarray(_picture(6, 5)), "PNG"),
    "png16": _encoded(Image.fromarray(_picture(6, 5).astype(np.uint16) * 257), "PNG"),
    "palette": _encoded(_PAL, "PNG"),
    "jpeg": _encoded(Image.new("RGB", (7, 4), (1, 2, 3)), "JPEG"),
    "rgba": _encoded(Image.new("RGBA", (3, 3), (5, 6, 7, 8)), "PNG"),
    "truncated": _encoded(Image.fromarray(_picture(30, 30)), "PNG")[:60],
}

_name_chars = st.characters(exclude_categories=("Cs",), exclude_characters="/\x00")
NAMES = st.builds(
    lambda stem, ext: stem + ext,
    st.text(_name_chars, min_size=1, max_size=6),
    st.sampled_from(["", ".png", ".PNG", ".jpg", ".jpeg", ".bmp", ".webp", ".txt"]),
).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)

ENTRY = st.tuples(
    st.sampled_from(["dir", "dir", "file", "file", "file", "random", "fifo", "link", "link"]),
    st.integers(0, 1000),  # which existing directory holds it
    NAMES,
    st.sampled_from([*CONTENTS, "."]),  # file content (or, for a link, ignored)
    st.integers(0, 1000),  # link target choice
    st.binary(max_size=64),  # random bytes
)
TREES = st.lists(ENTRY, min_size=4, max_size=40)


def _build(base: Path, entries: list) -> Path:
    """A tree under ``base/root`` (with ``base/outside`` for links that leave it) from ``entries``."""
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "o.png").write_bytes(CONTENTS["png8"])
    (outside / "d").mkdir()
    (outside / "d" / "p.png").write_bytes(CONTENTS["png16"])
    dirs, made = [root, root / "cls"], [outside / "o.png", outside / "d"]
    (root / "cls").mkdir()
    (root / "cls" / "seed.png").write_bytes(CONTENTS["jpeg"])
    for kind, where, name, content, target, raw in entries:
        parent = dirs[where % len(dirs)]
        path = parent / name
        if os.path.lexists(path):
            continue
        try:
            if kind == "dir":
                path.mkdir()
                dirs.append(path)
            elif kind == "file":
                path.write_bytes(CONTENTS.get(content, b""))
            elif kind == "random":
                path.write_bytes(raw)
            elif kind == "fifo":
                os.mkfifo(path)
            else:
                choices = [".", "..", name, "nowhere", "/", str(outside), *map(str, dirs), *map(str, made)]
                path.symlink_to(choices[target % len(choices)])
        except OSError:  # a name the file system refuses
            continue
        made.append(path)
    return root


def _distinct_regular_files(base: Path) -> int:
    """Every regular file anywhere under ``base`` (links not followed), by inode: an upper bound."""
    seen = set()
    for dirpath, _dirs, files in os.walk(base):
        for f in files:
            st_ = os.lstat(os.path.join(dirpath, f))
            if stat.S_ISREG(st_.st_mode):
                seen.add((st_.st_dev, st_.st_ino))
    return len(seen)


def _read(ds: object, n: int) -> None:
    for i in range(n):
        try:
            ds[i]  # type: ignore[index]
        except AutoDFPError as exc:
            _one_line(exc)


def _check_paths(root: Path, paths: list[Path], bound: int) -> None:
    assert len(paths) <= bound
    idents = {(os.stat(p).st_dev, os.stat(p).st_ino) for p in paths}
    assert len(idents) == len(paths), "a file was counted twice"
    for p in paths:
        assert stat.S_ISREG(os.stat(p).st_mode) and walk.is_image_name(p.name)
        assert not any(part.startswith(".") for part in p.relative_to(root).parts)


@PROPERTY
@given(TREES, st.one_of(st.none(), st.integers(1, 6)))
def test_property_unlabeled_dir_on_random_trees(entries: list, limit: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, _no_hang(30):
        base = Path(tmp)
        root = _build(base, entries)
        bound = _distinct_regular_files(base)
        try:
            full = UnlabeledImageDir(root, build_transform(CIFAR_PRE))
        except AutoDFPError as exc:
            _one_line(exc)
            full = None
        event(f"images: {'error' if full is None else min(len(full), 5)}")
        try:
            ds = UnlabeledImageDir(root, limit=limit)
        except AutoDFPError as exc:
            _one_line(exc)
            assert full is None
            return
        assert full is not None
        assert ds.paths == full.paths[: len(ds.paths)] and len(ds.paths) == min(len(full), limit or len(full))
        _check_paths(root, full.paths, bound)
        _read(ds, len(ds))


@PROPERTY
@given(TREES, st.one_of(st.none(), st.integers(1, 6)))
def test_property_image_folder_on_random_trees(entries: list, limit: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, _no_hang(30):
        base = Path(tmp)
        root = _build(base, entries)
        bound = _distinct_regular_files(base)
        try:
            full = ImageFolderDataset(root, transform=build_transform(CIFAR_PRE))
        except AutoDFPError as exc:
            _one_line(exc)
            event("error: " + next((k for k in ("two labels", "empty", "layout") if k in str(exc)), "other"))
            full = None
        try:
            ds = ImageFolderDataset(root, limit=limit)
        except AutoDFPError as exc:
            _one_line(exc)
            return
        event(f"classes: {min(len(ds.classes), 4)}, samples: {min(len(ds), 5)}")
        if full is not None:
            assert ds.samples == full.samples[: len(ds.samples)]
            _check_paths(root, [p for p, _ in full.samples], bound)
        _check_paths(root, [p for p, _ in ds.samples], bound)
        assert limit is None or len(ds) <= limit
        _read(ds, len(ds))
        found = list(iter_image_files(root))
        assert len({f.key for f in found}) <= bound
