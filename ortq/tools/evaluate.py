"""Evaluate a quantized model against its float original: metric plugins, sizes and latency in one pass.

Each batch of the evaluation data runs through both models once; every metric is fed twice, once with
the float model as its own candidate (the float baseline: 1.0 agreement, the float accuracy) and once
with the quantized model, so the "drop" compares like with like. Metrics stream (see
:mod:`ortq.metric`), so the evaluation set can be larger than memory when it comes from a folder or a
reader. Latency is measured on the same two sessions, interleaved, so machine noise hits both alike.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import numpy as np
import onnx

from ortq.io.data import InputSpec, feed_samples, load_npy, load_npz, iter_batches, model_inputs
from ortq.core.errors import CalibrationDataError, ConfigError, ModelError
from ortq.core.metric import Metric
from ortq.io.model_io import LoadedModel, model_size, read_model

if TYPE_CHECKING:
    from ortq.io.images import ImageOptions
    from ortq.host.plugin_host import PluginHost

__all__ = [
    "evaluate", "EvaluationReport", "MetricResult", "MetricSpec", "parse_metric_spec", "ModelPair", "Scored",
    "score_batches", "finish_report", "make_metric_pairs", "check_same_interface", "model_session",
    "DEFAULT_METRICS", "DEFAULT_LATENCY_RUNS",
]

log = logging.getLogger(__name__)

#: Used when ``metrics`` is not given; ``top1`` only when the first output has a class axis, and
#: ``accuracy`` added when labels are given.
DEFAULT_METRICS: tuple[str, ...] = ("top1", "cosine", "sqnr")
#: Timed runs per model: small, because tiny models are noisy anyway and the CLI can ask for more.
DEFAULT_LATENCY_RUNS = 20
_WARMUP_RUNS = 3

#: A metric by name (``"cosine"``, or ``"cosine:output=logits"`` with options), by name and options, or an
#: instance (copied for the float baseline).
MetricSpec = Union[str, Metric, "tuple[str, Mapping[str, Any]]"]


@dataclass
class MetricResult:
    """One metric for both models."""

    name: str  # the metric's registered name
    label: str  # how the report shows it (the name, plus its options if any)
    float_value: float
    quantized_value: float
    higher_is_better: bool = True
    unit: str = ""

    @property
    def drop(self) -> float:
        """How much worse the quantized model is: positive is a loss, whichever way the metric points."""
        if self.float_value == self.quantized_value:
            return 0.0
        diff = self.float_value - self.quantized_value
        return diff if self.higher_is_better else -diff


@dataclass
class EvaluationReport:
    """What :func:`evaluate` measured. Sizes in bytes, latencies in milliseconds (None when not measured)."""

    float_model: str
    quantized_model: str
    metrics: list[MetricResult] = field(default_factory=list)
    samples: int = 0
    batches: int = 0
    float_size: int = 0
    quantized_size: int = 0
    float_latency_ms: float | None = None
    quantized_latency_ms: float | None = None
    latency_runs: int = 0
    latency_batch: int = 1
    intra_op_threads: int = 1

    def __getitem__(self, label: str) -> MetricResult:
        for result in self.metrics:
            if result.label == label:
                return result
        raise KeyError(f"no metric {label!r} in this report; it has {[m.label for m in self.metrics]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite values (an SQNR of +inf for the float baseline) become "inf"/"-inf"/"nan"."""
        return {
            "format": "ortq.evaluation",
            "version": 1,
            "float_model": self.float_model,
            "quantized_model": self.quantized_model,
            "samples": self.samples,
            "batches": self.batches,
            "metrics": [
                {
                    "name": m.name, "label": m.label, "float": _json_number(m.float_value),
                    "quantized": _json_number(m.quantized_value), "drop": _json_number(m.drop),
                    "higher_is_better": m.higher_is_better, "unit": m.unit,
                }
                for m in self.metrics
            ],
            "size_bytes": {"float": self.float_size, "quantized": self.quantized_size},
            "latency_ms": {
                "float": _json_number(self.float_latency_ms), "quantized": _json_number(self.quantized_latency_ms),
                "runs": self.latency_runs, "batch": self.latency_batch, "intra_op_threads": self.intra_op_threads,
            },
        }

    def table(self) -> str:
        """The CLI's report: metric | float | quantized | drop, then sizes and latency."""
        rows = [("metric", "float", "quantized", "drop")]
        for m in self.metrics:
            rows.append((m.label, _fmt(m.float_value, m.unit), _fmt(m.quantized_value, m.unit), _fmt_drop(m.drop, m.unit)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(4)).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(f"samples: {self.samples} in {self.batches} batch(es)")
        ratio = f" (float/quantized {self.float_size / self.quantized_size:.2f}x)" if self.quantized_size else ""
        lines.append(f"size: float {self.float_size / 1024:.1f} KiB, quantized {self.quantized_size / 1024:.1f} KiB{ratio}")
        if self.float_latency_ms is not None and self.quantized_latency_ms is not None:
            speed = self.float_latency_ms / self.quantized_latency_ms if self.quantized_latency_ms else float("inf")
            threads = f"{self.intra_op_threads} intra-op thread(s)" if self.intra_op_threads else "default threads"
            lines.append(
                f"latency: float {self.float_latency_ms:.3f} ms, quantized {self.quantized_latency_ms:.3f} ms "
                f"(float/quantized {speed:.2f}x) at batch {self.latency_batch}, {threads}, "
                f"median of {self.latency_runs} interleaved runs"
            )
        return "\n".join(lines)


def evaluate(
    toolkit: PluginHost | None,
    float_model: str | os.PathLike | onnx.ModelProto,
    quantized_model: str | os.PathLike | onnx.ModelProto,
    data: Any,
    *,
    labels: Any = None,
    metrics: Sequence[MetricSpec] | None = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
    providers: Sequence[Any] | None = None,
    latency_runs: int = DEFAULT_LATENCY_RUNS,
    intra_op_threads: int = 1,
    image_options: ImageOptions | None = None,
) -> EvaluationReport:
    """Run both models over ``data`` and score them with ``toolkit``'s metric plugins.

    ``data`` is any source :func:`ortq.io.data.iter_batches` reads (.npz, folder, dict of arrays, list of
    feeds, a reader). ``labels`` is an array (one entry per sample, in data order), a ``.npy`` file, a
    ``.npz`` holding one array (or one named ``label``/``labels``), or the name of an array inside the data
    (``.npz`` or dict), which is then not fed to the model. ``metrics`` defaults to
    :data:`DEFAULT_METRICS`. ``latency_runs=0`` skips the latency measurement. ``toolkit=None`` uses a fresh
    :class:`ortq.Toolkit` (built-ins plus installed plugins).
    """
    if toolkit is None:
        from ortq.host.plugin_host import PluginHost

        toolkit = PluginHost()
    if data is None:
        raise CalibrationDataError("evaluation needs data; none was given")
    if latency_runs < 0:
        raise ConfigError(f"latency_runs must be 0 or more, got {latency_runs}")
    float_loaded, quant_loaded = read_model(float_model), read_model(quantized_model)
    float_name, quant_name = _describe_model(float_model), _describe_model(quantized_model)
    inputs = check_same_interface(float_loaded.model, quant_loaded.model, float_name, quant_name)
    output_names = [o.name for o in float_loaded.model.graph.output]

    label_array, data = resolve_labels(labels, data)
    specs = list(metrics) if metrics is not None else default_metrics(float_loaded.model, label_array is not None)
    if not specs:
        raise ConfigError("no metrics to evaluate")
    pairs = make_metric_pairs(toolkit, specs)
    needing = [label for label, metric, _ in pairs if metric.needs_labels]
    if needing and label_array is None:
        raise ConfigError(f"metric(s) {needing} compare with labels; pass labels (--labels FILE or an array name in the data)")

    float_session = model_session(float_loaded.model, float_name, providers, intra_op_threads)
    quant_session = model_session(quant_loaded.model, quant_name, providers, intra_op_threads)
    report = EvaluationReport(float_name, quant_name, intra_op_threads=intra_op_threads)
    trim = not any(spec.shape and spec.shape[0] is not None for spec in inputs)
    models = ModelPair(float_session, quant_session, output_names, float_name, quant_name)
    scored = score_batches(
        models, iter_batches(data, inputs, batch_size, max_samples, image_options), pairs, label_array, max_samples, trim,
    )
    if label_array is not None and scored.exhausted and scored.samples != len(label_array):
        raise ConfigError(f"labels hold {len(label_array)} entries, the data {scored.samples} sample(s); they must match")
    return finish_report(report, scored, float_loaded, quant_loaded, models, latency_runs, trim)


@dataclass
class ModelPair:
    """The float and the quantized model's sessions, read side by side on the same feeds."""

    float_session: Any
    quant_session: Any
    output_names: list[str]
    float_name: str
    quant_name: str


@dataclass
class Scored:
    """Metric pairs fed with some batches: one process's evaluation, or one shard's on a worker.

    Metrics keep running sums, so two ``Scored`` of disjoint data merge into the ``Scored`` of both
    (:meth:`merge`, through :meth:`ortq.core.metric.Metric.merge`).
    """

    pairs: list[tuple[str, Metric, Metric]]
    samples: int = 0
    batches: int = 0
    first_feed: dict[str, np.ndarray] | None = None
    exhausted: bool = True

    def merge(self, other: "Scored") -> "Scored":
        for (_, float_metric, quant_metric), (_, other_float, other_quant) in zip(self.pairs, other.pairs):
            float_metric.merge(other_float)
            quant_metric.merge(other_quant)
        self.samples += other.samples
        self.batches += other.batches
        self.first_feed = self.first_feed if self.first_feed is not None else other.first_feed
        return self


def score_batches(
    models: ModelPair,
    batches: Any,
    pairs: list[tuple[str, Metric, Metric]],
    label_array: np.ndarray | None = None,
    max_samples: int | None = None,
    trim: bool = True,
) -> Scored:
    """Run both models on every batch and feed each metric pair (float baseline, quantized model)."""
    scored = Scored(pairs)
    for feed in batches:
        count = feed_samples(feed)
        if max_samples is not None and trim and scored.samples + count > max_samples:
            count = max_samples - scored.samples
            feed = {name: value[:count] for name, value in feed.items()}
        batch_labels = _batch_labels(label_array, scored.samples, count)
        reference = _run(models.float_session, models.output_names, feed, models.float_name, scored.batches)
        candidate = _run(models.quant_session, models.output_names, feed, models.quant_name, scored.batches)
        for _, float_metric, quant_metric in pairs:
            float_metric.update(reference, reference, batch_labels)
            quant_metric.update(reference, candidate, batch_labels)
        if scored.first_feed is None:
            scored.first_feed = feed
        scored.samples += count
        scored.batches += 1
        if max_samples is not None and scored.samples >= max_samples:
            scored.exhausted = False
            break
    return scored


def finish_report(report: EvaluationReport, scored: Scored, float_loaded: LoadedModel, quant_loaded: LoadedModel,
                  sessions: ModelPair, latency_runs: int, trim: bool) -> EvaluationReport:
    """The report's metrics from ``scored``, sizes from the models, and latency on the first feed."""
    report.samples, report.batches = scored.samples, scored.batches
    pairs, first_feed = scored.pairs, scored.first_feed
    for label, float_metric, quant_metric in pairs:
        report.metrics.append(MetricResult(
            float_metric.name, label, float(float_metric.result()), float(quant_metric.result()),
            float_metric.higher_is_better, getattr(float_metric, "unit", ""),
        ))
    report.float_size, report.quantized_size = _size(float_loaded), _size(quant_loaded)
    if latency_runs and first_feed is not None:
        feed = {name: value[:1] for name, value in first_feed.items()} if trim else first_feed
        report.latency_batch = feed_samples(feed)
        report.float_latency_ms, report.quantized_latency_ms = _interleaved_latency(
            sessions.float_session, sessions.quant_session, sessions.output_names, feed, latency_runs
        )
        report.latency_runs = latency_runs
    log.info("evaluated %s against %s on %d sample(s)", sessions.quant_name, sessions.float_name, report.samples)
    return report


# -- metrics ---------------------------------------------------------------------------------------------
def parse_metric_spec(text: str) -> tuple[str, dict[str, str]]:
    """``"name"`` or ``"name:key=value,key=value"`` -> (name, options); the CLI's ``--metric`` syntax."""
    name, _, rest = text.partition(":")
    options: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"metric {text!r}: expected name:key=value[,key=value], got {pair!r}")
        options[key.strip()] = value.strip()
    if not name.strip():
        raise ConfigError(f"metric {text!r}: no metric name")
    return name.strip(), options


