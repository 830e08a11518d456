"""Cross-layer equalization (CLE): even out per-channel weight ranges across two consecutive Convs.

Where one scale serves a whole weight tensor (``per_channel=False``, ESP32-S3's per-tensor weights) a
few output channels with large weights set the step for all the others, which then round to a handful
of levels: a depthwise Conv after a BatchNorm fold is the classic case. For ``y = conv2(f(conv1(x)))``
with ``f`` positively homogeneous per channel (``f(x / s) = f(x) / s`` for ``s > 0``), dividing conv1's
output channel ``c`` (weights and bias) by ``s_c`` and multiplying conv2's weights that read channel ``c``
by ``s_c`` leaves the float model's output unchanged. Choosing ``s_c = sqrt(r1_c / r2_c)`` (``r1``: the
range of conv1's output channel ``c``, ``r2``: the range of conv2's weights reading it) gives both the same
relative range ``sqrt(r1_c · r2_c)`` and so the same share of their tensor's scale.

Between the two Convs: nothing, Relu, LeakyRelu, PRelu (per-channel or scalar slope), MaxPool, Identity,
or Clip with a lower bound of 0 or none and no upper bound. A Clip with a finite upper bound (ReLU6) is
not homogeneous (``min(x / s, 6) != min(x, 6) / s``), and ONNX Clip takes only scalar bounds, so such a
pair is skipped rather than changed. Pairs are equalized in rounds until the scales settle, so a depthwise
Conv between two pointwise ones is balanced on both sides. Every scale is positive and finite; the graph's
structure is unchanged (no op is added), so latency is unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ortq.core.graph import GraphIndex

__all__ = ["EqualizationPair", "find_pairs", "equalize"]

log = logging.getLogger(__name__)

_PASS_THROUGH = frozenset({"Relu", "LeakyRelu", "PRelu", "MaxPool", "Identity", "Clip"})
_ROUNDS = 20
#: Scales are kept within this factor of 1 so a dead channel (zero weights on one side) stays untouched.
_MAX_SCALE = 1e3


@dataclass(frozen=True)
class EqualizationPair:
    first: str  # node names
    second: str
    between: tuple[str, ...]


def _attr(node: onnx.NodeProto, name: str, default):  # noqa: ANN001, ANN202
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _homogeneous(node: onnx.NodeProto, index: GraphIndex, channels: int) -> bool:
    """True when ``node(x / s) == node(x) / s`` for any positive per-channel ``s`` (channel axis 1)."""
    if node.op_type in ("Relu", "LeakyRelu", "Identity"):
        return True
    if node.op_type == "MaxPool":
        return len(node.output) == 1 or not node.output[1]  # the Indices output is not scaled
    if node.op_type == "PRelu":
        slope = index.constant_value(node.input[1]) if len(node.input) > 1 else None
        if slope is None:
            return False
        # per channel along axis 1 (shape [C, 1, 1], [C], or a scalar)
        return slope.size == 1 or (slope.size == channels and slope.shape[0] == channels)
    if node.op_type == "Clip":
        if len(node.input) > 1 and node.input[1]:
            lo = index.constant_value(node.input[1])
            if lo is None or lo.size != 1 or float(lo.reshape(())) != 0.0:
                return False
        elif _attr(node, "min", None) not in (None, 0.0):
            return False
        if len(node.input) > 2 and node.input[2]:
            return False  # an upper bound (ReLU6) does not commute with per-channel scaling
        return _attr(node, "max", None) is None or not np.isfinite(_attr(node, "max", None))
    return False


def _conv_weight(node: onnx.NodeProto, index: GraphIndex) -> np.ndarray | None:
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in index.initializers:
        return None
    if len(index.consumers.get(node.input[1], [])) != 1:
        return None  # a shared weight would be scaled for another reader too
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in index.initializers or len(index.consumers.get(node.input[2], [])) != 1:
            return None
    w = index.constant_value(node.input[1])
    return w if w is not None and w.dtype == np.float32 and w.ndim >= 3 else None


def find_pairs(index: GraphIndex, exclude: frozenset[str] = frozenset()) -> list[EqualizationPair]:
    """Conv -> (homogeneous ops) -> Conv chains whose intermediate tensors have one reader each."""
    pairs = []
    for node in index.graph.node:
        if node.name in exclude:
            continue
        w1 = _conv_weight(node, index)
        if w1 is None:
            continue
        channels = w1.shape[0]
        between: list[str] = []
        current = node
        while True:
            out = current.output[0]
            readers = index.consumers.get(out, [])
            if out in index.graph_outputs or len(readers) != 1:
                break
            nxt = readers[0]
            if nxt.op_type == "Conv" and nxt.input[0] == out:
                w2 = _conv_weight(nxt, index)
                groups = int(_attr(nxt, "group", 1))
                if w2 is not None and nxt.name not in exclude and w2.shape[1] * groups == channels:
                    pairs.append(EqualizationPair(node.name, nxt.name, tuple(between)))
                break
            if nxt.op_type not in _PASS_THROUGH or nxt.input[0] != out or not _homogeneous(nxt, index, channels):
                break
            between.append(nxt.name)
            current = nxt
    return pairs


def _input_channel_ranges(w2: np.ndarray, groups: int) -> np.ndarray:
    """max |w| over the conv2 weights that read each input channel."""
    out_ch, per_group = w2.shape[0], w2.shape[1]
    r = np.abs(w2.reshape(groups, out_ch // groups, per_group, -1)).max(axis=(1, 3))  # [groups, per_group]
    return r.reshape(-1)


def _set(index: GraphIndex, name: str, value: np.ndarray) -> None:
    tensor = index.initializers[name]
    tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    getattr(index, "_constant_cache", {}).pop(name, None)


def equalize(model: onnx.ModelProto, label: str = "model", exclude: frozenset[str] = frozenset()) -> int:
    """Equalize every Conv pair of ``model`` (the pipeline's private copy) in place; return the pair count."""
    index = GraphIndex(model)
    pairs = find_pairs(index, exclude)
    if not pairs:
        return 0
    nodes = {n.name: n for n in model.graph.node}
    weights = {name: index.constant_value(nodes[name].input[1]).astype(np.float64)
               for p in pairs for name in (p.first, p.second)}
    biases = {}
    for p in pairs:
        for name in (p.first, p.second):
            node = nodes[name]
            if len(node.input) > 2 and node.input[2]:
                biases[name] = index.constant_value(node.input[2]).astype(np.float64)
    for round_ in range(_ROUNDS):
        largest = 0.0
        for p in pairs:
            w1, w2 = weights[p.first], weights[p.second]
            r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
            r2 = _input_channel_ranges(w2, int(_attr(nodes[p.second], "group", 1)))
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.sqrt(r1 / r2)
            s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
            s = np.clip(s, 1.0 / _MAX_SCALE, _MAX_SCALE)
            weights[p.first] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
            if p.first in biases:
                biases[p.first] = biases[p.first] / s
            groups = int(_attr(nodes[p.second], "group", 1))
            out_ch, per_group = w2.shape[0], w2.shape[1]
            by_group = w2.reshape(groups, out_ch // groups, per_group, -1)
            by_group = by_group * s.reshape(groups, 1, per_group, 1)
            weights[p.second] = by_group.reshape(w2.shape)
            largest = max(largest, float(np.max(np.abs(np.log(s)))))
        if largest < 1e-3:
            break
    for name, w in weights.items():
        _set(index, nodes[name].input[1], w)
    for name, b in biases.items():
        _set(index, nodes[name].input[2], b)
    log.info("%s: cross-layer equalization balanced %d Conv pair(s) in %d round(s)", label, len(pairs), round_ + 1)
    return len(pairs)
