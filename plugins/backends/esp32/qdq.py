"""Read a power-of-two QDQ model as ESP-DL layers: integer constants with exponents, and kernel groups.

Both the C++ export (``codegen.py``) and the integer simulation (``evaluator.py``) read the model through
this module, so they agree on every integer: the weights are the QDQ model's own quantized initializers,
exponents are ``log2`` of its scales (refused unless exactly powers of two), and a *layer* is what one
ESP-DL call computes: a Conv / Gemm / MatMul kernel, its bias (a MatMul's bias Add included), and a ReLU or
LeakyReLU that directly follows it (ESP-DL's ``dl::Activation`` argument; esp-ppq fuses the same way in
``FuseReluLikePattern``, ``esp_ppq/parser/espdl/export_patterns.py``). The fused activation's Q/DQ pair in
between is skipped: the chip requantizes once, from the accumulator to the activation's output exponent.

Biases are stored at the accumulator's exponent (input exponent + weight exponent, per output channel for
per-channel weights) and saturated to the chip's bias width (``chips.py``). A bias the QDQ model kept
float (a MatMul's bias Add) is quantized at that exponent with the chip's rounding mode. LeakyReLU's alpha
is quantized like a weight: to the chip's integer type with the smallest power-of-two scale that holds it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from ortq.core.errors import ModelError
from ortq.core.graph import GraphIndex

from ortq.plugins.backends.esp32.chips import HALF_EVEN, HALF_UP, ChipSpec

__all__ = [
    "KERNEL_OPS",
    "QConst",
    "Layer",
    "QdqGraph",
    "exponent_of",
    "round_div",
    "round_float",
    "quantize_alpha",
]

KERNEL_OPS = frozenset({"Conv", "Gemm", "MatMul"})
#: ESP-DL v1.1, int8 per-channel: int16 biases sit 4 bits above the accumulator; dl::Bias carries -128.
V1_PER_CHANNEL_BIAS_SHIFT = 4
V1_PER_CHANNEL_BIAS_OBJECT_EXPONENT = -128
_FUSABLE = frozenset({"Relu", "LeakyRelu"})


def exponent_of(scale: np.ndarray, what: str) -> np.ndarray:
    """Integer exponents of power-of-two scales; anything else is refused (a shift cannot apply it)."""
    s = np.asarray(scale, dtype=np.float64)
    mantissa, exp = np.frexp(s)
    if s.size == 0 or np.any(mantissa != 0.5):
        raise ModelError(f"{what}: scale {s.reshape(-1)[:4]} is not a power of two; ESP-DL applies scales as shifts")
    return (exp - 1).astype(np.int64)


def round_div(num: np.ndarray, den: np.ndarray | int, mode: str) -> np.ndarray:
    """``num / den`` rounded to an integer exactly (int64 in, int64 out, ``den`` > 0) with the chip's mode:
    ROUND_HALF_UP is ``floor(x + 0.5)`` (ties towards +inf, as ppq's tensor rounding), ROUND_HALF_EVEN is
    banker's rounding."""
    num = np.asarray(num, dtype=np.int64)
    den = np.asarray(den, dtype=np.int64)
    q = np.floor_divide(num, den)
    twice_r = 2 * (num - q * den)
    if mode == HALF_UP:
        return q + (twice_r >= den)
    if mode == HALF_EVEN:
        return q + ((twice_r > den) | ((twice_r == den) & (q % 2 == 1)))
    raise ValueError(f"unknown rounding mode {mode!r}")


def round_float(x: np.ndarray, mode: str) -> np.ndarray:
    """Round real values (float64) with the chip's mode."""
    x = np.asarray(x, dtype=np.float64)
    if mode == HALF_UP:
        return np.floor(x + 0.5)
    if mode == HALF_EVEN:
        return np.rint(x)
    raise ValueError(f"unknown rounding mode {mode!r}")


def quantize_alpha(alpha: float, spec: ChipSpec) -> tuple[int, int]:
    """LeakyReLU's slope as (integer, exponent): the smallest power-of-two scale with |alpha| <= qmax*scale."""
    if alpha == 0.0:
        return 0, 0
    exponent = math.ceil(math.log2(abs(alpha) / spec.qmax))
    q = int(round_float(np.array(alpha * 2.0 ** -exponent), spec.rounding))
    return int(np.clip(q, spec.qmin, spec.qmax)), exponent


@dataclass
class QConst:
    """A quantized constant: integers in ONNX layout, exponent per tensor (0-d) or per ``axis`` (1-d)."""

    values: np.ndarray  # int64
    exponent: np.ndarray  # int64, 0-d or 1-d
    axis: int | None = None

    def broadcast_exponent(self, ndim: int, axis: int | None = None) -> np.ndarray:
        """The exponent shaped to broadcast against an ``ndim`` tensor whose channel axis is ``axis``."""
        if self.exponent.ndim == 0:
            return self.exponent
        shape = [1] * ndim
        shape[self.axis if axis is None else axis] = -1
        return self.exponent.reshape(shape)


@dataclass
class Layer:
    """One ESP-DL call: a kernel node plus what folds into it."""

    name: str  # a C identifier
    kernel: onnx.NodeProto
    covered: list[str]  # every node the layer computes (kernel, bias Add, activation, the skipped Q/DQ)
    input_name: str  # the kernel's activation input (a DQ output)
    weight: QConst  # ONNX layout ([M, C/g, kh, kw] for Conv; [K, N] for Gemm/MatMul after transB)
    acc_exponent: np.ndarray  # per tensor (0-d) or per output channel (1-d)
    bias: np.ndarray | None  # int64 per output channel, saturated, each at bias_exponent
    bias_clipped: int  # how many bias values the chip's width saturated
    activation: str  # "Linear", "ReLU" or "LeakyReLU" (dl::activation_type_t)
    alpha: tuple[int, int] | None  # LeakyReLU slope (integer, exponent)
    output: str  # the float tensor the layer's Q reads
    output_exponent: int | None  # None if nothing quantizes the layer's output
    input_exponent: int = 0
    group: int = 1
    attrs: dict = field(default_factory=dict)
    bias_exponent: np.ndarray | None = None  # where each bias integer sits (0-d, or 1-d per channel)
    bias_object_exponent: int = 0  # the exponent written into the dl::Bias object
    bias_ctype: str = "int32_t"
    bias_bits: int = 32

    @property
    def depthwise(self) -> bool:
        return self.kernel.op_type == "Conv" and self.group > 1


def c_identifier(name: str, used: set[str]) -> str:
    """A unique C++ identifier derived from an ONNX name."""
    ident = re.sub(r"\W", "_", name) or "layer"
    if ident[0].isdigit() or ident in _CPP_KEYWORDS:
        ident = f"l_{ident}"
    base, k = ident, 1
    while ident in used:
        ident, k = f"{base}_{k}", k + 1
    used.add(ident)
    return ident


_CPP_KEYWORDS = frozenset(
    "alignas alignof and asm auto bool break case catch char class const constexpr continue default delete do "
    "double else enum explicit export extern false float for friend goto if inline int long mutable namespace "
    "new noexcept not nullptr operator or private protected public register return short signed sizeof static "
    "struct switch template this throw true try typedef typename union unsigned using virtual void volatile "
    "while xor dl std".split()
)


class QdqGraph:
    """Index of a QDQ model for ESP-DL: Q/DQ pairs, quantized constants, and the layer groups."""

    def __init__(self, model: onnx.ModelProto, spec: ChipSpec) -> None:
        self.model = model
        self.spec = spec
        self.index = GraphIndex(model)
        self.nodes = list(model.graph.node)
        self._layers: dict[str, Layer] | None = None

    # -- Q/DQ ------------------------------------------------------------------------------------------
    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return self.index.producer.get(tensor)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return self.index.consumers.get(tensor, [])

    def qdq_exponent(self, node: onnx.NodeProto) -> np.ndarray:
        """Exponent(s) of a QuantizeLinear / DequantizeLinear node; its zero point must be 0 and its type
        the chip's (int8 or int16)."""
        scale = self.index.constant_value(node.input[1])
        if scale is None:
            raise ModelError(f"{node.op_type} {node.name!r}: its scale is not a constant")
        if len(node.input) > 2 and node.input[2]:
            zp = self.index.constant_value(node.input[2])
            if zp is None or np.any(zp != 0):
                raise ModelError(f"{node.op_type} {node.name!r}: ESP-DL is symmetric, but the zero point is not 0")
        exponent = exponent_of(scale, f"{node.op_type} {node.name!r}")
        return exponent

    def check_activation_type(self, node: onnx.NodeProto) -> None:
        zp = self.index.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
        expected = np.dtype(f"int{self.spec.bits}")
        if dtype != expected:
            raise ModelError(
                f"{node.op_type} {node.name!r} quantizes to {dtype}, but {self.spec.chip} at {self.spec.bits} bits "
                f"runs {expected}"
            )

    def quantized_constant(self, tensor: str) -> QConst | None:
        """If ``tensor`` is a DequantizeLinear of a constant, its integers and exponent(s)."""
        dq = self.producer(tensor)
        if dq is None or dq.op_type != "DequantizeLinear" or not self.index.is_constant(dq.input[0]):
            return None
        values = self.index.constant_value(dq.input[0])
        exponent = self.qdq_exponent(dq)
        axis = None
        if exponent.ndim == 1:  # per axis (DequantizeLinear's axis defaults to 1)
            axis = int(self.index.attribute(dq, "axis", 1)) % max(values.ndim, 1)
        return QConst(values.astype(np.int64), exponent, axis)

    def activation_exponent(self, tensor: str) -> int | None:
        """Exponent of an activation read through DQ <- Q (None if the tensor is not such a DQ output)."""
        dq = self.producer(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = self.producer(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            return None
        e = self.qdq_exponent(q)
        if e.ndim and e.size != 1:
            raise ModelError(f"activation {tensor!r} is quantized per channel; ESP-DL activations are per tensor")
        return int(e.reshape(-1)[0])

    def output_quantizer(self, tensor: str) -> onnx.NodeProto | None:
        for n in self.consumers(tensor):
            if n.op_type == "QuantizeLinear":
                return n
        return None

    # -- layers ------------------------------------------------------------------------------------------
    def layers(self) -> dict[str, Layer]:
        """Kernel node name -> Layer, in graph order."""
        if self._layers is None:
            used: set[str] = set()
            self._layers = {}
            for node in self.nodes:
                if node.op_type in KERNEL_OPS:
                    self._layers[node.name] = self._layer(node, used)
        return self._layers

    def covered_nodes(self) -> dict[str, Layer]:
        """Every node a layer computes (kernel included) -> that layer."""
        return {name: layer for layer in self.layers().values() for name in layer.covered}

    def _only_reader(self, tensor: str) -> onnx.NodeProto | None:
        readers = self.consumers(tensor)
        if len(readers) != 1 or tensor in self.index.graph_outputs:
            return None
        return readers[0]

    def _layer(self, node: onnx.NodeProto, used: set[str]) -> Layer:
        label = f"{node.op_type} {node.name!r}"
        weight = self.quantized_constant(node.input[1]) if len(node.input) > 1 else None
        if weight is None:
            raise ModelError(f"{label}: its weight is not a quantized constant; ESP-DL needs int{self.spec.bits} weights")
        attrs: dict = {}
        group = 1
        if node.op_type == "Conv":
            group = int(self.index.attribute(node, "group", 1))
            if weight.values.ndim != 4:
                raise ModelError(f"{label}: only 2-D convolutions run on ESP-DL (weight rank {weight.values.ndim})")
            for key in ("strides", "pads", "dilations", "auto_pad", "kernel_shape"):
                value = self.index.attribute(node, key)
                if value is not None:
                    attrs[key] = value.decode() if isinstance(value, bytes) else list(value) if isinstance(value, (list, tuple)) else value
        else:
            if node.op_type == "Gemm":
                if int(self.index.attribute(node, "transA", 0)):
                    raise ModelError(f"{label}: transA=1 is not supported")
                for key in ("alpha", "beta"):
                    if float(self.index.attribute(node, key, 1.0)) != 1.0:
                        raise ModelError(f"{label}: {key} must be 1 (ESP-DL's FullyConnected has no scaling)")
                if int(self.index.attribute(node, "transB", 0)):
                    weight = QConst(weight.values.T, weight.exponent, None if weight.axis is None else 1 - weight.axis)
            if weight.values.ndim != 2:
                raise ModelError(f"{label}: the weight must be a matrix")
        # Per output channel: Conv axis 0, [K, N] matrices axis 1.
        channel_axis = 0 if node.op_type == "Conv" else 1
        if weight.axis is not None and weight.axis != channel_axis:
            raise ModelError(f"{label}: per-channel weight scales must run along the output channels")
        input_exponent = self.activation_exponent(node.input[0])
        if input_exponent is None:
            raise ModelError(f"{label}: its input {node.input[0]!r} is not a quantized activation")
        acc_exponent = np.asarray(input_exponent + weight.exponent, dtype=np.int64)
        channels = weight.values.shape[channel_axis]
        covered = [node.name]
        out = node.output[0]
        bias_tensor = None
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            bias_tensor = node.input[2]
        elif node.op_type == "MatMul":
            add = self._only_reader(out)
            if add is not None and add.op_type == "Add":
                other = add.input[1] if add.input[0] == out else add.input[0]
                if self.index.is_constant(other) or self.quantized_constant(other) is not None:
                    bias_tensor = other
                    covered.append(add.name)
                    out = add.output[0]
        activation, alpha, clip = "Linear", None, None
        act, skipped = self._fused_activation(out)
        if act is not None:
            covered.extend(skipped)
            covered.append(act.name)
            out = act.output[0]
            if act.op_type == "Relu":
                activation = "ReLU"
            elif act.op_type == "Clip":
                clip = act
            else:
                activation = "LeakyReLU"
                alpha = quantize_alpha(float(self.index.attribute(act, "alpha", 0.01)), self.spec)
        q = self.output_quantizer(out)
        output_exponent = None
        if q is not None:
            e = self.qdq_exponent(q)
            if e.ndim and e.size != 1:
                raise ModelError(f"{label}: its output is quantized per channel; ESP-DL activations are per tensor")
            output_exponent = int(e.reshape(-1)[0])
        if clip is not None:
            activation = self._fold_clip(clip, output_exponent, label)
        per_channel = acc_exponent.ndim == 1
        bias_ctype, bias_bits = self.spec.bias_format(per_channel)
        if self.spec.v1 and per_channel and self.spec.bits != 8:
            raise ModelError(f"{label}: ESP-DL v1.1 runs per-channel weights in int8 only, not int{self.spec.bits}")
        # Where v1.1 and v3 keep each bias integer (chips.py [V1.1]): v3 at the accumulator's exponent; v1.1
        # per tensor at the output exponent, per channel at the accumulator's + 4 (object exponent -128).
        if not self.spec.v1:
            bias_exponent = acc_exponent
            object_exponent = input_exponent if per_channel else int(acc_exponent)
        elif per_channel:
            bias_exponent = acc_exponent + V1_PER_CHANNEL_BIAS_SHIFT
            object_exponent = V1_PER_CHANNEL_BIAS_OBJECT_EXPONENT
        else:
            if output_exponent is None and bias_tensor is not None:
                raise ModelError(f"{label}: its output is not quantized, and ESP-DL v1.1 keeps the bias at the output's exponent")
            bias_exponent = np.asarray(output_exponent if output_exponent is not None else 0, dtype=np.int64)
            object_exponent = int(bias_exponent)
        bias_q, clipped = None, 0
        if bias_tensor is not None:
            bias_q, clipped = self._bias(bias_tensor, bias_exponent, channels, label, bias_bits)
        return Layer(
            name=c_identifier(node.name or node.output[0], used), kernel=node, covered=covered,
            input_name=node.input[0], weight=weight, acc_exponent=acc_exponent,
            bias=bias_q, bias_clipped=clipped, activation=activation, alpha=alpha, output=out,
            output_exponent=output_exponent, input_exponent=input_exponent, group=group, attrs=attrs,
            bias_exponent=np.asarray(bias_exponent, dtype=np.int64), bias_object_exponent=int(object_exponent),
            bias_ctype=bias_ctype, bias_bits=bias_bits,
        )

    def _fold_clip(self, clip: onnx.NodeProto, output_exponent: int | None, label: str) -> str:
        """The activation a Clip after a v1.1 layer folds into, or a ModelError saying why it cannot.

        v1.1 has no Clip or ReLU6 layer and its activations are Linear, ReLU, LeakyReLU and PReLU. A Clip runs
        exactly when each bound is 0 (ReLU) or lies at or beyond what the output exponent can represent (the
        requantization's saturation then clips there)."""
        lo, hi = self.clip_bounds(clip)
        if output_exponent is None:
            raise ModelError(f"Clip {clip.name!r} after {label}: its output is not quantized")
        top = self.spec.qmax * 2.0**output_exponent
        bottom = self.spec.qmin * 2.0**output_exponent
        why = []
        if hi is not None and hi < top:
            why.append(f"its upper bound {hi:g} is below the output's saturation point {top:g} (exponent {output_exponent})")
        if lo is not None and lo != 0 and lo > bottom:
            why.append(f"its lower bound {lo:g} is neither 0 (ReLU) nor at or below {bottom:g}")
        if why:
            raise ModelError(
                f"Clip {clip.name!r} after {label} cannot run on ESP-DL v1.1 ({self.spec.chip}): v1.1 has no Clip or "
                f"ReLU6 layer, and {' and '.join(why)}; use ReLU in the model, or the ESP-DL v3 export "
                "(--format espdl on esp32s3), which has Clip"
            )
        return "ReLU" if lo == 0 else "Linear"

    def clip_bounds(self, clip: onnx.NodeProto) -> tuple[float | None, float | None]:
        """A Clip's (min, max) as floats (None where unbounded); bounds must be constants."""
        bounds: list[float | None] = []
        for i, attr_name in ((1, "min"), (2, "max")):
            if len(clip.input) > i and clip.input[i]:
                value = self.index.constant_value(clip.input[i])
                if value is None:
                    raise ModelError(f"Clip {clip.name!r}: its bounds must be constants")
                bounds.append(float(np.asarray(value).reshape(-1)[0]))
            else:
                value = self.index.attribute(clip, attr_name)
                bounds.append(None if value is None else float(value))
        return bounds[0], bounds[1]

    def _fused_activation(self, tensor: str) -> tuple[onnx.NodeProto | None, list[str]]:
        """A Relu / LeakyRelu reading ``tensor`` alone, directly or through one Q -> DQ pair."""
        reader = self._only_reader(tensor)
        if reader is None:
            return None, []
        fusable = _FUSABLE | {"Clip"} if self.spec.v1 else _FUSABLE
        if reader.op_type in fusable:
            return reader, []
        if reader.op_type != "QuantizeLinear":
            return None, []
        dq = self._only_reader(reader.output[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            return None, []
        act = self._only_reader(dq.output[0])
        if act is None or act.op_type not in fusable:
            return None, []
        return act, [reader.name, dq.name]

    def _bias(self, tensor: str, exponent_to: np.ndarray, channels: int, label: str, bits: int) -> tuple[np.ndarray, int]:
        """Bias integers at ``exponent_to`` (per tensor or per channel) with the chip's rounding, saturated to
        ``bits``."""
        spec = self.spec
        target = np.broadcast_to(np.asarray(exponent_to, dtype=np.int64), (channels,))
        qc = self.quantized_constant(tensor)
        if qc is not None:
            values = qc.values.reshape(-1)
            if values.size == 1:
                values = np.full(channels, int(values[0]))
            exponent = np.broadcast_to(qc.exponent.reshape(-1) if qc.exponent.ndim else qc.exponent, (channels,))
            if values.size != channels:
                raise ModelError(f"{label}: its bias has {values.size} values for {channels} output channels")
            shift = exponent - target
            if np.any(shift < 0):  # a finer bias than the accumulator: round it onto the accumulator's grid
                exact = round_div(values << np.maximum(shift, 0), np.int64(1) << np.maximum(-shift, 0), spec.rounding)
            else:
                exact = values << shift
        else:
            real = self.index.constant_value(tensor)
            if real is None:
                raise ModelError(f"{label}: its bias {tensor!r} is not a constant")
            real = np.asarray(real, dtype=np.float64).reshape(-1)
            if real.size == 1:
                real = np.full(channels, float(real[0]))
            if real.size != channels:
                raise ModelError(f"{label}: its bias has {real.size} values for {channels} output channels")
            exact = round_float(real * np.exp2(-target.astype(np.float64)), spec.rounding)
            exact = np.clip(exact, -(2.0**62), 2.0**62).astype(np.int64)
        clipped = np.clip(exact, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        return clipped.astype(np.int64), int(np.count_nonzero(clipped != exact))
