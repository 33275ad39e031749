"""Permutation groups of a network, derived from its forward pass (torch.fx), not written by hand.

Hidden units can be permuted without changing what a network computes, provided every weight
that touches a unit moves with it. `derive_spec` traces the network (torch.fx symbolic_trace,
with shape-dependent branches such as cnn1d's `if x.dim() == 2` decided on an example input),
records the shapes (ShapeProp), and walks the graph:

- every conv/linear output starts a group (its weight's dim 0 and bias); the layer's weight
  dim 1 follows the group of its input;
- BatchNorm (weight, bias, running_mean, running_var), LayerNorm (weight and bias when it
  normalises dim 1), activations, pooling, dropout and identity carry their input's group (pre-activation BN before a conv acts on that conv's
  input channels, which is the group of whatever produced them);
- flatten of [N, C, L...] carries the group with each channel expanded to a block of prod(L);
- an elementwise binary op between two tensors (residual additions) *unions* their groups
  (union-find), so every block a residual stream joins shares one permutation;
- the network input and the network output are "fixed" (never permuted): a group unioned with
  them is not permuted (e.g. the classifier's output units).

An op the walk does not know, applied to a permuted tensor, is refused with an error naming the
node, rather than guessed. Nothing here is hand-written per architecture.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from modeconn.contract.errors import ModeconnError


class PermutationSpecError(ModeconnError):
    """The network's graph has an op whose effect on channels the derivation cannot decide."""


@dataclass(frozen=True)
class Axis:
    """Dim `dim` of state_dict entry `key` is permuted by a group; each unit of the group spans
    `block` consecutive entries (block > 1 after a flatten of C x L)."""

    key: str
    dim: int
    block: int = 1


@dataclass
class PermutationSpec:
    """Groups (name -> number of units) and, per group, the axes it permutes."""

    sizes: dict[str, int] = field(default_factory=dict)
    axes: dict[str, list[Axis]] = field(default_factory=dict)

    def key_axes(self) -> dict[str, list[tuple[str, Axis]]]:
        """state_dict key -> [(group, axis)], the view a permutation is applied through."""
        out: dict[str, list[tuple[str, Axis]]] = {}
        for group, axes in self.axes.items():
            for axis in axes:
                out.setdefault(axis.key, []).append((group, axis))
        return out

    def describe(self) -> dict[str, int]:
        return dict(self.sizes)


# ---------------------------------------------------------------- tracing
class _ExampleTracer(fx.Tracer):
    """symbolic_trace, except that a branch on a traced value (e.g. `x.dim() == 2`) is decided
    by running the graph so far on the example input; the graph is then valid for inputs of
    the example's shape, which is all the walk needs."""

    def __init__(self, example: torch.Tensor) -> None:
        super().__init__()
        self.example = example

    def to_bool(self, obj: fx.Proxy) -> bool:
        partial = fx.Graph()
        values: dict[fx.Node, fx.Node] = {}
        partial.graph_copy(self.graph, values)
        partial.output(values[obj.node])
        with torch.no_grad():
            return bool(_Eager(fx.GraphModule(self.root, partial)).run(self.example))


class _Eager(fx.Interpreter):
    """Runs a graph while a trace is under way: modules through .forward, since the tracer has
    patched nn.Module.__call__ until it finishes."""

    def call_module(self, target, args, kwargs):  # noqa: ANN001, ANN201 (fx's signature)
        return self.fetch_attr(target).forward(*args, **kwargs)


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The network's graph with every node's output shape (node.meta['tensor_meta'])."""
    was_training = model.training
    model.eval()  # shape propagation must not move BN running statistics
    try:
        tracer = _ExampleTracer(example)
        try:
            graph = tracer.trace(model)
        except Exception as err:  # noqa: BLE001 (fx raises many kinds): say which step failed
            raise PermutationSpecError(f"cannot trace {type(model).__name__} with torch.fx: {err}") from err
        module = fx.GraphModule(model, graph)
        with torch.no_grad():
            ShapeProp(module).propagate(example)
    finally:
        model.train(was_training)
    return module


# ---------------------------------------------------------------- the walk
FIXED = 0  # union-find element of the unpermuted channels (network input and output)

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_F = torch.nn.functional
_PASS_FUNCTIONS = {
    torch.relu, _F.relu, torch.sigmoid, torch.tanh, _F.gelu, _F.leaky_relu, _F.dropout,
    _F.max_pool1d, _F.max_pool2d, _F.max_pool3d, _F.avg_pool1d, _F.avg_pool2d, _F.avg_pool3d,
    _F.adaptive_avg_pool1d, _F.adaptive_avg_pool2d, _F.adaptive_avg_pool3d,
    _F.adaptive_max_pool1d, _F.adaptive_max_pool2d, _F.adaptive_max_pool3d,
}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
_ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.mul, operator.truediv,
                torch.add, torch.sub, torch.mul}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


@dataclass(frozen=True)
class _Label:
    """Where a tensor's dim 1 comes from: a union-find element and the block per unit."""

    element: int
    block: int = 1


