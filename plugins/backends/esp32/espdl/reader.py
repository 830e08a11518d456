"""Read ESP-DL v3 ``.espdl`` model files into plain dataclasses.

The container (esp-ppq ``esp_ppq/parser/espdl/helper.py`` ``save``; ESP-DL's ``fbs_loader``): 16 bytes of header
-- ``b"EDL2"``, a little-endian uint32 mode (0: plain, 1: AES-128-CTR encrypted), a uint32 payload length and
4 zero bytes -- followed by the payload, a FlatBuffers ``Model`` of ``espdl.fbs`` (``schema_generated.py``).
Encrypted files need the key the exporter printed; they are refused here with :class:`EspdlError`.

Tensor values are stored in ``raw_data``, a vector of 16-byte aligned blocks, the last one zero-padded;
:class:`EspdlTensor.data` holds exactly ``prod(dims)`` elements in the stored order (filters packed, see
``layout.py``), shaped as ``dims``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ortq.plugins.backends.esp32.espdl import schema_generated as fb

__all__ = [
    "EspdlError",
    "EspdlTensor",
    "EspdlValueInfo",
    "EspdlNode",
    "EspdlGraph",
    "EspdlModel",
    "MAGIC",
    "HEADER_SIZE",
    "DTYPES",
    "split_container",
    "read_espdl",
    "parse_model",
]

MAGIC = b"EDL2"
HEADER_SIZE = 16

#: espdl.fbs ``TensorDataType`` -> numpy dtype (STRING has none).
DTYPES: dict[int, np.dtype] = {
    fb.TensorDataType.FLOAT: np.dtype(np.float32),
    fb.TensorDataType.UINT8: np.dtype(np.uint8),
    fb.TensorDataType.INT8: np.dtype(np.int8),
    fb.TensorDataType.UINT16: np.dtype(np.uint16),
    fb.TensorDataType.INT16: np.dtype(np.int16),
    fb.TensorDataType.INT32: np.dtype(np.int32),
    fb.TensorDataType.INT64: np.dtype(np.int64),
    fb.TensorDataType.BOOL: np.dtype(np.bool_),
    fb.TensorDataType.FLOAT16: np.dtype(np.float16),
    fb.TensorDataType.DOUBLE: np.dtype(np.float64),
    fb.TensorDataType.UINT32: np.dtype(np.uint32),
    fb.TensorDataType.UINT64: np.dtype(np.uint64),
}


class EspdlError(ValueError):
    """A file that is not a readable ``.espdl`` model, or a model this package cannot handle."""


@dataclass
class EspdlTensor:
    """An initializer, LUT or embedded test value."""

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]
    exponents: tuple[int, ...]
    data: np.ndarray  # shaped ``dims``, elements in the stored order
    doc_string: str = ""

    @property
    def layout(self) -> str | None:
        """The layout the exporter recorded in ``doc_string`` (``layout ==> X``), if any."""
        head, sep, tail = self.doc_string.partition("layout ==> ")
        return tail.strip() if sep else None

    @property
    def exponent(self) -> int:
        if len(self.exponents) != 1:
            raise EspdlError(f"tensor {self.name!r} has {len(self.exponents)} exponents, not one")
        return int(self.exponents[0])


@dataclass
class EspdlValueInfo:
    """A graph input, output or intermediate tensor: element type, shape (as stored: NHWC for feature maps)."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None
    exponents: tuple[int, ...]

    @property
    def exponent(self) -> int:
        return int(self.exponents[0]) if self.exponents else 0


@dataclass
class EspdlNode:
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, Any] = field(default_factory=dict)
    domain: str = ""
    doc_string: str = ""


@dataclass
class EspdlGraph:
    name: str
    nodes: list[EspdlNode]
    initializers: dict[str, EspdlTensor]
    inputs: list[EspdlValueInfo]
    outputs: list[EspdlValueInfo]
    value_info: list[EspdlValueInfo]
    test_inputs: dict[str, EspdlTensor]
    test_outputs: dict[str, EspdlTensor]
    doc_string: str = ""

    def value(self, name: str) -> EspdlValueInfo | None:
        """The value info of ``name`` (inputs and outputs first, then intermediates)."""
        for vi in (*self.inputs, *self.outputs, *self.value_info):
            if vi.name == name:
                return vi
        return None


