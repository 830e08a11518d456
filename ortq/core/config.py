"""The options of one quantization run, after the backend's defaults and the user's overrides are merged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ortq.core.errors import ConfigError
from ortq.core.scheme import QuantSpec, QuantType

__all__ = ["QuantConfig", "QUANT_FORMATS", "parse_quant_format"]

#: Output formats: QuantizeLinear/DequantizeLinear pairs, or ONNX Runtime's integer operators.
QUANT_FORMATS = ("qdq", "qoperator")


def parse_quant_format(value: Any) -> str:
    """A format name, or ONNX Runtime's ``QuantFormat`` member, as one of :data:`QUANT_FORMATS`."""
    name = str(getattr(value, "name", value)).lower()
    if name not in QUANT_FORMATS:
        raise ConfigError(f"quant_format {value!r} is not one of {', '.join(QUANT_FORMATS)}")
    return name


@dataclass
class QuantConfig:
    """Resolved scheme and selection options; op quantizers read it through :class:`ortq.PlanContext`."""

    activation: QuantSpec = field(default_factory=lambda: QuantSpec(QuantType.UINT8, symmetric=False))
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(QuantType.INT8, symmetric=True))
    per_channel: bool = True
    quantize_bias: bool = True
    matmul_const_b_only: bool = True
    op_types: frozenset[str] | None = None
    #: The target's slow-when-quantized ops; ignored when ``op_types`` is given explicitly.
    excluded_op_types: frozenset[str] = frozenset()
    nodes_to_quantize: frozenset[str] | None = None
    nodes_to_exclude: frozenset[str] = frozenset()
    #: Output types whose Q is skipped (ONNX Runtime's OpTypesToExcludeOutputQuantization).
    op_types_no_output_quantization: frozenset[str] = frozenset()
    #: A calibrated |range| above this cannot be quantized usefully (masks filled with -1e9 or -3.4e38):
    #: the nodes touching that tensor stay float.
    extreme_range: float = 1e6
    calibrator: str = "minmax"
    #: Output format: "qdq" (QuantizeLinear/DequantizeLinear around float ops) or "qoperator" (integer
    #: kernels such as QLinearConv written into the file; see :mod:`ortq.rewrite_qoperator`).
    quant_format: str = "qdq"
    calibrator_options: dict[str, Any] = field(default_factory=dict)

    @property
    def required_opset(self) -> int:
        """Per-channel axis on DequantizeLinear needs opset 13; 16-bit Q/DQ need opset 21."""
        opset = max(self.activation.qtype.min_opset, self.weight.qtype.min_opset)
        if self.per_channel:
            opset = max(opset, 13)
        return opset
