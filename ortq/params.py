"""Stage 3b: turn calibrated ranges and constant values into scales and zero points.

A range that cannot be quantized usefully (not finite, or wider than ``config.extreme_range``, as with an
attention mask filled with -1e9 or -3.4e38) is returned as a veto instead of parameters; the pipeline
re-plans with the veto so every node touching that tensor stays float, and logs why.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelError
from .op_quantizer import Activation, Bias, SameAs, Weight
from .scheme import QuantParams, QuantSpec, is_power_of_two, params_from_range

if TYPE_CHECKING:
    from .config import QuantConfig
    from .graph import GraphIndex
    from .planner import QuantPlan

__all__ = ["compute_params", "bias_params"]

log = logging.getLogger(__name__)

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
            params[name] = params_from_range(lo, hi, tp.spec)
        elif isinstance(tp.role, Weight):
            values = index.constant_value(name)
            _check_finite(values, name, tp.node)
            params[name] = _weight_params(values, tp.spec, name)
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
            _fit_bias_in_int32(name, tp, index, params)
    for name, p in params.items():
        if index.float_dtype(name) == np.float16:
            params[name] = _float16_exact(p)
    return params, vetoes


def _float16_exact(p: QuantParams) -> QuantParams:
    """A float16 tensor's Q/DQ take float16 scales: use exactly the values the model will store.

    Scales are kept at or above float16's smallest subnormal so none rounds to zero.
    """
    scale = np.maximum(p.scale, np.float32(2.0**-24)).astype(np.float16).astype(np.float32)
    return QuantParams(scale, p.zero_point, p.qtype, p.axis, source=p.source)


_INT32_MAX = float(np.iinfo(np.int32).max)


def _fit_bias_in_int32(name: str, tp, index: GraphIndex, params: dict[str, QuantParams]) -> None:  # noqa: ANN001
    """Widen a weight's scale where bias / (input scale x weight scale) would overflow int32.

    Clipping the bias instead would shift every output of that channel (a 16-bit weight with a large
    bias lost 45 dB that way); a coarser weight scale costs far less.
    """
    x, w = params.get(tp.bias_input or ""), params.get(tp.bias_weight or "")
    bias = index.constant_value(name)
    if x is None or w is None or x.per_channel or bias is None or not bias.size:
        return
    needed = np.abs(bias.astype(np.float64)).reshape(-1) / (float(x.scale) * _INT32_MAX)
    current = w.scale.astype(np.float64).reshape(-1)
    if w.per_channel and needed.size != current.size:
        return
    factor = np.maximum(needed / current, 1.0) if w.per_channel else max(float(needed.max() / current[0]), 1.0)
    if np.all(np.asarray(factor) <= 1.0):
        return
    log.warning(
        "bias %r would overflow int32 at weight %r's scale; widening that scale by up to %.3gx",
        name, tp.bias_weight, float(np.max(factor)),
    )
    scale = (current * factor * (1 + 1e-6)).reshape(w.scale.shape)
    if is_power_of_two(w.scale):  # a shift-only target: stay on powers of two
        scale = np.exp2(np.ceil(np.log2(scale)))
    scale = scale.astype(np.float32)
    if w.qtype.signed and np.all(w.zero_point == 0):
        zero_point = w.zero_point
    else:  # keep real zero where it was: the zero point moves towards the middle as the scale grows
        old_zero = (w.zero_point.astype(np.float64) * current.reshape(w.scale.shape))
        qmin, qmax = np.iinfo(w.qtype.numpy_dtype).min, np.iinfo(w.qtype.numpy_dtype).max
        zero_point = np.clip(np.round(old_zero / scale), qmin, qmax)
    params[tp.bias_weight] = QuantParams(scale, zero_point, w.qtype, w.axis, source="widened for bias")


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


def _weight_params(values: np.ndarray, spec: QuantSpec, name: str) -> QuantParams:
    if spec.axis is not None and values.ndim > 0:
        axis = spec.axis % values.ndim
        reduce_axes = tuple(a for a in range(values.ndim) if a != axis)
        if values.size:
            lo, hi = values.min(axis=reduce_axes), values.max(axis=reduce_axes)
        else:
            lo = hi = np.zeros(values.shape[axis])
        return params_from_range(lo, hi, spec.with_axis(axis))
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    return params_from_range(lo, hi, spec.with_axis(None))


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

