"""Stage 4 (dynamic mode): MatMul, Gemm, Conv, embedding Gathers, LSTM and fused Attention become ONNX
Runtime's dynamic integer ops.

Weights are quantized offline (symmetric, per-tensor or per-output-channel); activations are quantized at
run time by the kernel itself, so no calibration data is needed:

- MatMul with a constant 2-D weight, and Gemm (alpha = beta = 1, transA = 0) with a constant B, become
  ``com.microsoft.DynamicQuantizeMatMul(A, B_q, b_scale, b_zero_point, bias?)``. A transB=1 weight is
  transposed offline; a 1-D Gemm C becomes the kernel's bias, any other C is added after it.
- Conv becomes ``DynamicQuantizeLinear(x) -> ConvInteger -> Cast(float) -> Mul(x_scale * w_scale)
  -> Add(bias)``. ONNX Runtime 1.32's ConvInteger takes only a scalar weight zero point (per-channel
  scales still work, applied in the float Mul, because the weights are symmetric) and its int8-weight
  kernel measured 4x slower than float (3x3 64->64 at 56x56, one thread: 8.5 ms vs 2.1 ms; uint8
  weights 1.7 ms), so the pipeline leaves Conv float unless it is asked for by ``op_types_to_quantize``.

- Gather from a constant float table (an embedding) reads the table stored as ``weight_type`` and
  dequantizes only the rows it gathered: ``Gather(table_q, ids) -> DequantizeLinear``, per column of the
  table with per-channel weights (the last axis survives the Gather, so one scale vector serves every
  row). The planner leaves such Gathers float for static QDQ, where the table would be dequantized whole on
  every run; here the dequantization is after the Gather, so the table shrinks 4x for the cost of
  dequantizing the few rows read. The plan is updated to list these nodes as quantized.

- LSTM (the standard ONNX op, constant float32 W and R) becomes ``com.microsoft.DynamicQuantizeLSTM``,
  which wants W and R transposed to ``[num_directions, input, 4*hidden]`` / ``[.., hidden, 4*hidden]``
  with scales per direction (``[num_directions]``) or per gate column (``[num_directions, 4*hidden]``).
  No LSTM op quantizer exists (static QDQ has no LSTM kernel to fuse into), so, as for the Gathers, the
  plan is updated here. ONNX Runtime 1.32 measured it 3x faster than float (input 256, hidden 512,
  seq 64, one thread: 1.1 ms vs 3.9 ms), so it is on by default. Batch-first (``layout=1``) LSTMs and
  activations outside the ONNX list stay float: the kernel has no ``layout`` attribute.

- ``com.microsoft.Attention`` (BERT's self-attention as ONNX Runtime's transformer optimizer fuses it) becomes
  ``DynamicQuantizeLinear -> com.microsoft.QAttention`` with the QKV weight stored as ``weight_type``
  (per column with per-channel weights), as ONNX Runtime's own dynamic quantizer does; BERT-base widths, seq
  128, one thread: 2.6 ms against 6.6 ms float. Attributes or inputs QAttention lacks keep it float.

Nodes the planner left float, and planned nodes that do not fit the patterns above (N-D weights, float16,
alpha/beta != 1), stay as they are.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortq.core.graph import FreshNames, GraphIndex, node_label
from ortq.core.op_quantizer import Weight
from ortq.pipeline.params import weight_params
from ortq.core.graph import drop_unused_constants
from ortq.core.scheme import QuantParams, QuantSpec, QuantType, quantize_array

if TYPE_CHECKING:
    from ortq.core.config import QuantConfig
    from ortq.pipeline.plan import QuantPlan

__all__ = ["rewrite_dynamic", "DYNAMIC_OP_TYPES", "DEFAULT_DYNAMIC_OP_TYPES", "MS_DOMAIN"]

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
#: Ops dynamic quantization can rewrite.
DYNAMIC_OP_TYPES = frozenset({"MatMul", "Gemm", "Conv", "Gather", "LSTM", "Attention"})
#: Rewritten unless named otherwise: ConvInteger is slower than float on ONNX Runtime's CPU provider.
DEFAULT_DYNAMIC_OP_TYPES = frozenset({"MatMul", "Gemm", "Gather", "LSTM", "Attention"})
#: The activations the ONNX LSTM spec lists; DynamicQuantizeLSTM shares ONNX Runtime's parser for them.
_LSTM_ACTIVATIONS = frozenset(
    a.lower() for a in ("Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh",
                        "HardSigmoid", "Elu", "Softsign", "Softplus")
)


def rewrite_dynamic(
    model: onnx.ModelProto, index: GraphIndex, plan: QuantPlan, config: QuantConfig
) -> tuple[dict[str, QuantParams], dict[str, str]]:
    """Rewrite ``model`` in place; return the weight parameters and the planned nodes kept float (with why)."""
    graph = model.graph
    names = FreshNames(model)
    params: dict[str, QuantParams] = {}
    kept: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    cache: dict[tuple[str, bool, str], tuple[str, str, str]] = {}
    weight_spec = config.weight

    def quantized_weight(name: str, transpose: bool, kind: str) -> tuple[str, str, str, QuantParams]:
        values = index.constant_value(name).astype(np.float32)
        if transpose:
            values = values.T
        axis = {"conv": 0, "matmul": 1, "gather": values.ndim - 1}[kind] if config.per_channel else None
        spec = QuantSpec(weight_spec.qtype, True, axis, weight_spec.reduce_range)
        p = weight_params(values, spec, name)
        key = (name, transpose, kind)
        if key not in cache:
            q = quantize_array(values, p)
            base = f"{name}{'_T' if transpose else ''}"
            q_name = names(f"{base}_quantized")
            s_name = names(f"{base}_scale")
            z_name = names(f"{base}_zero_point")
            new_inits.append(numpy_helper.from_array(q, q_name))
            if kind == "conv":
                shape = [1, -1] + [1] * (values.ndim - 2)
                new_inits.append(numpy_helper.from_array(p.scale.reshape(shape).astype(np.float32), s_name))
                # ConvInteger accepts only a scalar weight zero point; symmetric weights share one.
                new_inits.append(numpy_helper.from_array(np.asarray(p.zero_point.reshape(-1)[0]), z_name))
            else:
                new_inits.append(numpy_helper.from_array(p.scale, s_name))
                new_inits.append(numpy_helper.from_array(p.zero_point, z_name))
            cache[key] = (q_name, s_name, z_name)
        return (*cache[key], p)

    bias_adds = _bias_adds(index, plan)
    absorbed = {add.name for add in bias_adds.values()}
    # An activation read by several MatMuls (Q, K and V projections) is quantized once, not once per kernel.
    readers: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and _unfit(node, index, plan) is None:
            readers[node.input[0]] = readers.get(node.input[0], 0) + 1
    shared: dict[str, tuple[str, str, str]] = {}
    lstm_weights: dict[str, tuple[str, str, str, QuantParams]] = {}  # an LSTM's W or R, quantized once
    for node in graph.node:
        if node.name in absorbed:
            continue  # its bias became the input of the DynamicQuantizeMatMul before it
        if node.op_type == "Attention" and node.domain == MS_DOMAIN and _selected(node, config):
            reason = _attention_unfit(node, index)
            if reason is not None:
                _leave_float(node, reason, plan, kept)
                new_nodes.append(node)
                continue
            q, s, z, p = quantized_weight(node.input[1], False, "matmul")
            new_nodes += _quantized_attention(node, q, s, z, index, names, new_inits)
            params[node.input[1]] = p
            _mark_quantized(node, plan)
            continue
        if _embedding_gather(node, index, config):
            q, s, z, p = quantized_weight(node.input[0], False, "gather")
            gathered = names(f"{node.output[0]}_quantized")
            dq_attrs = {"axis": -1} if p.per_channel else {}
            new_nodes += [
                helper.make_node("Gather", [q, node.input[1]], [gathered], name=node.name, axis=0),
                helper.make_node("DequantizeLinear", [gathered, s, z], [node.output[0]],
                                 name=names(f"{node.name}_DequantizeLinear"), **dq_attrs),
            ]
            params[node.input[0]] = p
            _mark_quantized(node, plan)
            continue
        if node.op_type == "LSTM" and node.domain in ("", "ai.onnx") and _selected(node, config):
            reason = _lstm_unfit(node, index, config)
            if reason is not None:
                _leave_float(node, reason, plan, kept)
                new_nodes.append(node)
                continue
            lstm_inputs = list(node.input) + [""] * (8 - len(node.input))
            for position in (1, 2):  # W, R
                name = node.input[position]
                if name not in lstm_weights:
                    lstm_weights[name] = _lstm_weight(index.constant_value(name), config, name, names, new_inits)
                q, s, z, p = lstm_weights[name]
                lstm_inputs[position] = q
                lstm_inputs += [s, z]
                params[name] = p
            new_nodes.append(_dynamic_lstm(node, lstm_inputs, index))
            _mark_quantized(node, plan)
            continue
        reason = _unfit(node, index, plan)
        if reason is not None:
            if node.name in plan.quantized_nodes:
                kept[node.name] = reason
            new_nodes.append(node)
            continue
        if node.op_type == "MatMul":
            q, s, z, p = quantized_weight(node.input[1], False, "matmul")
            add = bias_adds.get(node.name)
            inputs, outputs = [node.input[0], q, s, z], list(node.output)
            bias = ""
            if add is not None:
                bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
                outputs = list(add.output)
            x = node.input[0]
            if readers.get(x, 0) > 1:
                if x not in shared:
                    shared[x] = (names(f"{x}_dyn_quantized"), names(f"{x}_dyn_scale"), names(f"{x}_dyn_zero_point"))
                    new_nodes.append(helper.make_node(
                        "DynamicQuantizeLinear", [x], list(shared[x]), name=names(f"{x}_DynamicQuantizeLinear")))
                xq, xs, xz = shared[x]
                new_nodes.append(helper.make_node(
                    "MatMulIntegerToFloat", [xq, q, xs, s, xz, z, bias] if bias else [xq, q, xs, s, xz, z], outputs,
                    name=node.name, domain=MS_DOMAIN))
            else:
                new_nodes.append(helper.make_node(
                    "DynamicQuantizeMatMul", [*inputs, bias] if bias else inputs, outputs, name=node.name, domain=MS_DOMAIN))
        elif node.op_type == "Gemm":
            trans_b = bool(index.attribute(node, "transB", 0))
            q, s, z, p = quantized_weight(node.input[1], trans_b, "matmul")
            c = node.input[2] if len(node.input) > 2 else ""
            c_shape = index.shape(c) if c else None
            inputs = [node.input[0], q, s, z]
            if c and c_shape is not None and len(c_shape) == 1:
                new_nodes.append(helper.make_node("DynamicQuantizeMatMul", [*inputs, c], list(node.output),
                                                  name=node.name, domain=MS_DOMAIN))
            elif c:
                mm = names(f"{node.name}_matmul")
                new_nodes.append(helper.make_node("DynamicQuantizeMatMul", inputs, [mm], name=node.name, domain=MS_DOMAIN))
                new_nodes.append(helper.make_node("Add", [mm, c], list(node.output), name=names(f"{node.name}_bias")))
            else:
                new_nodes.append(helper.make_node("DynamicQuantizeMatMul", inputs, list(node.output),
                                                  name=node.name, domain=MS_DOMAIN))
        else:  # Conv
            q, s, z, p = quantized_weight(node.input[1], False, "conv")
            x = node.input[0]
            xq, xs, xz = names(f"{x}_dyn_quantized"), names(f"{x}_dyn_scale"), names(f"{x}_dyn_zero_point")
            acc, acc_f, scale = names(f"{node.name}_int32"), names(f"{node.name}_float"), names(f"{node.name}_scale")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            has_bias = len(node.input) > 2 and bool(node.input[2])
            out = names(f"{node.name}_scaled") if has_bias else node.output[0]
            new_nodes += [
                helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz], name=names(f"{node.name}_quantize_input")),
                helper.make_node("ConvInteger", [xq, q, xz, z], [acc], name=node.name, **attrs),
                helper.make_node("Cast", [acc], [acc_f], name=names(f"{node.name}_cast"), to=TensorProto.FLOAT),
                helper.make_node("Mul", [xs, s], [scale], name=names(f"{node.name}_scale_product")),
                helper.make_node("Mul", [acc_f, scale], [out], name=names(f"{node.name}_rescale")),
            ]
            if has_bias:
                bias = node.input[2]
                b_shape = names(f"{bias}_shape")
                new_inits.append(numpy_helper.from_array(
                    np.array([1, -1] + [1] * (len(index.shape(node.input[1]) or [0, 0, 0, 0]) - 2), np.int64), b_shape))
                b4 = names(f"{bias}_reshaped")
                new_nodes += [
                    helper.make_node("Reshape", [bias, b_shape], [b4], name=names(f"{node.name}_bias_reshape")),
                    helper.make_node("Add", [out, b4], [node.output[0]], name=names(f"{node.name}_bias")),
                ]
        params[node.input[1]] = p

    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    drop_unused_constants(graph)
    if params and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return params, kept


def _bias_adds(index: GraphIndex, plan: QuantPlan) -> dict[str, onnx.NodeProto]:
    """MatMul node -> the Add of a constant vector that only it feeds: the kernel adds the bias itself."""
    found = {}
    for node in index.graph.node:
        if node.op_type != "MatMul" or _unfit(node, index, plan) is not None:
            continue
        out = node.output[0]
        readers = index.consumers.get(out, [])
        if len(readers) != 1 or out in index.graph_outputs or readers[0].op_type != "Add":
            continue
        add = readers[0]
        other = add.input[1] if add.input[0] == out else add.input[0]
        bias = index.constant_value(other)
        if bias is not None and bias.ndim == 1 and bias.dtype == np.float32:
            found[node.name] = add
    return found


#: com.microsoft.Attention attributes QAttention also has; any other one set keeps the node float.
_QATTENTION_ATTRIBUTES = frozenset({"num_heads", "unidirectional", "mask_filter_value", "scale"})


def _attention_unfit(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """Why QAttention cannot replace this ``com.microsoft.Attention`` (what ONNX Runtime's transformer optimizer
    fuses BERT's self-attention into), or None: it needs a constant float32 2-D QKV weight, no attention bias,
    and no attribute QAttention lacks."""
    weight = index.constant_value(node.input[1])
    extra = sorted(a.name for a in node.attribute if a.name not in _QATTENTION_ATTRIBUTES)
    if weight is None or weight.dtype != np.float32 or weight.ndim != 2:
        return "its QKV weight is not a constant float32 matrix"
    if index.float_dtype(node.input[0]) != np.float32:
        return "QAttention takes a float32 input only"
    if len(node.input) > 5 and any(node.input[5:]):
        return "QAttention has no attention_bias / past_sequence_length inputs"
    if extra:
        return f"QAttention has no attribute(s) {extra}"
    return None


def _quantized_attention(node: onnx.NodeProto, q: str, s: str, z: str, index: GraphIndex, names: FreshNames,
                         new_inits: list[TensorProto]) -> list[onnx.NodeProto]:
    """DynamicQuantizeLinear(input) -> QAttention: the QKV projection runs in integers, softmax(QK)V in float
    inside the same kernel. QAttention requires a bias where Attention's is optional."""
    x = node.input[0]
    xq, xs, xz = names(f"{x}_dyn_quantized"), names(f"{x}_dyn_scale"), names(f"{x}_dyn_zero_point")
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    if not bias:
        bias = names(f"{node.name}_zero_bias")
        columns = index.constant_value(node.input[1]).shape[1]
        new_inits.append(numpy_helper.from_array(np.zeros(columns, np.float32), bias))
    mask = node.input[3] if len(node.input) > 3 else ""
    past = node.input[4] if len(node.input) > 4 else ""
    inputs = [xq, q, bias, xs, s, mask, xz, z] + ([past] if past else [])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return [
        helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz], name=names(f"{node.name}_quantize_input")),
        helper.make_node("QAttention", inputs, list(node.output), name=node.name, domain=MS_DOMAIN, **attrs),
    ]


