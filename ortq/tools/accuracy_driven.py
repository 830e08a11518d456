"""Accuracy-driven quantization: keep the fewest, most damaging tensors in float until a target holds.

None of the usual post-training tools ranks the damage: users bisect ``nodes_to_exclude`` by hand. Here the
unit of damage is a *quantized activation tensor*, not a node, because that is where range problems live (an
outlier channel crushes every other channel of the tensor it sits in) and because excluding one node alone
rarely helps: its neighbours still put a Q/DQ pair on the same tensor. Keeping a tensor in float therefore
means keeping every quantized node that reads or writes it (and the tensors tied to it: outputs sharing its
parameters through data-movement ops, producers fused into it) in float.

The search is deterministic and bounded:

1. calibrate once, observing every tensor any trial could need, so trials never run calibration again;
2. measure the fully quantized model; stop if it meets the target;
3. rank: one trial per candidate tensor with only that tensor kept float, scored by the metric's gain
   (candidates beyond ``max_rank_trials`` are pre-selected by the noise their own quantizer injects into the
   float activations, a one-pass estimate);
4. search the smallest prefix of the ranking that meets the target: doubling, then bisection, so at most
   about ``2 * log2(candidates)`` more trials; then drop, one trial each, any tensor of that prefix the others
   make unnecessary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx

from ortq.pipeline.calibrate import run_calibration
from ortq.io.data import feed_samples, iter_batches, model_inputs
from ortq.core.errors import ConfigError
from ortq.core.graph import GraphIndex
from ortq.core.op_quantizer import Activation, SameAs, Weight
from ortq.pipeline.plan import QuantPlan, make_plan
from ortq.core.scheme import QuantType
from ortq.io.model_io import check_output_path
from ortq.io.paths import refuse_overwriting_inputs
from ortq.io.state import CalibrationState
from ortq.pipeline.verify import make_session, run_outputs

if TYPE_CHECKING:
    from ortq.core.metric import Metric
    from ortq.pipeline.run import QuantizationResult
    from ortq.host.plugin_host import PluginHost

__all__ = ["AccuracyTarget", "TensorSensitivity", "AccuracyDrivenResult", "quantize_to_target"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccuracyTarget:
    """What "accurate enough" means: a metric plugin and either a floor on it or a largest allowed drop.

    ``max_drop`` is measured against the float model scored by the same metric (agreement metrics score the
    float model 1.0, label accuracy scores it against the labels), in the metric's own units.
    """

    metric: str = "sqnr"
    min_value: float | None = None
    max_drop: float | None = None
    metric_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.min_value is None) == (self.max_drop is None):
            raise ConfigError("an accuracy target needs exactly one of min_value (e.g. min_sqnr) and max_drop")
        if self.max_drop is not None and (not math.isfinite(self.max_drop) or self.max_drop < 0):
            raise ConfigError(f"max_drop must be a finite number >= 0, not {self.max_drop}")

    def describe(self) -> str:
        if self.min_value is not None:
            return f"{self.metric} >= {self.min_value:g}"
        return f"{self.metric} drop <= {self.max_drop:g}"


@dataclass
class TensorSensitivity:
    """What quantizing one tensor costs: the metric with only it kept float, and the nodes that keeps float."""

    tensor: str
    nodes: list[str]
    op_types: list[str]
    #: Metric with this tensor (and its nodes) kept float, everything else quantized; None if not measured.
    value: float | None
    #: Improvement over the fully quantized model, in the metric's direction (bigger is more sensitive).
    gain: float | None
    #: Noise-to-signal ratio its own quantizer injects into the float activations (the pre-selection score).
    injected_nsr: float | None = None
    #: Weights of the nodes reading or writing it, widened with it by the 16-bit fallback: a range problem
    #: in an activation usually comes with one in the weights that undo it (an outlier channel scaled back
    #: down by tiny weights, which 8 bits round to zero).
    weights: list[str] = field(default_factory=list)


@dataclass
class AccuracyDrivenResult:
    """The final quantization and how it was found."""

    result: QuantizationResult
    target: AccuracyTarget
    float_value: float
    quantized_value: float
    final_value: float
    met: bool
    #: Tensors kept float (or 16-bit), most sensitive first; with "float", their nodes are the result's extra
    #: float nodes.
    kept: list[TensorSensitivity]
    ranking: list[TensorSensitivity]
    trials: int
    #: What the kept tensors became: "float" or "16bit".
    fallback: str = "float"

    def summary(self) -> str:
        lines = [
            f"accuracy target {self.target.describe()}: float {self.float_value:.4g}, fully quantized "
            f"{self.quantized_value:.4g}, final {self.final_value:.4g} "
            f"({'met' if self.met else 'NOT met'}, {self.trials} trial(s))",
        ]
        for s in self.kept:
            gain = f"{s.gain:+.4g}" if s.gain is not None else "n/a"
            if self.fallback == "float":
                lines.append(f"kept float: tensor {s.tensor!r} (nodes {', '.join(s.nodes)}), gain {gain} alone")
            else:
                with_weights = f" with weights {', '.join(s.weights)}" if s.weights else ""
                lines.append(f"kept in 16 bits: tensor {s.tensor!r}{with_weights}, gain {gain} alone")
        return "\n".join(lines)


class _Scorer:
    """Runs candidate models over the evaluation feeds and scores them with one metric plugin."""

    def __init__(self, toolkit: PluginHost, target: AccuracyTarget, feeds: list[dict[str, np.ndarray]],
                 reference: list[dict[str, np.ndarray]], labels: list[np.ndarray | None],
                 providers: Sequence[Any] | None) -> None:
        self.metric: Metric = toolkit.metric(target.metric, **target.metric_options)
        self.target = target
        self.feeds, self.reference, self.labels = feeds, reference, labels
        self.providers = providers
        self.float_value = self._score(reference)
        self.trials = 0

    def _score(self, outputs: list[dict[str, np.ndarray]]) -> float:
        self.metric.reset()
        for ref, out, lab in zip(self.reference, outputs, self.labels):
            self.metric.update(ref, out, lab)
        return float(self.metric.result())

    def score_model(self, model: onnx.ModelProto) -> float:
        self.trials += 1
        _, outputs = run_outputs(make_session(model, self.providers), self.feeds)
        return self._score(outputs)

    def better(self, a: float, b: float) -> float:
        """How much better ``a`` is than ``b`` in the metric's direction (NaN-safe: NaN is worst)."""
        if math.isnan(a):
            return -math.inf
        if math.isnan(b):
            return math.inf
        return (a - b) if self.metric.higher_is_better else (b - a)

    def meets(self, value: float) -> bool:
        if math.isnan(value):
            return False
        t = self.target
        if t.min_value is not None:
            return value >= t.min_value if self.metric.higher_is_better else value <= t.min_value
        return self.better(self.float_value, value) <= t.max_drop  # type: ignore[operator]


