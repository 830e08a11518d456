"""Tensor-by-tensor comparison of a float model and its quantized version: where does the error come from?

A quantized model's output error is the sum of many small injections, one per quantizer, amplified or
damped by every layer after it. Comparing only the outputs says *that* it went wrong; comparing every
tensor says *where*, but the accumulated error grows monotonically along the graph, so ranking by it
always blames the last layer. This module therefore measures two things for each quantized tensor:

* the **accumulated** error: the quantized model's value of the tensor against the float model's
  (SQNR, cosine similarity, max abs error, per-channel SQNR), everything upstream included;
* the **injected** error: the quantized model's own scale and zero point applied in numpy to the
  *float* model's value of the tensor, i.e. the noise this one quantizer adds on clean inputs. The
  report ranks by it (worst first), so the layer that causes the damage comes first.

Both come with a per-channel-averaged SQNR (the mean over channels of each channel's SQNR in dB), because
a whole-tensor SQNR is dominated by the loudest channel: one outlier channel that forces a huge scale
and crushes every other channel to zero still scores a fine whole-tensor SQNR.

Matching a quantized tensor to its float counterpart works on the structure first and the names second
(see :func:`match_tensors`), so ortq's models, ONNX Runtime's quantizer's (``_QuantizeLinear_Output`` /
``_DequantizeLinear_Output``), QOperator models (QLinearConv, QLinearMatMul, com.microsoft QLinearAdd ...,
whose integer outputs are dequantized here with the scale and zero point their producer writes), dynamic
quantization (DynamicQuantizeLinear's per-batch scale is fetched with each batch; the int8 weights of
MatMulIntegerToFloat / DynamicQuantizeMatMul / QAttention and DynamicQuantizeLSTM's W and R, transposed back
to the LSTM's layout, are matched; the float tensors those kernels write are compared by name) and QAT
exports all match where the information is there. Statistics are streamed batch
by batch (sums only), so memory does not grow with the number of samples.

Not covered: blocked quantization (DequantizeLinear ``block_size``), ConvInteger / MatMulInteger (no scale
in the node) and contrib QLinear ops outside :data:`_QOPERATOR`: their tensors are not compared.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import onnx
from onnx import helper

from ortq.io.data import feed_samples, iter_batches, model_inputs
from ortq.core.errors import ModelError
from ortq.core.graph import GraphIndex
from ortq.core.error_measures import sqnr_from_sums
from ortq.tools.debug_report import DEFAULT_SORT, SORT_KEYS, DebugReport, TensorComparison

__all__ = [
    "debug_models",
    "DebugReport",
    "TensorComparison",
    "MatchedTensor",
    "match_tensors",
    "SORT_KEYS",
    "DEFAULT_SORT",
    "DEFAULT_MAX_SAMPLES",
]

log = logging.getLogger(__name__)

#: Samples compared by default: enough for stable per-channel sums on small models, quick on large ones.
DEFAULT_MAX_SAMPLES = 128
#: A channel (or tensor) quantized without any error counts as this many dB in per-channel averages, so
#: one exact channel cannot make the average infinite.
EXACT_DB = 120.0


_INTEGER_RANGES = {
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.INT32: (-(2**31), 2**31 - 1),
    onnx.TensorProto.UINT4: (0, 15),
    onnx.TensorProto.INT4: (-8, 7),
}
# Suffixes quantizers append to a float tensor's name (ortq, ONNX Runtime QDQ and QOperator), optionally
# followed by the "_<k>" that makes a name unique (ortq.core.graph.FreshNames).
_SUFFIXES = re.compile(
    r"(_dequantized|_DequantizeLinear_Output|_DequantizeLinear|_quantized|_QuantizeLinear_Output|_QuantizeLinear"
    r"|_float|_output_quantized)(_\d+)?$"
)
_NODE_SUFFIXES = re.compile(r"(_quant|_QuantizeLinear|_DequantizeLinear|_dequant)(_\d+)?$")
# Conv-like producers whose rank-3 outputs are [N, C, L] (channel on axis 1) rather than [N, S, C].
_CHANNEL_FIRST_OPS = {
    "Conv", "ConvTranspose", "QLinearConv", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "InstanceNormalization", "LpPool", "ConvInteger",
}


# ---------------------------------------------------------------------------------------------------------
# matching


@dataclass(frozen=True, eq=False)
class MatchedTensor:
    """An integer tensor of the quantized model, how to dequantize it, and the float tensor it stands for."""

    name: str  # the integer tensor in the quantized model
    float_name: str  # its counterpart in the float model
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None  # None: per-tensor
    elem_type: int  # ONNX element type of the integer tensor
    constant: bool  # an initializer / Constant of the quantized model (computed in numpy, never run)
    matched_by: str  # how the counterpart was found: "quantize-input", "name", "consumer", "producer"
    # Dynamic quantization: scale and zero point computed at run time (DynamicQuantizeLinear's outputs),
    # fetched with every batch; ``scale`` / ``zero_point`` are then placeholders until the batch is known.
    runtime_params: tuple[str, str | None] | None = None
    # A kernel that stores its weight in its own layout (DynamicQuantizeLSTM: [directions, input, 4*hidden]
    # for the LSTM's [directions, 4*hidden, input]): the transposition back to the float model's layout,
    # in which ``axis`` is given. None: the same layout.
    perm: tuple[int, ...] | None = None

    @property
    def qrange(self) -> tuple[int, int]:
        return _INTEGER_RANGES[self.elem_type]

    def float_layout(self, q: np.ndarray) -> np.ndarray:
        """The integer tensor as the float model lays its counterpart out (a view, nothing copied)."""
        return q.transpose(self.perm) if self.perm is not None and q.ndim == len(self.perm) else q

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        scale, zp = self._broadcast(q.ndim)
        # In place on one float64 buffer: the same operations as (q - zp) * scale without two temporaries,
        # which for a 224x224 feature map are 50 MB each and dominated ortq debug's time.
        out = np.asarray(q).astype(np.float64)
        out -= zp
        out *= scale
        return out

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        """What QuantizeLinear then DequantizeLinear with these parameters make of float values ``x``."""
        scale, zp = self._broadcast(x.ndim)
        lo, hi = self.qrange
        # clip(rint(x / scale) + zp, lo, hi) - zp, then * scale, in place on one float64 buffer. Clipping the
        # rounded value to [lo - zp, hi - zp] instead is the same integer arithmetic, exact in float64.
        q = np.asarray(np.divide(x, scale, dtype=np.float64))  # a 0-d result is a scalar: make it writable
        np.rint(q, out=q)  # rint: round half to even, as ONNX
        np.clip(q, lo - zp, hi - zp, out=q)
        q *= scale
        return q

    def clip_bounds(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """Float values beyond these are clipped (within half a step of the range they only round)."""
        scale, zp = self._broadcast(ndim)
        lo, hi = self.qrange
        return (lo - zp - 0.5) * scale, (hi - zp + 0.5) * scale

    def _broadcast(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        scale = self.scale.astype(np.float64)
        zp = self.zero_point.astype(np.float64)
        if self.axis is None or scale.size == 1:
            return scale.reshape(()), zp.reshape(())
        # A scale of rank k runs along axes axis .. axis+k-1 (DynamicQuantizeLSTM's per-gate-column scales
        # [directions, 4*hidden] along W's first two axes); rank 1 is the usual per-channel axis.
        shape = [1] * ndim
        start = self.axis % ndim
        shape[start : start + scale.ndim] = scale.shape
        return scale.reshape(shape), zp.reshape(shape)


def match_tensors(float_model: onnx.ModelProto, quantized_model: onnx.ModelProto) -> tuple[list[MatchedTensor], list[str]]:
    """Pair every quantized (integer) tensor of ``quantized_model`` with a float tensor of ``float_model``.

    A quantized tensor is an integer tensor whose scale and zero point a node states: a DequantizeLinear
    reading it, or a QOperator op reading or writing it (:data:`_QOPERATOR` lists the signatures; an
    int32 bias of QLinearConv / QGemm gets the input scale times the weight scale). Its float
    counterpart is, in this order:

    1. the input of the QuantizeLinear that produced it, if the float model has that tensor (ortq, ONNX
       Runtime and QAT exports all quantize a tensor that keeps its float name); ortq's renamed graph
       outputs (``<name>_float``) are followed back to ``<name>``;
    2. a float-model tensor named like it or like its DequantizeLinear's output once the quantizers'
       suffixes are removed (``_quantized``, ``_dequantized``, ``_DequantizeLinear_Output`` ..., each
       possibly with FreshNames' ``_<k>``), or the DequantizeLinear's output itself when it is a graph
       output of both models;
    3. the input, at the same position, of a float-model node with the same name and op type as a node
       that reads the dequantized value (weights of QDQ models with unusual names);
    4. the output, at the same position, of a float-model node with the producer's name (QOperator ops
       keep, or suffix, the name of the node they replace).

    A counterpart whose only consumer in the float model is a Relu (or Clip) that the quantized model
    folded away (the Relu's output is missing there and the zero point is the integer minimum, so the
    clamp happens in the kernel) is replaced by the Relu's output: that is what the integer tensor holds.

    Returns the matches and the names of quantized tensors left unmatched.
    """
    fidx = GraphIndex(float_model)
    qidx = GraphIndex(quantized_model)
    float_tensors = _float_tensors(fidx)
    fnodes = {n.name: n for n in fidx.graph.node if n.name}  # steps 3 and 4 look nodes up by name
    qnames = set(qidx.producer) | set(qidx.initializers) | qidx.graph_inputs
    found: list[MatchedTensor] = []
    unmatched: list[str] = []
    for name, site in _quantized_tensors(qidx).items():
        scale, zero_point = site.scale, site.zero_point
        elem_type = _integer_type(qidx, name, zero_point)
        if elem_type not in _INTEGER_RANGES:
            unmatched.append(name)
            continue
        if zero_point is None:
            zero_point = np.zeros(scale.shape, dtype=np.int64)
        counterpart = _counterpart(name, fidx, qidx, float_tensors, fnodes)
        if counterpart is None:
            unmatched.append(name)
            continue
        float_name, how = counterpart
        float_name = _folded_activation(float_name, zero_point, elem_type, fidx, qnames)
        found.append(MatchedTensor(
            name=name, float_name=float_name, scale=scale, zero_point=np.asarray(zero_point),
            axis=site.axis if scale.size > 1 else None, elem_type=elem_type,
            constant=qidx.is_constant(name), matched_by=how, runtime_params=site.runtime_params, perm=site.perm,
        ))
    return found, unmatched


def _float_tensors(idx: GraphIndex) -> set[str]:
    names = set(idx.producer) | set(idx.initializers) | idx.graph_inputs
    return {n for n in names if idx.elem_type(n) in (None, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                    onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)}


def _folded_activation(name: str, zero_point: np.ndarray, elem_type: int, fidx: GraphIndex, qnames: set[str]) -> str:
    consumers = fidx.consumers.get(name, [])
    if len(consumers) != 1 or consumers[0].op_type not in ("Relu", "Clip") or name in fidx.graph_outputs:
        return name
    folded = consumers[0].output[0]
    if folded in qnames or np.any(np.asarray(zero_point) != _INTEGER_RANGES[elem_type][0]):
        return name
    return folded


# QOperator signatures: (input positions of (tensor, scale, zero point) triples, output (scale, zero point)
# positions or None, bias position or None). Ops not listed here are not read (their tensors stay unmatched).
# Dynamic-quantization kernels state their constant weight's parameters at other positions (_DYNAMIC_WEIGHTS).
_QOPERATOR: dict[str, tuple[tuple[int, ...], tuple[int, int] | None, int | None]] = {
    "QLinearConv": ((0, 3), (6, 7), 8),
    "QLinearMatMul": ((0, 3), (6, 7), None),
    "QGemm": ((0, 3), (7, 8), 6),
    "QLinearAdd": ((0, 3), (6, 7), None),
    "QLinearMul": ((0, 3), (6, 7), None),
    "QLinearSigmoid": ((0,), (3, 4), None),
    "QLinearLeakyRelu": ((0,), (3, 4), None),
    "QLinearGlobalAveragePool": ((0,), (3, 4), None),
    "QLinearAveragePool": ((0,), (3, 4), None),
    "QLinearSoftmax": ((0,), (3, 4), None),
}


class _KernelWeight(NamedTuple):
    """Where one of a dynamic kernel's constant integer weights and its parameters are, and how they relate
    to the float model's weight (``axis`` in the float layout; ``perm`` from the kernel's layout to it)."""

    weight: int
    scale: int
    zero_point: int
    axis: int = -1  # MatMul-like weights are per column
    perm: tuple[int, ...] | None = None


#: ONNX Runtime's dynamic kernels and their constant weights (the activations they quantize themselves,
#: in the kernel, are not visible). DynamicQuantizeLSTM keeps W / R as [directions, k, 4*hidden], the
#: LSTM's transposed, with scales per direction or per gate column ([directions, 4*hidden]).
_DYNAMIC_WEIGHTS: dict[str, tuple[_KernelWeight, ...]] = {
    "MatMulIntegerToFloat": (_KernelWeight(1, 3, 5),),
    "DynamicQuantizeMatMul": (_KernelWeight(1, 2, 3),),
    "QAttention": (_KernelWeight(1, 4, 7),),
    "DynamicQuantizeLSTM": (_KernelWeight(1, 8, 9, axis=0, perm=(0, 2, 1)),  # W
                            _KernelWeight(2, 10, 11, axis=0, perm=(0, 2, 1))),  # R
}
#: Integer kernels that write float: their outputs are compared by name with the float model's. Every dynamic
#: kernel does (float in, float out, integers only inside).
FLOAT_OUTPUT_KERNELS = frozenset(_DYNAMIC_WEIGHTS)


class _Site(NamedTuple):
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int
    # Dynamic quantization: the names of the scale and zero point computed at run time.
    runtime_params: tuple[str, str | None] | None = None
    perm: tuple[int, ...] | None = None


def _quantized_tensors(qidx: GraphIndex) -> dict[str, _Site]:
    """Integer tensor -> where its scale and zero point come from (:class:`_Site`); the first statement in
    graph order wins."""
    out: dict[str, _Site] = {}

    def add(tensor: str, scale_name: str, zp_name: str | None, axis: int, perm: tuple[int, ...] | None = None) -> None:
        if not tensor or tensor in out:
            return
        scale = qidx.constant_value(scale_name) if scale_name else None
        zero_point = qidx.constant_value(zp_name) if zp_name else None
        if scale is None or scale.dtype.kind != "f" or (zero_point is not None and zero_point.dtype.kind not in "iu"):
            return
        out[tensor] = _Site(np.asarray(scale), zero_point, axis, perm=perm)

    def arg(node: onnx.NodeProto, i: int) -> str | None:
        return node.input[i] if i < len(node.input) and node.input[i] else None

    for node in qidx.graph.node:
        if node.op_type == "DynamicQuantizeLinear" and len(node.output) == 3 and node.output[0] not in out:
            # uint8, per tensor, scale and zero point chosen per batch: placeholders until run time.
            out[node.output[0]] = _Site(np.ones((), np.float32), np.zeros((), np.uint8), 0,
                                        (node.output[1], node.output[2]))
            continue
        if node.op_type in _DYNAMIC_WEIGHTS:
            for kw in _DYNAMIC_WEIGHTS[node.op_type]:
                if arg(node, kw.weight) and arg(node, kw.scale) and qidx.is_constant(node.input[kw.weight]):
                    add(node.input[kw.weight], node.input[kw.scale], arg(node, kw.zero_point), kw.axis, kw.perm)
            continue
        if node.op_type == "DequantizeLinear":
            if int(qidx.attribute(node, "block_size", 0) or 0):
                continue  # blocked quantization: scales per block, not covered here
            add(node.input[0], node.input[1], arg(node, 2), int(qidx.attribute(node, "axis", 1)))
            continue
        if node.op_type == "QLinearConcat":
            triples: tuple[int, ...] = tuple(range(2, len(node.input) - 2, 3))
            output, bias = (0, 1), None
        elif node.op_type in _QOPERATOR:
            triples, output, bias = _QOPERATOR[node.op_type]
        else:
            continue
        for position, i in enumerate(triples):
            tensor = arg(node, i)
            if tensor is None or i + 1 >= len(node.input):
                continue
            axis = 0  # only weights are per channel: QLinearConv's along axis 0, MatMul-like ones per column
            if position == 1 and node.op_type == "QGemm":
                axis = 0 if qidx.attribute(node, "transB", 0) else 1
            elif position == 1 and node.op_type != "QLinearConv":
                axis = -1
            add(tensor, node.input[i + 1], arg(node, i + 2), axis)
        if output is not None and arg(node, output[0]):
            add(node.output[0], node.input[output[0]], arg(node, output[1]), 1)
        if bias is not None and arg(node, bias) and arg(node, 1) and arg(node, 4):
            s_in, s_w = qidx.constant_value(node.input[1]), qidx.constant_value(node.input[4])
            if s_in is not None and s_w is not None and node.input[bias] not in out:
                scale = (s_in.astype(np.float64) * s_w.astype(np.float64)).astype(np.float32)
                out[node.input[bias]] = _Site(scale, None, 0)
    return out


def _integer_type(qidx: GraphIndex, name: str, zero_point: np.ndarray | None) -> int | None:
    if zero_point is not None:
        return helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    elem = qidx.elem_type(name)
    if elem is not None:
        return elem
    producer = qidx.producer.get(name)
    if producer is not None and producer.op_type == "QuantizeLinear":
        return int(qidx.attribute(producer, "output_dtype", 0) or onnx.TensorProto.UINT8)
    return onnx.TensorProto.UINT8  # QuantizeLinear's default without a zero point


def _strip(name: str) -> str | None:
    stripped = _SUFFIXES.sub("", name)
    return stripped if stripped != name else None


def _counterpart(name: str, fidx: GraphIndex, qidx: GraphIndex, float_tensors: set[str],
                 fnodes: dict[str, onnx.NodeProto]) -> tuple[str, str] | None:
    producer = qidx.producer.get(name)
    # 1. the QuantizeLinear's float input
    if producer is not None and producer.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
        source = producer.input[0]
        for candidate in (source, _strip(source)):
            if candidate in float_tensors:
                return candidate, "quantize-input"
    # 2. names
    dq_outputs = [n.output[0] for n in qidx.consumers.get(name, []) if n.op_type == "DequantizeLinear"]
    for out in dq_outputs:
        if out in qidx.graph_outputs and out in fidx.graph_outputs:
            return out, "name"
    for candidate in (*(_strip(o) for o in dq_outputs), _strip(name)):
        if candidate in float_tensors:
            return candidate, "name"
    # 3. a node reading the dequantized value exists in the float model under the same name
    for out in dq_outputs or [name]:
        for consumer in qidx.consumers.get(out, []):
            twin = fnodes.get(consumer.name)
            if twin is None or twin.op_type != consumer.op_type:
                continue
            for pos, tensor in enumerate(consumer.input):
                if tensor == out and pos < len(twin.input) and twin.input[pos] in float_tensors:
                    return twin.input[pos], "consumer"
    # 4. the producing node exists in the float model (QOperator ops)
    if producer is not None and producer.op_type not in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
        base = _NODE_SUFFIXES.sub("", producer.name) if producer.name else ""
        twin = fnodes.get(producer.name) or fnodes.get(base)
        if twin is not None:
            pos = list(producer.output).index(name)
            if pos < len(twin.output) and twin.output[pos] in float_tensors:
                return twin.output[pos], "producer"
    return None


# ---------------------------------------------------------------------------------------------------------
# streaming statistics


class _Stats:
    """Running sums for one tensor pair; per channel along ``axis`` (None: the whole tensor is one channel)."""

    def __init__(self) -> None:
        self.axis: int | None = None
        self.count = 0
        self.signal: np.ndarray | None = None  # per channel sum of ref^2
        self.noise: np.ndarray | None = None  # per channel sum of (ref - actual)^2
        self.injected: np.ndarray | None = None  # per channel sum of (ref - fakequant(ref))^2
        self.dot = 0.0
        self.actual_sq = 0.0
        self.max_error = 0.0
        self.max_injected = 0.0
        self.clipped = 0
        self.float_min = math.inf
        self.float_max = -math.inf

    def update(self, ref: np.ndarray, actual: np.ndarray, injected: np.ndarray | None,
               bounds: tuple[np.ndarray, np.ndarray] | None) -> None:
        # Every sum is taken in float64 as before, but without the temporaries of ``(x * x)`` and of moving
        # the channel axis first (a copy): einsum reduces a (before, channel, after) view in one pass. On
        # the ResNet-18 shape at 224x224 this cut the statistics from 60% of ortq debug's time to ~15%.
        # Sums are reassociated, so results agree with the plain formulas to ~1e-15 relative, not bit for bit.
        low, high = (float(ref.min()), float(ref.max())) if ref.size else (math.inf, -math.inf)
        ref = np.asarray(ref, dtype=np.float64)
        actual = np.asarray(actual, dtype=np.float64)
        err = np.subtract(ref, actual)
        self.signal = _accumulate(self.signal, _channel_sq_sum(ref, self.axis))
        self.noise = _accumulate(self.noise, _channel_sq_sum(err, self.axis))
        self.dot += _dot(ref, actual)
        self.actual_sq += _dot(actual, actual)
        self.max_error = max(self.max_error, _max_abs(err))
        del err
        self.count += ref.size
        self.float_min = min(self.float_min, low)
        self.float_max = max(self.float_max, high)
        if injected is not None:
            inj = np.subtract(ref, injected, out=injected if injected.dtype == np.float64 else None)
            self.injected = _accumulate(self.injected, _channel_sq_sum(inj, self.axis))
            self.max_injected = max(self.max_injected, _max_abs(inj))
        if bounds is not None:
            lo, hi = bounds  # lo < hi, so the two counts never overlap
            self.clipped += int(np.count_nonzero(ref < lo)) + int(np.count_nonzero(ref > hi))


def _channel_sq_sum(values: np.ndarray, axis: int | None) -> np.ndarray:
    """Per-channel sums of squares along ``axis`` (one channel when None), shape ``[channels]``."""
    values = np.ascontiguousarray(values)
    if axis is None or values.ndim == 0:
        flat = values.reshape(-1)
        return np.array([np.einsum("i,i->", flat, flat)])
    axis %= values.ndim
    channels = values.shape[axis]
    view = values.reshape(int(np.prod(values.shape[:axis], dtype=np.int64)), channels, -1) if values.size else \
        np.zeros((1, channels, 1))
    return np.einsum("acb,acb->c", view, view)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.einsum("i,i->", np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)))


def _max_abs(values: np.ndarray) -> float:
    """max(|values|) in two reductions rather than a full-size abs() temporary; 0 for an empty array."""
    if not values.size:
        return 0.0
    return float(max(values.max(), -values.min()))


def _accumulate(total: np.ndarray | None, part: np.ndarray) -> np.ndarray:
    if total is None:
        return part
    if total.shape != part.shape:
        raise ModelError(f"a tensor changed its channel count between batches ({total.size} -> {part.size})")
    return total + part


def _channel_db(signal: np.ndarray | None, noise: np.ndarray | None) -> float | None:
    """Mean over channels of each channel's SQNR in dB; silent channels (no signal) are left out."""
    if signal is None or noise is None or signal.size < 2:
        return None
    live = signal > 0
    if not np.any(live):
        return None
    with np.errstate(divide="ignore"):
        per = 10.0 * np.log10(signal[live] / np.maximum(noise[live], signal[live] * 10 ** (-EXACT_DB / 10)))
    return float(np.mean(np.minimum(per, EXACT_DB)))


