"""Bias correction: remove the mean output shift that rounding a layer's weights causes.

Quantizing a weight ``W`` to ``W_q`` changes a layer's output by ``x · (W_q - W)``. Its expectation over the
data, ``E[x] · (W_q - W)``, is a constant per output channel: a systematic shift that every following layer
inherits, and that matters most where weights are coarse (per-tensor scales, depthwise kernels of 9 values).
Subtracting it from the layer's bias costs nothing at run time (the bias is an int32 constant anyway).

``E[x]`` is gathered per input channel in the same calibration pass as the ranges (:class:`ChannelMeans`
adds one running sum per channel to the observer of each layer input: memory stays flat in the number of
samples). Layers handled: Conv (any group count) and Gemm with a constant bias, and MatMul with a
constant 2-D weight whose only consumer is an ``Add`` of a constant bias over the last axis. A layer
without a bias is left alone: adding one would change the node the integer kernel fuses.

The correction ignores padding (border outputs of a padded Conv see zeros, not ``E[x]``): exact for the
interior, which dominates every real feature map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ortq.core.scheme import dequantize_array, quantize_array

if TYPE_CHECKING:
    from ortq.core.graph import GraphIndex
    from ortq.core.plan import QuantPlan
    from ortq.core.scheme import QuantParams

__all__ = ["ChannelMeans", "LayerBias", "find_layers", "correct_biases", "set_constant"]

log = logging.getLogger(__name__)


class ChannelMeans:
    """Running per-channel means of observed tensors (float64 sums and counts: flat in the sample count)."""

    def __init__(self, axes: dict[str, int]) -> None:
        #: tensor -> channel axis (1 for NCHW Conv inputs, -1 for MatMul/Gemm inputs)
        self.axes = dict(axes)
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def updater(self, name: str) -> Callable[[np.ndarray], None]:
        axis = self.axes[name]

        def update(values: np.ndarray) -> None:
            if values.ndim == 0 or values.size == 0:
                return
            moved = np.moveaxis(values, axis, -1)
            channels = moved.shape[-1]
            total = moved.reshape(-1, channels).sum(axis=0, dtype=np.float64)
            if name in self.sums:
                if self.sums[name].shape != total.shape:  # the channel count changed between batches
                    raise ValueError(f"tensor {name!r} changed its channel count ({channels}) between batches")
                self.sums[name] += total
            else:
                self.sums[name] = total
            self.counts[name] = self.counts.get(name, 0) + moved.size // max(channels, 1)

        return update

    def mean(self, name: str) -> np.ndarray | None:
        if name not in self.sums or not self.counts.get(name):
            return None
        return self.sums[name] / self.counts[name]


@dataclass(frozen=True)
class LayerBias:
    """One correctable layer: its node, activation input, constant weight, and the constant it corrects."""

    node: str
    op_type: str
    input: str
    weight: str
    bias: str
    #: channel axis of ``input`` whose mean the correction needs
    axis: int


def _attr(node: onnx.NodeProto, name: str, default):  # noqa: ANN001, ANN202
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _single_use_initializer(index: GraphIndex, name: str) -> bool:
    return name in index.initializers and len(index.consumers.get(name, [])) == 1


def find_layers(index: GraphIndex, plan: QuantPlan) -> list[LayerBias]:
    """The quantized Conv/Gemm/MatMul layers whose weight rounding a bias can absorb."""
    layers = []
    for node in index.graph.node:
        if node.name not in plan.quantized_nodes or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if x not in plan.tensors or index.is_constant(x) or w not in index.initializers:
            continue
        if node.op_type == "Conv" and len(node.input) > 2 and _single_use_initializer(index, node.input[2]):
            layers.append(LayerBias(node.name, "Conv", x, w, node.input[2], 1))
        elif node.op_type == "Gemm" and len(node.input) > 2 and _single_use_initializer(index, node.input[2]):
            axis = 0 if _attr(node, "transA", 0) else -1
            layers.append(LayerBias(node.name, "Gemm", x, w, node.input[2], axis))
        elif node.op_type == "MatMul" and node.output[0] not in index.graph_outputs:
            users = index.consumers.get(node.output[0], [])
            if len(users) != 1 or users[0].op_type != "Add":
                continue
            add = users[0]
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            if _single_use_initializer(index, other):
                layers.append(LayerBias(node.name, "MatMul", x, w, other, -1))
    return layers


def set_constant(index: GraphIndex, name: str, value: np.ndarray) -> None:
    """Replace initializer ``name``'s value in the pipeline's private model (keeping its dtype)."""
    tensor = index.initializers[name]
    old_dtype = numpy_helper.to_array(tensor).dtype if tensor.data_type else value.dtype
    tensor.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=old_dtype), name))
    # GraphIndex caches small constants; the cache must not keep serving the old value.
    getattr(index, "_constant_cache", {}).pop(name, None)


def _quantized(weight: np.ndarray, p: QuantParams) -> np.ndarray:
    return dequantize_array(quantize_array(weight, p), p).astype(np.float64)


def output_shift(layer: LayerBias, node: onnx.NodeProto, mean: np.ndarray, delta: np.ndarray) -> np.ndarray | None:
    """``E[x] · delta`` per output channel, where ``delta`` is the weight's change (quantized - float)."""
    if layer.op_type == "Conv":
        groups = int(_attr(node, "group", 1))
        out_ch, in_per_group = delta.shape[0], delta.shape[1]
        if mean.size != groups * in_per_group or out_ch % groups:
            return None
        per_tap = delta.reshape(out_ch, in_per_group, -1).sum(axis=2)
        group_of = np.arange(out_ch) // (out_ch // groups)
        return (per_tap * mean.reshape(groups, in_per_group)[group_of]).sum(axis=1)
    if delta.ndim != 2:
        return None
    if layer.op_type == "Gemm":
        if _attr(node, "transB", 0):
            delta = delta.T
        if mean.size != delta.shape[0]:
            return None
        return float(_attr(node, "alpha", 1.0)) * (mean @ delta)
    if mean.size != delta.shape[0]:
        return None
    return mean @ delta


