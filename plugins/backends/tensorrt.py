"""The ``tensorrt`` target: NVIDIA TensorRT, directly (trtexec, the ONNX parser) or through ONNX Runtime's
TensorRT execution provider.

Two ways to hand TensorRT 8-bit numbers, and this target writes both:

**The QDQ model** (explicit quantization; what ortq writes to the output path). TensorRT's ONNX parser accepts
QuantizeLinear/DequantizeLinear only with int8 data and a zero point of 0 (onnx-tensorrt's operator table), so
the scheme is symmetric int8 for activations and for weights (zero point 0; ortq's symmetric range is
-127..127, inside TensorRT's -128..127 for activations and equal to its -127..127 for weights). Weights are
per output channel: axis 0 of a Conv kernel (TensorRT checks that the scale count equals the kernel's K).
TensorRT takes ConvTranspose weights per *input* channel (axis 0) only, while ortq scales them per output
channel (axis 1), so a ConvTranspose stays float under per-channel weights (``--per-tensor`` quantizes it;
grouped ones are per-tensor anyway). Biases stay float: TensorRT's parser rejects a DequantizeLinear of an
int32 bias ("only activation types allowed as input to this layer", onnx-tensorrt#850, onnxruntime#14229) and
quantizes the bias itself. The op policy follows TensorRT's Q/DQ placement recommendations: quantize the
*inputs* of the weighted ops (Conv, ConvTranspose, MatMul, Gemm) and not their outputs, so TensorRT fuses Conv
+ BatchNorm + ReLU (+ a residual Add) into one kernel and ends it in the next layer's Q (an extra Q/DQ between
a Conv and its ReLU or Add would split that fusion). With symmetric activations ortq does not fold ReLU into
its producer either; TensorRT fuses it itself. Pooling and pure data-movement ops are quantized when their
input already is (TensorRT runs them on int8 and moves Q/DQ across them); Add/Mul, Concat, Resize, Softmax and
normalization layers stay float (a residual Add then reads the other branch's DequantizeLinear, which is the
placement TensorRT recommends). MatMuls of two activations (attention) are quantized too, as NVIDIA's own ONNX
quantizer (ModelOpt) does by default; ``matmul_const_b_only=True`` keeps them float. All of these are
defaults; explicit options override them.

**The calibration tables** (implicit quantization of the *float* model, ``tables=true``): per tensor
the dynamic range amax = max(|lo|, |hi|) of the calibrated range, for every float tensor of the model that a
node reads or writes (graph inputs and outputs included; constants and vetoed tensors left out), as ONNX
Runtime's TensorRT calibration gives it. The QDQ plan quantizes only some of them, so the backend asks the
pipeline to observe the rest too (:meth:`TensorRTBackend.extra_observed_tensors`); the QDQ model is the same
with or without them. Four files, written atomically:

- ``calibration.flatbuffers``: ONNX Runtime's ``CalTableFlatBuffers.TrtTable`` (schema in
  ``onnxruntime/core/providers/tensorrt/ort_trt_int8_cal_table.fbs.h``): table ``TrtTable { dict:
  [KeyValue] }`` (field 0), table ``KeyValue { key: string (key, required); value: string }`` (fields 0
  and 1); key = tensor name, value = amax as Python's ``str(float)``, which ONNX Runtime's writer
  (``quant_utils.write_calibration_table``) produces and its TensorRT EP parses with ``std::stof``
  (``ReadDynamicRange``). The EP option ``trt_int8_calibration_table_name`` names this file. Written with
  the ``flatbuffers`` package's ``Builder`` directly (no flatc-generated code; ``flatbuffers`` comes with
  onnxruntime); entries in ascending key order, as the schema's ``key`` attribute implies (ONNX Runtime's
  Python writer happens to store them descending; its reader iterates, so either order loads).
- ``calibration.json``: ONNX Runtime's JSON (``TensorsData`` through its ``CalibrationCacheEncoder``:
  ``{"CLS": "TensorsData", "data": {tensor: {"lowest": {"data": [v], "dtype": "float32", "CLS":
  "numpy.array"}, "highest": ..., "CLS": "TensorData"}}, "calibration_method": ...}``, loadable by
  ``onnxruntime.quantization.calibrate.load_tensors_data``) holding, per tensor, the range TensorRT
  applies: lowest = -amax, highest = +amax (so even ONNX Runtime's max(highest, lowest) gets amax).
- ``calibration.cache``: ONNX Runtime's plain text, one ``<tensor> <amax>`` line per tensor, sorted.
- ``<model stem>.trt.cache``: TensorRT's own calibration cache, for ``trtexec --calib`` or the EP's
  ``trt_int8_use_native_calibration_table``: a header ``TRT-<version>-<algorithm>``, then one
  ``<tensor>: <scale>`` line per tensor where scale = amax / 127 as the 8 hex digits of its big-endian
  IEEE float32 bits (TensorRT's sample caches; ONNX Runtime's reader multiplies it back by 127).

ONNX Runtime's own writer stores max(hi, lo) instead of max(|hi|, |lo|), so a range like [-60, 10]
becomes 10 and TensorRT clips the whole negative side; this backend writes 60.

Options (``--backend-option key=value``): ``trt_version`` (the header's number, ``NV_TENSORRT_VERSION``:
major*1000 + minor*100 + patch up to TensorRT 8, major*10000 + minor*100 + patch from 10; "8.6.1" or
"8601", "10.3.0" or "100300"; default 8601), ``algorithm`` (the TensorRT calibrator class that will read
the cache: EntropyCalibration2, the default and what trtexec uses, MinMaxCalibration, EntropyCalibration
or LegacyCalibration; TensorRT ignores a cache whose header names another version or calibrator), and
``tables`` (default true; false writes the QDQ model only).

Limits: a tensor whose calibrated range is not finite, or that the QDQ plan vetoed, has no entry, and
TensorRT runs the layers touching it in float. The three ``calibration.*`` names are fixed by ONNX Runtime's convention, so
two models exported to one folder overwrite each other's tables. Tensor names containing a line break
cannot be written to the text caches and are left out of them (with a warning).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ortq.core.backend import Backend
from ortq.core.config import QuantConfig
from ortq.core.errors import ConfigError, ModelError
from ortq.core.hookspecs import hookimpl
from ortq.core.op_quantizer import PlanContext
from ortq.core.scheme import QuantSpec, QuantType
from ortq.io.model_io import write_file_atomic
from ortq.core.options import option_bool

if TYPE_CHECKING:
    from ortq.pipeline.run import QuantizationResult

log = logging.getLogger(__name__)

__all__ = ["TensorRTBackend", "calibration_amax", "trt_table_bytes", "parse_trt_version"]

#: Ops whose inputs TensorRT's explicit quantization wants quantized and whose outputs it fuses on.
WEIGHTED_OP_TYPES = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
#: Ops TensorRT runs on int8 data between quantized layers (ortq quantizes them only behind a quantized input).
INT8_PASS_THROUGH_OP_TYPES = frozenset({
    "MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool",
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Identity", "Pad", "Gather",
})

ALGORITHMS = ("EntropyCalibration2", "MinMaxCalibration", "EntropyCalibration", "LegacyCalibration")

#: ortq calibrator names with an ONNX Runtime ``CalibrationMethod`` member (others are written as plain names).
_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

TABLE_FLATBUFFERS = "calibration.flatbuffers"
TABLE_JSON = "calibration.json"
TABLE_TEXT = "calibration.cache"
NATIVE_CACHE_SUFFIX = ".trt.cache"


def parse_trt_version(value: object) -> str:
    """The header number of TensorRT's calibration cache: "8601" stays, "8.6.1" -> "8601", "10.3.0" -> "100300"."""
    text = str(value).strip()
    if re.fullmatch(r"[0-9]+", text):
        return str(int(text))
    match = re.fullmatch(r"([0-9]+)\.([0-9]+)(?:\.([0-9]+))?(?:\.[0-9]+)?", text)
    if not match:
        raise ConfigError(f"option 'trt_version' must be like 8601, 8.6.1 or 10.3.0, got {value!r}")
    major, minor, patch = int(match[1]), int(match[2]), int(match[3] or 0)
    if minor > 99 or patch > 99 or (major < 10 and minor > 9):
        raise ConfigError(f"option 'trt_version': {value!r} is not a TensorRT version")
    # NV_TENSORRT_VERSION: major*1000 + minor*100 + patch before TensorRT 10, major*10000 + ... from 10 on.
    return str((major * 10000 if major >= 10 else major * 1000) + minor * 100 + patch)


