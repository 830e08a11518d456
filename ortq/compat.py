"""``ortq.compat``: drop-ins for ``onnxruntime.quantization``, importable under the names ONNX Runtime uses.

``from onnxruntime.quantization import X`` becomes ``from ortq.compat import X``. The modern API
(``quantize_static``, ``quantize_dynamic``, ``quantize`` with ``StaticQuantConfig``/``DynamicQuantConfig``,
``get_qdq_config``, the calibration helpers) and the 2020 one (``quantize(model_proto,
quantization_mode=...)``, ``calibrate(...)``) share the name ``quantize`` as ONNX Runtime's releases did;
:func:`quantize` tells them apart by its arguments. What each option does in ortq is in
``docs/compatibility.md`` (generated from :mod:`ortq.api.compat`'s tables).
"""

from __future__ import annotations

from ortq.api.compat import (
    DYNAMIC_ARGUMENTS, DYNAMIC_EXTRA_OPTIONS, EXTRA_OPTIONS, STATIC_ARGUMENTS, CalibrationDataReader,
    CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static,
)
from ortq.api.compat_calib import create_calibrator, write_calibration_table
from ortq.api.compat_config import DynamicQuantConfig, QuantConfig, StaticQuantConfig, get_qdq_config
from ortq.api.compat_seed import QuantizationMode, calibrate, quantize

__all__ = [
    "QuantFormat", "CalibrationMethod", "CalibrationDataReader", "QuantType", "QuantizationMode",
    "quantize_static", "quantize_dynamic", "quantize", "calibrate", "get_qdq_config", "QuantConfig",
    "StaticQuantConfig", "DynamicQuantConfig", "create_calibrator", "write_calibration_table",
    "STATIC_ARGUMENTS", "DYNAMIC_ARGUMENTS", "EXTRA_OPTIONS", "DYNAMIC_EXTRA_OPTIONS",
]
