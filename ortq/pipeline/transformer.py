"""Find transformer blocks in a graph, so the planner can keep their residual stream float.

Why: trained transformers carry a few *massive-activation* channels in their residual stream (hidden
channel 99 of paraphrase-MiniLM-L3-v2 reaches ~200 while the other 383 stay within +-11). One per-tensor
8-bit scale on such a tensor leaves the bulk of the channels 3-7 levels, and ortq's generic rule ("quantize
an element-wise op whose input is already quantized") would put exactly those tensors (bias Adds, residual
Adds, the GELU's Add/Mul) through 8 bits. Measured on MiniLM (docs/accuracy.md, "Transformers"): cosine to
float 0.913 with the generic rule, 0.996 when only the MatMul/Gemm inputs and weights are quantized, and the
model gets faster, not slower, because ONNX Runtime then fuses the float bias/residual/LayerNorm chain
(SkipLayerNormalization, BiasGelu) and still runs every projection as an integer MatMul.

Detection is structural, not by node names:

- an **attention** is a Softmax whose input comes (through scaling, the mask Add and data movement) from a
  MatMul of two activations (the scores) and whose output is multiplied by another activation (the values);
  its **projections** are the constant-weight MatMul/Gemm found by walking back from the score and value
  MatMuls through data movement, bias Adds and constant scalings;
- a **normalization** is a LayerNormalization-type node (also ONNX Runtime's fused and simplified forms) or
  the decomposed pattern older exporters write: ``ReduceMean``, ``Sub``, ``Pow(., 2)``, ``ReduceMean``,
  ``Add(eps)``, ``Sqrt``, ``Div`` (or the RMS form without the mean), then an optional scale and shift;
- the **region** is every node on a path from a block start (a projection's input, a normalization's or a
  Softmax's output) to a block end (a normalization's or a Softmax's input), plus the normalizations and
  Softmaxes themselves. What comes before the first block (embeddings, a CNN stem) and after the last
  normalization (pooling, heads) is outside and keeps the generic rules, except the embedding sum
  (Adds of Gathers from constant tables feeding the first normalization), which starts the residual stream.

A graph without an attention has no region: LayerNormalization alone (ConvNeXt, say) is not enough, the
measurement behind the policy was made on attention models.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import onnx

from ortq.core.graph import GraphIndex

__all__ = ["TransformerLayout", "find_transformer", "NORM_OP_TYPES", "QUANTIZED_IN_REGION", "RESIDUAL_FLOAT_REASON"]

#: Fused normalization ops (ONNX's and ONNX Runtime's contrib ones).
NORM_OP_TYPES = frozenset({
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization",
})

#: Inside a region only these keep ortq's generic rules: the projections (integer MatMul/Gemm kernels) and
#: ops that only move data (they are quantized only where their input already is, i.e. never on the float
#: residual stream). Everything else (Add, Mul, Concat, activations, ...) stays float there.
QUANTIZED_IN_REGION = frozenset({
    "MatMul", "Gemm", "Conv",
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Expand", "Tile", "Identity",
    "Gather",
})

#: The reason ``ortq info`` shows for a node the policy keeps float.
RESIDUAL_FLOAT_REASON = (
    "transformer residual stream kept float: per-tensor 8 bits cannot hold its outlier channels "
    "(see docs/accuracy.md, Transformers; transformer_policy=False quantizes it)"
)

# Ops the walks from a Softmax or a projection pass through without changing what the tensor is.
_MOVEMENT = frozenset({
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Identity", "Cast", "Dropout", "Expand",
    "Split", "Concat",  # Concat: a cached key/value appended to the new one
})
_SCALING = frozenset({"Mul", "Div"})
_MAX_WALK = 12


@dataclass(frozen=True)
class TransformerLayout:
    """What :func:`find_transformer` found; empty (falsy) for a graph without attention."""

    #: Softmax node names of the attentions.
    attention: tuple[str, ...] = ()
    #: Normalization node names (for a decomposed one, its last node).
    norms: tuple[str, ...] = ()
    #: Constant-weight MatMul/Gemm node names feeding the attentions' scores and values.
    projections: tuple[str, ...] = ()
    #: Every node name inside a transformer block.
    region: frozenset[str] = field(default_factory=frozenset)

    def __bool__(self) -> bool:
        return bool(self.attention)

    def summary(self) -> str:
        return (f"{len(self.attention)} attention(s), {len(self.norms)} normalization(s), "
                f"{len(self.region)} node(s) in transformer blocks")


def find_transformer(index: GraphIndex) -> TransformerLayout:
    """The transformer blocks of ``index``'s main graph (see the module docstring for the rules)."""
    attention: list[onnx.NodeProto] = []
    projection_inputs: set[str] = set()
    projections: list[str] = []
    for node in index.graph.node:
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
            continue
        score = _walk_back_to_activation_matmul(index, node.input[0])
        value = _walk_forward_to_activation_matmul(index, node.output[0])
        if score is None or value is None:
            continue
        attention.append(node)
        other = [x for x in value.input if not _reaches(index, x, node.output[0])]
        for tensor in [*score.input, *other]:
            proj = _walk_back_to_projection(index, tensor)
            if proj is not None:
                projections.append(proj.name)
                projection_inputs.add(proj.input[0])
    if not attention:
        return TransformerLayout()

    norms: list[tuple[str, str, list[onnx.NodeProto]]] = []  # (input, output, nodes)
    for node in index.graph.node:
        if node.op_type in NORM_OP_TYPES and node.input and node.output:
            norms.append((node.input[0], node.output[0], [node]))
        elif node.op_type == "ReduceMean":
            found = _decomposed_norm(index, node)
            if found is not None:
                norms.append(found)

    starts = projection_inputs | {out for _, out, _ in norms} | {a.output[0] for a in attention}
    ends = {inp for inp, _, _ in norms} | {a.input[0] for a in attention}
    downstream = _closure(starts, lambda t: [o for c in index.consumers.get(t, []) for o in c.output], index, forward=True)
    upstream = _closure(ends, lambda t: list(index.producer[t].input) if t in index.producer else [], index, forward=False)
    region = set(downstream & upstream)
    for inp, _, _ in norms:  # the residual stream's start: the embedding sum feeding the first normalization
        region.update(_embedding_sum(index, inp))
    region.update(a.name for a in attention)
    region.update(n.name for _, _, nodes in norms for n in nodes)
    # Consumers of a start tensor that lead to an end (the projections themselves, a residual Add) are in
    # ``downstream``; a projection whose input is a graph input is reached through its input here.
    for name in projections:
        region.add(name)
    return TransformerLayout(
        attention=tuple(a.name for a in attention),
        norms=tuple(nodes[-1].name for _, _, nodes in norms),
        projections=tuple(dict.fromkeys(projections)),
        region=frozenset(region),
    )


