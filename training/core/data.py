"""The one dataset registry: `build_dataset(name, root=..., device=...)`.

Small data sets live as whole tensors on the training device; batching and augmentation
happen there too, so the hot loop has no per-sample Python work.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modeconn.contract.errors import ModeconnError
from modeconn.training.core.checkpoint import atomic_write_bytes
from modeconn.training.core.distributed import shard_bounds


class DataError(ModeconnError):
    """A data set that cannot be built as asked (missing folder, incomplete archive)."""


@dataclass
class Dataset:
    """A classification data set held as raw float32 tensors (before normalisation), in
    three disjoint splits: train, validation (for choosing settings) and test (reported only)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: list[float]  # per channel; normalisation is applied by `normalize`
    std: list[float]
    class_names: list[str]
    augment: str | None = None  # "crop_flip" for CIFAR
    value_range: tuple[float, float] = (0.0, 1.0)
    info: dict = field(default_factory=dict)  # how the data was made (split seed, generation parameters)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of "train", "val" or "test"."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def to(self, device: torch.device | str) -> Dataset:
        move = {f"{xy}_{s}": getattr(self, f"{xy}_{s}").to(device) for s in SPLITS for xy in "xy"}
        return Dataset(**{**self.__dict__, **move})

    def describe(self) -> dict:
        """What a manifest or a checkpoint records about the data: enough to build it again."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "input_shape": list(self.input_shape),
            "mean": self.mean,
            "std": self.std,
            "range": list(self.value_range),
            "train_size": len(self.y_train),
            "val_size": len(self.y_val),
            "test_size": len(self.y_test),
            **self.info,
        }


SPLITS = ("train", "val", "test")


def hold_out(x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A fixed, seeded validation hold-out of `size` examples: (x_train, y_train, x_val, y_val)."""
    if not 0 <= size < len(y):
        raise DataError(f"data.val_size must be between 0 and {len(y) - 1} (the training examples), got {size}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, train = order[:size].sort().values, order[size:].sort().values
    return x[train], y[train], x[val], y[val]


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


def build_dataset(
    name: str,
    root: str | Path | None = None,
    device: str | torch.device = "cpu",
    val_size: int | None = None,
    split_seed: int = 0,
    generation: dict | None = None,
) -> Dataset:
    """The data set `name` with a validation hold-out of `val_size` training examples
    (None: the data set's default), chosen by `split_seed`. `generation` overrides the
    generator's parameters for generated data sets (MNIST-1D)."""
    if name not in _DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(list_datasets())}")
    data = _DATASETS[name](root=root, val_size=val_size, split_seed=split_seed, generation=generation)
    return data.to(device)


def _no_generation(name: str, generation: dict | None) -> None:
    if generation:
        raise DataError(f"data.generation is for generated data sets (mnist1d); {name} is read from files")


# ---------------------------------------------------------------- MNIST-1D
def _cache_dir() -> Path:
    return Path(os.environ.get("MODECONN_DATA_DIR", Path.home() / ".cache" / "modeconn"))


MNIST1D_DEFAULT_VAL_FRACTION = 0.1


def mnist1d_generation(overrides: dict | None = None) -> dict:
    """The `mnist1d` package's generation parameters (get_dataset_args) with `overrides`;
    an unknown name is an error naming it."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # where the package's own pickle lives; never fetched here
    unknown = sorted(set(overrides or {}) - set(args))
    if unknown:
        raise DataError(f"data.generation: unknown MNIST-1D parameter(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(args))}")
    return {**args, **(overrides or {})}


def _mnist1d_arrays(generation: dict, cache: Path) -> dict[str, np.ndarray]:
    """Generate (or read from the .npz cache) the package's train and test arrays."""
    key = hashlib.sha256(repr(sorted(generation.items())).encode()).hexdigest()[:12]
    path = cache / f"mnist1d-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is regenerated, never trusted
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    data = make_dataset(ObjectView(dict(generation)))
    arrays = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return arrays


