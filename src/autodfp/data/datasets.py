"""Labelled evaluation sets and unlabelled calibration images, read without torchvision.

Three layouts are understood, named by a *data spec*:

* ``cifar10:DIR`` / ``cifar100:DIR`` — the official CIFAR python pickles (``DIR`` may also be the
  parent of ``cifar-10-batches-py`` / ``cifar-100-python``, as torchvision's ``root``).
* ``folder:DIR[:CLASSLIST]`` — an ImageFolder tree ``DIR/<class>/<image>``. With a class list
  (one class per line, first token = folder name, line number = class index, like
  ``imagenet/synsets.txt``) labels come from that file, so a subset with only some classes present
  keeps the model's class indices. Without one, classes are the sorted sub-folder names
  (torchvision's ``ImageFolder`` convention), which is only right when every class is present.

The preprocessing reproduces torchvision's ``Resize(int)`` + ``CenterCrop`` + ``ToTensor`` +
``Normalize`` on PIL images bit for bit (same PIL call, same size rounding, same crop offset), so
published accuracies reproduce without torchvision installed.

Image files are listed by :mod:`autodfp.data.walk`, the one walker (regular files only, symlink
cycles cut, a file reached twice counted once, lazy under a limit, bounded), and decoded to 8-bit
RGB mode-aware (16-bit scaled rather than clipped, palettes via RGBA) with bounded work.

CIFAR files are pickles; they are read with an unpickler that only admits the few numpy globals a
CIFAR batch needs, so a malicious "dataset" cannot run code.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable, Sequence, Sized
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset

from autodfp.data.walk import (
    IMAGE_EXTENSIONS,
    WalkBudget,
    enclosing,
    iter_image_files,
    iter_images,
    list_dirs,
    open_regular,
    printable,
)
from autodfp.errors import DataError
from autodfp.models.hub import ENV_ASSETS, assets_dir, cache_dir
from autodfp.models.registry import DatasetRef, ModelConfig, Preprocessing

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPEC_KINDS",
    "CifarDataset",
    "ImageFolderDataset",
    "ImageTransform",
    "UnlabeledImageDir",
    "build_transform",
    "check_label_coverage",
    "find_images",
    "make_loader",
    "parse_spec",
    "read_class_list",
    "read_cifar",
    "resolve_dataset",
]

SPEC_KINDS = ("cifar10", "cifar100", "folder")

_CIFAR10_FILES = {"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]}
_CIFAR100_FILES = {"test": ["test"], "train": ["train"]}
_CIFAR_SUBDIR = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


# --------------------------------------------------------------------------------------------
# CIFAR pickles
# --------------------------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what numpy arrays and py2 byte strings need; anything else is refused."""

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"cannot read {printable(path)}: {printable(exc.strerror or exc)}") from None
    except Exception as exc:  # any unpickling failure is a corrupt or foreign file
        raise DataError(
            f"{printable(path)} is not a CIFAR python batch ({exc.__class__.__name__}: {printable(exc)})"
        ) from None


def _get(d: dict, key: str) -> Any:
    """CIFAR batches written by Python 2 have bytes keys; ones re-saved by Python 3 have str keys."""
    if key in d:
        return d[key]
    return d.get(key.encode())


def _cifar_kind(root: Path) -> str | None:
    """Which CIFAR flavour ``root`` holds, by its file names."""
    if any((root / n).is_file() for n in ("test_batch", "data_batch_1", "batches.meta")):
        return "cifar10"
    if any((root / n).is_file() for n in ("test", "train", "meta")):
        return "cifar100"
    return None


def _has_class_folders(root: Path, budget: WalkBudget | None = None) -> bool:
    """Whether ``root`` looks like an ImageFolder tree: some sub-folder holds an image (any depth).

    Lazy: it stops at the first image found, so asking costs a few directory reads.
    """
    budget = budget if budget is not None else WalkBudget()
    try:
        subdirs = list_dirs(root, budget)
    except OSError:
        return False
    return any(next(iter_images(root / d, limit=1, budget=budget), None) is not None for d in subdirs)


