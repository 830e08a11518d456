"""User-given quantization parameters and per-tensor scheme overrides for static quantization.

The format is ONNX Runtime's ``extra_options["TensorQuantOverrides"]``, so an overrides file written for
``onnxruntime.quantization`` works unchanged: a mapping from tensor name to a list of dicts (one dict
per tensor, or one per channel of a per-channel weight, ``axis`` in the first), each with any of
``quant_type``, ``scale`` + ``zero_point``, ``symmetric``, ``reduce_range``, ``rmin``, ``rmax`` and
``axis``. A bare dict instead of a one-element list is accepted too. Files are JSON (numbers and strings,
never pickles or code).

What the pipeline does with them (decided here, applied by :func:`ortq.pipeline.run.quantize`):

- ``scale`` + ``zero_point``: used exactly (as float32 / the tensor's integer type); the tensor is not
  calibrated, so when every tensor the plan observes has given parameters no calibration data is needed;
- ``quant_type`` / ``symmetric`` / ``reduce_range`` / ``axis``: change that tensor's scheme only. A 16-bit
  type raises the model to opset 21 (16-bit QuantizeLinear), which mixes precisions in one model;
- ``rmin`` / ``rmax``: replace the calibrated minimum / maximum (both given: no calibration needed);
- an override on a tensor the plan does not quantize is an error that says why it is not quantized (a
  silently ignored parameter is worse than a refusal); so is an override on a data-movement output,
  which must carry its input's parameters (the message names the tensor to override instead), on an
  int32 bias, and on a tensor whose Q/DQ ONNX Runtime fuses away (ReLU folding).

ONNX Runtime's ``convert`` key (insert a type-conversion pair) is refused: override ``quant_type`` instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ortq.core.errors import CalibrationDataError, ConfigError
from ortq.core.op_quantizer import Activation, Bias, SameAs, Weight
from ortq.core.scheme import QuantParams, QuantSpec, QuantType, is_power_of_two, params_from_range

if TYPE_CHECKING:
    from ortq.core.backend import Backend
    from ortq.core.config import QuantConfig
    from ortq.core.graph import GraphIndex
    from ortq.pipeline.plan import QuantPlan, TensorPlan

__all__ = ["TensorOverride", "TensorOverrides", "OVERRIDE_KEYS"]

log = logging.getLogger(__name__)

#: Keys of one override dict (ONNX Runtime's names).
OVERRIDE_KEYS = frozenset({"quant_type", "scale", "zero_point", "symmetric", "reduce_range", "rmin", "rmax", "axis"})
_NOT_WITH_SCALE = ("symmetric", "reduce_range", "rmin", "rmax")
#: Per-channel dicts after the first may repeat these only with the first one's value.
_SHARED_KEYS = ("quant_type", "axis", "symmetric", "reduce_range")


@dataclass(frozen=True)
class TensorOverride:
    """One tensor's parsed override. Arrays are 0-d per tensor, 1-d (one value per channel) with ``axis``."""

    name: str
    qtype: QuantType | None = None
    symmetric: bool | None = None
    reduce_range: bool | None = None
    axis: int | None = None
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    rmin: np.ndarray | None = None
    rmax: np.ndarray | None = None

    @property
    def gives_params(self) -> bool:
        return self.scale is not None


# -- parsing ----------------------------------------------------------------------------------------------
def _parse(source: Mapping[str, Any] | str | Path) -> dict[str, TensorOverride]:
    label = "tensor overrides"
    if isinstance(source, (str, Path)):
        path = Path(source)
        label = f"tensor overrides {str(path)!r}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{label}: cannot be read: {exc.strerror or exc}") from None
        try:
            source = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{label}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(source, Mapping):
        raise ConfigError(f"{label}: expected an object mapping tensor names to overrides, got {type(source).__name__}")
    parsed: dict[str, TensorOverride] = {}
    for name, entry in source.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{label}: tensor names must be non-empty strings, got {name!r}")
        parsed[name] = _parse_entry(name, entry, label)
    return parsed


