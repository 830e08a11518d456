"""SmoothQuant: move activation outliers of MatMul/Gemm inputs into the (per-channel quantized) weights.

A transformer's MatMul input ``X`` [..., K] often has a few channels 10-100x larger than the rest; one
per-tensor 8-bit scale for ``X`` then leaves the bulk of the channels a handful of levels. For a MatMul
``X · W`` with a constant weight, ``X · W = (X / s) · (s W)`` for any positive per-channel ``s`` over K:
dividing the outlier channels down and multiplying the weight rows that read them up moves the difficulty
to the weight, whose scales are per output channel anyway. With ``s_j = max|X_j|^a / max|W_j|^(1-a)``
(``W_j``: the weight row reading channel ``j``, the max over every consumer that shares ``X``) ``a``
trades how much moves (SmoothQuant, Xiao et al. 2022).

``X / s`` costs nothing at run time only when it is folded into the constants of the op that produces
``X``: LayerNormalization's gamma and beta; a decomposed LayerNorm's final ``Mul``/``Add`` constants; a
preceding MatMul/Gemm's output columns and bias (also through the attention head split
``Reshape -> Transpose -> MatMul(probs, V) -> Transpose -> Reshape``, the classic V -> output projection
pair). Every consumer of ``X`` must be a MatMul/Gemm reading it with a constant weight, and every constant
edited must have no other reader: otherwise the tensor is skipped and the log says why (a post-LN
transformer's LayerNorm output also feeds the residual Add, which would see ``X / s``). No op is ever
added, so latency is unchanged.

``a`` is chosen per tensor from a grid by the quantization error of the consumers' outputs: the
statistics pass keeps each channel's minimum and maximum and a fixed-size uniform sample of rows of
``X`` (flat memory in the number of calibration samples), and each candidate ``a`` (and "no smoothing",
so the choice never raises this error) is scored by simulating the activation's per-tensor quantization
(range from the channel extremes) and the weight's quantization on the sampled rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ortq.core.graph import GraphIndex
from ortq.core.scheme import dequantize_array, params_from_range, quantize_array
from ortq.pipeline.calibrate import run_calibration

if TYPE_CHECKING:
    from ortq.core.config import QuantConfig

__all__ = ["ALPHA_GRID", "SmoothGroup", "ChannelSketch", "find_groups", "choose_scales", "apply_scales", "smooth_quant"]

log = logging.getLogger(__name__)

#: Candidate migration strengths (SmoothQuant's paper uses 0.5; 0.75-0.85 for models with strong outliers).
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: Rows of each smoothed input kept for scoring alpha (a uniform reservoir sample over all batches).
SAMPLE_ROWS = 256
#: Scales stay within this factor of 1: a dead channel (all-zero input or weight) is left alone.
_MAX_SCALE = 1e4
_HEAD_PERM = [0, 2, 1, 3]


@dataclass(frozen=True)
class Consumer:
    node: str
    weight: str
    #: the weight is stored [N, K] (Gemm transB=1): its rows are output channels
    transposed: bool


@dataclass(frozen=True)
class FoldEdit:
    """One constant that ``X / s`` divides: along its last axis ("last"), or its columns of a 2-D weight."""

    constant: str
    how: str  # "last" | "columns" | "rows" (a transposed Gemm weight's output channels are its rows)


@dataclass
class SmoothGroup:
    """A tensor ``X`` all of whose readers are MatMul/Gemm with constant weights, and where ``X / s`` folds."""

    tensor: str
    channels: int
    consumers: list[Consumer]
    edits: list[FoldEdit]
    #: the op ``X / s`` is folded into, for the log
    fold: str = ""


class ChannelSketch:
    """Per-channel min/max and a uniform reservoir sample of rows of one tensor (flat in the sample count)."""

    def __init__(self, channels: int, rows: int = SAMPLE_ROWS, seed: int = 0) -> None:
        self.channels = channels
        self.lo = np.full(channels, np.inf)
        self.hi = np.full(channels, -np.inf)
        self.rows = np.zeros((0, channels), dtype=np.float32)
        self.capacity = rows
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def update(self, values: np.ndarray) -> None:
        if values.ndim == 0 or values.size == 0 or values.shape[-1] != self.channels:
            return
        flat = values.reshape(-1, self.channels).astype(np.float32, copy=False)
        finite = np.isfinite(flat).all(axis=1)
        flat = flat[finite]
        if not len(flat):
            return
        np.minimum(self.lo, flat.min(axis=0), out=self.lo)
        np.maximum(self.hi, flat.max(axis=0), out=self.hi)
        # reservoir sampling (algorithm R, vectorised per batch): every row seen so far is kept with equal odds
        room = self.capacity - len(self.rows)
        if room > 0:
            self.rows = np.concatenate([self.rows, flat[:room]])
        rest = flat[max(room, 0):]
        if len(rest):
            positions = self.seen + max(room, 0) + np.arange(len(rest))
            slots = (self._rng.random(len(rest)) * (positions + 1)).astype(np.int64)
            keep = slots < self.capacity
            self.rows[slots[keep]] = rest[keep]
        self.seen += len(flat)

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.lo), np.abs(self.hi))


class _NoStatistic:
    def update(self, values: np.ndarray) -> None:
        pass


class _NoCalibrator:
    """The statistics pass observes only through ``extra_updates``; the range statistics are not needed."""

    def create_statistic(self, name: str) -> _NoStatistic:
        return _NoStatistic()


# ---------------------------------------------------------------------------------------------- graph


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _float_constant(index: GraphIndex, name: str) -> np.ndarray | None:
    value = index.constant_value(name) if name in index.initializers else None
    return value if value is not None and value.dtype == np.float32 else None


def _only_reader(index: GraphIndex, name: str, node: onnx.NodeProto) -> bool:
    readers = index.consumers.get(name, [])
    return len(readers) == 1 and readers[0] is node and name not in index.graph_outputs


def _only_value_reader(index: GraphIndex, name: str, node: onnx.NodeProto) -> bool:
    """``node`` is the one reader of ``name``'s values; Shape/Size readers (PyTorch exports them to compute
    reshape targets) see only the shape, which scaling leaves alone."""
    readers = [r for r in index.consumers.get(name, []) if r.op_type not in ("Shape", "Size")]
    return len(readers) == 1 and readers[0] is node and name not in index.graph_outputs


def _last_axis_constant(index: GraphIndex, name: str, channels: int, node: onnx.NodeProto) -> str | None:
    """Why constant ``name`` cannot take a per-channel division along the last axis, or None if it can."""
    value = _float_constant(index, name)
    if value is None:
        return f"{name!r} is not a float32 initializer"
    if not _only_reader(index, name, node):
        return f"constant {name!r} has other readers"
    if value.size == 1 or (value.shape[-1:] == (channels,) and value.size == channels):
        return None
    return f"constant {name!r} of shape {list(value.shape)} is not per channel"


def _consumer(index: GraphIndex, node: onnx.NodeProto, tensor: str) -> tuple[Consumer | None, str]:
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[0] != tensor:
        return None, f"{node.op_type} {node.name!r} reads it"
    if node.input[1] == tensor:
        return None, f"{node.op_type} {node.name!r} reads it twice"
    if not _only_reader(index, node.input[1], node):
        return None, f"the weight {node.input[1]!r} of {node.op_type} {node.name!r} has other readers"
    w = _float_constant(index, node.input[1])
    if w is None or w.ndim != 2:
        return None, f"{node.op_type} {node.name!r} has no constant 2-D float32 weight"
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        return None, f"Gemm {node.name!r} transposes its input"
    return Consumer(node.name, node.input[1], bool(node.op_type == "Gemm" and _attr(node, "transB", 0))), ""


def _fold(index: GraphIndex, tensor: str, channels: int, depth: int = 0) -> tuple[list[FoldEdit] | None, str]:
    """The constant edits that make ``tensor``'s producer output ``tensor / s``, or (None, why not)."""
    node = index.producer.get(tensor)
    if node is None:
        return None, "it is a graph input"
    if depth > 8:
        return None, "the fold path is too long"
    op = node.op_type
    if op == "LayerNormalization":
        if len(node.input) < 2 or _attr(node, "axis", -1) not in (-1, len(index.shape(tensor) or [0, 0]) - 1):
            return None, f"LayerNormalization {node.name!r} does not normalize the last axis alone"
        edits = []
        for name in node.input[1:3]:
            if not name:
                continue
            why = _last_axis_constant(index, name, channels, node)
            if why:
                return None, why
            edits.append(FoldEdit(name, "last"))
        if len(node.input) < 3 or not node.input[2]:
            pass  # no beta: gamma alone scales the output
        return edits, f"LayerNormalization {node.name!r}"
    if op in ("Mul", "Add") and len(node.input) == 2:
        const = [i for i in node.input if index.is_constant(i)]
        if len(const) != 1:
            return None, f"{op} {node.name!r} has no single constant operand"
        other = node.input[1] if node.input[0] == const[0] else node.input[0]
        why = _last_axis_constant(index, const[0], channels, node)
        if why:
            return None, why
        edits = [FoldEdit(const[0], "last")]
        if op == "Mul":  # (z * g) / s == z * (g / s)
            return edits, f"Mul {node.name!r}"
        if not _only_value_reader(index, other, node):  # (z + b) / s needs z / s too
            return None, f"{other!r} (before Add {node.name!r}) has other readers"
        more, where = _fold(index, other, channels, depth + 1)
        return (None, where) if more is None else (more + edits, where)
    if op == "MatMul":
        w = _float_constant(index, node.input[1])
        if w is None or w.ndim != 2 or w.shape[1] != channels or not _only_reader(index, node.input[1], node):
            return None, f"MatMul {node.name!r} has no private constant 2-D weight"
        return [FoldEdit(node.input[1], "columns")], f"MatMul {node.name!r}"
    if op == "Gemm":
        w = _float_constant(index, node.input[1])
        trans = bool(_attr(node, "transB", 0))
        if w is None or not _only_reader(index, node.input[1], node) or w.shape[0 if trans else 1] != channels:
            return None, f"Gemm {node.name!r} has no private constant weight"
        edits = [FoldEdit(node.input[1], "rows" if trans else "columns")]
        if len(node.input) > 2 and node.input[2]:
            why = _last_axis_constant(index, node.input[2], channels, node)
            if why:
                return None, why
            edits.append(FoldEdit(node.input[2], "last"))
        return edits, f"Gemm {node.name!r}"
    if op == "Reshape":
        source = _head_merge_source(index, node, channels)
        if source is None:
            return None, f"Reshape {node.name!r} is not an attention head merge"
        more, where = _fold(index, source, channels, depth + 1)
        return (None, where) if more is None else (more, f"{where} (through the attention heads)")
    return None, f"its producer is {op} {node.name!r}"


