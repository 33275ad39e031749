"""What a command works from: run folders or checkpoint files turned into member checkpoints,
and the one check that several networks can be combined (ensembled, joined by a curve,
exported or averaged together)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modeconn.contract.errors import ModeconnError


def run_members(path: Path, error: type[ModeconnError]) -> list[Path]:
    """A checkpoint file as given; a run folder stands for its snapshots (FGE/SSE) or its final.pt."""
    path = Path(path)
    if path.is_dir():
        snapshots = sorted((path / "snapshots").glob("snapshot-*.pt"))
        if snapshots:
            return snapshots
        if (path / "final.pt").is_file():
            return [path / "final.pt"]
        raise error(f"{path} is not a finished run: it has neither snapshots/snapshot-*.pt nor final.pt")
    if not path.is_file():
        raise error(f"checkpoint {path} does not exist")
    return [path]


def check_same_network(named_states: Sequence[tuple[Path, dict[str, Any]]], error: type[ModeconnError]) -> None:
    """Every checkpoint is the same architecture (name and settings) trained on the same data
    (name and number of classes) as the first; else `error` naming the file that differs."""
    first_path, first = named_states[0]
    for path, state in named_states[1:]:
        if state["architecture"] != first["architecture"]:
            raise error(f"mixed architectures: {path} is {state['architecture']}, "
                        f"{first_path} is {first['architecture']}: they differ")
        for key in ("name", "num_classes"):
            if state["dataset"].get(key) != first["dataset"].get(key):
                raise error(f"mixed data sets: {path} has dataset {key} {state['dataset'].get(key)!r}, "
                            f"{first_path} has {first['dataset'].get(key)!r}: they differ")
