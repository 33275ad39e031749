"""The curve at a fixed t as fast as a member graph: sessions whose weights w(t) are constants.

`curve.onnx` computes the weights and BN statistics from `t` inside the graph on every call,
so onnxruntime cannot prepack its convolutions (NCHWc layout) or fold BN into them, and its
1D convolutions run as 1D (the member graphs run them as 2D of height 1, onnxruntime's fast
CPU kernels). `CurveSplit` cuts the graph once, at load, in two:

- the t-part: every node that does not depend on `x` (coefficients, w(t) = c(t) @ points,
  the reshapes and splits, the BN hat weights times the grid, any constants); a small
  session that maps t to the tensors the x-part reads ("boundary" tensors), run once per t;
- the x-part: the rest, with each 1D Conv rewritten as Unsqueeze -> 2D Conv -> Squeeze, and
  the boundary tensors as initializers. Built as a session per t: onnxruntime then folds
  and prepacks the constant weights like a member graph's.

Both parts are the exported graph's own nodes, so w(t) and the BN interpolation are
computed exactly as curve.onnx computes them (docs/manifest.md), with no second copy of
the formulas. A t not cached runs on the general session: on the CPU, curve.onnx with its
convolutions rewritten for the blocked kernels and BN folded in, w(t) still computed per
call (serving/nchwc.py; 1.2x a member graph at batch 64 on the demo). Where that rewrite
folds every BN, the split is made of the rewritten graph instead (serving/runtime.py), so a
cached t answers bit for bit what the general session does. `FixedTCache` keeps the most
recently used fixed-t sessions, bounded.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(f"bentoml.serve.{__name__}")

_AXIS2 = "modeconn_fixed_t_axis2"  # the int64 [2] initializer the rewritten convs use


class CurveSplit:
    """curve.onnx cut into its t-part and x-part (module docstring)."""

    def __init__(self, source: Path | bytes) -> None:
        model = onnx.load(str(source)) if isinstance(source, Path) else onnx.load_from_string(source)
        graph = model.graph
        self._opset, self._ir = list(model.opset_import), model.ir_version
        x_dependent = _downstream(graph, "x")
        x_nodes = [n for n in graph.node if any(o in x_dependent for o in n.output)]
        t_nodes = [n for n in graph.node if not any(o in x_dependent for o in n.output)]
        # what the t-part computes (from t, or constants) and the x-part reads
        computed = {o for n in t_nodes for o in n.output}
        self.boundary = sorted({i for n in x_nodes for i in n.input if i in computed})
        self._inits = {i.name: i for i in graph.initializer}
        self._x_input = [i for i in graph.input if i.name == "x"]
        self._t_input = [i for i in graph.input if i.name == "t"]
        self._outputs = list(graph.output)
        self._x_nodes = _convs_as_2d(x_nodes)
        self._t_nodes = t_nodes
        axis = numpy_helper.from_array(np.array([2], dtype=np.int64), _AXIS2)
        self._x_inits = [self._inits[k] for k in _inputs_of(self._x_nodes) if k in self._inits]
        self._x_inits = [i for i in self._x_inits if i.name not in self.boundary]
        if _AXIS2 in _inputs_of(self._x_nodes):  # only where a 1D conv was rewritten
            self._x_inits.append(axis)
        t_graph = helper.make_graph(
            t_nodes,
            "curve_t_part",
            self._t_input,
            [helper.make_tensor_value_info(b, onnx.TensorProto.FLOAT, None) for b in self.boundary],
            [self._inits[k] for k in _inputs_of(t_nodes) if k in self._inits],
        )
        self.t_part = self._model(t_graph)

    def fixed(self, boundary_values: Iterable[np.ndarray]) -> bytes:
        """The x-part with the boundary tensors of one t as constants (serialized ONNX)."""
        constants = [
            numpy_helper.from_array(np.asarray(v), name)
            for name, v in zip(self.boundary, boundary_values, strict=True)
        ]
        graph = helper.make_graph(
            self._x_nodes, "curve_fixed_t", self._x_input, self._outputs, [*self._x_inits, *constants]
        )
        return self._model(graph)

    def _model(self, graph: onnx.GraphProto) -> bytes:
        model = helper.make_model(graph, opset_imports=self._opset, ir_version=self._ir)
        return model.SerializeToString()


def _downstream(graph: onnx.GraphProto, name: str) -> set[str]:
    """Every tensor computed (directly or not) from graph input `name` (nodes are topological)."""
    found = {name}
    for node in graph.node:
        if any(i in found for i in node.input):
            found.update(node.output)
    return found


def _inputs_of(nodes: Iterable[onnx.NodeProto]) -> list[str]:
    return list(dict.fromkeys(i for n in nodes for i in n.input if i))


def _convs_as_2d(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Each 1D Conv (explicit pads, as torch exports them) as Unsqueeze -> Conv2d -> Squeeze
    over a height-1 axis: the same numbers through onnxruntime's 2D kernels (as
    training/export/graphs.py's Conv2dOfHeight1 does for the member graphs)."""
    out: list[onnx.NodeProto] = []
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        one_d = node.op_type == "Conv" and len(attrs.get("pads", ())) == 2
        if not one_d or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            out.append(node)
            continue
        x, w, *bias = node.input
        (y,) = node.output
        two_d = {
            "group": attrs.get("group", 1),
            "pads": [0, attrs["pads"][0], 0, attrs["pads"][1]],
            "strides": [1, *attrs.get("strides", [1])],
            "dilations": [1, *attrs.get("dilations", [1])],
        }
        if "kernel_shape" in attrs:
            two_d["kernel_shape"] = [1, *attrs["kernel_shape"]]
        out += [
            helper.make_node("Unsqueeze", [x, _AXIS2], [f"{y}__x2d"]),
            helper.make_node("Unsqueeze", [w, _AXIS2], [f"{y}__w2d"]),
            helper.make_node("Conv", [f"{y}__x2d", f"{y}__w2d", *bias], [f"{y}__2d"], **two_d),
            helper.make_node("Squeeze", [f"{y}__2d", _AXIS2], [y]),
        ]
    return out