def _channel_axis(ndim: int, producer_op: str | None) -> int | None:
    """Activations: channel axis 1 for NCHW-like tensors, the last axis for [N, F] and [N, S, F]."""
    if ndim >= 4:
        return 1
    if ndim == 3:
        return 1 if producer_op in _CHANNEL_FIRST_OPS else 2
    if ndim == 2:
        return 1
    return None


def _weight_axis(q: MatchedTensor, shape: tuple[int, ...], consumer: onnx.NodeProto | None, fidx: GraphIndex) -> int | None:
    """The weight's output-channel axis: the per-channel quantization axis, else the consumer's layout."""
    if not shape or len(shape) < 2:
        return None
    if consumer is not None and consumer.op_type in ("LSTM", "GRU", "RNN") and len(shape) == 3:
        return 1  # W / R are [directions, gates * hidden, k]: a gate row is an output channel, whatever the scales
    if q.axis is not None:
        return q.axis % len(shape)
    if consumer is None:
        return 0
    if consumer.op_type == "Gemm":
        return 0 if fidx.attribute(consumer, "transB", 0) else 1
    if consumer.op_type in ("MatMul", "Attention"):  # com.microsoft.Attention's QKV weight is [input, 3 * hidden]
        return len(shape) - 1
    return 0


# ---------------------------------------------------------------------------------------------------------
# running


