"""Write an ESP-DL v3 ``.espdl`` file from a power-of-two QDQ model (what ortq's ``esp32`` target quantizes).

The model is read directly with ``onnx`` / ``numpy``: every activation is a ``QuantizeLinear`` ->
``DequantizeLinear`` pair with a power-of-two scale and a zero zero-point (int8 or int16), weights and biases
are ``DequantizeLinear`` of integer initializers. The file follows esp-ppq's conventions (``espdl_exporter.py``,
``export_patterns.py``, ``helper.py``; read through the search tool, not copied):

* exponents ``log2(scale)``, per output channel for per-channel filters (ESP32-P4 only: ESP32-S3's kernels
  have one filter exponent, so per-channel weights are refused there);
* feature maps NHWC (4-D tensors, graph inputs and outputs included, are stored as ``[N, H, W, C]``; a
  Transpose back to NCHW is inserted before a Flatten / Reshape of a map larger than 1x1);
* Conv / Gemm filters packed as ``layout.py`` says, Gemm with ``transB=0``, a MatMul with a constant matrix
  (and its bias Add) written as a Gemm; biases int32 (8-bit; saturated to 20 bits on ESP32-S3, 32 on P4) or
  int64 (16-bit, 40 bits) at the exponent input + filter;
* a Relu that alone reads a Conv / Gemm output is fused (``activation`` attribute ``Relu`` / ``Linear``),
  taking the Relu's output exponent; every node carries ``quant_type`` ``S8`` / ``S16``;
* other element-wise activations (Relu not fused, LeakyRelu, Sigmoid, Tanh, HardSigmoid, HardSwish, Elu,
  Softplus, Clip, Identity) become int8 lookup tables (a ``lut`` attribute naming a 256-entry initializer
  computed with the chip's rounding); at 16 bits only Relu is written (natively), the others are refused;
* Add and Concat inputs at another exponent than the output get a ``RequantizeLinear`` first (esp-ppq aligns
  element-wise inputs to the output); MaxPool keeps its input's exponent and is requantized after if the
  QDQ model changes it;
* the embedded test input is the quantized (NHWC) ``test_input`` and the test output is computed by
  ``reference.py`` on it.

The ONNX graph must use only the ops above plus AveragePool / GlobalAveragePool / GlobalMaxPool, Mul,
Flatten, Reshape and Transpose; anything else is refused by name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

import flatbuffers

from ortq.plugins.backends.esp32.espdl import schema_generated as fb
from ortq.plugins.backends.esp32.espdl.layout import layout_name, pack_filter
from ortq.plugins.backends.esp32.espdl.reader import (
    DTYPES,
    HEADER_SIZE,
    MAGIC,
    EspdlError,
    EspdlGraph,
    EspdlModel,
    EspdlNode,
    EspdlTensor,
    EspdlValueInfo,
)
from ortq.plugins.backends.esp32.espdl.reference import CHIP_ROUNDING, HALF_UP, Reference, round_shift

__all__ = ["write_espdl", "build_espdl", "serialize", "BIAS_BITS", "LUT_OPS"]

#: (chip, bits) -> bias width (esp-ppq ``EspdlQuantizer``: S3 int8 20, P4 int8 32, 16-bit 40).
BIAS_BITS = {("esp32s3", 8): 20, ("esp32p4", 8): 32, ("esp32s3", 16): 40, ("esp32p4", 16): 40}

_NHWC = (0, 2, 3, 1)  # stored = onnx.transpose(_NHWC)
_NCHW = (0, 3, 1, 2)


def _hard_swish(x, a):
    return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)


#: ONNX op -> the float function its lookup table samples (attributes from the node, Clip bounds from inputs).
LUT_OPS = {
    "Relu": lambda x, a: np.maximum(x, 0.0),
    "LeakyRelu": lambda x, a: np.where(x >= 0, x, x * a.get("alpha", 0.01)),
    "Sigmoid": lambda x, a: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, a: np.tanh(x),
    "HardSigmoid": lambda x, a: np.clip(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": _hard_swish,
    "Elu": lambda x, a: np.where(x >= 0, x, a.get("alpha", 1.0) * (np.exp(x) - 1.0)),
    "Softplus": lambda x, a: np.log1p(np.exp(x)),
    "Clip": lambda x, a: np.clip(x, a.get("min", -np.inf), a.get("max", np.inf)),
    "Identity": lambda x, a: x,
}


@dataclass
class _Var:
    name: str
    exponent: int
    dtype: np.dtype
    nhwc: bool  # a 4-D tensor stored as [N, H, W, C]
    unit_spatial: bool = False  # 1x1 spatially (a global pool's output): NHWC and NCHW orders coincide


class _Builder:
    """Maps a QDQ ONNX graph onto ESP-DL nodes."""

    def __init__(self, model: onnx.ModelProto, chip: str, bits: int | None) -> None:
        if chip not in CHIP_ROUNDING:
            raise EspdlError(f"chip must be esp32s3 or esp32p4, not {chip!r}")
        self.model = model
        self.chip = chip
        self.mode = CHIP_ROUNDING[chip]
        g = model.graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
        self.producer = {o: n for n in g.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for t in n.input:
                self.readers.setdefault(t, []).append(n)
        self.graph_outputs = {o.name for o in g.output}
        self.bits = bits
        self.vars: dict[str, _Var] = {}  # espdl variable name -> var
        self.alias: dict[str, str] = {}  # ONNX float tensor (a DQ output or a Q input) -> espdl variable
        self.nodes: list[EspdlNode] = []
        self.inits: dict[str, EspdlTensor] = {}
        self.done: set[int] = set()
        self.used_names: set[str] = set()

    # -- ONNX helpers ----------------------------------------------------------------------------------------
    @staticmethod
    def attrs(node: onnx.NodeProto) -> dict:
        out = {}
        for a in node.attribute:
            v = onnx.helper.get_attribute_value(a)
            out[a.name] = v.decode() if isinstance(v, bytes) else v
        return out

    def exponent_of(self, scale_name: str, what: str) -> np.ndarray:
        s = np.asarray(self.consts.get(scale_name), dtype=np.float64)
        if s.dtype == object or s.size == 0:
            raise EspdlError(f"{what}: its scale is not a constant")
        mant, exp = np.frexp(s)
        if np.any(mant != 0.5):
            raise EspdlError(f"{what}: scale {s.reshape(-1)[:4]} is not a power of two; ESP-DL applies scales as shifts")
        return (exp - 1).astype(np.int64)

    def qdq_params(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.dtype, int | None]:
        what = f"{node.op_type} {node.name!r}"
        exp = self.exponent_of(node.input[1], what)
        dtype = np.dtype(np.int8)
        if len(node.input) > 2 and node.input[2]:
            zp = self.consts.get(node.input[2])
            if zp is None or np.any(zp != 0):
                raise EspdlError(f"{what}: ESP-DL is symmetric, the zero point must be 0")
            dtype = zp.dtype
        axis = None
        if exp.ndim and exp.size > 1:
            axis = int(self.attrs(node).get("axis", 1))
        return exp, dtype, axis

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names or name in self.vars or name in self.consts:
            name, k = f"{base}_{k}", k + 1
        self.used_names.add(name)
        return name

    def quant_type(self) -> str:
        return "S8" if self.bits == 8 else "S16"

    # -- constants -------------------------------------------------------------------------------------------
    def qconst(self, tensor: str) -> tuple[np.ndarray, np.ndarray, int | None] | None:
        """(integers, exponents, axis) of a DequantizeLinear of a constant, else None."""
        dq = self.producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in self.consts:
            return None
        exp, _, axis = self.qdq_params(dq)
        return self.consts[dq.input[0]].astype(np.int64), exp, axis

    def add_init(self, name: str, data: np.ndarray, exponents, dims=None, layout: str = "UNK") -> str:
        data = np.asarray(data)
        dims = tuple(int(d) for d in (data.shape if dims is None else dims))
        self.inits[name] = EspdlTensor(name, data.dtype, dims, tuple(int(e) for e in np.atleast_1d(exponents)),
                                       data.reshape(dims), f"layout ==> {layout}")
        self.used_names.add(name)
        return name

    # -- activations -------------------------------------------------------------------------------------------
    def var_of(self, tensor: str, what: str) -> _Var:
        """The espdl variable an ONNX node input reads (through its DQ <- Q pair)."""
        name = self.alias.get(tensor)
        if name is None:
            raise EspdlError(f"{what} reads {tensor!r}, which is not a quantized activation (a Q -> DQ pair)")
        return self.vars[name]

    def output_quant(self, tensor: str, what: str) -> tuple[int, np.dtype, onnx.NodeProto]:
        qs = [n for n in self.readers.get(tensor, []) if n.op_type == "QuantizeLinear"]
        if not qs:
            raise EspdlError(f"{what}: its output {tensor!r} is not quantized; the chip has no float path")
        exps = {int(np.asarray(self.qdq_params(q)[0]).reshape(-1)[0]) for q in qs}
        if len(exps) > 1 or any(np.asarray(self.qdq_params(q)[0]).size != 1 for q in qs):
            raise EspdlError(f"{what}: its output {tensor!r} is quantized per channel or twice; ESP-DL has one exponent")
        return exps.pop(), self.qdq_params(qs[0])[1], qs[0]

    def define(self, tensor: str, exponent: int, dtype: np.dtype, nhwc: bool, name: str | None = None) -> _Var:
        """A new espdl variable for the ONNX float tensor ``tensor`` (and the DQ outputs that re-read it)."""
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.int8), np.dtype(np.int16)):
            raise EspdlError(f"{tensor!r} is quantized to {dtype}; ESP-DL runs int8 or int16")
        if self.bits is None:
            self.bits = dtype.itemsize * 8
        elif self.bits != dtype.itemsize * 8:
            raise EspdlError(f"{tensor!r} is {dtype} in an int{self.bits} model; mixed precision is not written")
        if name is None:  # a graph output keeps its ONNX name (the DQ output's)
            outs = [dq.output[0] for q in self.readers.get(tensor, []) if q.op_type == "QuantizeLinear"
                    for dq in self.readers.get(q.output[0], []) if dq.output[0] in self.graph_outputs]
            name = self.unique(outs[0] if outs else tensor)
        v = _Var(name, int(exponent), dtype, nhwc)
        self.vars[name] = v
        self.alias[tensor] = name
        for q in self.readers.get(tensor, []):
            if q.op_type == "QuantizeLinear":
                self.done.add(id(q))
                for dq in self.readers.get(q.output[0], []):
                    if dq.op_type == "DequantizeLinear":
                        self.done.add(id(dq))
                        self.alias[dq.output[0]] = name
        return v

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> None:
        attrs["quant_type"] = self.quant_type()
        self.nodes.append(EspdlNode(self.unique(name or outputs[0]), op, inputs, outputs, dict(sorted(attrs.items()))))

    def requantize(self, v: _Var, exponent: int, label: str) -> _Var:
        """``v`` at ``exponent`` (a RequantizeLinear node unless it already is)."""
        if v.exponent == exponent:
            return v
        name = self.unique(f"{v.name}_requant")
        out = _Var(name, exponent, v.dtype, v.nhwc)
        self.vars[name] = out
        self.node("RequantizeLinear", [v.name], [name], f"{label}_requant")
        return out

    # -- the walk --------------------------------------------------------------------------------------------
    def build(self) -> None:
        g = self.model.graph
        init_names = set(self.consts)
        for inp in g.input:
            if inp.name in init_names:
                continue
            exp, dtype, _ = self.output_quant(inp.name, f"model input {inp.name!r}")
            rank = len(inp.type.tensor_type.shape.dim)
            self.define(inp.name, exp, dtype, rank == 4, name=inp.name)
        for node in g.node:
            if id(node) in self.done or node.op_type == "Constant":
                continue
            if node.op_type == "DequantizeLinear" and node.input[0] in self.consts:
                continue  # weights, biases: read by their kernels
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                self.qdq_node(node)
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None and node.op_type in LUT_OPS:
                handler = self.op_lut
            if handler is None:
                raise EspdlError(f"node {node.name!r} ({node.op_type}): no ESP-DL export for this op")
            handler(node)
        for out in g.output:
            if out.name not in self.alias:
                raise EspdlError(f"model output {out.name!r} is not a quantized activation")

    def qdq_node(self, node: onnx.NodeProto) -> None:
        """A Q/DQ pair not created by :meth:`define`: a requantization (DQ -> Q at another exponent)."""
        if node.op_type == "QuantizeLinear" and node.input[0] in self.alias:
            src = self.vars[self.alias[node.input[0]]]
            exp, dtype, _ = self.qdq_params(node)
            if np.asarray(exp).size != 1:
                raise EspdlError(f"QuantizeLinear {node.name!r}: per-channel activations are not supported")
            out = self.requantize(src, int(np.asarray(exp).reshape(-1)[0]), node.name)
            for dq in self.readers.get(node.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    self.done.add(id(dq))
                    self.alias[dq.output[0]] = out.name
            return
        raise EspdlError(f"{node.op_type} {node.name!r}: not part of a Q -> DQ pair this writer understands")

    def _only_reader(self, tensor: str) -> onnx.NodeProto | None:
        r = self.readers.get(tensor, [])
        return r[0] if len(r) == 1 and tensor not in self.graph_outputs else None

    def _fused_relu(self, tensor: str) -> tuple[onnx.NodeProto | None, list[onnx.NodeProto]]:
        """A Relu reading ``tensor`` alone, directly or through one Q -> DQ pair (esp-ppq fuses Relu only)."""
        r = self._only_reader(tensor)
        if r is None:
            return None, []
        if r.op_type == "Relu":
            return r, []
        if r.op_type != "QuantizeLinear":
            return None, []
        dq = self._only_reader(r.output[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            return None, []
        act = self._only_reader(dq.output[0])
        if act is None or act.op_type != "Relu":
            return None, []
        return act, [r, dq]

    def _kernel(self, node: onnx.NodeProto, x: _Var, w: np.ndarray, w_exp: np.ndarray, w_axis_ok: bool,
                bias_tensor: str | None, out_tensor: str, op: str, attrs: dict, depthwise: bool) -> None:
        label = f"{node.op_type} {node.name!r}"
        if w_exp.size > 1 and self.chip == "esp32s3":
            raise EspdlError(f"{label}: per-channel weights, but ESP32-S3's kernels take one filter exponent")
        if w_exp.size > 1 and not w_axis_ok:
            raise EspdlError(f"{label}: per-channel weight exponents must run along the output channels")
        if w.dtype != x.dtype and w.astype(x.dtype).astype(np.int64).tolist() != w.tolist():
            raise EspdlError(f"{label}: weights do not fit {x.dtype}")
        n_out = w.shape[0]
        acc_exp = x.exponent + w_exp.reshape(-1)
        relu, skipped = self._fused_relu(out_tensor)
        activation = "Linear"
        if relu is not None:
            for s in (*skipped, relu):
                self.done.add(id(s))
            out_tensor = relu.output[0]
            activation = "Relu"
        exp, dtype, _ = self.output_quant(out_tensor, label)
        out = self.define(out_tensor, exp, dtype, op == "Conv")
        flat, dims = pack_filter(w.astype(x.dtype), depthwise)
        w_name = self.add_init(self.unique(node.input[1] if op == "Conv" else f"{node.name or out.name}.weight"),
                               flat, w_exp.reshape(-1), dims, layout_name(n_out, 16 if self.bits == 8 else 8))
        inputs = [x.name, w_name]
        if bias_tensor:
            inputs.append(self._bias(bias_tensor, acc_exp, n_out, label, f"{node.name or out.name}.bias"))
        self.node(op, inputs, [out.name], node.name, activation=activation, **attrs)

    def _bias(self, tensor: str, acc_exp: np.ndarray, n_out: int, label: str, name: str) -> str:
        target = np.broadcast_to(acc_exp, (n_out,)).astype(np.int64)
        qc = self.qconst(tensor)
        if qc is not None:
            values, exp, _ = qc
            values = np.broadcast_to(values.reshape(-1), (n_out,)).astype(np.int64)
            exp = np.broadcast_to(exp.reshape(-1), (n_out,)).astype(np.int64)
            exact = round_shift(values, target - exp, self.mode)
        elif tensor in self.consts:
            real = np.broadcast_to(np.asarray(self.consts[tensor], np.float64).reshape(-1), (n_out,))
            scaled = real * np.exp2(-target.astype(np.float64))
            exact = (np.floor(scaled + 0.5) if self.mode == HALF_UP else np.rint(scaled)).astype(np.int64)
        else:
            raise EspdlError(f"{label}: its bias {tensor!r} is not a constant")
        width = BIAS_BITS[(self.chip, self.bits)]
        lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
        clipped = np.clip(exact, lo, hi).astype(np.int32 if self.bits == 8 else np.int64)
        exps = target if np.unique(target).size > 1 else target[:1]
        return self.add_init(self.unique(name), clipped, exps)

    # -- kernels -----------------------------------------------------------------------------------------------
    def op_Conv(self, node: onnx.NodeProto) -> None:
        label = f"Conv {node.name!r}"
        x = self.var_of(node.input[0], label)
        qc = self.qconst(node.input[1])
        if qc is None:
            raise EspdlError(f"{label}: its filter is not a quantized constant")
        w, w_exp, axis = qc
        if w.ndim != 4 or not x.nhwc:
            raise EspdlError(f"{label}: only 2-D convolutions on 4-D feature maps are written")
        a = self.attrs(node)
        group = int(a.get("group", 1))
        depthwise = group > 1
        if depthwise and not (w.shape[1] == 1 and w.shape[0] == group):
            raise EspdlError(f"{label}: group={group} is neither 1 nor depthwise; ESP-DL supports only those")
        kh, kw = w.shape[2:]
        strides = list(a.get("strides", [1, 1]))
        dilations = list(a.get("dilations", [1, 1]))
        pads = self._pads(node, a, (kh, kw), strides, dilations)
        attrs = {"dilations": dilations, "group": group, "kernel_shape": [kh, kw], "pads": pads, "strides": strides}
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        self._kernel(node, x, w, w_exp, axis in (None, 0), bias, node.output[0], "Conv", attrs, depthwise)

    def _pads(self, node: onnx.NodeProto, a: dict, kernel, strides, dilations) -> list[int]:
        auto = a.get("auto_pad", "NOTSET")
        if auto in ("NOTSET", ""):
            return [int(p) for p in a.get("pads", [0, 0, 0, 0])]
        if auto == "VALID":
            return [0, 0, 0, 0]
        shape = self._shape_of(node.input[0])
        if shape is None:
            raise EspdlError(f"{node.name!r}: auto_pad={auto} needs a static input shape")
        begin, end = [], []
        for size, k, s, d in zip(shape[2:], kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begin.append(big if auto == "SAME_LOWER" else small)
            end.append(small if auto == "SAME_LOWER" else big)
        return begin + end

    def _shape_of(self, tensor: str) -> list[int] | None:
        for vi in (*self.model.graph.value_info, *self.model.graph.input, *self.model.graph.output):
            if vi.name == tensor:
                dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                return None if any(d is None for d in dims[1:]) else dims
        return None

    def op_Gemm(self, node: onnx.NodeProto) -> None:
        label = f"Gemm {node.name!r}"
        a = self.attrs(node)
        if int(a.get("transA", 0)) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
            raise EspdlError(f"{label}: transA, alpha or beta other than the defaults has no ESP-DL kernel")
        qc = self.qconst(node.input[1])
        if qc is None:
            raise EspdlError(f"{label}: its weight is not a quantized constant")
        w, w_exp, axis = qc
        if int(a.get("transB", 0)):
            w, out_axis = w, 0  # [N, K]
        else:
            w, out_axis = w.T, 1  # [K, N] -> [N, K]
        x = self.var_of(node.input[0], label)
        if x.nhwc:
            raise EspdlError(f"{label}: its input is a 4-D feature map; flatten it first")
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        attrs = {"alpha": 1.0, "beta": 1.0, "transB": 0}
        self._kernel(node, x, w[:, :, None, None], w_exp, axis in (None, out_axis), bias, node.output[0], "Gemm", attrs, False)

    def op_MatMul(self, node: onnx.NodeProto) -> None:
        label = f"MatMul {node.name!r}"
        qc = self.qconst(node.input[1])
        if qc is None or qc[0].ndim != 2:
            raise EspdlError(f"{label}: only a MatMul by a constant matrix is written (as a Gemm)")
        w, w_exp, axis = qc
        x = self.var_of(node.input[0], label)
        if x.nhwc:
            raise EspdlError(f"{label}: its input is a 4-D feature map")
        out_tensor, bias = node.output[0], None
        add = self._only_reader(out_tensor)
        if add is not None and add.op_type == "Add":
            other = add.input[1] if add.input[0] == out_tensor else add.input[0]
            if other in self.consts or self.qconst(other) is not None:
                bias, out_tensor = other, add.output[0]
                self.done.add(id(add))
        attrs = {"alpha": 1.0, "beta": 1.0, "transB": 0}
        self._kernel(node, x, w.T[:, :, None, None], w_exp, axis in (None, 1), bias, out_tensor, "Gemm", attrs, False)

    def op_lut(self, node: onnx.NodeProto) -> None:
        label = f"{node.op_type} {node.name!r}"
        x = self.var_of(node.input[0], label)
        exp, dtype, _ = self.output_quant(node.output[0], label)
        a = self.attrs(node)
        if x.dtype != np.int8:
            if node.op_type == "Relu":
                y = self.define(node.output[0], x.exponent, dtype, x.nhwc)
                self.node("Relu", [x.name], [y.name], node.name)
                if exp != x.exponent:
                    r = self.requantize(y, exp, node.name)
                    self.alias[node.output[0]] = r.name
                    for q in self.readers.get(node.output[0], []):
                        for dq in self.readers.get(q.output[0], []):
                            self.alias[dq.output[0]] = r.name
                return
            raise EspdlError(f"{label}: int16 lookup tables (esp-ppq's interpolated int16_lut_step) are not written")
        if node.op_type == "Clip":
            for key, i in (("min", 1), ("max", 2)):
                if len(node.input) > i and node.input[i]:
                    if node.input[i] not in self.consts:
                        raise EspdlError(f"{label}: Clip bounds must be constants")
                    a[key] = float(np.asarray(self.consts[node.input[i]]).reshape(-1)[0])
        grid = np.arange(-128, 128, dtype=np.float64) * 2.0**x.exponent
        f = np.asarray(LUT_OPS[node.op_type](grid.astype(np.float32), a), dtype=np.float32).astype(np.float64)
        scaled = f * 2.0**-exp
        q = np.floor(scaled + 0.5) if self.mode == HALF_UP else np.rint(scaled)
        table = np.clip(q, -128, 127).astype(np.int8)
        y = self.define(node.output[0], exp, dtype, x.nhwc)
        lut = self.add_init(self.unique(f"{node.op_type}_lut_{len(self.inits)}"), table, [exp])
        extra = {k: v for k, v in a.items() if isinstance(v, (int, float)) and k not in ("min", "max")}
        self.node(node.op_type, [x.name], [y.name], node.name, lut=lut, **extra)

    def _same_exp_op(self, node: onnx.NodeProto, op: str, x: _Var, nhwc: bool, inputs_extra=(), **attrs) -> None:
        """An op that keeps its input's exponent, requantized after if the QDQ model changes it."""
        exp, dtype, _ = self.output_quant(node.output[0], f"{node.op_type} {node.name!r}")
        y = self.define(node.output[0], x.exponent, dtype, nhwc)
        y.unit_spatial = x.unit_spatial or op == "GlobalMaxPool"
        self.node(op, [x.name, *inputs_extra], [y.name], node.name, **attrs)
        if exp != x.exponent:
            r = self.requantize(y, exp, node.name)
            self.vars[y.name] = y
            for q in self.readers.get(node.output[0], []):
                for dq in self.readers.get(q.output[0], []):
                    self.alias[dq.output[0]] = r.name

    def _pool_attrs(self, node: onnx.NodeProto, a: dict) -> dict:
        kernel = list(a["kernel_shape"])
        if len(kernel) != 2:
            raise EspdlError(f"{node.name!r}: only 2-D pooling is written")
        if int(a.get("ceil_mode", 0)) or any(d != 1 for d in a.get("dilations", [1, 1])):
            raise EspdlError(f"{node.name!r}: ceil_mode and dilation are not supported by ESP-DL")
        strides = list(a.get("strides", [1, 1]))
        return {"kernel_shape": kernel, "strides": strides, "pads": self._pads(node, a, kernel, strides, [1, 1])}

    def op_MaxPool(self, node: onnx.NodeProto) -> None:
        x = self.var_of(node.input[0], f"MaxPool {node.name!r}")
        if len([o for o in node.output if o]) > 1:
            raise EspdlError(f"MaxPool {node.name!r}: the indices output is not supported")
        self._same_exp_op(node, "MaxPool", x, True, **self._pool_attrs(node, self.attrs(node)))

    def op_GlobalMaxPool(self, node: onnx.NodeProto) -> None:
        x = self.var_of(node.input[0], f"GlobalMaxPool {node.name!r}")
        self._same_exp_op(node, "GlobalMaxPool", x, True)

    def op_AveragePool(self, node: onnx.NodeProto) -> None:
        label = f"AveragePool {node.name!r}"
        x = self.var_of(node.input[0], label)
        a = self.attrs(node)
        attrs = self._pool_attrs(node, a)
        if any(attrs["pads"]) and not int(a.get("count_include_pad", 0)):
            raise EspdlError(f"{label}: ESP-DL divides by the whole window; padded pooling needs count_include_pad=1")
        exp, dtype, _ = self.output_quant(node.output[0], label)
        y = self.define(node.output[0], exp, dtype, True)
        self.node("AveragePool", [x.name], [y.name], node.name, **attrs)

    def op_GlobalAveragePool(self, node: onnx.NodeProto) -> None:
        label = f"GlobalAveragePool {node.name!r}"
        x = self.var_of(node.input[0], label)
        exp, dtype, _ = self.output_quant(node.output[0], label)
        y = self.define(node.output[0], exp, dtype, True)
        y.unit_spatial = True
        self.node("GlobalAveragePool", [x.name], [y.name], node.name)

    def _aligned_inputs(self, node: onnx.NodeProto, exp: int) -> list[_Var]:
        label = f"{node.op_type} {node.name!r}"
        xs = [self.var_of(t, label) for t in node.input]
        if len({v.nhwc for v in xs}) > 1:
            raise EspdlError(f"{label}: mixes a 4-D feature map with another layout")
        return [self.requantize(v, exp, f"{node.name}_in{i}") for i, v in enumerate(xs)]

    def op_Add(self, node: onnx.NodeProto) -> None:
        label = f"Add {node.name!r}"
        exp, dtype, _ = self.output_quant(node.output[0], label)
        xs = self._aligned_inputs(node, exp)
        y = self.define(node.output[0], exp, dtype, xs[0].nhwc)
        self.node("Add", [v.name for v in xs], [y.name], node.name)

    def op_Mul(self, node: onnx.NodeProto) -> None:
        label = f"Mul {node.name!r}"
        xs = [self.var_of(t, label) for t in node.input]
        exp, dtype, _ = self.output_quant(node.output[0], label)
        y = self.define(node.output[0], exp, dtype, xs[0].nhwc)
        self.node("Mul", [v.name for v in xs], [y.name], node.name)

    def op_Concat(self, node: onnx.NodeProto) -> None:
        label = f"Concat {node.name!r}"
        exp, dtype, _ = self.output_quant(node.output[0], label)
        xs = self._aligned_inputs(node, exp)
        axis = int(self.attrs(node).get("axis", 1))
        if xs[0].nhwc:
            axis = _NHWC.index(axis % 4)
        y = self.define(node.output[0], exp, dtype, xs[0].nhwc)
        self.node("Concat", [v.name for v in xs], [y.name], node.name, axis=axis)

    def _to_nchw(self, x: _Var, label: str) -> _Var:
        """A 4-D map in ONNX order for an op that reshapes it (a Transpose unless it is 1x1 spatially)."""
        if not x.nhwc or x.unit_spatial:
            return x
        name = self.unique(f"{x.name}_nchw")
        out = _Var(name, x.exponent, x.dtype, False)
        self.vars[name] = out
        self.node("Transpose", [x.name], [name], f"{label}_to_nchw", perm=list(_NCHW))
        return out

    def op_Flatten(self, node: onnx.NodeProto) -> None:
        x = self._to_nchw(self.var_of(node.input[0], f"Flatten {node.name!r}"), node.name)
        self._same_exp_op(node, "Flatten", x, False, axis=int(self.attrs(node).get("axis", 1)))

    def op_Reshape(self, node: onnx.NodeProto) -> None:
        label = f"Reshape {node.name!r}"
        if node.input[1] not in self.consts:
            raise EspdlError(f"{label}: the target shape must be a constant")
        x = self._to_nchw(self.var_of(node.input[0], label), node.name)
        shape = self.add_init(self.unique(f"{node.name or node.output[0]}_shape"),
                              np.asarray(self.consts[node.input[1]], np.int64).reshape(-1), [0])
        self._same_exp_op(node, "Reshape", x, False, inputs_extra=[shape], allowzero=int(self.attrs(node).get("allowzero", 0)))

    def op_Transpose(self, node: onnx.NodeProto) -> None:
        x = self.var_of(node.input[0], f"Transpose {node.name!r}")
        perm = self.attrs(node).get("perm")
        if perm is None:
            raise EspdlError(f"Transpose {node.name!r}: give perm explicitly")
        if x.nhwc:
            perm = [_NCHW[p] for p in perm]
        self._same_exp_op(node, "Transpose", x, False, perm=[int(p) for p in perm])


