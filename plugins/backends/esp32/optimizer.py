"""Float-graph rewrites a kernel library without BatchNormalization needs: BN folding, Add-bias folding and
a dynamic batch axis.

ESP-DL's quantization toolkit runs the same three steps before calibrating (its overview page,
``espressif/esp-dl`` ``docs/en/tools/quantization-toolkit/quantization-toolkit-overview.rst``: onnxoptimizer's
``fuse_bn_into_conv`` and ``fuse_add_bias_into_conv`` passes, then ``convert_model_batch_to_dynamic``), and
stresses that BN fusion must happen before quantization. onnxoptimizer is not a dependency of ortq, so the
passes are written here on raw protobuf; they are plain functions so other commands (``ortq preprocess``)
can reuse them. Each returns the same (edited) model and never touches a tensor that something else also
reads: folded weights get new initializer names.

The arithmetic, per output channel ``c`` of a Conv (or output column of a Gemm) followed by
``BatchNormalization(scale=g, B=b, mean=m, var=v, epsilon=eps)``::

    s[c]  = g[c] / sqrt(v[c] + eps)
    W'[c] = W[c] * s[c]
    B'[c] = (B[c] - m[c]) * s[c] + b[c]        (B = 0 when the Conv had no bias: one is created)

computed in float64 and stored in the weight's own type.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ortq.graph import FreshNames, GraphIndex
from ortq.rewrite_qdq import drop_unused_constants

__all__ = ["fold_batch_norm", "fold_add_bias", "make_batch_dynamic", "optimize_for_esp_dl"]

log = logging.getLogger(__name__)


class _Graph(GraphIndex):
    """ortq's graph index plus the edits these passes make; rebuilt after every edit (graphs here are small)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model)
        self.fresh = FreshNames(model)

    def constant(self, name: str) -> np.ndarray | None:
        return self.constant_value(name)

    def add_initializer(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: object) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _single_reader(g: _Graph, tensor: str, reader: onnx.NodeProto) -> bool:
    return tensor not in g.graph_outputs and [n.name for n in g.consumers.get(tensor, [])] == [reader.name]


def _weight_axis(node: onnx.NodeProto, weight: np.ndarray) -> int | None:
    """The output-channel axis of a Conv / Gemm weight, or None if this node cannot absorb a per-channel
    affine map exactly."""
    if node.op_type == "Conv":
        return 0 if weight.ndim >= 3 else None
    if node.op_type == "Gemm":
        if weight.ndim != 2 or float(_attr(node, "alpha", 1.0)) == 0.0:
            return None
        return 0 if int(_attr(node, "transB", 0)) else 1
    return None


def _bias_of(g: _Graph, node: onnx.NodeProto, channels: int) -> np.ndarray | None:
    """The node's bias as a length-``channels`` float64 vector (zeros if it has none), or None if the bias
    is not a constant per-channel vector."""
    if len(node.input) < 3 or not node.input[2]:
        return np.zeros(channels)
    c = g.constant(node.input[2])
    if c is None:
        return None
    c = np.asarray(c, dtype=np.float64)
    if node.op_type == "Gemm":
        c = c * float(_attr(node, "beta", 1.0))
        if c.size == 1:
            return np.full(channels, float(c.reshape(-1)[0]))
    if c.shape != (channels,):
        return None
    return c


def _replace_weights(g: _Graph, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray, dtype: np.dtype) -> None:
    w_name = g.add_initializer(f"{node.input[1]}_folded", weight.astype(dtype))
    b_name = g.add_initializer(f"{node.name or node.output[0]}_bias_folded", bias.astype(dtype))
    node.input[1] = w_name
    if len(node.input) < 3:
        node.input.append(b_name)
    else:
        node.input[2] = b_name
    if node.op_type == "Gemm":
        _set_attr(node, "beta", 1.0)


