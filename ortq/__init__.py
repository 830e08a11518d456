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

from .accuracy_driven import AccuracyDrivenResult, AccuracyTarget
from .backend import Backend
from .calibrator import Calibrator, MinMaxStatistic, Statistic
from .config import QuantConfig
from .errors import (
    CalibrationDataError,
    CalibrationError,
    ConfigError,
    ModelError,
    OrtqError,
    PluginError,
    VerificationError,
)
from .hookspecs import hookimpl
from .op_quantizer import (
    Activation, Bias, LeaveFloat, NodePlan, OpQuantizer, PlanContext, QOperatorContext, QuantizedTensor, SameAs, Weight,
)
from .scheme import QuantParams, QuantSpec, QuantType
from .images import ImageOptions
from .metric import Metric
from .state import CalibrationState
from .toolkit import Toolkit

__version__ = "0.1.0"

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


from .compat import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_dynamic, quantize_static  # noqa: E402
# Bound after the submodule import so ``ortq.evaluate`` is the function (the module stays importable by name).
from .evaluate import EvaluationReport, MetricResult, evaluate  # noqa: E402
# Likewise ``ortq.preprocess`` is the function; ``from ortq.preprocess import ...`` still reaches the module.
from .preprocess import PreprocessResult, preprocess  # noqa: E402
from .debug import DebugReport, debug_models  # noqa: E402