def _parse_entry(name: str, entry: Any, label: str) -> TensorOverride:
    where = f"{label}: tensor {name!r}"
    dicts = [entry] if isinstance(entry, Mapping) else entry
    if not isinstance(dicts, (list, tuple)) or not dicts or not all(isinstance(d, Mapping) for d in dicts):
        raise ConfigError(f"{where}: expected a dict or a non-empty list of dicts, got {entry!r}")
    for d in dicts:
        unknown = set(d) - OVERRIDE_KEYS
        if "convert" in unknown:
            raise ConfigError(
                f"{where}: 'convert' (a type-conversion Q/DQ pair) is not supported; override 'quant_type' instead"
            )
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(OVERRIDE_KEYS)}")
        if ("scale" in d) != ("zero_point" in d):
            raise ConfigError(f"{where}: Must provide both 'scale' and 'zero_point' (or neither)")
        clash = [k for k in _NOT_WITH_SCALE if k in d and "scale" in d]
        if clash:
            raise ConfigError(f"{where}: option(s) [{', '.join(clash)}] are invalid with 'scale' and 'zero_point'")
    first = dicts[0]
    axis = first.get("axis")
    if len(dicts) > 1 and axis is None:
        raise ConfigError(f"{where}: {len(dicts)} per-channel dicts need an 'axis' in the first one")
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, (int, np.integer))):
        raise ConfigError(f"{where}: 'axis' must be an integer, got {axis!r}")
    for i, d in enumerate(dicts[1:], start=1):
        for key in _SHARED_KEYS:
            if key in d and d[key] != first.get(key):
                raise ConfigError(f"{where}: channel {i} has {key}={d[key]!r}, but channel 0 has {first.get(key)!r}")
    for key in ("scale", "rmin", "rmax"):
        present = [key in d for d in dicts]
        if any(present) and not all(present):
            raise ConfigError(f"{where}: '{key}' is given for some channels but not all")
    qtype = None
    if first.get("quant_type") is not None:
        try:
            qtype = QuantType.parse(first["quant_type"])
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    scale = _floats(dicts, "scale", where, np.float32) if "scale" in first else None
    if scale is not None and (not np.all(np.isfinite(scale)) or np.any(scale <= 0)):
        bad = scale[~(np.isfinite(scale) & (scale > 0))].reshape(-1)[0]
        raise ConfigError(f"{where}: scale must be finite and positive (as a float32), got {bad}")
    zero_point = _integers(dicts, "zero_point", where) if "zero_point" in first else None
    rmin = _floats(dicts, "rmin", where, np.float64) if "rmin" in first else None
    rmax = _floats(dicts, "rmax", where, np.float64) if "rmax" in first else None
    for key, values in (("rmin", rmin), ("rmax", rmax)):
        if values is not None and not np.all(np.isfinite(values)):
            raise ConfigError(f"{where}: {key} must be finite, got {values.tolist()}")
    if rmin is not None and rmax is not None and np.any(rmin > rmax):
        raise ConfigError(f"{where}: rmin {rmin.tolist()} is above rmax {rmax.tolist()}")
    per_channel = axis is not None
    squeeze = (lambda a: a) if per_channel else (lambda a: None if a is None else a.reshape(()))
    return TensorOverride(
        name, qtype, _flag(first, "symmetric", where), _flag(first, "reduce_range", where),
        int(axis) if axis is not None else None, squeeze(scale), squeeze(zero_point), squeeze(rmin), squeeze(rmax),
    )


