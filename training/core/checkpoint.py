"""Checkpoint I/O in one place: atomic writes, safe loads (`weights_only=True`, or
safetensors for weights trained elsewhere)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from modeconn.contract.errors import ModeconnError

FORMAT = "modeconn-checkpoint"
VERSION = 1
SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointError(ModeconnError):
    """A checkpoint that is missing, truncated, or not a modeconn checkpoint."""


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename: a crash never leaves half a file.

    Under torchrun only rank 0 writes; a write from another rank is a bug, refused loudly.
    """
    from modeconn.training.core.distributed import rank

    if rank() != 0:
        raise RuntimeError(f"rank {rank()} tried to write {path}: only rank 0 writes files")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Save a dict of tensors and plain values (no custom objects, so it loads safely).
    `processes` records how many processes made it (world size, nodes, backend)."""
    from modeconn.training.core.ranks import layout

    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "processes": layout(), **state}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _read(path: Path, map_location: str | torch.device) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, ...: all mean "unusable"
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({type(err).__name__}: {err})") from err


def is_modeconn_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def is_state_dict(obj: Any) -> bool:
    """A bare `model.state_dict()` saved with torch.save: a non-empty mapping of names to tensors."""
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    return _validated(_read(path, map_location), path)


def _read_safetensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        weights = load_file(path, device="cpu")
    except Exception as err:  # a bad header, a truncated file, ...: all mean "unusable"
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from err
    if not weights:
        raise CheckpointError(f"{path} holds no tensors")
    return {k: v.to(map_location) for k, v in weights.items()}


def load_checkpoint_or_weights(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], bool]:
    """(contents, is_checkpoint): a modeconn checkpoint, or weights trained elsewhere: a bare
    state_dict saved with torch.save, or a `.safetensors` file (each read once, safely)."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path, map_location), False
    obj = _read(path, map_location)
    if is_state_dict(obj):
        return obj, False
    if not is_modeconn_checkpoint(obj):
        raise CheckpointError(f"{path} is neither a modeconn checkpoint nor a state_dict (a mapping of names to tensors)")
    return _validated(obj, path), True


def _validated(state: Any, path: Path) -> dict[str, Any]:
    if not is_modeconn_checkpoint(state):
        raise CheckpointError(f"{path} is not a modeconn checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; expected {VERSION}")
    for key in ("model", "architecture", "dataset"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}")
    return state


def model_checkpoint(model: torch.nn.Module, architecture: dict, dataset: dict, **extra: Any) -> dict[str, Any]:
    """The fields every checkpoint has, so any of them loads as a plain network."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "architecture": architecture,
        "dataset": dataset,
        **extra,
    }


def read_finished(path: str | Path) -> dict[str, Any] | None:
    """The one "stage finished" convention: a stage writes its final file last and atomically
    (a checkpoint `.pt` or a JSON report), so it has finished exactly when that file loads;
    its contents then, else None (missing, unreadable or not a modeconn file: run it again)."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            contents = json.loads(path.read_text())
            return contents if isinstance(contents, dict) else None
        return load_checkpoint(path)
    except (OSError, ValueError):  # CheckpointError is a ValueError
        return None
