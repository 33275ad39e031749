"""Streamed splits: a split's inputs read on demand from a map-style torch Dataset through a
DataLoader with worker processes, each batch moved to the training device as it arrives.

The rows of a batch are chosen by the caller (training/core/data.py draws the same seeded
permutation as for in-memory tensors), so a streamed and an in-memory copy of the same data
give the same batches. Labels are not streamed: they are small and stay in memory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from modeconn.contract.errors import ModeconnError


class DataError(ModeconnError):
    """A data set that cannot be built as asked (missing folder, incomplete archive, bad file)."""


# a source whose float32 inputs take at most this much is held in memory unless told otherwise
IN_MEMORY_MAX_BYTES = 1 << 30
# rows per read when a whole split is read in order (statistics, materialising)
READ_ROWS = 1024


def default_workers() -> int:
    """Loader worker processes when the config leaves data.num_workers unset: half the cores
    (the other half runs the training step), at least 1, at most 4."""
    return min(4, max(1, (os.cpu_count() or 2) // 2))


class _Batches:
    """A batch sampler whose batches are set before each pass, so one DataLoader (and its
    persistent workers) serves every epoch whatever order it draws."""

    def __init__(self, batches: list[list[int]] | None = None) -> None:
        self.batches = batches or []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TensorInputs(TorchDataset):
    """Rows of an in-memory array as a map-style dataset (a tensor or a memory-mapped numpy
    array): what streams a data set that could also be held whole."""

    def __init__(self, x: Any) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.as_tensor(self.x[i])


def _inputs_of(batch: Any) -> torch.Tensor:
    """The inputs of a collated batch: a dataset of (x, y) pairs collates to [X, Y]."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise DataError(f"a data set item's input must be a tensor or an array, got {type(batch).__name__}")
    return batch


def _worker_message(err: DataError) -> str:
    """The one-line message of a DataError raised in a loader worker (the DataLoader re-raises
    it with the worker's whole traceback in the message)."""
    text = str(err)
    if not text.startswith("Caught "):
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split("DataError: ", 1)[-1]


class StreamedSplit:
    """One split's inputs, read from `source` (a map-style torch Dataset whose items are raw
    inputs, or (input, label) pairs) at the rows `indices` of it.

    Looks like an input tensor where the code needs it to: `shape` ([rows, *input shape]),
    `device`, `len()`. Reads go through one DataLoader with persistent workers; a pass that
    starts while another is running (a nested evaluation, a second thread) gets its own loader.
    """

    def __init__(self, source: TorchDataset, indices: torch.Tensor | None = None, *,
                 device: torch.device | str = "cpu", num_workers: int = 0,
                 input_shape: tuple[int, ...] | None = None) -> None:
        self.source = source
        self.indices = torch.arange(len(source)) if indices is None else indices.to(torch.int64).cpu()  # type: ignore[arg-type]
        self.device = torch.device(device)
        self.num_workers = num_workers
        self._input_shape = input_shape
        self._loader: DataLoader | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:  # loaders and locks do not travel to other processes
        return {**self.__dict__, "_loader": None, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _copy(self, **changes: Any) -> StreamedSplit:
        fields = {"indices": self.indices, "device": self.device, "num_workers": self.num_workers,
                  "input_shape": self._input_shape, **changes}
        return StreamedSplit(self.source, **fields)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input's shape, read from the source's first item when not given."""
        if self._input_shape is None:
            if not len(self.source):  # type: ignore[arg-type]
                raise DataError("a streamed split's source is empty: its input shape is unknown")
            first = self.source[0]
            self._input_shape = tuple(_inputs_of(torch.utils.data.default_collate([first])).shape[1:])
        return self._input_shape

    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self), *self.input_shape])

    def subset(self, rows: torch.Tensor) -> StreamedSplit:
        """The rows `rows` of this split (a validation hold-out, a prefix)."""
        return self._copy(indices=self.indices[rows])

    def to(self, device: torch.device | str) -> StreamedSplit:
        return self._copy(device=device)

    def with_workers(self, num_workers: int) -> StreamedSplit:
        return self._copy(num_workers=num_workers)

    # -- reading ----------------------------------------------------------------------------------
    def batches(self, rows: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The float32 inputs of each batch of split rows in `rows`, in order, on the device."""
        batches = [self.indices[r.cpu()].tolist() for r in rows]
        if not batches:
            return
        if self.num_workers > 0 and self._lock.acquire(blocking=False):
            try:
                loader = self._persistent()
                assert isinstance(loader.batch_sampler, _Batches)
                loader.batch_sampler.batches = batches
                yield from self._moved(loader)
            finally:
                self._lock.release()
        else:
            yield from self._moved(self._make_loader(_Batches(batches), persistent=False))

    def in_order(self, batch_size: int = READ_ROWS, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]:
        """Rows start..stop in order, `batch_size` at a time."""
        stop = len(self) if stop is None else min(stop, len(self))
        yield from self.batches(torch.arange(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size))

    def take(self, n: int) -> torch.Tensor:
        """The first `n` inputs as one tensor."""
        parts = list(self.in_order(stop=n))
        return torch.cat(parts) if parts else torch.empty((0, *self.input_shape), device=self.device)

    def materialize(self) -> torch.Tensor:
        """The whole split as one tensor on the device."""
        return self.take(len(self))

    def _make_loader(self, sampler: _Batches, persistent: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(self.source, batch_sampler=sampler, num_workers=workers,
                          persistent_workers=persistent and workers > 0,
                          pin_memory=self.device.type == "cuda")

    def _persistent(self) -> DataLoader:
        if self._loader is None:
            self._loader = self._make_loader(_Batches(), persistent=True)
        return self._loader

    def _moved(self, loader: DataLoader) -> Iterator[torch.Tensor]:
        try:
            for batch in loader:
                yield _inputs_of(batch).to(self.device, torch.float32, non_blocking=True)
        except DataError as err:
            raise DataError(_worker_message(err)) from None


Inputs = torch.Tensor | StreamedSplit


def read_in_order(x: Inputs, batch_size: int = READ_ROWS) -> Iterator[torch.Tensor]:
    """Every input of a split (a tensor or a streamed split), in order."""
    if isinstance(x, StreamedSplit):
        yield from x.in_order(batch_size)
    else:
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size]


def input_statistics(x: Inputs, batch_size: int = READ_ROWS) -> tuple[list[float], list[float], float, float]:
    """Mean and standard deviation (n - 1) per entry of axis 1 (the channels of images, the
    features of table rows; one value for scalar inputs), and the smallest and largest value,
    in one pass in float64. A constant entry gets std 1 (it is then only shifted)."""
    total = squares = None
    count = 0
    low, high = float("inf"), float("-inf")
    for batch in read_in_order(x, batch_size):
        b = batch.double()
        flat = b.reshape(1, -1) if b.dim() == 1 else b.transpose(0, 1).reshape(b.shape[1], -1)
        s, q = flat.sum(1), (flat * flat).sum(1)
        total, squares = (s, q) if total is None else (total + s, squares + q)
        count += flat.shape[1]
        if b.numel():
            low, high = min(low, float(b.min())), max(high, float(b.max()))
    if total is None or count < 2:
        raise DataError("the training split needs at least 2 inputs to compute its mean and std")
    mean = total / count
    var = ((squares - count * mean * mean) / (count - 1)).clamp_min(0)
    std = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
    return [float(v) for v in mean], [float(v) for v in std], low, high


def estimated_bytes(rows: int, input_shape: tuple[int, ...]) -> int:
    """What `rows` float32 inputs take in memory."""
    n = 4 * rows
    for d in input_shape:
        n *= d
    return n
