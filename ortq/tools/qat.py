"""Models that are already quantized (quantization-aware training exports): check them, complete them, never
quantize them twice.

A QAT export (PyTorch's ``torch.ao`` / ``torch.onnx``, TensorFlow's QAT, another tool) already carries
QuantizeLinear/DequantizeLinear pairs whose scales and zero points were learned with the weights. Running
post-training calibration over them would stack a second quantization on top of the first and throw the
training away, so :func:`ortq.pipeline.run.quantize` refuses such a model (:func:`refuse_quantized`) and points
here. :func:`quantize_qat` instead:

1. validates every existing Q/DQ (constant, positive, finite scales; zero points inside their type and of the
   same type on both sides of a pair; identical parameters on a Q and the DQs reading it; a per-channel axis
   inside the tensor's rank and as many scales as channels), naming the node and tensor at fault;
2. fills in what exporters commonly leave out, so that ONNX Runtime can fuse the integer kernels:
   a float bias of a Conv, a Gemm, or a MatMul followed by an Add, whose input and weight both come
   through DequantizeLinear, becomes an int32 constant behind DequantizeLinear with scale = input scale x
   weight scale and zero point 0 (the scale ONNX Runtime's QLinearConv/QGemm require); a float weight whose
   input is quantized is quantized symmetric int8 per output channel (``quantize_weights=True``, the
   default: that is how QAT frameworks quantize weights, and without it the op runs in float between a DQ
   and a Q). Activations without Q/DQ stay float: without calibration data there is nothing to choose
   their parameters from, and inventing them would change what the model was trained to do;
3. keeps every existing scale and zero point bit-exact and adds no Q/DQ to an already quantized tensor;
4. optionally converts to QOperator form (``ortq.rewrite_qoperator``), then checks the result (onnx.checker
   full check, an ONNX Runtime load) and, with ``verify_data``, compares its outputs with the input model's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from ortq.core.config import parse_quant_format
from ortq.core.errors import ModelError
from ortq.core.graph import QDQ_OP_TYPES, FreshNames, GraphIndex, is_qdq, node_label
from ortq.io.model_io import check_output_path, infer_shapes, model_opset, model_size, read_model, staged_save
from ortq.io.paths import refuse_overwriting_inputs
from ortq.core.graph import drop_unused_constants, refuse_quantized
from ortq.pipeline.rewrite_qdq import constant_dq
from ortq.pipeline.rewrite_qoperator import convert_to_qoperator
from ortq.core.scheme import QuantSpec, QuantType, quantize_array
from ortq.pipeline.verify import VerificationReport, verify_model

if TYPE_CHECKING:
    from ortq.host.plugin_host import PluginHost

__all__ = ["QatResult", "quantize_qat", "refuse_quantized", "validate_qdq", "QDQ_OP_TYPES"]

log = logging.getLogger(__name__)

_INT32 = np.iinfo(np.int32)
#: Quantized element types of QuantizeLinear outputs / DequantizeLinear inputs (int32 only for DequantizeLinear).
_QTYPES = {
    TensorProto.UINT8: "uint8", TensorProto.INT8: "int8", TensorProto.UINT16: "uint16", TensorProto.INT16: "int16",
    TensorProto.INT32: "int32", TensorProto.UINT4: "uint4", TensorProto.INT4: "int4",
}
_RANGES = {
    "uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767),
    "int32": (int(_INT32.min), int(_INT32.max)), "uint4": (0, 15), "int4": (-8, 7),
}


# -- validation -------------------------------------------------------------------------------------------
@dataclass
class QdqParams:
    """The parameters one Q or DQ node carries, as stored (never converted)."""

    node: onnx.NodeProto
    scale_name: str
    scale: np.ndarray
    zero_point_name: str | None
    zero_point: np.ndarray | None
    qtype: str  # the quantized element type
    axis: int | None  # per-axis only (None per tensor)

    @property
    def per_tensor(self) -> bool:
        return self.axis is None

    def describe(self) -> str:
        zp = "none" if self.zero_point is None else _short(self.zero_point)
        return f"scale {_short(self.scale)}, zero point {zp} ({self.qtype})" + (
            f", axis {self.axis}" if self.axis is not None else ""
        )


def _short(values: np.ndarray) -> str:
    flat = np.asarray(values).reshape(-1)
    text = ", ".join(f"{v:.9g}" if flat.dtype.kind == "f" else str(v) for v in flat[:4])
    return text if flat.size == 1 else f"[{text}{', ...' if flat.size > 4 else ''}]"


def validate_qdq(model: onnx.ModelProto, label: str = "model") -> dict[str, QdqParams]:
    """Check every QuantizeLinear/DequantizeLinear of the main graph; return each node's parameters by name.

    Raises :class:`ModelError` naming the node and tensor at the first problem.
    """
    index = GraphIndex(model)
    found: dict[str, QdqParams] = {}
    for node in model.graph.node:
        if is_qdq(node):
            found[node.name or node.output[0]] = _node_params(node, index, label)
    by_output = {p.node.output[0]: p for p in found.values() if p.node.op_type == "QuantizeLinear"}
    quantized_by: dict[str, list[QdqParams]] = {}
    for p in found.values():
        if p.node.op_type == "QuantizeLinear":
            quantized_by.setdefault(p.node.input[0], []).append(p)
            continue
        q = by_output.get(p.node.input[0])
        if q is None:
            continue
        where = f"{label}: tensor {q.node.input[0]!r}"
        if q.qtype != p.qtype:
            raise ModelError(
                f"{where}: zero point type mismatch: QuantizeLinear {node_label(q.node)} produces {q.qtype}, "
                f"DequantizeLinear {node_label(p.node)} reads it with a {p.qtype} zero point"
            )
        if not _same(q, p):
            raise ModelError(
                f"{where}: mismatched Q/DQ parameters: QuantizeLinear {node_label(q.node)} has {q.describe()}, "
                f"DequantizeLinear {node_label(p.node)} has {p.describe()}; the DQ would not restore the values the "
                "Q produced"
            )
    for tensor, qs in quantized_by.items():
        if any(not _same(qs[0], other) for other in qs[1:]):
            log.warning(
                "%s: tensor %r is quantized by %d QuantizeLinear nodes with different parameters (%s)",
                label, tensor, len(qs), "; ".join(f"{node_label(q.node)}: {q.describe()}" for q in qs),
            )
    return found


def _same(a: QdqParams, b: QdqParams) -> bool:
    def zp(p: QdqParams) -> np.ndarray:
        return np.zeros(p.scale.shape, np.int64) if p.zero_point is None else p.zero_point.astype(np.int64)

    return (
        a.axis == b.axis
        and a.scale.shape == b.scale.shape
        and np.array_equal(a.scale, b.scale)
        and np.array_equal(zp(a), zp(b))
    )


def _node_params(node: onnx.NodeProto, index: GraphIndex, label: str) -> QdqParams:
    kind = node.op_type
    where = f"{label}: {kind} {node_label(node)}"
    if len(node.input) < 2 or not node.input[1]:
        raise ModelError(f"{where} has no scale input")
    scale_name = node.input[1]
    scale = _constant(index, scale_name, "scale", where)
    if scale.dtype.kind != "f":
        raise ModelError(f"{where}: scale {scale_name!r} is {scale.dtype}, not a float tensor")
    bad = ~(np.isfinite(scale) & (scale > 0))
    if np.any(bad):
        raise ModelError(
            f"{where}: scale {scale_name!r} must be positive and finite, got {scale[bad].reshape(-1)[0]!r}"
        )
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    zero_point = _constant(index, zp_name, "zero point", where) if zp_name else None
    qtype = _quantized_type(node, index, zero_point, where)
    if zero_point is not None:
        if zero_point.dtype.kind not in "iu":
            raise ModelError(f"{where}: zero point {zp_name!r} is {zero_point.dtype}, not an integer tensor")
        lo, hi = _RANGES.get(qtype, (None, None))
        if lo is not None:
            outside = (zero_point.astype(np.int64) < lo) | (zero_point.astype(np.int64) > hi)
            if np.any(outside):
                raise ModelError(
                    f"{where}: zero point {zp_name!r} = {int(zero_point[outside].reshape(-1)[0])} is outside "
                    f"{qtype} [{lo}, {hi}]"
                )
        declared = onnx.helper.np_dtype_to_tensor_dtype(zero_point.dtype)
        if _QTYPES.get(declared) != qtype:
            raise ModelError(
                f"{where}: zero point type mismatch: {zp_name!r} is {zero_point.dtype} but the quantized tensor is {qtype}"
            )
        if zero_point.shape != scale.shape:
            raise ModelError(
                f"{where}: zero point {zp_name!r} has shape {list(zero_point.shape)}, scale {scale_name!r} "
                f"{list(scale.shape)}; they must match"
            )
        if qtype == "int32" and np.any(zero_point != 0):
            raise ModelError(f"{where}: an int32 DequantizeLinear (a bias) must have zero point 0 (ONNX)")
    axis = None
    if scale.ndim == 1 and scale.size > 1:  # one element counts as per tensor, as in ONNX Runtime
        axis = int(index.attribute(node, "axis", 1))
        _check_axis(node, index, axis, scale.size, where)
    elif scale.ndim > 1 and index.attribute(node, "block_size") is None:
        raise ModelError(f"{where}: scale {scale_name!r} has {scale.ndim} dimensions but the node has no block_size")
    return QdqParams(node, scale_name, scale, zp_name, zero_point, qtype, axis)


def _constant(index: GraphIndex, name: str, what: str, where: str) -> np.ndarray:
    if not index.is_constant(name):
        producer = index.producer.get(name)
        origin = f"it is computed by node {node_label(producer)}" if producer is not None else "it is a graph input"
        raise ModelError(f"{where}: {what} {name!r} is not a constant ({origin}); quantization parameters must be fixed")
    value = index.constant_value(name)
    if value is None:
        raise ModelError(f"{where}: {what} {name!r} has no readable value")
    return value


def _quantized_type(node: onnx.NodeProto, index: GraphIndex, zero_point: np.ndarray | None, where: str) -> str:
    """The integer type on the quantized side: what the Q writes, or what the DQ reads."""
    if node.op_type == "QuantizeLinear":
        declared = index.attribute(node, "output_dtype", 0) or 0
        elem = int(declared) if declared else (
            onnx.helper.np_dtype_to_tensor_dtype(zero_point.dtype) if zero_point is not None else TensorProto.UINT8
        )
        if elem == TensorProto.INT32:
            raise ModelError(f"{where}: QuantizeLinear cannot produce int32")
    else:
        producer = index.producer.get(node.input[0])
        after_q = producer is not None and is_qdq(producer) and producer.op_type == "QuantizeLinear"
        # Behind a Q, the zero point says what the DQ expects; validate_qdq compares it with the Q's.
        elem = 0 if after_q else (index.elem_type(node.input[0]) or 0)
        if not elem and zero_point is not None:
            elem = onnx.helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    if elem not in _QTYPES:
        name = onnx.TensorProto.DataType.Name(elem) if elem else "unknown"
        raise ModelError(f"{where}: quantized type {name} is not an integer type ONNX Runtime quantizes to")
    return _QTYPES[elem]


def _check_axis(node: onnx.NodeProto, index: GraphIndex, axis: int, channels: int, where: str) -> None:
    tensor = node.input[0]
    shape = index.shape(tensor)
    if shape is None and index.is_constant(tensor):
        value = index.constant_value(tensor)
        shape = list(value.shape) if value is not None else None
    if shape is None:
        return  # rank unknown (no shape information): ONNX Runtime checks it at load time
    rank = len(shape)
    if not -rank <= axis < rank:
        raise ModelError(f"{where}: per-channel axis {axis} is out of range for tensor {tensor!r} of rank {rank}")
    dim = shape[axis % rank]
    if isinstance(dim, int) and dim > 0 and dim != channels:
        raise ModelError(
            f"{where}: {channels} per-channel scale(s) for tensor {tensor!r}, whose axis {axis} has {dim} channel(s)"
        )


# -- filling in -------------------------------------------------------------------------------------------
@dataclass
class _Fill:
    model: onnx.ModelProto
    index: GraphIndex
    params: dict[str, QdqParams]  # DequantizeLinear output -> its parameters
    names: FreshNames
    head: list[onnx.NodeProto] = field(default_factory=list)
    filled: dict[str, str] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)
    filled_weights: dict[str, int] = field(default_factory=dict)  # DQ output of a weight quantized here -> rank

    def dq_of(self, tensor: str) -> QdqParams | None:
        return self.params.get(tensor)


def _fill_missing(model: onnx.ModelProto, found: dict[str, QdqParams], quantize_weights: bool) -> tuple[dict, dict]:
    index = GraphIndex(model)
    dq_params = {p.node.output[0]: p for p in found.values() if p.node.op_type == "DequantizeLinear"}
    fill = _Fill(model, index, dq_params, FreshNames(model))
    per_channel_ok = model_opset(model) >= 13
    for node in list(model.graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        x = fill.dq_of(node.input[0])
        if x is None or not x.per_tensor:
            continue  # only a quantized input makes an integer kernel possible
        axis = _output_axis(node, index)
        w = fill.dq_of(node.input[1])
        if w is None and quantize_weights and index.is_float(node.input[1]) and index.is_constant(node.input[1]):
            w = _quantize_weight(fill, node, axis if per_channel_ok else None)
        if w is None:
            continue
        bias, consumer, slot = _float_bias(node, index)
        if bias is None:
            continue
        _quantize_bias(fill, node, x, w, axis, bias, consumer, slot)
    if fill.head:
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(fill.head + nodes)
        drop_unused_constants(model.graph)
    return fill.filled, fill.left


def _output_axis(node: onnx.NodeProto, index: GraphIndex) -> int:
    """The weight axis holding output channels (where per-channel scales and the bias line up)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if index.attribute(node, "transB", 0) else 1
    return 1  # MatMul with a 2-D constant weight [K, N]