class _Walk:
    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module
        self.modules = dict(module.named_modules())
        self.parent = [FIXED]
        self.created: dict[int, str] = {}  # element -> the layer whose output made it
        self.sizes: dict[int, int] = {}
        self.records: list[tuple[int, Axis]] = []
        self.layer_element: dict[str, int] = {}  # a layer called twice keeps one group
        self.labels: dict[fx.Node, _Label] = {}

    # union-find
    def find(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the fixed element (0) or the older group stays the root
            ra, rb = min(ra, rb), max(ra, rb)
            self.parent[rb] = ra
        return ra

    def new(self, name: str, size: int) -> int:
        self.parent.append(len(self.parent))
        e = len(self.parent) - 1
        self.created[e], self.sizes[e] = name, size
        return e

    # helpers
    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.all_input_nodes if n in self.labels]

    def permuted(self, label: _Label) -> bool:
        return self.find(label.element) != self.find(FIXED)

    def refuse(self, node: fx.Node, why: str) -> PermutationSpecError:
        where = f"layer {node.target!r}" if node.op == "call_module" else f"node {node.name!r} ({node.op} {node.target})"
        return PermutationSpecError(f"cannot derive permutation groups at {where}: {why}")

    def single(self, node: fx.Node) -> _Label:
        inputs = self.tensor_inputs(node)
        if len(inputs) != 1:
            raise self.refuse(node, f"expected one tensor input, got {len(inputs)}")
        return self.labels[inputs[0]]

    # the rules
    def run(self) -> None:
        for node in self.module.graph.nodes:
            if node.op == "placeholder":
                self.labels[node] = _Label(FIXED)
            elif node.op == "output":
                for n in self.tensor_inputs(node):  # the network's outputs are never permuted
                    self.union(self.labels[n].element, FIXED)
            elif node.op == "get_attr":
                self.labels[node] = _Label(FIXED)  # a constant: unpermuted, so it fixes what it joins
            elif self.shape(node) is None:
                continue  # not a tensor (x.dim(), x.size(0), ...): carries no channels
            elif node.op == "call_module":
                self.labels[node] = self.module_rule(node)
            else:
                self.labels[node] = self.function_rule(node)

    def module_rule(self, node: fx.Node) -> _Label:
        name, layer = str(node.target), self.modules[str(node.target)]
        if isinstance(layer, _LAYERS):
            return self.layer(node, name, layer)
        if isinstance(layer, _NORMS):
            label = self.single(node)
            for key in ("weight", "bias", "running_mean", "running_var"):
                if getattr(layer, key, None) is not None:
                    self.records.append((label.element, Axis(f"{name}.{key}", 0, label.block)))
            return label
        if isinstance(layer, nn.LayerNorm):
            return self.layer_norm(node, name, layer)
        if isinstance(layer, _PASS_MODULES):
            return self.single(node)
        if isinstance(layer, nn.Flatten):
            return self.flatten(node, self.single(node), layer.start_dim, layer.end_dim)
        return self.unknown(node)

    def layer(self, node: fx.Node, name: str, layer: nn.Module) -> _Label:
        label = self.single(node)
        inp = self.shape(node.all_input_nodes[0]) or ()
        if isinstance(layer, nn.Linear) and len(inp) != 2:
            raise self.refuse(node, f"a Linear on a {len(inp)}-d input (only [N, features] is understood)")
        if not isinstance(layer, nn.Linear):
            if layer.groups != 1:
                raise self.refuse(node, f"grouped convolution (groups={layer.groups}) is not supported")
            if label.block != 1:
                raise self.refuse(node, "a convolution after a flatten")
        out_units = layer.weight.shape[0]
        if name in self.layer_element:
            element = self.layer_element[name]
        else:
            element = self.layer_element[name] = self.new(name, out_units)
        self.records.append((element, Axis(f"{name}.weight", 0)))
        if layer.bias is not None:
            self.records.append((element, Axis(f"{name}.bias", 0)))
        self.records.append((label.element, Axis(f"{name}.weight", 1, label.block)))
        return _Label(element)

    def layer_norm(self, node: fx.Node, name: str, layer: nn.LayerNorm) -> _Label:
        """Mean and variance over the normalised dims do not change when units are permuted: over the
        trailing dims only (not dim 1), LayerNorm acts per unit and carries the group as it is; over
        dims 1.. it carries it with its affine weight and bias permuted along dim 0."""
        label = self.single(node)
        shape = self.shape(node.all_input_nodes[0]) or ()
        if len(layer.normalized_shape) < len(shape) - 1:
            return label
        for key in ("weight", "bias"):
            if getattr(layer, key, None) is not None:
                self.records.append((label.element, Axis(f"{name}.{key}", 0, label.block)))
        return label

    def function_rule(self, node: fx.Node) -> _Label:
        target = node.target
        if (node.op == "call_function" and target in _PASS_FUNCTIONS) or (
                node.op == "call_method" and target in _PASS_METHODS):
            return self.single_first(node)
        if (node.op == "call_function" and target in _ELEMENTWISE) or (
                node.op == "call_method" and target in _ELEMENTWISE_METHODS):
            return self.elementwise(node)
        if node.op == "call_function" and target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, self.single_first(node), start, end)
        if node.op == "call_method" and target in _FLATTEN_METHODS:
            return self.flatten_like(node)
        return self.unknown(node)

    def single_first(self, node: fx.Node) -> _Label:
        """The label of args[0] (the tensor an op like relu or dropout acts on)."""
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node) or first not in self.labels:
            raise self.refuse(node, "its first argument is not a tensor of the network")
        others = [n for n in self.tensor_inputs(node) if n is not first and self.permuted(self.labels[n])]
        if others:
            raise self.refuse(node, "a second permuted tensor argument")
        return self.labels[first]

    def elementwise(self, node: fx.Node) -> _Label:
        inputs = self.tensor_inputs(node)
        if len(inputs) == 1:  # with a number: channels unchanged
            return self.labels[inputs[0]]
        shapes = {self.shape(n) for n in inputs}
        if len(shapes) != 1:
            if any(self.permuted(self.labels[n]) for n in inputs):
                raise self.refuse(node, f"broadcasting between shapes {sorted(shapes)}")
            return _Label(FIXED)
        blocks = {self.labels[n].block for n in inputs}
        if len(blocks) != 1:
            raise self.refuse(node, "adds tensors flattened from different layouts")
        element = self.labels[inputs[0]].element
        for n in inputs[1:]:  # a residual addition: both sides share one permutation
            element = self.union(element, self.labels[n].element)
        return _Label(element, blocks.pop())

    def flatten(self, node: fx.Node, label: _Label, start: int, end: int) -> _Label:
        shape = self.shape(node.all_input_nodes[0])
        assert shape is not None
        ndim = len(shape)
        start, end = start % ndim, end % ndim
        if start >= 2 or start == end:  # spatial dims only (or nothing): channels untouched
            return label
        if not self.permuted(label):
            return _Label(FIXED)
        if start == 0:
            raise self.refuse(node, "a flatten that merges the batch and channel dims")
        if end != ndim - 1:
            raise self.refuse(node, f"flatten(start_dim={start}, end_dim={end}) of a {ndim}-d tensor")
        return _Label(label.element, label.block * math.prod(shape[2:]))

    def flatten_like(self, node: fx.Node) -> _Label:
        label = self.single_first(node)
        inp, out = self.shape(node.all_input_nodes[0]), self.shape(node)
        assert inp is not None and out is not None
        if node.target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, label, start, end)
        if not self.permuted(label):
            return _Label(FIXED)
        if len(inp) >= 2 and out == (inp[0], math.prod(inp[1:])):  # x.view(x.size(0), -1)
            return self.flatten(node, label, 1, -1)
        if out == inp:
            return label
        raise self.refuse(node, f"a {node.target} from {list(inp)} to {list(out)}")

    def unknown(self, node: fx.Node) -> _Label:
        """An op the walk does not know: fine on unpermuted tensors, refused on permuted ones."""
        if any(self.permuted(self.labels[n]) for n in self.tensor_inputs(node)):
            what = type(self.modules[str(node.target)]).__name__ if node.op == "call_module" else str(node.target)
            raise self.refuse(node, f"{what} on permuted channels is not understood")
        if node.op == "call_module" and any(True for _ in self.modules[str(node.target)].parameters()):
            raise self.refuse(node, f"{type(self.modules[str(node.target)]).__name__} has parameters the "
                                    "derivation does not know how to permute")
        return _Label(FIXED)

    def spec(self, state: dict[str, torch.Tensor]) -> PermutationSpec:
        names: dict[int, str] = {}
        for element in sorted(self.created):  # a group is named after its first layer
            root = self.find(element)
            if root != self.find(FIXED):
                names.setdefault(root, self.created[element])
        spec = PermutationSpec()
        for root, name in names.items():
            spec.sizes[name] = self.sizes[root]
            spec.axes[name] = []
        for element, axis in self.records:
            root = self.find(element)
            if root not in names:
                continue
            name = names[root]
            if axis.key not in state:
                raise PermutationSpecError(f"permutation group {name!r} touches {axis.key!r}, which is not in the "
                                           "network's state_dict")
            length = state[axis.key].shape[axis.dim]
            if length != spec.sizes[name] * axis.block:
                raise PermutationSpecError(f"{axis.key} dim {axis.dim} has {length} entries; permutation group "
                                           f"{name!r} expects {spec.sizes[name]} x {axis.block}")
            if axis not in spec.axes[name]:
                spec.axes[name].append(axis)
        return spec


def derive_spec(model: nn.Module, example: torch.Tensor) -> PermutationSpec:
    """The permutation groups of `model` (see the module docstring), traced on `example`
    (a batch of the model's inputs; its values do not matter, its shape does)."""
    walk = _Walk(trace(model, example))
    walk.run()
    return walk.spec(model.state_dict())


def example_input(input_shape: Sequence[int], batch: int = 2) -> torch.Tensor:
    """A batch of zeros of a data set's input shape, to trace with."""
    return torch.zeros((batch, *input_shape))
