"""Data sets read from the user's files: an image folder (streamed) and numpy arrays.

`image_folder`: root/train/<class>/<images> and root/test/<class>/<images>; the classes are
the sorted folders of train/, and test/ must have a folder for each. Images are decoded with
Pillow the way the service decodes uploads (modeconn/contract/images.py), resized and
converted as the config says.

`arrays`: `.npz` files (arrays x and y, optional class_names) or folders with x.npy and y.npy,
for the train and test parts; any input shape. Pickled arrays are refused.

Both hold a validation split out of train as the built-in sets do (data.val_size, default
10 % of the training files, chosen by data.split_seed) and normalise with the training split's
mean and std per entry of axis 1 (image channels, table columns) unless data.mean/std are given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from modeconn.contract.images import channels_of, image_array, image_extensions
from modeconn.training.core import progress
from modeconn.training.core.data import Dataset, hold_out, register_dataset
from modeconn.training.core.streaming import (
    IN_MEMORY_MAX_BYTES,
    DataError,
    Inputs,
    StreamedSplit,
    default_workers,
    estimated_bytes,
    input_statistics,
)

DEFAULT_VAL_FRACTION = 0.1


def default_val_size(rows: int, val_size: int | None) -> int:
    return round(DEFAULT_VAL_FRACTION * rows) if val_size is None else val_size


def _statistics(x_train: Inputs, mean: list[float] | None, std: list[float] | None,
                entries: int) -> tuple[list[float], list[float], float, float]:
    """The given mean and std (checked: one value, or one per entry of axis 1), or the training
    split's, computed in one pass; and the split's value range."""
    if (mean is None) != (std is None):
        raise DataError("data.mean and data.std go together: give both or neither")
    if mean is not None and std is not None:
        for key, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, entries):
                raise DataError(f"data.{key} has {len(values)} values; give 1 or {entries} (one per channel)")
        if any(s <= 0 for s in std):
            raise DataError(f"data.std must be > 0, got {list(std)}")
        return [float(v) for v in mean], [float(v) for v in std], float("nan"), float("nan")
    return input_statistics(x_train)


# ---------------------------------------------------------------- image folders
class ImageFiles(TorchDataset):
    """Image files read with Pillow as float32 [C, H, W] in [0, 1] (modeconn/contract/images.py)."""

    def __init__(self, paths: list[str], channels: int, resize: tuple[int, int] | None,
                 size: tuple[int, int]) -> None:
        self.paths, self.channels, self.resize, self.size = paths, channels, resize, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.paths[i]
        with _readable(path):
            with Image.open(path) as image:
                image.load()
                pixels = image_array(image, self.channels, self.resize)
        if pixels.shape[1:] != self.size:
            raise DataError(f"{path} is {pixels.shape[2]}x{pixels.shape[1]} (width x height), the other images "
                            f"{self.size[1]}x{self.size[0]}: set data.resize: [H, W] for images of mixed sizes")
        return torch.from_numpy(pixels)


class _readable:
    """Pillow's ways of failing on a bad file, as one DataError naming it."""

    def __init__(self, path: str | Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, err: BaseException | None, tb: Any) -> bool:
        from PIL import Image, UnidentifiedImageError

        bad = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
        if err is not None and isinstance(err, bad) and not isinstance(err, DataError):
            raise DataError(f"{self.path}: not a readable image ({type(err).__name__}: {err})") from None
        return False


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path, extensions: set[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


def _listing(root: Path) -> tuple[list[str], dict[str, tuple[list[Path], list[int]]]]:
    """The class names and each part's files and labels; every structural problem a DataError."""
    if root is None:
        raise DataError("image_folder needs data.root: the folder holding train/<class>/ and test/<class>/")
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DataError(f"{root / part} is not a folder: image_folder expects {root}/train/<class>/<images> "
                            f"and {root}/test/<class>/<images>")
    classes = _class_folders(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders: put each class's images in train/<class>/")
    test_classes = _class_folders(root / "test")
    missing = [c for c in classes if c not in test_classes]
    if missing:
        raise DataError(f"{root / 'test'} has no folder for class {missing[0]!r} (test/ needs one folder per "
                        f"class of train/)")
    extra = [c for c in test_classes if c not in classes]
    if extra:
        raise DataError(f"{root / 'test' / extra[0]} is a class that train/ does not have")
    extensions = image_extensions()
    parts = {}
    for part in ("train", "test"):
        files: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            found = _image_files(root / part / name, extensions)
            if part == "train" and not found:
                raise DataError(f"{root / part / name} holds no image files ({', '.join(sorted(extensions)[:6])}, ...)")
            files += found
            labels += [label] * len(found)
        parts[part] = (files, labels)
    return classes, parts


def _headers(files: list[Path]) -> list[tuple[tuple[int, int], str]]:
    """(width, height) and mode of every file, from its header only (no pixels decoded)."""
    from PIL import Image

    out = []
    with progress.task("reading image headers", len(files)) as advance:
        for path in files:
            with _readable(path), Image.open(path) as image:
                out.append((image.size, image.mode))
            advance()
    return out


def _image_size(files: list[Path], headers: list[tuple[tuple[int, int], str]],
                resize: list[int] | None) -> tuple[int, int]:
    """(H, W) of the inputs: the resize setting, or the one size every image has."""
    if resize is not None:
        if len(resize) != 2 or any(int(v) < 1 for v in resize):
            raise DataError(f"data.resize must be [H, W] of positive ints, got {resize}")
        return int(resize[0]), int(resize[1])
    (w, h), _ = headers[0]
    for path, ((wi, hi), _) in zip(files, headers, strict=True):
        if (wi, hi) != (w, h):
            raise DataError(f"images of mixed sizes: {path} is {wi}x{hi}, {files[0]} is {w}x{h} (width x height); "
                            f"set data.resize: [H, W]")
    return h, w


@register_dataset("image_folder", options=("resize", "channels", "mean", "std", "num_workers"))
def image_folder(root: str | Path | None = None, val_size: int | None = None, split_seed: int = 0,
                 generation: dict | None = None, resize: list[int] | None = None, channels: int | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None,
                 num_workers: int | None = None) -> Dataset:
    """Images in root/train/<class>/ and root/test/<class>/, streamed (never held whole)."""
    if generation:
        raise DataError("data.generation is for generated data sets (mnist1d); image_folder is read from files")
    base = Path(root).expanduser().resolve() if root is not None else None
    classes, parts = _listing(base)  # type: ignore[arg-type]
    files = parts["train"][0] + parts["test"][0]
    headers = _headers(files)
    size = _image_size(files, headers, resize)
    if channels is None:
        channels = channels_of(headers[0][1])
    if channels not in (1, 3):
        raise DataError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    workers = default_workers() if num_workers is None else num_workers
    shape = (channels, *size)

    def split(part: str) -> tuple[StreamedSplit, torch.Tensor]:
        paths, labels = parts[part]
        source = ImageFiles([str(p) for p in paths], channels, None if resize is None else size, size)
        return (StreamedSplit(source, num_workers=workers, input_shape=shape),
                torch.tensor(labels, dtype=torch.int64))

    x, y = split("train")
    x_test, y_test = split("test")
    x, y, x_val, y_val = hold_out(x, y, default_val_size(len(y), val_size), split_seed)
    mean, std, _, _ = _statistics(x, mean, std, channels)
    info = {"split_seed": split_seed, "root": str(base), "resize": None if resize is None else list(size),
            "channels": channels}
    return Dataset("image_folder", x, y, x_val, y_val, x_test, y_test, mean, std, classes,
                   value_range=(0.0, 1.0), info=info)


# ---------------------------------------------------------------- arrays
def _array_path(path: str | None, root: str | Path | None, key: str) -> Path:
    if path is None:
        raise DataError(f"dataset arrays needs data.{key}: an .npz file (arrays x, y) or a folder with x.npy, y.npy")
    p = Path(path).expanduser()
    if not p.is_absolute() and root is not None:
        p = Path(root).expanduser() / p
    p = p.resolve()
    if not p.exists():
        raise DataError(f"data.{key}: {p} does not exist")
    return p


def _pickled(err: ValueError) -> bool:
    """numpy's refusal of an object array (loading it would unpickle), plain or memory-mapped."""
    return "pickle" in str(err) or "Python objects" in str(err)


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path.parent} has no {path.name}: an arrays folder holds x.npy and y.npy")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as err:
        if _pickled(err):
            raise DataError(f"{path} holds Python objects (a pickled array); refused: save numeric arrays") from None
        raise DataError(f"{path}: not a readable .npy file ({err})") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy file ({err})") from None


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise DataError(f"{path} is one .npy array; give an .npz with arrays x and y, or a folder")
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(f"{path} has no array {missing[0]!r} (it has {', '.join(f.files) or 'none'})")
            return {k: f[k] for k in ("x", "y", "class_names") if k in f.files}
    except ValueError as err:
        if _pickled(err):
            raise DataError(f"{path} holds Python objects (a pickled array); refused: save numeric arrays") from None
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None


class MemmapInputs(TorchDataset):
    """Rows of an .npy file read from a memory map (opened in each worker process)."""

    def __init__(self, path: str, rows: int) -> None:
        self.path, self.rows, self._x = path, rows, None

    def __len__(self) -> int:
        return self.rows

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_x": None}

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._x is None:
            self._x = np.load(self.path, allow_pickle=False, mmap_mode="r")
        return torch.from_numpy(np.array(self._x[i], dtype=np.float32))


def _part(path: Path, key: str, workers: int) -> tuple[Inputs, torch.Tensor, list[str] | None]:
    """One part's inputs (a tensor, or streamed from a memory map when large), labels and class names."""
    if path.is_dir():
        x, y, names = _load_npy(path / "x.npy", mmap=True), _load_npy(path / "y.npy", mmap=False), None
        where = path / "x.npy"
    else:
        arrays = _load_npz(path)
        x, y, names = arrays["x"], arrays["y"], arrays.get("class_names")
        where = path
    if x.ndim < 2:
        raise DataError(f"{where}: x has shape {list(x.shape)}; expected [N, ...] (one row per example)")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where}: x has dtype {x.dtype}; expected numbers")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{path}: y must be integer class labels of shape [N], got {y.dtype} {list(y.shape)}")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)} labels (data.{key})")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: y has negative labels ({int(y.min())}); labels are 0 .. classes - 1")
    labels = torch.from_numpy(y.astype(np.int64))
    if isinstance(x, np.memmap) and estimated_bytes(len(x), x.shape[1:]) > IN_MEMORY_MAX_BYTES:
        return (StreamedSplit(MemmapInputs(str(where), len(x)), num_workers=workers, input_shape=tuple(x.shape[1:])),
                labels, None)
    class_names = None if names is None else [str(n) for n in np.asarray(names).tolist()]
    return torch.from_numpy(np.array(x, dtype=np.float32)), labels, class_names


