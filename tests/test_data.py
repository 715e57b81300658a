"""Readers, preprocessing geometry and data-spec resolution (synthetic data plus the real mirror)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autodfp.data.datasets import (
    CifarDataset,
    ImageFolderDataset,
    UnlabeledImageDir,
    build_transform,
    make_loader,
    parse_spec,
    read_cifar,
    read_class_list,
    resolve_dataset,
)
from autodfp.errors import DataError
from autodfp.models import get_config
from autodfp.models.registry import CIFAR_PRE, TF_IMAGENET_PRE, Preprocessing

# ------------------------------------------------------------------------------------------------
# helpers


def _cifar_batch(n: int, seed: int, label_key: str = "labels", bytes_keys: bool = True) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    d = {"batch_label": "synthetic", label_key: labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}
    if bytes_keys:  # what the official (Python 2) files decode to with encoding="bytes"
        d = {k.encode(): v for k, v in d.items()}
    return d, data


def _write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_image(
    path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (10, 200, 30), mode: str = "RGB"
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)


def _reference_transform(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """torchvision's Resize(int) → CenterCrop → ToTensor → Normalize, written out by hand."""
    img = img.convert("RGB")
    w, h = img.size
    if pre.resize is not None:
        if w <= h:
            size = (pre.resize, int(pre.resize * h / w))
        else:
            size = (int(pre.resize * w / h), pre.resize)
        img = img.resize(size, Image.Resampling.BILINEAR)
    w, h = img.size
    s = pre.input_size
    top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
    img = img.crop((left, top, left + s, top + s))
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).to(torch.float32).div(255)
    return t.sub_(torch.tensor(pre.mean).view(-1, 1, 1)).div_(torch.tensor(pre.std).view(-1, 1, 1))


# ------------------------------------------------------------------------------------------------
# CIFAR reader


def test_read_cifar10_synthetic_any_n(tmp_path: Path) -> None:
    batch, data = _cifar_batch(7, seed=0)
    _write_pickle(tmp_path / "test_batch", batch)
    images, labels = read_cifar(tmp_path, "test")
    assert images.shape == (7, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == batch[b"labels"]
    # CHW rows → HWC: channel c, row y, column x lives at c*1024 + y*32 + x
    assert images[3, 5, 9, 2] == data[3, 2 * 1024 + 5 * 32 + 9]
    assert images[6, 31, 0, 0] == data[6, 31 * 32]


def test_read_cifar10_train_concatenates_batches_and_str_keys(tmp_path: Path) -> None:
    sizes = [3, 1, 4, 1, 5]
    for i, n in enumerate(sizes, 1):
        _write_pickle(tmp_path / f"data_batch_{i}", _cifar_batch(n, seed=i, bytes_keys=False)[0])
    images, labels = read_cifar(tmp_path, "train")
    assert images.shape == (sum(sizes), 32, 32, 3) and labels.shape == (sum(sizes),)


def test_read_cifar_missing_train_batch(tmp_path: Path) -> None:
    _write_pickle(tmp_path / "test_batch", _cifar_batch(2, seed=0)[0])
    with pytest.raises(DataError, match="data_batch_1 is missing"):
        read_cifar(tmp_path, "train")


def test_read_cifar100_fine_labels(tmp_path: Path) -> None:
    batch, _ = _cifar_batch(5, seed=1, label_key="fine_labels")
    batch[b"coarse_labels"] = [0] * 5
    root = tmp_path / "cifar-100-python"
    _write_pickle(root / "test", batch)
    _write_pickle(root / "meta", {b"fine_label_names": [b"x"] * 100})
    images, labels = read_cifar(root)
    assert images.shape == (5, 32, 32, 3) and labels.tolist() == batch[b"fine_labels"]
    # the parent directory works too (torchvision's root convention), and so does the spec
    assert read_cifar(tmp_path, kind="cifar100")[0].shape == (5, 32, 32, 3)
    ds = resolve_dataset(f"cifar100:{tmp_path}", get_config("resnet20_cifar10"))
    assert len(ds) == 5


@pytest.mark.parametrize(
    "payload, message",
    [
        ([1, 2, 3], "not a dict"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "no 'data'/'labels'"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, r"shape \(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
    ],
)
def test_read_cifar_rejects_malformed_batches(tmp_path: Path, payload: object, message: str) -> None:
    _write_pickle(tmp_path / "test_batch", payload)
    with pytest.raises(DataError, match=message):
        read_cifar(tmp_path)


def test_read_cifar_garbage_and_missing(tmp_path: Path) -> None:
    (tmp_path / "test_batch").write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="not a CIFAR python batch"):
        read_cifar(tmp_path)
    with pytest.raises(DataError, match="not found"):
        read_cifar(tmp_path / "nope")
    with pytest.raises(DataError, match="unknown CIFAR split"):
        read_cifar(tmp_path, "validation")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_read_cifar_refuses_code_in_pickles(tmp_path: Path) -> None:
    _write_pickle(tmp_path / "test_batch", {b"data": _Evil(), b"labels": []})
    with pytest.raises(DataError, match="refusing to load global"):
        read_cifar(tmp_path)


def test_read_cifar_real_mirror(assets: Path) -> None:
    images, labels = read_cifar(assets / "cifar10" / "cifar-10-batches-py")
    assert images.shape == (1017, 32, 32, 3) and images.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9
    assert labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # the official test set's first labels


# ------------------------------------------------------------------------------------------------
# preprocessing


@pytest.mark.parametrize("size", [(227, 227), (300, 200), (303, 200), (200, 303), (256, 256), (500, 375)])
def test_transform_matches_torchvision_geometry(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    out = build_transform(TF_IMAGENET_PRE)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert torch.equal(out, _reference_transform(img, TF_IMAGENET_PRE))


def test_transform_long_side_truncates_and_crop_rounds_half_to_even() -> None:
    # 303x200 → shorter side 256 → long side int(387.84) = 387 (not 388); left = round(81.5) = 82
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, size=(200, 303, 3), dtype=np.uint8))
    resized = np.asarray(img.resize((387, 256), Image.Resampling.BILINEAR))
    crop = resized[16:240, 82:306].astype(np.float32) / np.float32(255.0)
    expected = torch.from_numpy(((crop - 0.5) / 0.5).transpose(2, 0, 1).copy())
    assert torch.equal(build_transform(TF_IMAGENET_PRE)(img), expected)