def make_metric_pairs(toolkit: PluginHost, specs: Sequence[MetricSpec]) -> list[tuple[str, Metric, Metric]]:
    """(report label, metric for the float baseline, metric for the quantized model) per spec, fresh."""
    return [_make_metric_pair(toolkit, spec) for spec in specs]


def _make_metric_pair(toolkit: PluginHost, spec: MetricSpec) -> tuple[str, Metric, Metric]:
    """(report label, metric for the float baseline, metric for the quantized model)."""
    if isinstance(spec, Metric):
        first, second = copy.deepcopy(spec), copy.deepcopy(spec)
        first.reset()
        second.reset()
        return spec.name, first, second
    if isinstance(spec, str):
        name, options = parse_metric_spec(spec)
    else:
        name, options = spec[0], dict(spec[1])
    label = name if not options else f"{name}:" + ",".join(f"{k}={v}" for k, v in options.items())
    return label, toolkit.metric(name, **options), toolkit.metric(name, **options)


def default_metrics(model: onnx.ModelProto, has_labels: bool) -> list[str]:
    names = list(DEFAULT_METRICS)
    if not _has_class_axis(model.graph.output[0]):
        names.remove("top1")
    if has_labels:
        names.insert(0, "accuracy")
    return names


def _has_class_axis(output: onnx.ValueInfoProto) -> bool:
    """Rank >= 2 with a last axis that is unknown or at least 2 wide: worth a top-1 agreement."""
    tensor_type = output.type.tensor_type
    if not tensor_type.HasField("shape") or len(tensor_type.shape.dim) < 2:
        return False
    last = tensor_type.shape.dim[-1]
    return not last.HasField("dim_value") or last.dim_value >= 2