def _cifar_root(root: Path, kind: str) -> Path:
    """Accept the batch directory itself or its parent (torchvision's ``root``)."""
    sub = root / _CIFAR_SUBDIR[kind]
    if _cifar_kind(root) is None and sub.is_dir():
        return sub
    return root


def _cifar_labels(path: Path, lab: Any, classes: int) -> np.ndarray:
    """Labels as int64, refusing what a cast would silently turn into wrong classes.

    ``np.asarray(..., int64)`` raises on strings and turns NaN into an arbitrary integer, so the
    type is checked first: integers, or floats that are whole numbers, in ``0..classes-1``.
    """
    try:
        arr = np.asarray(lab).reshape(-1)
    except (ValueError, TypeError):
        raise DataError(f"{printable(path)}: labels must be a list of integers") from None
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            bad = arr[~np.isfinite(arr) | (arr != np.round(arr))][0]
            raise DataError(f"{printable(path)}: labels must be integers, found {float(bad)!r}")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        shown = next(iter(arr.tolist()), None)
        raise DataError(f"{printable(path)}: labels must be integers, found {type(shown).__name__} {str(shown)[:20]!r}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= classes):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise DataError(f"{printable(path)}: labels must be in 0..{classes - 1}, found {bad}")
    return arr


def _cifar_pixels(path: Path, data: np.ndarray) -> np.ndarray:
    """Pixels as uint8, refusing float images in [0, 1] (a cast would make them all black)."""
    if data.dtype == np.uint8:
        return data
    if data.dtype.kind not in "iuf" or data.dtype == np.bool_:
        raise DataError(f"{printable(path)}: pixel data must be uint8, got {data.dtype}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DataError(f"{printable(path)}: pixel data has NaN or infinite values")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{printable(path)}: pixel values outside 0..255")
    if data.dtype.kind == "f":
        if data.size and data.max() <= 1.0:
            raise DataError(
                f"{printable(path)}: pixel data are floats in [0, 1]; CIFAR batches hold uint8 values 0..255 "
                "(multiply by 255 and store as uint8)"
            )
        if (data != np.round(data)).any():
            raise DataError(
                f"{printable(path)}: pixel data are fractional floats; CIFAR batches hold uint8 values 0..255"
            )
    return data.astype(np.uint8)


def read_cifar(root: str | os.PathLike, split: str = "test", kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10/100 python batches into uint8 ``(N, 32, 32, 3)`` RGB images and int64 labels.

    ``kind`` (``"cifar10"``/``"cifar100"``) is detected from the file names when omitted; when
    given, a directory of the other flavour (or an image tree) is reported as a layout error rather
    than silently read, because CIFAR-100 labels scored by a CIFAR-10 model are meaningless.
    """
    if split not in ("test", "train"):
        raise DataError(f"unknown CIFAR split '{split}'; use 'test' or 'train'")
    if kind is not None and kind not in _CIFAR_SUBDIR:
        raise DataError(f"unknown CIFAR kind '{kind}'; use cifar10 or cifar100")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"CIFAR directory not found: {printable(root)}")
    if not root.is_dir():
        raise DataError(f"CIFAR path is not a directory: {printable(root)}")
    if kind is not None:
        root = _cifar_root(root, kind)
    found = _cifar_kind(root)
    if found is None and kind is None:
        for k in ("cifar10", "cifar100"):
            if (root / _CIFAR_SUBDIR[k]).is_dir():
                root, found = root / _CIFAR_SUBDIR[k], _cifar_kind(root / _CIFAR_SUBDIR[k])
                break
    want = kind or found
    if found is None or (kind is not None and found != kind):
        expected = (
            "CIFAR-10 python batches (test_batch, data_batch_1..5)"
            if want == "cifar10"
            else "CIFAR-100 python files (test, train)"
            if want == "cifar100"
            else "CIFAR python batches (test_batch or test)"
        )
        if found is not None:
            raise DataError(
                f"wrong data layout: expected {expected} in {printable(root)}, found {found} files; use {found}:{printable(root)}"
            )
        if _has_class_folders(root):
            raise DataError(
                f"wrong data layout: expected {expected} in {printable(root)}, found an ImageFolder tree; use folder:{printable(root)}"
            )
        raise DataError(f"wrong data layout: expected {expected} in {printable(root)}, found neither")

    names = (_CIFAR10_FILES if found == "cifar10" else _CIFAR100_FILES)[split]
    label_key = "labels" if found == "cifar10" else "fine_labels"
    images, labels = [], []
    for name in names:
        path = root / name
        if not path.is_file():
            raise DataError(f"CIFAR {split} split is incomplete: {printable(path)} is missing")
        batch = _load_pickle(path)
        if not isinstance(batch, dict):
            raise DataError(f"{printable(path)} is not a CIFAR python batch (a {type(batch).__name__}, not a dict)")
        data, lab = _get(batch, "data"), _get(batch, label_key)
        if data is None or lab is None:
            raise DataError(f"{printable(path)} is not a CIFAR python batch (no 'data'/'{label_key}' entries)")
        data = np.asarray(data)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{printable(path)}: expected data of shape (N, 3072), got {tuple(data.shape)}")
        lab = _cifar_labels(path, lab, 10 if found == "cifar10" else 100)
        if lab.shape[0] != data.shape[0]:
            raise DataError(f"{printable(path)}: {data.shape[0]} images but {lab.shape[0]} labels")
        data = _cifar_pixels(path, data)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


class ImageTransform:
    """PIL image or uint8 HWC array → normalised float CHW tensor, torchvision-exact.

    A class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, pre: Preprocessing) -> None:
        if pre.interpolation not in _RESAMPLE:
            raise DataError(f"unknown interpolation '{pre.interpolation}'; known: {', '.join(_RESAMPLE)}")
        self.pre = pre
        self.resample = _RESAMPLE[pre.interpolation]
        # uint8 → normalised float32 through a per-channel lookup table. The table is built with
        # torchvision's float32 arithmetic ((x / 255 - mean) / std, each step rounded to float32),
        # so values are bit-identical to ToTensor + Normalize; a table lookup also avoids many tiny
        # multi-threaded torch ops per image, which are slow on busy small CPUs.
        levels = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
        self.lut = (
            (levels - np.asarray(pre.mean, dtype=np.float32)[:, None]) / np.asarray(pre.std, dtype=np.float32)[:, None]
        ).astype(np.float32)

    def __repr__(self) -> str:
        return f"ImageTransform({self.pre})"

    def __call__(self, img: Image.Image | np.ndarray) -> torch.Tensor:
        size = self.pre.input_size
        if isinstance(img, np.ndarray):
            # Fast path: CIFAR arrays already at the input size need no PIL round trip, and the
            # arithmetic below is the same as for a decoded image, so results are identical.
            if (
                img.dtype == np.uint8
                and img.ndim == 3
                and img.shape == (size, size, 3)
                and self.pre.resize is None
                and self.pre.input_hw is None
            ):
                return self._to_tensor(img)
            img = Image.fromarray(img)
        img = _to_rgb(img)
        w, h = img.size
        if self.pre.input_hw is not None:
            # a detector's input: the whole image, squeezed to (H, W), so that box coordinates
            # normalised to the input are normalised to the original image too
            th, tw = self.pre.input_hw
            if (w, h) != (tw, th):
                img = img.resize((tw, th), self.resample)
            return self._to_tensor(np.asarray(img))
        if self.pre.resize is not None:
            # torchvision.transforms.Resize(int): shorter side → resize, longer side truncated.
            r = self.pre.resize
            new_w, new_h = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
            if (new_w, new_h) != (w, h):
                img = img.resize((new_w, new_h), self.resample)
        elif (w, h) != (size, size):
            img = img.resize((size, size), self.resample)
        return self._to_tensor(_center_crop(np.asarray(img), size))

    def _to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        out = np.empty((3,) + arr.shape[:2], dtype=np.float32)
        for c in range(3):
            np.take(self.lut[c], arr[:, :, c], out=out[c])
        return torch.from_numpy(out)


def _center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``center_crop``: zero-pad if too small, then offset ``round((h - size) / 2)``."""
    h, w = arr.shape[:2]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        arr = np.pad(arr, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
        h, w = arr.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return arr[top : top + size, left : left + size]


def build_transform(pre: Preprocessing) -> Callable[[Image.Image | np.ndarray], torch.Tensor]:
    """The eval transform for a model's :class:`Preprocessing` (resize → centre crop → normalise)."""
    return ImageTransform(pre)


def _to_float_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0))


