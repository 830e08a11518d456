"""External-data references of an untrusted model, validated before a byte of them is read.

A model file is data from someone else: each externally stored tensor names a ``location`` (a file),
``offset`` and ``length``. Only regular files inside the model's folder are accepted: no absolute paths,
no ``..`` components, no symlinks leaving the folder, ranges inside the file, and declared sizes that the
files can actually back (so a crafted model cannot make ortq allocate memory it does not hold). The
onnx package has had path-traversal advisories on exactly this, so the check does not rely on it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import onnx
from onnx import TensorProto

from ortq.core.errors import ModelError

__all__ = ["validate_external_data", "uses_external", "external_tensors", "declared_bytes", "location", "BITS",
           "MAX_EXTERNAL_BYTES"]

#: Optional cap on the total external data a model may declare (bytes); None: bounded by the files' sizes.
MAX_EXTERNAL_BYTES: int | None = None

# bits per element of every numeric tensor type (strings cannot be stored externally by ortq's rules)
BITS = {
    TensorProto.FLOAT: 32, TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.UINT16: 16,
    TensorProto.INT16: 16, TensorProto.INT32: 32, TensorProto.INT64: 64, TensorProto.BOOL: 8,
    TensorProto.FLOAT16: 16, TensorProto.DOUBLE: 64, TensorProto.UINT32: 32, TensorProto.UINT64: 64,
    TensorProto.COMPLEX64: 64, TensorProto.COMPLEX128: 128, TensorProto.BFLOAT16: 16,
}
for _name, _bits in (
    ("FLOAT8E4M3FN", 8), ("FLOAT8E4M3FNUZ", 8), ("FLOAT8E5M2", 8), ("FLOAT8E5M2FNUZ", 8), ("FLOAT8E8M0", 8),
    ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2),
):
    if hasattr(TensorProto, _name):
        BITS[getattr(TensorProto, _name)] = _bits


def _all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto that may carry weights: initializers and tensor attributes, subgraphs included."""
    from onnx.external_data_helper import _get_all_tensors

    yield from _get_all_tensors(model)


def uses_external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def external_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    return (t for t in _all_tensors(model) if uses_external(t))


def location(tensor: TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def declared_bytes(tensor: TensorProto) -> int | None:
    bits = BITS.get(tensor.data_type)
    if bits is None:
        return None
    count = 1
    for d in tensor.dims:
        count *= d
    return (count * bits + 7) // 8


def validate_external_data(model: onnx.ModelProto, model_path: str | os.PathLike) -> list[Path]:
    """Refuse external data references that leave the model's folder or promise more than the files hold.

    Returns the external data files referenced (resolved). Nothing is read from them.
    """
    model_path = Path(model_path)
    label = str(model_path)
    base = Path(os.path.realpath(model_path.parent))
    files: dict[Path, int] = {}
    total = 0
    for tensor in external_tensors(model):
        entries = {e.key: e.value for e in tensor.external_data}
        loc = entries.get("location", "")

        def refuse(why: str) -> ModelError:
            return ModelError(f"{label}: tensor {tensor.name!r}: external data location {loc!r} {why}; refused")

        if not loc:
            raise refuse("is empty")
        if "\0" in loc:
            raise refuse("contains a NUL byte")
        if os.path.isabs(loc) or loc.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", loc):
            raise refuse("is an absolute path (it must be relative to the model's folder)")
        if ".." in re.split(r"[\\/]+", loc):
            raise refuse("has a '..' component (it must stay inside the model's folder)")
        full = base / loc
        resolved = Path(os.path.realpath(full))
        if resolved != base and base not in resolved.parents:
            raise refuse(f"resolves to {str(resolved)!r} through a symlink, outside the model's folder {str(base)!r}")
        if not resolved.is_file():
            raise refuse("is not an existing regular file in the model's folder")
        size = files.setdefault(resolved, resolved.stat().st_size)
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError:
            raise refuse(f"has a non-integer offset or length ({entries.get('offset')!r}, {entries.get('length')!r})")
        if offset < 0 or (length is not None and length < 0):
            raise refuse(f"has a negative offset or length ({offset}, {length})")
        if offset > size or (length is not None and offset + length > size):
            raise refuse(f"points outside the file: offset {offset} + length {length} > file size {size}")
        if any(d < 0 for d in tensor.dims):
            raise refuse(f"belongs to a tensor with negative dims {list(tensor.dims)}")
        declared = declared_bytes(tensor)
        if declared is None:
            raise refuse(f"belongs to a tensor of type {tensor.data_type} that cannot be stored externally")
        available = length if length is not None else size - offset
        if declared > available:
            raise refuse(
                f"backs a tensor of shape {list(tensor.dims)} ({declared} bytes) with only {available} byte(s)"
            )
        if length is not None and length != declared:
            raise refuse(f"has length {length}, but the tensor's shape {list(tensor.dims)} needs {declared} bytes")
        total += declared
    if files:
        limit = sum(files.values()) if MAX_EXTERNAL_BYTES is None else min(MAX_EXTERNAL_BYTES, sum(files.values()))
        if total > limit:
            raise ModelError(
                f"{label}: its external tensors declare {total} bytes in all, more than the {limit} bytes its data "
                "files hold (overlapping or oversized tensors); refused before loading"
            )
    return sorted(files)


# ---------------------------------------------------------------------------------------------------------
# size-dependent checker, shape inference and sessions
