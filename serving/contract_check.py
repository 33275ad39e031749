"""The start-up check that an artifact's graphs are what its manifest says they are.

Every graph (members, ensemble, SWA network, curve) is opened once on the CPU and held to
the manifest: its input `x` declares the manifest's `input.shape` after the batch axis, its
outputs declare as many classes as `dataset.class_names` has (where the dimension is fixed),
the class names it carries in its metadata (the exporter writes them under CLASS_NAMES_KEY)
are the manifest's, and one run on a batch of zeros answers outputs of exactly the promised
shapes (which also covers graphs whose class axis is symbolic). A graph that disagrees
raises ArtifactError naming the graph and both values, before any worker starts: served, it
would answer labels from the wrong list, or fail on every request.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modeconn.contract.artifact import Artifact, ArtifactError
from modeconn.contract.onnx_refs import CLASS_NAMES_KEY

from .runtime import CURVE_IO, ENSEMBLE_IO, SWA_IO, SessionSettings, open_session

_CHECK_ROWS = 2


@dataclass(frozen=True)
class GraphContract:
    """What one graph must be: its file, its I/O names, and the shape of each output after
    the batch axes (`member_probabilities` has the members' axis first)."""

    rel: str
    inputs: set[str]
    outputs: dict[str, tuple[int, ...]]  # output -> expected shape for a batch of _CHECK_ROWS


def graph_contracts(artifact: Artifact) -> list[GraphContract]:
    """The contract of every graph of `artifact`."""
    c, n, k = artifact.num_classes, _CHECK_ROWS, artifact.num_members
    one = {"probabilities": (n, c)}
    contracts = [GraphContract(_rel(artifact, f), SWA_IO[0], one) for f in artifact.member_files]
    contracts.append(GraphContract(_rel(artifact, artifact.ensemble_file), ENSEMBLE_IO[0],
                                   {"probabilities": (n, c), "member_probabilities": (k, n, c)}))
    if artifact.swa_file is not None:
        contracts.append(GraphContract(_rel(artifact, artifact.swa_file), SWA_IO[0], one))
    if artifact.curve_file is not None:
        contracts.append(GraphContract(_rel(artifact, artifact.curve_file), CURVE_IO[0], one))
    return contracts


def check_contract(artifact: Artifact) -> None:
    """Hold every graph of `artifact` to its manifest; ArtifactError on the first mismatch."""
    for contract in graph_contracts(artifact):
        check_graph(artifact, contract)


def check_graph(artifact: Artifact, contract: GraphContract) -> None:
    session = open_session(artifact.root / contract.rel, ["CPUExecutionProvider"], SessionSettings(1, False),
                           contract.inputs, set(contract.outputs))
    where = f"graph {contract.rel!r}"
    _check_declared_input(session, artifact.input_shape, where)
    _check_declared_outputs(session, contract, where)
    _check_class_names(session, artifact.class_names, where)
    _check_run(session, artifact, contract, where)


def _check_declared_input(session: ort.InferenceSession, shape: tuple[int, ...], where: str) -> None:
    (x,) = [i for i in session.get_inputs() if i.name == "x"]
    declared = x.shape[1:]
    if len(declared) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(declared, shape, strict=False)):
        raise ArtifactError(f"{where}: input 'x' has shape {_dims(x.shape)}; the manifest's input.shape is "
                            f"{list(shape)} (so [N, {', '.join(map(str, shape))}])")


def _check_declared_outputs(session: ort.InferenceSession, contract: GraphContract, where: str) -> None:
    declared = {o.name: o.shape for o in session.get_outputs()}
    for name, expected in contract.outputs.items():
        classes = declared[name][-1] if declared[name] else None
        if isinstance(classes, int) and classes != expected[-1]:
            raise ArtifactError(f"{where}: output {name!r} has {classes} classes (shape {_dims(declared[name])}); "
                                f"the manifest's dataset.class_names has {expected[-1]}")


def _check_class_names(session: ort.InferenceSession, names: Sequence[str], where: str) -> None:
    stored = session.get_modelmeta().custom_metadata_map.get(CLASS_NAMES_KEY)
    if stored is None:  # graphs exported before the names were stored
        return
    try:
        graph_names = json.loads(stored)
    except json.JSONDecodeError:
        raise ArtifactError(f"{where}: metadata {CLASS_NAMES_KEY!r} is not JSON") from None
    if graph_names != list(names):
        raise ArtifactError(f"{where}: class names {_short(graph_names)}; "
                            f"the manifest's dataset.class_names is {_short(list(names))}")


def _check_run(session: ort.InferenceSession, artifact: Artifact, contract: GraphContract, where: str) -> None:
    feeds = {"x": np.zeros((_CHECK_ROWS, *artifact.input_shape), np.float32)}
    if "t" in contract.inputs:
        feeds["t"] = np.array([0.5], np.float32)
    names = list(contract.outputs)
    try:
        outputs = session.run(names, feeds)
    except Exception as exc:  # onnxruntime's run errors share no base class below Exception
        raise ArtifactError(f"{where}: does not run on input shape {[_CHECK_ROWS, *artifact.input_shape]} "
                            f"(the manifest's input.shape): {str(exc).splitlines()[0]}") from None
    for name, out in zip(names, outputs, strict=True):
        if out.shape != contract.outputs[name]:
            raise ArtifactError(f"{where}: output {name!r} has shape {list(out.shape)} for {_CHECK_ROWS} inputs; "
                                f"the manifest promises {list(contract.outputs[name])} "
                                f"({artifact.num_classes} class names, {artifact.num_members} members)")


def _rel(artifact: Artifact, path: Path) -> str:
    return path.relative_to(artifact.root).as_posix()


def _dims(shape: Sequence[object]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else "N" if i == 0 else str(d) for i, d in enumerate(shape)) + "]"


def _short(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"
