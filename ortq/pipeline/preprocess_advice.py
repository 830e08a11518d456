"""Would ``ortq preprocess`` help this model? The cheap structural check the pipeline runs on every input.

It lives beside the graph passes it asks (foldable BatchNormalization, constant subgraphs), below the
``preprocess`` tool that writes :data:`METADATA_KEY`, so the pipeline can warn without importing the tool.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import onnx

from ortq.core.graph import FLOAT_TYPES
from ortq.pipeline import graph_passes

__all__ = ["METADATA_KEY", "preprocess_record", "preprocess_advice", "tensors_without_shape", "warn_if_not_preprocessed"]

log = logging.getLogger(__name__)

#: Where :func:`ortq.preprocess` records what it did, in the model's ``metadata_props``.
METADATA_KEY = "ortq.preprocess"


def tensors_without_shape(proto: onnx.ModelProto, *, every_dim: bool = False) -> set[str]:
    """Node outputs of the main graph, float or of unknown type, whose rank is not declared; with
    ``every_dim``, also those with a dimension neither a number nor a named symbol (ONNX shape inference
    names such dimensions ``unk__N``)."""
    declared = {vi.name: vi for vi in (*proto.graph.value_info, *proto.graph.output)}
    missing = set()
    for node in proto.graph.node:
        for name in node.output:
            if not name:
                continue
            vi = declared.get(name)
            if vi is None or not vi.type.HasField("tensor_type"):
                missing.add(name)
                continue
            t = vi.type.tensor_type
            if t.elem_type not in FLOAT_TYPES and t.elem_type != onnx.TensorProto.UNDEFINED:
                continue
            if not t.HasField("shape"):
                missing.add(name)
            elif every_dim and any(
                not d.HasField("dim_value") and (not d.dim_param or d.dim_param.startswith("unk__")) for d in t.shape.dim
            ):
                missing.add(name)
    return missing


def preprocess_record(proto: onnx.ModelProto) -> dict[str, Any] | None:
    """The record :func:`preprocess` left in the model, or None if it was not preprocessed by ortq."""
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return json.loads(prop.value)
            except ValueError:
                return None
    return None


def preprocess_advice(proto: onnx.ModelProto) -> list[str]:
    """Why preprocessing ``proto`` would help (empty if it was preprocessed, or is already clean). Cheap: it
    looks at the graph's structure and declared shapes only; run after shape inference."""
    if preprocess_record(proto) is not None:
        return []
    reasons = []
    bns = graph_passes.foldable_batch_norms(proto)
    if bns:
        reasons.append(f"{len(bns)} BatchNormalization node(s) to fold")
    constants = graph_passes.constant_foldable_nodes(proto)
    if constants:
        reasons.append(f"{len(constants)} node(s) computing on constants only")
    unknown = tensors_without_shape(proto)
    if unknown:
        reasons.append(f"{len(unknown)} tensor(s) without an inferred shape")
    return reasons


def warn_if_not_preprocessed(proto: onnx.ModelProto, label: str) -> None:
    """One warning when ``proto`` was not preprocessed and would benefit (``ortq quantize`` calls this)."""
    reasons = preprocess_advice(proto)
    if reasons:
        log.warning(
            "%s was not preprocessed and would benefit (%s): run `ortq preprocess` (ortq.preprocess) before "
            "quantizing", label, ", ".join(reasons),
        )
