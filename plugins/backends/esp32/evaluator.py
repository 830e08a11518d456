"""Simulate an ESP-DL chip's integer arithmetic on the host, like ESP-DL's own ``Evaluator``.

ESP-DL's quantization toolkit ships an evaluator that "simulates quantization and helps you evaluate
performance of the quantized model as it runs on ESP SoCs" (``quantization-toolkit-overview.rst`` and
``quantization-toolkit-api.rst`` in ``espressif/esp-dl``; its API takes ``quantization_bit``, granularity and
``target_chip``, and returns float outputs on request). This module does the same for an ortq QDQ model
quantized for the ``esp32`` target, with every value an integer and an exponent (``real = q * 2**e``):

* inputs are quantized to int8 / int16 with the chip's rounding mode and saturated;
* Conv / Gemm / MatMul multiply integers and accumulate exactly (int64 on the host; float64 BLAS where every
  partial sum is provably below 2**53, which is exact); the bias, saturated to its type, is added exactly from
  where the firmware keeps it (ESP-DL v3: the accumulator's exponent, input + weight exponent, per output
  channel with per-channel weights; ESP-DL v1.1: the output's exponent in the activation type, or int16 at
  the accumulator's + 4 per channel; ``chips.py``); a directly following ReLU / LeakyReLU (on v1.1 also a
  Clip that saturation makes exact) is applied to the accumulator (the chip's fused activation), then one
  requantizing shift to the output exponent;
* every requantization is a shift with the chip's rounding mode (``ROUND_HALF_UP`` = ``floor(x + 0.5)`` on
  ESP32 and ESP32-S3, ``ROUND_HALF_EVEN`` on ESP32-P4; sources in ``chips.py``) followed by saturation;
* Add and Concat align their inputs exactly to the finer exponent and round once at the output; Mul adds the
  exponents; AveragePool / GlobalAveragePool divide the exact window sum by the window size with one
  rounding at the output exponent; MaxPool, ReLU, Clip, Reshape, Flatten work on the integers.

Where ESP-DL's exact kernel arithmetic was not findable (Add2D's and AvgPool's internal rescaling, whether
the S3's 20-bit accumulators wrap or saturate), the choice above is ours: one rounding per requantization,
exact accumulation. ``stats`` (optional) collects each layer's largest accumulator magnitude so a caller can
see whether it would exceed the chip's accumulator width (taken to be the bias width).

The simulation walks the QDQ model in graph order, so its answer can be compared with ONNX Runtime running
the same QDQ model: they differ only where the chip rounds differently (half-up vs. ONNX's half-even, fused
activations, saturated biases). On ESP32-P4 (half-even) without fused activations the two agree bit for bit
(``tests/test_esp32.py``). Half-up matters most after a residual Add whose output exponent is one coarser
than its inputs': that 1-bit requantization makes half of all values ties, all rounded up (+0.25 LSB on
average); on ``tests/models.py``'s ``resnet_like`` this costs about 14 dB of output SQNR (31.5 dB for the
QDQ model in ONNX Runtime, 17.7 dB simulated for esp32s3), while the digits CNN (no Add) is unaffected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx

from ortq.core.errors import ModelError

from ortq.plugins.backends.esp32.chips import ChipSpec
from ortq.plugins.backends.esp32.qdq import Layer, QdqGraph, quantize_alpha, round_div, round_float

__all__ = ["evaluate_qdq", "EvaluationStats", "SUPPORTED_OPS"]

#: ONNX ops this simulation (and the C++ export) can run; everything else is refused by name.
SUPPORTED_OPS = frozenset({
    "Conv", "Gemm", "MatMul", "Relu", "LeakyRelu", "Clip", "Add", "Mul", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Concat",
})

_EXACT_FLOAT = 2.0**53


@dataclass
class EvaluationStats:
    """Largest |accumulator| per layer and how many requantizations saturated, per tensor."""

    max_accumulator: dict[str, int] = field(default_factory=dict)
    saturated: dict[str, int] = field(default_factory=dict)


@dataclass
class _Value:
    """An integer tensor: real = q * 2**e / den (``e`` broadcasts against ``q``; ``den`` > 0)."""

    q: np.ndarray  # int64
    e: np.ndarray  # int64, 0-d or broadcastable
    den: int = 1

    def exponent_scalar(self, what: str) -> int:
        e = np.asarray(self.e)
        if e.size != 1:
            raise ModelError(f"{what}: a per-channel intermediate reached an op that needs one exponent")
        return int(e.reshape(-1)[0])

    def to_float(self) -> np.ndarray:
        return (self.q.astype(np.float64) * np.exp2(np.asarray(self.e, dtype=np.float64)) / self.den).astype(np.float32)


def _requantize(v: _Value, e_to: np.ndarray, spec: ChipSpec, stats: EvaluationStats | None, what: str) -> np.ndarray:
    """``v`` at exponent ``e_to``: ``round(q * 2**(e - e_to) / den)`` exactly, with one rounding in the chip's
    mode, then saturation to the chip's type."""
    shift = np.broadcast_to(np.asarray(e_to, dtype=np.int64) - np.asarray(v.e, dtype=np.int64), v.q.shape)
    den = int(v.den)
    up = np.clip(-shift, 0, 62)
    down = np.clip(shift, 0, 62 - den.bit_length())
    # Values certain to saturate when scaled up are clamped first, so the exact arithmetic stays in int64.
    limit = (np.int64((spec.qmax + 2) * den) >> up) + 1
    scaled_up = np.clip(v.q, -limit, limit) << up
    num = np.where(shift < 0, scaled_up, v.q)
    q = round_div(num, np.int64(den) << down, spec.rounding)
    out = np.clip(q, spec.qmin, spec.qmax)
    if stats is not None:
        stats.saturated[what] = stats.saturated.get(what, 0) + int(np.count_nonzero(out != q))
    return out