def _quantize_weight(fill: _Fill, node: onnx.NodeProto, axis: int | None) -> QdqParams | None:
    name = node.input[1]
    values = fill.index.constant_value(name)
    if values is None or not values.size or not np.all(np.isfinite(values)):
        fill.left[name] = f"float weight of {node_label(node)} is empty or not finite; left float"
        return None
    if node.op_type == "MatMul" and values.ndim != 2:
        fill.left[name] = f"float weight of {node_label(node)} is not 2-D; left float"
        return None
    from ortq.pipeline.params import weight_params

    params = weight_params(values.astype(np.float32), QuantSpec(QuantType.INT8, symmetric=True, axis=axis), name)
    q = quantize_array(values, params)
    scale = params.scale.astype(values.dtype)
    dq = _constant_dq(fill, name, q, scale, params.zero_point, params.axis if params.per_channel else None)
    node.input[1] = dq.output[0]
    fill.filled[name] = (
        f"float weight of {node_label(node)} quantized to int8 symmetric "
        + (f"per channel (axis {params.axis})" if params.per_channel else "per tensor")
    )
    found = QdqParams(
        dq, dq.input[1], scale, dq.input[2], params.zero_point, "int8", params.axis if params.per_channel else None
    )
    fill.params[dq.output[0]] = found
    fill.filled_weights[dq.output[0]] = values.ndim
    return found


