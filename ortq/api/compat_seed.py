"""The 2020 ``onnxruntime.quantization`` API many tutorials and SDKs still call: ``quantize(model_proto,
quantization_mode=..., static=..., quantization_params=...)`` returning a ModelProto, and
``calibrate(model_path, data_reader, op_types=..., black_nodes=..., white_nodes=...)`` returning the
quantization parameters to feed it (the end-to-end flow: calibrate, then quantize with QLinear ops).

Each mode maps onto the modern pipeline:

- ``IntegerOps``, ``static=False`` (the default): dynamic quantization of Conv and MatMul, i.e.
  ``quantize_dynamic(op_types_to_quantize=["Conv", "MatMul"])``;
- ``IntegerOps``, ``static=True``: the Conv/MatMul inputs quantized with the given parameters, outputs left
  float (integer kernels that dequantize their result), i.e. ``quantize_static`` in the QDQ format with
  ``TensorQuantOverrides`` and ``OpTypesToExcludeOutputQuantization``;
- ``QLinearOps``, ``static=True``: QLinearConv/QLinearMatMul, inputs and outputs at the given parameters, i.e.
  ``quantize_static(quant_format=QuantFormat.QOperator)`` with ``TensorQuantOverrides``.

``QLinearOps`` with ``static=False`` (dynamically quantized inputs into QLinear kernels with fixed output
parameters) is refused: it needs an int32 bias at a scale known only at run time; use ``static=True`` with
:func:`calibrate`, or ``IntegerOps``.
"""

from __future__ import annotations

import enum
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ortq.api.compat_config import QuantConfig, quantize_with_config
from ortq.core.errors import ConfigError
from ortq.core.scheme import QuantType

__all__ = ["QuantizationMode", "quantize", "quantize_seed", "calibrate"]

log = logging.getLogger(__name__)

_SEED_OP_TYPES = ("Conv", "MatMul")


class QuantizationMode(enum.Enum):
    IntegerOps = 0
    QLinearOps = 1


def _mode(value: Any) -> str:
    name = str(getattr(value, "name", value))
    if name not in ("IntegerOps", "QLinearOps"):
        raise ConfigError(f"quantization_mode={value!r} is not QuantizationMode.IntegerOps or QLinearOps")
    return name


def _overrides(params: Mapping[str, Sequence[Any]]) -> tuple[dict[str, dict[str, Any]], QuantType | None]:
    """``{"name": [zero_point, scale]}`` as TensorQuantOverrides, and the activation type the zero points use."""
    overrides: dict[str, dict[str, Any]] = {}
    qtype = None
    for name, value in params.items():
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"quantization_params[{name!r}] must be [zero_point, scale], got {value!r}")
        zero_point, scale = value
        dtype = np.asarray(zero_point).dtype
        this = QuantType.INT8 if dtype == np.int8 else QuantType.UINT8
        if qtype is not None and this is not qtype:
            raise ConfigError(f"quantization_params[{name!r}]: zero points mix uint8 and int8")
        qtype = this
        overrides[name] = {"scale": float(np.float32(scale)), "zero_point": int(zero_point), "quant_type": this.value}
    return overrides, qtype


def quantize_seed(
    model: onnx.ModelProto,
    per_channel: bool = False,
    nbits: int = 8,
    quantization_mode: Any = QuantizationMode.IntegerOps,
    static: bool = False,
    asymmetric_input_types: bool = False,
    force_fusions: bool = False,
    quantization_params: Mapping[str, Sequence[Any]] | None = None,
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] | None = None,
    op_types_to_quantize: Sequence[str] | None = None,
    symmetric_activation: bool = False,
    symmetric_weight: bool = False,
    input_quantization_params: Mapping[str, Sequence[Any]] | None = None,
    output_quantization_params: Mapping[str, Sequence[Any]] | None = None,
    *,
    toolkit: Any = None,
) -> onnx.ModelProto:
    """The 2020 ``quantize``: returns the quantized ModelProto (``model`` is not modified).

    Modern equivalents: ``ortq.compat.quantize_dynamic`` (IntegerOps, dynamic) and
    ``ortq.compat.quantize_static`` with ``TensorQuantOverrides`` (static modes); ortq's own API is
    ``ortq.quantize``. ``force_fusions`` has no effect: ortq's dynamic MatMul is always the fused
    ``DynamicQuantizeMatMul``. ``input_/output_quantization_params`` (the 2019 names) are merged into
    ``quantization_params``. ``asymmetric_input_types=False`` means uint8 weights, as in the original.
    """
    from ortq.api.toolkit import Toolkit

    if not isinstance(model, onnx.ModelProto):
        raise ConfigError(f"model must be an onnx.ModelProto (the 2020 API), got {type(model).__name__}")
    if nbits != 8:
        raise ConfigError(f"nbits={nbits!r}: only 8-bit quantization exists in this API (as in the original)")
    mode = _mode(quantization_mode)
    params = {**(input_quantization_params or {}), **(output_quantization_params or {}), **(quantization_params or {})}
    weight_type = QuantType.INT8 if asymmetric_input_types else QuantType.UINT8
    op_types = list(op_types_to_quantize) if op_types_to_quantize else list(_SEED_OP_TYPES)
    toolkit = toolkit or Toolkit()
    if mode == "IntegerOps" and not static:
        if params:
            log.warning("quantization_params are not used by dynamic IntegerOps quantization (as in the original)")
        result = toolkit.quantize_dynamic(
            model, None, op_types_to_quantize=op_types, per_channel=per_channel, weight_type=weight_type,
            nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize else None,
            nodes_to_exclude=list(nodes_to_exclude) if nodes_to_exclude else None,
        )
        return result.model
    if not static:
        raise ConfigError(
            "quantization_mode=QLinearOps with static=False (dynamically quantized inputs into QLinear kernels) is "
            "not implemented: its int32 bias needs a scale known only at run time; use static=True with the "
            "parameters calibrate() returns, or QuantizationMode.IntegerOps"
        )
    if not params:
        raise ConfigError("static=True needs quantization_params ({'tensor': [zero_point, scale]}); calibrate() returns them")
    overrides, act_type = _overrides(params)
    options: dict[str, Any] = dict(
        op_types_to_quantize=op_types, per_channel=per_channel, activation_type=act_type or QuantType.UINT8,
        weight_type=weight_type, activation_symmetric=bool(symmetric_activation),
        weight_symmetric=bool(symmetric_weight) or weight_type.signed,
        nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize else None,
        nodes_to_exclude=list(nodes_to_exclude) if nodes_to_exclude else None,
        quant_format="qoperator" if mode == "QLinearOps" else "qdq", tensor_overrides=overrides, verify=False,
    )
    if mode == "IntegerOps":  # integer kernels with float outputs: only their inputs are quantized
        options["op_types_no_output_quantization"] = op_types
    return toolkit.quantize(model, None, **options).model


