"""Float-graph rewrites that make a model quantize better: BatchNormalization and bias-Add folding into the
linear node before them, constant folding, and a dynamic batch axis.

Why before quantization: a BatchNormalization after a Conv is a per-channel affine map that ONNX Runtime has
no integer kernel for, so the Conv's output is quantized (per tensor) *before* the BN rescales each channel,
and the channels BN amplifies lose their resolution. Folded, the per-channel scale lives in the weights,
which are quantized per channel. A node computing only on constants (a Transpose or Cast of a weight) hides
the weight from the quantizer, which recognises weights as initializers.

``ortq preprocess`` runs all of these; the esp32 backend's ``prepare`` runs the folding and dynamic-batch
passes (ESP-DL's optimizer step). onnxoptimizer is not a dependency, so the passes work on raw protobuf. Each
edits the model in place and returns how many rewrites it made. A pass never edits a tensor that something
else also reads: folded weights and biases are new initializers, and unused ones are dropped at the end.

The folding arithmetic, per output channel ``c`` of a Conv (output column of a Gemm / MatMul) followed by
``BatchNormalization(scale=g, B=b, mean=m, var=v, epsilon=eps)``::

    s[c]  = g[c] / sqrt(v[c] + eps)
    W'[c] = W[c] * s[c]
    B'[c] = (B[c] - m[c]) * s[c] + b[c]        (B = 0 when the node had no bias: one is created)

computed in float64 and stored in the weight's own type. A MatMul with a constant 2-D weight and a 2-D
input becomes a Gemm to carry the bias.
"""

from __future__ import annotations

import logging
from typing import Collection, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ortq.core.graph import FreshNames, GraphIndex, drop_unused_constants, node_label, subgraph_references

__all__ = [
    "fold_batch_norm", "fold_add_bias", "fold_constants", "make_batch_dynamic", "constant_foldable_nodes",
    "foldable_batch_norms", "LINEAR_OPS", "MAX_FOLDED_BYTES",
]

log = logging.getLogger(__name__)

#: Nodes a following BatchNormalization or constant Add can be folded into.
LINEAR_OPS: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")

#: Constant folding never writes a tensor larger than this, nor one more than twice its inputs' size
#: (Expand, Tile or ConstantOfShape would otherwise turn a few bytes of shape into megabytes of model).
MAX_FOLDED_BYTES = 64 * 2**20
_SMALL_BYTES = 64 * 1024