#: Images are decoded to 8-bit RGB, as torchvision's loader does; these modes need more than
#: PIL's ``convert("RGB")``, which clips 16-bit values to white instead of scaling them.
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_PALETTE = frozenset({"P", "PA"})

#: The pixel bound when PIL's own (``Image.MAX_IMAGE_PIXELS``) has been switched off: PIL's default.
_DEFAULT_MAX_PIXELS = 89_478_485


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode, keeping the picture's brightness (not PIL's clipping).

    * 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I``, as PNG decoders produce) is scaled
      by 1/257, the exact inverse of the 8→16-bit widening ``v * 257``; ``I`` is taken as 16-bit
      and clipped to 0..65535. PIL's ``convert`` clips every value above 255 to white instead.
    * 32-bit float ``F`` follows PIL's convention for float images, the 0..255 scale of ``L``:
      values are clipped to [0, 255] and rounded, NaN becomes 0. (No heuristic guesses [0, 1].)
    * Palette ``P``/``PA`` go through RGBA, so a palette with transparency converts without PIL's
      warning; the colour stored under a transparent pixel is kept.
    * Alpha (``LA``, ``RGBA``, palette transparency) is dropped, not composited, like
      torchvision's ``pil_loader`` (``convert("RGB")``), so accuracies stay comparable.
    * ``CMYK``, ``YCbCr``, bilevel ``1`` and the rest use PIL's ``convert("RGB")``; a mode PIL
      cannot convert raises :class:`ValueError`.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT:
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8)).convert("RGB")
    if mode == "F":
        flt = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.rint(np.clip(flt, 0.0, 255.0)).astype(np.uint8)).convert("RGB")
    if mode in _PALETTE:
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def _load_image(path: Path) -> Image.Image:
    """Decode one image file to 8-bit RGB, with bounded work and one-line errors naming the file.

    * Only a regular file is opened, and without blocking (:func:`~autodfp.data.walk.open_regular`),
      so a FIFO or device named ``*.png`` is an error, never a hang.
    * A header claiming more pixels than PIL's limit (``Image.MAX_IMAGE_PIXELS``, or PIL's default
      when that is switched off) is refused before decoding: PIL only warns between the limit and
      twice that, and a 100-megapixel PNG can be a few hundred kilobytes on disk and gigabytes in
      memory, so the warning is treated as the error.
    * Truncated or corrupt files, and whatever else a decoder throws at bytes it cannot parse,
      become a :class:`DataError` with the file's name, never a traceback.
    * Modes are converted by :func:`_to_rgb` (16-bit scaled, palettes via RGBA, alpha dropped).
    """
    shown = printable(path)
    limit = Image.MAX_IMAGE_PIXELS or _DEFAULT_MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_regular(path) as f:
                img = Image.open(f)
                if img.width * img.height > limit:
                    raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels")
                img.load()
        return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(
            f"image {shown} is too large to decode (more than {limit} pixels; possibly a decompression bomb)"
        ) from None
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"image {shown} is too large to decode (out of memory)") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read image {shown} ({exc.__class__.__name__}: {printable(exc)})") from None
    except Exception as exc:  # a decoder's parse error on hostile bytes (struct.error, IndexError, ...)
        raise DataError(f"cannot read image {shown}: corrupt ({exc.__class__.__name__}: {printable(exc)})") from None


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class CifarDataset(Dataset):
    """In-memory CIFAR images; ``transform=None`` yields un-normalised [0, 1] tensors."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[Any], torch.Tensor] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        x = self.transform(img) if self.transform is not None else _to_float_tensor(img)
        return x, int(self.labels[i])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


def find_images(root: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Every distinct regular image file under ``root``, recursively, in a deterministic order.

    The order is top-down with sorted names (a folder's images, then its sub-folders); symlink
    cycles are cut and a file reached twice is listed once (see :mod:`autodfp.data.walk`).
    ``limit`` stops the walk after that many images.
    """
    return list(iter_images(Path(root).expanduser(), limit=limit))


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Folder names in class-index order: the first whitespace-separated token of each line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"class list not found: {printable(path)}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read class list {printable(path)} ({exc.__class__.__name__})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names: list[str] = []
    seen: dict[str, int] = {}
    for i, line in enumerate(lines):
        tokens = line.split()
        if not tokens:
            # An interior blank line would shift every later class index by one.
            raise DataError(f"class list {printable(path)}: line {i + 1} is empty (line number = class index)")
        name = tokens[0]
        if name in seen:
            raise DataError(
                f"class list {printable(path)}: '{printable(name)}' appears on lines {seen[name] + 1} and {i + 1}"
            )
        seen[name] = i
        names.append(name)
    if not names:
        raise DataError(f"class list {printable(path)} is empty")
    return names


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` with labels from a class list, or from sorted folder names.

    Images inside a class folder are found recursively by :mod:`autodfp.data.walk` (regular files
    only, symlink cycles cut, bounded); samples are ordered by class folder name, then top-down by
    path, so the order never depends on the file system. A file reached twice inside one class
    folder counts once; one reached from two class folders would have two labels and is refused.
    ``limit`` keeps the first ``limit`` samples of that order and stops the walk there, so a small
    ``--limit`` on a huge tree reads only what it needs (the same samples as cutting the full set).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        class_list: str | os.PathLike | None = None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        limit: int | None = None,
    ) -> None:
        root = Path(root).expanduser()
        if not root.exists():
            raise DataError(f"image folder not found: {printable(root)}")
        if not root.is_dir():
            raise DataError(f"image folder is not a directory: {printable(root)}")
        if limit is not None and limit < 1:
            raise DataError(f"limit must be at least 1, got {limit}")
        self.root = root
        self.transform = transform
        self.class_list = Path(class_list).expanduser() if class_list is not None else None
        shown = printable(root)
        budget = WalkBudget()
        try:
            folders = list_dirs(root, budget)
        except OSError as exc:
            raise DataError(f"cannot list image folder {shown}: {printable(exc.strerror or exc)}") from None
        if not folders:
            if _cifar_kind(root) is not None:
                raise DataError(
                    f"wrong data layout: expected an ImageFolder tree {shown}/<class>/<image>, "
                    f"found CIFAR python batches; use {_cifar_kind(root)}:{shown}"
                )
            if next(iter_images(root, recursive=False, limit=1, budget=budget), None) is not None:
                raise DataError(
                    f"wrong data layout: expected {shown}/<class>/<image>, found images directly "
                    f"in {shown} (labelled evaluation needs one sub-folder per class)"
                )
            raise DataError(f"empty dataset: no class folders in {shown}")

        if class_list is not None:
            self.classes = read_class_list(class_list)
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
            unknown = [printable(f) for f in folders if f not in self.class_to_idx]
            if unknown:
                more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
                raise DataError(
                    f"folder '{unknown[0]}' in {shown} is not in the class list {printable(class_list)}"
                    f"{': also ' + ', '.join(unknown[1:3]) if len(unknown) > 1 else ''}{more}"
                )
        else:
            splits = {"train", "test", "val", "validation"}
            if set(folders) <= splits and all(_has_class_folders(root / f, budget) for f in folders):
                # e.g. cifar10-jpeg/{train,test}/<class>/: the splits would silently become classes
                raise DataError(
                    f"wrong data layout: {shown} holds split folders ({', '.join(folders)}), "
                    f"not classes; point at one split, e.g. folder:{printable(root / folders[0])}"
                )
            self.classes = folders
            self.class_to_idx = {name: i for i, name in enumerate(folders)}

        self.samples = self._walk(root, folders, budget, limit)
        if not self.samples:
            raise DataError(
                f"empty dataset: no images ({'/'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) under {shown}/<class>/"
            )

    def _walk(self, root: Path, folders: list[str], budget: WalkBudget, limit: int | None) -> list[tuple[Path, int]]:
        """(path, label) per distinct image, class by class; stops after ``limit`` samples.

        A class folder never re-enters the dataset root or its ancestors (``cat/up -> ..`` would
        file every class's images under ``cat``), and a file seen in an earlier class folder is an
        error: which of the two labels is right cannot be told.
        """
        fence = enclosing(root)
        owner: dict[int, int] = {}  # file identity → index of the first class folder that held it
        samples: list[tuple[Path, int]] = []
        for pos, name in enumerate(folders):
            idx = self.class_to_idx[name]
            for found in iter_image_files(root / name, budget=budget, exclude=fence):
                first = owner.setdefault(found.key, pos)
                if first != pos:
                    raise DataError(
                        f"image {printable(found.path)} is also reached from class folder "
                        f"'{printable(folders[first])}' of {printable(root)}: one image cannot have two labels "
                        "(remove the duplicate or the symlink that leads to it)"
                    )
                if len(owner) > len(samples):  # first time this file is seen
                    samples.append((found.path, idx))
                    if limit is not None and len(samples) >= limit:
                        return samples
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        img = _load_image(path)
        x = self.transform(img) if self.transform is not None else _to_float_tensor(np.asarray(img))
        return x, label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


class UnlabeledImageDir(Dataset):
    """Every distinct image under ``root`` (any depth), for calibration: yields tensors, no labels.

    Listed by :func:`~autodfp.data.walk.iter_images` (regular files only, symlink cycles cut,
    bounded); ``limit`` keeps the first ``limit`` images of its order and stops the walk there.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        limit: int | None = None,
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"image directory not found: {printable(root)}")
        if limit is not None and limit < 1:
            raise DataError(f"limit must be at least 1, got {limit}")
        self.root = root
        self.transform = transform
        self.paths = list(iter_images(root, limit=limit))
        if not self.paths:
            raise DataError(
                f"empty dataset: no images ({'/'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) under {printable(root)}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = _load_image(self.paths[i])
        return self.transform(img) if self.transform is not None else _to_float_tensor(np.asarray(img))


def check_label_coverage(dataset: Dataset, num_classes: int, label_offset: int = 0, source: str | None = None) -> None:
    """Refuse a labelled dataset whose class indices are not the model's.

    A class list with 2 names for a 10-class model, or sorted folder names when only some classes
    are present, number the classes 0, 1, ... in a way the model does not: accuracy comes out near
    0 % with no hint why. The dataset must name exactly ``num_classes - label_offset`` classes
    (when it names them) and every label must be below that. ``num_classes <= 0`` means unknown
    (a user model without ``like``), and nothing is checked. ``source`` (e.g. the data spec)
    starts the message; by default the dataset's root, if it has one.
    """
    if num_classes <= 0:
        return
    n = num_classes - label_offset
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    if source is None:
        root = getattr(base, "root", None)
        if root is not None:
            source = str(root)
    where = f"{printable(source)}: " if source else ""
    classes = getattr(base, "classes", None)
    if classes is not None and len(classes) != n:
        class_list = getattr(base, "class_list", None)
        source = f"the class list {printable(class_list)}" if class_list is not None else "its class folders"
        hint = (
            "" if class_list is not None else "; pass a class list with one line per model class (folder:DIR:CLASSLIST)"
        )
        raise DataError(
            f"{where}the labels do not cover the model's classes: {source} name {len(classes)} "
            f"classes, the model has {n}{hint}"
        )
    targets = getattr(base, "targets", None)
    if targets is not None and len(targets):
        top, low = max(targets), min(targets)
        if top >= n or low < 0:
            raise DataError(f"{where}label {top if top >= n else low} is outside the model's {n} classes (0..{n - 1})")


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, Path, Path | None]:
    """``KIND:DIR[:CLASSLIST]`` → (kind, dir, class list). Relative paths are relative to the cwd."""
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in SPEC_KINDS:
        shown = f"'{kind}'" if sep else f"'{spec}' (no KIND: prefix)"
        raise DataError(
            f"unknown data spec kind {shown}; valid kinds: cifar10:DIR, cifar100:DIR, folder:DIR[:CLASSLIST]"
        )
    if not rest:
        raise DataError(f"data spec '{spec}' has no directory; expected {kind}:DIR")
    class_list: str | None = None
    if kind == "folder" and ":" in rest and not Path(rest).expanduser().is_dir():
        rest, class_list = rest.rsplit(":", 1)
        if not class_list:
            raise DataError(f"data spec '{spec}' ends with ':' but names no class list")
    elif kind != "folder" and ":" in rest and not Path(rest).expanduser().exists():
        raise DataError(f"data spec '{spec}': only folder: takes a class list ({kind}:DIR)")
    return kind, Path(rest).expanduser(), Path(class_list).expanduser() if class_list else None


def _locate_ref(ref: DatasetRef) -> tuple[Path, Path | None]:
    """Find a registry dataset in the asset mirror, then in the user cache."""
    mirror = assets_dir()
    cache = cache_dir() / "datasets"
    roots = ([mirror] if mirror is not None else []) + [cache]
    for base in roots:
        if (base / ref.path).exists():
            class_list = None
            if ref.class_list is not None:
                class_list = base / ref.class_list
                if not class_list.is_file():
                    raise DataError(
                        f"dataset {base / ref.path} found but its class list is missing: place it at {class_list}"
                    )
            return base / ref.path, class_list
    tried = f" (not in ${ENV_ASSETS}={mirror})" if mirror is not None else f" (${ENV_ASSETS} is not set)"
    extra = f" and {ref.class_list}" if ref.class_list else ""
    raise DataError(
        f"dataset '{ref.path}' not found{tried}: create {cache / ref.path}{extra} under "
        f"{cache}, set {ENV_ASSETS} to a mirror containing {ref.path}, or pass a data spec "
        f"such as {ref.kind}:DIR"
    )


def _open(
    kind: str,
    root: Path,
    class_list: Path | None,
    split: str,
    transform: Callable[[Any], torch.Tensor],
    limit: int | None = None,
) -> Dataset:
    if kind in ("cifar10", "cifar100"):
        images, labels = read_cifar(root, split, kind=kind)
        return CifarDataset(images, labels, transform)
    if kind == "folder":
        return ImageFolderDataset(root, class_list, transform, limit=limit)
    raise DataError(f"unknown data spec kind '{kind}'; valid kinds: {', '.join(SPEC_KINDS)}")


def resolve_dataset(spec: str | None, config: ModelConfig, split: str = "test", limit: int | None = None) -> Dataset:
    """Open the labelled dataset named by ``spec`` (or the model's default) with its preprocessing.

    ``split`` selects the CIFAR pickle files; a ``folder:`` spec already names one split's
    directory, so ``split`` does not apply to it. ``limit`` lets a ``folder:`` tree stop its walk
    after the first ``limit`` samples (the ones :func:`make_loader`'s ``limit`` keeps anyway), so
    ``--limit 8`` on a huge tree does not list all of it first; CIFAR pickles are read whole.
    """
    if spec is None:
        ref = config.default_dataset
        if ref is None:
            raise DataError(
                f"model '{config.name}' has no default dataset; pass a data spec "
                "(cifar10:DIR, cifar100:DIR or folder:DIR[:CLASSLIST])"
            )
        if ref.kind not in SPEC_KINDS:
            raise DataError(
                f"model '{config.name}' names an unknown dataset kind '{ref.kind}'; "
                f"valid kinds: {', '.join(SPEC_KINDS)}"
            )
        kind = ref.kind
        root, class_list = _locate_ref(ref)
    else:
        kind, root, class_list = parse_spec(spec)
    dataset = _open(kind, root, class_list, split, build_transform(config.preprocessing), limit)
    if len(cast(Sized, dataset)) == 0:
        raise DataError(f"empty dataset: {kind}:{printable(root)} holds no samples")
    check_label_coverage(dataset, config.num_classes, config.label_offset, f"{kind}:{root}")
    return dataset


def make_loader(
    dataset: Dataset, batch_size: int = 128, limit: int | None = None, shuffle: bool = False, num_workers: int = 0
) -> DataLoader:
    """Batches in dataset order; ``limit`` keeps the first N samples so runs are comparable.

    ``num_workers`` defaults to 0: on small CPU machines worker processes compete with the model
    for cores, and an error in a worker loses its one-line message.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be at least 1, got {limit}")
        dataset = Subset(dataset, range(min(limit, len(cast(Sized, dataset)))))
    if len(cast(Sized, dataset)) == 0:
        raise DataError("empty dataset")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)
