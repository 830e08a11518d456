"""ONNX Runtime's configuration-object API: ``quantize(model_input, model_output, quant_config)`` with
``StaticQuantConfig`` / ``DynamicQuantConfig``, and ``get_qdq_config(...)`` that builds a QDQ config for a
model. Same attributes and defaults as ONNX Runtime's classes, so code that builds or edits a config
(``config.extra_options["..."] = ...``) keeps working; the work is done by :func:`ortq.compat.quantize_static`
and :func:`ortq.compat.quantize_dynamic`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import onnx

from ortq.api.compat import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from ortq.core.errors import ConfigError

__all__ = ["QuantConfig", "StaticQuantConfig", "DynamicQuantConfig", "get_qdq_config", "quantize_with_config"]

#: ONNX Runtime writes external data itself from this size on (protobuf's 2 GB limit).
_EXTERNAL_DATA_THRESHOLD = 2**31


class QuantConfig:
    """Options shared by static and dynamic quantization (ONNX Runtime's base class)."""

    def __init__(
        self,
        activation_type: Any = QuantType.QUInt8,
        weight_type: Any = QuantType.QInt8,
        op_types_to_quantize: Sequence[str] | None = None,
        nodes_to_quantize: Sequence[str] | None = None,
        nodes_to_exclude: Sequence[str] | Callable | None = None,
        per_channel: bool = False,
        reduce_range: bool = False,
        use_external_data_format: bool = False,
    ) -> None:
        self.op_types_to_quantize = op_types_to_quantize or []
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.weight_type = weight_type
        self.activation_type = activation_type
        self.nodes_to_quantize = nodes_to_quantize or []
        self.nodes_to_exclude = nodes_to_exclude or []
        self.use_external_data_format = use_external_data_format


class StaticQuantConfig(QuantConfig):
    """Static quantization options, consumed by :func:`quantize_with_config` (``ortq.compat.quantize``)."""

    def __init__(
        self,
        calibration_data_reader: Any,
        calibrate_method: Any = CalibrationMethod.MinMax,
        quant_format: Any = QuantFormat.QDQ,
        activation_type: Any = QuantType.QInt8,
        weight_type: Any = QuantType.QInt8,
        op_types_to_quantize: Sequence[str] | None = None,
        nodes_to_quantize: Sequence[str] | None = None,
        nodes_to_exclude: Sequence[str] | Callable | None = None,
        per_channel: bool = False,
        reduce_range: bool = False,
        use_external_data_format: bool = False,
        calibration_providers: Sequence[Any] | None = None,
        extra_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            activation_type=activation_type, weight_type=weight_type, op_types_to_quantize=op_types_to_quantize,
            nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=nodes_to_exclude, per_channel=per_channel,
            reduce_range=reduce_range, use_external_data_format=use_external_data_format,
        )
        self.calibration_data_reader = calibration_data_reader
        self.calibrate_method = calibrate_method
        self.quant_format = quant_format
        self.calibration_providers = calibration_providers
        self.extra_options = extra_options or {}


class DynamicQuantConfig(QuantConfig):
    """Dynamic quantization options, consumed by :func:`quantize_with_config` (``ortq.compat.quantize``)."""

    def __init__(
        self,
        weight_type: Any = QuantType.QInt8,
        op_types_to_quantize: Sequence[str] | None = None,
        nodes_to_quantize: Sequence[str] | None = None,
        nodes_to_exclude: Sequence[str] | None = None,
        per_channel: bool = False,
        reduce_range: bool = False,
        use_external_data_format: bool = False,
        extra_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            op_types_to_quantize=op_types_to_quantize, per_channel=per_channel, reduce_range=reduce_range,
            weight_type=weight_type, nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=nodes_to_exclude,
            use_external_data_format=use_external_data_format,
        )
        self.extra_options = extra_options or {}


def get_qdq_config(
    model_input: str | os.PathLike | onnx.ModelProto,
    calibration_data_reader: Any,
    calibrate_method: Any = CalibrationMethod.MinMax,
    calibrate_args: dict[str, Any] | None = None,
    activation_type: Any = QuantType.QUInt8,
    weight_type: Any = QuantType.QInt8,
    activation_symmetric: bool = False,
    weight_symmetric: bool | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    keep_removable_activations: bool = False,
    min_real_range: float | None = None,
    tensor_quant_overrides: dict[str, list[dict[str, Any]]] | None = None,
    calibration_providers: Sequence[str] | None = None,
    op_types_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] | Callable[[onnx.ModelProto, onnx.NodeProto], bool] | None = None,
    extra_options: dict | None = None,
) -> StaticQuantConfig:
    """A QDQ :class:`StaticQuantConfig` for ``model_input``, as ONNX Runtime's function builds it.

    The keyword arguments become the extra_options ONNX Runtime uses for them (``MinimumRealRange``,
    ``QDQKeepRemovableActivations``, ``ActivationSymmetric``, ``WeightSymmetric``,
    ``ForceQuantizeNoInputCheck``, ``TensorQuantOverrides`` and the ``Calib*`` keys from ``calibrate_args``),
    ``extra_options`` override them, and a ``nodes_to_exclude`` function is evaluated on the model's nodes
    here. ``op_types_to_quantize`` defaults to every op type in the model but Cast/QuantizeLinear/
    DequantizeLinear. 4-bit types are refused by ``quantize`` (not implemented), so ``UseQDQContribOps`` is
    never set on their account.
    """
    model = model_input if isinstance(model_input, onnx.ModelProto) else onnx.load(
        os.fspath(model_input), load_external_data=False)
    excluded = set(nodes_to_exclude) if isinstance(nodes_to_exclude, (list, tuple, set)) else set()
    wanted = set(op_types_to_quantize) if op_types_to_quantize else None
    op_types: set[str] = set()
    for node in model.graph.node:
        if (wanted and node.op_type not in wanted) or node.name in excluded:
            continue
        if callable(nodes_to_exclude) and nodes_to_exclude(model, node):
            excluded.add(node.name)
        else:
            op_types.add(node.op_type)
    external = any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    options: dict[str, Any] = {
        "MinimumRealRange": min_real_range,
        "QDQKeepRemovableActivations": keep_removable_activations,
        "ActivationSymmetric": activation_symmetric,
        "WeightSymmetric": weight_symmetric,
        "ForceQuantizeNoInputCheck": True,
        "TensorQuantOverrides": dict(tensor_quant_overrides or {}),
    }
    calib_keys = {"symmetric": "CalibTensorRangeSymmetric", "moving_average": "CalibMovingAverage",
                  "averaging_constant": "CalibMovingAverageConstant",
                  "max_intermediate_outputs": "CalibMaxIntermediateOutputs", "percentile": "CalibPercentile"}
    for name, key in calib_keys.items():
        if calibrate_args and name in calibrate_args:
            options[key] = calibrate_args[name]
    options.update(extra_options or {})
    return StaticQuantConfig(
        calibration_data_reader, calibrate_method=calibrate_method, quant_format=QuantFormat.QDQ,
        activation_type=activation_type, weight_type=weight_type,
        op_types_to_quantize=list(op_types_to_quantize) if op_types_to_quantize else sorted(
            op_types - {"Cast", "QuantizeLinear", "DequantizeLinear"}),
        nodes_to_exclude=sorted(excluded), per_channel=per_channel, reduce_range=reduce_range,
        use_external_data_format=external or model.ByteSize() >= _EXTERNAL_DATA_THRESHOLD,
        calibration_providers=calibration_providers, extra_options=options,
    )


