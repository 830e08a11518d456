"""Stage 3: run a copy of the model with in-graph observers over the calibration data.

The observed copy gets one observer sink right after each planned tensor's producer; the session runs
with priority-based execution order so each observer runs as soon as its tensor exists, keeping peak
memory at one batch of activations (see ``custom_ops/observers.py``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from ortq.core.errors import CalibrationError, OrtqError
from ortq.io.model_io import session_source

if TYPE_CHECKING:
    import onnxruntime as ort

    from ortq.core.calibrator import Calibrator, Statistic
    from ortq.core.graph import GraphIndex

__all__ = ["CalibrationResult", "ObservedSession", "run_calibration", "build_observed_model"]

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass
class CalibrationResult:
    statistics: dict[str, "Statistic"]
    batches: int
    samples: int
    #: The first batches' feeds and float outputs, kept for verification: observers do not change values,
    #: so the observed model's outputs are the float model's and verification need not run it again.
    kept_feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    kept_outputs: list[dict[str, np.ndarray]] = field(default_factory=list)


def build_observed_model(
    model: onnx.ModelProto, index: GraphIndex, tensors: Sequence[str], token: str
) -> onnx.ModelProto:
    """A copy of ``model`` with an observer sink inserted right after each tensor's producer."""
    observed = onnx.ModelProto()
    observed.CopyFrom(model)
    _insert_observers(observed, index, tensors, token)
    return observed


@contextlib.contextmanager
def _observers_inserted(
    model: onnx.ModelProto, index: GraphIndex, tensors: Sequence[str], token: str
) -> Iterator[onnx.ModelProto]:
    """``model`` itself with observers, restored on exit: no second copy of the weights is ever made."""
    nodes = list(model.graph.node)
    opsets = list(model.opset_import)
    try:
        _insert_observers(model, index, tensors, token)
        yield model
    finally:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        del model.opset_import[:]
        model.opset_import.extend(opsets)


def _insert_observers(model: onnx.ModelProto, index: GraphIndex, tensors: Sequence[str], token: str) -> None:
    from ortq.custom_ops.observers import OBSERVER_DOMAIN, OBSERVER_OP

    position = {name: i for i, name in enumerate(tensors)}
    graph = model.graph
    nodes = list(graph.node)
    del graph.node[:]

    def observers_for(names: Iterable[str]) -> list[onnx.NodeProto]:
        made = []
        for name in names:
            if name not in position:
                continue
            source = name
            if index.elem_type(name) != onnx.TensorProto.FLOAT:
                # Float16/bfloat16 inputs abort onnxruntime-extensions' Python ops: observe a float copy.
                source = f"{name}__ortq_f32"
                made.append(helper.make_node("Cast", [name], [source], to=onnx.TensorProto.FLOAT))
            made.append(
                helper.make_node(
                    OBSERVER_OP,
                    [source],
                    [f"{name}__ortq_observed"],
                    name=f"{name}__ortq_observer",
                    domain=OBSERVER_DOMAIN,
                    token=token,
                    index=position[name],
                )
            )
        return made

    graph.node.extend(observers_for(vi.name for vi in graph.input))
    graph.node.extend(observers_for(index.initializers.keys() & position.keys()))
    for node in nodes:
        graph.node.append(node)
        graph.node.extend(observers_for(node.output))
    if not any(imp.domain == OBSERVER_DOMAIN for imp in model.opset_import):
        model.opset_import.append(helper.make_opsetid(OBSERVER_DOMAIN, 1))


def run_calibration(
    model: onnx.ModelProto,
    index: GraphIndex,
    tensors: Sequence[str],
    calibrator: Calibrator,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    providers: Sequence[Any] | None = None,
    session_options: "ort.SessionOptions | None" = None,
    progress: Progress | None = None,
    keep_samples: int = 0,
    extra_updates: Mapping[str, Callable[[np.ndarray], None]] | None = None,
) -> CalibrationResult:
    """Feed every batch through the observed model and return one statistic per tensor.

    The first ``keep_samples`` samples' feeds and outputs are kept in the result for verification.
    ``extra_updates`` adds, per observed tensor, a function that also sees each batch's values in the same
    pass (per-channel means for bias correction, second moments for weight rounding); they must keep
    flat-size state.
    Observer nodes are added to ``model`` only while it is serialized for the session, then removed, so
    the weights are never copied; do not share ``model`` with another thread during the call. A model over
    the protobuf limit reaches ONNX Runtime through a temporary file with external data.
    """
    session = ObservedSession(
        model, index, tensors, calibrator, providers=providers, session_options=session_options,
        extra_updates=extra_updates,
    )
    return session.observe(batches, progress=progress, keep_samples=keep_samples)


