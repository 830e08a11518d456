"""``ortq.quantize_static`` is a drop-in for ``onnxruntime.quantization.quantize_static``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run, tiny_cnn, tiny_data

import ortq
from ortq.core.error_measures import sqnr_db


class Reader:
    """Written against ONNX Runtime's CalibrationDataReader protocol, as users already have it."""

    def __init__(self, data: dict[str, np.ndarray], batch: int = 4) -> None:
        self.batches = [{"x": data["x"][i : i + batch]} for i in range(0, len(data["x"]), batch)]

    def get_next(self):
        return self.batches.pop(0) if self.batches else None


def _float_ref(model: onnx.ModelProto, data: dict[str, np.ndarray], quantized: Path) -> float:
    return sqnr_db(run(model, data)[0], run(quantized, data)[0])


def test_same_call_as_onnxruntime_gives_a_model_at_least_as_accurate(tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class OrtReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.inner = Reader(tiny_data(64, seed=3))

        def get_next(self):
            return self.inner.get_next()

    model = tiny_cnn()
    model_path = tmp_path / "m.onnx"
    onnx.save(model, model_path)
    kwargs = dict(
        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
    )
    quantize_static(str(model_path), str(tmp_path / "ort.onnx"), OrtReader(), **kwargs)
    ortq.quantize_static(str(model_path), str(tmp_path / "ortq.onnx"), OrtReader(), **kwargs)
    onnx.checker.check_model(onnx.load(tmp_path / "ortq.onnx"), full_check=True)
    evaluation = tiny_data(64, seed=9)
    ours, theirs = _float_ref(model, evaluation, tmp_path / "ortq.onnx"), _float_ref(model, evaluation, tmp_path / "ort.onnx")
    assert ours >= theirs - 0.5, (ours, theirs)
    assert ours > 30


def test_onnxruntime_defaults_are_kept(tmp_path: Path) -> None:
    result = ortq.quantize_static(tiny_cnn(), tmp_path / "q.onnx", Reader(tiny_data()))
    assert result.config.activation.qtype is ortq.QuantType.INT8  # ONNX Runtime's default, not the cpu target's
    assert not result.config.per_channel
    dq_axes = [a for n in result.model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert dq_axes == [] and result.model.opset_import[0].version == 13


def test_extra_options_are_mapped_or_refused(tmp_path: Path) -> None:
    result = ortq.quantize_static(
        tiny_cnn(), tmp_path / "q.onnx", Reader(tiny_data()),
        extra_options={"ActivationSymmetric": True, "CalibTensorRangeSymmetric": True, "CalibMaxIntermediateOutputs": 4},
    )
    assert result.config.activation.symmetric
    lo, hi = result.ranges["x"]
    assert lo == -hi
    with pytest.raises(ortq.ConfigError, match=r"extra_options\['SmoothQuant'\]=True is not supported: SmoothQuant is not implemented"):
        ortq.quantize_static(tiny_cnn(), tmp_path / "q.onnx", Reader(tiny_data()), extra_options={"SmoothQuant": True})
    with pytest.raises(ortq.ConfigError, match="DedicatedQDQPair"):
        ortq.quantize_static(tiny_cnn(), tmp_path / "q.onnx", Reader(tiny_data()), extra_options={"DedicatedQDQPair": True})


def test_unsupported_formats_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ortq.ConfigError, match="quant_format='QLinear' is not QuantFormat.QDQ or QuantFormat.QOperator"):
        ortq.quantize_static(tiny_cnn(), tmp_path / "q.onnx", Reader(tiny_data()), quant_format="QLinear")
    with pytest.raises(ortq.ConfigError, match="Distribution .* is not implemented"):
        ortq.quantize_static(
            tiny_cnn(), tmp_path / "q.onnx", Reader(tiny_data()), calibrate_method=ortq.CalibrationMethod.Distribution
        )
    assert not list(tmp_path.iterdir())
