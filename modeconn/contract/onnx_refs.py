"""What an ONNX file points at outside itself (external tensor data), read with the
standard library only, so the artifact loader can refuse a graph whose weights live
outside the artifact folder before onnxruntime opens it.

ONNX is a protobuf `ModelProto`; a tensor stored outside the file has `data_location =
EXTERNAL` and an `external_data` entry `location` relative to the model file's folder
(onnx/onnx.proto). This walks every place a tensor can sit (initializers, sparse
initializers, node attributes, subgraphs, functions, training graphs) and skips all
other fields by their length, so large `raw_data` is never copied.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# The graph metadata (ModelProto.metadata_props) key under which the exporter stores the class
# names as a JSON list; the service's start-up check compares them with the manifest's.
CLASS_NAMES_KEY = "modeconn.class_names"

# message -> {field number: message kind of that field}; only fields that lead to a tensor.
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MODEL_GRAPH = 7
_MAX_DEPTH = 64  # nested subgraphs; a deeper file is malformed or hostile


class NotOnnx(ValueError):
    """The bytes are not a protobuf ModelProto with a graph."""


@dataclass(frozen=True)
class ExternalRef:
    tensor: str
    location: str | None  # None: marked EXTERNAL but names no location


def external_data(path: Path) -> list[ExternalRef]:
    """Every tensor in the ONNX file at `path` whose data lives in another file."""
    with path.open("rb") as f:
        if path.stat().st_size == 0:
            raise NotOnnx("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                refs: list[ExternalRef] = []
                has_graph = False
                for field, start, end in _messages(buf, 0, len(buf)):
                    has_graph |= field == _MODEL_GRAPH
                    kind = _CHILDREN["model"].get(field)
                    if kind is not None:
                        _walk(buf, start, end, kind, refs, 1)
                if not has_graph:
                    raise NotOnnx("no graph in it")
                return refs
            finally:
                buf.release()


def _walk(buf: memoryview, start: int, end: int, kind: str, refs: list[ExternalRef], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise NotOnnx(f"messages nested deeper than {_MAX_DEPTH}")
    if kind == "tensor":
        _tensor(buf, start, end, refs)
        return
    children = _CHILDREN[kind]
    for field, s, e in _messages(buf, start, end):
        if field in children:
            _walk(buf, s, e, children[field], refs, depth + 1)


def _tensor(buf: memoryview, start: int, end: int, refs: list[ExternalRef]) -> None:
    name, location, external = "", None, False
    for field, wire, value, s, e in _fields(buf, start, end):
        if field == _TENSOR_NAME and wire == 2:
            name = _text(buf, s, e)
        elif field == _TENSOR_LOCATION and wire == 0:
            external |= value == _EXTERNAL
        elif field == _TENSOR_EXTERNAL and wire == 2:
            external = True
            # StringStringEntryProto: key = 1, value = 2
            entry = {f: _text(buf, s2, e2) for f, w, _, s2, e2 in _fields(buf, s, e) if w == 2}
            if entry.get(1) == "location":
                location = entry.get(2, "")
    if external:
        refs.append(ExternalRef(name, location))


def _messages(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field, start, end) of the length-delimited fields in buf[start:end]."""
    for field, wire, _, s, e in _fields(buf, start, end):
        if wire == 2:
            yield field, s, e


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field, wire type, varint value, start, end) of each field in buf[pos:end]."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise NotOnnx("field number 0")
        value, start = 0, pos
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, start = _varint(buf, pos, end)
            pos = start + length
        elif wire == 5:
            pos += 4
        else:  # 3/4 are proto2 groups, which ONNX never uses; 6/7 do not exist
            raise NotOnnx(f"wire type {wire} at byte {pos}")
        if pos > end:
            raise NotOnnx(f"a field runs past the end of its message at byte {start}")
        yield field, wire, value, start, pos


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise NotOnnx(f"a truncated or overlong varint at byte {pos}")


def _text(buf: memoryview, start: int, end: int) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotOnnx(f"a string that is not UTF-8 at byte {start}") from exc