# -- labels ----------------------------------------------------------------------------------------------
def resolve_labels(labels: Any, data: Any) -> tuple[np.ndarray | None, Any]:
    """The label array, and the data without it when the labels were an array inside the data."""
    if labels is None:
        return None, data
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        if path.is_file():
            return _check_labels(_load_label_file(path), str(path)), data
        key = str(labels)
        if isinstance(data, Mapping) and key in data:
            rest = {name: value for name, value in data.items() if name != key}
            return _check_labels(np.asarray(data[key]), f"data array {key!r}"), rest
        if isinstance(data, (str, os.PathLike)) and Path(data).is_file() and Path(data).suffix == ".npz":
            arrays = load_npz(Path(data))
            if key in arrays:
                label_array = arrays.pop(key)
                return _check_labels(label_array, f"{data}: array {key!r}"), arrays
            raise ConfigError(f"labels {key!r}: no such file, and {data} has no array {key!r} (it has {sorted(arrays)})")
        raise ConfigError(f"labels {key!r}: no such file, and not the name of an array in the data")
    return _check_labels(np.asarray(labels), "labels"), data


def _load_label_file(path: Path) -> np.ndarray:
    """Labels are data: read with the data readers, so a broken file is the same one-line error."""
    if path.suffix == ".npy":
        return load_npy(path)
    if path.suffix == ".npz":
        arrays = load_npz(path)
        if len(arrays) == 1:
            return next(iter(arrays.values()))
        for key in ("label", "labels"):
            if key in arrays:
                return arrays[key]
        raise ConfigError(f"{path}: holds {sorted(arrays)}; a labels .npz needs one array, or one named 'label' or 'labels'")
    raise ConfigError(f"{path}: labels must be a .npy or .npz file")