@contextlib.contextmanager
def _each_warning_once() -> Iterator[None]:
    """Trials rebuild the same model many times; its warnings (vetoes, preprocessing advice) say nothing new
    after the first build. Filters do not propagate to child loggers, so each ortq logger gets one, and it
    passes records from other threads untouched."""
    seen: set[tuple[str, str]] = set()
    owner = threading.get_ident()  # quantizations in other threads log as usual

    def first_time(record: logging.LogRecord) -> bool:
        if record.thread != owner:
            return True
        key = (record.name, record.getMessage())
        if key in seen:
            return False
        seen.add(key)
        return True

    loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
               if name == "ortq" or name.startswith("ortq.")]
    for logger in loggers:
        logger.addFilter(first_time)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(first_time)


#: What a kept tensor becomes: float (its nodes leave the integer kernels), or 16-bit (its nodes stay quantized,
#: for targets with 16-bit kernels; ONNX Runtime's CPU provider has none and runs such nodes in float with
#: extra Q/DQ, so float is the faster choice there).
FALLBACKS = ("float", "16bit")


class _Trials:
    """Builds the model with given tensors kept float or 16-bit, always from the one calibration state."""

    def __init__(self, toolkit: PluginHost, source: Any, state: CalibrationState, backend: str,
                 user_excluded: set[str], providers: Sequence[Any] | None, overrides: dict[str, Any],
                 wide_type: str | None) -> None:
        self.toolkit, self.source, self.state, self.backend = toolkit, source, state, backend
        self.user_excluded, self.providers, self.overrides = user_excluded, providers, overrides
        self.wide_type = wide_type  # None: kept tensors go float

    def cost(self, unit: TensorSensitivity) -> int:
        """What keeping ``unit`` costs: the nodes that leave the integer kernels, or one wider tensor."""
        return len(unit.nodes) if self.wide_type is None else 1

    def build(self, kept: Iterable[TensorSensitivity], output: str | Path | None = None,
              verify: bool = False) -> QuantizationResult:
        from ortq.pipeline.run import quantize

        kept = list(kept)
        excluded = set(self.user_excluded)
        widened = None
        if self.wide_type is None:
            excluded.update(n for u in kept for n in u.nodes)
        elif kept:
            widened = {u.tensor: [{"quant_type": self.wide_type}] for u in kept}
            widened.update({w: [{"quant_type": "int16"}] for u in kept for w in u.weights})
        return quantize(
            self.toolkit, self.source, output, calibration_state=self.state, target=self.backend, verify=verify,
            nodes_to_exclude=sorted(excluded) or None, tensor_overrides=widened, providers=self.providers,
            **self.overrides,
        )