def _parse_algorithm(value: object) -> str:
    for name in ALGORITHMS:
        if str(value).strip().lower() == name.lower():
            return name
    raise ConfigError(f"option 'algorithm' must be one of {', '.join(ALGORITHMS)}, got {value!r}")


class TensorRTBackend(Backend):
    name = "tensorrt"
    description = (
        "NVIDIA TensorRT: explicit-quantization QDQ model (s8 symmetric activations, s8 per-channel weights, "
        "float biases) plus ONNX Runtime and TensorRT calibration tables"
    )
    default_op_types = WEIGHTED_OP_TYPES | INT8_PASS_THROUGH_OP_TYPES

    def __init__(self, trt_version: object = "8601", algorithm: object = "EntropyCalibration2",
                 tables: object = True) -> None:
        self.trt_version = parse_trt_version(trt_version)
        self.algorithm = _parse_algorithm(algorithm)
        self.tables = option_bool("tables", tables)

    @property
    def header(self) -> str:
        """The first line of TensorRT's calibration cache."""
        return f"TRT-{self.trt_version}-{self.algorithm}"

    def default_config(self) -> QuantConfig:
        return QuantConfig(
            activation=QuantSpec(QuantType.INT8, symmetric=True),
            weight=QuantSpec(QuantType.INT8, symmetric=True),
            per_channel=True,
            quantize_bias=False,
            matmul_const_b_only=False,
            op_types=self.default_op_types,
            op_types_no_output_quantization=WEIGHTED_OP_TYPES,
            calibrator="minmax",
        )

    def check_config(self, config: QuantConfig) -> None:
        if config.quant_format != "qdq":
            raise ConfigError(
                f"the tensorrt target needs the QDQ format (TensorRT's explicit quantization reads Q/DQ), "
                f"not {config.quant_format}"
            )

    def leave_float(self, node: onnx.NodeProto, ctx: PlanContext) -> str | None:
        if node.op_type == "ConvTranspose" and ctx.config.per_channel and int(ctx.attribute(node, "group", 1)) == 1:
            # ortq scales ConvTranspose weights per output channel (axis 1); TensorRT's deconvolution kernels
            # take per-input-channel scales (axis 0) only (NVIDIA, TensorRT issue #2380).
            return (
                "TensorRT takes ConvTranspose weights per input channel (axis 0) only, and ortq scales them per "
                "output channel (axis 1); quantize with --per-tensor to run it in int8"
            )
        return None

    def extra_observed_tensors(self, model: onnx.ModelProto) -> list[str]:
        """Every tensor a node reads or writes (graph inputs and outputs included), in graph order: TensorRT's
        implicit INT8 mode needs a dynamic range for each tensor it runs in INT8, and ONNX Runtime's TensorRT
        calibration observes all of them. The pipeline keeps the float, non-constant ones."""
        if not self.tables:
            return []
        names: list[str] = [vi.name for vi in model.graph.input]
        for node in model.graph.node:
            names.extend(node.input)
            names.extend(node.output)
        names.extend(vi.name for vi in model.graph.output)
        return list(dict.fromkeys(n for n in names if n))

    def export(self, result: QuantizationResult, out_dir: Path) -> list[Path]:
        check_explicit_quantization(result.model, str(result.output) if result.output is not None else "model")
        if not self.tables:
            return []
        amax = calibration_amax(result)
        out_dir = Path(out_dir)
        stem = Path(result.output).stem if result.output is not None else "model"
        text_names = [t for t in sorted(amax) if "\n" not in t and "\r" not in t]
        for t in sorted(set(amax) - set(text_names)):
            log.warning("tensor %r has a line break in its name; it is left out of the text calibration caches", t)
        written = [
            write_file_atomic(out_dir / TABLE_FLATBUFFERS, trt_table_bytes({t: _float_text(a) for t, a in amax.items()})),
            write_file_atomic(out_dir / TABLE_JSON, _ort_json(amax, result.config.calibrator).encode()),
            write_file_atomic(out_dir / TABLE_TEXT, "".join(f"{t} {_float_text(amax[t])}\n" for t in text_names).encode()),
            write_file_atomic(out_dir / f"{stem}{NATIVE_CACHE_SUFFIX}", self.native_cache(amax, text_names).encode()),
        ]
        return written

    def native_cache(self, amax: dict[str, float], names: list[str] | None = None) -> str:
        """TensorRT's calibration cache text for these dynamic ranges."""
        lines = [self.header]
        for t in names if names is not None else sorted(amax):
            scale = np.float32(amax[t]) / np.float32(127.0)
            lines.append(f"{t}: {struct.pack('>f', scale).hex()}")
        return "\n".join(lines) + "\n"


