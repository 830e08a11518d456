"""ONNX Runtime's calibration surface: its range cache file, ``create_calibrator`` and
``write_calibration_table``, for code that calibrates once and quantizes later.

The cache is ONNX Runtime's JSON format (``TensorsData``: per tensor ``lowest``/``highest``, the calibration
method, ``smooth_quant``), so a cache written by either tool is read by the other. ortq's own equivalent,
which keeps the statistics rather than final ranges (so shards can be merged and the calibrator changed
later), is :class:`ortq.CalibrationState` (``ortq calibrate``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ortq.core.calibrator import MinMaxStatistic
from ortq.core.errors import CalibrationDataError, ConfigError
from ortq.io.model_io import read_model
from ortq.io.state import CalibrationState, model_fingerprint

__all__ = ["load_range_cache", "save_range_cache", "create_calibrator", "write_calibration_table", "OrtqCalibrator"]

log = logging.getLogger(__name__)


def _array(value: float) -> dict[str, Any]:
    return {"data": float(value), "dtype": "float32", "CLS": "numpy.array"}


def save_range_cache(path: str | os.PathLike, ranges: Mapping[str, tuple[float, float]], method: str) -> None:
    """Write ``ranges`` in ONNX Runtime's cache format, atomically (a temporary file renamed into place)."""
    path = Path(path)
    payload = {
        "CLS": "TensorsData",
        "data": {
            name: {"lowest": _array(lo), "highest": _array(hi), "CLS": "TensorData"} for name, (lo, hi) in ranges.items()
        },
        "calibration_method": {"CLS": "CalibrationMethod", "value": f"CalibrationMethod.{method}"},
        "smooth_quant": False,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_range_cache(path: str | os.PathLike) -> tuple[str, dict[str, tuple[float, float]]]:
    """(calibration method name, per-tensor (lowest, highest)) from an ONNX Runtime cache file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration cache {str(path)!r} does not exist or is not a file")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        method = str(payload["calibration_method"]["value"]).rpartition(".")[2]
        ranges = {}
        for name, entry in payload["data"].items():
            lo, hi = entry.get("lowest"), entry.get("highest")
            if lo is None or hi is None:
                raise KeyError(f"{name}: no lowest/highest")
            ranges[name] = (float(np.min(lo["data"])), float(np.max(hi["data"])))
    except (ValueError, KeyError, TypeError) as exc:
        raise CalibrationDataError(f"calibration cache {str(path)!r} is not an ONNX Runtime range cache: {exc}") from None
    if payload.get("smooth_quant"):
        raise ConfigError(f"calibration cache {str(path)!r} was made with SmoothQuant, which ortq does not implement")
    return method, ranges


def load_range_cache(path: str | os.PathLike, model: Any, method: str) -> CalibrationState:
    """The cache as a calibration state for ``model`` (its ranges as min/max statistics).

    A cache made with another calibration method is a ``ValueError``, as in ONNX Runtime: its ranges would
    silently stand for a method that was not run.
    """
    cached_method, ranges = read_range_cache(path)
    if cached_method != method:
        raise ConfigError(
            f"calibration cache {str(path)!r} was made with CalibrationMethod.{cached_method}, not {method}; "
            "delete it or pass the method that made it"
        )
    statistics = {}
    for name, (lo, hi) in ranges.items():
        stat = MinMaxStatistic()
        stat.min, stat.max, stat.batches, stat.count = lo, hi, 1, 1
        statistics[name] = stat
    loaded = read_model(model)
    return CalibrationState(model_fingerprint(loaded.model), "minmax", statistics, 0, 0, loaded.model.graph.name)


#: ONNX Runtime's calibrator extra_options that ortq's calibrators read under the same names.
_CALIBRATOR_OPTIONS = frozenset({"symmetric", "moving_average", "averaging_constant", "percentile", "num_quantized_bins"})


class OrtqCalibrator:
    """What ``create_calibrator`` returns: ONNX Runtime's calibrator protocol (``collect_data(reader)``, then
    ``compute_data()`` for per-tensor ranges) over ortq's streaming calibration of the tensors ortq's
    quantizer would observe (or all float outputs of ``op_types_to_calibrate``)."""

    def __init__(self, model: Any, op_types_to_calibrate: Sequence[str] | None, method: str,
                 providers: Sequence[Any] | None, extra_options: Mapping[str, Any] | None) -> None:
        from ortq.api.toolkit import Toolkit

        self.model, self.method, self.providers = model, method, providers
        self.op_types = list(op_types_to_calibrate) if op_types_to_calibrate else None
        self.calibrator_options = {}
        for key, value in (extra_options or {}).items():
            if key not in _CALIBRATOR_OPTIONS:
                log.warning("create_calibrator: option %r is not used by ortq's calibrators; ignored", key)
                continue
            self.calibrator_options[key] = value
        self._toolkit = Toolkit()
        self._state: CalibrationState | None = None

    def collect_data(self, data_reader: Any) -> None:
        state = self._toolkit.calibrate(
            self.model, data_reader, calibrate_method=self.method, calibrator_options=self.calibrator_options or None,
            op_types_to_quantize=self.op_types, providers=self.providers,
        )
        self._state = state if self._state is None else self._state.merge(state)

    def compute_data(self) -> dict[str, tuple[float, float]]:
        """Per-tensor (min, max) ranges (ONNX Runtime returns ``TensorsData``; ortq returns a plain dict)."""
        if self._state is None:
            raise CalibrationDataError("compute_data() before collect_data(): no calibration data was read")
        calibrator = self._toolkit.calibrator(self.method, **self.calibrator_options)
        from ortq.core.scheme import QuantSpec, QuantType

        spec = QuantSpec(QuantType.UINT8)
        return {
            name: tuple(float(v) for v in calibrator.compute_range(name, stat, spec))
            for name, stat in self._state.statistics.items()
        }


def create_calibrator(
    model: str | os.PathLike | Any,
    op_types_to_calibrate: Sequence[str] | None = None,
    augmented_model_path: str = "augmented_model.onnx",
    calibrate_method: Any = None,
    use_external_data_format: bool = False,
    providers: Sequence[Any] | None = None,
    extra_options: Mapping[str, Any] | None = None,
) -> OrtqCalibrator:
    """Like ``onnxruntime.quantization.create_calibrator``. ortq never writes an augmented model (its observers
    are added in memory), so ``augmented_model_path`` and ``use_external_data_format`` are unused."""
    name = str(getattr(calibrate_method, "name", calibrate_method or "MinMax"))
    methods = {"MinMax": "minmax", "Entropy": "entropy", "Percentile": "percentile"}
    if name not in methods:
        raise ConfigError(f"calibrate_method={calibrate_method!r}: ortq implements {', '.join(methods)}")
    return OrtqCalibrator(model, op_types_to_calibrate, methods[name], providers, extra_options)


def write_calibration_table(calibration_cache: Mapping[str, Any], dir: str | os.PathLike = ".") -> None:  # noqa: A002
    """Write ranges for ONNX Runtime's TensorRT provider into ``dir``, as ONNX Runtime's function of that name
    does: ``calibration.json`` (the range cache format), ``calibration.flatbuffers`` (the table the TensorRT
    provider reads) and ``calibration.cache`` (``name value`` lines), where each value is the larger of the
    tensor's highest and lowest, in sorted name order.

    ``calibration_cache`` maps tensor names to (lowest, highest) pairs or to objects with ``range_value``
    (ONNX Runtime's ``TensorData``). The modern route is ``ortq export tensorrt``.
    """
    from ortq.plugins.backends.tensorrt import trt_table_bytes

    folder = Path(dir)
    ranges: dict[str, tuple[float, float]] = {}
    for name, value in calibration_cache.items():
        value = getattr(value, "range_value", value)
        ranges[name] = (float(np.min(value[0])), float(np.max(value[1])))
    save_range_cache(folder / "calibration.json", ranges, "MinMax")
    values = {name: str(max(hi, lo)) for name, (lo, hi) in ranges.items()}
    (folder / "calibration.flatbuffers").write_bytes(trt_table_bytes(values))
    (folder / "calibration.cache").write_text("".join(f"{k} {values[k]}\n" for k in sorted(values)), "utf-8")