# -- FlatBuffers serialization ---------------------------------------------------------------------------------
_TYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


def _vec_offsets(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _tensor(b: flatbuffers.Builder, t: EspdlTensor) -> int:
    name = b.CreateString(t.name)
    doc = b.CreateString(t.doc_string) if t.doc_string else None
    dims = b.CreateNumpyVector(np.asarray(t.dims, dtype=np.int64))
    exps = b.CreateNumpyVector(np.asarray(t.exponents, dtype=np.int64))
    raw = np.ascontiguousarray(t.data.reshape(-1)).tobytes()
    raw += b"\0" * (-len(raw) % 16)
    n = len(raw) // 16
    b.StartVector(16, n, 16)
    b.head = b.Head() - len(raw)
    b.Bytes[b.Head():b.Head() + len(raw)] = raw
    raw_vec = b.EndVector()
    fb.TensorStart(b)
    fb.TensorAddDataType(b, _TYPE_CODES[np.dtype(t.dtype)])
    fb.TensorAddName(b, name)
    if doc is not None:
        fb.TensorAddDocString(b, doc)
    fb.TensorAddRawData(b, raw_vec)
    fb.TensorAddDims(b, dims)
    fb.TensorAddExponents(b, exps)
    return fb.TensorEnd(b)


def _value_info(b: flatbuffers.Builder, v: EspdlValueInfo) -> int:
    name = b.CreateString(v.name)
    dims = []
    for d in v.shape or ():
        fb.DimensionValueStart(b)
        fb.DimensionValueAddDimType(b, fb.DimensionValueType.VALUE)
        fb.DimensionValueAddDimValue(b, int(d))
        dv = fb.DimensionValueEnd(b)
        fb.DimensionStart(b)
        fb.DimensionAddValue(b, dv)
        dims.append(fb.DimensionEnd(b))
    dim_vec = _vec_offsets(b, dims)
    fb.TensorShapeStart(b)
    fb.TensorShapeAddDim(b, dim_vec)
    shape = fb.TensorShapeEnd(b)
    fb.TensorTypeAndShapeStart(b)
    fb.TensorTypeAndShapeAddShape(b, shape)
    fb.TensorTypeAndShapeAddElemType(b, _TYPE_CODES[np.dtype(v.dtype)])
    tts = fb.TensorTypeAndShapeEnd(b)
    fb.TypeInfoStart(b)
    fb.TypeInfoAddValueType(b, fb.TypeInfoValue.tensor_type)
    fb.TypeInfoAddValue(b, tts)
    ti = fb.TypeInfoEnd(b)
    exps = b.CreateNumpyVector(np.asarray(v.exponents, dtype=np.int64))
    fb.ValueInfoStart(b)
    fb.ValueInfoAddName(b, name)
    fb.ValueInfoAddValueInfoType(b, ti)
    fb.ValueInfoAddExponents(b, exps)
    return fb.ValueInfoEnd(b)


def _attribute(b: flatbuffers.Builder, key: str, value) -> int:
    name = b.CreateString(key)
    A = fb.AttributeType
    s = ints = floats = None
    if isinstance(value, str):
        s = b.CreateByteVector(value.encode())
    elif isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, np.integer)) for v in value):
            ints = b.CreateNumpyVector(np.asarray(value, dtype=np.int64))
        else:
            floats = b.CreateNumpyVector(np.asarray(value, dtype=np.float32))
    fb.AttributeStart(b)
    fb.AttributeAddName(b, name)
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        fb.AttributeAddI(b, fb.CreateAttributeI(b, int(value)))
        fb.AttributeAddAttrType(b, A.INT)
    elif isinstance(value, (float, np.floating)):
        fb.AttributeAddF(b, fb.CreateAttributeF(b, float(value)))
        fb.AttributeAddAttrType(b, A.FLOAT)
    elif s is not None:
        fb.AttributeAddS(b, s)
        fb.AttributeAddAttrType(b, A.STRING)
    elif ints is not None:
        fb.AttributeAddInts(b, ints)
        fb.AttributeAddAttrType(b, A.INTS)
    elif floats is not None:
        fb.AttributeAddFloats(b, floats)
        fb.AttributeAddAttrType(b, A.FLOATS)
    else:
        raise EspdlError(f"attribute {key!r}: cannot write {type(value).__name__}")
    return fb.AttributeEnd(b)