def _constant_shape(index: GraphIndex, name: str) -> list[int | None] | None:
    """A Reshape's target shape, entry by entry (None where computed at run time): a constant, or a Concat
    of one-element pieces as PyTorch exports ``x.view(batch, seq, heads, head_dim)``."""
    value = index.constant_value(name) if index.is_constant(name) else None
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = index.producer.get(name)
    if node is None or node.op_type != "Concat":
        return None
    parts: list[int | None] = []
    for piece in node.input:
        known = index.constant_value(piece) if index.is_constant(piece) else None
        if known is not None:
            if known.size != 1:
                return None
            parts.append(int(known.reshape(())))
        else:
            shape = index.shape(piece)
            if shape is None or len(shape) != 1 or shape[0] != 1:
                return None
            parts.append(None)
    return parts


def _head_merge_source(index: GraphIndex, merge: onnx.NodeProto, channels: int) -> str | None:
    """For ``Reshape(Transpose(MatMul(P, Transpose(Reshape(V)))))`` that splits V's last axis into heads and
    merges them back in the same order, V (whose channel ``c`` becomes channel ``c`` of the merge)."""

    def single(name: str, reader: onnx.NodeProto) -> onnx.NodeProto | None:
        return index.producer.get(name) if _only_value_reader(index, name, reader) else None

    merged_shape = _constant_shape(index, merge.input[1])
    if not merged_shape or merged_shape[-1] != channels:
        return None
    t_out = single(merge.input[0], merge)
    if t_out is None or t_out.op_type != "Transpose" or list(_attr(t_out, "perm", [])) != _HEAD_PERM:
        return None
    mm = single(t_out.input[0], t_out)
    if mm is None or mm.op_type != "MatMul" or mm.input[0] == mm.input[1]:
        return None
    t_in = single(mm.input[1], mm)  # the right operand: each of its columns (channels) scales the output's
    if t_in is None or t_in.op_type != "Transpose" or list(_attr(t_in, "perm", [])) != _HEAD_PERM:
        return None
    split = single(t_in.input[0], t_in)
    if split is None or split.op_type != "Reshape":
        return None
    split_shape = _constant_shape(index, split.input[1])
    if not split_shape or len(split_shape) != 4 or None in split_shape[2:] or min(split_shape[2:]) <= 0:
        return None
    if split_shape[2] * split_shape[3] != channels or len(merged_shape) != 3:
        return None
    return split.input[0]