def debug_models(
    float_model: str | os.PathLike | onnx.ModelProto,
    quantized_model: str | os.PathLike | onnx.ModelProto,
    data: Any,
    *,
    batch_size: int | None = None,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    providers: Sequence[Any] | None = None,
) -> DebugReport:
    """Run both models on the same inputs and compare every quantized tensor with its float counterpart.

    ``data`` is anything :func:`ortq.io.data.iter_batches` reads (a ``.npz``, a folder, a dict of stacked
    arrays, a list of feed dicts, a ``CalibrationDataReader``). Intermediate tensors are fetched by adding
    them as outputs to private copies of both models (this can keep ONNX Runtime from fusing a few Q/DQ
    patterns; the numbers are those of the unfused graph, equal up to one rounding step per tensor).
    """
    from ortq.io.model_io import infer_shapes, read_model

    fl = read_model(float_model)
    ql = read_model(quantized_model)
    flabel = str(fl.source) if fl.source else "<float ModelProto>"
    qlabel = str(ql.source) if ql.source else "<quantized ModelProto>"
    fmodel, qmodel = fl.model, ql.model
    try:
        infer_shapes(fmodel)
    except Exception as exc:  # types help matching but are not required
        log.debug("shape inference of %s failed: %s", flabel, exc)
    _check_same_inputs(fmodel, qmodel, flabel, qlabel)

    fidx = GraphIndex(fmodel)
    matches, unmatched = match_tensors(fmodel, qmodel)
    _check_matches(matches, unmatched, fidx, qmodel, flabel, qlabel)
    position = {id(n): i for i, n in enumerate(fmodel.graph.node)}
    runner = _Runner(fidx, GraphIndex(qmodel), matches, flabel, qlabel, providers)
    rows = runner.weights(position)
    stats, samples, batches = runner.activations(
        iter_batches(data, model_inputs(fmodel), batch_size, max_samples)
    )
    rows += runner.activation_rows(stats, position)
    return DebugReport(flabel, qlabel, samples, batches, rows, unmatched)