def _float_bias(node: onnx.NodeProto, index: GraphIndex) -> tuple[str | None, onnx.NodeProto | None, int]:
    """The float constant bias of ``node`` and where it is read: (tensor, reading node, input slot)."""
    if node.op_type in ("Conv", "Gemm"):
        if len(node.input) < 3 or not node.input[2]:
            return None, None, -1
        if node.op_type == "Gemm" and float(index.attribute(node, "beta", 1.0)) != 1.0:
            return None, None, -1  # the bias is scaled by beta: an int32 bias at input x weight scale is not it
        name = node.input[2]
        ok = index.is_constant(name) and index.is_float(name)
        return (name, node, 2) if ok else (None, None, -1)
    readers = index.consumers.get(node.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Add" or node.output[0] in index.graph_outputs:
        return None, None, -1
    add = readers[0]
    slot = 1 if add.input[0] == node.output[0] else 0
    name = add.input[slot]
    ok = index.is_constant(name) and index.is_float(name)
    return (name, add, slot) if ok else (None, None, -1)


def _quantize_bias(
    fill: _Fill, node: onnx.NodeProto, x: QdqParams, w: QdqParams, axis: int, bias: str,
    consumer: onnx.NodeProto, slot: int,
) -> None:
    values = fill.index.constant_value(bias)
    where = f"float bias {bias!r} of {node_label(node)}"
    if values is None or values.ndim != 1:
        fill.left[bias] = f"{where} is not a 1-D constant; left float"
        return
    source = _weight_source(w, fill.index)
    if w.node.output[0] in fill.filled_weights:
        rank: int | None = fill.filled_weights[w.node.output[0]]
    elif source is not None:
        shape = fill.index.shape(source)
        rank = len(shape) if shape is not None else None
    else:
        fill.left[bias] = f"{where}: the weight is not a quantized constant; left float"
        return
    if node.op_type == "MatMul" and rank != 2:
        fill.left[bias] = f"{where}: the weight is not 2-D; left float"
        return
    if w.axis is not None and rank and w.axis % rank != axis:
        fill.left[bias] = f"{where}: the weight is quantized along axis {w.axis}, not the output channels; left float"
        return
    if w.axis is not None and w.scale.size != values.size:
        fill.left[bias] = f"{where}: {values.size} values for {w.scale.size} weight scales; left float"
        return
    scale = (x.scale.astype(np.float64) * w.scale.astype(np.float64)).astype(np.float32)
    if w.axis is None:
        scale = scale.reshape(())  # a 1-D scale would mean per-axis to DequantizeLinear
    q = np.rint(values.astype(np.float64) / scale.astype(np.float64))
    if np.any(q > _INT32.max) or np.any(q < _INT32.min):
        fill.left[bias] = f"{where} does not fit int32 at scale input x weight; left float"
        return
    dq = _constant_dq(
        fill, bias, q.astype(np.int32), scale.astype(values.dtype), np.zeros(scale.shape, np.int32),
        0 if w.axis is not None else None,
    )
    consumer.input[slot] = dq.output[0]
    fill.filled[bias] = f"{where} became int32 (scale = input scale x weight scale, zero point 0)"


def _weight_source(w: QdqParams, index: GraphIndex) -> str | None:
    """The constant behind a weight's DQ: its integer input, or the float constant a QuantizeLinear
    quantizes in front of it (PyTorch exports fake-quantized weights as float -> Q -> DQ). None if the
    weight is computed."""
    data = w.node.input[0]
    if index.is_constant(data):
        return data
    producer = index.producer.get(data)
    if producer is not None and is_qdq(producer) and producer.op_type == "QuantizeLinear":
        if index.is_constant(producer.input[0]):
            return producer.input[0]
    return None


def _constant_dq(
    fill: _Fill, name: str, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None
) -> onnx.NodeProto:
    """The QDQ rewriter's constant DequantizeLinear, placed at the head of the graph."""
    dq = constant_dq(fill.model.graph, fill.names, name, q, scale, zero_point, axis)
    fill.head.append(dq)
    return dq


# -- the entry point --------------------------------------------------------------------------------------
@dataclass
class QatResult:
    """What :func:`quantize_qat` found, added and measured."""

    model: onnx.ModelProto
    output: Path | None
    quant_format: str
    #: Q and DQ nodes found in the input, all validated and kept as they were.
    quantize_nodes: int
    dequantize_nodes: int
    #: tensor -> what was filled in.
    filled: dict[str, str]
    #: tensor -> why it was not filled in.
    left_float: dict[str, str]
    #: QOperator conversion: node -> why it stayed in QDQ form.
    left_qdq: dict[str, str]
    verification: VerificationReport
    input_bytes: int
    output_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"validated {self.quantize_nodes} QuantizeLinear and {self.dequantize_nodes} DequantizeLinear node(s); "
            f"every scale and zero point kept; filled in {len(self.filled)} tensor(s); format {self.quant_format}",
            f"size: {self.input_bytes / 1e6:.3f} MB -> {self.output_bytes / 1e6:.3f} MB",
        ]
        lines += [f"filled {name!r}: {what}" for name, what in self.filled.items()]
        lines += [f"left {name!r}: {why}" for name, why in self.left_float.items()]
        lines += [f"kept QDQ at {name!r}: {why}" for name, why in self.left_qdq.items()]
        for o in self.verification.outputs:
            top1 = f", top-1 agreement {o.top1_agreement:.2%}" if o.top1_agreement is not None else ""
            lines.append(
                f"output {o.name!r} vs the input model: SQNR {o.sqnr_db:.1f} dB, max abs error {o.max_abs_error:.4g}"
                f"{top1} ({self.verification.samples} sample(s))"
            )
        return "\n".join(lines)


