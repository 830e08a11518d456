"""Reading, checking and writing models without ever touching the caller's copy or leaving half a file.

A model file is data from someone else: its external-data references are validated
(:mod:`ortq.external_data`) before a byte of external data is read.

Models over ONNX's 2 GB protobuf limit (:data:`PROTOBUF_LIMIT`) cannot be serialized in one piece: they
are checked, shape-inferred and handed to ONNX Runtime through a file with external data in a temporary
folder, and saved as a model file plus one ``<output name>.data`` file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from ortq.core.errors import ModelError, ModelNotFoundError
from ortq.io.external_data import BITS, declared_bytes, external_tensors, location, uses_external, validate_external_data
from ortq.io.paths import same_file

__all__ = [
    "load_model", "read_model", "LoadedModel", "save_model_atomic", "staged_save", "upgrade_opset",
    "check_output_path", "model_opset", "check_model", "infer_shapes", "session_source", "over_protobuf_limit",
    "write_with_external_data", "write_file_atomic", "model_size", "PROTOBUF_LIMIT",
]

log = logging.getLogger(__name__)

#: Below this the default-domain QuantizeLinear/DequantizeLinear do not exist at all.
MIN_QDQ_OPSET = 10
#: A serialized ModelProto cannot be larger than this. Models above it are checked, shape-inferred, run and
#: saved through files with external data. Tests lower it to exercise those paths with small models.
PROTOBUF_LIMIT = 2**31 - 1
#: Tensors at least this large go to the data file when a model is written with external data.
EXTERNAL_MIN_BYTES = 1024
#: Offsets in written data files are multiples of this (lets ONNX Runtime map the weights).
_ALIGN = 4096
#: Initializers this large are left out of the copy that in-memory shape inference works on.
SHAPE_INFERENCE_STRIP_BYTES = 64 * 1024
_STRIPPED = "ortq-stripped-for-shape-inference"
#: Sessions for models larger than this are created from a temporary file rather than from bytes.
SESSION_FILE_BYTES = 32 * 2**20  # measured: from bytes a session peaks at about 4x the weights
#: Where temporary model folders (sessions, checker, shape inference of large models) go; None: the system's.
TEMP_DIR: str | None = None

@dataclass
class LoadedModel:
    """A private, checked copy of a model and where it came from."""

    model: onnx.ModelProto
    source: Path | None
    #: The input stored (some of) its tensors as external data.
    external_data: bool = False
    #: The external data files the input referenced (resolved paths).
    external_files: list[Path] = field(default_factory=list)


def load_model(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    """Load and check a model, returning a private copy and the file it came from (if any).

    The copy is what the pipeline edits, so the caller's proto and file are never modified.
    """
    loaded = read_model(model)
    return loaded.model, loaded.source


def read_model(model: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    """:func:`load_model` with what the pipeline needs to know about external data."""
    if isinstance(model, onnx.ModelProto):
        label = "<ModelProto>"
        for tensor in external_tensors(model):
            raise ModelError(
                f"{label}: tensor {tensor.name!r} keeps its data in external file {location(tensor)!r}; pass the "
                "model's path instead, or load it with its external data"
            )
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        _check_header(copy, label)
        check_model_by_size(copy, label)
        return LoadedModel(copy, None)
    source = Path(model)
    label = str(source)
    if not source.is_file():
        raise ModelNotFoundError(f"{label}: no such model file")
    if source.stat().st_size == 0:
        raise ModelError(f"{label}: the file is empty, not an ONNX model")
    try:
        copy = onnx.load(str(source), load_external_data=False)
    except DecodeError as exc:
        raise ModelError(f"{label}: not an ONNX model (protobuf parse failed: {exc})") from None
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"{label}: cannot be read: {exc}") from None
    _check_header(copy, label)
    files = validate_external_data(copy, source)
    if files:
        # The model file itself is small: check it by path, before its external data is in memory.
        _run_checker(lambda: onnx.checker.check_model(str(source)), label)
        try:
            onnx.load_external_data_for_model(copy, str(source.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelError(f"{label}: cannot read its external data: {exc}") from None
    else:
        check_model_by_size(copy, label)
    return LoadedModel(copy, source, bool(files), files)


def _check_header(model: onnx.ModelProto, label: str) -> None:
    if not model.HasField("graph") or model.ir_version == 0:
        raise ModelError(f"{label}: not an ONNX model (no graph or IR version)")


# ---------------------------------------------------------------------------------------------------------
# untrusted external data


def model_size(model: onnx.ModelProto) -> int:
    """About the serialized size of ``model``, without serializing its weights.

    (``ModelProto.ByteSize()`` under the upb protobuf runtime serializes the whole model to measure it,
    costing twice the weights' memory for a moment.)
    """
    skeleton, stripped = _skeleton(model, SHAPE_INFERENCE_STRIP_BYTES)
    return skeleton.ByteSize() + stripped


def over_protobuf_limit(model: onnx.ModelProto) -> bool:
    return model_size(model) > PROTOBUF_LIMIT


def _run_checker(check, label: str) -> None:  # noqa: ANN001
    try:
        check()
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{label}: fails onnx.checker: {first}") from None


def check_model(model: onnx.ModelProto, full_check: bool = False) -> None:
    """``onnx.checker.check_model`` in memory, or through a file with external data above the protobuf limit.

    Raises ``onnx.checker.ValidationError`` like the checker itself.
    """
    if not over_protobuf_limit(model):
        onnx.checker.check_model(model, full_check=full_check)
        return
    with _temporary_copy(model) as path:
        onnx.checker.check_model(str(path), full_check=full_check)


def check_model_by_size(model: onnx.ModelProto, label: str) -> None:
    _run_checker(lambda: check_model(model), label)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference, in memory or (above the protobuf limit) with ``infer_shapes_path`` on a temporary file.

    Either way it runs on a copy without the large weights (initializers of ``SHAPE_INFERENCE_STRIP_BYTES`` or
    more, which shape inference does not need: they are weights, not shapes) and only the inferred
    value_info (subgraphs included) and graph outputs are copied back: returns ``model``, updated in place.
    """
    if not over_protobuf_limit(model):
        # On a copy without the large weights: infer_shapes(model) would serialize and parse them 3 times.
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model, SHAPE_INFERENCE_STRIP_BYTES)[0])
    else:
        with _temporary_copy(model) as path:
            inferred_path = path.with_name("inferred.onnx")
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred_path))
            inferred = onnx.load(str(inferred_path), load_external_data=False)
    _copy_value_info(model.graph, inferred.graph)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model


