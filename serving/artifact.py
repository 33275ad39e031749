"""Load and verify an exported artifact folder (the contract is docs/manifest.md).

`load_artifact(path)` reads `manifest.json`, checks its fields, and checks that every file
listed under `files` exists with the recorded byte size and sha256. Anything wrong raises
`ArtifactError` naming the file and what differs. The exporter calls the same function to
verify what it wrote, so this module imports only the standard library.

An artifact comes from a model store, so it is untrusted: nothing it names may lead out of
its folder. Entries must be relative paths without `..`, no file (or folder on the way) may
be a symbolic link that resolves outside the folder, and every graph must be ONNX whose
external tensor data, if any, is a file listed under `files` (so inside and verified).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from serving.errors import ModeconnError
from serving.onnx_refs import NotOnnx, external_data

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(ModeconnError):
    """The artifact folder does not match its manifest (or the manifest is malformed)."""


@dataclass(frozen=True)
class Artifact:
    """A verified artifact: resolved paths plus the manifest fields serving needs."""

    root: Path
    manifest: dict[str, Any]  # the raw manifest, for the model card
    name: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    input_dtype: str
    input_range: tuple[float, float]
    member_files: tuple[Path, ...]
    ensemble_file: Path
    curve_file: Path | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_members(self) -> int:
        return len(self.member_files)

    @property
    def has_curve(self) -> bool:
        return self.curve_file is not None


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


def load_artifact(path: str | Path, *, verify_hashes: bool = True) -> Artifact:
    """Read and verify the artifact folder at `path`; raise ArtifactError on any mismatch."""
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST_NAME} (is this an exported artifact folder?)")
    real_root = root.resolve()
    _check_inside(real_root, root, MANIFEST_NAME)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: the top level must be a JSON object")

    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: format_version is {version!r}; this loader reads {FORMAT_VERSION}"
        )

    ctx = str(manifest_path)
    name = _get(manifest, "name", str, ctx)
    if not name:
        raise ArtifactError(f"{ctx}: name is empty")
    _get(manifest, "created_at", str, ctx)
    _get(manifest, "versions", dict, ctx)
    architecture = _get(manifest, "architecture", dict, ctx)
    _get(architecture, "name", str, f"{ctx}: architecture")

    dataset = _get(manifest, "dataset", dict, ctx)
    num_classes = _get(dataset, "num_classes", int, f"{ctx}: dataset")
    class_names = _get(dataset, "class_names", list, f"{ctx}: dataset")
    if num_classes < 1 or len(class_names) != num_classes:
        raise ArtifactError(
            f"{ctx}: dataset.class_names has {len(class_names)} entries; "
            f"dataset.num_classes is {num_classes}"
        )
    if not all(isinstance(c, str) for c in class_names):
        raise ArtifactError(f"{ctx}: dataset.class_names must be strings")

    inp = _get(manifest, "input", dict, ctx)
    shape = _get(inp, "shape", list, f"{ctx}: input")
    if not shape or not all(type(d) is int and d > 0 for d in shape):
        raise ArtifactError(f"{ctx}: input.shape must be a non-empty list of positive ints")
    dtype = _get(inp, "dtype", str, f"{ctx}: input")
    if dtype != "float32":
        raise ArtifactError(f"{ctx}: input.dtype is {dtype!r}; only 'float32' is supported")
    value_range = _get(inp, "range", list, f"{ctx}: input")
    if (
        len(value_range) != 2
        or not all(_is_number(v) and math.isfinite(v) for v in value_range)
        or not value_range[0] < value_range[1]
    ):
        raise ArtifactError(f"{ctx}: input.range must be [low, high] with finite low < high")

    files = _get(manifest, "files", dict, ctx)
    if not files:
        raise ArtifactError(f"{ctx}: files is empty")
    for rel, record in files.items():
        _check_file_record(rel, record, ctx)

    members = _get(manifest, "members", list, ctx)
    if not members:
        raise ArtifactError(f"{ctx}: members is empty")
    member_files = []
    for i, member in enumerate(members):
        if not isinstance(member, dict):
            raise ArtifactError(f"{ctx}: members[{i}] must be an object")
        member_files.append(_listed_file(member, files, f"{ctx}: members[{i}]"))
        _get(member, "metrics", dict, f"{ctx}: members[{i}]")

    ensemble = _get(manifest, "ensemble", dict, ctx)
    ensemble_file = _listed_file(ensemble, files, f"{ctx}: ensemble")
    num_members = _get(ensemble, "num_members", int, f"{ctx}: ensemble")
    if num_members != len(members):
        raise ArtifactError(
            f"{ctx}: ensemble.num_members is {num_members} but members lists {len(members)}"
        )
    _get(ensemble, "metrics", dict, f"{ctx}: ensemble")

    if "curve" not in manifest:
        raise ArtifactError(f"{ctx}: missing field 'curve' (null when no curve was exported)")
    curve = manifest["curve"]
    curve_file = None
    if curve is not None:
        if not isinstance(curve, dict):
            raise ArtifactError(f"{ctx}: curve must be an object or null")
        curve_file = _listed_file(curve, files, f"{ctx}: curve")
        _get(curve, "type", str, f"{ctx}: curve")
        _get(curve, "num_bends", int, f"{ctx}: curve")
        _get(curve, "metrics", dict, f"{ctx}: curve")

    for rel, record in files.items():
        _verify_file(root, real_root, rel, record, verify_hashes)
    for rel in (*member_files, ensemble_file, *([curve_file] if curve_file else [])):
        _check_graph(root, rel, files)

    return Artifact(
        root=root,
        manifest=manifest,
        name=name,
        class_names=tuple(class_names),
        input_shape=tuple(shape),
        input_dtype=dtype,
        input_range=(float(value_range[0]), float(value_range[1])),
        member_files=tuple(root / f for f in member_files),
        ensemble_file=root / ensemble_file,
        curve_file=None if curve_file is None else root / curve_file,
    )


def _is_number(v: Any) -> bool:
    return type(v) in (int, float)  # bool is an int subclass; `type` keeps it out


def _get(obj: dict[str, Any], key: str, typ: type, ctx: str) -> Any:
    if key not in obj:
        raise ArtifactError(f"{ctx}: missing field {key!r}")
    value = obj[key]
    if type(value) is not typ:  # exact type, so `true` is not accepted as an int
        raise ArtifactError(f"{ctx}: field {key!r} must be {typ.__name__}, got {value!r:.80}")
    return value


def _check_file_record(rel: Any, record: Any, ctx: str) -> None:
    pure = PurePosixPath(rel)
    # The manifest is data from a model store: never let it point outside its folder.
    if pure.is_absolute() or ".." in pure.parts or "\\" in rel or not pure.parts:
        raise ArtifactError(f"{ctx}: files entry {rel!r} is not a relative path inside the folder")
    if not isinstance(record, dict):
        raise ArtifactError(f"{ctx}: files[{rel!r}] must be an object with sha256 and bytes")
    sha = record.get("sha256")
    if not isinstance(sha, str) or not _SHA256_HEX.match(sha):
        raise ArtifactError(f"{ctx}: files[{rel!r}].sha256 must be 64 lowercase hex digits")
    size = record.get("bytes")
    if type(size) is not int or size < 0:
        raise ArtifactError(f"{ctx}: files[{rel!r}].bytes must be a non-negative int")


def _listed_file(section: dict[str, Any], files: dict[str, Any], ctx: str) -> str:
    rel = _get(section, "file", str, ctx)
    if rel not in files:
        raise ArtifactError(f"{ctx}: file {rel!r} is not listed under 'files' (so not verified)")
    return rel


def _check_inside(real_root: Path, root: Path, rel: str) -> None:
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(real_root):
        raise ArtifactError(
            f"{root}: {rel!r} leads through a symbolic link to {resolved}, outside the artifact folder"
        )


def _verify_file(
    root: Path, real_root: Path, rel: str, record: dict[str, Any], verify_hashes: bool
) -> None:
    path = root / rel
    _check_inside(real_root, root, rel)  # before reading it: a link out is not ours to read
    if not path.is_file():
        raise ArtifactError(f"{root}: file {rel!r} is listed in the manifest but missing")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ArtifactError(
            f"{root}: file {rel!r} has {size} bytes; the manifest says {record['bytes']}"
        )
    if verify_hashes:
        actual = file_sha256(path)
        if actual != record["sha256"]:
            raise ArtifactError(
                f"{root}: file {rel!r} has sha256 {actual}; the manifest says {record['sha256']}"
            )


def _check_graph(root: Path, rel: str, files: dict[str, Any]) -> None:
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