def _check_labels(array: np.ndarray, where: str) -> np.ndarray:
    if array.ndim == 0:
        raise ConfigError(f"{where}: labels need one entry per sample along axis 0, got a scalar")
    return array


def _batch_labels(labels: np.ndarray | None, start: int, count: int) -> np.ndarray | None:
    if labels is None:
        return None
    if start + count > len(labels):
        raise ConfigError(f"labels hold {len(labels)} entries, but the data has more samples (at least {start + count})")
    return labels[start : start + count]


# -- models and sessions ---------------------------------------------------------------------------------
def _describe_model(model: Any) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else f"<{getattr(model.graph, 'name', '') or 'ModelProto'}>"


def check_same_interface(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                          float_name: str, quant_name: str) -> list[InputSpec]:
    """Both models must take the same feeds and name the same outputs, or the comparison means nothing."""
    float_inputs, quant_inputs = model_inputs(float_model), model_inputs(quant_model)
    f_in = {spec.name: spec.dtype for spec in float_inputs}
    q_in = {spec.name: spec.dtype for spec in quant_inputs}
    if f_in != q_in:
        raise ModelError(
            f"{quant_name} and {float_name} take different inputs: {_signature(q_in)} vs {_signature(f_in)}"
        )
    f_out = [o.name for o in float_model.graph.output]
    q_out = [o.name for o in quant_model.graph.output]
    if sorted(f_out) != sorted(q_out):
        raise ModelError(f"{quant_name} and {float_name} have different outputs: {q_out} vs {f_out}")
    return float_inputs


