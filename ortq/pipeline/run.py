"""The quantization pipeline: load -> plan -> calibrate -> parameters -> rewrite -> verify -> save/export.

Each stage is a module with one job; this one only wires them together and owns the data flow.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from ortq.pipeline.calibrate import run_calibration
from ortq.pipeline.equalize import equalize
from ortq.pipeline.layer_corrections import apply_corrections, layer_statistics
from ortq.pipeline.smooth_quant import smooth_quant
from ortq.pipeline.weight_rounding import WEIGHT_ROUNDING
from ortq.core.config import PASS_THROUGH_OPTIONS, QuantConfig, parse_quant_format
from ortq.io.data import feed_samples, iter_batches, model_inputs
from ortq.core.errors import CalibrationError, ConfigError, ModelError, OrtqError, PluginError
from ortq.core.graph import GraphIndex, uses_float16
from ortq.core.op_quantizer import Activation, SameAs
from ortq.io.model_io import MIN_QDQ_OPSET, check_output_path, infer_shapes, model_opset, model_size, read_model, staged_save, upgrade_opset
from ortq.pipeline.params import bias_params, compute_params, tail_sensitive_tensors
from ortq.core.plan import FloatNode, QuantPlan
from ortq.core.report import QuantizationResult
from ortq.pipeline.plan import make_plan
from ortq.pipeline.rewrite_dynamic import DEFAULT_DYNAMIC_OP_TYPES, DYNAMIC_OP_TYPES, rewrite_dynamic
from ortq.pipeline.rewrite_qdq import rewrite_qdq, use_contrib_qdq
from ortq.pipeline.rewrite_qoperator import convert_to_qoperator
from ortq.io.paths import refuse_overwriting_inputs
from ortq.io.state import CalibrationState, model_fingerprint
from ortq.pipeline.overrides import TensorOverrides
from ortq.pipeline.preprocess_advice import warn_if_not_preprocessed
from ortq.core.graph import refuse_quantized
from ortq.core.scheme import QuantSpec, QuantType
from ortq.core.report import VerificationReport
from ortq.pipeline.verify import LOW_SQNR_DB, make_session, run_outputs, verify_model

if TYPE_CHECKING:
    from ortq.core.backend import Backend
    from ortq.host.plugin_host import PluginHost

__all__ = [
    "QuantizationResult", "quantize", "quantize_dynamic", "calibrate", "calibration_job", "CalibrationJob", "plan_only",
    "resolve_config", "SCHEME_OPTIONS",
]

log = logging.getLogger(__name__)

_MAX_REPLANS = 8


def resolve_config(backend: Backend, **overrides: Any) -> QuantConfig:
    """Start from the backend's preferred scheme and apply the caller's explicit (non-None) options."""
    config = backend.default_config()
    act, wgt = config.activation, config.weight
    a_type = QuantType.parse(overrides["activation_type"]) if overrides.get("activation_type") is not None else act.qtype
    w_type = QuantType.parse(overrides["weight_type"]) if overrides.get("weight_type") is not None else wgt.qtype
    a_sym = _pick(overrides.get("activation_symmetric"), act.symmetric)
    w_sym = _pick(overrides.get("weight_symmetric"), wgt.symmetric)
    reduce = _pick(overrides.get("reduce_range"), wgt.reduce_range)
    config.activation = QuantSpec(a_type, a_sym, None, False, act.power_of_two)
    config.weight = QuantSpec(w_type, w_sym, None, reduce, wgt.power_of_two)
    config.per_channel = _pick(overrides.get("per_channel"), config.per_channel)
    config.quantize_bias = _pick(overrides.get("quantize_bias"), config.quantize_bias)
    config.matmul_const_b_only = _pick(overrides.get("matmul_const_b_only"), config.matmul_const_b_only)
    config.equalize = bool(_pick(overrides.get("equalize"), config.equalize))
    config.bias_correction = bool(_pick(overrides.get("bias_correction"), config.bias_correction))
    config.weight_rounding = _weight_rounding(_pick(overrides.get("weight_rounding"), config.weight_rounding))
    config.smooth_quant = bool(_pick(overrides.get("smooth_quant"), config.smooth_quant))
    config.smooth_quant_alpha = _pick(overrides.get("smooth_quant_alpha"), config.smooth_quant_alpha)
    if config.smooth_quant_alpha is not None:
        config.smooth_quant = True  # pinning alpha asks for SmoothQuant
        if not 0.0 < float(config.smooth_quant_alpha) < 1.0:
            raise ConfigError(f"smooth_quant_alpha must be between 0 and 1 (exclusive), not {config.smooth_quant_alpha!r}")
        config.smooth_quant_alpha = float(config.smooth_quant_alpha)
    config.extreme_range = float(_pick(overrides.get("extreme_range"), config.extreme_range))
    if overrides.get("op_types_to_quantize"):
        config.op_types = frozenset(overrides["op_types_to_quantize"])
        config.excluded_op_types = frozenset()
    if overrides.get("nodes_to_quantize"):
        config.nodes_to_quantize = frozenset(overrides["nodes_to_quantize"])
    if overrides.get("nodes_to_exclude"):
        config.nodes_to_exclude = frozenset(overrides["nodes_to_exclude"])
    if overrides.get("op_types_no_output_quantization"):
        config.op_types_no_output_quantization = frozenset(overrides["op_types_no_output_quantization"])
    if overrides.get("calibrate_method") is not None:
        config.calibrator = str(getattr(overrides["calibrate_method"], "name", overrides["calibrate_method"])).lower()
    if overrides.get("calibrator_options"):
        config.calibrator_options = dict(overrides["calibrator_options"])
    if config.extreme_range <= 0:
        raise ConfigError("extreme_range must be positive")
    config.quant_format = parse_quant_format(_pick(overrides.get("quant_format"), config.quant_format))
    for key in PASS_THROUGH_OPTIONS:
        if overrides.get(key) is not None:
            setattr(config, key, overrides[key])
    backend.check_config(config)
    return config


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _weight_rounding(value: Any) -> str | None:
    if value in (None, False, "", "none", "nearest"):
        return None
    name = "gptq" if value is True else str(value).lower()
    if name not in WEIGHT_ROUNDING:
        raise ConfigError(f"weight_rounding {value!r} is not one of none, {', '.join(WEIGHT_ROUNDING)}")
    return name


@dataclass
class _Prepared:
    backend: Backend
    config: QuantConfig
    model: onnx.ModelProto
    float_bytes: int
    label: str
    #: Hash of the model as given, computed only where a calibration state is made or checked
    #: (it reads every weight).
    fingerprint: str | None
    #: The input kept its weights in external data (the output then does too), and the files it used.
    external_data: bool = False
    external_files: list[Path] = field(default_factory=list)


def _prepare(
    toolkit: PluginHost, model: Any, target: str, overrides: dict[str, Any], *, fingerprint: bool = False,
    min_opset: int = 0, refuse_qdq: bool = False,
) -> _Prepared:
    unknown = set(overrides) - SCHEME_OPTIONS
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)}; supported: {sorted(SCHEME_OPTIONS)}")
    backend = toolkit.backend(target, **(overrides.pop("backend_options", None) or {}))
    config = resolve_config(backend, **overrides)
    loaded = read_model(model)
    proto, source = loaded.model, loaded.source
    del loaded.model  # one owner of the weights: ``proto`` (later stages may replace it)
    label = str(source) if source else "model"
    if refuse_qdq:  # static quantization of a QDQ model: refused as loaded, before any work on it
        refuse_quantized(proto, label)
    float_bytes = model_size(proto)  # ByteSize() would serialize the weights to count them
    digest = model_fingerprint(proto) if fingerprint else None
    listed_initializers = proto.ir_version < 4
    # Float16 tensors need opset 19, where QuantizeLinear/DequantizeLinear accept float16 scales.
    required = max(MIN_QDQ_OPSET, config.required_opset, 19 if uses_float16(proto) else 0, min_opset)
    proto = upgrade_opset(proto, required, label)
    if listed_initializers:  # after the upgrade: the version converter still wants the IR-3 listing
        _drop_initializers_from_inputs(proto)
    if model_opset(proto) >= 21 and proto.ir_version < 10:
        proto.ir_version = 10
    elif proto.ir_version < 7 and model_opset(proto) >= 13:
        proto.ir_version = 7
    _name_nodes(proto)
    try:
        proto = backend.prepare(proto)
    except OrtqError:
        raise
    except Exception as exc:
        raise PluginError(f"backend {backend.name!r} failed to prepare {label}: {exc!r}") from exc
    try:
        proto = infer_shapes(proto)  # path-based above the protobuf limit
    except Exception as exc:  # shape inference is a help, never a requirement
        log.warning("%s: shape inference failed (%s); tensors of unknown type stay float", label, exc)
    warn_if_not_preprocessed(proto, label)
    if config.equalize:  # before planning and calibration: ranges are those of the equalized model
        equalize(proto, label, config.nodes_to_exclude)
    return _Prepared(
        backend, config, proto, float_bytes, label, digest, loaded.external_data, loaded.external_files
    )


def _drop_initializers_from_inputs(model: onnx.ModelProto) -> None:
    """Before IR 4 every initializer had to be listed as a graph input, yet was a constant. From IR 4 on
    (which the opset upgrade may bring) a listed initializer is an overridable input and would not be
    quantized as a weight, so the old listing goes."""
    constants = {i.name for i in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in constants]
    if len(inputs) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(inputs)


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name: plans, reports and nodes_to_exclude refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        if name != node.name:
            log.debug("renaming node %r to %r", node.name, name)
            node.name = name
        seen.add(name)


def plan_only(toolkit: PluginHost, model: Any, *, target: str = "cpu", **overrides: Any) -> tuple[QuantPlan, QuantConfig, onnx.ModelProto]:
    """The plan ``quantize`` would start from, without data (``ortq info``)."""
    p = _prepare(toolkit, model, target, overrides)
    return make_plan(toolkit, GraphIndex(p.model), p.config, p.backend), p.config, p.model


@dataclass
class CalibrationJob:
    """What calibrating a model for a target and options observes, resolved once by the caller.

    Everything a calibration worker needs, and nothing it must not redo: the prepared model (plain
    protobuf, so it can be serialized once and shipped to workers), the tensors to observe and the
    calibrator that reduces them. Its statistics, merged, are exactly those of one :func:`calibrate` run.
    """

    model: onnx.ModelProto
    tensors: list[str]
    calibrator: str
    calibrator_options: dict[str, Any]
    fingerprint: str
    graph_name: str

    def state(self, result: Any) -> CalibrationState:
        """A :class:`CalibrationState` holding one calibration result of this job."""
        return CalibrationState(
            self.fingerprint, self.calibrator, result.statistics, result.samples, result.batches, self.graph_name
        )


def calibration_job(
    toolkit: PluginHost, model: str | Path | onnx.ModelProto, *, target: str = "cpu", **overrides: Any
) -> CalibrationJob:
    """Prepare and plan ``model`` as :func:`calibrate` does, without reading any data."""
    p = _prepare(toolkit, model, target, overrides, fingerprint=True, refuse_qdq=True)
    toolkit.calibrator(p.config.calibrator, **p.config.calibrator_options)  # unknown names fail here, not on a worker
    index = GraphIndex(p.model)
    plan = make_plan(toolkit, index, p.config, p.backend)
    observed = plan.observed_tensors()
    return CalibrationJob(
        p.model, observed + _extra_observed(p.backend, p.model, index, observed), p.config.calibrator,
        dict(p.config.calibrator_options),
        p.fingerprint, p.model.graph.name,
    )


def calibrate(
    toolkit: PluginHost,
    model: str | Path | onnx.ModelProto,
    calibration_data: Any,
    *,
    target: str = "cpu",
    batch_size: int | None = None,
    max_samples: int | None = None,
    image_options: Any = None,
    providers: Sequence[Any] | None = None,
    session_options: Any = None,
    progress: Callable[[int], None] | None = None,
    **overrides: Any,
) -> CalibrationState:
    """Observe the tensors that quantizing for ``target`` with these options needs; return the statistics.

    The state can be saved, merged with other shards, and passed to :func:`quantize` as
    ``calibration_state`` to quantize without running the model again.
    """
    job = calibration_job(toolkit, model, target=target, **overrides)
    result = run_calibration(
        job.model, GraphIndex(job.model), job.tensors, toolkit.calibrator(job.calibrator, **job.calibrator_options),
        iter_batches(calibration_data, model_inputs(job.model), batch_size, max_samples, image_options),
        providers=providers, session_options=session_options, progress=progress,
    )
    return job.state(result)


def _state_statistics(
    toolkit: PluginHost, state: CalibrationState | str | Path, p: _Prepared, observed: list[str]
) -> CalibrationState:
    if not isinstance(state, CalibrationState):
        state = CalibrationState.load(state, toolkit.statistic_types())
    if state.fingerprint != p.fingerprint:
        raise CalibrationError(
            f"{p.label}: the calibration state was computed for a different model (its fingerprint differs)"
        )
    missing = [t for t in observed if t not in state.statistics]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CalibrationError(
            f"{p.label}: the calibration state has no statistics for tensor(s) {missing[:5]}{more}; it was made for "
            "other quantization options (target, op types, nodes): calibrate again with the options used here"
        )
    return state


def quantize(
    toolkit: PluginHost,
    model: str | Path | onnx.ModelProto,
    output: str | Path | None = None,
    *,
    calibration_data: Any = None,
    calibration_state: CalibrationState | str | Path | None = None,
    target: str = "cpu",
    batch_size: int | None = None,
    max_samples: int | None = None,
    image_options: Any = None,
    providers: Sequence[Any] | None = None,
    session_options: Any = None,
    progress: Callable[[int], None] | None = None,
    verify: bool = True,
    verify_samples: int = 64,
    verify_progress: Callable[[int], None] | None = None,
    verification_data: Any = None,
    tensor_overrides: Mapping[str, Any] | str | Path | None = None,
    external_data: bool | None = None,
    **overrides: Any,
) -> QuantizationResult:
    """Statically quantize ``model`` to the QDQ format for ``target`` and optionally write it to ``output``.

    Ranges come from running ``calibration_data`` through the model, or from a saved ``calibration_state``
    (see :func:`calibrate`); with a state, the calibrator defaults to the one that made it.
    ``image_options`` (:class:`ortq.ImageOptions`) says how a folder of images becomes the input.
    ``session_options`` is used for the calibration session (ortq adds its observer library and
    priority-based execution order to it).

    Scheme options (``activation_type``, ``weight_type``, ``activation_symmetric``, ``weight_symmetric``,
    ``per_channel``, ``reduce_range``, ``quantize_bias``, ``op_types_to_quantize``, ``nodes_to_quantize``,
    ``nodes_to_exclude``, ``calibrate_method``, ``calibrator_options``, ``extreme_range``, ...) default to
    what the target backend prefers. The input model is never modified; the output is written atomically.

    Verification compares with the float model on the first ``verify_samples`` calibration samples; when
    the ranges come from a state, give ``verification_data`` (any calibration data source) to verify too.
    ``progress`` and ``verify_progress`` get the sample count of each calibration and verification batch.

    ``tensor_overrides`` (a dict in ONNX Runtime's ``TensorQuantOverrides`` format, or a JSON file) gives
    per-tensor types, ranges, or exact scales and zero points; see :mod:`ortq.tensor_overrides`. A model
    that already holds QuantizeLinear/DequantizeLinear is refused: see :func:`ortq.tools.qat.quantize_qat`.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if calibration_state is not None and calibration_data is not None:
        raise ConfigError("give calibration_data or calibration_state, not both")
    out = check_output_path(output) if output is not None else None
    inputs = {"model": model, "calibration data": calibration_data, "calibration state": calibration_state,
              "verification data": verification_data, "tensor overrides": tensor_overrides}
    refuse_overwriting_inputs([out], inputs, models=[model])
    given = TensorOverrides.load(tensor_overrides)
    p = _prepare(
        toolkit, model, target, overrides, fingerprint=calibration_state is not None, min_opset=given.required_opset,
        refuse_qdq=True,
    )
    backend, config, proto, label = p.backend, p.config, p.model, p.label
    state = None
    if calibration_state is not None:
        state = calibration_state
        if not isinstance(state, CalibrationState):
            state = CalibrationState.load(state, toolkit.statistic_types())
        if overrides.get("calibrate_method") is None:
            config.calibrator = state.calibrator
    calibrator = toolkit.calibrator(config.calibrator, **config.calibrator_options)
    if config.smooth_quant:  # a first pass over the data; planning and calibration then see the smoothed model
        _smooth(proto, config, calibration_data, state, label, timings, providers, session_options,
                lambda: iter_batches(calibration_data, model_inputs(proto), batch_size, max_samples, image_options))
    index = GraphIndex(proto)
    plan = make_plan(toolkit, index, config, backend)
    given.apply(plan, index, config, backend, label)
    _check_plan(backend, plan, proto)  # a target that cannot run the model says so before calibration
    observed = given.observed(plan)
    extra = _extra_observed(backend, proto, index, observed)
    corrections = layer_statistics(config, index, plan, observed) if state is None else None
    timings["plan"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    kept_feeds: list[dict[str, np.ndarray]] = []
    kept_outputs: list[dict[str, np.ndarray]] = []
    if state is not None:
        state = _state_statistics(toolkit, state, p, observed)
        statistics, n_batches, n_samples = state.statistics, state.batches, state.samples
        if verify and verification_data is not None:
            kept_feeds, kept_outputs = run_outputs(make_session(proto, providers), _first_samples(
                iter_batches(verification_data, model_inputs(proto), batch_size, None, image_options), verify_samples
            ))
    elif calibration_data is None and given:  # every observed tensor must then have given parameters
        given.require_data(observed)
        statistics, n_batches, n_samples = {}, 0, 0
    else:
        batches = iter_batches(calibration_data, model_inputs(proto), batch_size, max_samples, image_options)
        calibration = run_calibration(
            proto, index, observed + extra, calibrator, batches, providers=providers,
            session_options=session_options, progress=progress, keep_samples=verify_samples if verify else 0,
            extra_updates=corrections.updates() if corrections is not None else None,
        )
        statistics, n_batches, n_samples = calibration.statistics, calibration.batches, calibration.samples
        kept_feeds, kept_outputs = calibration.kept_feeds, calibration.kept_outputs
    calibrator.set_tail_sensitive(tail_sensitive_tensors(index))  # logits, Softmax inputs: keep their maximum
    ranges = _ranges(calibrator, statistics, plan, observed)
    extra_ranges = _extra_ranges(calibrator, statistics, extra, config, label)
    given.adjust_ranges(ranges)
    timings["calibrate"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    vetoes: dict[str, str] = {}
    for _ in range(_MAX_REPLANS):
        _add_implied_ranges(plan, ranges)
        params, new_vetoes = compute_params(plan, index, ranges, config)
        new_vetoes = {k: v for k, v in new_vetoes.items() if k not in vetoes}
        given.pin(plan, params, new_vetoes)
        if not new_vetoes:
            break
        for tensor, reason in new_vetoes.items():
            log.warning("%s: tensor %r stays float: %s", label, tensor, reason)
        vetoes.update(new_vetoes)
        plan = make_plan(toolkit, index, config, backend, vetoed=vetoes)
        given.apply(plan, index, config, backend, label, strict=False)
    else:
        raise ModelError(f"{label}: quantization plan did not settle after {_MAX_REPLANS} rounds of vetoes")
    apply_corrections(corrections, config, index, plan, params, label)  # weights, then biases: scales are final
    rewrite_qdq(proto, index, plan, params, bias_params(plan, params, index))
    if config.quant_format == "qoperator":
        convert_to_qoperator(proto, toolkit)  # logs each node left in QDQ form and why
    if config.qdq_contrib_ops:
        use_contrib_qdq(proto)
    proto = p.model = _compact(proto)
    del index  # it indexes the float graph's message, which _compact lets go
    timings["rewrite"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    report = verify_model(proto, kept_feeds, kept_outputs, providers, verify_progress) if verify else VerificationReport()
    low = report.min_sqnr_db
    if low is not None and low < LOW_SQNR_DB:
        log.warning(
            "%s: the quantized model's output SQNR is only %.1f dB on %d calibration sample(s); it may be "
            "unusable. Try per-channel weights, 16-bit activations, or excluding sensitive nodes.",
            label, low, report.samples,
        )
    timings["verify"] = time.perf_counter() - t3
    result = QuantizationResult(
        model=proto, output=out, target=backend.name, config=config, plan=plan,
        ranges={**extra_ranges, **ranges}, params=params,  # the backend's extra tensors too (TensorRT tables)
        vetoes=vetoes, calibration_batches=n_batches, calibration_samples=n_samples,
        verification=report, float_bytes=p.float_bytes, quantized_bytes=model_size(proto), seconds=timings,
    )
    if out is not None:
        # Written under temporary names (with external data if the input had it or it is over 2 GB), renamed
        # into place only once the backend's export succeeded too; nothing is left behind on failure.
        with staged_save(proto, out, external_data=external_data or p.external_data or None, protect=p.external_files):
            inputs["external data"] = p.external_files
            result.artifacts = _export_staged(backend, result, out.parent, inputs)
    return result


def _smooth(
    proto: onnx.ModelProto, config: QuantConfig, data: Any, state: Any, label: str, timings: dict[str, float],
    providers: Sequence[Any] | None, session_options: Any, batches: Callable[[], Iterable[dict[str, np.ndarray]]],
) -> None:
    """SmoothQuant before planning: it reads the calibration data once more, so it needs data that can be
    read twice (arrays, files, folders, lists, a reader with ``rewind``), not a one-shot iterator."""
    if state is not None or data is None:
        log.info("%s: SmoothQuant needs calibration data (a saved state has no channel statistics); skipped", label)
        return
    one_shot = isinstance(data, Iterator) or (hasattr(data, "get_next") and not callable(getattr(data, "rewind", None)))
    if one_shot:
        raise ConfigError(
            f"smooth_quant reads the calibration data twice, and a {type(data).__name__} can be read only once: "
            "pass arrays, a file or folder, a list of feeds, or a reader with rewind()"
        )
    t = time.perf_counter()
    smooth_quant(proto, config, batches(), label=label, alpha=config.smooth_quant_alpha,
                 providers=providers, session_options=session_options)
    if hasattr(data, "get_next"):
        data.rewind()
    timings["smooth_quant"] = time.perf_counter() - t


def _check_plan(backend: Backend, plan: QuantPlan, model: onnx.ModelProto) -> None:
    try:
        backend.check_plan(plan, model)
    except OrtqError:
        raise
    except Exception as exc:
        raise PluginError(f"backend {backend.name!r} failed to check the plan: {exc!r}") from exc


def _first_samples(batches: Iterable[dict[str, np.ndarray]], samples: int) -> Iterator[dict[str, np.ndarray]]:
    """The batches that hold the first ``samples`` samples (as calibration keeps them for verification)."""
    seen = 0
    for feed in batches:
        if seen >= samples:
            return
        yield feed
        seen += feed_samples(feed)


def _export_staged(
    backend: Backend, result: QuantizationResult, out_dir: Path, inputs: Mapping[str, Any] | None = None
) -> list[Path]:
    """The backend writes into a private folder beside the output; what it returns is moved into place only
    once it has returned, so a backend that writes a file and then fails leaves nothing behind. No artifact
    may replace one of ``inputs`` (checked for all before the first is moved)."""
    with tempfile.TemporaryDirectory(prefix=".ortq-export-", dir=out_dir) as staging:
        try:
            written = [Path(path) for path in backend.export(result, Path(staging))]
        except OrtqError:
            raise
        except Exception as exc:
            raise PluginError(f"backend {backend.name!r} failed to export: {exc!r}") from exc
        final = []
        for path in written:
            try:
                relative = path.resolve().relative_to(Path(staging).resolve())
            except ValueError:
                raise PluginError(
                    f"backend {backend.name!r} returned {str(path)!r}, outside the folder it was given to write in"
                ) from None
            final.append(out_dir / relative)
        refuse_overwriting_inputs(final, inputs or {})
        for path, target in zip(written, final):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    return final


def quantize_dynamic(
    toolkit: PluginHost,
    model: str | Path | onnx.ModelProto,
    output: str | Path | None = None,
    *,
    op_types_to_quantize: Sequence[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = False,
    weight_type: Any = "int8",
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] | None = None,
    verify_data: Any = None,
    batch_size: int | None = None,
    max_samples: int | None = 64,
    providers: Sequence[Any] | None = None,
    external_data: bool | None = None,
) -> QuantizationResult:
    """Dynamically quantize ``model``: weights to symmetric ``weight_type`` offline, activations at run time.

    MatMul (constant 2-D weight) and Gemm become ``com.microsoft.DynamicQuantizeMatMul``; Conv becomes
    DynamicQuantizeLinear -> ConvInteger -> rescale, but only when named in ``op_types_to_quantize``
    (ONNX Runtime's ConvInteger is slower than float Conv; see :mod:`ortq.rewrite_dynamic`). An LSTM with
    constant W and R becomes ``com.microsoft.DynamicQuantizeLSTM`` (per direction, or per gate column with
    ``per_channel``); embedding Gathers read an int8 table. No calibration data is needed; ``verify_data``
    (any calibration-data source) is only used to compare outputs with the float model. The model is always
    checked (onnx.checker full check and an ONNX Runtime load).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out = check_output_path(output) if output is not None else None
    refuse_overwriting_inputs([out], {"model": model, "verification data": verify_data}, models=[model])
    requested = frozenset(op_types_to_quantize) if op_types_to_quantize else DEFAULT_DYNAMIC_OP_TYPES
    unsupported = requested - DYNAMIC_OP_TYPES
    if unsupported:
        log.warning("dynamic quantization rewrites only %s; ignoring %s", sorted(DYNAMIC_OP_TYPES), sorted(unsupported))
    op_types = requested & DYNAMIC_OP_TYPES
    if not op_types:
        raise ConfigError(f"op_types_to_quantize selects none of {sorted(DYNAMIC_OP_TYPES)}")
    overrides: dict[str, Any] = {
        "weight_type": weight_type, "weight_symmetric": True, "per_channel": bool(per_channel),
        "reduce_range": bool(reduce_range), "op_types_to_quantize": sorted(op_types), "quantize_bias": False,
        "matmul_const_b_only": True, "nodes_to_quantize": list(nodes_to_quantize) if nodes_to_quantize else None,
        "nodes_to_exclude": list(nodes_to_exclude) if nodes_to_exclude else None,
    }
    p = _prepare(toolkit, model, "cpu", overrides)
    backend, config, proto, label = p.backend, p.config, p.model, p.label
    if model_opset(proto) < 11 and "Conv" in op_types:  # DynamicQuantizeLinear
        proto = upgrade_opset(proto, 11, label)
    index = GraphIndex(proto)
    plan = make_plan(toolkit, index, config, backend)
    timings["plan"] = time.perf_counter() - t0

    feeds: list[dict[str, np.ndarray]] = []
    reference: list[dict[str, np.ndarray]] = []
    t1 = time.perf_counter()
    if verify_data is not None:
        batches = iter_batches(verify_data, model_inputs(proto), batch_size, max_samples)
        feeds, reference = run_outputs(make_session(proto, providers), batches)
    timings["reference"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    params, kept = rewrite_dynamic(proto, index, plan, config)
    for name, reason in kept.items():
        log.info("%s: node %r stays float: %s", label, name, reason)
        plan.float_nodes.append(FloatNode(name, plan.quantized_nodes.pop(name, ""), reason))
    proto = p.model = _compact(proto)
    del index
    timings["rewrite"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    report = verify_model(proto, feeds, reference, providers)
    low = report.min_sqnr_db
    if low is not None and low < LOW_SQNR_DB:
        log.warning("%s: the dynamically quantized model's output SQNR is only %.1f dB", label, low)
    timings["verify"] = time.perf_counter() - t3
    result = QuantizationResult(
        model=proto, output=out, target=backend.name, config=config, plan=plan, ranges={}, params=params,
        vetoes={}, calibration_batches=0, calibration_samples=0, verification=report,
        float_bytes=p.float_bytes, quantized_bytes=model_size(proto), seconds=timings, dynamic=True,
    )
    if out is not None:
        with staged_save(proto, out, external_data=external_data or p.external_data or None, protect=p.external_files):
            pass
    return result


#: The options that choose the scheme and what is observed (everything ``_prepare`` resolves into a config).
SCHEME_OPTIONS = {
    "activation_type", "weight_type", "activation_symmetric", "weight_symmetric", "per_channel", "reduce_range",
    "quantize_bias", "matmul_const_b_only", "op_types_to_quantize", "nodes_to_quantize", "nodes_to_exclude",
    "op_types_no_output_quantization", "calibrate_method", "calibrator_options", "extreme_range", "backend_options",
    "bias_correction", "weight_rounding", "equalize", "smooth_quant", "smooth_quant_alpha",
    "quant_format", *PASS_THROUGH_OPTIONS,
}
def _compact(model: onnx.ModelProto) -> onnx.ModelProto:
    """A fresh copy that holds only what the rewritten graph still uses.

    The protobuf runtime keeps the memory of every float weight the rewrite removed for as long as the message
    lives; copying the quantized model (a quarter of the float weights) and dropping the original returns it,
    which keeps the peak of quantizing a large model near its calibration stage.
    """
    compact = onnx.ModelProto()
    compact.CopyFrom(model)
    return compact


def _add_implied_ranges(plan: QuantPlan, ranges: dict[str, tuple[float, float]]) -> None:
    """Record ranges the plan implies without observing: a fixed output range (Softmax), or a data-movement
    output's source range, which contains it. A re-plan that turns such a tensor into a calibrated
    activation (because a veto sent its producer back to float) then needs no second pass over the data.
    """
    for name, tp in plan.tensors.items():
        if name in ranges:
            continue
        if isinstance(tp.role, Activation) and tp.role.fixed_range is not None:
            ranges[name] = tp.role.fixed_range
        elif isinstance(tp.role, SameAs) and tp.source in ranges:
            ranges[name] = ranges[tp.source]


def _extra_observed(backend: Backend, model: onnx.ModelProto, index: GraphIndex, observed: list[str]) -> list[str]:
    """The backend's extra tensors (:meth:`Backend.extra_observed_tensors`) that the plan does not observe
    already and that calibration can observe (non-constant float tensors of the graph)."""
    wanted = backend.extra_observed_tensors(model)
    if not wanted:
        return []
    seen = set(observed)
    extra = []
    for name in wanted:
        if name in seen or not name or index.is_constant(name) or not index.is_float(name):
            continue
        seen.add(name)
        extra.append(name)
    return extra


def _extra_ranges(
    calibrator, statistics, extra: list[str], config: QuantConfig, label: str  # noqa: ANN001
) -> dict[str, tuple[float, float]]:
    """Ranges of the backend's extra tensors, computed like an activation's. A calibration state made
    without them lacks them: the backend then gets ranges for the plan's tensors only (with a warning)."""
    missing = [t for t in extra if t not in statistics]
    if missing:
        log.warning("%s: no statistics for %d tensor(s) the target asked to observe, e.g. %r", label, len(missing), missing[0])
    ranges = {}
    for name in extra:
        if name in statistics:
            lo, hi = calibrator.compute_range(name, statistics[name], config.activation)
            ranges[name] = (float(lo), float(hi))
    return ranges


def _ranges(calibrator, statistics, plan: QuantPlan, observed: list[str]) -> dict[str, tuple[float, float]]:  # noqa: ANN001
    ranges = {}
    for name in observed:
        stat = statistics[name]
        spec = plan.tensors[name].spec
        lo, hi = calibrator.compute_range(name, stat, spec)
        ranges[name] = (float(lo), float(hi))
    return ranges