def _pads(node_attrs: dict, spatial: tuple[int, ...], kernel: tuple[int, ...], strides, dilations) -> list[int]:
    """ONNX pads [begin..., end...] after resolving auto_pad."""
    auto = node_attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    n = len(spatial)
    if auto in ("NOTSET", "", None):
        return list(node_attrs.get("pads") or [0] * (2 * n))
    if auto == "VALID":
        return [0] * (2 * n)
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(big if auto == "SAME_LOWER" else small)
        end.append(small if auto == "SAME_LOWER" else big)
    return begin + end


def _windows(x: np.ndarray, kernel, strides, dilations, pads, fill: int) -> np.ndarray:
    """[N, C, H, W] -> [N, C, kh, kw, OH, OW] windows (padding with ``fill``)."""
    pt, pl, pb, pr = pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=fill)
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    oh = (xp.shape[2] - ((kh - 1) * dh + 1)) // sh + 1
    ow = (xp.shape[3] - ((kw - 1) * dw + 1)) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ModelError(f"window {kernel} does not fit the input {x.shape}")
    out = np.empty(x.shape[:2] + (kh, kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i, j] = xp[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
    return out


def _int_matmul(a: np.ndarray, b: np.ndarray, bound: float) -> np.ndarray:
    """Exact integer ``a @ b``: float64 BLAS when every partial sum stays below 2**53, else int64."""
    if bound < _EXACT_FLOAT:
        return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.int64)
    return np.matmul(a, b)


def _conv(x: np.ndarray, w: np.ndarray, layer: Layer) -> np.ndarray:
    if x.ndim != 4:
        raise ModelError(f"Conv {layer.kernel.name!r}: ESP-DL runs 2-D convolutions on [N, C, H, W] inputs, got {x.shape}")
    m, cg, kh, kw = w.shape
    strides = tuple(layer.attrs.get("strides") or (1, 1))
    dilations = tuple(layer.attrs.get("dilations") or (1, 1))
    pads = _pads(layer.attrs, x.shape[2:], (kh, kw), strides, dilations)
    cols = _windows(x, (kh, kw), strides, dilations, pads, 0)  # [N, C, kh, kw, OH, OW]
    n, c, _, _, oh, ow = cols.shape
    group = layer.group
    if c != cg * group:
        raise ModelError(f"Conv {layer.kernel.name!r}: input has {c} channels, weight expects {cg * group}")
    bound = float(cg * kh * kw) * float(np.abs(x).max(initial=0)) * float(np.abs(w).max(initial=0))
    if cg == 1 and m == group:  # depthwise
        out = np.einsum("nckp,ck->ncp", cols.reshape(n, c, kh * kw, oh * ow).astype(np.float64),
                        w.reshape(m, kh * kw).astype(np.float64)) if bound < _EXACT_FLOAT else \
            np.einsum("nckp,ck->ncp", cols.reshape(n, c, kh * kw, oh * ow), w.reshape(m, kh * kw))
        return np.asarray(out).astype(np.int64).reshape(n, m, oh, ow)
    mg = m // group
    out = np.empty((n, m, oh * ow), dtype=np.int64)
    for g in range(group):
        cols_g = cols[:, g * cg:(g + 1) * cg].reshape(n, cg * kh * kw, oh * ow)
        w_g = w[g * mg:(g + 1) * mg].reshape(mg, cg * kh * kw)
        out[:, g * mg:(g + 1) * mg] = _int_matmul(w_g[None], cols_g, bound)
    return out.reshape(n, m, oh, ow)


class _Simulator:
    def __init__(self, graph: QdqGraph, stats: EvaluationStats | None) -> None:
        self.g = graph
        self.spec = graph.spec
        self.stats = stats
        self.values: dict[str, _Value | np.ndarray] = {}
        self.layers = graph.layers()
        self.covered = graph.covered_nodes()

    # -- reading -----------------------------------------------------------------------------------------
    def value(self, tensor: str, node: onnx.NodeProto) -> _Value:
        v = self.values.get(tensor)
        if isinstance(v, _Value):
            return v
        raise ModelError(
            f"node {node.name!r} ({node.op_type}) reads {tensor!r}, which is not an integer tensor on the chip "
            "(a float input or an op the chip cannot run)"
        )

    def const(self, tensor: str) -> np.ndarray | None:
        return self.g.index.constant_value(tensor) if tensor else None

    def attr(self, node: onnx.NodeProto, name: str, default: object = None) -> object:
        return self.g.index.attribute(node, name, default)

    # -- running -----------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in self.g.index.graph_inputs:
            if name in self.g.index.initializers:
                continue
            if name not in feeds:
                raise ModelError(f"missing input {name!r}")
            self.values[name] = np.asarray(feeds[name])
        for node in self.g.nodes:
            layer = self.covered.get(node.name)
            if layer is not None:
                if node.name == layer.kernel.name:
                    self.values[layer.output] = self.layer(layer)
                continue
            if node.op_type == "Constant":
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                raise ModelError(f"node {node.name!r} ({node.op_type}) cannot run on {self.spec.chip}: no integer kernel")
            result = handler(node)
            self.values[node.output[0]] = result
        outputs = {}
        for out in self.g.model.graph.output:
            v = self.values.get(out.name)
            outputs[out.name] = v.to_float() if isinstance(v, _Value) else np.asarray(v, dtype=np.float32)
        return outputs

    def layer(self, layer: Layer) -> _Value:
        node = layer.kernel
        x = self.value(layer.input_name, node)
        if x.den != 1:
            raise ModelError(f"{node.name!r}: its input was never requantized")
        w = layer.weight.values
        if node.op_type == "Conv":
            acc = _conv(x.q, w, layer)
            bias_shape = (1, -1, 1, 1)
        else:
            if x.q.ndim != 2:
                raise ModelError(f"{node.op_type} {node.name!r}: ESP-DL's FullyConnected takes a 2-D input, got {x.q.shape}")
            bound = float(w.shape[0]) * float(np.abs(x.q).max(initial=0)) * float(np.abs(w).max(initial=0))
            acc = _int_matmul(x.q, w, bound)
            bias_shape = (1, -1)
        e = layer.acc_exponent.reshape(bias_shape) if layer.acc_exponent.ndim else layer.acc_exponent
        if layer.bias is not None:
            # The bias joins the accumulator exactly, wherever the firmware keeps it (v3: at the accumulator's
            # exponent; v1.1: at the output's, or 4 bits above the accumulator per channel): both move to the
            # finer of the two exponents, then one requantization rounds.
            be = layer.bias_exponent.reshape(bias_shape) if layer.bias_exponent.ndim else layer.bias_exponent
            e_min = np.minimum(e, be)
            acc = (acc << (e - e_min)) + (layer.bias.reshape(bias_shape) << (be - e_min))
            e = e_min
        if self.stats is not None:
            self.stats.max_accumulator[layer.name] = int(np.abs(acc).max(initial=0))
        v = _Value(acc, np.asarray(e, dtype=np.int64))
        if layer.activation == "ReLU":
            v = _Value(np.maximum(v.q, 0), v.e)
        elif layer.activation == "LeakyReLU":
            v = self._leaky(v, *layer.alpha)
        return v

    def _leaky(self, v: _Value, alpha_q: int, alpha_e: int) -> _Value:
        lift = -min(alpha_e, 0)
        pos = v.q << lift
        neg = (v.q * alpha_q) << (alpha_e + lift)
        return _Value(np.where(v.q >= 0, pos, neg), np.asarray(v.e) - lift, v.den)

    # -- Q / DQ ------------------------------------------------------------------------------------------
    def op_QuantizeLinear(self, node: onnx.NodeProto) -> _Value:
        self.g.check_activation_type(node)
        e = self.g.qdq_exponent(node)
        x = self.values.get(node.input[0])
        if e.ndim:
            axis = int(self.attr(node, "axis", 1))
            ndim = (x.q if isinstance(x, _Value) else np.asarray(x)).ndim
            shape = [1] * ndim
            shape[axis % ndim] = -1
            e = e.reshape(shape)
        if isinstance(x, _Value):
            return _Value(_requantize(x, e, self.spec, self.stats, node.input[0]), e)
        if x is None:
            raise ModelError(f"{node.name!r} quantizes {node.input[0]!r}, which was never computed")
        real = np.asarray(x, dtype=np.float64) * np.exp2(-e.astype(np.float64))
        q = round_float(real, self.spec.rounding)
        out = np.clip(q, self.spec.qmin, self.spec.qmax)
        if self.stats is not None:
            self.stats.saturated[node.input[0]] = int(np.count_nonzero(out != q))
        return _Value(out.astype(np.int64), e)

    def op_DequantizeLinear(self, node: onnx.NodeProto) -> _Value:
        qc = self.g.quantized_constant(node.output[0])
        if qc is not None:
            return _Value(qc.values, qc.broadcast_exponent(qc.values.ndim))
        return self.value(node.input[0], node)

    # -- element-wise --------------------------------------------------------------------------------------
    def _aligned(self, values: list[_Value], node: onnx.NodeProto) -> tuple[list[np.ndarray], np.ndarray]:
        """Integers of every input at the finest exponent (exact left shifts)."""
        if any(v.den != 1 for v in values):
            raise ModelError(f"{node.name!r}: an input was never requantized")
        e_min = values[0].e
        for v in values[1:]:
            e_min = np.minimum(e_min, v.e)
        return [v.q << (np.asarray(v.e) - e_min) for v in values], np.asarray(e_min)

    def op_Add(self, node: onnx.NodeProto) -> _Value:
        (a, b), e = self._aligned([self.value(t, node) for t in node.input], node)
        return _Value(a + b, e)

    def op_Mul(self, node: onnx.NodeProto) -> _Value:
        a, b = (self.value(t, node) for t in node.input)
        if a.den != 1 or b.den != 1:
            raise ModelError(f"{node.name!r}: an input was never requantized")
        return _Value(a.q * b.q, np.asarray(a.e) + np.asarray(b.e))

    def op_Concat(self, node: onnx.NodeProto) -> _Value:
        parts, e = self._aligned([self.value(t, node) for t in node.input], node)
        if e.size != 1:
            raise ModelError(f"{node.name!r}: per-channel inputs cannot be concatenated")
        return _Value(np.concatenate(parts, axis=int(self.attr(node, "axis", 1))), e)

    def op_Relu(self, node: onnx.NodeProto) -> _Value:
        x = self.value(node.input[0], node)
        return _Value(np.maximum(x.q, 0), x.e, x.den)

    def op_LeakyRelu(self, node: onnx.NodeProto) -> _Value:
        x = self.value(node.input[0], node)
        return self._leaky(x, *quantize_alpha(float(self.attr(node, "alpha", 0.01)), self.spec))

    def op_Clip(self, node: onnx.NodeProto) -> _Value:
        x = self.value(node.input[0], node)
        lo = self.const(node.input[1]) if len(node.input) > 1 else self.attr(node, "min")
        hi = self.const(node.input[2]) if len(node.input) > 2 else self.attr(node, "max")
        e = x.exponent_scalar(node.name)
        q = x.q
        # The bounds snapped inwards onto the input's grid (a bound between two grid points cannot be hit).
        if lo is not None:
            q = np.maximum(q, math.ceil(float(np.asarray(lo).reshape(-1)[0]) * x.den * 2.0**-e))
        if hi is not None:
            q = np.minimum(q, math.floor(float(np.asarray(hi).reshape(-1)[0]) * x.den * 2.0**-e))
        return _Value(q, x.e, x.den)

    # -- pooling -----------------------------------------------------------------------------------------
    def _pool_geometry(self, node: onnx.NodeProto, x: np.ndarray):
        if x.ndim != 4:
            raise ModelError(f"{node.name!r} ({node.op_type}): ESP-DL pools 2-D feature maps, got {x.shape}")
        kernel = tuple(self.attr(node, "kernel_shape"))
        strides = tuple(self.attr(node, "strides") or (1, 1))
        dilations = tuple(self.attr(node, "dilations") or (1, 1))
        attrs = {"auto_pad": self.attr(node, "auto_pad", "NOTSET"), "pads": self.attr(node, "pads")}
        return kernel, strides, dilations, _pads(attrs, x.shape[2:], kernel, strides, dilations)

    def op_MaxPool(self, node: onnx.NodeProto) -> _Value:
        x = self.value(node.input[0], node)
        kernel, strides, dilations, pads = self._pool_geometry(node, x.q)
        win = _windows(x.q, kernel, strides, dilations, pads, np.iinfo(np.int64).min)
        return _Value(win.max(axis=(2, 3)), x.e, x.den)

    def op_AveragePool(self, node: onnx.NodeProto) -> _Value:
        x = self.value(node.input[0], node)
        kernel, strides, dilations, pads = self._pool_geometry(node, x.q)
        if any(pads):
            raise ModelError(f"{node.name!r} (AveragePool): padded average pooling is not supported")
        win = _windows(x.q, kernel, strides, dilations, pads, 0)
        return _Value(win.sum(axis=(2, 3)), x.e, x.den * kernel[0] * kernel[1])

    def op_GlobalAveragePool(self, node: onnx.NodeProto) -> _Value:
        x = self.value(node.input[0], node)
        count = int(np.prod(x.q.shape[2:]))
        return _Value(x.q.sum(axis=tuple(range(2, x.q.ndim)), keepdims=True), x.e, x.den * count)

    def op_GlobalMaxPool(self, node: onnx.NodeProto) -> _Value:
        x = self.value(node.input[0], node)
        return _Value(x.q.max(axis=tuple(range(2, x.q.ndim)), keepdims=True), x.e, x.den)

    # -- data movement -----------------------------------------------------------------------------------
    def op_Flatten(self, node: onnx.NodeProto) -> _Value:
        x = self.value(node.input[0], node)
        x.exponent_scalar(node.name)
        axis = int(self.attr(node, "axis", 1)) % max(x.q.ndim, 1)
        lead = int(np.prod(x.q.shape[:axis]))
        return _Value(x.q.reshape(lead, -1), x.e, x.den)

    def op_Reshape(self, node: onnx.NodeProto) -> _Value:
        x = self.value(node.input[0], node)
        x.exponent_scalar(node.name)
        target = self.const(node.input[1])
        if target is None:
            raise ModelError(f"{node.name!r} (Reshape): its shape must be a constant")
        shape = [int(d) for d in target]
        if not int(self.attr(node, "allowzero", 0)):
            shape = [x.q.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return _Value(x.q.reshape(shape), x.e, x.den)


def evaluate_qdq(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    spec: ChipSpec,
    stats: EvaluationStats | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model`` (a power-of-two QDQ model) as ``spec``'s chip would; return float outputs by name."""
    return _Simulator(QdqGraph(model, spec), stats).run(feeds)