def _embedding_gather(node: onnx.NodeProto, index: GraphIndex, config: QuantConfig) -> bool:
    """A selected Gather along axis 0 of a constant float32 table of rank 2 or more."""
    if node.op_type != "Gather" or not _selected(node, config):
        return False
    if int(index.attribute(node, "axis", 0)) != 0 or node.input[0] in index.graph_outputs:
        return False
    table = index.constant_value(node.input[0])
    return table is not None and table.dtype == np.float32 and table.ndim >= 2


def _selected(node: onnx.NodeProto, config: QuantConfig) -> bool:
    """Whether the op types and node lists pick ``node``. Gathers, LSTMs and fused Attention have no op quantizer,
    so the planner left them float without applying the user's selection; it is applied here instead."""
    return (
        node.op_type in (config.op_types or ())
        and node.name not in config.nodes_to_exclude
        and (config.nodes_to_quantize is None or node.name in config.nodes_to_quantize)
    )


def _mark_quantized(node: onnx.NodeProto, plan: QuantPlan) -> None:
    """The plan listed ``node`` float (no op quantizer); it now runs a dynamic integer kernel."""
    plan.quantized_nodes[node.name] = node.op_type
    plan.float_nodes = [f for f in plan.float_nodes if f.name != node.name]


def _lstm_unfit(node: onnx.NodeProto, index: GraphIndex, config: QuantConfig) -> str | None:
    """Why DynamicQuantizeLSTM cannot replace this LSTM, or None."""
    if config.weight.qtype not in (QuantType.INT8, QuantType.UINT8):
        return f"DynamicQuantizeLSTM takes 8-bit weights only, not {config.weight.qtype.value}"
    if int(index.attribute(node, "layout", 0)):
        return "layout=1 (batch first): DynamicQuantizeLSTM has no layout attribute"
    activations = [_text(a) for a in index.attribute(node, "activations", None) or []]
    unknown = [a for a in activations if a.lower() not in _LSTM_ACTIVATIONS]
    if unknown:
        return f"activation(s) {unknown} are not in the ONNX LSTM list"
    w_name, r_name = (list(node.input) + ["", ""])[1:3]
    w = index.constant_value(w_name) if w_name else None
    r = index.constant_value(r_name) if r_name else None
    if w is None or r is None:
        return "its W and R are not both constants"
    if w.dtype != np.float32 or r.dtype != np.float32:
        return "DynamicQuantizeLSTM takes float32 only"
    directions = 2 if _text(index.attribute(node, "direction", "forward")) == "bidirectional" else 1
    hidden = r.shape[-1] if r.ndim == 3 else -1
    if w.ndim != 3 or r.ndim != 3 or w.shape[:2] != (directions, 4 * hidden) or r.shape != (directions, 4 * hidden, hidden):
        return f"W {list(w.shape)} and R {list(r.shape)} do not have the LSTM's shapes for {directions} direction(s)"
    if int(index.attribute(node, "hidden_size", hidden)) != hidden:
        return f"hidden_size={index.attribute(node, 'hidden_size')} does not match R {list(r.shape)}"
    return None


