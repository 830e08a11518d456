"""Drop-in replacements for ``onnxruntime.quantization``'s static and dynamic entry points.

Moving from ONNX Runtime is a one-line import change: ``from ortq.compat import quantize_static, QuantType,
QuantFormat, CalibrationMethod, CalibrationDataReader`` (the common names are in ``ortq`` too). ONNX
Runtime's own enum members and ``onnx.TensorProto`` element types are accepted as well (read by name or
``tensor_type``, so ``onnxruntime.quantization`` is never imported). Defaults and option semantics follow ONNX
Runtime's, not ortq's, so the same call gives the same kind of model; where ortq differs, the tables below
say how and why, and ``docs/compatibility.md`` is generated from them (``python -m ortq.api.compat_table``).

Errors are ONNX Runtime's built-in exception types too (:mod:`ortq.core.errors`): ``except ValueError``
written for ONNX Runtime keeps working.
"""

from __future__ import annotations

import abc
import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx
from onnx import TensorProto

from ortq.core.errors import CalibrationDataError, ConfigError
from ortq.core.scheme import QuantType
from ortq.pipeline.rewrite_dynamic import DEFAULT_DYNAMIC_OP_TYPES

__all__ = [
    "QuantFormat", "CalibrationMethod", "CalibrationDataReader", "QuantType", "quantize_static", "quantize_dynamic",
    "Support", "STATIC_ARGUMENTS", "DYNAMIC_ARGUMENTS", "EXTRA_OPTIONS", "DYNAMIC_EXTRA_OPTIONS", "parse_qtype",
]

log = logging.getLogger(__name__)


class _OrtEnum(enum.Enum):
    """Equal to ONNX Runtime's member of the same enum and name, so a config built here compares equal to
    the one ONNX Runtime's function would build (``config.quant_format == onnxruntime...QuantFormat.QDQ``)."""

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return type(other).__name__ == type(self).__name__ and getattr(other, "name", None) == self.name

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))


class QuantFormat(_OrtEnum):
    QOperator = 0
    QDQ = 1


class CalibrationMethod(_OrtEnum):
    MinMax = 0
    Entropy = 1
    Percentile = 2
    Distribution = 3


