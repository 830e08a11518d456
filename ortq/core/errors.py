"""Errors ortq raises on purpose.

Every error a user can act on derives from :class:`OrtqError`; the CLI prints its message as one line and
exits non-zero, while anything else is a bug and gets a traceback with ``--verbose``.
"""

from __future__ import annotations


class OrtqError(Exception):
    """Base class: a problem with the input, the options or a plugin, explained in the message."""


class ModelError(OrtqError):
    """The model file or proto cannot be read, checked or quantized as given."""


class CalibrationDataError(OrtqError):
    """Calibration data is missing, empty, or does not match the model's inputs."""


class CalibrationError(OrtqError):
    """Running the observed model or reducing its statistics failed."""


class PluginError(OrtqError):
    """A plugin failed to load, register, or run; the message names the plugin."""


class ConfigError(OrtqError):
    """An option or option combination is not supported."""


class VerificationError(OrtqError):
    """The quantized model failed the checker or could not be loaded by ONNX Runtime."""