def _text(value: object) -> str:
    """A string attribute's value (onnx returns bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _lstm_weight(
    values: np.ndarray, config: QuantConfig, name: str, names: FreshNames, new_inits: list[TensorProto]
) -> tuple[str, str, str, QuantParams]:
    """Quantize an LSTM's W or R ``[directions, 4*hidden, k]`` into the kernel's ``[directions, k, 4*hidden]``.

    Scales are per direction, or per gate row with ``per_channel``: the returned parameters describe the
    weight viewed as ``[directions * 4*hidden, k]`` (per channel) or ``[directions, -1]`` rows, axis 0.
    """
    directions = values.shape[0]
    view = values.reshape(-1, values.shape[2]) if config.per_channel else values.reshape(directions, -1)
    spec = QuantSpec(config.weight.qtype, True, 0, config.weight.reduce_range)
    p = weight_params(view, spec, name)
    q = quantize_array(view, p).reshape(values.shape).transpose(0, 2, 1)
    q_name, s_name, z_name = names(f"{name}_quantized"), names(f"{name}_scale"), names(f"{name}_zero_point")
    new_inits += [
        numpy_helper.from_array(np.ascontiguousarray(q), q_name),
        numpy_helper.from_array(p.scale.reshape(directions, -1) if config.per_channel else p.scale, s_name),
        numpy_helper.from_array(p.zero_point.reshape(directions, -1) if config.per_channel else p.zero_point, z_name),
    ]
    return q_name, s_name, z_name, p


def _dynamic_lstm(node: onnx.NodeProto, inputs: list[str], index: GraphIndex) -> onnx.NodeProto:
    """The DynamicQuantizeLSTM replacing ``node``: same outputs and attributes (``layout`` is not one)."""
    lstm = helper.make_node("DynamicQuantizeLSTM", inputs, list(node.output), name=node.name, domain=MS_DOMAIN)
    lstm.attribute.extend(a for a in node.attribute if a.name != "layout")
    if index.attribute(node, "hidden_size") is None:  # optional in ONNX, required by ONNX Runtime's kernel
        hidden = index.constant_value(node.input[2]).shape[-1]
        lstm.attribute.append(helper.make_attribute("hidden_size", int(hidden)))
    return lstm


def _leave_float(node: onnx.NodeProto, reason: str, plan: QuantPlan, kept: dict[str, str]) -> None:
    """Record why a selected LSTM or Attention stays float, replacing the planner's generic "no op quantizer"
    reason."""
    if node.name in plan.quantized_nodes:  # a plugin planned it: the pipeline reports it like other kept nodes
        kept[node.name] = reason
        return
    for entry in plan.float_nodes:
        if entry.name == node.name:
            entry.reason = reason
    log.info("node %s stays float: %s", node_label(node), reason)


def _unfit(node: onnx.NodeProto, index: GraphIndex, plan: QuantPlan) -> str | None:
    """Why a node is not rewritten, or None."""
    if node.name not in plan.quantized_nodes or node.op_type not in DYNAMIC_OP_TYPES or len(node.input) < 2:
        return "not planned"
    weight = plan.tensors.get(node.input[1])
    if weight is None or not isinstance(weight.role, Weight):
        return "its weight is not a planned constant"
    if index.float_dtype(node.input[0]) != np.float32 or index.float_dtype(node.input[1]) != np.float32:
        return "the integer kernels take float32 only"
    values = index.constant_value(node.input[1])
    if values is None:
        return "its weight has no readable value"
    if node.op_type in ("MatMul", "Gemm") and values.ndim != 2:
        return "its weight is not a 2-D matrix"
    if node.op_type == "Gemm":
        if float(index.attribute(node, "alpha", 1.0)) != 1.0 or float(index.attribute(node, "beta", 1.0)) != 1.0:
            return "alpha or beta is not 1"
        if int(index.attribute(node, "transA", 0)):
            return "transA=1"
    if node.op_type == "Conv" and values.ndim < 3:
        return "its weight has an unexpected rank"
    return None