def _closure(tensors: set[str], step, index: GraphIndex, *, forward: bool) -> set[str]:  # noqa: ANN001
    """Names of the nodes reached from ``tensors`` (consumers when ``forward``, producers otherwise)."""
    nodes: set[str] = set()
    seen = set(tensors)
    queue = deque(tensors)
    while queue:
        t = queue.popleft()
        reached = index.consumers.get(t, []) if forward else ([index.producer[t]] if t in index.producer else [])
        for node in reached:
            nodes.add(node.name)
        for nxt in step(t):
            if nxt and nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return nodes


def _is_activation_matmul(index: GraphIndex, node: onnx.NodeProto) -> bool:
    return (node.op_type in ("MatMul", "FusedMatMul") and len(node.input) >= 2
            and not index.is_constant(node.input[0]) and not index.is_constant(node.input[1]))


def _walk_back_to_activation_matmul(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The scores MatMul behind a Softmax input: through scaling, the mask Add/Where and data movement."""
    queue, seen = deque([(tensor, 0)]), {tensor}
    while queue:
        t, depth = queue.popleft()
        node = index.producer.get(t)
        if node is None or depth > _MAX_WALK:
            continue
        if _is_activation_matmul(index, node):
            return node
        if node.op_type in _MOVEMENT | _SCALING | {"Add", "Sub", "Where"}:
            for x in node.input:
                if x and x not in seen and not index.is_constant(x):
                    seen.add(x)
                    queue.append((x, depth + 1))
    return None


def _walk_forward_to_activation_matmul(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The MatMul that weights the values by the attention probabilities."""
    queue, seen = deque([(tensor, 0)]), {tensor}
    while queue:
        t, depth = queue.popleft()
        if depth > _MAX_WALK:
            continue
        for node in index.consumers.get(t, []):
            if _is_activation_matmul(index, node):
                return node
            if node.op_type in _MOVEMENT | _SCALING:
                for o in node.output:
                    if o and o not in seen:
                        seen.add(o)
                        queue.append((o, depth + 1))
    return None


def _reaches(index: GraphIndex, tensor: str, target: str) -> bool:
    """True if ``tensor`` is ``target`` or is computed from it within a few data-movement/scaling steps."""
    queue, seen = deque([(tensor, 0)]), {tensor}
    while queue:
        t, depth = queue.popleft()
        if t == target:
            return True
        node = index.producer.get(t)
        if node is None or depth > _MAX_WALK or node.op_type not in _MOVEMENT | _SCALING:
            continue
        for x in node.input:
            if x and x not in seen:
                seen.add(x)
                queue.append((x, depth + 1))
    return False


def _walk_back_to_projection(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The constant-weight MatMul/Gemm that computes a query, key or value (through bias, scale, reshapes)."""
    queue, seen = deque([(tensor, 0)]), {tensor}
    while queue:
        t, depth = queue.popleft()
        node = index.producer.get(t)
        if node is None or depth > _MAX_WALK:
            continue
        if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2 and index.is_constant(node.input[1]):
            return node
        if node.op_type in _MOVEMENT | _SCALING | {"Add"}:
            for x in node.input:
                if x and x not in seen and not index.is_constant(x):
                    seen.add(x)
                    queue.append((x, depth + 1))
    return None


def _embedding_sum(index: GraphIndex, tensor: str) -> set[str]:
    """The Add/Sub/Mul/Div nodes computing ``tensor`` from embedding lookups (Gathers from constant tables)
    and constants only, e.g. word + position + token-type embeddings; empty if anything else feeds them
    (a CNN's residual Adds before a transformer keep the generic rules)."""
    nodes: set[str] = set()
    stack, seen = [tensor], {tensor}
    while stack:
        t = stack.pop()
        if index.is_constant(t):
            continue
        node = index.producer.get(t)
        if node is None:
            return set()
        if node.op_type == "Gather" and index.is_constant(node.input[0]):
            continue
        if node.op_type not in ("Add", "Sub", "Mul", "Div") or len(nodes) >= 8:
            return set()
        nodes.add(node.name)
        for x in node.input:
            if x and x not in seen:
                seen.add(x)
                stack.append(x)
    return nodes


def _single_consumer(index: GraphIndex, tensor: str, op_types: set[str]) -> onnx.NodeProto | None:
    consumers = index.consumers.get(tensor, [])
    if len(consumers) == 1 and consumers[0].op_type in op_types:
        return consumers[0]
    return None


def _other_input(node: onnx.NodeProto, tensor: str) -> str | None:
    others = [x for x in node.input if x != tensor]
    return others[0] if len(others) == 1 else None


def _constant_equals(index: GraphIndex, name: str | None, value: float) -> bool:
    const = index.constant_value(name) if name else None
    return const is not None and const.size == 1 and float(const.reshape(-1)[0]) == value


def _decomposed_norm(index: GraphIndex, variance: onnx.NodeProto) -> tuple[str, str, list[onnx.NodeProto]] | None:
    """``(input, output, nodes)`` if ``variance`` is the ReduceMean(Pow(z, 2)) of a decomposed LayerNorm
    (z = x - ReduceMean(x)) or RMSNorm (z = x), followed by Add(eps), Sqrt and a division of z by it."""
    square = index.producer.get(variance.input[0]) if variance.input else None
    if square is None or square.op_type != "Pow" or not _constant_equals(index, square.input[1], 2.0):
        return None
    z = square.input[0]
    nodes = [square, variance]
    x = z
    centre = index.producer.get(z)
    if centre is not None and centre.op_type == "Sub":
        mean = index.producer.get(centre.input[1])
        if mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == centre.input[0]:
            x = centre.input[0]
            nodes = [mean, centre, *nodes]
    eps = _single_consumer(index, variance.output[0], {"Add"})
    if eps is None or not index.is_constant(_other_input(eps, variance.output[0]) or ""):
        return None
    root = _single_consumer(index, eps.output[0], {"Sqrt"})
    if root is None:
        return None
    nodes += [eps, root]
    out = None
    for consumer in index.consumers.get(root.output[0], []):
        if consumer.op_type == "Div" and consumer.input[0] == z and consumer.input[1] == root.output[0]:
            nodes.append(consumer)
            out = consumer.output[0]
        elif consumer.op_type in ("Reciprocal", "Div"):
            if consumer.op_type == "Div" and not _constant_equals(index, consumer.input[0], 1.0):
                continue
            scale = _single_consumer(index, consumer.output[0], {"Mul"})
            if scale is not None and z in scale.input:
                nodes += [consumer, scale]
                out = scale.output[0]
    if out is None:
        return None
    for op in ("Mul", "Add"):  # the learned scale (gamma), then shift (beta)
        nxt = _single_consumer(index, out, {op})
        if nxt is None or not index.is_constant(_other_input(nxt, out) or ""):
            break
        nodes.append(nxt)
        out = nxt.output[0]
    return x, out, nodes
