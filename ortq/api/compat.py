"""Drop-in replacements for ``onnxruntime.quantization``'s static entry points.

Moving from ONNX Runtime is a one-line import change: ``from ortq import quantize_static, QuantType,
QuantFormat, CalibrationMethod, CalibrationDataReader``. ONNX Runtime's own enum members are accepted too
(matched by name, so ``onnxruntime.quantization`` is never imported). Defaults follow ONNX Runtime's, not
ortq's, so the same call gives the same kind of model.
"""

from __future__ import annotations

import abc
import enum
import os
from typing import Any, Sequence

import onnx

from ortq.core.errors import ConfigError
from ortq.core.scheme import QuantType

__all__ = [
    "QuantFormat", "CalibrationMethod", "CalibrationDataReader", "quantize_static", "quantize_dynamic",
    "SUPPORTED_EXTRA_OPTIONS", "SUPPORTED_DYNAMIC_EXTRA_OPTIONS",
]


class QuantFormat(enum.Enum):
    QOperator = 0
    QDQ = 1


class CalibrationMethod(enum.Enum):
    MinMax = 0
    Entropy = 1
    Percentile = 2
    Distribution = 3


class CalibrationDataReader(abc.ABC):
    """Same protocol as ONNX Runtime's: ``get_next()`` returns one feed dict, then None when exhausted."""

    @abc.abstractmethod
    def get_next(self) -> dict | None: ...

    def __iter__(self):  # noqa: ANN204
        return self

    def __next__(self) -> dict:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed


_CALIBRATORS = {"MinMax": "minmax", "Entropy": "entropy", "Percentile": "percentile", "Distribution": "distribution"}

#: extra_options key -> (ortq option, calibrator option?)
SUPPORTED_EXTRA_OPTIONS = {
    "ActivationSymmetric": "activation_symmetric",
    "WeightSymmetric": "weight_symmetric",
    "QuantizeBias": "quantize_bias",
    "MatMulConstBOnly": "matmul_const_b_only",
    "OpTypesToExcludeOutputQuantization": "op_types_no_output_quantization",
    "CalibMovingAverage": "calibrator:moving_average",
    "CalibMovingAverageConstant": "calibrator:averaging_constant",
    "CalibTensorRangeSymmetric": "calibrator:symmetric",
    "CalibPercentile": "calibrator:percentile",
    "CalibNumQuantizedBins": "calibrator:num_quantized_bins",
    # ortq always streams statistics, so ONNX Runtime's memory knob has nothing to do.
    "CalibMaxIntermediateOutputs": None,
    # ONNX Runtime's own per-tensor format (see ortq.pipeline.overrides).
    "TensorQuantOverrides": "tensor_overrides",
}
# Options whose only supported value is ONNX Runtime's default.
_DEFAULT_ONLY = {"DedicatedQDQPair": False, "UseQDQContribOps": False, "EnableSubgraph": False, "ForceQuantizeNoInputCheck": False}


def _enum_name(value: Any) -> str:
    return str(getattr(value, "name", value))