@_each_warning_once()
def quantize_to_target(
    toolkit: PluginHost,
    model: str | Path | onnx.ModelProto,
    output: str | Path | None = None,
    *,
    target: AccuracyTarget,
    calibration_data: Any,
    eval_data: Any = None,
    labels: Any = None,
    backend: str = "cpu",
    batch_size: int | None = None,
    max_samples: int | None = None,
    eval_samples: int | None = 256,
    max_rank_trials: int = 64,
    fallback: str = "float",
    image_options: Any = None,
    providers: Sequence[Any] | None = None,
    ray: bool | str = False,
    ray_workers: int | None = None,
    **overrides: Any,
) -> AccuracyDrivenResult:
    """Quantize ``model`` statically, keeping the fewest sensitive tensors in float so ``target`` holds.

    ``eval_data`` (default: the calibration data, which flatters the result; give held-out data when you
    have it) is scored with ``target.metric``; ``labels`` are passed to metrics that need them, aligned with
    the evaluation samples. ``fallback`` is what a kept tensor becomes (see :data:`FALLBACKS`). Other options
    are those of :func:`ortq.pipeline.run.quantize`. If no prefix of the ranking meets the target, the best model
    tried is returned with ``met=False`` and a warning.

    ``ray=True`` (or a cluster address) runs the ranking trials, which are independent, as Ray tasks
    (:func:`ortq.tools.distributed.map_on_ray`); the result is the same as the local search's.
    """
    from ortq.pipeline.run import _prepare

    if "calibration_state" in overrides or "verify" in overrides:
        raise ConfigError("accuracy-driven quantization calibrates once itself and always verifies")
    if max_rank_trials < 1:
        raise ConfigError("max_rank_trials must be at least 1")
    if fallback not in FALLBACKS:
        raise ConfigError(f"fallback {fallback!r} is not one of {', '.join(FALLBACKS)}")
    user_excluded = set(overrides.pop("nodes_to_exclude", None) or ())
    if output is not None:  # before any work: the search takes minutes, the write comes last
        check_output_path(output)
        refuse_overwriting_inputs([output], {"model": model, "calibration data": calibration_data,
                                             "evaluation data": eval_data, "labels": labels}, models=[model])

    # 1. One calibration observing every tensor a trial could quantize.
    p = _prepare(toolkit, model, backend, dict(overrides), fingerprint=True, refuse_qdq=True)
    p.config.nodes_to_exclude = frozenset(user_excluded)
    index = GraphIndex(p.model)
    plan = make_plan(toolkit, index, p.config, p.backend)
    calibrator = toolkit.calibrator(p.config.calibrator, **p.config.calibrator_options)
    calibration = run_calibration(
        p.model, index, _observable_tensors(plan, index), calibrator,
        iter_batches(calibration_data, model_inputs(p.model), batch_size, max_samples, image_options),
        providers=providers,
    )
    state = CalibrationState(p.fingerprint or "", p.config.calibrator, calibration.statistics,
                             calibration.samples, calibration.batches, p.model.graph.name)
    trials = _Trials(toolkit, model, state, backend, user_excluded, providers, overrides,
                     _wide_type(p.config.activation.qtype) if fallback == "16bit" else None)

    # 2. Evaluation data and the float reference, once.
    feeds, reference, label_batches = _evaluation_set(
        p.model, eval_data if eval_data is not None else calibration_data, labels, batch_size, eval_samples,
        image_options, providers,
    )
    scorer = _Scorer(toolkit, target, feeds, reference, label_batches, providers)
    baseline = trials.build([])
    base_value = scorer.score_model(baseline.model)
    log.info("target %s: float %.4g, fully quantized %.4g", target.describe(), scorer.float_value, base_value)

    def finish(kept: list[TensorSensitivity], ranking: list[TensorSensitivity], value: float) -> AccuracyDrivenResult:
        result = trials.build(kept, output, verify=True)  # written atomically, verified like any quantization
        return AccuracyDrivenResult(result, target, scorer.float_value, base_value, value, scorer.meets(value),
                                    kept, ranking, scorer.trials, fallback)

    if scorer.meets(base_value):
        return finish([], [], base_value)

    # 3. Rank candidate tensors by the gain of keeping each one float alone.
    units = _units(baseline.plan, index, plan)
    _preselect(units, p.model, baseline, feeds[:4], providers)
    units.sort(key=lambda u: -(u.injected_nsr or 0.0))
    if len(units) > max_rank_trials:
        log.info("ranking the %d of %d tensors whose quantizers inject the most noise", max_rank_trials, len(units))
    ranked, unranked = units[:max_rank_trials], units[max_rank_trials:]
    if ray:
        values = _rank_on_ray(toolkit, model, trials, scorer, ranked, ray, ray_workers)
    else:
        values = [scorer.score_model(trials.build([unit]).model) for unit in ranked]
    for unit, value in zip(ranked, values):
        unit.value = value
        unit.gain = scorer.better(unit.value, base_value)
    # Gain per cost first (two tensors that both fix the damage: the one costing fewer float nodes);
    # the injected noise breaks ties (a coarse metric such as top-1 agreement on a few samples often scores
    # one tensor alone as no gain at all, while several together do matter).
    ranking = sorted(ranked, key=lambda u: (-(u.gain or 0.0) / trials.cost(u), -(u.injected_nsr or 0.0))) + unranked
    useful = [u for u in ranking if u.gain is None or u.gain >= 0]  # a tensor whose float copy hurts never helps

    # 4. Smallest prefix of the ranking that meets the target: doubling, then bisection.
    values: dict[int, float] = {0: base_value}

    def value_of(k: int) -> float:
        if k not in values:
            values[k] = scorer.score_model(trials.build(useful[:k]).model)
        return values[k]

    hi = _shortest_prefix(len(useful), lambda k: scorer.meets(value_of(k)))
    if hi is None:
        best = max(values, key=lambda k: (scorer.better(values[k], base_value), -k))
        log.warning("%s: keeping up to %d tensor(s) in float does not meet %s; returning the best model tried",
                    p.label, len(useful), target.describe())
        return finish(useful[:best], ranking, values[best])
    kept, value = _drop_unneeded(useful[:hi], value_of(hi), scorer, trials)
    return finish(kept, ranking, value)