def find_groups(index: GraphIndex, exclude: frozenset[str] = frozenset()) -> tuple[list[SmoothGroup], dict[str, str]]:
    """The MatMul/Gemm inputs that can be smoothed, and for the others (with a constant weight) why not."""
    groups: list[SmoothGroup] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for node in index.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.name in exclude or len(node.input) < 2:
            continue
        tensor = node.input[0]
        if tensor in seen or index.is_constant(tensor) or _float_constant(index, node.input[1]) is None:
            continue
        seen.add(tensor)
        consumer, why = _consumer(index, node, tensor)
        if consumer is None:
            skipped[tensor] = why
            continue
        w = index.constant_value(consumer.weight)
        channels = int(w.shape[1] if consumer.transposed else w.shape[0])
        consumers = []
        for reader in index.consumers.get(tensor, []):
            if reader.op_type in ("Shape", "Size"):
                continue
            c, why = _consumer(index, reader, tensor)
            if c is None:
                break
            rw = index.constant_value(c.weight)
            if (rw.shape[1] if c.transposed else rw.shape[0]) != channels:
                c, why = None, f"{reader.op_type} {reader.name!r} reads another width"
                break
            consumers.append(c)
        else:
            why = ""
        if why:
            skipped[tensor] = f"{why} (besides {node.name!r})"
            continue
        if tensor in index.graph_outputs:
            skipped[tensor] = "it is a graph output"
            continue
        if not any(c.node not in exclude for c in consumers):
            continue
        edits, where = _fold(index, tensor, channels)
        if edits is None:
            skipped[tensor] = f"no fold: {where}"
            continue
        touched = {e.constant for e in edits}
        if touched & {c.weight for c in consumers}:
            skipped[tensor] = "the fold would edit a consumer's own weight"
            continue
        groups.append(SmoothGroup(tensor, channels, consumers, edits, where))
    # two groups must not edit the same constant for their folds
    used: dict[str, str] = {}
    kept = []
    for g in groups:
        clash = next((used[e.constant] for e in g.edits if e.constant in used), None)
        if clash is not None:
            skipped[g.tensor] = f"its fold shares constants with {clash!r}'s"
            continue
        used.update({e.constant: g.tensor for e in g.edits})
        kept.append(g)
    return kept, skipped