def _node(b: flatbuffers.Builder, n: EspdlNode) -> int:
    op = b.CreateString(n.op_type)
    ins = _vec_offsets(b, [b.CreateString(i) for i in n.inputs])
    outs = _vec_offsets(b, [b.CreateString(o) for o in n.outputs])
    name = b.CreateString(n.name)
    attrs = _vec_offsets(b, [_attribute(b, k, v) for k, v in sorted(n.attributes.items()) if v is not None])
    fb.NodeStart(b)
    fb.NodeAddOpType(b, op)
    fb.NodeAddInput(b, ins)
    fb.NodeAddOutput(b, outs)
    fb.NodeAddName(b, name)
    fb.NodeAddAttribute(b, attrs)
    return fb.NodeEnd(b)


def serialize(model: EspdlModel) -> bytes:
    """The ``.espdl`` bytes (EDL2 header, mode 0, then the FlatBuffers ``Model``) of ``model``."""
    b = flatbuffers.Builder(1024)
    g = model.graph
    inits = _vec_offsets(b, [_tensor(b, t) for t in g.initializers.values()])
    vinfo = _vec_offsets(b, [_value_info(b, v) for v in g.value_info])
    t_in = _vec_offsets(b, [_tensor(b, t) for t in g.test_inputs.values()])
    t_out = _vec_offsets(b, [_tensor(b, t) for t in g.test_outputs.values()])
    nodes = _vec_offsets(b, [_node(b, n) for n in g.nodes])
    inputs = _vec_offsets(b, [_value_info(b, v) for v in g.inputs])
    outputs = _vec_offsets(b, [_value_info(b, v) for v in g.outputs])
    gname = b.CreateString(g.name)
    fb.GraphStart(b)
    fb.GraphAddInitializer(b, inits)
    fb.GraphAddValueInfo(b, vinfo)
    fb.GraphAddTestInputsValue(b, t_in)
    fb.GraphAddTestOutputsValue(b, t_out)
    fb.GraphAddNode(b, nodes)
    fb.GraphAddName(b, gname)
    fb.GraphAddInput(b, inputs)
    fb.GraphAddOutput(b, outputs)
    graph = fb.GraphEnd(b)
    opsets = []
    for domain, version in model.opset_import:
        d = b.CreateString(domain)
        fb.OperatorSetIdStart(b)
        fb.OperatorSetIdAddDomain(b, d)
        fb.OperatorSetIdAddVersion(b, int(version))
        opsets.append(fb.OperatorSetIdEnd(b))
    opset_vec = _vec_offsets(b, opsets)
    meta = []
    for k, v in model.metadata_props.items():
        ko, vo = b.CreateString(k), b.CreateString(v)
        fb.StringStringEntryStart(b)
        fb.StringStringEntryAddKey(b, ko)
        fb.StringStringEntryAddValue(b, vo)
        meta.append(fb.StringStringEntryEnd(b))
    meta_vec = _vec_offsets(b, meta) if meta else None
    producer = b.CreateString(model.producer_name) if model.producer_name else None
    version = b.CreateString(model.producer_version) if model.producer_version else None
    fb.ModelStart(b)
    fb.ModelAddGraph(b, graph)
    fb.ModelAddOpsetImport(b, opset_vec)
    fb.ModelAddIrVersion(b, int(model.ir_version))
    if producer is not None:
        fb.ModelAddProducerName(b, producer)
    if version is not None:
        fb.ModelAddProducerVersion(b, version)
    fb.ModelAddModelVersion(b, int(model.model_version))
    if meta_vec is not None:
        fb.ModelAddMetadataProps(b, meta_vec)
    b.Finish(fb.ModelEnd(b))
    payload = bytes(b.Output())
    return MAGIC + struct.pack("<II", 0, len(payload)) + b"\0" * 4 + payload


