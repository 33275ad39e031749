"""curve.onnx on onnxruntime's fast CPU convolutions, with w(t) still computed per call.

onnxruntime runs a CPU Conv in its blocked layout (NCHWc, MLAS's fastest kernels) only
when the weights are constant initializers: a graph transformer reorders them once at
load. curve.onnx computes w(t) from t on every call, so its convolutions took the plain
im2col path, 2-3x slower at batch 64 on 2 cores (benchmarks/results/curve_inference-*).
The blocked kernel (com.microsoft.nchwc Conv) reads its weights as an ordinary input; it
needs them in its layout, not constant. `nchwc_graph` rewrites each Conv whose weights
come from the control points (w(t) = c(t) @ points, split per layer, as CurveGraph exports):

  points -> the conv's columns stored in the blocked order, once: w(t) comes out blocked
  w(t)   -> BN folded in when the Conv feeds one BatchNormalization (w * s, s = gamma /
            sqrt(var + eps) per output channel; bias beta - mean * s)
  x      -> ReorderInput -> nchwc Conv (bias; a following Relu fused) -> ReorderOutput

The folding adds 8 small ops per BN (vectors of the channel count, one product with the
weights): about 0.1 ms per call on the demo, which batch 1 pays and batch 64 gets back
(benchmarks/results/curve_inference-*, ways (n) and (n0)). The block size is MLAS's on this
CPU: `block_size()` lets onnxruntime optimize a small constant-weight conv and reads the
layout it chose; None (no NCHWc on this CPU, or a layout not recognised) means no rewrite.
Only convolutions onnxruntime itself would block are rewritten (one group; output channels
a multiple of the block; input channels a multiple of it, or fewer, read unblocked);
others stay as they are. The caller checks the rewritten graph against curve.onnx before
serving it (serving/runtime.py).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .fixed_t import _downstream

logger = logging.getLogger(f"bentoml.serve.{__name__}")

NCHWC = "com.microsoft.nchwc"
_BLOCKED = (0, 2, 4, 5, 3, 1)  # [Co/B, B, Ci/B, B, H, W] -> OIHWBiBo: [Co/B, Ci/B, H, W, Bi, Bo]
_BLOCKED_OUT = (0, 2, 3, 4, 1)  # [Co/B, B, Ci, H, W] -> OIHWBo (input read unblocked)


def blocked_filter(w: np.ndarray, block: int) -> np.ndarray:
    """A [Co, Ci, H, W] filter in the layout of onnxruntime's NCHWc Conv (numpy, for the probe)."""
    co, ci, kh, kw = w.shape
    if ci % block == 0:
        return w.reshape(co // block, block, ci // block, block, kh, kw).transpose(_BLOCKED).reshape(w.shape)
    return w.reshape(co // block, block, ci, kh, kw).transpose(_BLOCKED_OUT).reshape(w.shape)


@functools.cache
def block_size() -> int | None:
    """MLAS's NCHWc block size here, read from what onnxruntime makes of a constant-weight conv."""
    import onnxruntime as ort

    channels = 64
    w = np.arange(channels * channels, dtype=np.float32).reshape(channels, channels, 1, 1)  # distinct values
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, channels, 2, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    with tempfile.TemporaryDirectory(prefix="modeconn-nchwc-") as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "probe.onnx")
        options.log_severity_level = 3  # its warning: the saved graph fits this CPU only (what we ask)
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    inits = {i.name: numpy_helper.to_array(i) for i in optimized.graph.initializer}
    convs = [n for n in optimized.graph.node if n.domain == NCHWC and n.op_type == "Conv"]
    if not convs or convs[0].input[1] not in inits:
        return None
    got = inits[convs[0].input[1]]
    for block in (4, 8, 16, 32, 64):
        if np.array_equal(got, blocked_filter(w, block)):
            return block
    logger.warning("onnxruntime's NCHWc filter layout was not recognised: the curve graph runs as exported")
    return None


class _Graph:
    """The nodes and initializers of the rewritten graph, with fresh names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"nchwc_{self._count}_{stem}"

    def const(self, values: list[int] | list[float], dtype: type = np.int64) -> str:
        name = self.name("const")
        self.inits.append(numpy_helper.from_array(np.array(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, domain: str = "", **attrs: Any) -> str:
        out = output or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out


def nchwc_graph(path: Path, block: int, fold_bn: bool = True) -> bytes | None:
    """curve.onnx with its t-computed convolutions in the blocked layout, or None when none qualifies."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.value_info, *graph.input, *graph.output]}
    shapes.update({i.name: list(i.dims) for i in graph.initializer})
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    outputs = {o.name for o in graph.output}
    x_dependent = _downstream(graph, "x")

    def only_consumer(name: str, op_type: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        if name in outputs or len(users) != 1 or users[0].op_type != op_type or users[0].input[0] != name:
            return None
        return users[0]

    points: dict[str, np.ndarray] = {}  # control points with some columns in the blocked order
    plans: dict[int, Callable[[_Graph], None]] = {}  # id of the last node a conv absorbs -> its replacement
    absorbed: set[int] = set()  # ids of the convs and the BatchNormalization / Relu nodes they absorb
    for node in graph.node:
        w_shape = shapes.get(node.input[1], []) if node.op_type == "Conv" else []
        where = _weight_columns(node.input[1], producers, consumers, inits, shapes) if w_shape else None
        if where is None or node.input[0] not in x_dependent or not _blockable(node, w_shape, block):
            continue
        name, first = where
        if name not in points:
            points[name] = numpy_helper.to_array(inits[name]).copy()
        size = int(np.prod(w_shape))
        order = blocked_filter(np.arange(size).reshape(_as_2d(w_shape)), block).ravel()
        points[name][:, first:first + size] = points[name][:, first + order]
        last, bn = node, only_consumer(node.output[0], "BatchNormalization")
        if bn is not None and (not fold_bn or len(bn.output) != 1 or any(i in x_dependent for i in bn.input[1:])):
            bn = None
        last = bn or last
        relu = only_consumer(last.output[0], "Relu")
        last = relu or last
        absorbed.update(id(n) for n in (node, bn, relu) if n is not None)
        plans[id(last)] = functools.partial(_blocked_conv, conv=node, w_shape=w_shape, block=block, bn=bn,
                                            relu=relu is not None, output=last.output[0])
    out = _Graph()
    for node in graph.node:  # the replacement where the last absorbed node was: all its inputs exist there
        if id(node) in plans:
            plans[id(node)](out)
        elif id(node) not in absorbed:
            out.nodes.append(node)
    if not points:
        return None
    initializers = [numpy_helper.from_array(points[i.name], i.name) if i.name in points else i
                    for i in graph.initializer]
    new = helper.make_graph(out.nodes, graph.name, list(graph.input), list(graph.output), [*initializers, *out.inits])
    opsets = [o for o in model.opset_import if o.domain != NCHWC] + [helper.make_opsetid(NCHWC, 1)]
    return helper.make_model(new, opset_imports=opsets, ir_version=model.ir_version).SerializeToString()


def every_bn_folded(graph: bytes) -> bool:
    """Whether `nchwc_graph` folded every BatchNormalization into a convolution (post-activation
    networks; a pre-activation BN, before its conv, stays)."""
    return all(n.op_type != "BatchNormalization" for n in onnx.load_from_string(graph).graph.node)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _as_2d(w_shape: list[int]) -> list[int]:
    return [*w_shape[:2], 1, w_shape[2]] if len(w_shape) == 3 else list(w_shape)


def _weight_columns(
    w: str, producers: dict[str, onnx.NodeProto], consumers: dict[str, list[onnx.NodeProto]],
    inits: dict[str, onnx.TensorProto], shapes: dict[str, list[int]],
) -> tuple[str, int] | None:
    """(control points, first column) of a conv weight computed as CurveGraph exports it,
    Reshape(Split(MatMul(coefficients, points))[i]), every link used by this conv alone: its
    columns of the points can then be stored in the blocked order, at no cost per call."""
    reshape = producers.get(w)
    if reshape is None or reshape.op_type != "Reshape" or len(consumers.get(w, [])) != 1:
        return None
    part = reshape.input[0]
    split = producers.get(part)
    if split is None or split.op_type != "Split" or len(consumers.get(part, [])) != 1 or len(split.input) < 2:
        return None
    matmul = producers.get(split.input[0])
    if matmul is None or matmul.op_type != "MatMul" or len(consumers.get(matmul.output[0], [])) != 1:
        return None
    name = matmul.input[1]
    rank = len(shapes.get(matmul.output[0], []))
    if name not in inits or len(inits[name].dims) != 2 or split.input[1] not in inits or len(consumers[name]) != 1:
        return None
    if not rank or _attrs(split).get("axis", 0) % rank != rank - 1:  # the split must cut the points' columns
        return None
    sizes = numpy_helper.to_array(inits[split.input[1]])
    return name, int(sizes[: list(split.output).index(part)].sum())


def _blockable(node: onnx.NodeProto, w_shape: list[int], block: int) -> bool:
    """What onnxruntime's own NCHWc transformer would block (without padding channels)."""
    attrs = _attrs(node)
    if len(w_shape) not in (3, 4) or 0 in w_shape or attrs.get("group", 1) != 1:
        return False
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return False
    co, ci = w_shape[0], w_shape[1]
    return co % block == 0 and (ci % block == 0 or ci < block)


def _blocked_conv(
    g: _Graph, conv: onnx.NodeProto, w_shape: list[int], block: int, bn: onnx.NodeProto | None, relu: bool,
    output: str,
) -> None:
    """conv (+ bn, + relu) as ReorderInput -> nchwc Conv -> ReorderOutput, writing `output`;
    the conv's weights arrive in the blocked order (`_weight_columns`)."""
    attrs = _attrs(conv)
    one_d = len(w_shape) == 3
    co, ci, *kernel = _as_2d(w_shape)
    x, w, *rest = conv.input
    bias = rest[0] if rest and rest[0] else None
    if one_d:  # [N, C, L] as [N, C, 1, L]: the blocked kernels are 2D
        x = g.op("Unsqueeze", [x, g.const([2])])
    blocked = not ci % block
    if bn is not None:  # y = (conv - mean) * s + beta, s = gamma / sqrt(var + eps): into w and bias
        gamma, beta, mean, var = bn.input[1:5]
        eps = g.const([_attrs(bn).get("epsilon", 1e-5)], np.float32)
        s = g.op("Div", [gamma, g.op("Sqrt", [g.op("Add", [var, eps])])])
        # s along the output channels of the blocked layout: [Co/B, (Ci/B,) Ci', H, W, Bo]
        split = [co // block, *([ci // block, *kernel, block] if blocked else [ci, *kernel]), block]
        ones = [1] * (len(split) - 2)
        w = g.op("Mul", [g.op("Reshape", [w, g.const(split)]), g.op("Reshape", [s, g.const([co // block, *ones, block])])])
        shift = g.op("Mul", [mean, s]) if bias is None else g.op("Mul", [g.op("Sub", [mean, bias]), s])
        bias = g.op("Sub", [beta, shift])
    w = g.op("Reshape", [w, g.const([co, ci, *kernel])])
    if blocked:  # else fewer input channels than a block: the kernel reads the input unblocked
        x = g.op("ReorderInput", [x], domain=NCHWC, channels_last=0)
    pads = attrs.get("pads", [0] * 2 * len(w_shape[2:]))
    conv_attrs = {
        "pads": [0, pads[0], 0, pads[1]] if one_d else list(pads),
        "strides": [1, *attrs.get("strides", [1])] if one_d else list(attrs.get("strides", [1, 1])),
        "dilations": [1, *attrs.get("dilations", [1])] if one_d else list(attrs.get("dilations", [1, 1])),
        "kernel_shape": kernel,
        "group": 1,
    }
    if relu:
        conv_attrs["activation"] = "Relu"
    y = g.op("Conv", [x, w, *([bias] if bias else [])], domain=NCHWC, **conv_attrs)
    if one_d:
        y = g.op("ReorderOutput", [y], domain=NCHWC, channels=co, channels_last=0)
        g.op("Squeeze", [y, g.const([2])], output=output)
    else:
        g.op("ReorderOutput", [y], output=output, domain=NCHWC, channels=co, channels_last=0)


CHECK_TS = (0.0, 0.37, 1.0)
CHECK_ATOL = 1e-4  # float32 rounding differs by up to 1.3e-5 (demo curve); a wrong layout by ~0.1


def largest_difference(
    blocked: Any, exported: Any, input_shape: tuple[int, ...], value_range: tuple[float, float], n: int = 16
) -> float:
    """Max |probabilities| difference of two curve sessions on `n` seeded inputs across the input
    range, at CHECK_TS: what the service compares before it serves the rewritten graph."""
    x = np.random.default_rng(0).uniform(*value_range, size=(n, *input_shape)).astype(np.float32)
    worst = 0.0
    for t in CHECK_TS:
        feed = {"x": x, "t": np.array([t], dtype=np.float32)}
        diff = np.abs(blocked.run(["probabilities"], feed)[0] - exported.run(["probabilities"], feed)[0]).max()
        worst = max(worst, float(diff))
    return worst