#: Ops never folded: random or quantization ops (folding a DequantizeLinear would undo a quantized weight),
#: and ops whose output may be far larger than their inputs unless shape inference knows its size.
_NEVER_FOLD = frozenset({
    "Constant", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "RandomNormal", "RandomUniform",
    "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})
_MAY_GROW = frozenset({
    "ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot", "EyeLike", "CenterCropPad",
})


class _Graph(GraphIndex):
    """ortq's graph index plus the edits these passes make."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model)
        self.fresh = FreshNames(model)
        # The index lists the main graph's readers only; an If/Loop/Scan body may read a tensor by name too.
        self.subgraph_reads = subgraph_references(model.graph)

    def add_initializer(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def single_reader(self, tensor: str, reader: onnx.NodeProto) -> bool:
        """Only ``reader`` sees ``tensor``, so folding may rename or rescale it."""
        readers = self.consumers.get(tensor, [])
        return (
            tensor not in self.graph_outputs and tensor not in self.subgraph_reads
            and len(readers) == 1 and readers[0] is reader
        )

    def rank(self, tensor: str) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)


def _set_attr(node: onnx.NodeProto, name: str, value: object) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


# ---------------------------------------------------------------------------------------------------------
# BatchNormalization and bias-Add folding


def _weight(g: _Graph, node: onnx.NodeProto) -> np.ndarray | None:
    if len(node.input) < 2 or not node.input[1]:
        return None
    w = g.constant_value(node.input[1])
    return w if w is not None and w.dtype.kind == "f" else None


def _channel_axis(g: _Graph, node: onnx.NodeProto, weight: np.ndarray) -> int | None:
    """The weight axis holding the node's output channels (the BN / bias axis of its output), or None if
    the node cannot absorb a per-channel affine map exactly."""
    op = node.op_type
    if op == "Conv":
        return 0 if weight.ndim >= 3 else None
    if op == "ConvTranspose":
        # Weight [C_in, C_out / group, k...]: with groups the output channel is spread over two axes.
        return 1 if weight.ndim >= 3 and int(g.attribute(node, "group", 1)) == 1 else None
    if op == "Gemm":
        if weight.ndim != 2 or float(g.attribute(node, "alpha", 1.0)) == 0.0:
            return None
        return 0 if int(g.attribute(node, "transB", 0)) else 1
    if op == "MatMul":
        # Only a 2-D product: its output [M, N] has channels on axis 1, where BN and a Gemm bias put them.
        return 1 if weight.ndim == 2 and g.rank(node.input[0]) == 2 else None
    return None


def _output_channels(g: _Graph, node: onnx.NodeProto, weight: np.ndarray, axis: int) -> int:
    if node.op_type == "ConvTranspose":
        return weight.shape[1] * int(g.attribute(node, "group", 1))
    return weight.shape[axis]


def _bias_of(g: _Graph, node: onnx.NodeProto, channels: int) -> np.ndarray | None:
    """The node's bias as a float64 vector of ``channels`` (zeros if it has none), or None if its bias is
    not a constant per-channel vector."""
    if node.op_type == "MatMul" or len(node.input) < 3 or not node.input[2]:
        return np.zeros(channels)
    c = g.constant_value(node.input[2])
    if c is None:
        return None
    c = np.asarray(c, dtype=np.float64)
    if node.op_type == "Gemm":
        c = c * float(g.attribute(node, "beta", 1.0))
        if c.size == 1:
            return np.full(channels, float(c.reshape(-1)[0]))
        if c.shape == (1, channels):
            return c.reshape(-1)
    return c if c.shape == (channels,) else None


def _set_bias(g: _Graph, node: onnx.NodeProto, bias: np.ndarray, dtype: np.dtype) -> None:
    """Give ``node`` this bias (a new initializer); a MatMul becomes the equivalent Gemm to hold it."""
    name = g.add_initializer(f"{node.name or node.output[0]}_bias_folded", bias.astype(dtype))
    if node.op_type == "MatMul":
        node.op_type = "Gemm"
        del node.attribute[:]
    if len(node.input) < 3:
        node.input.append(name)
    else:
        node.input[2] = name
    if node.op_type == "Gemm":
        _set_attr(node, "beta", 1.0)


def foldable_batch_norms(model: onnx.ModelProto, into: Iterable[str] = LINEAR_OPS) -> list[onnx.NodeProto]:
    """The inference-mode BatchNormalization nodes right after one of ``into`` with a constant weight, which
    :func:`fold_batch_norm` folds unless the shapes disagree (a cheap check: it does not read the weights)."""
    g = _Graph(model)
    return [bn for bn, _ in _bn_candidates(g, frozenset(into))]


def _bn_candidates(g: _Graph, into: frozenset[str]) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto]]:
    for bn in list(g.graph.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.input) < 5:
            continue
        if int(g.attribute(bn, "training_mode", 0)) or len([o for o in bn.output if o]) != 1:
            continue
        producer = g.producer.get(bn.input[0])
        if producer is None or producer.op_type not in into or producer.domain not in ("", "ai.onnx"):
            continue
        weight = producer.input[1] if len(producer.input) > 1 else ""
        if g.single_reader(bn.input[0], bn) and all(g.is_constant(x) for x in (weight, *bn.input[1:5])):
            yield bn, producer


def fold_batch_norm(model: onnx.ModelProto, into: Iterable[str] = LINEAR_OPS) -> int:
    """Fold every inference-mode BatchNormalization that directly follows a node of ``into`` (Conv,
    ConvTranspose, Gemm, 2-D MatMul) with a constant weight, and is that node's only reader, into it.

    A BN that cannot be folded (after a non-constant weight, a shared output, a training-mode BN) is left in
    place. Returns the number of BatchNormalization nodes removed.
    """
    into = frozenset(into)
    folded = 0
    while True:  # a second sweep catches BN after BN
        g = _Graph(model)
        before = folded
        for bn, producer in list(_bn_candidates(g, into)):
            if g.producer.get(bn.input[0]) is not producer:
                continue
            if _fold_one_bn(g, bn, producer):
                g.producer[bn.output[0]] = producer
                folded += 1
        if folded == before:
            break
    drop_unused_constants(model.graph)
    return folded


def _fold_one_bn(g: _Graph, bn: onnx.NodeProto, producer: onnx.NodeProto) -> bool:
    weight = _weight(g, producer)
    if weight is None:
        return False
    axis = _channel_axis(g, producer, weight)
    if axis is None:
        return False
    channels = _output_channels(g, producer, weight, axis)
    raw = [g.constant_value(x) for x in bn.input[1:5]]
    if any(v is None for v in raw):
        return False
    stats = [np.asarray(v, dtype=np.float64).reshape(-1) for v in raw]
    gamma, beta, mean, var = stats
    if not all(v.size == channels for v in stats):
        return False
    bias = _bias_of(g, producer, channels)
    if bias is None:
        return False
    scale = gamma / np.sqrt(var + float(g.attribute(bn, "epsilon", 1e-5)))
    shape = [1] * weight.ndim
    shape[axis] = channels
    w64 = weight.astype(np.float64) * scale.reshape(shape)
    if producer.op_type == "Gemm":
        w64 = w64 * float(g.attribute(producer, "alpha", 1.0))
        _set_attr(producer, "alpha", 1.0)
    producer.input[1] = g.add_initializer(f"{producer.input[1]}_folded", w64.astype(weight.dtype))
    _set_bias(g, producer, (bias - mean) * scale + beta, weight.dtype)
    producer.output[0] = bn.output[0]
    g.graph.node.remove(bn)
    log.debug("folded BatchNormalization %s into %s", node_label(bn), node_label(producer))
    return True


def fold_add_bias(model: onnx.ModelProto, into: Iterable[str] = LINEAR_OPS) -> int:
    """Fold ``node(x, W[, B]) + c`` into the node's bias when ``c`` is a constant per-output-channel vector
    and the Add is the node's only reader (onnxoptimizer's ``fuse_add_bias_into_conv``, extended to
    ConvTranspose, Gemm and 2-D MatMul, which becomes a Gemm). Returns the number of Adds removed."""
    into = frozenset(into)
    folded = 0
    g = _Graph(model)
    for add in list(g.graph.node):
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            continue
        for side in (0, 1):
            node = g.producer.get(add.input[side])
            if node is None or node.op_type not in into or not g.single_reader(add.input[side], add):
                continue
            const = g.constant_value(add.input[1 - side])
            weight = _weight(g, node)
            if const is None or weight is None:
                continue
            axis = _channel_axis(g, node, weight)
            if axis is None and node.op_type == "ConvTranspose" and weight.ndim >= 3:
                axis = 1  # a bias is per output channel whatever the groups
            if axis is None:
                continue
            channels = _output_channels(g, node, weight, axis)
            rank = weight.ndim if node.op_type in ("Conv", "ConvTranspose") else 2
            vector = _per_channel(np.asarray(const, dtype=np.float64), channels, rank)
            bias = _bias_of(g, node, channels)
            if vector is None or bias is None:
                continue
            _set_bias(g, node, bias + vector, weight.dtype)
            node.output[0] = add.output[0]
            g.producer[add.output[0]] = node
            g.graph.node.remove(add)
            log.debug("folded Add %s into the bias of %s", node_label(add), node_label(node))
            folded += 1
            break
    drop_unused_constants(model.graph)
    return folded


def _per_channel(c: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``c`` as a vector of ``channels`` if adding it to the node's output (channels on axis 1 of an
    [N, C, ...] tensor of rank ``rank``) adds one value per channel without broadcasting the output to a
    larger shape, else None. For rank 2 (Gemm, MatMul) that is a scalar, [C] or [1, C]; for a Conv a
    scalar, [C, 1, ...] or [1, C, 1, ...] (a 1-D [C] broadcasts along the last axis, not the channels)."""
    if c.size == 1 and c.ndim <= rank:
        return np.full(channels, float(c.reshape(-1)[0]))
    if c.size != channels or c.ndim not in (rank - 1, rank):
        return None
    axis = 0 if c.ndim == rank - 1 else 1
    if c.shape[axis] != channels or (c.ndim == rank and c.shape[0] != 1):
        return None
    return c.reshape(-1)


# ---------------------------------------------------------------------------------------------------------
# constant folding


def constant_foldable_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes whose inputs are all constants and that :func:`fold_constants` would try to evaluate (not
    counting the nodes that become foldable once these are folded)."""
    g = GraphIndex(model)
    return [n for n in g.graph.node if _foldable(g, n, set())]


def _foldable(g: GraphIndex, node: onnx.NodeProto, folded: Collection[str]) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD:
        return False
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return False
    inputs = [x for x in node.input if x]
    if not inputs or any(o in g.graph_outputs for o in node.output):
        return False
    return all(x in folded or g.is_constant(x) for x in inputs)


def fold_constants(model: onnx.ModelProto, max_bytes: int = MAX_FOLDED_BYTES) -> int:
    """Replace every node computed from constants only by initializers holding its outputs, evaluated with
    ONNX's reference evaluator (the ONNX specification in code, not hand-written math) at the model's opsets.

    Bounded: an output larger than ``max_bytes`` or than twice the node's inputs (and 64 KiB) is not
    written, and an op that can grow its data (Expand, Tile, ConstantOfShape, ...) is evaluated only when
    shape inference already knows its output is small. A node the evaluator cannot run stays. Returns the
    number of nodes folded.
    """
    from onnx.reference import ReferenceEvaluator

    g = GraphIndex(model)
    opsets = {imp.domain or "": imp.version for imp in model.opset_import}
    values: dict[str, np.ndarray] = {}
    removed: set[int] = set()
    for i, node in enumerate(g.graph.node):
        if not _foldable(g, node, values.keys()):
            continue
        if node.op_type in _MAY_GROW and not _declared_small(g, node, max_bytes):
            continue
        feeds = {x: values[x] if x in values else g.constant_value(x) for x in node.input if x}
        if any(v is None for v in feeds.values()):
            continue
        in_bytes = sum(v.nbytes for v in feeds.values())
        try:
            outputs = ReferenceEvaluator(node, opsets=opsets).run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - the reference evaluator raises anything; the node stays
            log.debug("not folding %s: the reference evaluator failed (%s)", node_label(node), exc)
            continue
        results = _checked_outputs(g, node, outputs)
        if results is None:
            continue
        out_bytes = sum(v.nbytes for v in results.values())
        if out_bytes > max_bytes or out_bytes > max(2 * in_bytes, _SMALL_BYTES):
            log.debug("not folding %s: its output (%d bytes) is much larger than its inputs", node_label(node), out_bytes)
            continue
        values.update(results)
        removed.add(i)
    if not removed:
        return 0
    for i in sorted(removed, reverse=True):
        del g.graph.node[i]
    # Every folded value becomes an initializer and the shared sweep drops the unread ones: it also sees
    # the outer-scope names that If/Loop/Scan bodies read, which a scan of the main graph's inputs misses.
    g.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in values.items())
    drop_unused_constants(model.graph)
    log.debug("folded %d constant node(s)", len(removed))
    return len(removed)


def _declared_small(g: GraphIndex, node: onnx.NodeProto, max_bytes: int) -> bool:
    for out in node.output:
        shape = g.shape(out) if out else []
        if shape is None or any(not isinstance(d, int) or d <= 0 for d in shape):
            return False
        if int(np.prod(shape, dtype=np.int64)) * 8 > min(max_bytes, _SMALL_BYTES * 16):
            return False
    return True


def _checked_outputs(g: GraphIndex, node: onnx.NodeProto, outputs: list) -> dict[str, np.ndarray] | None:
    """The evaluated outputs by name, or None if one is missing or not of the type the graph declares."""
    results: dict[str, np.ndarray] = {}
    for name, value in zip(node.output, outputs):
        if not name:
            continue
        if value is None or not isinstance(value, (np.ndarray, np.generic)):
            return None
        value = np.asarray(value)
        declared = g.elem_type(name)
        if declared and declared != helper.np_dtype_to_tensor_dtype(value.dtype):
            log.debug("not folding %s: output %r came out as %s", node_label(node), name, value.dtype)
            return None
        results[name] = value
    if len(results) != len([o for o in node.output if o]):
        return None
    return results


# ---------------------------------------------------------------------------------------------------------
# dynamic batch


def make_batch_dynamic(model: onnx.ModelProto, dim_param: str = "batch") -> int:
    """Make axis 0 of every graph input and output symbolic (ESP-DL's ``convert_model_batch_to_dynamic``).

    Stale intermediate shapes are dropped (shape inference recomputes them), and a Reshape whose constant
    target starts with the old fixed batch size gets 0 there ("copy the input's dimension") so it follows
    the new batch. An input that is also an initializer (an overridable constant) is left alone. Returns
    the number of inputs and outputs whose axis 0 was fixed.
    """
    g = model.graph
    inits = {i.name for i in g.initializer}
    fixed: set[int] = set()
    changed = 0
    for vi in (*g.input, *g.output):
        if vi.name in inits or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 0:
            continue
        if dims[0].HasField("dim_value"):
            fixed.add(dims[0].dim_value)
            changed += 1
        dims[0].Clear()
        dims[0].dim_param = dim_param
    if fixed:
        del g.value_info[:]
        _reshape_follow_batch(model, fixed)
    return changed


def _reshape_follow_batch(model: onnx.ModelProto, fixed: set[int]) -> None:
    g = _Graph(model)
    for node in g.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or int(g.attribute(node, "allowzero", 0)):
            continue
        target = g.constant_value(node.input[1])
        if target is None or target.ndim != 1 or target.size < 2 or int(target[0]) not in fixed or 0 in target[1:]:
            continue
        new = target.copy()
        new[0] = 0
        node.input[1] = g.add_initializer(f"{node.input[1]}_dynamic_batch", new)
    drop_unused_constants(model.graph)