def calibration_amax(result: QuantizationResult) -> dict[str, float]:
    """amax = max(|lo|, |hi|) per calibrated tensor, as float32 (never one side of the range only).

    Vetoed tensors (ranges beyond ``extreme_range``, masks filled with -1e9) are left out: TensorRT then keeps
    the layers touching them in float instead of crushing them into 8 bits. A range of zero width (a tensor
    that was always 0) gets amax 127, the unit scale ortq's scheme gives it, since TensorRT cannot divide by 0.
    """
    amax: dict[str, float] = {}
    for name, (lo, hi) in result.ranges.items():
        if name in result.vetoes:
            continue
        value = max(abs(float(lo)), abs(float(hi)))
        if not np.isfinite(value) or value > np.finfo(np.float32).max:
            log.warning("tensor %r has no finite range; it is left out of the calibration tables", name)
            continue
        # As ortq's scheme does: a zero-width range gets scale 1, others a scale of at least float32's tiniest normal.
        amax[name] = float(np.float32(max(value, 127.0 * float(np.finfo(np.float32).tiny)))) if value > 0 else 127.0
    return amax


def _float_text(value: float) -> str:
    """A float32 value as ONNX Runtime writes it: Python's shortest repr of the value widened to double."""
    return str(float(np.float32(value)))