# ---------------------------------------------------------------------------------------------- scales


def _weight_kn(index: GraphIndex, c: Consumer) -> np.ndarray:
    w = index.constant_value(c.weight).astype(np.float64)
    return w.T if c.transposed else w


def _fake_quant(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, spec: Any) -> np.ndarray:
    p = params_from_range(lo, hi, spec)
    return dequantize_array(quantize_array(values, p), p).astype(np.float64)


def _error(sketch: ChannelSketch, weights: list[np.ndarray], refs: list[np.ndarray], s: np.ndarray, config: QuantConfig) -> float:
    """Relative squared error of the consumers' outputs on the sampled rows when ``X / s`` and ``s W`` are
    quantized as ``config`` quantizes them (activation per tensor over the channel extremes)."""
    xs = (sketch.rows / s).astype(np.float32)
    lo, hi = float(np.min(sketch.lo / s)), float(np.max(sketch.hi / s))
    xq = _fake_quant(xs, np.float64(lo), np.float64(hi), config.activation.with_axis(None)).astype(np.float32)
    total = 0.0
    for w, ref in zip(weights, refs):
        ws = (w * s[:, None]).astype(np.float32)
        if config.per_channel:
            wq = _fake_quant(ws, ws.min(axis=0), ws.max(axis=0), config.weight.with_axis(1))
        else:
            wq = _fake_quant(ws, np.float64(ws.min()), np.float64(ws.max()), config.weight.with_axis(None))
        diff = xq @ wq.astype(np.float32) - ref
        total += float(np.mean(np.square(diff, dtype=np.float64))) / (float(np.mean(np.square(ref, dtype=np.float64))) or 1.0)
    return total


def _scales(act_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = act_max**alpha / w_max ** (1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0) & (act_max > 0) & (w_max > 0), s, 1.0)
    return np.clip(s, 1.0 / _MAX_SCALE, _MAX_SCALE)


def choose_scales(
    index: GraphIndex, group: SmoothGroup, sketch: ChannelSketch, config: QuantConfig, alpha: float | None = None,
) -> tuple[np.ndarray | None, float | None, float, float]:
    """(s, alpha, error before, error after) for ``group``; s is None when no candidate beats no smoothing."""
    weights = [_weight_kn(index, c) for c in group.consumers]
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    act_max = sketch.absmax
    if not len(sketch.rows) or not np.all(np.isfinite(act_max)):
        return None, None, 0.0, 0.0
    refs = [sketch.rows @ w.astype(np.float32) for w in weights]
    base = _error(sketch, weights, refs, np.ones(group.channels), config)
    if alpha is not None:  # pinned: applied as asked, scored for the log only
        s = _scales(act_max, w_max, alpha)
        return s, alpha, base, _error(sketch, weights, refs, s, config)
    best: tuple[float, float | None, np.ndarray | None] = (base, None, None)
    for a in ALPHA_GRID:
        s = _scales(act_max, w_max, a)
        e = _error(sketch, weights, refs, s, config)
        if e < best[0]:
            best = (e, a, s)
    return best[2], best[1], base, best[0]