def _value_range(parts: list[Inputs]) -> tuple[float, float]:
    lows, highs = [], []
    for x in parts:
        if len(x) == 0:
            continue
        if isinstance(x, StreamedSplit):
            _, _, lo, hi = input_statistics(x)
        else:
            lo, hi = float(x.min()), float(x.max())
        lows.append(lo)
        highs.append(hi)
    return min(lows), max(highs)


@register_dataset("arrays", options=("train", "test", "mean", "std", "num_workers"))
def arrays(root: str | Path | None = None, val_size: int | None = None, split_seed: int = 0,
           generation: dict | None = None, train: str | None = None, test: str | None = None,
           mean: list[float] | None = None, std: list[float] | None = None,
           num_workers: int | None = None) -> Dataset:
    """Numpy arrays of any input shape; held in memory unless an .npy is too large (memory-mapped)."""
    if generation:
        raise DataError("data.generation is for generated data sets (mnist1d); arrays are read from files")
    workers = default_workers() if num_workers is None else num_workers
    train_path, test_path = _array_path(train, root, "train"), _array_path(test, root, "test")
    x, y, names = _part(train_path, "train", workers)
    x_test, y_test, _ = _part(test_path, "test", workers)
    if tuple(x.shape[1:]) != tuple(x_test.shape[1:]):
        raise DataError(f"train inputs have shape {list(x.shape[1:])}, test inputs {list(x_test.shape[1:])}: "
                        f"they must match ({train_path}, {test_path})")
    num_classes = int(max(y.max(), y_test.max() if len(y_test) else 0)) + 1
    if names is not None and len(names) < num_classes:
        raise DataError(f"{train_path}: class_names has {len(names)} entries but the labels go up to {num_classes - 1}")
    everything = [x, x_test]
    x, y, x_val, y_val = hold_out(x, y, default_val_size(len(y), val_size), split_seed)
    entries = 1 if len(x.shape) == 1 else x.shape[1]
    mean, std, _, _ = _statistics(x, mean, std, entries)
    info = {"split_seed": split_seed, "train": str(train_path), "test": str(test_path)}
    return Dataset("arrays", x, y, x_val, y_val, x_test, y_test, mean, std,
                   names or [str(i) for i in range(num_classes)], value_range=_value_range(everything), info=info)