@dataclass
class EspdlModel:
    graph: EspdlGraph
    ir_version: int = 0
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    opset_import: list[tuple[str, int]] = field(default_factory=list)
    metadata_props: dict[str, str] = field(default_factory=dict)


def _s(value: bytes | None) -> str:
    return value.decode("utf-8", errors="replace") if value else ""


def split_container(data: bytes) -> bytes:
    """The FlatBuffers payload of an ``.espdl`` file's bytes; refuses other files and encrypted ones."""
    if len(data) < HEADER_SIZE or data[:4] != MAGIC:
        raise EspdlError(f"not an ESP-DL v3 model: the file does not start with {MAGIC!r} (found {bytes(data[:4])!r})")
    mode, length = struct.unpack_from("<II", data, 4)
    if mode == 1:
        raise EspdlError(
            "this .espdl file is encrypted (EDL2 mode 1, AES-128-CTR); it needs the key esp-ppq printed when it "
            "exported the model, and reading encrypted models is not supported"
        )
    if mode != 0:
        raise EspdlError(f"unknown EDL2 mode {mode} (0 is plain, 1 is AES-128-CTR)")
    if HEADER_SIZE + length > len(data):
        raise EspdlError(f"truncated .espdl file: the header announces {length} payload bytes, {len(data) - HEADER_SIZE} present")
    return bytes(data[HEADER_SIZE:HEADER_SIZE + length])


def read_espdl(source: str | Path | bytes) -> EspdlModel:
    """Parse an ``.espdl`` file (a path or its bytes)."""
    data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    return parse_model(split_container(bytes(data)))


def parse_model(payload: bytes) -> EspdlModel:
    """Parse the FlatBuffers payload (``Model``) of an ``.espdl`` file."""
    try:
        m = fb.Model.GetRootAs(payload, 0)
        graph = m.Graph()
        if graph is None:
            raise EspdlError("the model has no graph")
        opsets = [(_s(m.OpsetImport(i).Domain()), int(m.OpsetImport(i).Version())) for i in range(m.OpsetImportLength())]
        meta = {_s(m.MetadataProps(i).Key()): _s(m.MetadataProps(i).Value()) for i in range(m.MetadataPropsLength())}
        return EspdlModel(
            graph=_graph(graph, payload),
            ir_version=int(m.IrVersion()),
            producer_name=_s(m.ProducerName()),
            producer_version=_s(m.ProducerVersion()),
            domain=_s(m.Domain()),
            model_version=int(m.ModelVersion()),
            doc_string=_s(m.DocString()),
            opset_import=opsets,
            metadata_props=meta,
        )
    except EspdlError:
        raise
    except Exception as exc:  # a corrupt buffer raises struct/index errors deep in the accessors
        raise EspdlError(f"corrupt .espdl payload: {type(exc).__name__}: {exc}") from exc


def _graph(g: fb.Graph, payload: bytes) -> EspdlGraph:
    def tensors(n: int, get) -> dict[str, EspdlTensor]:
        out = {}
        for i in range(n):
            t = _tensor(get(i), payload)
            out[t.name] = t
        return out

    return EspdlGraph(
        name=_s(g.Name()),
        nodes=[_node(g.Node(i), payload) for i in range(g.NodeLength())],
        initializers=tensors(g.InitializerLength(), g.Initializer),
        inputs=[_value_info(g.Input(i)) for i in range(g.InputLength())],
        outputs=[_value_info(g.Output(i)) for i in range(g.OutputLength())],
        value_info=[_value_info(g.ValueInfo(i)) for i in range(g.ValueInfoLength())],
        test_inputs=tensors(g.TestInputsValueLength(), g.TestInputsValue),
        test_outputs=tensors(g.TestOutputsValueLength(), g.TestOutputsValue),
        doc_string=_s(g.DocString()),
    )


def _raw_bytes(t: fb.Tensor) -> bytes | None:
    """The ``raw_data`` vector of 16-byte structs as one bytes object (read in place, no per-struct objects)."""
    o = t._tab.Offset(20)  # raw_data is the Tensor table's 9th field: vtable slot 4 + 2 * 8
    if o == 0:
        return None
    start = t._tab.Vector(o)
    n = t._tab.VectorLen(o)
    return bytes(t._tab.Bytes[start:start + 16 * n])