def _shortest_prefix(n: int, meets: Callable[[int], bool]) -> int | None:
    """The smallest k in 1..n with ``meets(k)`` (assuming longer prefixes do no worse), or None.

    Doubling first, then bisection between the last miss and the first hit: about 2 * log2(k) calls, where
    a linear scan would cost k and plain bisection over 1..n would try long prefixes even when k is 1.
    """
    lo, hi = 0, None  # lo: longest prefix known to miss (0, the fully quantized model, missed)
    for k in _doubling(n):
        if meets(k):
            hi = k
            break
        lo = k
    if hi is None:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _drop_unneeded(kept: list[TensorSensitivity], value: float, scorer: _Scorer,
                   trials: _Trials) -> tuple[list[TensorSensitivity], float]:
    """Backward elimination over the chosen prefix, lowest-ranked first: a tensor the others make
    unnecessary goes back to 8 bits. At most one trial per kept tensor (the prefix is short)."""
    for unit in reversed(list(kept)):
        if len(kept) == 1:
            break
        rest = [u for u in kept if u is not unit]
        trial_value = scorer.score_model(trials.build(rest).model)
        if scorer.meets(trial_value):
            kept, value = rest, trial_value
    return kept, value


def _wide_type(activation: QuantType) -> str:
    """The 16-bit type of the same signedness as the 8-bit activations."""
    if activation.bits != 8:
        raise ConfigError(f"fallback='16bit' widens 8-bit activations; these are already {activation.name.lower()}")
    return "uint16" if activation is QuantType.UINT8 else "int16"


