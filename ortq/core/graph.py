"""A read-only index over an ONNX graph: who produces and who consumes each tensor, and what it is.

The quantizer edits raw ONNX protobuf (see the README's architecture section for why not onnx-ir yet);
this index is the bookkeeping that makes those edits local and cheap instead of repeated graph scans.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from ortq.core.errors import ModelError

__all__ = ["GraphIndex", "FreshNames", "node_label", "FLOAT_TYPES", "uses_float16", "subgraph_references", "is_qdq",
           "QDQ_OP_TYPES", "QDQ_DOMAINS", "drop_unused_constants", "refuse_quantized"]

_CACHE_LIMIT = 1 << 16

#: Element types ortq quantizes. Float16 needs opset 19 Q/DQ, whose scales then are float16 too.
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16})


def uses_float16(model: onnx.ModelProto) -> bool:
    """True if any declared tensor of the main graph is float16 (the model then needs opset-19 Q/DQ)."""
    g = model.graph
    f16 = onnx.TensorProto.FLOAT16
    if any(i.data_type == f16 for i in g.initializer):
        return True
    if any(v.type.tensor_type.elem_type == f16 for v in (*g.input, *g.output, *g.value_info)):
        return True
    return any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == f16 for a in n.attribute) for n in g.node
    )


def node_label(node: onnx.NodeProto) -> str:
    """How errors and logs name a node: its name and op type (ONNX node names are optional)."""
    name = node.name or (f"<unnamed, output {node.output[0]}>" if node.output else "<unnamed>")
    domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
    return f"{name!r} ({domain}{node.op_type})"


class GraphIndex:
    """Producers, consumers, constants and types of the main graph's tensors."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.model = model
        self.graph = graph
        self.graph_inputs = {vi.name for vi in graph.input}
        # An initializer that is also a graph input can be overridden at run time: it is not a constant.
        self.initializers = {i.name: i for i in graph.initializer if i.name not in self.graph_inputs}
        self.graph_outputs = {vi.name for vi in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.value_info = {vi.name: vi for vi in (*graph.input, *graph.output, *graph.value_info)}
        self._constant_cache: dict[str, np.ndarray] = {}

    def is_constant(self, name: str) -> bool:
        """True for initializers and for Constant node outputs (values known before any data is seen)."""
        if name in self.initializers:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx")

    def constant_value(self, name: str) -> np.ndarray | None:
        if name in self._constant_cache:
            return self._constant_cache[name]
        value: np.ndarray | None = None
        if name in self.initializers:
            value = numpy_helper.to_array(self.initializers[name])
        elif self.is_constant(name):
            attr = self.producer[name].attribute[0]
            if attr.name == "value":
                value = numpy_helper.to_array(attr.t)
        if value is not None and value.nbytes <= _CACHE_LIMIT:
            # Weights are read twice (ranges, then quantization); caching them would hold a second copy
            # of every weight for the whole run, so only small constants are cached.
            self._constant_cache[name] = value
        return value

    def elem_type(self, name: str) -> int | None:
        """ONNX element type of a tensor if the graph declares it (after shape inference, most do)."""
        if name in self.initializers:
            return self.initializers[name].data_type
        vi = self.value_info.get(name)
        if vi is not None and vi.type.HasField("tensor_type"):
            return vi.type.tensor_type.elem_type
        if self.is_constant(name):
            value = self.constant_value(name)
            if value is not None:
                return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        return None

    def is_float(self, name: str) -> bool:
        """Quantization applies to float32 and float16 tensors; unknown types are never guessed to be float."""
        return self.elem_type(name) in FLOAT_TYPES

    def float_dtype(self, name: str) -> np.dtype:
        """The numpy type of a float tensor: what its scale initializers must be (Q/DQ require it)."""
        elem = self.elem_type(name)
        return np.dtype(np.float16) if elem == onnx.TensorProto.FLOAT16 else np.dtype(np.float32)

    def shape(self, name: str) -> list[int | str | None] | None:
        if name in self.initializers:
            return list(self.initializers[name].dims)
        vi = self.value_info.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return None
        dims: list[int | str | None] = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        return dims

    def attribute(self, node: onnx.NodeProto, name: str, default: object = None) -> object:
        for attr in node.attribute:
            if attr.name == name:
                return onnx.helper.get_attribute_value(attr)
        return default

    def opset(self, domain: str = "") -> int:
        for imp in self.model.opset_import:
            if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
                return imp.version
        return 0


class FreshNames:
    """Fresh tensor and node names that cannot collide with anything in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.used = {n.name for n in g.node}
        self.used.update(x for n in g.node for x in (*n.input, *n.output))
        self.used.update(i.name for i in g.initializer)
        self.used.update(v.name for v in (*g.input, *g.output, *g.value_info))

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


#: QuantizeLinear/DequantizeLinear, in the domains that define them (ONNX's, and ONNX Runtime's contrib
#: versions that QAT exporters and ONNX Runtime's own tools write).
QDQ_OP_TYPES = frozenset({"QuantizeLinear", "DequantizeLinear"})
QDQ_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})


def is_qdq(node: onnx.NodeProto) -> bool:
    return node.op_type in QDQ_OP_TYPES and node.domain in QDQ_DOMAINS


def subgraph_references(graph: onnx.GraphProto) -> set[str]:
    """Names that If/Loop/Scan bodies (at any depth) read: outer-scope tensors the main graph cannot see as read."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subgraphs:
                names.update(x for n in sub.node for x in n.input)
                names |= subgraph_references(sub)
    return names


def drop_unused_constants(graph: onnx.GraphProto) -> None:
    """Remove float initializers (and Constant nodes) that every consumer now reads quantized."""
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    used |= subgraph_references(graph)
    keep = [i for i in graph.initializer if i.name in used or i.name in {v.name for v in graph.input}]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    dead = [n for n in graph.node if n.op_type == "Constant" and not (set(n.output) & used)]
    for node in dead:
        graph.node.remove(node)


def refuse_quantized(model: onnx.ModelProto, label: str) -> None:
    """Raise :class:`ModelError` if ``model`` already holds QuantizeLinear/DequantizeLinear nodes.

    Static quantization of such a model would add a second quantization on top of the one it was trained
    with; ``quantize_qat`` is the path for it.
    """
    found = [n for n in model.graph.node if is_qdq(n)]
    if not found:
        return
    q = sum(n.op_type == "QuantizeLinear" for n in found)
    raise ModelError(
        f"{label} is already quantized: it holds {q} QuantizeLinear and {len(found) - q} DequantizeLinear "
        f"node(s) (first: {node_label(found[0])}); quantizing it again would stack a second quantization on "
        "the first. To check and complete a quantization-aware-trained model, use `ortq qat` (ortq.quantize_qat)"
    )