def _check_matches(matches: list[MatchedTensor], unmatched: list[str], fidx: GraphIndex, qmodel: onnx.ModelProto,
                   flabel: str, qlabel: str) -> None:
    """Refuse pairs that cannot be compared: nothing quantized, or nothing (beyond the inputs) in common."""
    if not matches:
        ops = {n.op_type for n in qmodel.graph.node}
        if not (ops & ({"DequantizeLinear", "DynamicQuantizeLinear"} | FLOAT_OUTPUT_KERNELS | _QOPERATOR.keys())):
            raise ModelError(f"{qlabel}: has no quantized tensors (no DequantizeLinear, QLinear* or dynamic integer "
                             "kernel); is it quantized?")
        raise ModelError(
            f"{qlabel}: none of its {len(unmatched)} quantized tensor(s) matches a tensor of {flabel} "
            f"(first: {unmatched[:3]}); is it a quantization of that model?"
        )
    if unmatched and all(m.float_name in fidx.graph_inputs for m in matches):
        raise ModelError(
            f"{qlabel}: only its inputs match {flabel}; none of its other {len(unmatched)} quantized tensor(s) "
            f"matches a tensor of {flabel} (first: {unmatched[:3]}); is it a quantization of that model?"
        )
    for name in unmatched:
        log.info("%s: quantized tensor %r has no float counterpart in %s", qlabel, name, flabel)


