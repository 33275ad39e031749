"""Load and verify an exported artifact folder (the contract is docs/manifest.md).

`load_artifact(path)` reads `manifest.json`, validates it with the one manifest model
(modeconn/contract/manifest.py: fields, types, files inside the folder, graphs listed), and checks that
every file listed under `files` exists with the recorded byte size and sha256. Anything wrong
raises `ArtifactError` naming the file or field and what differs. The exporter calls the same
function to verify what it wrote; this module needs no torch.

An artifact comes from a model store, so it is untrusted: nothing it names may lead out of
its folder. Entries must be relative paths without `..`, no file (or folder on the way) may
be a symbolic link that resolves outside the folder, and every graph must be ONNX whose
external tensor data, if any, is a file listed under `files` (so inside and verified).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from modeconn.contract.errors import ModeconnError
from modeconn.contract.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    FileRecord,
    Manifest,
    ManifestError,
    parse_manifest,
)
from modeconn.contract.onnx_refs import NotOnnx, external_data


class ArtifactError(ModeconnError):
    """The artifact folder does not match its manifest (or the manifest is malformed)."""


# A manifest of a thousand members is a few hundred KB; anything far larger, or nested
# deeper than the format ever nests (about 6 levels), is malformed or hostile, and is refused
# before parsing (size) or before validation (depth) rather than ending in a RecursionError.
MAX_MANIFEST_BYTES = 4 << 20
MAX_MANIFEST_DEPTH = 32


@dataclass(frozen=True)
class Artifact:
    """A verified artifact: resolved paths plus the manifest fields serving needs."""

    root: Path
    manifest: dict[str, Any]  # the raw manifest, for the model card
    spec: Manifest  # the same, validated (modeconn/contract/manifest.py)
    name: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    input_dtype: str
    input_range: tuple[float, float]
    member_files: tuple[Path, ...]
    ensemble_file: Path
    curve_file: Path | None
    swa_file: Path | None = None  # the averaged network's graph (manifest `swa`), when exported

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_members(self) -> int:
        return len(self.member_files)

    @property
    def has_curve(self) -> bool:
        return self.curve_file is not None

    @property
    def has_swa(self) -> bool:
        return self.swa_file is not None

    @property
    def models(self) -> list[str]:
        """What /predict's `model` may name for this artifact."""
        return ["ensemble", "swa"] if self.has_swa else ["ensemble"]


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks (members can be hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """The `files` entry for one file: {"sha256": ..., "bytes": ...} (used by the exporter)."""
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "Artifact", "ArtifactError", "file_record", "load_artifact"]


def load_artifact(path: str | Path) -> Artifact:
    """Read and verify the artifact folder at `path`; raise ArtifactError on any mismatch."""
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST_NAME} (is this an exported artifact folder?)")
    real_root = root.resolve()
    _check_inside(real_root, root, MANIFEST_NAME)
    raw = _read_manifest(manifest_path)
    try:
        spec = parse_manifest(raw)  # every field, type and cross-reference (modeconn/contract/manifest.py)
    except ManifestError as exc:
        raise ArtifactError(f"{manifest_path}: {exc}") from None

    for rel, record in spec.files.items():
        _verify_file(root, real_root, rel, record)
    graphs = [m.file for m in spec.members] + [spec.ensemble.file] + ([spec.curve.file] if spec.curve else [])
    graphs += [spec.swa.file] if spec.swa else []
    for rel in graphs:
        _check_graph(root, rel, spec.files)

    return Artifact(
        root=root,
        manifest=raw,
        spec=spec,
        name=spec.name,
        class_names=tuple(spec.dataset.class_names),
        input_shape=tuple(spec.input.shape),
        input_dtype=spec.input.dtype,
        input_range=(spec.input.range[0], spec.input.range[1]),
        member_files=tuple(root / m.file for m in spec.members),
        ensemble_file=root / spec.ensemble.file,
        curve_file=None if spec.curve is None else root / spec.curve.file,
        swa_file=None if spec.swa is None else root / spec.swa.file,
    )


def _read_manifest(path: Path) -> Any:
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: {size} bytes; a manifest has at most {MAX_MANIFEST_BYTES}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:  # the C decoder's limit on nesting
        raise ArtifactError(f"{path}: nested deeper than {MAX_MANIFEST_DEPTH} levels") from None
    if (depth := _depth(raw, MAX_MANIFEST_DEPTH)) > MAX_MANIFEST_DEPTH:
        raise ArtifactError(f"{path}: nested {depth}+ levels deep; a manifest has at most {MAX_MANIFEST_DEPTH}")
    return raw


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of decoded JSON, without recursion, stopping once past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _check_inside(real_root: Path, root: Path, rel: str) -> None:
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(real_root):
        raise ArtifactError(
            f"{root}: {rel!r} leads through a symbolic link to {resolved}, outside the artifact folder"
        )


def _verify_file(root: Path, real_root: Path, rel: str, record: FileRecord) -> None:
    path = root / rel
    _check_inside(real_root, root, rel)  # before reading it: a link out is not ours to read
    if not path.is_file():
        raise ArtifactError(f"{root}: file {rel!r} is listed in the manifest but missing")
    size = path.stat().st_size
    if size != record.bytes:
        raise ArtifactError(f"{root}: file {rel!r} has {size} bytes; the manifest says {record.bytes}")
    actual = file_sha256(path)
    if actual != record.sha256:
        raise ArtifactError(f"{root}: file {rel!r} has sha256 {actual}; the manifest says {record.sha256}")


def _check_graph(root: Path, rel: str, files: dict[str, FileRecord]) -> None:
    """`rel` is ONNX, and any external tensor data it names is a file under `files`."""
    try:
        refs = external_data(root / rel)
    except NotOnnx as exc:
        raise ArtifactError(f"{root}: file {rel!r} is not an ONNX model ({exc})") from None
    for ref in refs:
        where = f"{root}: graph {rel!r}, tensor {ref.tensor!r}: external data"
        if not ref.location:
            raise ArtifactError(f"{where} names no location")
        location = PurePosixPath(ref.location)
        if location.is_absolute() or ".." in location.parts or "\\" in ref.location:
            raise ArtifactError(f"{where} at {ref.location!r} is outside the artifact folder")
        # onnxruntime reads the location relative to the graph's own folder
        target = (PurePosixPath(rel).parent / location).as_posix()
        if target not in files:
            raise ArtifactError(
                f"{where} at {ref.location!r} is not listed under 'files' (so not verified)"
            )
