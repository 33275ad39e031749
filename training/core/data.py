"""The one dataset registry: `build_dataset(name, root=..., device=...)`.

A split's inputs are either a whole tensor on the training device (small data sets: batching
and augmentation happen there, so the hot loop has no per-sample Python work) or a streamed
split (training/core/streaming.py: read through a DataLoader with worker processes). Labels
always stay in memory. Both give the same batches for the same seed.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import Dataset as TorchDataset

from modeconn.training.core.checkpoint import atomic_write_bytes
from modeconn.training.core.distributed import shard_bounds
from modeconn.training.core.streaming import (
    IN_MEMORY_MAX_BYTES,
    DataError,
    Inputs,
    StreamedSplit,
    TensorInputs,
    default_workers,
    estimated_bytes,
    input_statistics,
)

__all__ = ["DataError", "Dataset", "StreamedSplit", "build_dataset", "dataset_from_torch", "eval_batches",
           "hold_out", "list_datasets", "normalize", "ood_inputs", "register_dataset", "train_batches"]


@dataclass
class Dataset:
    """A classification data set of raw float32 inputs (before normalisation), in three
    disjoint splits: train, validation (for choosing settings) and test (reported only).
    Each split's inputs are a tensor or a `StreamedSplit`; labels are int64 tensors."""

    name: str
    x_train: Inputs
    y_train: torch.Tensor
    x_val: Inputs
    y_val: torch.Tensor
    x_test: Inputs
    y_test: torch.Tensor
    mean: list[float]  # per channel; normalisation is applied by `normalize`
    std: list[float]
    class_names: list[str]
    augment: str | None = None  # "crop_flip" for CIFAR
    value_range: tuple[float, float] = (0.0, 1.0)
    info: dict = field(default_factory=dict)  # how the data was made (split seed, generation, preprocessing)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def input_dims(self) -> int:
        """Dimensions of a batch of inputs (batch axis included)."""
        return 1 + len(self.input_shape)

    @property
    def device(self) -> torch.device:
        """Where batches are delivered."""
        return self.x_train.device

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def streamed(self) -> bool:
        return any(isinstance(getattr(self, f"x_{s}"), StreamedSplit) for s in SPLITS)

    def split(self, name: str) -> tuple[Inputs, torch.Tensor]:
        """(inputs, labels) of "train", "val" or "test"."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def labels(self, split: str) -> torch.Tensor:
        return self.split(split)[1]

    def size(self, split: str) -> int:
        return len(self.labels(split))

    def first_inputs(self, split: str, n: int) -> torch.Tensor:
        """The first `n` raw inputs of `split` as one tensor (a parity check's sample)."""
        x = self.split(split)[0]
        return x.take(n) if isinstance(x, StreamedSplit) else x[:n]

    def to(self, device: torch.device | str) -> Dataset:
        move = {f"{xy}_{s}": getattr(self, f"{xy}_{s}").to(device) for s in SPLITS for xy in "xy"}
        return Dataset(**{**self.__dict__, **move})

    def in_memory(self) -> Dataset:
        """Every split as a tensor on the device (streamed splits read once, in order)."""
        held = {f"x_{s}": x.materialize() for s in SPLITS if isinstance(x := getattr(self, f"x_{s}"), StreamedSplit)}
        return Dataset(**{**self.__dict__, **held})

    def with_workers(self, num_workers: int) -> Dataset:
        """The same splits, streamed ones read by `num_workers` loader worker processes."""
        moved = {f"x_{s}": x.with_workers(num_workers) for s in SPLITS
                 if isinstance(x := getattr(self, f"x_{s}"), StreamedSplit)}
        return Dataset(**{**self.__dict__, **moved})

    def streamed_copy(self, num_workers: int | None = None) -> Dataset:
        """Every split streamed: in-memory tensors read through a DataLoader (same batches)."""
        workers = default_workers() if num_workers is None else num_workers

        def stream(x: Inputs) -> StreamedSplit:
            if isinstance(x, StreamedSplit):
                return x.with_workers(workers)
            return StreamedSplit(TensorInputs(x.cpu()), device=x.device, num_workers=workers,
                                 input_shape=tuple(x.shape[1:]))

        return Dataset(**{**self.__dict__, **{f"x_{s}": stream(getattr(self, f"x_{s}")) for s in SPLITS}})

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


def hold_out(x: Inputs, y: torch.Tensor, size: int, seed: int) -> tuple[Any, ...]:
    """A fixed, seeded validation hold-out of `size` examples: (x_train, y_train, x_val, y_val)."""
    if not 0 <= size < len(y):
        raise DataError(f"data.val_size must be between 0 and {len(y) - 1} (the training examples), got {size}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, train = order[:size].sort().values, order[size:].sort().values
    if isinstance(x, StreamedSplit):
        return x.subset(train), y[train], x.subset(val), y[val]
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
_OPTIONS: dict[str, tuple[str, ...]] = {}
# settings of files-based sources (DataSettings fields); a builder takes those it registered
SOURCE_OPTIONS = ("train", "test", "resize", "channels", "mean", "std")
# settings of how any data set is held: in memory or streamed, and by how many loader workers
LOADING_OPTIONS = ("in_memory", "num_workers")


def register_dataset(name: str, options: tuple[str, ...] = ()) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Register a builder `(root, val_size, split_seed, generation, **options)`; `options` are
    the SOURCE_OPTIONS it takes (given mean/std override the computed ones of any data set)."""

    def wrap(builder: DatasetBuilder) -> DatasetBuilder:
        _DATASETS[name] = builder
        _OPTIONS[name] = options
        return builder

    return wrap


def _load_sources() -> None:
    # the file-based sources register themselves when imported (they import this module)
    import modeconn.training.core.datasets  # noqa: F401


def list_datasets() -> list[str]:
    _load_sources()
    return sorted(_DATASETS)


def build_dataset(
    name: str,
    root: str | Path | None = None,
    device: str | torch.device = "cpu",
    val_size: int | None = None,
    split_seed: int = 0,
    generation: dict | None = None,
    **options: Any,
) -> Dataset:
    """The data set `name` with a validation hold-out of `val_size` training examples
    (None: the data set's default), chosen by `split_seed`. `generation` overrides the
    generator's parameters for generated data sets (MNIST-1D). `options`: the source's
    settings (SOURCE_OPTIONS, None = unset) and LOADING_OPTIONS: `in_memory` (True: every
    split a tensor, False: every split streamed, None: the source's default) and
    `num_workers` (loader worker processes of streamed splits; None: a default)."""
    _load_sources()
    if name not in _DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(list_datasets())}")
    unknown = sorted(set(options) - set(SOURCE_OPTIONS) - set(LOADING_OPTIONS))
    if unknown:
        raise TypeError(f"build_dataset: unknown option(s) {', '.join(unknown)}")
    taken = {k: options.get(k) for k in _OPTIONS[name]}
    given = [k for k in SOURCE_OPTIONS if k not in taken and k not in ("mean", "std") and options.get(k) is not None]
    if given:
        raise DataError(f"data.{given[0]} is not a setting of dataset {name!r} "
                        f"(it takes {', '.join(f'data.{k}' for k in _OPTIONS[name]) or 'none of them'})")
    workers = options.get("num_workers")
    workers = default_workers() if workers is None else workers
    data = _DATASETS[name](root=root, val_size=val_size, split_seed=split_seed, generation=generation, **taken)
    if "mean" not in taken:
        data = _given_statistics(data, options.get("mean"), options.get("std"))
    return held(data, options.get("in_memory"), workers).to(device)


def _given_statistics(data: Dataset, mean: list[float] | None, std: list[float] | None) -> Dataset:
    if mean is not None:
        data.mean = [float(v) for v in mean]
    if std is not None:
        data.std = [float(v) for v in std]
    return data


def held(data: Dataset, in_memory: bool | None, num_workers: int) -> Dataset:
    """`data` in memory (True), streamed (False) or as its source made it (None), streamed
    splits read by `num_workers` worker processes."""
    data = data.with_workers(num_workers)
    if in_memory is True:
        return data.in_memory()
    if in_memory is False:
        return data.streamed_copy(num_workers)
    return data


# ---------------------------------------------------------------- any PyTorch data set
def _map_style(data: Any, what: str) -> tuple[TorchDataset, int]:
    """The map-style dataset behind `data` (a Dataset or a DataLoader over one) and the
    worker processes to read it with (the loader's own, else the default)."""
    workers = default_workers()
    if isinstance(data, DataLoader):
        data, workers = data.dataset, data.num_workers
    if isinstance(data, IterableDataset) or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise DataError(f"{what}: needs a map-style torch Dataset (with __len__ and __getitem__) or a DataLoader "
                        f"over one, got {type(data).__name__}")
    return data, workers


def _item_label(item: Any, what: str) -> int:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"{what}: items must be (input, label) pairs, got {type(item).__name__}")
    return item[1]


class _Labels(TorchDataset):
    """Only the labels of a dataset's items (one pass to learn them)."""

    def __init__(self, source: TorchDataset, what: str) -> None:
        self.source, self.what = source, what

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return _item_label(self.source[i], self.what)


def _labels_of(source: TorchDataset, workers: int, what: str) -> torch.Tensor:
    """Every label of `source`: its `targets` when it has them (torchvision's sets), else read
    in one pass over its items."""
    targets = getattr(source, "targets", None)
    if targets is not None and len(targets) == len(source):  # type: ignore[arg-type]
        return torch.as_tensor(np.asarray(targets), dtype=torch.int64).reshape(-1)
    if not len(source):  # type: ignore[arg-type]
        return torch.zeros(0, dtype=torch.int64)
    loader = DataLoader(_Labels(source, what), batch_size=256, num_workers=workers)
    try:
        return torch.cat([torch.as_tensor(b, dtype=torch.int64).reshape(-1) for b in loader])
    except (TypeError, RuntimeError, ValueError) as err:
        raise DataError(f"{what}: labels must be integers ({err})") from None


def dataset_from_torch(
    train: Any,
    test: Any = None,
    val: Any = None,
    *,
    class_names: list[str] | None = None,
    name: str = "custom",
    in_memory: bool | None = None,
    normalize: bool = False,
) -> Dataset:
    """A Dataset over PyTorch data: `train`, optional `test` and `val`, each a map-style torch
    Dataset of (input, label) pairs or a DataLoader over one (its dataset and worker count are
    used; batching and order are this package's). No `test` or `val`: an empty split (nothing is
    held out of `train`). The inputs are what the networks take, as the loaders give them;
    `normalize=True` instead normalises them with the training split's mean and std per entry
    of axis 1 (one pass). `in_memory`: True holds every split as a tensor, False streams them
    through DataLoaders with worker processes, None holds them when small."""
    parts = {"train": train, "test": test, "val": val}
    splits: dict[str, tuple[Inputs, torch.Tensor]] = {}
    for split, part in parts.items():
        if part is None:
            continue
        source, workers = _map_style(part, split)
        labels = _labels_of(source, workers, split)
        if len(labels) and labels.min() < 0:
            raise DataError(f"{split}: negative label {int(labels.min())}; labels are 0 .. classes - 1")
        splits[split] = StreamedSplit(source, num_workers=workers), labels
    x_train, y_train = splits["train"]
    if not len(y_train):
        raise DataError("train: the data set is empty")
    shape = x_train.input_shape
    for split, (x, _) in splits.items():
        if len(x) and x.input_shape != shape:
            raise DataError(f"{split}: inputs have shape {list(x.input_shape)}, train inputs {list(shape)}")
    for split in ("val", "test"):  # an empty split: rows 0..0 of train
        if split not in splits:
            splits[split] = x_train.subset(torch.zeros(0, dtype=torch.int64)), torch.zeros(0, dtype=torch.int64)
    num_classes = 1 + max(int(y.max()) for _, y in splits.values() if len(y))
    if class_names is None:  # torchvision's sets name their classes
        class_names = getattr(x_train.source, "classes", None)
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) < num_classes:
        raise DataError(f"class_names has {len(names)} entries but the labels go up to {num_classes - 1}")
    mean, std, low, high = input_statistics(x_train)
    if not normalize:  # the networks take the loaders' inputs as they are
        mean, std = [0.0], [1.0]
    data = Dataset(name, x_train, y_train, splits["val"][0], splits["val"][1], splits["test"][0], splits["test"][1],
                   mean, std, names, value_range=(low, high) if low < high else (low, low + 1.0),
                   info={"source": "torch"})
    if in_memory is None:
        rows = sum(len(y) for _, y in splits.values())
        in_memory = estimated_bytes(rows, shape) <= IN_MEMORY_MAX_BYTES
    return data.in_memory() if in_memory else data


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


# ---------------------------------------------------------------- out-of-distribution inputs
# the built-in sets a report tells from the test split (`ood_inputs`): MNIST-1D generated with
# more noise than the data set's own generation, and each test input with its entries permuted
# (the same values, so the same marginal, but no shape); any other name is a path (`read_inputs`)
SHUFFLED = "shuffled"
MNIST1D_NOISE = "mnist1d-noise"
OOD_SETS = (MNIST1D_NOISE, SHUFFLED)
# how much more noise: twice the correlated noise, five times the per-sample noise
_MORE_NOISE = {"corr_noise_scale": 2.0, "iid_noise_scale": 5.0}


AUTO = "auto"  # stands for default_ood_sets; "none" for no OOD set


def ood_names(specs: list[str] | tuple[str, ...], data: Dataset) -> list[str]:
    """The OOD sets `specs` names for `data`: "auto" expanded to `default_ood_sets`, "none" dropped."""
    names: list[str] = []
    for spec in specs:
        for name in default_ood_sets(data) if spec == AUTO else [] if spec == "none" else [spec]:
            if name not in names:
                names.append(name)
    return names


def default_ood_sets(data: Dataset) -> list[str]:
    """The built-in OOD sets that apply to `data`: both for MNIST-1D, the shuffled inputs for any
    other data set held in memory, none for a streamed one (shuffling would read it whole)."""
    if data.name == "mnist1d":
        return list(OOD_SETS)
    return [] if isinstance(data.x_test, StreamedSplit) else [SHUFFLED]


def shuffled_inputs(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Each input with its entries in its own random order (seeded), shape kept."""
    flat = x.reshape(len(x), -1)
    order = torch.rand(flat.shape, generator=torch.Generator().manual_seed(seed)).argsort(dim=1)
    return flat.gather(1, order.to(flat.device)).reshape(x.shape)


def mnist1d_noise_inputs(data: Dataset, seed: int, root: str | Path | None = None) -> torch.Tensor:
    """As many MNIST-1D signals as `data` has test signals (to a multiple of the 10 classes),
    generated with `data`'s generation but more noise and the generator's seed `seed`."""
    generation = data.info.get("generation")
    if data.name != "mnist1d" or generation is None:
        raise DataError(f"the OOD set {MNIST1D_NOISE!r} is made for MNIST-1D data; this data set is {data.name!r}")
    params = {**generation, **{k: generation[k] * f for k, f in _MORE_NOISE.items()},
              "num_samples": max(10, len(data.y_test)), "train_split": 0.0, "seed": seed}
    arrays = _mnist1d_arrays(params, Path(root) if root else _cache_dir())
    return torch.from_numpy(arrays["x_test"].astype(np.float32))


def ood_inputs(spec: str, data: Dataset, seed: int = 0) -> torch.Tensor:
    """Raw inputs (before normalisation, on `data`'s device) of the OOD set `spec`: a name in
    OOD_SETS (made with `seed`) or the path of an .npz / .npy file or folder of inputs."""
    if spec == SHUFFLED:
        x = data.x_test.materialize() if isinstance(data.x_test, StreamedSplit) else data.x_test
        return shuffled_inputs(x, seed)
    if spec == MNIST1D_NOISE:
        return mnist1d_noise_inputs(data, seed).to(data.device)
    _load_sources()
    from modeconn.training.core.datasets import read_inputs

    return read_inputs(Path(spec), data).to(data.device)


def ood_split(data: Dataset, x: torch.Tensor) -> Dataset:
    """`data` with `x` as its test inputs (labels 0: only the inputs are used), for predicting on them."""
    return Dataset(**{**data.__dict__, "x_test": x, "y_test": torch.zeros(len(x), dtype=torch.int64)})


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
def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator,
                     part_of: tuple[int, int] | None = None) -> torch.Tensor:
    """Random crop with `pad`-pixel zero padding and horizontal flip, for a whole batch
    at once with index arithmetic (no per-sample Python).

    `part_of=(offset, total)`: `x` is the rows offset.. of a batch of `total` rows; the draws
    are made for the whole batch, so the part gets exactly its slice of the whole's result."""
    n, c, h, w = x.shape
    lo, total = (0, n) if part_of is None else part_of
    hi = lo + n
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (total,), generator=generator)[lo:hi].to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (total,), generator=generator)[lo:hi].to(x.device)
    flip = (torch.rand(total, generator=generator) < 0.5)[lo:hi].to(x.device)
    rows_ = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    n_idx = torch.arange(n, device=x.device)[:, None, None, None]
    c_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[n_idx, c_idx, rows_[:, None, :, None], cols[:, None, None, :]]


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
    so the ranks together see exactly the batches of one process. A streamed split reads only
    this rank's rows of each batch, in the same order.
    """
    if isinstance(data.x_train, StreamedSplit):
        yield from _streamed_train_batches(data, data.x_train, batch_size, generator, augment, shard)
        return
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


def _streamed_train_batches(data: Dataset, x_train: StreamedSplit, batch_size: int, generator: torch.Generator,
                            augment: bool, shard: tuple[int, int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    part, parts = shard
    n = len(data.y_train)
    order = torch.randperm(n, generator=generator)
    parts_rows = []  # (this rank's rows of the batch, the global batch's size, the rank's offset in it)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        lo, hi = shard_bounds(len(idx), part, parts) if parts > 1 else (0, len(idx))
        parts_rows.append((idx[lo:hi], len(idx), lo))
    inputs = x_train.batches(rows for rows, _, _ in parts_rows)
    for x, (rows, total, lo) in zip(inputs, parts_rows, strict=True):
        if augment and data.augment == "crop_flip":
            x = random_crop_flip(x, 4, generator, part_of=(lo, total))
        yield normalize(x, data.mean, data.std), data.y_train[rows.to(data.y_train.device)]


def input_batches(
    data: Dataset, split: str, batch_size: int = 1024, shard: tuple[int, int] = (0, 1)
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Raw (not normalised) batches of `split` in order, without augmentation; with
    `shard=(part, parts)` only the batches part, part + parts, part + 2 parts, ..."""
    x, y = data.split(split)
    part, parts = shard
    starts = list(range(0, len(y), batch_size))[part::parts]
    if isinstance(x, StreamedSplit):
        inputs = x.batches(torch.arange(s, min(s + batch_size, len(y))) for s in starts)
    else:
        inputs = (x[s : s + batch_size] for s in starts)
    for start, xb in zip(starts, inputs, strict=True):
        yield xb, y[start : start + batch_size]


def eval_batches(
    data: Dataset, split: str, batch_size: int = 1024, shard: tuple[int, int] = (0, 1)
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised batches of `split` ("train", "val" or "test") in order, without augmentation
    (with `shard`, this part's share of them: `input_batches`)."""
    for x, y in input_batches(data, split, batch_size, shard):
        yield normalize(x, data.mean, data.std), y


def iterations_per_epoch(data: Dataset, batch_size: int) -> int:
    return -(-len(data.y_train) // batch_size)


# ---------------------------------------------------------------- torch datasets and loaders (the Python API)