def _check_same_inputs(fmodel: onnx.ModelProto, qmodel: onnx.ModelProto, flabel: str, qlabel: str) -> None:
    fin = {s.name: s for s in model_inputs(fmodel)}
    qin = {s.name: s for s in model_inputs(qmodel)}
    if fin.keys() != qin.keys():
        raise ModelError(
            f"the models' inputs differ: {flabel} has {sorted(fin)}, {qlabel} has {sorted(qin)}; "
            "both must read the same inputs"
        )
    for name, spec in fin.items():
        other = qin[name]
        if spec.dtype != other.dtype:
            raise ModelError(f"input {name!r} is {spec.dtype} in {flabel} but {other.dtype} in {qlabel}")
        if spec.shape is not None and other.shape is not None and (
            len(spec.shape) != len(other.shape)
            or any(a is not None and b is not None and a != b for a, b in zip(spec.shape, other.shape))
        ):
            raise ModelError(f"input {name!r} has shape {spec.shape} in {flabel} but {other.shape} in {qlabel}")


class _Runner:
    """Fetches the matched tensors batch by batch and turns their running sums into report rows."""

    def __init__(self, fidx: GraphIndex, qidx: GraphIndex, matches: list[MatchedTensor], flabel: str,
                 qlabel: str, providers: Sequence[Any] | None) -> None:
        self.fidx, self.qidx = fidx, qidx
        self.flabel, self.qlabel = flabel, qlabel
        self.providers = providers
        self.warned: set[str] = set()
        self.const = [m for m in matches if m.constant and fidx.is_constant(m.float_name)]
        self.live = [m for m in matches if not (m.constant and fidx.is_constant(m.float_name))]
        # Float tensors of the quantized model compared by name (no integer tensor stands for them): graph
        # outputs, and what integer kernels that write float (dynamic quantization) produce.
        covered = {m.float_name for m in matches}
        qouts = {o.name for o in qidx.graph.output}
        names = [o.name for o in fidx.graph.output if o.name in qouts]
        names += [o for n in qidx.graph.node if n.op_type in FLOAT_OUTPUT_KERNELS for o in n.output if o in fidx.producer]
        self.float_outputs = list(dict.fromkeys(n for n in names if n not in covered))

    # -- weights: both sides are constants, compared once in numpy
    def weights(self, position: dict[int, int]) -> list[TensorComparison]:
        rows = []
        for m in self.const:
            ref = self.fidx.constant_value(m.float_name)
            q = self.qidx.constant_value(m.name)
            q = m.float_layout(q) if q is not None else None
            if ref is None or q is None or ref.shape != q.shape:
                log.warning("weight %r: float shape %s and quantized shape %s differ; skipped", m.float_name,
                            None if ref is None else ref.shape, None if q is None else q.shape)
                continue
            consumers = self.fidx.consumers.get(m.float_name, [])
            consumer = consumers[0] if consumers else None
            stats = _Stats()
            stats.axis = _weight_axis(m, ref.shape, consumer, self.fidx)
            stats.update(ref, m.dequantize(q), m.fake_quantize(ref), m.clip_bounds(ref.ndim))
            rows.append(self._row(m, m.float_name, "weight", consumer, position, stats))
        return rows

    # -- activations: run both models, stream sums
    def activations(self, batches: Iterable[dict[str, np.ndarray]]) -> tuple[dict[str, _Stats], int, int]:
        from ortq.pipeline.verify import make_session

        inputs = self.fidx.graph_inputs
        float_fetch = sorted({m.float_name for m in self.live if m.float_name not in inputs} | set(self.float_outputs))
        runtime = {name for m in self.live if m.runtime_params for name in m.runtime_params if name}
        quant_fetch = sorted({m.name for m in self.live} | set(self.float_outputs) | runtime)
        fsession = self._session(make_session, self.fidx.model, float_fetch, self.flabel)
        qsession = self._session(make_session, self.qidx.model, quant_fetch, self.qlabel)
        stats: dict[str, _Stats] = {}
        samples = batches_seen = 0
        for index, feed in enumerate(batches):
            fvalues = dict(zip(float_fetch, self._run(fsession, float_fetch, feed, self.flabel, index)))
            fvalues.update(feed)
            qvalues = dict(zip(quant_fetch, self._run(qsession, quant_fetch, feed, self.qlabel, index)))
            for m in self.live:
                ref, q = np.asarray(fvalues[m.float_name]), m.float_layout(np.asarray(qvalues[m.name]))
                if ref.dtype.kind != "f" or q.dtype.kind not in "iu" or not self._compatible(m.name, m.float_name, ref, q):
                    continue
                if m.runtime_params:
                    scale_name, zp_name = m.runtime_params
                    m = dataclasses.replace(m, scale=np.asarray(qvalues[scale_name]),
                                            zero_point=np.asarray(qvalues[zp_name]) if zp_name else np.zeros((), np.uint8))
                st = stats.setdefault(m.name, _Stats())
                if st.count == 0:
                    st.axis = self._activation_axis(m.float_name, ref.ndim)
                ref = np.asarray(ref, dtype=np.float64)  # once, for both the simulation and the sums
                st.update(ref, m.dequantize(q), m.fake_quantize(ref), m.clip_bounds(ref.ndim))
            for name in self.float_outputs:
                ref, actual = np.asarray(fvalues[name]), np.asarray(qvalues[name])
                if ref.dtype.kind != "f" or not self._compatible(name, name, ref, actual):
                    continue
                st = stats.setdefault(f"output:{name}", _Stats())
                if st.count == 0:
                    st.axis = self._activation_axis(name, ref.ndim)
                st.update(ref, actual, None, None)
            samples += feed_samples(feed)
            batches_seen += 1
        return stats, samples, batches_seen

    def _compatible(self, qname: str, fname: str, ref: np.ndarray, q: np.ndarray) -> bool:
        if ref.shape == q.shape:
            return True
        if qname not in self.warned:
            log.warning("%r (quantized %r) has shape %s in %s but %s in %s; not compared", fname, qname, ref.shape,
                        self.flabel, q.shape, self.qlabel)
            self.warned.add(qname)
        return False

    def _activation_axis(self, float_name: str, ndim: int) -> int | None:
        producer = self.fidx.producer.get(float_name)
        return _channel_axis(ndim, producer.op_type if producer is not None else None)

    def _session(self, make_session: Any, model: onnx.ModelProto, fetch: list[str], label: str) -> Any:
        # ``model`` is already debug_models' private copy (read_model): outputs are added to it in place rather
        # than to yet another copy of the weights. The indexes were built before, so they are unaffected.
        existing = {o.name for o in model.graph.output}
        for name in fetch:
            if name not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
        try:
            return make_session(model, self.providers)
        except Exception as exc:
            raise ModelError(f"{label}: ONNX Runtime cannot load it: {str(exc).strip().splitlines()[0]}") from None

    @staticmethod
    def _run(session: Any, fetch: list[str], feed: dict[str, np.ndarray], label: str, index: int) -> list[Any]:
        if not fetch:
            return []
        try:
            return session.run(fetch, feed)
        except Exception as exc:
            raise ModelError(f"{label}: ONNX Runtime failed on batch {index}: {str(exc).strip().splitlines()[0]}") from None

    def activation_rows(self, stats: dict[str, _Stats], position: dict[int, int]) -> list[TensorComparison]:
        rows = []
        for m in self.live:
            st = stats.get(m.name)
            if st is None:
                continue
            producer = self.fidx.producer.get(m.float_name)
            kind = "weight" if self.fidx.is_constant(m.float_name) else "activation"
            node = producer
            if kind == "weight":
                consumers = self.fidx.consumers.get(m.float_name, [])
                node = consumers[0] if consumers else None
            rows.append(self._row(m, m.float_name, kind, node, position, st))
        for name in self.float_outputs:
            st = stats.get(f"output:{name}")
            if st is None:  # not float (an ArgMax label) or another shape: nothing was summed
                continue
            kind = "output" if name in self.fidx.graph_outputs else "float"
            rows.append(self._row(None, name, kind, self.fidx.producer.get(name), position, st))
        return rows

    def _row(self, m: MatchedTensor | None, float_name: str, kind: str, node: onnx.NodeProto | None,
             position: dict[int, int], st: _Stats) -> TensorComparison:
        signal = float(st.signal.sum()) if st.signal is not None else 0.0
        noise = float(st.noise.sum()) if st.noise is not None else 0.0
        denom = math.sqrt(signal * st.actual_sq)
        cosine = st.dot / denom if denom else float(signal == st.actual_sq)
        injected = float(st.injected.sum()) if st.injected is not None else None
        if node is None:
            order = -1
        else:
            order = position.get(id(node), -1)
        scale = zp = None
        if m is not None and m.runtime_params is None:  # dynamic quantization: a new scale every batch
            scale = float(np.max(np.abs(m.scale)))
            zp = int(np.asarray(m.zero_point).reshape(-1)[0])
        return TensorComparison(
            tensor=float_name,
            quantized_tensor=m.name if m is not None else None,
            kind=kind,
            node=(node.name or None) if node is not None else ("graph input" if float_name in self.fidx.graph_inputs else None),
            op_type=node.op_type if node is not None else None,
            order=order,
            sqnr_db=sqnr_from_sums(signal, noise),
            channel_sqnr_db=_channel_db(st.signal, st.noise),
            cosine=cosine,
            max_abs_error=st.max_error,
            injected_sqnr_db=sqnr_from_sums(signal, injected) if injected is not None else None,
            injected_channel_sqnr_db=_channel_db(st.signal, st.injected) if injected is not None else None,
            injected_max_abs_error=st.max_injected if m is not None else None,
            clipped_fraction=(st.clipped / st.count if st.count else 0.0) if m is not None else None,
            float_min=st.float_min if st.count else 0.0,
            float_max=st.float_max if st.count else 0.0,
            scale=scale,
            zero_point=zp,
            per_channel=bool(m is not None and m.axis is not None),
            quant_type=onnx.TensorProto.DataType.Name(m.elem_type).lower() if m is not None else None,
            elements=st.count,
            matched_by=m.matched_by if m is not None else None,
        )