def trt_table_bytes(entries: dict[str, str]) -> bytes:
    """Serialize ``CalTableFlatBuffers.TrtTable`` with ``flatbuffers.Builder`` (no generated code).

    Schema (ONNX Runtime, ``ort_trt_int8_cal_table.fbs.h``)::

        namespace CalTableFlatBuffers;
        table KeyValue { key: string (key, required); value: string; }   // vtable slots 0 and 1
        table TrtTable { dict: [KeyValue]; }                            // vtable slot 0
        root_type TrtTable;                                             // no file identifier
    """
    import flatbuffers  # a dependency of onnxruntime; imported here so loading the plugin stays cheap

    builder = flatbuffers.Builder(1024)
    items = sorted(entries.items())
    offsets = []
    for key, value in items:
        key_off = builder.CreateString(key)
        value_off = builder.CreateString(value)
        builder.StartObject(2)
        builder.PrependUOffsetTRelativeSlot(0, key_off, 0)
        builder.PrependUOffsetTRelativeSlot(1, value_off, 0)
        offsets.append(builder.EndObject())
    builder.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):  # vectors are built back to front: the first entry is prepended last
        builder.PrependUOffsetTRelative(off)
    try:
        vector = builder.EndVector()
    except TypeError:  # flatbuffers < 2.0 wants the element count
        vector = builder.EndVector(len(offsets))
    builder.StartObject(1)
    builder.PrependUOffsetTRelativeSlot(0, vector, 0)
    table = builder.EndObject()
    builder.Finish(table)
    return bytes(builder.Output())


