"""ortq: post-training quantization of ONNX models, extensible through pluggy plugins.

Quick use::

    import ortq
    result = ortq.quantize("model.onnx", "model.int8.onnx", calibration_data="calib.npz")

Embedding (an SDK with its own plugins, no entry-point autoload, no global state)::

    toolkit = ortq.Toolkit(plugins=[my_plugin], autoload=False)
    result = toolkit.quantize(model, "out.onnx", calibration_data=reader, target="cpu")
"""

from __future__ import annotations

from typing import Any

from ortq.tools.accuracy_driven import AccuracyDrivenResult, AccuracyTarget
from ortq.core.backend import Backend
from ortq.core.calibrator import Calibrator, MinMaxStatistic, Statistic
from ortq.core.config import QuantConfig
from ortq.core.errors import (
    CalibrationDataError,
    CalibrationError,
    ConfigError,
    ModelError,
    OrtqError,
    PluginError,
    VerificationError,
)
from ortq.core.hookspecs import hookimpl
from ortq.core.op_quantizer import (
    Activation, Bias, LeaveFloat, NodePlan, OpQuantizer, PlanContext, QOperatorContext, QuantizedTensor, SameAs, Weight,
)
from ortq.core.scheme import QuantParams, QuantSpec, QuantType
from ortq.io.images import ImageOptions
from ortq.core.metric import Metric
from ortq.io.state import CalibrationState
from ortq.api.toolkit import Toolkit

from .core.version import __version__  # noqa: E402,F401 - one version string

__all__ = [
    "__version__",
    "Toolkit",
    "quantize",
    "quantize_static",
    "quantize_dynamic",
    "quantize_qat",
    "QuantFormat",
    "CalibrationMethod",
    "CalibrationDataReader",
    "hookimpl",
    "OpQuantizer",
    "PlanContext",
    "NodePlan",
    "LeaveFloat",
    "Activation",
    "Weight",
    "Bias",
    "SameAs",
    "QOperatorContext",
    "QuantizedTensor",
    "Calibrator",
    "Statistic",
    "MinMaxStatistic",
    "Backend",
    "Metric",
    "evaluate",
    "EvaluationReport",
    "MetricResult",
    "CalibrationState",
    "ImageOptions",
    "QuantConfig",
    "QuantType",
    "QuantSpec",
    "QuantParams",
    "OrtqError",
    "ModelError",
    "CalibrationDataError",
    "CalibrationError",
    "ConfigError",
    "PluginError",
    "VerificationError",
    "preprocess",
    "PreprocessResult",
    "debug_models",
    "DebugReport",
    "quantize_to_target",
    "AccuracyTarget",
    "AccuracyDrivenResult",
]


def quantize(model: Any, output: Any = None, **options: Any):  # noqa: ANN201 - QuantizationResult
    """Quantize with a fresh :class:`Toolkit` (built-ins plus installed plugins); see ``Toolkit.quantize``."""
    return Toolkit().quantize(model, output, **options)


def quantize_to_target(model: Any, output: Any = None, **options: Any) -> AccuracyDrivenResult:
    """Accuracy-driven quantization with a fresh :class:`Toolkit`; see ``ortq.accuracy_driven``."""
    return Toolkit().quantize_to_target(model, output, **options)


def quantize_qat(model: Any, output: Any = None, **options: Any):  # noqa: ANN201 - QatResult
    """Check and complete an already quantized (QAT) model with a fresh :class:`Toolkit`; see ``ortq.qat``."""
    return Toolkit().quantize_qat(model, output, **options)


from ortq.api.compat import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_dynamic, quantize_static  # noqa: E402
# Bound after the submodule import so ``ortq.evaluate`` is the function (the module stays importable by name).
from ortq.tools.evaluate import EvaluationReport, MetricResult, evaluate  # noqa: E402
# Likewise ``ortq.preprocess`` is the function; ``from ortq.tools.preprocess import ...`` still reaches the module.
from ortq.tools.preprocess import PreprocessResult, preprocess  # noqa: E402
from ortq.tools.debug import DebugReport, debug_models  # noqa: E402