def test_transform_normalisation_and_rgb_conversion() -> None:
    out = build_transform(TF_IMAGENET_PRE)(Image.new("L", (227, 227), 255))
    assert out.shape == (3, 224, 224) and torch.all(out == 1.0)  # 255/127.5 - 1
    out = build_transform(TF_IMAGENET_PRE)(Image.new("RGBA", (300, 260), (0, 0, 0, 0)))
    assert torch.all(out == -1.0)
    # no resize set: images of another size are resized straight to input_size
    assert build_transform(CIFAR_PRE)(Image.new("RGB", (40, 36))).shape == (3, 32, 32)


def test_cifar_fast_path_equals_pil_path() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    tr = build_transform(CIFAR_PRE)
    fast, slow = tr(arr), tr(Image.fromarray(arr))
    assert torch.equal(fast, slow)
    ref = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div(255)
    ref = ref.sub_(torch.tensor(CIFAR_PRE.mean).view(-1, 1, 1)).div_(torch.tensor(CIFAR_PRE.std).view(-1, 1, 1))
    assert torch.equal(fast, ref)
    # a preprocessing that resizes must not take the fast path
    assert build_transform(TF_IMAGENET_PRE)(arr).shape == (3, 224, 224)


# ------------------------------------------------------------------------------------------------
# image folders


def _class_list(path: Path) -> Path:
    path.write_text("n000 zero\nn001 one, first\nn002\nn003 three\nn004 four\n\n")
    return path


def test_class_list_maps_folders_not_enumeration(tmp_path: Path) -> None:
    root = tmp_path / "val"
    for cls, n in (("n001", 2), ("n003", 3)):
        for i in range(n):
            _write_image(root / cls / f"img{i}.JPG")
    (root / "n003" / "notes.txt").write_text("not an image")
    (root / "n003" / ".hidden.png").write_bytes(b"")
    ds = ImageFolderDataset(root, _class_list(tmp_path / "classes.txt"), build_transform(CIFAR_PRE))
    assert ds.targets == [1, 1, 3, 3, 3]
    assert len(ds.classes) == 5 and ds.class_to_idx["n003"] == 3
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and y == 3
    # without a class list: sorted folder names
    assert ImageFolderDataset(root).targets == [0, 0, 1, 1, 1]


def test_folder_not_in_class_list(tmp_path: Path) -> None:
    root = tmp_path / "val"
    _write_image(root / "n001" / "a.png")
    _write_image(root / "n999" / "b.png")
    with pytest.raises(DataError, match="folder 'n999'.*not in the class list"):
        ImageFolderDataset(root, _class_list(tmp_path / "classes.txt"))


def test_class_list_errors(tmp_path: Path) -> None:
    (tmp_path / "gap.txt").write_text("a\n\nb\n")
    with pytest.raises(DataError, match="line 2 is empty"):
        read_class_list(tmp_path / "gap.txt")
    (tmp_path / "dup.txt").write_text("a x\nb\na y\n")
    with pytest.raises(DataError, match="'a' appears on lines 1 and 3"):
        read_class_list(tmp_path / "dup.txt")
    with pytest.raises(DataError, match="class list not found"):
        read_class_list(tmp_path / "missing.txt")


