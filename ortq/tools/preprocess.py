"""``ortq preprocess``: turn a float model into the form that quantizes best, before quantizing it.

The counterpart of ``onnxruntime.quantization.shape_inference.quant_pre_process``. Steps, in order, each
switchable and each recorded in the output's ``metadata_props`` under :data:`METADATA_KEY`:

1. ``opset``: upgrade to at least opset 13 (per-channel QuantizeLinear/DequantizeLinear need it).
2. ``dynamic_batch`` (off by default): axis 0 of inputs and outputs symbolic. Off because it changes the
   model's interface and is wrong for a model whose axis 0 is not a batch.
3. ``shape_inference``: ONNX's, or ONNX Runtime's symbolic shape inference when the model has symbolic or
   unknown input dimensions (needs sympy; falls back to ONNX's with a warning). Run again at the end so the
   output's shapes describe the final graph.
4. ``constant_folding``: nodes computed from constants only become initializers (a transposed or cast
   weight is then seen as a weight by the quantizer).
5. ``batch_norm_folding`` and ``add_bias_folding``: into the Conv / ConvTranspose / Gemm / MatMul before them.
6. ``ort_optimization`` (off by default): ONNX Runtime's ORT_ENABLE_BASIC graph optimizations. Never
   extended/all: those fuse into com.microsoft ops (FusedConv, QGemm inputs, ...) that quantizers cannot
   plan. Off by default because steps 4-5 already do what basic does for quantization, and its output
   depends on the installed ONNX Runtime; turn it on for the rest (Identity/Dropout elimination, Reshape
   fusion).

The input (file or proto) is never modified; the output is written atomically, with external data when the
input had it. ``ortq quantize`` warns (:func:`warn_if_not_preprocessed`) when a model was not preprocessed
and would have benefited.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ortq.pipeline import graph_passes
from ortq.pipeline.preprocess_advice import (
    METADATA_KEY, preprocess_advice, preprocess_record, tensors_without_shape, warn_if_not_preprocessed,
)
from ortq.core.errors import ConfigError, ModelError
from ortq.io.model_io import (
    check_model, check_output_path, infer_shapes, model_opset, over_protobuf_limit, read_model,
    session_source, staged_save, upgrade_opset,
)
from ortq.io.paths import refuse_overwriting_inputs

__all__ = [
    "preprocess", "PreprocessResult", "PreprocessStep", "preprocess_advice", "warn_if_not_preprocessed",
    "preprocess_record", "tensors_without_shape", "METADATA_KEY", "DEFAULT_OPSET", "ORT_LEVELS",
]

log = logging.getLogger(__name__)

#: metadata_props key holding the JSON record of what ``preprocess`` did.
#: Per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute) exist from opset 13.
DEFAULT_OPSET = 13
#: ONNX Runtime optimization levels ``preprocess`` accepts; "extended" and "all" are refused (see module doc).
ORT_LEVELS = ("none", "basic")


@dataclass
class PreprocessStep:
    """One step that ran: its name (as in the metadata), what it did, and how many rewrites it made."""

    name: str
    detail: str
    count: int = 0


@dataclass
class PreprocessResult:
    """What :func:`preprocess` did."""

    model: onnx.ModelProto
    output: Path | None
    steps: list[PreprocessStep]
    nodes_before: int
    nodes_after: int
    opset_before: int
    opset_after: int
    #: "symbolic" (ONNX Runtime's symbolic shape inference), "onnx", or None if it did not run / failed.
    shape_inference: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ran(self) -> list[str]:
        """Names of the steps that ran, in order."""
        return [s.name for s in self.steps]

    def count(self, step: str) -> int:
        """How many rewrites ``step`` made (0 if it did not run): the steps are the one record of the counts."""
        return next((s.count for s in self.steps if s.name == step), 0)

    @property
    def batch_norms_folded(self) -> int:
        return self.count("batch_norm_folding")

    @property
    def add_biases_folded(self) -> int:
        return self.count("add_bias_folding")

    @property
    def constants_folded(self) -> int:
        return self.count("constant_folding")

    def summary(self) -> str:
        lines = [f"nodes: {self.nodes_before} -> {self.nodes_after}"]
        lines += [f"{s.name}: {s.detail}" for s in self.steps]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def preprocess(
    model: str | os.PathLike | onnx.ModelProto,
    output: str | os.PathLike | None = None,
    *,
    opset: int | None = None,
    dynamic_batch: bool = False,
    shape_inference: bool = True,
    symbolic: bool = True,
    fold_constants: bool = True,
    fold_batch_norm: bool = True,
    fold_add_bias: bool = True,
    ort_level: str = "none",
    max_folded_bytes: int = graph_passes.MAX_FOLDED_BYTES,
) -> PreprocessResult:
    """Preprocess ``model`` (a path or a ModelProto, never modified) for quantization; write it to ``output``
    if given. See the module docstring for the steps; each keyword turns one off or on.

    ``opset``: the opset to upgrade to (default :data:`DEFAULT_OPSET`; a newer model is never downgraded).
    ``ort_level``: "none" or "basic".
    """
    level = _check_ort_level(ort_level)
    if opset is not None and opset < DEFAULT_OPSET:
        raise ConfigError(f"opset {opset} is below {DEFAULT_OPSET}, where per-channel quantization starts")
    loaded = read_model(model)
    proto = loaded.model
    label = str(loaded.source) if loaded.source else "model"
    out_path = _check_output(output, loaded.source)
    steps: list[PreprocessStep] = []
    warnings: list[str] = []
    nodes_before = len(proto.graph.node)
    opset_before = model_opset(proto)

    target = max(opset or DEFAULT_OPSET, DEFAULT_OPSET)
    if opset_before < target:
        proto = _upgrade(proto, target, label)
        steps.append(PreprocessStep("opset", f"opset {opset_before} -> {model_opset(proto)}"))

    if dynamic_batch:
        n = graph_passes.make_batch_dynamic(proto)
        steps.append(PreprocessStep("dynamic_batch", f"axis 0 made symbolic on {n} input(s)/output(s)", n))

    method = _infer(proto, label, symbolic, warnings) if shape_inference else None
    if shape_inference:
        inference_step = PreprocessStep("shape_inference", "")
        steps.append(inference_step)

    passes = (
        ("constant_folding", fold_constants, "node(s) computing on constants folded",
         lambda m: graph_passes.fold_constants(m, max_folded_bytes)),
        ("batch_norm_folding", fold_batch_norm, "BatchNormalization node(s) folded", graph_passes.fold_batch_norm),
        ("add_bias_folding", fold_add_bias, "Add node(s) folded into a bias", graph_passes.fold_add_bias),
    )
    for name, enabled, what, run_pass in passes:
        if enabled:
            count = run_pass(proto)
            steps.append(PreprocessStep(name, f"{count} {what}", count))
    if level == "basic":
        before = len(proto.graph.node)
        proto = _ort_optimize(proto, label)
        steps.append(PreprocessStep(
            "ort_optimization", f"ONNX Runtime ORT_ENABLE_BASIC: {before} -> {len(proto.graph.node)} node(s)",
            before - len(proto.graph.node),
        ))
    if shape_inference:
        # Again on the final graph: folding removed tensors and ONNX Runtime drops value_info.
        final = _infer(proto, label, symbolic and method == "symbolic", warnings)
        method = "symbolic" if "symbolic" in (method, final) else final
        inference_step.detail = method or "failed, see warnings"

    try:
        check_model(proto)
    except onnx.checker.ValidationError as exc:  # a bug in a pass, never the user's input (checked on load)
        raise ModelError(f"{label}: the preprocessed model fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None

    result = PreprocessResult(
        proto, None, steps, nodes_before, len(proto.graph.node), opset_before, model_opset(proto), method, warnings,
    )
    _record(proto, steps)
    if out_path is not None:
        with staged_save(proto, out_path, external_data=loaded.external_data, protect=loaded.external_files) as written:
            pass
        result.output = written
        log.info("%s: preprocessed into %s", label, written)
    return result


def _check_ort_level(level: str) -> str:
    level = str(level).lower()
    if level in ("extended", "all", "layout"):
        raise ConfigError(
            f"ort_level {level!r} is refused: ONNX Runtime's extended/all levels fuse nodes into com.microsoft "
            "ops (FusedConv, FusedGemm, BiasGelu, ...) that quantizers cannot quantize; use 'basic' or 'none'"
        )
    if level not in ORT_LEVELS:
        raise ConfigError(f"ort_level must be one of {', '.join(ORT_LEVELS)}, not {level!r}")
    return level


def _check_output(output: str | os.PathLike | None, source: Path | None) -> Path | None:
    if output is None:
        return None
    out = check_output_path(output)  # before any work
    refuse_overwriting_inputs([out], {"model": source})
    return out


def _upgrade(proto: onnx.ModelProto, target: int, label: str) -> onnx.ModelProto:
    listed_initializers = proto.ir_version < 4
    proto = upgrade_opset(proto, target, label)
    if listed_initializers:
        # From IR 4 a listed initializer is an overridable input, not a constant: nothing would fold.
        constants = {i.name for i in proto.graph.initializer}
        inputs = [vi for vi in proto.graph.input if vi.name not in constants]
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
    # The converter keeps the IR version; opset 13 needs IR 7, opset 21 IR 10.
    needed = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    proto.ir_version = max(proto.ir_version, needed)
    return proto


# ---------------------------------------------------------------------------------------------------------
# shape inference


def _has_symbolic_dims(proto: onnx.ModelProto) -> bool:
    for vi in proto.graph.input:
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and (not t.HasField("shape") or any(not d.HasField("dim_value") for d in t.shape.dim)):
            return True
    return False


def _infer(proto: onnx.ModelProto, label: str, symbolic: bool, warnings: list[str]) -> str | None:
    """Shape inference in place; returns which kind ran ("symbolic" or "onnx"), or None if both failed.

    ONNX's first; ONNX Runtime's symbolic inference only where that left float tensors with unknown
    dimensions in a model with symbolic input dimensions (a Reshape to a shape computed from ``Shape``, as
    in attention, comes out of ONNX's as ``[unk__0, unk__1, ...]``).
    """
    try:
        infer_shapes(proto)
        method: str | None = "onnx"
    except Exception as exc:  # noqa: BLE001 - ONNX raises several types; the model stays usable without
        method = None
        failure = f"{label}: ONNX shape inference failed ({exc})"
    if symbolic and _has_symbolic_dims(proto) and (method is None or tensors_without_shape(proto, every_dim=True)):
        reason = _symbolic_infer(proto)
        if reason is None:
            return "symbolic"
        message = f"{label}: symbolic shape inference failed ({reason}); keeping ONNX shape inference's result"
        log.warning(message)
        warnings.append(message)
    if method is None:
        log.warning(failure)
        warnings.append(failure)
    return method


def _symbolic_infer(proto: onnx.ModelProto) -> str | None:
    """ONNX Runtime's symbolic shape inference into ``proto``'s value_info; the reason if it cannot run."""
    if over_protobuf_limit(proto):
        return "the model is over the 2 GB protobuf limit"
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError as exc:  # sympy is an optional dependency of onnxruntime's tool
        return str(exc)
    try:
        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=True)
    except Exception as exc:  # noqa: BLE001 - the tool raises bare Exceptions and asserts on models it cannot do
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if inferred is None:
        return "it gave up on the model"
    io = {vi.name for vi in (*inferred.graph.input, *inferred.graph.output)}
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(vi for vi in inferred.graph.value_info if vi.name not in io)
    del proto.graph.output[:]
    proto.graph.output.extend(inferred.graph.output)
    return None


# ---------------------------------------------------------------------------------------------------------
# ONNX Runtime basic optimizations


def _ort_optimize(proto: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """ORT_ENABLE_BASIC through ``SessionOptions.optimized_model_filepath``, written with external data in a
    temporary folder and read back; models over ``SESSION_FILE_BYTES`` reach ONNX Runtime as a file."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ortq-preprocess-") as folder:
        out = Path(folder) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(out)
        # Always: a model over 2 GB could not be written in one piece, and it costs nothing below.
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            with session_source(proto) as source:
                ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
            optimized = onnx.load(str(out), load_external_data=True)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            raise ModelError(f"{label}: ONNX Runtime could not optimize the model: {exc}") from None
    # ONNX Runtime lists the domains of every op it knows; keep only those the graph uses.
    used = {n.domain for n in optimized.graph.node} | {""}
    imports = [i for i in optimized.opset_import if i.domain in used or i.domain == "ai.onnx"]
    del optimized.opset_import[:]
    optimized.opset_import.extend(imports)
    del optimized.metadata_props[:]
    optimized.metadata_props.extend(proto.metadata_props)
    return optimized


# ---------------------------------------------------------------------------------------------------------
# the record, and the advice ``ortq quantize`` gives


def _record(proto: onnx.ModelProto, steps: list[PreprocessStep]) -> None:
    from ortq.core.version import __version__

    record = {"tool": "ortq", "version": __version__, "steps": [dataclasses.asdict(s) for s in steps]}
    props = {p.key: p.value for p in proto.metadata_props}
    props[METADATA_KEY] = json.dumps(record)
    onnx.helper.set_model_props(proto, props)  # replaces the list: a second run overwrites the record