def apply_scales(index: GraphIndex, group: SmoothGroup, s: np.ndarray) -> None:
    """``X / s`` into the fold constants, ``s W`` into every consumer's weight rows (in place, float32)."""
    for e in group.edits:
        value = index.constant_value(e.constant).astype(np.float64)
        if e.how == "columns":
            value = value / s[None, :]
        elif e.how == "rows":
            value = value / s[:, None]
        elif value.size == 1:  # a scalar becomes per channel
            value = np.full(s.shape, float(value.reshape(())), dtype=np.float64) / s
        else:
            value = value / s.reshape(value.shape)
        _set(index, e.constant, value)
    for c in group.consumers:
        w = index.constant_value(c.weight).astype(np.float64)
        _set(index, c.weight, w * s[None, :] if c.transposed else w * s[:, None])


def _set(index: GraphIndex, name: str, value: np.ndarray) -> None:
    index.initializers[name].CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
    getattr(index, "_constant_cache", {}).pop(name, None)


# ---------------------------------------------------------------------------------------------- pass


def _constants_as_initializers(model: onnx.ModelProto) -> None:
    """Turn float32 ``Constant`` nodes read by one Mul/Add/LayerNormalization into initializers (the same
    value under the same name), so a fold can edit them: PyTorch exports GELU's ``* 0.5`` that way."""
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and not node.domain and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
            users = readers.get(node.output[0], [])
            if (tensor.data_type == onnx.TensorProto.FLOAT and not tensor.external_data and len(users) == 1
                    and users[0].op_type in ("Mul", "Add", "LayerNormalization") and node.output[0] not in outputs):
                value = numpy_helper.to_array(tensor)
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                continue
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


@dataclass
class SmoothReport:
    """What :func:`smooth_quant` did, for the log and the tests."""

    smoothed: dict[str, float] = field(default_factory=dict)  # tensor -> alpha
    kept: list[str] = field(default_factory=list)  # smoothable, but no alpha lowered the error
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # tensor -> (before, after)
    seconds: float = 0.0


def smooth_quant(
    model: onnx.ModelProto,
    config: QuantConfig,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    label: str = "model",
    alpha: float | None = None,
    providers: Sequence[Any] | None = None,
    session_options: Any = None,
) -> SmoothReport:
    """Smooth every foldable MatMul/Gemm input of ``model`` (the pipeline's private copy) in place.

    One observation pass over ``batches`` gathers the channel sketches; the caller then calibrates the
    smoothed model as usual (a second pass: the ranges must be those of ``X / s``).
    """
    t0 = time.perf_counter()
    report = SmoothReport()
    _constants_as_initializers(model)
    index = GraphIndex(model)
    groups, report.skipped = find_groups(index, config.nodes_to_exclude)
    for tensor, why in report.skipped.items():
        log.info("%s: SmoothQuant skips %r: %s", label, tensor, why)
    if not groups:
        log.info("%s: SmoothQuant found no MatMul/Gemm input whose scaling folds into a preceding op", label)
        return report
    sketches = {g.tensor: ChannelSketch(g.channels) for g in groups}
    run_calibration(
        model, index, list(sketches), _NoCalibrator(), batches,  # type: ignore[arg-type]
        providers=providers, session_options=session_options,
        extra_updates={name: sk.update for name, sk in sketches.items()},
    )
    for g in groups:
        s, a, before, after = choose_scales(index, g, sketches[g.tensor], config, alpha)
        report.errors[g.tensor] = (before, after)
        if s is None:
            report.kept.append(g.tensor)
            log.info("%s: SmoothQuant leaves %r: no alpha lowers its consumers' error (%.3g)", label, g.tensor, before)
            continue
        apply_scales(index, g, s)
        report.smoothed[g.tensor] = float(a) if a is not None else float("nan")
        log.info(
            "%s: SmoothQuant %r (into %s, alpha %.2f, max scale %.3g): consumers' relative error %.3g -> %.3g",
            label, g.tensor, g.fold, a, float(s.max()), before, after,
        )
    report.seconds = time.perf_counter() - t0
    log.info("%s: SmoothQuant smoothed %d of %d foldable MatMul/Gemm input(s) in %.2f s",
             label, len(report.smoothed), len(groups), report.seconds)
    return report