def quantize_qat(
    toolkit: PluginHost,
    model: str | Path | onnx.ModelProto,
    output: str | Path | None = None,
    *,
    quant_format: str = "qdq",
    verify_data: Any = None,
    quantize_weights: bool = True,
    batch_size: int | None = None,
    max_samples: int | None = 64,
    providers: Sequence[Any] | None = None,
) -> QatResult:
    """Validate and complete an already quantized (QAT) model; optionally write it to ``output``.

    ``quant_format="qoperator"`` converts the completed QDQ model to ONNX Runtime's QLinear operators.
    ``verify_data`` (any calibration-data source) is run through the input and the output model to compare
    them; without it the output is still checked (onnx.checker full check, an ONNX Runtime load).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fmt = parse_quant_format(quant_format)
    out = check_output_path(output) if output is not None else None
    refuse_overwriting_inputs([out], {"model": model, "verification data": verify_data}, models=[model])
    loaded = read_model(model)
    proto, label = loaded.model, str(loaded.source) if loaded.source else "model"
    input_bytes = model_size(proto)
    try:
        proto = infer_shapes(proto)  # ranks for the per-channel checks
    except Exception as exc:  # shape inference is a help, never a requirement
        log.warning("%s: shape inference failed (%s)", label, exc)
    found = validate_qdq(proto, label)
    if not found:
        raise ModelError(
            f"{label} holds no QuantizeLinear/DequantizeLinear nodes: it is a float model; quantize it with "
            "`ortq quantize` (ortq.quantize) instead"
        )
    timings["validate"] = time.perf_counter() - t0

    # The input model's outputs, taken before it is completed in place: no second copy of the weights.
    t1 = time.perf_counter()
    feeds, reference = _reference_outputs(proto, label, verify_data, batch_size, max_samples, providers)
    timings["reference"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    filled, left = _fill_missing(proto, found, quantize_weights)
    for name, why in left.items():
        log.info("%s: %s", label, why)
    left_qdq: dict[str, str] = {}
    if fmt == "qoperator":
        left_qdq = convert_to_qoperator(proto, toolkit)
    timings["fill"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    report = verify_model(proto, feeds, reference, providers)
    timings["verify"] = time.perf_counter() - t2
    result = QatResult(
        proto, out, fmt, sum(p.node.op_type == "QuantizeLinear" for p in found.values()),
        sum(p.node.op_type == "DequantizeLinear" for p in found.values()), filled, left, left_qdq, report,
        input_bytes, model_size(proto), timings,
    )
    if out is not None:
        with staged_save(proto, out, external_data=loaded.external_data or None, protect=loaded.external_files):
            pass
    return result


def _reference_outputs(
    model: onnx.ModelProto, label: str, data: Any, batch_size: int | None, max_samples: int | None,
    providers: Sequence[Any] | None,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """The input model's outputs on ``data``: what the completed model must stay close to."""
    if data is None:
        return [], []
    from ortq.io.data import iter_batches, model_inputs
    from ortq.pipeline.verify import make_session, run_outputs

    try:
        session = make_session(model, providers)
    except Exception as exc:
        raise ModelError(f"{label}: ONNX Runtime cannot load the input model to compare with: {exc}") from None
    return run_outputs(session, iter_batches(data, model_inputs(model), batch_size, max_samples))