def fold_batch_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold every inference-mode BatchNormalization that directly follows a Conv or Gemm with constant
    weights (and only that Conv/Gemm's output) into it; create a bias where the Conv had none.

    A BN that cannot be folded (after a non-constant weight, a shared output, a training-mode BN) is left in
    place; a target without BN kernels then refuses it by name.
    """
    changed = True
    while changed:
        changed = False
        g = _Graph(model)
        for bn in list(g.graph.node):
            if bn.op_type != "BatchNormalization" or len(bn.input) < 5 or int(_attr(bn, "training_mode", 0)):
                continue
            if len([o for o in bn.output if o]) != 1:
                continue
            producer = g.producer.get(bn.input[0])
            if producer is None or producer.op_type not in ("Conv", "Gemm") or not _single_reader(g, bn.input[0], bn):
                continue
            weight = g.constant(producer.input[1]) if len(producer.input) > 1 else None
            stats = [g.constant(x) for x in bn.input[1:5]]
            if weight is None or any(s is None for s in stats) or weight.dtype.kind != "f":
                continue
            axis = _weight_axis(producer, weight)
            if axis is None:
                continue
            channels = weight.shape[axis]
            gamma, beta, mean, var = (np.asarray(s, dtype=np.float64).reshape(-1) for s in stats)
            if not all(v.size == channels for v in (gamma, beta, mean, var)):
                continue
            bias = _bias_of(g, producer, channels)
            if bias is None:
                continue
            scale = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
            shape = [1] * weight.ndim
            shape[axis] = channels
            w64 = weight.astype(np.float64) * scale.reshape(shape)
            if producer.op_type == "Gemm":
                w64 = w64 * float(_attr(producer, "alpha", 1.0))
                _set_attr(producer, "alpha", 1.0)
            _replace_weights(g, producer, w64, (bias - mean) * scale + beta, weight.dtype)
            producer.output[0] = bn.output[0]
            g.graph.node.remove(bn)
            log.debug("folded BatchNormalization %r into %s %r", bn.name, producer.op_type, producer.name)
            changed = True
            break
    drop_unused_constants(model.graph)
    return model


def fold_add_bias(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold ``Conv(x, W[, B]) + c`` into the Conv's bias when ``c`` is a constant per-output-channel vector
    (shape [C], [C, 1, 1] or [1, C, 1, 1]) and the Add is the Conv output's only reader
    (onnxoptimizer's ``fuse_add_bias_into_conv``)."""
    changed = True
    while changed:
        changed = False
        g = _Graph(model)
        for add in list(g.graph.node):
            if add.op_type != "Add" or len(add.input) != 2:
                continue
            for side in (0, 1):
                conv = g.producer.get(add.input[side])
                const = g.constant(add.input[1 - side])
                if conv is None or conv.op_type != "Conv" or const is None or not _single_reader(g, add.input[side], add):
                    continue
                weight = g.constant(conv.input[1]) if len(conv.input) > 1 else None
                if weight is None or weight.ndim < 3 or weight.dtype.kind != "f":
                    continue
                channels = weight.shape[0]
                squeezed = _per_channel(np.asarray(const, dtype=np.float64), channels, weight.ndim)
                if squeezed is None:
                    continue
                bias = _bias_of(g, conv, channels)
                if bias is None:
                    continue
                _replace_weights(g, conv, weight.astype(np.float64), bias + squeezed, weight.dtype)
                conv.output[0] = add.output[0]
                g.graph.node.remove(add)
                changed = True
                break
            if changed:
                break
    drop_unused_constants(model.graph)
    return model


def _per_channel(c: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``c`` as a length-``channels`` vector if it broadcasts per channel against an [N, C, ...] tensor of
    rank ``rank`` ([C, 1, ...], [1, C, 1, ...] or a scalar), else None. A 1-D [C] broadcasts along the last
    axis, not the channels, so it does not qualify."""
    if c.size == 1 and c.ndim <= rank:
        return np.full(channels, float(c.reshape(-1)[0]))
    if c.size != channels or c.ndim not in (rank - 1, rank):
        return None
    axis = 0 if c.ndim == rank - 1 else 1
    if c.shape[axis] != channels or (c.ndim == rank and c.shape[0] != 1):
        return None
    return c.reshape(-1)


def make_batch_dynamic(model: onnx.ModelProto, dim_param: str = "batch") -> onnx.ModelProto:
    """Make axis 0 of every graph input and output symbolic (ESP-DL's ``convert_model_batch_to_dynamic``).

    Stale intermediate shapes are dropped (shape inference recomputes them), and a Reshape whose constant
    target starts with the old fixed batch size gets 0 there ("copy the input's dimension") so it follows
    the new batch. An input that is also an initializer (an overridable constant) is left alone.
    """
    g = model.graph
    inits = {i.name for i in g.initializer}
    fixed: set[int] = set()
    for vi in (*g.input, *g.output):
        if vi.name in inits or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 0:
            continue
        if dims[0].HasField("dim_value"):
            fixed.add(dims[0].dim_value)
        dims[0].Clear()
        dims[0].dim_param = dim_param
    if fixed:
        del g.value_info[:]
        _reshape_follow_batch(model, fixed)
    return model


def _reshape_follow_batch(model: onnx.ModelProto, fixed: set[int]) -> None:
    g = _Graph(model)
    for node in g.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or int(_attr(node, "allowzero", 0)):
            continue
        target = g.constant(node.input[1])
        if target is None or target.ndim != 1 or target.size < 2 or int(target[0]) not in fixed or 0 in target[1:]:
            continue
        new = target.copy()
        new[0] = 0
        node.input[1] = g.add_initializer(f"{node.input[1]}_dynamic_batch", new)
    drop_unused_constants(model.graph)


def optimize_for_esp_dl(model: onnx.ModelProto) -> onnx.ModelProto:
    """The toolkit's optimizer step: BN folding, Add-bias folding, dynamic batch."""
    return make_batch_dynamic(fold_add_bias(fold_batch_norm(model)))
