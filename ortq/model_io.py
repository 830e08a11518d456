"""Reading, checking and writing models without ever touching the caller's copy or leaving half a file."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelError

__all__ = ["load_model", "save_model_atomic", "upgrade_opset", "check_output_path", "model_opset"]

log = logging.getLogger(__name__)

#: Below this the default-domain QuantizeLinear/DequantizeLinear do not exist at all.
MIN_QDQ_OPSET = 10
_PROTOBUF_LIMIT = 2**31 - 1


def load_model(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    """Load and check a model, returning a private copy and the file it came from (if any).

    The copy is what the pipeline edits, so the caller's proto and file are never modified.
    """
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        source = None
        label = "<ModelProto>"
    else:
        source = Path(model)
        label = str(source)
        if not source.is_file():
            raise ModelError(f"{label}: no such model file")
        if source.stat().st_size == 0:
            raise ModelError(f"{label}: the file is empty, not an ONNX model")
        try:
            copy = onnx.load(str(source), load_external_data=True)
        except DecodeError as exc:
            raise ModelError(f"{label}: not an ONNX model (protobuf parse failed: {exc})") from None
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelError(f"{label}: cannot be read: {exc}") from None
    if not copy.HasField("graph") or copy.ir_version == 0:
        raise ModelError(f"{label}: not an ONNX model (no graph or IR version)")
    _check(copy, label)
    return copy, source


def _check(model: onnx.ModelProto, label: str) -> None:
    try:
        if model.ByteSize() > _PROTOBUF_LIMIT:
            log.info("%s is over 2 GB; skipping the in-memory checker", label)
            return
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{label}: fails onnx.checker: {first}") from None


def model_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("model imports no default-domain opset")


def upgrade_opset(model: onnx.ModelProto, target: int, label: str = "model") -> onnx.ModelProto:
    """Convert the model to ``target`` if it is older; quantization operators need at least opset 10."""
    current = model_opset(model)
    if current >= target:
        return model
    log.warning("%s uses opset %d; converting it to opset %d for quantization", label, current, target)
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors with C++ messages
        raise ModelError(f"{label}: cannot convert from opset {current} to {target}: {exc}") from None
    return converted


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail before any work is done if the output cannot be written."""
    out = Path(path)
    if out.is_dir():
        raise ModelError(f"{out}: output path is a directory; give a file name")
    if not out.parent.exists():
        raise ModelError(f"{out}: output folder {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ModelError(f"{out}: output folder is not writable")
    return out


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write to a temporary file beside ``path`` and rename it into place, so readers never see half a model.

    An existing file at ``path`` is replaced only when the write succeeded.
    """
    out = check_output_path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp_name)
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out