def _flag(d: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = d.get(key)
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    raise ConfigError(f"{where}: {key!r} must be true or false, got {value!r}")


def _scalar(value: Any, key: str, where: str) -> Any:
    """One number from JSON or from ONNX Runtime-style Python (a numpy scalar or one-element array)."""
    if isinstance(value, (list, tuple)) or isinstance(value, np.ndarray):
        arr = np.asarray(value)
        if arr.size != 1:
            raise ConfigError(f"{where}: {key!r} must be one number per dict (per channel), got {arr.tolist()}")
        value = arr.reshape(-1)[0]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{where}: {key!r} must be a number, got {value!r}")
    return value


def _floats(dicts: list[Mapping[str, Any]], key: str, where: str, dtype: Any) -> np.ndarray:
    return np.array([float(_scalar(d[key], key, where)) for d in dicts], dtype=np.float64).astype(dtype)


def _integers(dicts: list[Mapping[str, Any]], key: str, where: str) -> np.ndarray:
    values = []
    for d in dicts:
        v = _scalar(d[key], key, where)
        if isinstance(v, (float, np.floating)) and not (math.isfinite(v) and float(v).is_integer()):
            raise ConfigError(f"{where}: zero_point must be an integer, got {v!r}")
        values.append(int(v))
    return np.array(values, dtype=np.int64)


# -- applying them to a plan ------------------------------------------------------------------------------
class TensorOverrides:
    """Parsed overrides and what they mean for one plan; an empty instance changes nothing.

    The pipeline calls, in order: :meth:`apply` after each plan, :meth:`observed` for the tensors still to
    calibrate, :meth:`adjust_ranges` on the calibrated ranges, and :meth:`pin` after parameters are computed.
    """

    def __init__(self, entries: Mapping[str, TensorOverride] | None = None) -> None:
        self.entries: dict[str, TensorOverride] = dict(entries or {})
        #: Tensor -> exact parameters (given, or derived from a given range where no calibration applies).
        self.pinned: dict[str, QuantParams] = {}
        #: Calibrated tensor -> (rmin or None, rmax or None) replacing the calibrated bounds.
        self.bounds: dict[str, tuple[float | None, float | None]] = {}
        #: Pinned activations whose range (the one their parameters cover) goes into the run's ranges.
        self.covered: set[str] = set()

    @classmethod
    def load(cls, source: Mapping[str, Any] | str | Path | TensorOverrides | None) -> TensorOverrides:
        """From a dict (ONNX Runtime's format), a JSON file path, or None (no overrides)."""
        if isinstance(source, TensorOverrides):
            return source
        return cls(_parse(source) if source is not None else None)

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def required_opset(self) -> int:
        """16-bit Q/DQ need opset 21, a per-channel axis on DequantizeLinear opset 13."""
        opset = 0
        for o in self.entries.values():
            if o.qtype is not None:
                opset = max(opset, o.qtype.min_opset)
            if o.axis is not None:
                opset = max(opset, 13)
        return opset

    def apply(
        self, plan: QuantPlan, index: GraphIndex, config: QuantConfig, backend: Backend, label: str,
        *, strict: bool = True,
    ) -> None:
        """Validate every override against ``plan`` and set the overridden tensors' schemes in it.

        ``strict=False`` is for re-plans after vetoes: a tensor that left the plan is then only logged.
        """
        self.pinned.clear()
        self.bounds.clear()
        self.covered.clear()
        known = _tensor_names(index)
        for name, o in self.entries.items():
            where = f"{label}: tensor override for {name!r}"
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ConfigError(f"{where}: the tensor is not present in the model{hint}")
            tp = plan.tensors.get(name)
            if tp is None:
                why = _why_not_planned(name, plan, index)
                if strict:
                    raise ConfigError(f"{where}: the tensor is not quantized for target {backend.name!r}: {why}")
                log.warning("%s: ignored, the tensor is no longer quantized: %s", where, why)
                continue
            if isinstance(tp.role, Bias):
                raise ConfigError(
                    f"{where}: it is an int32 bias, whose scale is always input scale x weight scale; "
                    f"override {tp.bias_input!r} or {tp.bias_weight!r} instead"
                )
            if isinstance(tp.role, SameAs):
                source = _resolve(plan, name)
                raise ConfigError(
                    f"{where}: node {tp.node!r} only moves data, so its output must carry exactly the parameters of "
                    f"its input; put the override on {source!r} (it then applies to {name!r} too)"
                )
            self._apply_one(o, tp, plan, index, config, backend, where)

    def _apply_one(
        self, o: TensorOverride, tp: TensorPlan, plan: QuantPlan, index: GraphIndex, config: QuantConfig,
        backend: Backend, where: str,
    ) -> None:
        weight = isinstance(tp.role, Weight)
        old = tp.spec
        assert old is not None  # activations and weights always carry a spec
        qtype = o.qtype or old.qtype
        axis = old.axis
        if o.axis is not None:
            if not weight:
                raise ConfigError(f"{where}: per-channel ('axis') overrides apply to weights only; it is an activation")
            axis = _check_axis(o, index, where)
        if o.axis is None and (o.gives_params or o.rmin is not None or o.rmax is not None):
            axis = None  # one scale and zero point (or one range) make the tensor per-tensor
        if weight and axis is not None:
            _check_bias_channels(o, axis, plan, index, where)
        spec = QuantSpec(
            qtype, old.symmetric if o.symmetric is None else o.symmetric, axis,
            old.reduce_range if o.reduce_range is None else o.reduce_range, old.power_of_two,
        )
        if o.gives_params:
            params = self._given_params(o, qtype, axis, index, where)
            self.pinned[o.name] = params
            if not tp.constant and axis is None:
                self.covered.add(o.name)
            # What the target must accept: the given numbers' actual symmetry and power-of-two-ness.
            spec_for_target = QuantSpec(
                qtype, bool(np.all(params.zero_point == _symmetric_zero(qtype))), axis, False,
                is_power_of_two(params.scale),
            )
            _check_target(spec_for_target, weight, config, backend, where)
            # The planned scheme becomes the plain asymmetric one, so that the parameters computed from the
            # range the given numbers cover (see adjust_ranges) equal them; pin() then sets them exactly.
            tp.spec = QuantSpec(qtype, False, axis, False, False)
            return
        if spec.power_of_two and not spec.symmetric:
            raise ConfigError(f"{where}: target {backend.name!r} uses power-of-two scales, which need symmetric=true")
        _check_target(spec, weight, config, backend, where)
        tp.spec = spec
        if o.rmin is None and o.rmax is None:
            return
        if axis is not None and o.rmin is not None and np.shape(o.rmin) != () and len(o.rmin) != _channels(o, index, axis):
            raise ConfigError(f"{where}: {len(o.rmin)} rmin/rmax values for {_channels(o, index, axis)} channel(s)")
        natural = _natural_range(tp, index, axis)
        if natural is None:  # a calibrated activation: the calibrated bounds are replaced after calibration
            self.bounds[o.name] = (
                None if o.rmin is None else float(o.rmin), None if o.rmax is None else float(o.rmax)
            )
            return
        lo = natural[0] if o.rmin is None else o.rmin
        hi = natural[1] if o.rmax is None else o.rmax
        try:
            self.pinned[o.name] = params_from_range(lo, hi, spec)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def _given_params(
        self, o: TensorOverride, qtype: QuantType, axis: int | None, index: GraphIndex, where: str
    ) -> QuantParams:
        assert o.scale is not None and o.zero_point is not None
        info = np.iinfo(qtype.numpy_dtype)
        bad = (o.zero_point < info.min) | (o.zero_point > info.max)
        if np.any(bad):
            value = int(o.zero_point[bad].reshape(-1)[0]) if o.zero_point.ndim else int(o.zero_point)
            hint = "; set quant_type to the zero point's type" if o.qtype is None else ""
            raise ConfigError(
                f"{where}: zero point {value} is outside {qtype.value} [{int(info.min)}, {int(info.max)}]{hint}"
            )
        if axis is not None and o.scale.shape[0] != _channels(o, index, axis):
            raise ConfigError(
                f"{where}: {o.scale.shape[0]} per-channel scale(s) for {_channels(o, index, axis)} channel(s) on axis {axis}"
            )
        if index.float_dtype(o.name) == np.float16:
            as_f16 = o.scale.astype(np.float16).astype(np.float32)
            if not np.array_equal(as_f16, o.scale):
                raise ConfigError(
                    f"{where}: the tensor is float16, so its scale is stored as float16, and {o.scale.tolist()} is not "
                    "exactly representable there"
                )
        return QuantParams(o.scale, o.zero_point.astype(qtype.numpy_dtype), qtype, axis, source="given")

    def observed(self, plan: QuantPlan) -> list[str]:
        """The plan's observed tensors that still need calibration (given parameters or ranges need none)."""
        return [
            t for t in plan.observed_tensors()
            if t not in self.pinned and not (t in self.bounds and None not in self.bounds[t])
        ]

    def require_data(self, observed: list[str]) -> None:
        """Without calibration data, every observed tensor must have given parameters: say which do not."""
        if observed:
            more = f" (+{len(observed) - 5} more)" if len(observed) > 5 else ""
            raise CalibrationDataError(
                f"calibration data is needed: tensor(s) {observed[:5]}{more} have no given scale and zero point "
                "(or rmin and rmax)"
            )

    def adjust_ranges(self, ranges: dict[str, tuple[float, float]]) -> None:
        """Put the given bounds in place of calibrated ones, and each pinned tensor's covered range."""
        for name, (lo, hi) in self.bounds.items():
            old = ranges.get(name)
            if old is None and (lo is None or hi is None):
                continue
            ranges[name] = (old[0] if lo is None else lo, old[1] if hi is None else hi)  # type: ignore[index]
        for name in self.covered:
            p = self.pinned[name]
            info = np.iinfo(p.qtype.numpy_dtype)
            zp, scale = float(p.zero_point), float(p.scale)
            ranges[name] = ((float(info.min) - zp) * scale, (float(info.max) - zp) * scale)

    def pin(self, plan: QuantPlan, params: dict[str, QuantParams], vetoes: dict[str, str]) -> None:
        """Set the pinned tensors' exact parameters, and copy them to the data-movement outputs that follow."""
        for name, p in self.pinned.items():
            if name not in plan.tensors:
                continue
            if name in vetoes:
                raise ConfigError(f"tensor override for {name!r}: the given parameters cannot be used: {vetoes[name]}")
            params[name] = p
        for name, tp in plan.tensors.items():
            if isinstance(tp.role, SameAs):
                source = _resolve(plan, name)
                if source in self.pinned and source in params:
                    p = params[source]
                    params[name] = QuantParams(p.scale, p.zero_point, p.qtype, p.axis, source=source)


# -- helpers ----------------------------------------------------------------------------------------------
def _tensor_names(index: GraphIndex) -> set[str]:
    names = set(index.producer) | set(index.consumers) | index.graph_inputs | index.graph_outputs
    return names | set(index.initializers)


def _why_not_planned(name: str, plan: QuantPlan, index: GraphIndex) -> str:
    if name in plan.folded:
        node = plan.folded[name]
        out = next((n.output[0] for n in index.graph.node if n.name == node and n.output), None)
        return (
            f"node {node!r} is fused into the kernel producing it, so it has no Q/DQ of its own; override "
            f"{out!r} instead"
        )
    if name in plan.pruned:
        return f"its Q/DQ was dropped: {plan.pruned[name]}"
    touching = {n.name for n in index.consumers.get(name, [])}
    producer = index.producer.get(name)
    if producer is not None:
        touching.add(producer.name)
    reasons = [f"node {f.name!r} ({f.op_type}) stays float: {f.reason}" for f in plan.float_nodes if f.name in touching]
    if reasons:
        return "; ".join(reasons[:3])
    if not index.is_float(name):
        return "it is not a float tensor"
    return "no quantized node gives it a quantized role"


def _resolve(plan: QuantPlan, name: str) -> str:
    seen: set[str] = set()
    while name in plan.tensors and isinstance(plan.tensors[name].role, SameAs) and name not in seen:
        seen.add(name)
        name = plan.tensors[name].source or name
    return name


def _rank(name: str, index: GraphIndex) -> int | None:
    shape = index.shape(name)
    if shape is not None:
        return len(shape)
    value = index.constant_value(name)
    return None if value is None else value.ndim


def _check_axis(o: TensorOverride, index: GraphIndex, where: str) -> int:
    assert o.axis is not None
    rank = _rank(o.name, index)
    if rank is None:
        raise ConfigError(f"{where}: the weight's rank is unknown, so per-channel axis {o.axis} cannot be checked")
    if not -rank <= o.axis < rank:
        raise ConfigError(f"{where}: axis {o.axis} is out of range for a rank-{rank} tensor")
    return o.axis % rank


def _channels(o: TensorOverride, index: GraphIndex, axis: int) -> int:
    # An initializer's dims say it without decoding the weight (this runs up to three times per override).
    shape = index.shape(o.name)
    if shape is None:
        value = index.constant_value(o.name)
        shape = list(value.shape) if value is not None else []
    return int(shape[axis]) if axis < len(shape) and isinstance(shape[axis], int) else -1


def _check_bias_channels(o: TensorOverride, axis: int, plan: QuantPlan, index: GraphIndex, where: str) -> None:
    """A per-channel weight's int32 bias gets one scale per channel: the channels must be the bias's."""
    channels = _channels(o, index, axis)
    for tp in plan.tensors.values():
        if isinstance(tp.role, Bias) and tp.bias_weight == o.name:
            bias = index.constant_value(tp.name)
            if bias is not None and bias.size != channels:
                raise ConfigError(
                    f"{where}: axis {axis} has {channels} channel(s), but its bias {tp.name!r} has {bias.size} values "
                    "(one per output channel); use the output-channel axis"
                )


def _natural_range(tp: TensorPlan, index: GraphIndex, axis: int | None) -> tuple[Any, Any] | None:
    """The range a tensor's parameters come from when it is not calibrated: a constant's values (per channel
    along ``axis``) or an op's fixed range. None for a calibrated activation."""
    if isinstance(tp.role, Activation) and tp.role.fixed_range is not None:
        return tp.role.fixed_range
    if not tp.constant:
        return None
    values = index.constant_value(tp.name)
    if values is None or not values.size:
        return (0.0, 0.0)
    if axis is not None and values.ndim:
        reduce = tuple(a for a in range(values.ndim) if a != axis)
        return values.min(axis=reduce).astype(np.float64), values.max(axis=reduce).astype(np.float64)
    return float(values.min()), float(values.max())


def _symmetric_zero(qtype: QuantType) -> int:
    lo, hi = qtype.qrange(symmetric=True)
    return (lo + hi + 1) // 2


def _check_target(spec: QuantSpec, weight: bool, config: QuantConfig, backend: Backend, where: str) -> None:
    """Ask the backend whether it can run this tensor's scheme, as if it were the whole model's."""
    trial = dataclasses.replace(config, **({"weight": spec} if weight else {"activation": spec}))
    try:
        backend.check_config(trial)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