# ---------------------------------------------------------------- inputs alone (out-of-distribution sets)
def read_inputs(path: Path, data: Dataset) -> torch.Tensor:
    """Inputs of `data`'s shape, without labels, read whole (float32, not normalised): an .npz
    file's array x, an .npy file, a folder with x.npy, or, for an image_folder data set, a folder
    of images (searched recursively, decoded as `data`'s images are). An error names the path."""
    path = path.expanduser()
    if not path.exists():
        raise DataError(f"--ood: {path} is neither a built-in OOD set nor an existing file or folder")
    if path.is_file() and path.suffix == ".npz":
        x = _load_npz_inputs(path)
    elif path.is_file():
        x = _load_npy(path, mmap=False)
    elif (path / "x.npy").is_file():
        x = _load_npy(path / "x.npy", mmap=False)
    elif data.name == "image_folder":
        return _read_images(path, data)
    else:
        raise DataError(f"{path}: an OOD set of {data.name!r} inputs is an .npz file (array x), an .npy file "
                        "or a folder with x.npy")
    if x.dtype.kind not in "biuf" or x.ndim < 2 or tuple(x.shape[1:]) != data.input_shape:
        raise DataError(f"{path}: inputs of shape {list(x.shape)} ({x.dtype}); expected [N, "
                        f"{', '.join(map(str, data.input_shape))}] numbers, as the data set's inputs")
    if not len(x):
        raise DataError(f"{path}: no inputs")
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _load_npz_inputs(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in getattr(f, "files", ()):
                raise DataError(f"{path} has no array 'x' (the inputs)")
            return f["x"]
    except ValueError as err:
        if _pickled(err):
            raise DataError(f"{path} holds Python objects (a pickled array); refused: save numeric arrays") from None
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None


def _read_images(folder: Path, data: Dataset) -> torch.Tensor:
    extensions = image_extensions()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise DataError(f"{folder} holds no image files ({', '.join(sorted(extensions)[:6])}, ...)")
    channels, size = data.input_shape[0], tuple(data.input_shape[1:])
    resize = data.info.get("resize")
    source = ImageFiles([str(p) for p in files], channels, None if resize is None else size, size)  # type: ignore[arg-type]
    return torch.stack([source[i] for i in range(len(source))])
