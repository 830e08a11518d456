"""Stage 4 (QDQ format): rewrite the float graph with QuantizeLinear/DequantizeLinear pairs.

Activations get Q -> DQ right after their producer and every consumer reads the DQ output (one Q per
tensor, so ONNX Runtime can fuse the producer into an integer kernel). Constants are stored quantized
with a DQ in front. A quantized graph output keeps its name: the producer's output is renamed and the
DQ writes the original name.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ortq.core.op_quantizer import Bias
from ortq.core.scheme import QuantParams, quantize_array

from ortq.core.graph import FreshNames, drop_unused_constants

if TYPE_CHECKING:
    from ortq.core.graph import GraphIndex
    from ortq.pipeline.plan import QuantPlan

__all__ = ["rewrite_qdq", "drop_unused_constants", "quantize_bias", "constant_dq", "use_contrib_qdq"]

log = logging.getLogger(__name__)

_INT32 = np.iinfo(np.int32)


def rewrite_qdq(
    model: onnx.ModelProto,
    index: GraphIndex,
    plan: QuantPlan,
    params: dict[str, QuantParams],
    bias_scales: dict[str, tuple[np.ndarray, int | None]],
) -> onnx.ModelProto:
    """Edit ``model`` (the pipeline's private copy) in place and return it."""
    graph = model.graph
    names = FreshNames(model)
    replacement: dict[str, str] = {}  # float tensor -> its dequantized stand-in
    head: list[onnx.NodeProto] = []  # DQs of constants and Q/DQ of graph inputs: first in the graph
    after: dict[str, list[onnx.NodeProto]] = {}  # producer node name -> Q/DQ to place after it
    renamed_outputs: dict[str, str] = {}
    activation_inits: dict[str, tuple[str, str, np.ndarray, np.ndarray]] = {}  # tensor -> its scale/zp initializers

    for name, tp in plan.tensors.items():
        if isinstance(tp.role, Bias):
            if name not in bias_scales:
                continue
            scale, axis = bias_scales[name]
            values = index.constant_value(name).astype(np.float64)
            q = quantize_bias(values, scale, name)
            head.append(constant_dq(graph, names, name, q, scale.astype(index.float_dtype(name)), None, axis))
            replacement[name] = head[-1].output[0]
            continue
        p = params.get(name)
        if p is None:
            continue
        if tp.constant:
            values = index.constant_value(name)
            q = quantize_array(values, p)
            scale = p.scale.astype(index.float_dtype(name))
            head.append(constant_dq(graph, names, name, q, scale, p.zero_point, p.axis if p.per_channel else None))
            replacement[name] = head[-1].output[0]
            continue
        scale_value = p.scale.astype(index.float_dtype(name))
        shared = activation_inits.get(tp.source) if tp.source is not None else None
        if shared is not None and _same_values(shared[2], scale_value) and _same_values(shared[3], p.zero_point):
            # A data-movement output carries its input's parameters: one scale/zero-point pair for both, as
            # ONNX Runtime writes it (tools check that a Slice's DQ and Q read the same initializers).
            scale, zero_point = shared[0], shared[1]
        else:
            scale = _add_init(graph, names(f"{name}_scale"), scale_value)
            zero_point = _add_init(graph, names(f"{name}_zero_point"), p.zero_point)
        activation_inits[name] = (scale, zero_point, scale_value, np.asarray(p.zero_point))
        source = name
        if name in index.graph_outputs:
            source = renamed_outputs[name] = names(f"{name}_float")
        quantized = names(f"{name}_quantized")
        dequantized = name if name in index.graph_outputs else names(f"{name}_dequantized")
        pair = [
            helper.make_node("QuantizeLinear", [source, scale, zero_point], [quantized], name=names(f"{name}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [quantized, scale, zero_point], [dequantized], name=names(f"{name}_DequantizeLinear")),
        ]
        producer = index.producer.get(name)
        if producer is None:
            head.extend(pair)
        else:
            after.setdefault(producer.name, []).extend(pair)
        replacement[name] = dequantized

    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(head)
    for node in nodes:
        for i, tensor in enumerate(node.input):
            if tensor in replacement and tensor not in renamed_outputs:
                node.input[i] = replacement[tensor]
        for i, tensor in enumerate(node.output):
            if tensor in renamed_outputs:
                node.output[i] = renamed_outputs[tensor]
        graph.node.append(node)
        graph.node.extend(after.get(node.name, []))
    drop_unused_constants(graph)
    return model


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))


def quantize_bias(values: np.ndarray, scale: np.ndarray, name: str) -> np.ndarray:
    """int32 bias values at ``scale`` (input scale x weight scale), in float64: a float32 quotient would lose
    the low bits of large biases."""
    q = np.rint(values / scale.astype(np.float64))
    if np.any(q > _INT32.max) or np.any(q < _INT32.min):
        log.warning("bias %r overflows int32 at its scale (input scale x weight scale); clipping it", name)
    return np.clip(q, _INT32.min, _INT32.max).astype(np.int32)


def _add_init(graph: onnx.GraphProto, name: str, value: np.ndarray, *, typed: bool = False) -> str:
    value = np.asarray(value)
    if (value.ndim == 0 or typed) and value.dtype.kind in "fiu":
        # Scales and zero points in the typed fields (float_data / int32_data), as ONNX Runtime's quantizer
        # stores them: tools written against its output read ``int32_data[0]``. Same values.
        tensor = helper.make_tensor(
            name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape), value.reshape(-1).tolist()
        )
    else:
        tensor = numpy_helper.from_array(value, name)
    graph.initializer.append(tensor)
    return name


def constant_dq(
    graph: onnx.GraphProto,
    names: FreshNames,
    name: str,
    q: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    axis: int | None,
) -> onnx.NodeProto:
    """A quantized constant stored as ``q`` behind a DequantizeLinear writing ``<name>_dequantized`` (the
    initializers are added to ``graph``; the caller places the node)."""
    q_name = _add_init(graph, names(f"{name}_quantized"), q)
    s_name = _add_init(graph, names(f"{name}_scale"), scale, typed=True)
    if zero_point is None:
        zero_point = np.zeros(scale.shape, dtype=q.dtype)
    zp_name = _add_init(graph, names(f"{name}_zero_point"), zero_point, typed=True)
    attrs = {"axis": axis} if axis is not None else {}
    return helper.make_node(
        "DequantizeLinear", [q_name, s_name, zp_name], [names(f"{name}_dequantized")],
        name=names(f"{name}_DequantizeLinear"), **attrs,
    )


def use_contrib_qdq(model: onnx.ModelProto) -> None:
    """Move every QuantizeLinear/DequantizeLinear to the ``com.microsoft`` domain (ONNX Runtime's
    ``UseQDQContribOps``): same arithmetic, for runtimes and older ONNX Runtime builds that only take those."""
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain in ("", "ai.onnx"):
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