def _ort_json(amax: dict[str, float], calibrator: str) -> str:
    """ONNX Runtime's ``calibration.json`` layout (``TensorsData.to_dict`` through ``CalibrationCacheEncoder``)."""

    def array(value: float) -> dict:  # ONNX Runtime 1.32 stores each bound as a 1-element float32 array
        return {"data": [value], "dtype": "float32", "CLS": "numpy.array"}

    method = _ORT_METHODS.get(calibrator)
    payload = {
        "CLS": "TensorsData",
        "data": {
            t: {"lowest": array(-amax[t]), "highest": array(amax[t]), "CLS": "TensorData"} for t in sorted(amax)
        },
        "calibration_method": (
            {"CLS": "CalibrationMethod", "value": f"CalibrationMethod.{method}"} if method else calibrator
        ),
    }
    return json.dumps(payload)




def check_explicit_quantization(model: onnx.ModelProto, label: str = "model") -> None:
    """Raise :class:`ortq.ModelError` naming the first nodes TensorRT's ONNX parser would reject.

    TensorRT accepts QuantizeLinear/DequantizeLinear with int8 data and zero points of 0 only, and a
    per-channel Conv or ConvTranspose weight must be scaled along axis 0 (a Conv's output channels, a
    ConvTranspose's input channels). The checks apply to what
    the options produced: the tensorrt defaults always pass; ``--activation-type uint8``, asymmetric
    schemes or ``quantize_bias=True`` do not.
    """
    constants: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def dtype(name: str) -> int | None:
        return constants[name].data_type if name in constants else None

    problems: list[str] = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        where = f"{node.op_type} {node.name!r}"
        data_type = dtype(node.input[0])
        if node.op_type == "DequantizeLinear" and data_type not in (None, onnx.TensorProto.INT8):
            kind = onnx.TensorProto.DataType.Name(data_type).lower()
            problems.append(f"{where} dequantizes an {kind} constant (a quantized bias?); TensorRT takes int8 only")
            continue
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if zero_point is None:
            problems.append(f"{where} has no zero point (it then means uint8)")
            continue
        if dtype(zero_point) != onnx.TensorProto.INT8:
            kind = onnx.TensorProto.DataType.Name(dtype(zero_point)).lower() if dtype(zero_point) else "a computed type"
            problems.append(f"{where} is {kind}, TensorRT takes int8 only")
            continue
        if np.any(numpy_helper.to_array(constants[zero_point]) != 0):
            problems.append(f"{where} has a non-zero zero point (TensorRT is symmetric only)")
            continue
        if node.op_type != "DequantizeLinear" or data_type is None:
            continue
        scale = numpy_helper.to_array(constants[node.input[1]]) if node.input[1] in constants else None
        if scale is None or scale.ndim != 1:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        for consumer in consumers.get(node.output[0], []):
            is_weight = len(consumer.input) > 1 and consumer.input[1] == node.output[0]
            if consumer.op_type in ("Conv", "ConvTranspose") and is_weight:
                rank = len(constants[node.input[0]].dims)
                if axis % max(rank, 1) != 0:
                    problems.append(
                        f"{where} scales {consumer.op_type} {consumer.name!r}'s weight along axis {axis}, not 0"
                    )
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ModelError(
            f"{label}: TensorRT's ONNX parser would reject this model (it takes int8 Q/DQ with zero point 0 and "
            f"Conv weights per output channel; the options given override the tensorrt defaults): "
            f"{'; '.join(problems[:5])}{more}"
        )


@hookimpl
def ortq_register_backends(register: Callable) -> None:
    register(TensorRTBackend)