# -- entry points -----------------------------------------------------------------------------------------------
def _quantize_input(x: np.ndarray, var: _Var, mode: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if var.nhwc:
        x = x.transpose(_NHWC)
    scaled = x * 2.0**-var.exponent
    q = np.floor(scaled + 0.5) if mode == HALF_UP else np.rint(scaled)
    info = np.iinfo(var.dtype)
    return np.clip(q, info.min, info.max).astype(var.dtype)


def build_espdl(
    qdq_model: onnx.ModelProto,
    chip: str,
    test_input: np.ndarray | Mapping[str, np.ndarray] | None = None,
) -> EspdlModel:
    """The :class:`EspdlModel` of ``qdq_model`` for ``chip``, with the quantized ``test_input`` (float, ONNX
    layout; a dict by input name for several inputs; default: one seeded random sample in the input's
    quantized range) and the reference's output on it embedded."""
    chip = str(chip).lower().replace("-", "")
    builder = _Builder(qdq_model, chip, None)
    builder.build()
    g = qdq_model.graph
    inits = set(builder.consts)
    graph_inputs = [i for i in g.input if i.name not in inits]
    if test_input is None:
        rng = np.random.default_rng(0)
        feeds = {}
        for inp in graph_inputs:
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
            v = builder.vars[inp.name]
            feeds[inp.name] = rng.uniform(-0.5, 0.5, dims) * float(np.iinfo(v.dtype).max) * 2.0**v.exponent
    elif isinstance(test_input, Mapping):
        feeds = dict(test_input)
    else:
        if len(graph_inputs) != 1:
            raise EspdlError("the model has several inputs: pass test_input as a dict by input name")
        feeds = {graph_inputs[0].name: test_input}
    q_inputs = {name: _quantize_input(feeds[name], builder.vars[name], builder.mode) for name in (i.name for i in graph_inputs)}

    def vi(var: _Var, shape=None) -> EspdlValueInfo:
        return EspdlValueInfo(var.name, var.dtype, shape, (var.exponent,))

    out_vars = [builder.vars[builder.alias[o.name]] for o in g.output]
    graph = EspdlGraph(
        name=g.name or "ortq",
        nodes=builder.nodes,
        initializers=builder.inits,
        inputs=[vi(builder.vars[i.name]) for i in graph_inputs],
        outputs=[vi(v) for v in out_vars],
        value_info=[vi(v) for v in builder.vars.values()],
        test_inputs={},
        test_outputs={},
    )
    try:
        from importlib.metadata import version

        producer_version = version("ortq")
    except Exception:  # not installed (a source checkout)
        producer_version = ""
    model = EspdlModel(
        graph=graph, ir_version=int(qdq_model.ir_version), producer_name="ortq", producer_version=producer_version,
        opset_import=[(o.domain, int(o.version)) for o in qdq_model.opset_import], metadata_props={"target": chip},
    )
    values = Reference(model, chip).run(q_inputs)
    shapes = {name: tuple(int(d) for d in np.shape(v)) for name, v in values.items()}
    for group in (graph.inputs, graph.outputs, graph.value_info):
        for v in group:
            v.shape = shapes[v.name]
    for name, x in q_inputs.items():
        graph.test_inputs[name] = EspdlTensor(name, x.dtype, x.shape, (builder.vars[name].exponent,), x)
    for v in out_vars:
        y = np.asarray(values[v.name]).astype(v.dtype)
        graph.test_outputs[v.name] = EspdlTensor(v.name, y.dtype, y.shape, (v.exponent,), y)
    return model


def write_espdl(
    qdq_model: onnx.ModelProto,
    chip: str,
    path: str | Path,
    test_input: np.ndarray | Mapping[str, np.ndarray] | None = None,
) -> EspdlModel:
    """Write ``qdq_model`` (a power-of-two QDQ model, int8 or int16) as an ESP-DL v3 ``.espdl`` file for ``chip``
    (``esp32s3`` or ``esp32p4``) at ``path``; returns the model written (see :func:`build_espdl`)."""
    model = build_espdl(qdq_model, chip, test_input)
    data = serialize(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return model