def _tensor(t: fb.Tensor, payload: bytes) -> EspdlTensor:
    name = _s(t.Name())
    code = int(t.DataType())
    if code not in DTYPES:
        raise EspdlError(f"tensor {name!r}: unsupported data type {code}")
    dtype = DTYPES[code]
    dims = tuple(int(d) for d in (t.DimsAsNumpy() if t.DimsLength() else []))
    count = int(np.prod(dims)) if dims else 1
    raw = _raw_bytes(t)
    if raw is not None:
        if len(raw) < count * dtype.itemsize:
            raise EspdlError(f"tensor {name!r}: {len(raw)} raw bytes for {count} {dtype} values")
        values = np.frombuffer(raw, dtype=dtype, count=count).copy()
    else:
        typed = {
            np.dtype(np.float32): (t.FloatDataLength, t.FloatDataAsNumpy),
            np.dtype(np.int64): (t.Int64DataLength, t.Int64DataAsNumpy),
            np.dtype(np.float64): (t.DoubleDataLength, t.DoubleDataAsNumpy),
            np.dtype(np.uint64): (t.Uint64DataLength, t.Uint64DataAsNumpy),
        }.get(dtype, (t.Int32DataLength, t.Int32DataAsNumpy))  # ONNX keeps the small integer types in int32_data
        values = np.asarray(typed[1]() if typed[0]() else [], dtype=dtype)
        if values.size != count:
            raise EspdlError(f"tensor {name!r}: {values.size} values for dims {dims}")
    exps = tuple(int(e) for e in (t.ExponentsAsNumpy() if t.ExponentsLength() else []))
    return EspdlTensor(name, dtype, dims, exps, values.reshape(dims), _s(t.DocString()))


def _value_info(v: fb.ValueInfo) -> EspdlValueInfo:
    dtype, shape = None, None
    ti = v.ValueInfoType()
    if ti is not None and ti.ValueType() == fb.TypeInfoValue.tensor_type:
        tt = fb.TensorTypeAndShape()
        table = ti.Value()
        tt.Init(table.Bytes, table.Pos)
        dtype = DTYPES.get(int(tt.ElemType()))
        s = tt.Shape()
        if s is not None:
            dims: list[int | str | None] = []
            for i in range(s.DimLength()):
                dv = s.Dim(i).Value()
                if dv is None or dv.DimType() == fb.DimensionValueType.UNKNOWN:
                    dims.append(None)
                elif dv.DimType() == fb.DimensionValueType.PARAM:
                    dims.append(_s(dv.DimParam()))
                else:
                    dims.append(int(dv.DimValue()))
            shape = tuple(dims)
    exps = tuple(int(e) for e in (v.ExponentsAsNumpy() if v.ExponentsLength() else []))
    return EspdlValueInfo(_s(v.Name()), dtype, shape, exps)


def _node(n: fb.Node, payload: bytes) -> EspdlNode:
    attrs = {}
    for i in range(n.AttributeLength()):
        a = n.Attribute(i)
        attrs[_s(a.Name())] = _attribute(a, payload)
    return EspdlNode(
        name=_s(n.Name()),
        op_type=_s(n.OpType()),
        inputs=[_s(n.Input(i)) for i in range(n.InputLength())],
        outputs=[_s(n.Output(i)) for i in range(n.OutputLength())],
        attributes=attrs,
        domain=_s(n.Domain()),
        doc_string=_s(n.DocString()),
    )


def _attribute(a: fb.Attribute, payload: bytes) -> Any:
    kind = int(a.AttrType())
    A = fb.AttributeType
    if kind == A.FLOAT:
        return float(a.F().F())
    if kind == A.INT:
        return int(a.I().I())
    if kind == A.STRING:
        raw = bytes(a.SAsNumpy()) if a.SLength() else b""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    if kind == A.TENSOR:
        return _tensor(a.T(), payload)
    if kind == A.FLOATS:
        return [float(x) for x in (a.FloatsAsNumpy() if a.FloatsLength() else [])]
    if kind == A.INTS:
        return [int(x) for x in (a.IntsAsNumpy() if a.IntsLength() else [])]
    if kind == A.STRINGS:
        return [_s(a.Strings(i)) for i in range(a.StringsLength())]
    if kind == A.TENSORS:
        return [_tensor(a.Tensors(i), payload) for i in range(a.TensorsLength())]
    raise EspdlError(f"attribute {_s(a.Name())!r}: type {kind} (graphs, type protos) is not supported")