def _copy_value_info(graph: onnx.GraphProto, inferred: onnx.GraphProto) -> None:
    """Copy inferred value_info into ``graph`` and its subgraphs (never tensors: the inferred model's
    weights point into a temporary file)."""
    del graph.value_info[:]
    graph.value_info.extend(inferred.value_info)
    for node, new_node in zip(graph.node, inferred.node):
        for attr, new_attr in zip(node.attribute, new_node.attribute):
            if attr.type == onnx.AttributeProto.GRAPH:
                _copy_value_info(attr.g, new_attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub, new_sub in zip(attr.graphs, new_attr.graphs):
                    _copy_value_info(sub, new_sub)


@contextlib.contextmanager
def _temporary_folder() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="ortq-", dir=TEMP_DIR))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _temporary_copy(model: onnx.ModelProto) -> Iterator[Path]:
    """``model`` written with external data to a temporary folder, removed on exit (whatever happens)."""
    with _temporary_folder() as folder:
        path = folder / "model.onnx"
        data = folder / "model.onnx.data"
        write_with_external_data(model, path, data, data.name)
        yield path


@contextlib.contextmanager
def session_source(model: onnx.ModelProto) -> Iterator[bytes | str]:
    """What to give ``onnxruntime.InferenceSession`` for ``model``: its bytes, or above the protobuf limit the
    path of a temporary copy with external data (valid inside the ``with``; create the session there).

    Models over ``SESSION_FILE_BYTES`` go through a file too: from bytes, ONNX Runtime holds the serialized
    copy and its own parse of it besides ours (about 4x the weights at peak, against 2x from a file).
    """
    if model_size(model) <= min(PROTOBUF_LIMIT, SESSION_FILE_BYTES):
        yield model.SerializeToString()
        return
    with _temporary_copy(model) as path:
        yield str(path)


# ---------------------------------------------------------------------------------------------------------
# writing


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[: 1 << 30], offset)
        view, offset = view[n:], offset + n


