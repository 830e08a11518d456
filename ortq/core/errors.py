"""Errors ortq raises on purpose.

Every error a user can act on derives from :class:`OrtqError`; the CLI prints its message as one line and
exits non-zero, while anything else is a bug and gets a traceback with ``--verbose``.

Each error is also the built-in exception ONNX Runtime's quantizer raises for the same problem (multiple
inheritance), so code written for ``onnxruntime.quantization`` (``except ValueError``,
``except FileNotFoundError``) keeps catching it after the one-line import change: bad options, models and
calibration data are :class:`ValueError`, a missing model file is also a :class:`FileNotFoundError`, and
failures while running a model or a plugin are :class:`RuntimeError`.
"""

from __future__ import annotations

__all__ = [
    "OrtqError", "ModelError", "ModelNotFoundError", "CalibrationDataError", "CalibrationError", "PluginError",
    "ConfigError", "VerificationError",
]


class OrtqError(Exception):
    """Base class: a problem with the input, the options or a plugin, explained in the message."""


class ModelError(OrtqError, ValueError):
    """The model file or proto cannot be read, checked or quantized as given."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model file does not exist (ONNX Runtime's quantizer raises ``FileNotFoundError`` here)."""


class CalibrationDataError(OrtqError, ValueError):
    """Calibration data is missing, empty, or does not match the model's inputs."""


class CalibrationError(OrtqError, RuntimeError):
    """Running the observed model or reducing its statistics failed."""


class PluginError(OrtqError, RuntimeError):
    """A plugin failed to load, register, or run; the message names the plugin."""


class ConfigError(OrtqError, ValueError):
    """An option or option combination is not supported."""


class VerificationError(OrtqError, RuntimeError):
    """The quantized model failed the checker or could not be loaded by ONNX Runtime."""
