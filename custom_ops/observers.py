"""Calibration observers as onnxruntime-extensions Python custom ops.

An observer node is a sink placed right after the tensor's producer: ONNX Runtime hands it each batch's
tensor and it folds the values into a statistic, so no activation outlives its consumers and memory stays
flat however many samples are calibrated (ONNX Runtime's own calibrators add every observed tensor as a
graph output and keep them all).

The onnxruntime-extensions op table is process-global and append-only, and an exception escaping a
Python op terminates the process. Hence:

- the op types are defined once, when this module is first imported, and never again;
- each calibration gets a fresh token; observer nodes carry it as an attribute and this module routes
  values to the matching :class:`ObserverSink`, so concurrent calibrations never mix statistics;
- the op body catches everything, records the first error on the sink, and always returns the one 0-d
  output it declares; the engine re-raises the recorded error in Python after ``run()``.
"""

from __future__ import annotations

import threading
import uuid
from typing import Callable, Sequence

import numpy as np
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

__all__ = ["OBSERVER_DOMAIN", "OBSERVER_OP", "ObserverSink", "library_path"]

OBSERVER_DOMAIN = "ai.onnx.contrib"
OBSERVER_OP = "OrtqObserver"

_sinks: dict[str, "ObserverSink"] = {}
_sinks_lock = threading.Lock()
_NOTHING = np.zeros((), dtype=np.float32)


class ObserverSink:
    """Receives the observed tensors of one calibration and feeds them to per-tensor update functions."""

    def __init__(self, tensors: Sequence[str], update: Sequence[Callable[[np.ndarray], None]]) -> None:
        self.tensors = list(tensors)
        self._update = list(update)
        self._lock = threading.Lock()
        self.error: tuple[str, BaseException] | None = None
        self.token = uuid.uuid4().hex

    def observe(self, index: int, values: np.ndarray) -> None:
        with self._lock:
            if self.error is not None:
                return
            try:
                self._update[index](values)
            except BaseException as exc:  # anything escaping the op kills the process
                self.error = (self.tensors[index], exc)

    def __enter__(self) -> "ObserverSink":
        with _sinks_lock:
            _sinks[self.token] = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        with _sinks_lock:
            _sinks.pop(self.token, None)


@onnx_op(
    op_type=OBSERVER_OP,
    inputs=[PyCustomOpDef.dt_float],
    outputs=[PyCustomOpDef.dt_float],
    attrs={"token": PyCustomOpDef.dt_string, "index": PyCustomOpDef.dt_int64},
)
def _observer(values, **attrs):  # noqa: ANN001, ANN202 - signature fixed by onnxruntime-extensions
    try:
        sink = _sinks.get(attrs["token"])
        if sink is not None:
            sink.observe(int(attrs["index"]), values)
    except BaseException:  # pragma: no cover - observe() already guards; this is the last line of defence
        pass
    return _NOTHING


def library_path() -> str:
    """The shared library to pass to ``SessionOptions.register_custom_ops_library``."""
    return get_library_path()