def _copy_fields(dst, src, *skip: str) -> None:  # noqa: ANN001
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


_HOLDS_TENSORS = frozenset({
    onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS, onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS,
})


class _Externalizer:
    """Copies tensors into a skeleton, turning those of ``min_bytes`` or more into external references: into
    the file open as ``data_fd`` (their bytes written there one tensor at a time, at aligned offsets), or to a
    placeholder location when ``data_fd`` is None (for shape inference and size estimates)."""

    def __init__(self, min_bytes: int, data_fd: int | None, location: str) -> None:
        self.min_bytes, self.data_fd, self.location = min_bytes, data_fd, location
        self.offset = 0
        self.stripped = 0

    def tensor(self, dst: TensorProto, tensor: TensorProto) -> None:
        from onnx import numpy_helper

        inline = (
            _data_bytes(tensor) < self.min_bytes
            or tensor.data_type == TensorProto.STRING
            or uses_external(tensor)
            or (not tensor.HasField("raw_data") and BITS.get(tensor.data_type, 8) < 8)
        )
        if inline:
            dst.CopyFrom(tensor)
            return
        dst.name, dst.data_type = tensor.name, tensor.data_type
        dst.dims.extend(tensor.dims)
        if tensor.doc_string:
            dst.doc_string = tensor.doc_string
        dst.data_location = TensorProto.EXTERNAL
        entries = [("location", self.location)]
        self.stripped += _data_bytes(tensor)
        if self.data_fd is not None:
            raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            self.offset = -(-self.offset // _ALIGN) * _ALIGN
            _write_all(self.data_fd, raw, self.offset)
            entries += [("offset", str(self.offset)), ("length", str(len(raw)))]
            self.offset += len(raw)
            del raw
        for key, value in entries:
            entry = dst.external_data.add()
            entry.key, entry.value = key, value

    def graph(self, dst: onnx.GraphProto, graph: onnx.GraphProto) -> None:
        _copy_fields(dst, graph, "initializer", "node")
        for tensor in graph.initializer:
            self.tensor(dst.initializer.add(), tensor)
        self.nodes(dst.node, graph.node)

    def nodes(self, dst, nodes) -> None:  # noqa: ANN001 - repeated NodeProto fields
        """Constant values and other tensor attributes, and subgraphs (If/Loop/Scan bodies), are tensors too."""
        for node in nodes:
            new = dst.add()
            if not any(a.type in _HOLDS_TENSORS for a in node.attribute):
                new.CopyFrom(node)
                continue
            _copy_fields(new, node, "attribute")
            for attr in node.attribute:
                copy = new.attribute.add()
                if attr.type == onnx.AttributeProto.TENSOR:
                    _copy_fields(copy, attr, "t")
                    self.tensor(copy.t, attr.t)
                elif attr.type == onnx.AttributeProto.TENSORS:
                    _copy_fields(copy, attr, "tensors")
                    for tensor in attr.tensors:
                        self.tensor(copy.tensors.add(), tensor)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    _copy_fields(copy, attr, "g")
                    self.graph(copy.g, attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    _copy_fields(copy, attr, "graphs")
                    for sub in attr.graphs:
                        self.graph(copy.graphs.add(), sub)
                else:
                    copy.CopyFrom(attr)


def _skeleton(
    model: onnx.ModelProto, min_bytes: int, data_fd: int | None = None, location: str = _STRIPPED
) -> tuple[onnx.ModelProto, int]:
    """A new ModelProto sharing nothing with ``model`` in which every tensor of ``min_bytes`` or more is an
    external reference (see :class:`_Externalizer`): initializers, and, as onnx's
    ``convert_model_to_external_data(..., convert_attribute=True)`` does, tensors in node attributes
    (``Constant`` values), subgraphs and functions, so that large constants wherever they are can neither
    push the model file over the protobuf limit nor be parsed again by shape inference.

    ``model`` is not modified: with the upb protobuf runtime, clearing and restoring a tensor's bytes would
    leave the old bytes allocated in the message's arena, doubling the weights' memory for its lifetime.
    Returns the skeleton and the bytes left out.
    """
    externalizer = _Externalizer(min_bytes, data_fd, location)
    skeleton = onnx.ModelProto()
    _copy_fields(skeleton, model, "graph", "functions")
    externalizer.graph(skeleton.graph, model.graph)
    for function in model.functions:
        copy = skeleton.functions.add()
        _copy_fields(copy, function, "node")
        externalizer.nodes(copy.node, function.node)
    return skeleton, externalizer.stripped


def _data_bytes(tensor: TensorProto) -> int:
    """A tensor's data size, from its shape when it has raw bytes (reading them would copy them)."""
    if tensor.HasField("raw_data"):
        declared = declared_bytes(tensor)
        if declared is not None:
            return declared
    return tensor.ByteSize()


def write_with_external_data(
    model: onnx.ModelProto, model_path: str | os.PathLike, data_path: str | os.PathLike, location: str
) -> None:
    """Write ``model`` to ``model_path`` with its large initializers in ``data_path`` (referenced as ``location``).

    ``model`` is not modified and its weights are not copied as a whole: each initializer's bytes are written
    on their own. Both files are overwritten if they exist.
    """
    fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        skeleton, _ = _skeleton(model, EXTERNAL_MIN_BYTES, fd, location)
    finally:
        os.close(fd)
    with open(model_path, "wb") as f:
        f.write(skeleton.SerializeToString())


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


def external_data_path(path: str | os.PathLike) -> Path:
    """Where the data file of a model saved at ``path`` with external data goes: ``<name>.data`` beside it."""
    out = Path(path)
    return out.with_name(out.name + ".data")


@contextlib.contextmanager
def staged_save(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: list[Path] | tuple[Path, ...] = (),
) -> Iterator[Path]:
    """Write ``model`` under temporary names beside ``path``; rename into place when the ``with`` body succeeds.

    With ``external_data`` (default: only when the model exceeds the protobuf limit) the model goes to ``path``
    and its tensors to ``<name>.data``; the data file is renamed first. On any failure, inside the body too,
    the temporary files are removed and existing outputs are left as they were. ``protect`` lists files
    that must not be overwritten (the input's own external data).
    """
    out = check_output_path(path)
    external = over_protobuf_limit(model) if external_data is None else bool(external_data) or over_protobuf_limit(model)
    data_out = external_data_path(out)
    if any(same_file(out, p) for p in protect):
        raise ModelError(f"{out}: this is the input model's own external data file; choose another output name")
    if external and any(same_file(data_out, p) for p in protect):
        raise ModelError(
            f"{out}: its data file {str(data_out)!r} is the input model's own external data; choose another "
            "output name"
        )
    temps: list[str] = []
    try:
        fd, model_tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        temps.append(model_tmp)
        if external:
            fd, data_tmp = tempfile.mkstemp(prefix=f".{data_out.name}.", suffix=".tmp", dir=out.parent)
            os.close(fd)
            temps.append(data_tmp)
            write_with_external_data(model, model_tmp, data_tmp, data_out.name)
        else:
            onnx.save(model, model_tmp)
        mode = 0o666 & ~_umask()
        for name in temps:
            os.chmod(name, mode)
        yield out
        if external:
            os.replace(data_tmp, data_out)
            temps.remove(data_tmp)
        os.replace(model_tmp, out)
        temps.remove(model_tmp)
    finally:
        for name in temps:
            Path(name).unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_file_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` beside ``path`` and rename it into place: readers never see half a file, an existing
    file is replaced only on success, and nothing is left behind on failure. For artifacts, tables, states."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def save_model_atomic(
    model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None
) -> Path:
    """Write to a temporary file beside ``path`` and rename it into place, so readers never see half a model.

    An existing file at ``path`` is replaced only when the write succeeded. See :func:`staged_save` for
    ``external_data``.
    """
    with staged_save(model, path, external_data=external_data) as out:
        pass
    return out


# ---------------------------------------------------------------------------------------------------------
# opsets


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
    if model.ir_version < 4:
        listed = {vi.name for vi in model.graph.input}
        if any(init.name not in listed for init in model.graph.initializer):
            # IR 3 lists every initializer among the inputs, and the converter rejects one that is not
            # ("Input w is undefined"). A model that no longer lists them (ortq unlists them after its
            # first upgrade, so they stay constants) is IR 4 in form: say so.
            model.ir_version = 4
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors with C++ messages
        raise ModelError(f"{label}: cannot convert from opset {current} to {target}: {exc}") from None
    return converted
