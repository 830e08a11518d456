"""The options of one quantization run, after the backend's defaults and the user's overrides are merged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ortq.core.errors import ConfigError
from ortq.core.scheme import QuantSpec, QuantType

__all__ = ["QuantConfig", "QUANT_FORMATS", "parse_quant_format", "PASS_THROUGH_OPTIONS"]

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
    #: "auto": per tensor, the range with the least expected quantization error, never worse than min/max
    #: (measured in docs/accuracy.md). The ONNX Runtime drop-ins pass their own default, MinMax.
    calibrator: str = "auto"
    #: Output format: "qdq" (QuantizeLinear/DequantizeLinear around float ops) or "qoperator" (integer
    #: kernels such as QLinearConv written into the file; see :mod:`ortq.rewrite_qoperator`).
    quant_format: str = "qdq"
    calibrator_options: dict[str, Any] = field(default_factory=dict)
    #: Subtract the mean output shift that weight rounding causes from Conv/Gemm/MatMul biases
    #: (:mod:`ortq.pipeline.bias_correction`); needs calibration data.
    bias_correction: bool = False
    #: "gptq": round weights layer by layer against the inputs' second moments
    #: (:mod:`ortq.pipeline.weight_rounding`); None rounds to nearest.
    weight_rounding: str | None = None
    #: Cross-layer equalization of Conv pairs before calibration (:mod:`ortq.pipeline.equalize`).
    equalize: bool = False
    #: SmoothQuant (:mod:`ortq.pipeline.smooth_quant`): divide MatMul/Gemm input channels by s, multiply the
    #: weight rows by s, folded into the op before (no op added); a first pass over the calibration data
    #: gathers the channel statistics. Off by default: measured in docs/algorithms.md.
    smooth_quant: bool = False
    #: Pin SmoothQuant's migration strength (0 < alpha < 1); None picks it per tensor by the consumers' error.
    smooth_quant_alpha: float | None = None
    #: Inside transformer blocks (:mod:`ortq.pipeline.transformer`) quantize only the MatMul/Gemm inputs and
    #: weights and keep the residual stream (bias and residual Adds, GELU, LayerNorm, Softmax, the mask) float:
    #: its outlier channels do not fit one 8-bit scale (docs/accuracy.md, Transformers). Targets turn it on
    #: where it was measured (cpu); op types named in ``op_types`` are quantized regardless.
    transformer_policy: bool = False
    #: Gather from a constant table (a word embedding) reads an 8-bit table: DQ -> Gather -> Q with one scale,
    #: which ONNX Runtime runs as a Gather on the 8-bit table (a quarter of the size, no dequantization of
    #: the whole table per run). Off where the target's runtime was not checked to do that.
    quantize_embeddings: bool = False
    #: A calibrated range narrower than this is widened to it (ONNX Runtime's ``MinimumRealRange``), so a
    #: nearly constant tensor does not get a scale so fine that kernels lose precision on the requantization.
    min_real_range: float | None = None
    #: uint8 activations get zero point 0 (range >= 0) or the middle of the type (range straddling 0), with
    #: the scale widened to keep the range covered (ONNX Runtime's ``ActivationRestrictedAsymmetric``), for
    #: accelerators that only take those two zero points.
    activation_restricted_asymmetric: bool = False
    #: Write QuantizeLinear/DequantizeLinear in the ``com.microsoft`` domain (ONNX Runtime's
    #: ``UseQDQContribOps``), for runtimes that only accept those.
    qdq_contrib_ops: bool = False
    #: A graph input read by a data-movement op (Reshape, Flatten, Transpose, ...) gets an Activation
    #: quantization of its own, so that op runs on integers; otherwise the planner leaves it float, since
    #: moving an unquantized tensor gains nothing on a host runtime. Set by targets whose firmware is fed
    #: integers at the input's scale (ESP-DL: the application quantizes the input), where there is no float
    #: path for the op at all.
    quantize_graph_inputs: bool = False
    #: Op types treated as if named in ``op_types`` without restricting the selection to them: the ONNX Runtime
    #: drop-in's default list (ops ONNX Runtime quantizes unasked that ortq quantizes only when named, such as
    #: InstanceNormalization, which no CPU kernel runs on integers).
    default_named_op_types: frozenset[str] = frozenset()

    @property
    def required_opset(self) -> int:
        """Per-channel axis on DequantizeLinear needs opset 13; 16-bit Q/DQ need opset 21."""
        opset = max(self.activation.qtype.min_opset, self.weight.qtype.min_opset)
        if self.per_channel:
            opset = max(opset, 13)
        return opset


#: QuantConfig fields set verbatim from a same-named, non-None option (None keeps the backend's default).
PASS_THROUGH_OPTIONS = (
    "min_real_range", "activation_restricted_asymmetric", "qdq_contrib_ops", "transformer_policy", "quantize_embeddings",
    "excluded_op_types", "quantize_graph_inputs", "default_named_op_types",
)