def _doubling(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n itself."""
    steps, k = [], 1
    while k < n:
        steps.append(k)
        k *= 2
    if n:
        steps.append(n)
    return steps


def _observable_tensors(plan: QuantPlan, index: GraphIndex) -> list[str]:
    """The planned observations plus every float activation next to a quantized node.

    Keeping tensors float turns some of their neighbours' data-movement outputs (which shared parameters
    before) or fused producers' outputs into calibrated tensors of their own; observing them up front is
    what lets every trial reuse this one calibration.
    """
    names = list(plan.observed_tensors())
    seen = set(names)
    for node in index.graph.node:
        if node.name not in plan.quantized_nodes:
            continue
        for tensor in [*node.input, *node.output]:
            if tensor and tensor not in seen and not index.is_constant(tensor) and index.is_float(tensor):
                seen.add(tensor)
                names.append(tensor)
    return names


def _units(plan: QuantPlan, index: GraphIndex, unvetoed: QuantPlan) -> list[TensorSensitivity]:
    """One candidate per calibrated activation tensor, with the nodes that keeping it float keeps float and
    the weights around it (from the plan before vetoes, where every node that could be quantized is)."""
    sharing: dict[str, list[str]] = {}
    for tp in plan.tensors.values():
        if isinstance(tp.role, SameAs) and tp.source:
            sharing.setdefault(tp.source, []).append(tp.name)
    order = {n.name: i for i, n in enumerate(index.graph.node)}
    units = []
    for tensor in plan.observed_tensors():
        tp = plan.tensors[tensor]
        if not isinstance(tp.role, Activation):
            continue
        nodes = _closure(tensor, plan, index, sharing)
        if not nodes:
            continue
        ordered = sorted(nodes, key=lambda n: order.get(n, 0))
        ops = [plan.quantized_nodes[n] for n in ordered]
        units.append(TensorSensitivity(tensor, ordered, ops, None, None,
                                       weights=_adjacent_weights(tensor, unvetoed, index)))
    return units


def _adjacent_weights(tensor: str, plan: QuantPlan, index: GraphIndex) -> list[str]:
    """Planned weights of the nodes writing ``tensor`` (through a fused activation) or reading it."""
    nodes = [index.producer[tensor]] if tensor in index.producer else []
    nodes += index.consumers.get(tensor, [])
    names = {n.name for n in nodes}
    for node in nodes:  # a Conv whose Relu was fused into it writes this tensor too
        names.update(index.producer[i].name for i in node.input if i in plan.folded and i in index.producer)
    return sorted(tp.name for tp in plan.tensors.values() if isinstance(tp.role, Weight) and tp.node in names)


def _closure(tensor: str, plan: QuantPlan, index: GraphIndex, sharing: dict[str, list[str]]) -> set[str]:
    """The quantized nodes around ``tensor`` and the tensors tied to it (sharing its parameters, or fused away
    into it): what keeping it float keeps float."""
    tensors, nodes = {tensor}, set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        adjacent = [index.producer[t]] if t in index.producer else []
        adjacent += index.consumers.get(t, [])
        for node in adjacent:
            if node.name not in plan.quantized_nodes or node.name in nodes:
                continue
            nodes.add(node.name)
            # A producer fused into this node (Conv before a folded Relu) writes the same values pre-clamp.
            for inp in node.input:
                if inp in plan.folded and inp not in tensors:
                    tensors.add(inp)
                    stack.append(inp)
        for shared in sharing.get(t, []):
            if shared not in tensors:
                tensors.add(shared)
                stack.append(shared)
    return nodes


def _evaluation_set(
    model: onnx.ModelProto, data: Any, labels: Any, batch_size: int | None, max_samples: int | None,
    image_options: Any, providers: Sequence[Any] | None,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], list[np.ndarray | None]]:
    from ortq.tools.evaluate import resolve_labels

    all_labels, data = resolve_labels(labels, data)  # labels may be a file, an array, or an array in the data
    batches = iter_batches(data, model_inputs(model), batch_size, max_samples, image_options)
    feeds, reference = run_outputs(make_session(model, providers), batches)
    if not feeds:
        raise ConfigError("the evaluation data has no samples")
    label_batches: list[np.ndarray | None] = [None] * len(feeds)
    if all_labels is not None:
        sizes = [feed_samples(f) for f in feeds]
        if len(all_labels) < sum(sizes):
            raise ConfigError(f"{len(all_labels)} label(s) for {sum(sizes)} evaluation sample(s)")
        starts = np.cumsum([0, *sizes])
        label_batches = [all_labels[a:b] for a, b in zip(starts[:-1], starts[1:])]
    return feeds, reference, label_batches


@dataclass
class _RankingSetup:
    """What a Ray worker needs to build and score ranking trials: built once per worker (picklable)."""

    model_bytes: bytes
    trials: _Trials  # its toolkit is replaced on the worker by the worker's own plugin host
    scorer: _Scorer
    builtins: bool
    entry_points: list[str]  # the driver's entry-point plugins, so the worker plans with the same ones

    def __call__(self) -> tuple[_Trials, _Scorer]:
        from ortq.host.plugin_host import PluginHost

        trials = self.trials
        trials.toolkit = PluginHost(autoload=bool(self.entry_points), builtins=self.builtins,
                                    only_entry_points=self.entry_points)
        trials.source = onnx.load_from_string(self.model_bytes)
        return trials, self.scorer


def _score_one_kept(state: tuple[_Trials, _Scorer], unit: TensorSensitivity) -> float:
    trials, scorer = state
    return scorer.score_model(trials.build([unit]).model)


def _rank_on_ray(toolkit: PluginHost, model: Any, trials: _Trials, scorer: _Scorer, ranked: list[TensorSensitivity],
                 ray: bool | str, workers: int | None) -> list[float]:
    """The ranking trials as Ray tasks. Workers load built-in and installed plugins only, so a toolkit given
    plugins explicitly is refused rather than ranked with different op quantizers."""
    import copy

    from ortq.io.model_io import read_model
    from ortq.tools.distributed import map_on_ray

    explicit = [name for name, info in toolkit.plugin_info.items() if info.source == "explicit"]
    if explicit:
        raise ConfigError(f"the accuracy-driven search cannot run on Ray with plugins given to the Toolkit "
                          f"({', '.join(explicit)}): workers load built-in and installed plugins only")
    shipped = copy.copy(trials)
    shipped.toolkit, shipped.source = None, None
    sources = [info.source for info in toolkit.plugin_info.values()]
    entry_points = [name for name, info in toolkit.plugin_info.items() if info.source.startswith("entry point")]
    setup = _RankingSetup(read_model(model).model.SerializeToString(), shipped, scorer, "builtin" in sources, entry_points)
    values = map_on_ray(setup, _score_one_kept, ranked, [u.tensor for u in ranked],
                        address=None if ray is True else ray, workers=workers, what="ranking trial")
    scorer.trials += len(ranked)
    return values


def _preselect(units: list[TensorSensitivity], model: onnx.ModelProto, baseline: QuantizationResult,
               feeds: list[dict[str, np.ndarray]], providers: Sequence[Any] | None) -> None:
    """Score each tensor by the noise its own quantizer adds to the float values (channel-averaged), in one run.

    A channel average, not a global ratio: an outlier channel dominates the tensor's power, so the global
    ratio looks harmless while every other channel has lost its resolution.
    """
    from ortq.core.scheme import dequantize_array, quantize_array

    wanted = [u.tensor for u in units if u.tensor in baseline.params]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted if t not in existing)
    session = make_session(probe, providers)
    noise: dict[str, list[float]] = {t: [] for t in wanted}
    for feed in feeds:
        for name, value in zip(wanted, session.run(wanted, feed)):
            x = np.asarray(value, dtype=np.float64)
            q = dequantize_array(quantize_array(x, baseline.params[name]), baseline.params[name])
            axes = tuple(i for i in range(x.ndim) if i != 1) if x.ndim >= 2 else None
            signal = np.mean(x * x, axis=axes) + 1e-30
            noise[name].append(float(np.mean(np.mean((q - x) ** 2, axis=axes) / signal)))
    for u in units:
        u.injected_nsr = float(np.mean(noise[u.tensor])) if noise.get(u.tensor) else 0.0