@dataclass
class CacheStats:
    capacity: int
    size: int = 0
    hits: int = 0
    misses: int = 0
    builds: int = 0
    evictions: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def t_key(t: float) -> float:
    """The cache key of t: its float32 value, the t the graphs compute with."""
    return float(np.float32(t))


class FixedTCache:
    """At most `capacity` fixed-t sessions, least recently used dropped first.

    `get(t)` answers a cached session or None. A miss never waits for a build: the request
    runs on the general graph. When the same t has missed `build_after` times (default 2:
    it was asked for before), its session is built in a background thread, one build at a
    time, and later requests at that t find it. Building on the first miss would spend a
    build (several session runs' worth of CPU, benchmarks/results/curve_inference-*) on
    every t of a client that never repeats one, slowing the requests it serves meanwhile.
    `build_now(t)` builds in the calling thread (preloading at start).
    """

    def __init__(self, build: Callable[[float], Any], capacity: int, build_after: int = 2) -> None:
        if capacity < 0 or build_after < 1:
            raise ValueError(f"curve cache: capacity must be >= 0 ({capacity}), build_after >= 1 ({build_after})")
        self._build = build
        self.build_after = build_after
        self._sessions: OrderedDict[float, Any] = OrderedDict()
        self._misses: OrderedDict[float, int] = OrderedDict()  # t -> misses so far, bounded
        self._max_tracked = max(64, 4 * capacity)
        self._building: float | None = None
        self._lock = threading.Lock()
        self.stats = CacheStats(capacity=capacity)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fixed-t-build")

    def get(self, t: float) -> Any | None:
        key = t_key(t)
        with self._lock:
            session = self._sessions.get(key)
            if session is not None:
                self._sessions.move_to_end(key)
                self.stats.hits += 1
                return session
            self.stats.misses += 1
            if not self.stats.capacity:
                return None
            misses = self._misses.pop(key, 0) + 1
            if misses >= self.build_after and self._building is None:
                self._building = key
                self._executor.submit(self._build_in_background, key)
            else:
                self._misses[key] = misses  # most recent last; the oldest are forgotten
                while len(self._misses) > self._max_tracked:
                    self._misses.popitem(last=False)
        return None

    def build_now(self, t: float) -> Any:
        key = t_key(t)
        session = self._build(key)
        self._insert(key, session)
        return session

    def keys(self) -> list[float]:
        """Cached t values, least recently used first."""
        with self._lock:
            return list(self._sessions)

    def close(self, wait: bool = False) -> None:
        """No more builds; with `wait`, once the build under way (if any) has landed."""
        self._executor.shutdown(wait=wait, cancel_futures=not wait)

    def _build_in_background(self, key: float) -> None:
        try:
            self._insert(key, self._build(key))
        except Exception:  # the general graph keeps answering this t
            logger.exception("building the fixed-t session for t=%s failed", key)
        finally:
            with self._lock:
                self._building = None

    def _insert(self, key: float, session: Any) -> None:
        with self._lock:
            if not self.stats.capacity:
                return
            self.stats.builds += 1
            self._sessions[key] = session
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.stats.capacity:
                self._sessions.popitem(last=False)
                self.stats.evictions += 1
            self.stats.size = len(self._sessions)