class ObservedSession:
    """The observed model loaded once in ONNX Runtime, able to calibrate any number of data sources.

    Each :meth:`observe` call starts from fresh statistics, so one session serves many shards (a worker
    of a distributed calibration builds it once and returns one mergeable result per shard).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        index: GraphIndex,
        tensors: Sequence[str],
        calibrator: Calibrator,
        *,
        providers: Sequence[Any] | None = None,
        session_options: "ort.SessionOptions | None" = None,
        extra_updates: Mapping[str, Callable[[np.ndarray], None]] | None = None,
    ) -> None:
        import onnxruntime as ort

        from ortq.custom_ops.observers import ObserverSink, library_path

        self.tensors = list(tensors)
        self._calibrator = calibrator
        self._statistics: dict[str, Statistic] = {}
        self._extra = dict(extra_updates or {})
        self._sink = ObserverSink(self.tensors, [self._updater(name) for name in self.tensors])
        so = session_options if session_options is not None else ort.SessionOptions()
        so.register_custom_ops_library(library_path())
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        if session_options is None:
            # ENABLE_ALL would add a layout copy per observed tensor; extended keeps the fusions that matter.
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        with contextlib.ExitStack() as cleanup:
            # Bytes, or above the protobuf limit a temporary file with external data (removed once the session
            # has read it); either way written while the observers are in place.
            with _observers_inserted(model, index, self.tensors, self._sink.token) as observed:
                source = cleanup.enter_context(session_source(observed))
            try:
                self._session = ort.InferenceSession(source, so, providers=list(providers or ["CPUExecutionProvider"]))
            except Exception as exc:
                raise CalibrationError(f"ONNX Runtime cannot load the model for calibration: {exc}") from None
            del source
        self._fetch = [o.name for o in model.graph.output]  # ONNX Runtime runs every node, sinks included

    def _updater(self, name: str) -> Callable[[np.ndarray], None]:
        extra = self._extra.get(name)
        if extra is None:
            return lambda values: self._statistics[name].update(values)

        def update(values: np.ndarray) -> None:
            self._statistics[name].update(values)
            extra(values)

        return update

    def observe(
        self,
        batches: Iterable[dict[str, np.ndarray]],
        *,
        progress: Progress | None = None,
        keep_samples: int = 0,
    ) -> CalibrationResult:
        """Statistics of ``batches`` alone (fresh for every call); raises if they hold no batch."""
        from ortq.custom_ops.observers import DeferredInterrupts

        self._statistics = {name: self._calibrator.create_statistic(name) for name in self.tensors}
        self._sink.error = None
        result = CalibrationResult(self._statistics, 0, 0)
        # Ctrl-C is held back while the observers (Python ops) run and raised between batches: landing
        # inside an op it would abort the process (see custom_ops/observers.py).
        with self._sink, DeferredInterrupts() as interrupts:
            for feed in batches:
                try:
                    outputs = self._session.run(self._fetch, feed)
                except OrtqError:
                    raise
                except Exception as exc:
                    raise CalibrationError(f"calibration batch {result.batches}: ONNX Runtime failed: {exc}") from None
                interrupts.check()
                if self._sink.error is not None:
                    tensor, exc = self._sink.error
                    if isinstance(exc, KeyboardInterrupt):
                        raise KeyboardInterrupt from None
                    raise CalibrationError(
                        f"observer for tensor {tensor!r} failed on calibration batch {result.batches}: {exc!r}"
                    ) from exc
                if result.samples < keep_samples:
                    result.kept_feeds.append(feed)
                    result.kept_outputs.append(dict(zip(self._fetch, outputs)))
                result.batches += 1
                result.samples += _batch_size(feed)
                if progress is not None:
                    progress(_batch_size(feed))
        if result.batches == 0:
            raise CalibrationError("the calibration data produced no batches")
        return result


def _batch_size(feed: dict[str, np.ndarray]) -> int:
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1
