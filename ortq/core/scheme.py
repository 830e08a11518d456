"""Quantized types and the arithmetic that turns a real range into a scale and zero point.

The formulas keep real zero exactly representable (the zero point is an integer inside the type's range),
so zero padding, ReLU clamps and sparse weights survive quantization without bias. Symmetric schemes use the
restricted signed range (-127..127 for int8) so a per-channel weight quantizes to the same magnitude on both
sides, as ONNX Runtime's integer kernels and TensorRT expect.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

__all__ = [
    "QuantType",
    "QuantSpec",
    "QuantParams",
    "params_from_range",
    "quantize_array",
    "dequantize_array",
    "is_power_of_two",
]


class QuantType(enum.Enum):
    """An integer type a tensor can be quantized to."""

    UINT8 = "uint8"
    INT8 = "int8"
    UINT16 = "uint16"
    INT16 = "int16"
    # ONNX Runtime's member names, so `from ortq import QuantType` is a drop-in replacement.
    QUInt8 = "uint8"
    QInt8 = "int8"
    QUInt16 = "uint16"
    QInt16 = "int16"

    @classmethod
    def parse(cls, value: object) -> "QuantType":
        """Accept ortq names ("uint8"), ONNX Runtime's ``QuantType`` members (``QuantType.QUInt8``) or their names."""
        if isinstance(value, QuantType):
            return value
        # ONNX Runtime reads ``getattr(t, "tensor_type", t)``: its QuantType members and onnx.TensorProto
        # element types (plain ints) are both accepted there, so here too.
        element = getattr(value, "tensor_type", value)
        if isinstance(element, (int, np.integer)) and not isinstance(element, bool):
            for member, onnx_type in _ONNX_DTYPES.items():
                if onnx_type == element:
                    return member
            label = TensorProto.DataType.Name(element) if element in TensorProto.DataType.values() else element
            raise ValueError(f"unsupported quantization element type {label}; choose one of uint8, int8, uint16, int16")
        name = getattr(value, "name", value)
        if not isinstance(name, str):
            raise ValueError(f"not a quantization type: {value!r}")
        key = name.lower().removeprefix("q")
        for member in cls:
            if member.value == key:
                return member
        choices = ", ".join(m.value for m in cls)
        raise ValueError(f"unsupported quantization type {name!r}; choose one of {choices}")

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.value)

    @property
    def onnx_dtype(self) -> int:
        return _ONNX_DTYPES[self]

    @property
    def bits(self) -> int:
        return self.numpy_dtype.itemsize * 8

    @property
    def signed(self) -> bool:
        return self.numpy_dtype.kind == "i"

    @property
    def min_opset(self) -> int:
        """16-bit QuantizeLinear/DequantizeLinear exist in the default domain only from opset 21."""
        return 21 if self.bits == 16 else 10

    def qrange(self, *, symmetric: bool = False, reduce_range: bool = False) -> tuple[int, int]:
        """The integer range used for quantization (not always the whole type)."""
        info = np.iinfo(self.numpy_dtype)
        qmin, qmax = int(info.min), int(info.max)
        if reduce_range:
            # One bit less, so u8 x s8 products cannot saturate 16-bit intermediates on CPUs without VNNI.
            qmin, qmax = (qmin >> 1, qmax >> 1) if self.signed else (0, qmax >> 1)
        if symmetric and self.signed:
            qmin = -qmax
        return qmin, qmax