def correct_biases(
    index: GraphIndex,
    layers: list[LayerBias],
    params: dict[str, QuantParams],
    means: ChannelMeans,
    originals: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Subtract each layer's expected output shift from its bias; return the biases' previous values.

    ``originals`` holds float weights that an earlier step (weight rounding) already replaced by their
    quantized values: the shift is then measured against the original float weight.
    """
    previous: dict[str, np.ndarray] = {}
    nodes = {n.name: n for n in index.graph.node}
    for layer in layers:
        p, mean = params.get(layer.weight), means.mean(layer.input)
        node = nodes.get(layer.node)
        if p is None or mean is None or node is None or layer.bias in previous:
            continue
        current = index.constant_value(layer.weight)
        if current is None or current.dtype.kind != "f":
            continue
        float_weight = (originals or {}).get(layer.weight, current).astype(np.float64)
        shift = output_shift(layer, node, mean, _quantized(current, p) - float_weight)
        bias = index.constant_value(layer.bias)
        if shift is None or bias is None or bias.dtype.kind != "f" or not np.all(np.isfinite(shift)):
            continue
        if layer.op_type == "Gemm":
            beta = float(_attr(node, "beta", 1.0))
            if beta == 0.0:
                continue
            shift = shift / beta
        if bias.size != shift.size or bias.shape[-1:] != (bias.size,):  # scalar, [M, N], [N, 1]: not per channel
            continue
        previous[layer.bias] = bias
        set_constant(index, layer.bias, (bias.astype(np.float64) - shift.reshape(bias.shape)))
        log.debug("bias correction of %r: mean |shift| %.3g", layer.node, float(np.mean(np.abs(shift))))
    if previous:
        log.info("bias correction adjusted %d bias(es)", len(previous))
    return previous


def restore(index: GraphIndex, previous: dict[str, np.ndarray]) -> None:
    """Put back the values :func:`correct_biases` (or weight rounding) replaced."""
    for name, value in previous.items():
        set_constant(index, name, value)
