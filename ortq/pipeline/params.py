"""Stage 3b: turn calibrated ranges and constant values into scales and zero points.

A range that cannot be quantized usefully (not finite, or wider than ``config.extreme_range``, as with an
attention mask filled with -1e9 or -3.4e38) is returned as a veto instead of parameters; the pipeline
re-plans with the veto so every node touching that tensor stays float, and logs why. The same holds for
the output of a join (Concat) whose inputs' calibrated ranges are too different to share its one scale
(:func:`mismatched_joins`: a detector's boxes in pixels joined with 0-1 class scores).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ortq.core.errors import ModelError
from ortq.core.op_quantizer import Activation, Bias, SameAs, Weight
from ortq.core.scheme import QuantParams, QuantSpec, QuantType, is_power_of_two, params_from_range

if TYPE_CHECKING:
    from ortq.core.config import QuantConfig
    from ortq.core.graph import GraphIndex
    from ortq.pipeline.plan import QuantPlan

__all__ = ["compute_params", "bias_params", "tail_sensitive_tensors", "mismatched_joins", "MIN_JOIN_STEPS"]

log = logging.getLogger(__name__)

#: Ops whose result is decided by the largest values of their (first) input.
_MAX_SENSITIVE = frozenset({"Softmax", "LogSoftmax", "ArgMax", "TopK", "ReduceMax", "Hardmax"})
#: Ops that move values without changing them: a tensor before them is as sensitive as the one after.
_DATA_MOVEMENT = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Slice", "Gather", "Split",
    "Concat", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Pad",
})


def tail_sensitive_tensors(index: GraphIndex) -> set[str]:
    """Tensors whose maximum must not be clipped: graph outputs and inputs of max-deciding ops (logits, attention
    scores), and every tensor that reaches one of them through data movement only.

    Clipping calibrators save squared error by cutting the rare largest values; there those are the winning
    class or the attended position, and what is cut cannot be told apart afterwards. The low end of such a
    tensor may still be clipped: a very negative logit or masked score loses nothing by it.
    """
    sensitive = set(index.graph_outputs)
    for node in index.graph.node:
        if node.op_type in _MAX_SENSITIVE and node.input and node.input[0]:
            sensitive.add(node.input[0])
    stack = list(sensitive)
    while stack:
        producer = index.producer.get(stack.pop())
        if producer is None or producer.op_type not in _DATA_MOVEMENT:
            continue
        for name in producer.input[:1] if producer.op_type != "Concat" else producer.input:
            if name and name not in sensitive and not index.is_constant(name):
                sensitive.add(name)
                stack.append(name)
    return sensitive


def compute_params(
    plan: QuantPlan,
    index: GraphIndex,
    ranges: dict[str, tuple[float, float]],
    config: QuantConfig,
) -> tuple[dict[str, QuantParams], dict[str, str]]:
    """Parameters for every planned tensor except biases (see :func:`bias_params`), and the vetoes."""
    params: dict[str, QuantParams] = {}
    vetoes: dict[str, str] = {}
    for name, tp in plan.tensors.items():
        if isinstance(tp.role, Activation):
            if tp.role.fixed_range is not None:
                lo, hi = tp.role.fixed_range
            elif tp.constant:
                values = index.constant_value(name)
                _check_finite(values, name, tp.node)
                lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
            elif name not in ranges:
                vetoes[name] = "was not calibrated"
                continue
            else:
                lo, hi = ranges[name]
            problem = _range_problem(lo, hi, config.extreme_range)
            if problem:
                vetoes[name] = problem
                continue
            lo, hi = widen_to_min_range(lo, hi, config.min_real_range)
            if config.activation_restricted_asymmetric and not tp.spec.symmetric and tp.spec.qtype is QuantType.UINT8:
                params[name] = restricted_asymmetric_params(lo, hi, tp.spec)
            else:
                params[name] = params_from_range(lo, hi, tp.spec)
        elif isinstance(tp.role, Weight):
            values = index.constant_value(name)
            _check_finite(values, name, tp.node)
            params[name] = weight_params(values, tp.spec, name, min_real_range=config.min_real_range)
    _limit_average_requantization(plan, index, params)
    for name, reason in mismatched_joins(plan, index, ranges, params).items():
        del params[name]
        vetoes[name] = reason
    for name, tp in plan.tensors.items():
        if isinstance(tp.role, SameAs):
            source = _resolve(plan, name)
            if source in params:
                src = params[source]
                params[name] = QuantParams(src.scale, src.zero_point, src.qtype, src.axis, source=source)
            else:
                vetoes[name] = f"copies the parameters of {source!r}, which {vetoes.get(source, 'has none')}"
    for name, tp in plan.tensors.items():
        if isinstance(tp.role, Bias):
            if ranges.get(tp.bias_input or "") == (0.0, 0.0) and np.any(index.constant_value(name)):
                # Its input's scale is an arbitrary 1 (nothing to measure), so an int32 bias at
                # 1 x weight scale would round the bias, which is then the node's whole output, to a few steps.
                vetoes[name] = (
                    f"its input {tp.bias_input!r} is constant zero on the calibration data, so the node's output "
                    "is its bias, which an int32 bias at that input's scale cannot represent"
                )
                continue
            _fit_bias_in_int32(name, tp, index, params)
            problem = _bias_rounding_problem(name, tp, plan, index, params)
            if problem:
                vetoes[name] = problem
    for name, p in params.items():
        if index.float_dtype(name) == np.float16:
            params[name] = _float16_exact(p)
    return params, vetoes


#: An average's output scale may be at most this much finer than its input's (see below).
_MAX_AVERAGE_REFINEMENT = 128.0
_AVERAGES = frozenset({"GlobalAveragePool", "AveragePool"})


def _limit_average_requantization(plan: QuantPlan, index: GraphIndex, params: dict[str, QuantParams]) -> None:
    """Keep an average's output scale no finer than input scale / (128 x the number of values averaged).

    ONNX Runtime's QLinearGlobalAveragePool refuses input scale / (output scale x pixels) >= 256 at run
    time ("parameter out of computation range"); a nearly constant average (a constant input channel, zero
    weights upstream) calibrates to such a tiny output scale. Steps that fine carry no information the 8-bit
    input could have given, so the output range is widened (zero point kept). Unknown sizes count as 1.
    """
    for name, tp in plan.tensors.items():
        producer = index.producer.get(name)
        if name not in params or producer is None or producer.op_type not in _AVERAGES or not producer.input:
            continue
        source = producer.input[0]
        if source in plan.tensors:
            source = _resolve(plan, source)
        x, y = params.get(source), params[name]
        if x is None or x.per_channel or y.per_channel:
            continue
        floor = float(x.scale) / (_MAX_AVERAGE_REFINEMENT * _values_averaged(producer, index))
        if float(y.scale) >= floor:
            continue
        scale = np.float32(floor)
        params[name] = QuantParams(scale, y.zero_point, y.qtype, y.axis, source="limited by its input's scale")


#: Ops that join several tensors into one output, which then has a single scale for all of them.
_JOINS = frozenset({"Concat"})
#: A joined input whose calibrated span covers fewer steps of the output's scale than this keeps the join
#: float (in 8 bits: inputs whose ranges differ by more than ~16x). Measured on the real-model suite
#: (benchmarks/accuracy, docs/accuracy.md "Joins of mismatched ranges"): every Concat inside YOLOv8n's
#: backbone, neck and head joins ranges within 1.9x of each other (>= 134 steps each); its output Concat joins
#: box coordinates (0-322 px) with class probabilities (0-0.85), which get 0.7 of a step: every score rounds
#: to 0 or one step (1.27) and box F1 against the float model falls from 1 to 0.19. 16 steps (4 bits) sits
#: far from both: an input that coarse has already lost 24 dB to the shared scale.
MIN_JOIN_STEPS = 16.0


def mismatched_joins(
    plan: QuantPlan,
    index: GraphIndex,
    ranges: dict[str, tuple[float, float]],
    params: dict[str, QuantParams],
) -> dict[str, str]:
    """Outputs of joins (Concat) whose inputs' calibrated ranges are too different to share one scale, each
    with the reason it must stay float.

    A quantized Concat has one output scale, set by its widest input; an input whose values span only a few
    of those steps is rounded to nearly nothing (the case of a detector's last Concat of pixel boxes and 0-1
    class scores, which ONNX Runtime's quantizer and a naive per-tensor scheme both destroy). Keeping the
    join float costs no integer kernel (a Concat moves data; its inputs keep their own, fine scales), while
    a per-model exclusion list would have to be found by hand for every such model. The decision uses only
    the calibrated ranges, so it applies to any model and any calibrator.
    """
    mismatched: dict[str, str] = {}
    for node in index.graph.node:
        if node.op_type not in _JOINS or not node.output or node.output[0] not in params:
            continue
        out = params[node.output[0]]
        if out.per_channel:
            continue
        step = float(out.scale)
        spans = []
        for name in node.input:
            span = _span(name, index, ranges)
            if span is not None and span[1] > span[0]:
                spans.append((span[1] - span[0], name, span))
        if len(spans) < 2:
            continue
        width, narrow, (lo, hi) = min(spans)
        wide_width, wide, (wlo, whi) = max(spans)
        steps = width / step
        if steps >= MIN_JOIN_STEPS:
            continue
        mismatched[node.output[0]] = (
            f"{node.op_type} {node.name!r} joins inputs whose calibrated ranges differ {wide_width / width:.0f}x "
            f"({narrow!r} spans [{lo:.4g}, {hi:.4g}], {wide!r} [{wlo:.4g}, {whi:.4g}]): one "
            f"{out.qtype.bits}-bit output scale would leave {narrow!r} {steps:.2g} step(s) "
            f"(fewer than {MIN_JOIN_STEPS:g}), so the join stays float"
        )
    return mismatched


def _span(name: str, index: GraphIndex, ranges: dict[str, tuple[float, float]]) -> tuple[float, float] | None:
    if name in ranges:
        return float(ranges[name][0]), float(ranges[name][1])
    if name and index.is_constant(name) and index.is_float(name):
        values = index.constant_value(name)
        if values is not None and values.size and np.all(np.isfinite(values)):
            return float(values.min()), float(values.max())
    return None


def _values_averaged(node, index: GraphIndex) -> int:  # noqa: ANN001
    if node.op_type == "AveragePool":
        dims = list(index.attribute(node, "kernel_shape", []) or [])
    else:
        dims = (index.shape(node.input[0]) or [])[2:]
    return int(np.prod(dims)) if dims and all(isinstance(d, int) and d > 0 for d in dims) else 1


def _float16_exact(p: QuantParams) -> QuantParams:
    """A float16 tensor's Q/DQ take float16 scales: use exactly the values the model will store.

    Scales are kept at or above float16's smallest subnormal so none rounds to zero.
    """
    scale = np.maximum(p.scale, np.float32(2.0**-24)).astype(np.float16).astype(np.float32)
    return QuantParams(scale, p.zero_point, p.qtype, p.axis, source=p.source)


_INT32_MAX = float(np.iinfo(np.int32).max)


def _bias_rounding_problem(name: str, tp, plan: QuantPlan, index: GraphIndex,  # noqa: ANN001
                           params: dict[str, QuantParams]) -> str | None:
    """Why the int32 bias would cost more than one step of the node's quantized output, or None.

    The bias step is input scale x weight scale, normally far finer than the output's step. When the node's
    output hardly depends on its input (a kernel that only ever reads padding, weights that cancel), the
    output is mostly bias while the input's range still sets that step: the bias then rounds away (a whole
    output lost, 0 dB), and only a float node keeps it.
    """
    x, w = params.get(tp.bias_input or ""), params.get(tp.bias_weight or "")
    bias = index.constant_value(name)
    node = next((n for n in index.consumers.get(name, []) if n.name == tp.node), None)
    if x is None or w is None or x.per_channel or bias is None or not bias.size or node is None:
        return None
    output = node.output[0]
    if output not in params and output in plan.folded:  # the fused activation's output carries the Q
        fused = next((n for n in index.consumers.get(output, []) if n.name == plan.folded[output]), None)
        output = fused.output[0] if fused is not None else output
    y = params.get(output)
    if y is None or y.per_channel:
        return None
    step = (x.scale.astype(np.float64) * w.scale.astype(np.float64)).reshape(-1)
    values = bias.astype(np.float64).reshape(-1)
    step = np.broadcast_to(step, values.shape) if step.size in (1, values.size) else None
    if step is None:
        return None
    error = float(np.max(np.abs(values - np.rint(values / step) * step)))
    if error <= float(y.scale):
        return None
    return (
        f"rounding it to its int32 step (input scale x weight scale, up to {float(step.max()):.3g}) moves the "
        f"output {output!r} by {error:.3g}, more than one of that output's steps ({float(y.scale):.3g})"
    )


def _fit_bias_in_int32(name: str, tp, index: GraphIndex, params: dict[str, QuantParams]) -> None:  # noqa: ANN001
    """Choose the weight's scale so that the int32 bias (scale = input scale x weight scale) is exact and fits.

    - Where the weight is all zero (a pruned channel, or a whole zero weight), any scale quantizes it exactly,
      but the scale of 1 it got from its empty range would make the bias's scale the input's: a bias far
      below one input step is lost. Such channels get a scale that keeps the bias to about 24 bits.
    - Where bias / (input scale x weight scale) would not fit, the weight's scale is widened. Clipping the
      bias instead would shift every output of that channel (a 16-bit weight with a large bias lost 45 dB
      that way); a coarser weight scale costs far less. The bias must leave room for the accumulation
      ``bias + sum(x_q * w_q)`` in the kernel's int32 accumulator: a bias at the very top of int32 wraps
      around as soon as the products are added (a Gemm's output changed sign that way).
    """
    x, w = params.get(tp.bias_input or ""), params.get(tp.bias_weight or "")
    bias = index.constant_value(name)
    weight = index.constant_value(tp.bias_weight or "")
    if x is None or w is None or x.per_channel or bias is None or not bias.size or weight is None:
        return
    current = w.scale.astype(np.float64).reshape(-1)
    if w.per_channel and bias.size != current.size:
        return
    abs_bias = np.abs(bias.astype(np.float64)).reshape(-1)
    # Worst-case accumulation per output: K products of a full-range input step and a full-range weight.
    k = max(weight.size // bias.size, 1)
    x_info, w_info = np.iinfo(x.qtype.numpy_dtype), np.iinfo(w.qtype.numpy_dtype)
    headroom = k * float(x_info.max - x_info.min) * float(max(-int(w_info.min), int(w_info.max)))
    limit = max(_INT32_MAX - headroom, 2.0**30)  # beyond that the accumulator itself may overflow, bias or not
    if w.per_channel:
        axis = w.axis % weight.ndim
        zero = ~np.any(weight != 0, axis=tuple(a for a in range(weight.ndim) if a != axis)).reshape(-1)
        bias_mag = abs_bias
    else:
        zero = np.array([not np.any(weight != 0)])
        bias_mag = np.array([abs_bias.max()])
    scale = current.copy()
    fine = bias_mag / (float(x.scale) * 2.0**24)
    shrink = zero & (bias_mag > 0) & (fine < current)
    scale[shrink] = np.maximum(fine[shrink], np.finfo(np.float32).tiny)
    needed = (abs_bias if w.per_channel else np.array([abs_bias.max()])) / (float(x.scale) * limit)
    factor = np.maximum(needed / scale, 1.0)
    if np.all(factor <= 1.0) and not np.any(shrink):
        return
    if np.any(factor > 1.0):
        log.warning(
            "bias %r would overflow int32 at weight %r's scale; widening that scale by up to %.3gx",
            name, tp.bias_weight, float(np.max(factor)),
        )
    scale = np.where(factor > 1.0, scale * factor * (1 + 1e-6), scale).reshape(w.scale.shape)
    if is_power_of_two(w.scale):  # a shift-only target: stay on powers of two
        scale = np.exp2(np.ceil(np.log2(scale)))
    scale = scale.astype(np.float32)
    if w.qtype.signed and np.all(w.zero_point == 0):
        zero_point = w.zero_point
    else:  # keep real zero where it was: the zero point moves towards the middle as the scale grows
        old_zero = (w.zero_point.astype(np.float64) * current.reshape(w.scale.shape))
        qmin, qmax = np.iinfo(w.qtype.numpy_dtype).min, np.iinfo(w.qtype.numpy_dtype).max
        zero_point = np.clip(np.round(old_zero / scale), qmin, qmax)
    source = "widened for bias" if np.any(factor > 1.0) else "narrowed for the bias of a zero weight"
    params[tp.bias_weight] = QuantParams(scale, zero_point, w.qtype, w.axis, source=source)


def _resolve(plan: QuantPlan, name: str) -> str:
    seen = set()
    while isinstance(plan.tensors[name].role, SameAs) and name not in seen:
        seen.add(name)
        name = plan.tensors[name].source or name
        if name not in plan.tensors:
            break
    return name


def _range_problem(lo: float, hi: float, limit: float) -> str | None:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"its calibrated range [{lo}, {hi}] is not finite (NaN or Inf reached it)"
    if max(abs(lo), abs(hi)) > limit:
        return (
            f"its calibrated range [{lo:.4g}, {hi:.4g}] exceeds ±{limit:g}; an extreme fill value (such as an "
            "attention mask) would leave every other value at the zero point, so the nodes using it stay float"
        )
    return None


def _check_finite(values: np.ndarray | None, name: str, node: str) -> None:
    if values is None:
        raise ModelError(f"constant {name!r} of node {node!r} has no readable value")
    if values.dtype.kind == "f" and values.size and not np.all(np.isfinite(values)):
        raise ModelError(f"constant {name!r} of node {node!r} contains NaN or Inf")


def weight_params(values: np.ndarray, spec: QuantSpec, name: str, *, min_real_range: float | None = None) -> QuantParams:
    if spec.axis is not None and values.ndim > 0:
        axis = spec.axis % values.ndim
        reduce_axes = tuple(a for a in range(values.ndim) if a != axis)
        if values.size:
            lo, hi = values.min(axis=reduce_axes), values.max(axis=reduce_axes)
        else:
            lo = hi = np.zeros(values.shape[axis])
        lo, hi = widen_to_min_range(lo, hi, min_real_range)
        return params_from_range(lo, hi, spec.with_axis(axis))
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    lo, hi = widen_to_min_range(lo, hi, min_real_range)
    return params_from_range(lo, hi, spec.with_axis(None))


def widen_to_min_range(lo, hi, min_real_range: float | None):  # noqa: ANN001, ANN201 - floats or arrays
    """Raise ``hi`` so that ``hi - lo >= min_real_range`` (ONNX Runtime's ``MinimumRealRange``): a nearly
    constant tensor then gets a usable scale instead of one so fine that requantization loses precision."""
    if not min_real_range:
        return lo, hi
    hi = np.maximum(hi, np.asarray(lo, dtype=np.float64) + float(min_real_range))
    return lo, (float(hi) if np.ndim(hi) == 0 else hi)


def restricted_asymmetric_params(lo: float, hi: float, spec: QuantSpec) -> QuantParams:
    """uint8 parameters with the zero point snapped to 0 (range >= 0) or to the type's midpoint (range below
    zero), the scale widened so the range stays covered: ONNX Runtime's ``ActivationRestrictedAsymmetric``,
    for accelerators that accept only those two zero points."""
    qmin, qmax = spec.qtype.qrange(reduce_range=spec.reduce_range)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if lo >= 0.0:
        zero_point, scale = qmin, hi / float(qmax - qmin)
    else:
        zero_point = (qmin + qmax + 1) // 2
        scale = max(-lo / float(zero_point - qmin), hi / float(qmax - zero_point))
    scale = 1.0 if scale == 0 else max(scale, float(np.finfo(np.float32).tiny))
    return QuantParams(np.float32(scale), np.asarray(zero_point), spec.qtype, None)


def bias_params(
    plan: QuantPlan, params: dict[str, QuantParams], index: GraphIndex
) -> dict[str, tuple[np.ndarray, int | None]]:
    """int32 bias scales (input scale x weight scale, per output channel) for biases whose factors exist."""
    scales: dict[str, tuple[np.ndarray, int | None]] = {}
    for name, tp in plan.tensors.items():
        if not isinstance(tp.role, Bias):
            continue
        x, w = params.get(tp.bias_input or ""), params.get(tp.bias_weight or "")
        if x is None or w is None or x.per_channel:
            continue
        scale = (x.scale.astype(np.float64) * w.scale.astype(np.float64)).astype(np.float32)
        if index.float_dtype(name) == np.float16:
            scale = np.maximum(scale, np.float32(2.0**-24)).astype(np.float16).astype(np.float32)
        scales[name] = (scale, 0 if w.per_channel else None)
    return scales