_ONNX_DTYPES = {
    QuantType.UINT8: TensorProto.UINT8,
    QuantType.INT8: TensorProto.INT8,
    QuantType.UINT16: TensorProto.UINT16,
    QuantType.INT16: TensorProto.INT16,
}


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is to be quantized: the type, symmetry and granularity, not yet the numbers."""

    qtype: QuantType
    symmetric: bool = False
    axis: int | None = None
    reduce_range: bool = False
    #: Scales restricted to 2**k (real = int * 2**exponent), as fixed-point targets such as ESP-DL shift.
    power_of_two: bool = False

    def with_axis(self, axis: int | None) -> "QuantSpec":
        return QuantSpec(self.qtype, self.symmetric, axis, self.reduce_range, self.power_of_two)


@dataclass
class QuantParams:
    """Scale and zero point of one quantized tensor (0-d for per-tensor, 1-d along ``axis`` per channel)."""

    scale: np.ndarray
    zero_point: np.ndarray
    qtype: QuantType
    axis: int | None = None
    source: str = field(default="calibration", compare=False)

    def __post_init__(self) -> None:
        self.scale = np.asarray(self.scale, dtype=np.float32)
        self.zero_point = np.asarray(self.zero_point, dtype=self.qtype.numpy_dtype)
        if self.scale.shape != self.zero_point.shape:
            raise ValueError("scale and zero point must have the same shape")
        if not np.all(np.isfinite(self.scale)) or np.any(self.scale <= 0):
            raise ValueError(f"scale must be finite and positive, got {self.scale}")

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim == 1

    def same_as(self, other: "QuantParams") -> bool:
        return (
            self.qtype is other.qtype
            and self.axis == other.axis
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
        )


def params_from_range(
    lo: np.ndarray | float, hi: np.ndarray | float, spec: QuantSpec
) -> QuantParams:
    """Scale and zero point covering ``[lo, hi]`` (element-wise for per-channel ranges).

    The range is first widened to include zero. A range of zero width (a constant-zero tensor) gets scale 1,
    which quantizes it exactly; scales are kept at or above float32's smallest normal so they stay positive
    after the float32 cast. ``spec.power_of_two`` rounds each scale up to the next power of two (the range
    stays covered; a symmetric scheme is required, since a shift cannot apply a zero point).
    """
    if spec.power_of_two and not spec.symmetric:
        raise ValueError("power-of-two scales need a symmetric scheme")
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(f"range is not finite: [{lo}, {hi}]")
    qmin, qmax = spec.qtype.qrange(symmetric=spec.symmetric, reduce_range=spec.reduce_range)
    if spec.symmetric:
        absmax = np.maximum(-lo, hi)
        scale = absmax / ((qmax - qmin) / 2.0)
        zero_point = np.full(np.shape(scale), (qmin + qmax + 1) // 2, dtype=np.int64)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.round(qmin - lo / safe), qmin, qmax).astype(np.int64)
    zero_width = scale == 0
    scale = np.where(zero_width, 1.0, np.maximum(scale, np.finfo(np.float32).tiny))
    if spec.power_of_two:
        scale = np.exp2(np.ceil(np.log2(scale)))
    return QuantParams(scale.astype(np.float32), zero_point, spec.qtype, spec.axis)


def is_power_of_two(scale: np.ndarray) -> bool:
    """True if every scale is exactly 2**k."""
    mantissa, _ = np.frexp(np.asarray(scale, dtype=np.float64))
    return bool(np.all(mantissa == 0.5))


def _broadcastable(params: QuantParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point shaped to broadcast along the channel axis of an ``ndim`` tensor."""
    scale, zero_point = params.scale, params.zero_point.astype(np.int64)
    if params.per_channel:
        shape = [1] * ndim
        shape[params.axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return scale, zero_point


def quantize_array(values: np.ndarray, params: QuantParams) -> np.ndarray:
    """Quantize ``values`` exactly as ONNX QuantizeLinear does (round half to even, saturate)."""
    # float32 division, as ONNX Runtime's kernel does: float64 would round differently near .5 for 16-bit.
    # In place on one working copy: a weight of N floats costs N more floats here, not the 3x in float64
    # that chained temporaries cost, and that was the peak of quantizing a large model.
    scale, zero_point = _broadcastable(params, values.ndim)
    info = np.iinfo(params.qtype.numpy_dtype)
    q = np.array(values, dtype=np.result_type(np.float32, scale.dtype), copy=True)
    np.divide(q, scale, out=q)
    np.rint(q, out=q)
    if info.bits > 16:  # float32 holds integers exactly only up to 2**24
        q = q.astype(np.float64)
    # Exact while |q| < 2**24; beyond that the value saturates in the clip either way.
    np.add(q, zero_point, out=q, casting="unsafe")
    np.clip(q, info.min, info.max, out=q)
    return q.astype(params.qtype.numpy_dtype)


def dequantize_array(values: np.ndarray, params: QuantParams) -> np.ndarray:
    """Inverse of :func:`quantize_array`, for verification and error measurement."""
    scale, zero_point = _broadcastable(params, values.ndim)
    return ((values.astype(np.int64) - zero_point) * scale).astype(np.float32)
