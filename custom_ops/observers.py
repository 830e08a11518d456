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
  output it declares; the engine re-raises the recorded error in Python after ``run()``;
- Ctrl-C must not land inside the op either: Python raises ``KeyboardInterrupt`` at whatever bytecode runs
  next, which may be onnxruntime-extensions' own wrapper around the op body, where nothing can catch it
  (measured: exit 134, ``pybind11::error_already_set``). :class:`DeferredInterrupts` replaces the SIGINT
  handler while observed sessions run with one that only records the signal; the calibration loop calls
  :meth:`DeferredInterrupts.check` between batches, which raises the ``KeyboardInterrupt`` there.
"""

from __future__ import annotations

import signal
import threading
import uuid
from typing import Callable, Sequence

import numpy as np
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

__all__ = ["OBSERVER_DOMAIN", "OBSERVER_OP", "ObserverSink", "DeferredInterrupts", "library_path"]

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


class DeferredInterrupts:
    """Hold back SIGINT while Python custom ops may run; deliver it at :meth:`check` or on exit.

    Only the main thread can install signal handlers, and only a Python-level handler is replaced (the
    default one that raises ``KeyboardInterrupt``, or the caller's own): an ignored or default-action
    SIGINT is left alone. Elsewhere this is a no-op, which is safe because Python delivers SIGINT to the
    main thread only. A recorded signal is delivered by calling the handler that was replaced, so a caller's
    own handler still sees it and the default one raises a catchable ``KeyboardInterrupt``.
    """

    def __init__(self) -> None:
        self._previous: object = None
        self._installed = False
        self._pending: tuple[int, object] | None = None

    def _record(self, signum: int, frame: object) -> None:
        if self._pending is None:  # the first Ctrl-C counts; a second one is the same request
            self._pending = (signum, frame)

    def __enter__(self) -> "DeferredInterrupts":
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):
                self._previous = previous
                signal.signal(signal.SIGINT, self._record)
                self._installed = True
        return self

    def check(self) -> None:
        """Deliver a recorded SIGINT now (call it between ``run()`` calls, outside any custom op)."""
        if self._pending is not None:
            signum, frame = self._pending
            self._pending = None
            self._previous(signum, frame)  # type: ignore[operator]

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            self._installed = False
        if exc_info[0] is None:
            self.check()


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
