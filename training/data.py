"""The one dataset registry: `build_dataset(name, root=..., device=...)`.

Small data sets live as whole tensors on the training device; batching and augmentation
happen there too, so the hot loop has no per-sample Python work.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from serving.errors import ModeconnError
from training.checkpoint import atomic_write_bytes
from training.distributed import shard_bounds


class DataError(ModeconnError):
    """A data set that cannot be built as asked (missing folder, incomplete archive)."""


@dataclass
class Dataset:
    """A classification data set held as raw float32 tensors (before normalisation)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: list[float]  # per channel; normalisation is applied by `normalize`
    std: list[float]
    class_names: list[str]
    augment: str | None = None  # "crop_flip" for CIFAR
    value_range: tuple[float, float] = (0.0, 1.0)
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device: torch.device | str) -> Dataset:
        move = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        return Dataset(**{**self.__dict__, **move})

    def describe(self) -> dict:
        """What a manifest or a checkpoint records about the data."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "input_shape": list(self.input_shape),
            "mean": self.mean,
            "std": self.std,
            "range": list(self.value_range),
            "train_size": len(self.y_train),
            "test_size": len(self.y_test),
        }


def normalization_tensors(mean: list[float], std: list[float], ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std shaped to broadcast over a batch of `ndim` dims: per channel (axis 1)
    for images, one scalar for 1D signals."""
    shape = (1, -1) + (1,) * (ndim - 2) if len(mean) > 1 else (1,)
    return torch.tensor(mean).view(shape), torch.tensor(std).view(shape)


def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m, s = normalization_tensors(mean, std, x.dim())
    return (x - m.to(x)) / s.to(x)


# ---------------------------------------------------------------- registry
DatasetBuilder = Callable[..., Dataset]
_DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    def wrap(builder: DatasetBuilder) -> DatasetBuilder:
        _DATASETS[name] = builder
        return builder

    return wrap


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def build_dataset(name: str, root: str | Path | None = None, device: str | torch.device = "cpu") -> Dataset:
    if name not in _DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(list_datasets())}")
    return _DATASETS[name](root=root).to(device)


# ---------------------------------------------------------------- MNIST-1D
def _cache_dir() -> Path:
    return Path(os.environ.get("MODECONN_DATA_DIR", Path.home() / ".cache" / "modeconn"))


@register_dataset("mnist1d")
def mnist1d(root: str | Path | None = None) -> Dataset:
    """MNIST-1D (Greydanus 2020) generated offline with the package's default arguments.

    Generation takes a few seconds, so the arrays are cached (plain .npz, no pickle) under
    `root` or $MODECONN_DATA_DIR (default ~/.cache/modeconn).
    """
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    key = hashlib.sha256(repr(sorted(vars(args).items())).encode()).hexdigest()[:12]
    cache = Path(root) if root else _cache_dir()
    path = cache / f"mnist1d-{key}.npz"
    arrays = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            arrays = None  # a damaged cache is regenerated, never trusted
    if arrays is None:
        from mnist1d.data import make_dataset

        data = make_dataset(args)
        arrays = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
        cache.mkdir(parents=True, exist_ok=True)
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
    x, x_test = (torch.from_numpy(arrays[k].astype(np.float32)) for k in ("x", "x_test"))
    y, y_test = (torch.from_numpy(arrays[k].astype(np.int64)) for k in ("y", "y_test"))
    return Dataset(
        name="mnist1d",
        x_train=x,
        y_train=y,
        x_test=x_test,
        y_test=y_test,
        mean=[float(x.mean())],
        std=[float(x.std())],
        class_names=[str(i) for i in range(10)],
        value_range=(float(min(x.min(), x_test.min())), float(max(x.max(), x_test.max()))),
    )


# ---------------------------------------------------------------- CIFAR
class _CifarUnpickler(pickle.Unpickler):
    """Loads the CIFAR python archives without running arbitrary code: only the numpy
    array reconstruction the format needs is allowed; every other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1")
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR archive")


def _read_cifar_file(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError) as err:
        raise DataError(f"{path}: cannot read CIFAR archive ({err})") from err
    if not isinstance(raw, dict):
        raise DataError(f"{path} is not a CIFAR archive (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_images(batch: dict, path: Path) -> torch.Tensor:
    data = np.asarray(batch.get("data"))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)


def _load_cifar(root, folder, train_files, test_file, meta_file, label_key, names_key, name, mean, std):
    if root is None:
        raise DataError(f"{name} needs a data folder: pass --set data.root=DIR (the folder holding {folder}/)")
    base = Path(root).expanduser() / folder
    expected = [*train_files, test_file, meta_file]
    missing = [f for f in expected if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"{name}: {base} is missing {', '.join(missing)}; expected the python-version "
            f"archive files {', '.join(expected)} in {base}"
        )

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for fname in files:
            batch = _read_cifar_file(base / fname)
            if label_key not in batch:
                raise DataError(f"{base / fname}: no {label_key!r} entry")
            xs.append(_cifar_images(batch, base / fname))
            ys.append(torch.tensor(list(batch[label_key]), dtype=torch.int64))
        return torch.cat(xs), torch.cat(ys)

    x, y = read(train_files)
    x_test, y_test = read([test_file])
    meta = _read_cifar_file(base / meta_file)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    if not names:
        raise DataError(f"{base / meta_file}: no {names_key!r} entry")
    return Dataset(name, x, y, x_test, y_test, mean, std, names, augment="crop_flip")


@register_dataset("cifar10")
def cifar10(root: str | Path | None = None) -> Dataset:
    return _load_cifar(
        root, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
        "batches.meta", "labels", "label_names", "cifar10",
        [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616],
    )


@register_dataset("cifar100")
def cifar100(root: str | Path | None = None) -> Dataset:
    return _load_cifar(
        root, "cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names",
        "cifar100", [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762],
    )


# ---------------------------------------------------------------- batching on the device
def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop with `pad`-pixel zero padding and horizontal flip, for a whole batch
    at once with index arithmetic (no per-sample Python)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    n_idx = torch.arange(n, device=x.device)[:, None, None, None]
    c_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]


def train_batches(
    data: Dataset,
    batch_size: int,
    generator: torch.Generator,
    augment: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch of normalised training batches (the last partial batch kept).

    `shard=(rank, world)`: this rank's contiguous part of every global batch of `batch_size`
    (training/distributed.py `shard_bounds`: as even as possible). Every rank draws the same
    permutation and augmentation (for the whole global batch) from the same seeded generator,
    so the ranks together see exactly the batches of one process.
    """
    part, parts = shard
    n = len(data.y_train)
    order = torch.randperm(n, generator=generator).to(data.x_train.device)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        x = data.x_train[idx]
        if augment and data.augment == "crop_flip":
            x = random_crop_flip(x, 4, generator)
        if parts > 1:
            lo, hi = shard_bounds(len(idx), part, parts)
            x, idx = x[lo:hi], idx[lo:hi]
        yield normalize(x, data.mean, data.std), data.y_train[idx]


def eval_batches(
    data: Dataset, split: str, batch_size: int = 1024
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised batches of `split` ("train" or "test") in order, without augmentation."""
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    for start in range(0, len(y), batch_size):
        yield normalize(x[start : start + batch_size], data.mean, data.std), y[start : start + batch_size]


def iterations_per_epoch(data: Dataset, batch_size: int) -> int:
    return -(-len(data.y_train) // batch_size)