def _signature(inputs: Mapping[str, np.dtype]) -> str:
    return "{" + ", ".join(f"{name}: {dtype}" for name, dtype in sorted(inputs.items())) + "}"


def model_session(model: onnx.ModelProto, name: str, providers: Sequence[Any] | None, threads: int) -> Any:
    from ortq.pipeline.verify import make_session

    try:
        return make_session(model, providers, threads=threads)
    except Exception as exc:
        raise ModelError(f"{name}: ONNX Runtime cannot load it: {exc}") from None


def _run(session: Any, names: list[str], feed: dict[str, np.ndarray], model: str, batch: int) -> dict[str, np.ndarray]:
    try:
        values = session.run(names, feed)
    except Exception as exc:
        raise ModelError(f"{model}: ONNX Runtime failed on evaluation batch {batch}: {exc}") from None
    return dict(zip(names, values))


def _size(loaded: LoadedModel) -> int:
    """Bytes on disk (model file plus its external data) for a file, the serialized size for a proto."""
    if loaded.source is not None:
        return loaded.source.stat().st_size + sum(path.stat().st_size for path in set(loaded.external_files))
    return model_size(loaded.model)


def _interleaved_latency(first: Any, second: Any, names: list[str], feed: dict[str, np.ndarray],
                         runs: int) -> tuple[float, float]:
    """Median milliseconds of each session, alternating which goes first so drift and caches hit both alike."""
    for _ in range(_WARMUP_RUNS):
        first.run(names, feed)
        second.run(names, feed)
    times: tuple[list[float], list[float]] = ([], [])
    sessions = (first, second)
    for index in range(runs):
        order = (0, 1) if index % 2 == 0 else (1, 0)
        for which in order:
            start = time.perf_counter()
            sessions[which].run(names, feed)
            times[which].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


# -- formatting ------------------------------------------------------------------------------------------
def _json_number(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _fmt(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return f"{value} {unit}".strip()
    if unit == "%":
        return f"{value * 100:.2f}%"
    if unit == "dB":
        return f"{value:.2f} dB"
    return f"{value:.6g}"


def _fmt_drop(value: float, unit: str) -> str:
    if unit == "%" and math.isfinite(value):
        return f"{value * 100:+.2f} pts"
    if unit == "dB" and math.isfinite(value):
        return f"{value:+.2f} dB"
    return f"{value:+.6g}" if math.isfinite(value) else str(value)