def quantize_with_config(
    model_input: str | os.PathLike | onnx.ModelProto, model_output: str | os.PathLike, quant_config: QuantConfig,
):  # noqa: ANN201 - ortq's QuantizationResult
    """ONNX Runtime's ``quantize(model_input, model_output, quant_config)``.

    A config object from ``onnxruntime.quantization`` itself is accepted too (matched by class name). Its
    ``WeightOnlyQuantConfig`` (MatMulNBits) is refused: ortq does not implement 4-bit weight-only quantization.
    """
    kind = type(quant_config).__name__
    if isinstance(quant_config, StaticQuantConfig) or kind == "StaticQuantConfig":
        return quantize_static(
            model_input, model_output, quant_config.calibration_data_reader,
            calibrate_method=quant_config.calibrate_method, quant_format=quant_config.quant_format,
            activation_type=quant_config.activation_type, weight_type=quant_config.weight_type,
            op_types_to_quantize=quant_config.op_types_to_quantize,
            nodes_to_quantize=quant_config.nodes_to_quantize, nodes_to_exclude=quant_config.nodes_to_exclude,
            per_channel=quant_config.per_channel, reduce_range=quant_config.reduce_range,
            use_external_data_format=quant_config.use_external_data_format,
            calibration_providers=quant_config.calibration_providers, extra_options=quant_config.extra_options,
        )
    if isinstance(quant_config, DynamicQuantConfig) or kind == "DynamicQuantConfig":
        return quantize_dynamic(
            model_input, model_output, weight_type=quant_config.weight_type,
            op_types_to_quantize=quant_config.op_types_to_quantize,
            nodes_to_quantize=quant_config.nodes_to_quantize, nodes_to_exclude=quant_config.nodes_to_exclude,
            per_channel=quant_config.per_channel, reduce_range=quant_config.reduce_range,
            use_external_data_format=quant_config.use_external_data_format, extra_options=quant_config.extra_options,
        )
    if kind == "WeightOnlyQuantConfig" or any(c.__name__ == "WeightOnlyQuantConfig" for c in type(quant_config).__mro__):
        raise ConfigError(f"quant_config={kind}: 4-bit weight-only (MatMulNBits) quantization is not implemented")
    raise TypeError(f"quant_config must be a StaticQuantConfig or DynamicQuantConfig, got {kind}")