def quantize_static(
    model_input: str | os.PathLike | onnx.ModelProto,
    model_output: str | os.PathLike,
    calibration_data_reader: Any,
    quant_format: Any = QuantFormat.QDQ,
    op_types_to_quantize: Sequence[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    activation_type: Any = QuantType.QInt8,
    weight_type: Any = QuantType.QInt8,
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] | None = None,
    use_external_data_format: bool = False,
    calibrate_method: Any = CalibrationMethod.MinMax,
    calibration_providers: Sequence[Any] | None = None,
    extra_options: dict[str, Any] | None = None,
    *,
    toolkit: Any = None,
    target: str = "cpu",
):  # noqa: ANN201 - returns ortq's QuantizationResult (ONNX Runtime returns None)
    """Signature-compatible with ``onnxruntime.quantization.quantize_static`` (QDQ or QOperator format)."""
    from ortq.api.toolkit import Toolkit

    if _enum_name(quant_format) not in ("QDQ", "QOperator"):
        raise ConfigError(f"quant_format {_enum_name(quant_format)!r} is not QuantFormat.QDQ or QuantFormat.QOperator")
    if use_external_data_format:
        raise ConfigError("use_external_data_format is not supported yet; models must fit in 2 GB")
    method = _enum_name(calibrate_method)
    options: dict[str, Any] = {
        "activation_type": QuantType.parse(activation_type),
        "weight_type": QuantType.parse(weight_type),
        "per_channel": bool(per_channel),
        "reduce_range": bool(reduce_range),
        "op_types_to_quantize": list(op_types_to_quantize) if op_types_to_quantize else None,
        "nodes_to_quantize": list(nodes_to_quantize) if nodes_to_quantize else None,
        "nodes_to_exclude": list(nodes_to_exclude) if nodes_to_exclude else None,
        "calibrate_method": _CALIBRATORS.get(method, method.lower()),
        # ONNX Runtime's defaults where they differ from the cpu backend's:
        "activation_symmetric": False,
        "weight_symmetric": True,
        "quant_format": _enum_name(quant_format).lower(),
    }
    calibrator_options: dict[str, Any] = {}
    for key, value in (extra_options or {}).items():
        if key in _DEFAULT_ONLY:
            if bool(value) != _DEFAULT_ONLY[key]:
                raise ConfigError(f"extra_options[{key!r}]={value!r} is not supported; only {_DEFAULT_ONLY[key]}")
            continue
        if key not in SUPPORTED_EXTRA_OPTIONS:
            supported = ", ".join(sorted([*SUPPORTED_EXTRA_OPTIONS, *_DEFAULT_ONLY]))
            raise ConfigError(f"extra_options key {key!r} is not supported; supported keys: {supported}")
        target_key = SUPPORTED_EXTRA_OPTIONS[key]
        if target_key is None:
            continue
        if target_key.startswith("calibrator:"):
            calibrator_options[target_key.split(":", 1)[1]] = value
        else:
            options[target_key] = value
    if calibrator_options:
        options["calibrator_options"] = calibrator_options
    toolkit = toolkit or Toolkit()
    return toolkit.quantize(
        model_input, model_output, calibration_data=calibration_data_reader, target=target,
        providers=calibration_providers, **options,
    )


#: extra_options keys quantize_dynamic accepts, each only at the value ortq implements (ONNX Runtime's default,
#: except MatMulConstBOnly: dynamic mode only rewrites MatMuls with a constant weight).
SUPPORTED_DYNAMIC_EXTRA_OPTIONS = {
    "WeightSymmetric": True, "MatMulConstBOnly": True, "EnableSubgraph": False, "ForceQuantizeNoInputCheck": False,
}


def quantize_dynamic(
    model_input: str | os.PathLike | onnx.ModelProto,
    model_output: str | os.PathLike,
    op_types_to_quantize: Sequence[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    weight_type: Any = QuantType.QInt8,
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] | None = None,
    use_external_data_format: bool = False,
    extra_options: dict[str, Any] | None = None,
    *,
    toolkit: Any = None,
):  # noqa: ANN201 - returns ortq's QuantizationResult (ONNX Runtime returns None)
    """Signature-compatible with ``onnxruntime.quantization.quantize_dynamic``.

    MatMul/Gemm become ``com.microsoft.DynamicQuantizeMatMul``; Conv only when named in
    ``op_types_to_quantize`` (ONNX Runtime's ConvInteger is slower than float Conv on the CPU).
    """
    from ortq.api.toolkit import Toolkit

    if use_external_data_format:
        raise ConfigError("use_external_data_format is not supported yet; models must fit in 2 GB")
    for key, value in (extra_options or {}).items():
        if key not in SUPPORTED_DYNAMIC_EXTRA_OPTIONS:
            supported = ", ".join(sorted(SUPPORTED_DYNAMIC_EXTRA_OPTIONS))
            raise ConfigError(f"extra_options key {key!r} is not supported by quantize_dynamic; supported keys: {supported}")
        if bool(value) != SUPPORTED_DYNAMIC_EXTRA_OPTIONS[key]:
            raise ConfigError(
                f"extra_options[{key!r}]={value!r} is not supported; only {SUPPORTED_DYNAMIC_EXTRA_OPTIONS[key]}"
            )
    toolkit = toolkit or Toolkit()
    return toolkit.quantize_dynamic(
        model_input, model_output, op_types_to_quantize=list(op_types_to_quantize) if op_types_to_quantize else None,
        per_channel=bool(per_channel), reduce_range=bool(reduce_range), weight_type=QuantType.parse(weight_type),
        nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize else None,
        nodes_to_exclude=list(nodes_to_exclude) if nodes_to_exclude else None,
    )