def test_empty_and_wrong_layouts(tmp_path: Path) -> None:
    cfg = get_config("resnet20_cifar10")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty dataset"):
        resolve_dataset(f"folder:{empty}", cfg)
    (empty / "cls").mkdir()
    with pytest.raises(DataError, match="empty dataset"):
        resolve_dataset(f"folder:{empty}", cfg)
    with pytest.raises(DataError, match="empty dataset"):
        UnlabeledImageDir(empty)

    tree = tmp_path / "tree"
    _write_image(tree / "cat" / "1.png")
    with pytest.raises(DataError, match="wrong data layout: expected CIFAR-10 .* found an ImageFolder tree"):
        resolve_dataset(f"cifar10:{tree}", cfg)

    cifar = tmp_path / "cifar"
    _write_pickle(cifar / "test_batch", _cifar_batch(3, seed=0)[0])
    with pytest.raises(DataError, match="wrong data layout: expected an ImageFolder tree .* CIFAR"):
        resolve_dataset(f"folder:{cifar}", cfg)
    with pytest.raises(DataError, match="wrong data layout: expected CIFAR-100 .* found cifar10"):
        resolve_dataset(f"cifar100:{cifar}", cfg)

    splits = tmp_path / "splits"
    _write_image(splits / "train" / "cat" / "1.png")
    _write_image(splits / "test" / "cat" / "2.png")
    with pytest.raises(DataError, match="holds split folders"):
        resolve_dataset(f"folder:{splits}", cfg)
    classes = tmp_path / "classes.txt"  # the split holds one of the model's ten classes
    classes.write_text(
        "".join(
            f"{name}\n" for name in ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        )
    )
    assert len(resolve_dataset(f"folder:{splits / 'test'}:{classes}", cfg)) == 1

    flat = tmp_path / "flat"
    _write_image(flat / "1.png")
    with pytest.raises(DataError, match="wrong data layout: expected .*<class>/<image>, found images directly"):
        resolve_dataset(f"folder:{flat}", cfg)
    with pytest.raises(DataError, match="not found"):
        resolve_dataset(f"folder:{tmp_path / 'nope'}", cfg)


@pytest.mark.parametrize("spec", ["imagenet:/tmp", "/some/dir", "tfrecord:x"])
def test_unknown_spec_kind(spec: str) -> None:
    with pytest.raises(DataError, match="valid kinds: cifar10:DIR, cifar100:DIR, folder:DIR"):
        resolve_dataset(spec, get_config("resnet20_cifar10"))


def test_parse_spec_class_list(tmp_path: Path) -> None:
    assert parse_spec(f"folder:{tmp_path}:{tmp_path}/c.txt") == ("folder", tmp_path, tmp_path / "c.txt")
    assert parse_spec(f"folder:{tmp_path}") == ("folder", tmp_path, None)
    assert parse_spec(f"CIFAR10:{tmp_path}")[0] == "cifar10"
    with pytest.raises(DataError, match="no directory"):
        parse_spec("cifar10:")


def test_unlabeled_dir_is_recursive_and_sorted(tmp_path: Path) -> None:
    _write_image(tmp_path / "b" / "deep" / "2.webp")
    _write_image(tmp_path / "a" / "1.bmp", mode="L")
    _write_image(tmp_path / "0.PNG")
    (tmp_path / "readme.md").write_text("x")
    ds = UnlabeledImageDir(tmp_path, build_transform(CIFAR_PRE))
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == ["0.PNG", "a/1.bmp", "b/deep/2.webp"]
    batch = next(iter(make_loader(ds, batch_size=8)))
    assert isinstance(batch, torch.Tensor) and batch.shape == (3, 3, 32, 32)


def test_corrupt_image_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="cannot read image"):
        ds[0]


def test_make_loader_limit_and_order() -> None:
    images = np.zeros((10, 32, 32, 3), np.uint8)
    ds = CifarDataset(images, np.arange(10))
    loader = make_loader(ds, batch_size=4, limit=6)
    assert [y.tolist() for _, y in loader] == [[0, 1, 2, 3], [4, 5]]
    assert len(make_loader(ds, limit=100).dataset) == 10
    with pytest.raises(DataError):
        make_loader(ds, limit=0)


# ------------------------------------------------------------------------------------------------
# default datasets: mirror, then cache


def test_default_dataset_from_cache_then_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = get_config("resnet56_cifar10")
    monkeypatch.setenv("AUTODFP_ASSETS", str(tmp_path / "no-mirror"))
    monkeypatch.setenv("AUTODFP_HOME", str(tmp_path / "home"))
    with pytest.raises(DataError) as info:
        resolve_dataset(None, cfg)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "home" / "datasets" / "cifar10" / "cifar-10-batches-py") in msg
    assert "AUTODFP_ASSETS" in msg

    _write_pickle(
        tmp_path / "home" / "datasets" / "cifar10" / "cifar-10-batches-py" / "test_batch", _cifar_batch(7, seed=5)[0]
    )
    ds = resolve_dataset(None, cfg)
    assert len(ds) == 7 and ds[0][0].shape == (3, 32, 32)


def test_default_imagenet_subset_uses_synsets(assets: Path) -> None:
    ds = resolve_dataset(None, get_config("mobilenet_v1_075_imagenet"))
    assert len(ds) == 1300 and len(ds.classes) == 1000
    synsets = [line.split()[0] for line in (assets / "imagenet" / "synsets.txt").read_text().splitlines()]
    for path, label in ds.samples[::97]:
        assert synsets[label] == path.parent.name
    x, y = ds[0]
    assert x.shape == (3, 224, 224) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