@register_dataset("mnist1d")
def mnist1d(root: str | Path | None = None, val_size: int | None = None, split_seed: int = 0,
            generation: dict | None = None) -> Dataset:
    """MNIST-1D (Greydanus 2020) generated offline by the `mnist1d` package.

    With no `generation` overrides this is the published data set (4000 train / 1000 test
    signals); the validation split is held out of the training part. Generation takes
    seconds, so the arrays are cached (plain .npz, no pickle) under `root` or
    $MODECONN_DATA_DIR (default ~/.cache/modeconn), keyed by the parameters.
    """
    params = mnist1d_generation(generation)
    arrays = _mnist1d_arrays(params, Path(root) if root else _cache_dir())
    x, x_test = (torch.from_numpy(arrays[k].astype(np.float32)) for k in ("x", "x_test"))
    y, y_test = (torch.from_numpy(arrays[k].astype(np.int64)) for k in ("y", "y_test"))
    if val_size is None:
        val_size = round(MNIST1D_DEFAULT_VAL_FRACTION * len(y))
    x, y, x_val, y_val = hold_out(x, y, val_size, split_seed)
    everything = torch.cat([x, x_val, x_test])
    return Dataset(
        name="mnist1d",
        x_train=x, y_train=y, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test,
        mean=[float(x.mean())],
        std=[float(x.std())],
        class_names=[str(i) for i in range(10)],
        value_range=(float(everything.min()), float(everything.max())),
        info={"split_seed": split_seed, "generation": params},
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


CIFAR_DEFAULT_VAL_SIZE = 5000


def _load_cifar(root, folder, train_files, test_file, meta_file, label_key, names_key, name, mean, std,  # noqa: ANN001
                val_size, split_seed):
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
    x, y, x_val, y_val = hold_out(x, y, CIFAR_DEFAULT_VAL_SIZE if val_size is None else val_size, split_seed)
    return Dataset(name, x, y, x_val, y_val, x_test, y_test, mean, std, names, augment="crop_flip",
                   info={"split_seed": split_seed})


@register_dataset("cifar10")
def cifar10(root: str | Path | None = None, val_size: int | None = None, split_seed: int = 0,
            generation: dict | None = None) -> Dataset:
    _no_generation("cifar10", generation)
    return _load_cifar(
        root, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
        "batches.meta", "labels", "label_names", "cifar10",
        [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], val_size, split_seed,
    )


@register_dataset("cifar100")
def cifar100(root: str | Path | None = None, val_size: int | None = None, split_seed: int = 0,
             generation: dict | None = None) -> Dataset:
    _no_generation("cifar100", generation)
    return _load_cifar(
        root, "cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names",
        "cifar100", [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762], val_size, split_seed,
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
    (training/core/distributed.py `shard_bounds`: as even as possible). Every rank draws the same
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
    """Normalised batches of `split` ("train", "val" or "test") in order, without augmentation."""
    x, y = data.split(split)
    for start in range(0, len(y), batch_size):
        yield normalize(x[start : start + batch_size], data.mean, data.std), y[start : start + batch_size]


def iterations_per_epoch(data: Dataset, batch_size: int) -> int:
    return -(-len(data.y_train) // batch_size)


# ---------------------------------------------------------------- torch datasets and loaders (the Python API)
def _materialise(source: object, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) of a map-style torch Dataset or a DataLoader as two tensors, in order."""
    from torch.utils.data import DataLoader

    loader = source if isinstance(source, DataLoader) else DataLoader(source, batch_size=1024)  # type: ignore[arg-type]
    xs, ys = [], []
    for batch in loader:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise DataError(f"{split}: each batch must be (inputs, labels), got {type(batch).__name__}")
        xs.append(torch.as_tensor(batch[0]).float())
        ys.append(torch.as_tensor(batch[1]).long())
    if not xs:
        raise DataError(f"{split}: the data set is empty")
    return torch.cat(xs), torch.cat(ys)


def dataset_from_torch(
    train: object,
    test: object | None = None,
    val: object | None = None,
    *,
    class_names: list[str] | None = None,
    name: str = "custom",
    in_memory: bool | None = None,
) -> Dataset:
    """A `Dataset` from torch data (map-style Datasets or DataLoaders yielding (inputs, labels)).

    Minimal version: every split is read into memory once (the loaders' batching and order are not
    kept: the stages batch and shuffle themselves); the streamed version replaces it at merge.
    The inputs are taken as the network receives them (already normalised: mean 0, std 1 here).
    `test` or `val` None: an empty split.
    """
    del in_memory  # everything is held in memory here
    x, y = _materialise(train, "train")
    empty = (x.new_zeros((0, *x.shape[1:])), y.new_zeros(0))
    x_test, y_test = _materialise(test, "test") if test is not None else empty
    x_val, y_val = _materialise(val, "val") if val is not None else empty
    for split, xs in (("test", x_test), ("val", x_val)):
        if len(xs) and xs.shape[1:] != x.shape[1:]:
            raise DataError(f"{split}: inputs of shape {list(xs.shape[1:])}, train has {list(x.shape[1:])}")
    num_classes = int(max(int(t.max()) for t in (y, y_test, y_val) if len(t))) + 1
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) < num_classes:
        raise DataError(f"class_names has {len(names)} entries but the labels go up to {num_classes - 1}")
    everything = torch.cat([x.flatten(), x_test.flatten(), x_val.flatten()])
    low, high = float(everything.min()), float(everything.max())
    return Dataset(name=name, x_train=x, y_train=y, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test,
                   mean=[0.0], std=[1.0], class_names=names, value_range=(low, high if high > low else low + 1.0),
                   info={"source": "torch"})