class CalibrationDataReader(abc.ABC):
    """Same protocol as ONNX Runtime's: ``get_next()`` returns one feed dict, then None when exhausted.

    ``set_range(start_index, end_index)`` and ``__len__`` exist as in ONNX Runtime so subclasses written for
    its strided calibration (``CalibStridedMinMax``) keep working; ortq reads the whole reader in one
    streaming pass, so it never calls ``set_range`` itself.
    """

    @abc.abstractmethod
    def get_next(self) -> dict | None: ...

    def __iter__(self):  # noqa: ANN204
        return self

    def __next__(self) -> dict:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not define __len__")

    def set_range(self, start_index: int, end_index: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not define set_range")


# -- the support tables (docs/compatibility.md is generated from them) ------------------------------------
@dataclass(frozen=True)
class Support:
    """How ortq handles one ONNX Runtime argument or extra option.

    ``status``: ``same`` (ONNX Runtime's semantics), ``better`` (accepted; ortq does something ONNX Runtime
    documents as a defect or limit differently, said in ``note``), ``ignored`` (accepted and has no effect
    in ortq, said why; unknown keys ONNX Runtime itself ignores are logged as warnings), or ``refused``
    (only the listed values are accepted; anything else raises a ``ConfigError`` naming the option).
    ``accepted`` is the value(s) accepted when ``status`` is ``refused``.
    """

    status: str
    note: str = ""
    accepted: tuple[Any, ...] = ()


STATIC_ARGUMENTS: dict[str, Support] = {
    "model_input": Support("same", "a path or a ModelProto; the file is never modified"),
    "model_output": Support("same", "written atomically: nothing half-written is left on failure"),
    "calibration_data_reader": Support(
        "better", "any object with get_next(), or an iterable of feed dicts, numpy files or folders; read in one "
        "streaming pass (memory does not grow with the number of batches)"),
    "quant_format": Support("same", "QDQ or QOperator"),
    "op_types_to_quantize": Support("same"),
    "per_channel": Support("same"),
    "reduce_range": Support("same"),
    "activation_type": Support(
        "refused", "QuantType members (ortq's or ONNX Runtime's) or onnx.TensorProto element types; 4-bit and "
        "float8 activations are not implemented", ("QUInt8", "QInt8", "QUInt16", "QInt16")),
    "weight_type": Support(
        "refused", "as activation_type; 4-bit weights: use ONNX Runtime's MatMulNBits tools",
        ("QUInt8", "QInt8", "QUInt16", "QInt16")),
    "nodes_to_quantize": Support("same"),
    "nodes_to_exclude": Support("same", "a list of names, or a function (model, node) -> bool as in get_qdq_config"),
    "use_external_data_format": Support(
        "same", "weights go to '<output>.data' next to the model; ortq also does this on its own above 2 GB"),
    "calibrate_method": Support(
        "refused", "MinMax, Entropy and Percentile; Distribution (ONNX Runtime's float8 calibration) is not "
        "implemented", ("MinMax", "Entropy", "Percentile")),
    "calibration_providers": Support("same"),
    "extra_options": Support("same", "see the extra_options table"),
    "calibration_cache_path": Support(
        "same", "ONNX Runtime's JSON cache format: written after calibrating, read instead of calibrating when "
        "present (a cache of another calibration method is a ValueError)"),
}

DYNAMIC_ARGUMENTS: dict[str, Support] = {
    "model_input": STATIC_ARGUMENTS["model_input"],
    "model_output": STATIC_ARGUMENTS["model_output"],
    "op_types_to_quantize": Support(
        "better", f"{', '.join(sorted(DEFAULT_DYNAMIC_OP_TYPES))} by default; Conv only when named (ConvInteger is "
        "slower than float Conv on ONNX Runtime's CPU provider); other types are ignored with a warning"),
    "per_channel": Support("same"),
    "reduce_range": Support("same"),
    "weight_type": Support("refused", "8-bit weights", ("QInt8", "QUInt8")),
    "nodes_to_quantize": Support("same"),
    "nodes_to_exclude": Support("same"),
    "use_external_data_format": STATIC_ARGUMENTS["use_external_data_format"],
    "extra_options": Support("same", "see the dynamic extra_options table"),
}

_CALIB = "calibrator:"
#: extra_options key -> (Support, ortq option it sets or None). ``refused`` entries list accepted values.
EXTRA_OPTIONS: dict[str, tuple[Support, str | None]] = {
    "ActivationSymmetric": (Support("same"), "activation_symmetric"),
    "WeightSymmetric": (Support("same", "None: symmetric for signed weight types, as ONNX Runtime"), "weight_symmetric"),
    "QuantizeBias": (Support("same"), "quantize_bias"),
    "MatMulConstBOnly": (Support("same"), "matmul_const_b_only"),
    "OpTypesToExcludeOutputQuantization": (Support("same"), "op_types_no_output_quantization"),
    "MinimumRealRange": (Support("same"), "min_real_range"),
    "ActivationRestrictedAsymmetric": (Support("same", "uint8 activations only, as ONNX Runtime"),
                                       "activation_restricted_asymmetric"),
    "UseQDQContribOps": (Support("same", "Q/DQ in the com.microsoft domain"), "qdq_contrib_ops"),
    "TensorQuantOverrides": (Support(
        "same", "ONNX Runtime's format; 'convert' entries and 4-bit/float8 types are refused by name"),
        "tensor_overrides"),
    "CalibMovingAverage": (Support("same"), _CALIB + "moving_average"),
    "CalibMovingAverageConstant": (Support("same"), _CALIB + "averaging_constant"),
    "CalibTensorRangeSymmetric": (Support("same"), _CALIB + "symmetric"),
    "CalibPercentile": (Support("same"), _CALIB + "percentile"),
    "CalibNumQuantizedBins": (Support("same"), _CALIB + "num_quantized_bins"),
    "CalibMaxIntermediateOutputs": (Support(
        "ignored", "ortq streams statistics in one pass; ONNX Runtime's memory knob has nothing to bound"), None),
    "CalibStridedMinMax": (Support(
        "ignored", "ortq streams statistics in one pass; the ranges are those of the whole reader, as with "
        "ONNX Runtime's strided runs"), None),
    "ForceQuantizeNoInputCheck": (Support(
        "same", "True: a data-movement or selection op (Reshape, Slice, GatherElements, TopK, Where, ...) "
        "reading a graph input is quantized, its input getting its own Q/DQ; ops fed by float ops keep ortq's "
        "placement (quantized only where an input already is)"), "quantize_graph_inputs"),
    "QDQKeepRemovableActivations": (Support(
        "ignored", "ortq keeps Relu/Clip nodes in the graph (their Q/DQ carry the clipped range), which is "
        "what True asks for; False does not remove them either (ONNX Runtime's fusion does at load time)"), None),
    "DefaultTensorType": (Support(
        "ignored", "ortq leaves tensors of unknown type in float instead of guessing a type"), None),
    "EnableSubgraph": (Support("refused", "static quantization of If/Loop/Scan bodies is not implemented",
                               (False,)), None),
    "DedicatedQDQPair": (Support("refused", "ortq writes one Q per tensor shared by all consumers, which is "
                                "what ONNX Runtime fuses best", (False,)), None),
    "AddQDQPairToWeight": (Support("refused", "ortq stores weights quantized behind a DequantizeLinear",
                                   (False,)), None),
    "QDQOpTypePerChannelSupportToAxis": (Support(
        "refused", "ortq's op quantizers choose the per-channel axis of each op", ({},)), None),
    "QDQDisableWeightAdjustForInt32Bias": (Support(
        "refused", "ortq always keeps a bias representable in int32 (it widens the weight scale when needed)",
        (False,)), None),
    "SmoothQuant": (Support("refused", "SmoothQuant is not implemented", (False,)), None),
    "SmoothQuantAlpha": (Support("ignored", "only read with SmoothQuant"), None),
    "SmoothQuantFolding": (Support("ignored", "only read with SmoothQuant"), None),
    "BlockSize": (Support("refused", "blocked quantization is not implemented", (0, None)), None),
}

DYNAMIC_EXTRA_OPTIONS: dict[str, Support] = {
    "WeightSymmetric": Support("refused", "dynamic weights are symmetric", (True, None)),
    "ActivationSymmetric": Support("refused", "DynamicQuantizeLinear computes asymmetric uint8 ranges", (False,)),
    "MatMulConstBOnly": Support("refused", "only MatMuls with a constant weight are rewritten", (True,)),
    "EnableSubgraph": Support("refused", "dynamic quantization of If/Loop/Scan bodies is not implemented", (False,)),
    "ForceQuantizeNoInputCheck": Support("ignored", "dynamic kernels quantize their own input"),
    "extra.Sigmoid.nnapi": Support("ignored", "NNAPI-only Sigmoid handling; ortq's dynamic mode leaves Sigmoid float"),
}


def _refused(key: str, value: Any, support: Support, what: str = "extra_options") -> ConfigError:
    return ConfigError(
        f"{what}[{key!r}]={value!r} is not supported: {support.note}; accepted: "
        + ", ".join(repr(v) for v in support.accepted)
    )


def _value_accepted(value: Any, accepted: tuple[Any, ...]) -> bool:
    return any(value is a if a is None else (value is not None and value == a) for a in accepted)


# -- argument parsing shared by the drop-ins ---------------------------------------------------------------
_ELEMENT_TYPES = {
    TensorProto.UINT8: QuantType.UINT8, TensorProto.INT8: QuantType.INT8,
    TensorProto.UINT16: QuantType.UINT16, TensorProto.INT16: QuantType.INT16,
}
_NOT_IMPLEMENTED_TYPES = {
    TensorProto.FLOAT8E4M3FN: "float8 (E4M3FN) quantization is not implemented",
    TensorProto.INT4: "4-bit quantization is not implemented (for weights, use ONNX Runtime's MatMulNBits tools)",
    TensorProto.UINT4: "4-bit quantization is not implemented (for weights, use ONNX Runtime's MatMulNBits tools)",
}
_NOT_IMPLEMENTED_NAMES = {"QFLOAT8E4M3FN": TensorProto.FLOAT8E4M3FN, "QInt4": TensorProto.INT4, "QUInt4": TensorProto.UINT4}


def parse_qtype(value: Any, parameter: str) -> QuantType:
    """A quantization type from ortq's or ONNX Runtime's ``QuantType`` or an ``onnx.TensorProto`` element
    type (ONNX Runtime reads ``getattr(t, "tensor_type", t)``); the error names ``parameter``."""
    if isinstance(value, QuantType):
        return value
    name = getattr(value, "name", None)
    if isinstance(name, str) and name in _NOT_IMPLEMENTED_NAMES:
        raise ConfigError(f"{parameter}={value!r}: {_NOT_IMPLEMENTED_TYPES[_NOT_IMPLEMENTED_NAMES[name]]}")
    element = getattr(value, "tensor_type", value)
    if isinstance(element, int) and not isinstance(element, bool):
        if element in _ELEMENT_TYPES:
            return _ELEMENT_TYPES[element]
        reason = _NOT_IMPLEMENTED_TYPES.get(element, "not an 8- or 16-bit integer element type")
        raise ConfigError(f"{parameter}={value!r} ({TensorProto.DataType.Name(element) if element in TensorProto.DataType.values() else element}): {reason}")
    try:
        return QuantType.parse(value)
    except ValueError as exc:
        raise ConfigError(f"{parameter}={value!r}: {exc}") from None


def _enum_name(value: Any) -> str:
    return str(getattr(value, "name", value))


_CALIBRATORS = {"MinMax": "minmax", "Entropy": "entropy", "Percentile": "percentile"}


def _nodes_to_exclude(nodes: Any, model_input: Any) -> list[str] | None:
    """A list of names, or ONNX Runtime's callable ``(model, node) -> bool`` evaluated on the model."""
    if not nodes:
        return None
    if callable(nodes):
        model = model_input if isinstance(model_input, onnx.ModelProto) else onnx.load(
            os.fspath(model_input), load_external_data=False)
        return [n.name for n in model.graph.node if n.name and nodes(model, n)]
    return list(nodes)


#: Ops ONNX Runtime's static quantizer quantizes by default in QDQ (no ``op_types_to_quantize``) that a target may
#: list as slow-when-quantized; the drop-in quantizes them as ONNX Runtime does, with ortq's placement. The
#: target's other exclusions (Softmax, AveragePool, Pad: ortq places their Q/DQ differently from ONNX
#: Runtime, see benchmarks/peer-ort-suite.md) still apply unless named.
ORT_QUANTIZES_BY_DEFAULT = frozenset({"ConvTranspose"})
#: Ops ONNX Runtime quantizes by default that ortq's op quantizers quantize only when named (no integer
#: kernel runs them); the drop-in treats them as named when ``op_types_to_quantize`` is not given.
ORT_NAMED_BY_DEFAULT = frozenset({"InstanceNormalization"})


def static_options(
    quant_format: Any, op_types_to_quantize: Any, per_channel: Any, reduce_range: Any, activation_type: Any,
    weight_type: Any, nodes_to_quantize: Any, nodes_to_exclude: Any, calibrate_method: Any,
    extra_options: dict[str, Any] | None, model_input: Any = None,
) -> dict[str, Any]:
    """ONNX Runtime's static arguments as ortq pipeline options (what ``quantize_static`` passes on)."""
    if _enum_name(quant_format) not in ("QDQ", "QOperator"):
        raise ConfigError(f"quant_format={quant_format!r} is not QuantFormat.QDQ or QuantFormat.QOperator")
    method = _enum_name(calibrate_method)
    if method not in _CALIBRATORS:
        raise ConfigError(f"calibrate_method={calibrate_method!r}: {STATIC_ARGUMENTS['calibrate_method'].note}")
    weight_qtype = parse_qtype(weight_type, "weight_type")
    options: dict[str, Any] = {
        "activation_type": parse_qtype(activation_type, "activation_type"),
        "weight_type": weight_qtype,
        "per_channel": bool(per_channel),
        "reduce_range": bool(reduce_range),
        "op_types_to_quantize": list(op_types_to_quantize) if op_types_to_quantize else None,
        "nodes_to_quantize": list(nodes_to_quantize) if nodes_to_quantize else None,
        "nodes_to_exclude": _nodes_to_exclude(nodes_to_exclude, model_input),
        "calibrate_method": _CALIBRATORS[method],
        # ONNX Runtime's defaults where they differ from the cpu backend's:
        "activation_symmetric": False,
        "weight_symmetric": weight_qtype.signed,
        "quant_format": _enum_name(quant_format).lower(),
        # ONNX Runtime's op selection: no transformer residual-stream policy; constant-table Gathers stay as
        # ortq's drop-ins always had them (float).
        "transformer_policy": False,
        "quantize_embeddings": False,
    }
    calibrator_options: dict[str, Any] = {}
    for key, value in (extra_options or {}).items():
        if key not in EXTRA_OPTIONS:
            log.warning("extra_options key %r is not an ONNX Runtime option; ignored (as ONNX Runtime does)", key)
            continue
        support, target = EXTRA_OPTIONS[key]
        if support.status == "refused" and support.accepted and not _value_accepted(value, support.accepted):
            raise _refused(key, value, support)
        if support.status == "ignored" and target is None:
            log.info("extra_options[%r] has no effect in ortq: %s", key, support.note)
            continue
        if target is None:
            continue
        if key == "ForceQuantizeNoInputCheck" and not value:
            continue  # False: the target's own choice (a target fed integers keeps quantizing its inputs)
        if key == "WeightSymmetric" and value is None:
            continue
        if target.startswith(_CALIB):
            calibrator_options[target[len(_CALIB):]] = value
        else:
            options[target] = value
    if options["calibrate_method"] in ("entropy", "percentile"):
        # ONNX Runtime's methods as ONNX Runtime computes them: without ortq's guard against ranges worse than
        # min/max (docs/accuracy.md), which ortq.quantize applies.
        calibrator_options["guard"] = False
    if calibrator_options:
        options["calibrator_options"] = calibrator_options
    return options


def quantize_static(
    model_input: str | os.PathLike | onnx.ModelProto,
    model_output: str | os.PathLike,
    calibration_data_reader: Any = None,
    quant_format: Any = QuantFormat.QDQ,
    op_types_to_quantize: Sequence[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    activation_type: Any = QuantType.QInt8,
    weight_type: Any = QuantType.QInt8,
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] | Any = None,
    use_external_data_format: bool = False,
    calibrate_method: Any = CalibrationMethod.MinMax,
    calibration_providers: Sequence[Any] | None = None,
    extra_options: dict[str, Any] | None = None,
    calibration_cache_path: str | os.PathLike | None = None,
    *,
    toolkit: Any = None,
    target: str = "cpu",
):  # noqa: ANN201 - returns ortq's QuantizationResult (ONNX Runtime returns None)
    """Signature-compatible with ``onnxruntime.quantization.quantize_static`` (QDQ or QOperator format).

    Without a reader and without a ``calibration_cache_path`` that exists, raises ``ValueError`` as ONNX
    Runtime does (unless every tensor's parameters are given in ``TensorQuantOverrides``).
    """
    from ortq.api.compat_calib import load_range_cache, save_range_cache
    from ortq.api.toolkit import Toolkit

    options = static_options(
        quant_format, op_types_to_quantize, per_channel, reduce_range, activation_type, weight_type,
        nodes_to_quantize, nodes_to_exclude, calibrate_method, extra_options, model_input,
    )
    toolkit = toolkit or Toolkit()
    if not options["op_types_to_quantize"] and options["quant_format"] == "qdq":
        # (ONNX Runtime's QOperator format has no integer kernel for these and leaves them float.)
        options["excluded_op_types"] = frozenset(toolkit.backend(target).excluded_op_types) - ORT_QUANTIZES_BY_DEFAULT
        options["default_named_op_types"] = ORT_NAMED_BY_DEFAULT
    kwargs: dict[str, Any] = dict(
        target=target, providers=calibration_providers,
        external_data=True if use_external_data_format else None, **options,
        # ONNX Runtime writes the model it calibrated, however far it drifted (and a reader is read once):
        # the drop-in keeps that, without ortq's SQNR-floor fallback (docs/accuracy.md).
        sqnr_floor=None,
    )
    cache = Path(calibration_cache_path) if calibration_cache_path is not None else None
    if cache is not None and cache.exists():
        state = load_range_cache(cache, model_input, _enum_name(calibrate_method))
        kwargs["calibrate_method"] = "minmax"  # the cache holds final ranges
        (kwargs.get("calibrator_options") or {}).pop("guard", None)  # an entropy/percentile option minmax lacks
        return toolkit.quantize(model_input, model_output, calibration_state=state, **kwargs)
    if calibration_data_reader is None and not options.get("tensor_overrides"):
        raise CalibrationDataError(
            "calibration_data_reader is None" + (f" and the calibration cache {str(cache)!r} does not exist"
                                                 if cache is not None else "")
            + ": static quantization needs calibration data"
        )
    result = toolkit.quantize(model_input, model_output, calibration_data=calibration_data_reader, **kwargs)
    if cache is not None:
        save_range_cache(cache, result.ranges, _enum_name(calibrate_method))
    return result


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

    for key, value in (extra_options or {}).items():
        support = DYNAMIC_EXTRA_OPTIONS.get(key)
        if support is None:
            log.warning("extra_options key %r is not read by quantize_dynamic; ignored (as ONNX Runtime does)", key)
        elif support.status == "refused" and not _value_accepted(value, support.accepted):
            raise _refused(key, value, support)
    toolkit = toolkit or Toolkit()
    return toolkit.quantize_dynamic(
        model_input, model_output, op_types_to_quantize=list(op_types_to_quantize) if op_types_to_quantize else None,
        per_channel=bool(per_channel), reduce_range=bool(reduce_range),
        weight_type=parse_qtype(weight_type, "weight_type"),
        nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize else None,
        nodes_to_exclude=_nodes_to_exclude(nodes_to_exclude, model_input),
        external_data=True if use_external_data_format else None,
    )