def quantize(*args: Any, **kwargs: Any):  # noqa: ANN201 - a ModelProto (2020 API) or a QuantizationResult
    """ONNX Runtime's ``quantize``, in both of its forms.

    ``quantize(model_input, model_output, quant_config)`` (a :class:`StaticQuantConfig` or
    :class:`DynamicQuantConfig`; see :func:`ortq.api.compat_config.quantize_with_config`) writes the model;
    ``quantize(model_proto, quantization_mode=..., ...)`` is the 2020 API (:func:`quantize_seed`) and returns a
    ModelProto. Told apart by the arguments: a config object, or a second positional argument that is a path.
    """
    config = kwargs.get("quant_config", args[2] if len(args) > 2 else None)
    second = kwargs.get("model_output", args[1] if len(args) > 1 else None)
    modern = isinstance(config, QuantConfig) or type(config).__name__.endswith("QuantConfig") or isinstance(
        second, (str, os.PathLike))
    if modern:
        if config is None:
            raise TypeError("quantize(model_input, model_output, quant_config): quant_config is missing")
        model_input = kwargs.get("model_input", args[0] if args else None)
        return quantize_with_config(model_input, second, config)
    return quantize_seed(*args, **kwargs)


def calibrate(
    model_path: str | os.PathLike,
    data_reader: Any,
    op_types: str = "Conv,MatMul",
    black_nodes: str = "",
    white_nodes: str = "",
    augmented_model_path: str = "augmented_model.onnx",
    *,
    toolkit: Any = None,
) -> dict[str, list[Any]]:
    """The 2020 ``calibrate``: ``{tensor: [np.uint8 zero_point, np.float32 scale]}`` for every activation
    that quantizing ``op_types`` (comma-separated) needs, to pass to ``quantize(..., static=True,
    quantization_params=...)``. ``black_nodes`` are left float; ``white_nodes`` are quantized whatever their
    op type. ortq observes tensors in memory, so no augmented model is written (``augmented_model_path`` is
    unused). Modern equivalents: ``ortq.compat.create_calibrator`` (ONNX Runtime's), or ``ortq.calibrate``,
    which keeps mergeable statistics.
    """
    from ortq.api.toolkit import Toolkit

    toolkit = toolkit or Toolkit()
    names = [n.strip() for n in op_types.split(",") if n.strip()]
    black = [n.strip() for n in black_nodes.split(",") if n.strip()]
    white = [n.strip() for n in white_nodes.split(",") if n.strip()]
    model = onnx.load(os.fspath(model_path), load_external_data=False)
    by_name = {n.name: n for n in model.graph.node}
    missing = [n for n in white + black if n not in by_name]
    if missing:
        raise ConfigError(f"{os.fspath(model_path)}: no node(s) named {missing} (white_nodes/black_nodes)")
    extra_types = {by_name[n].op_type for n in white} - set(names)
    # A white node's type joins the op types only for that node: the other nodes of that type stay float.
    black += [n.name for n in model.graph.node if n.op_type in extra_types and n.name not in white]
    result = toolkit.quantize(
        model_path, None, calibration_data=data_reader, op_types_to_quantize=names + sorted(extra_types),
        nodes_to_exclude=black or None, activation_type=QuantType.UINT8, activation_symmetric=False,
        quant_format="qoperator", verify=False,
    )
    constants = {i.name for i in model.graph.initializer}
    return {
        name: [p.zero_point.reshape(()).astype(np.uint8)[()], np.float32(p.scale.reshape(()))]
        for name, p in result.params.items()
        if name not in constants and not p.per_channel and p.qtype is QuantType.UINT8
    }
