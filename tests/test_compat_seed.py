"""The 2020 ONNX Runtime API (``quantize(model_proto, quantization_mode=...)``, ``calibrate(...)``) on a small
ResNet-style model, written as that API's own document shows it, checked against the float model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from models import resnet_like, run_float

from ortq import compat
from ortq.compat import QuantizationMode, calibrate, quantize
from ortq.core.error_measures import sqnr_db


class ResNetDataReader(compat.CalibrationDataReader):
    def __init__(self, images: np.ndarray) -> None:
        self.feeds = iter([{"input": images[i : i + 8]} for i in range(0, len(images), 8)])

    def get_next(self):
        return next(self.feeds, None)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    model, calib, evaluation = resnet_like(n_calibration=32, n_evaluation=32)
    path = tmp_path_factory.mktemp("seed") / "resnet.onnx"
    onnx.save(model, path)
    return model, path, calib["input"], evaluation


def _sqnr(model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: dict) -> float:
    onnx.checker.check_model(quantized, full_check=True)
    return sqnr_db(run_float(model, feeds)[0], run_float(quantized, feeds)[0])


def test_dynamic_integer_ops(resnet) -> None:
    model, _, _, evaluation = resnet
    before = model.SerializeToString()
    quantized = quantize(model, quantization_mode=QuantizationMode.IntegerOps)
    assert isinstance(quantized, onnx.ModelProto) and model.SerializeToString() == before
    ops = {n.op_type for n in quantized.graph.node}
    assert "ConvInteger" in ops and "Conv" not in ops
    assert _sqnr(model, quantized, evaluation) > 20


def test_calibrate_then_qlinear_ops(resnet, tmp_path: Path) -> None:
    model, path, calib, evaluation = resnet
    params = calibrate(str(path), ResNetDataReader(calib), augmented_model_path=str(tmp_path / "aug.onnx"))
    assert params["input"][0].dtype == np.uint8 and params["input"][1].dtype == np.float32
    assert not (tmp_path / "aug.onnx").exists()
    quantized = quantize(model, quantization_mode=QuantizationMode.QLinearOps, static=True, quantization_params=params)
    ops = {n.op_type for n in quantized.graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops
    assert _sqnr(model, quantized, evaluation) > 20


def test_static_integer_ops_needs_only_the_inputs(resnet) -> None:
    model, path, calib, evaluation = resnet
    params = calibrate(str(path), ResNetDataReader(calib))
    conv_inputs = {n.input[0] for n in model.graph.node if n.op_type in ("Conv", "MatMul")}
    quantized = quantize(
        model, quantization_mode=QuantizationMode.IntegerOps, static=True,
        quantization_params={k: v for k, v in params.items() if k in conv_inputs},
    )
    assert _sqnr(model, quantized, evaluation) > 20


def test_black_and_white_nodes(resnet) -> None:
    model, path, calib, _ = resnet
    first_conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    params = calibrate(str(path), ResNetDataReader(calib), black_nodes=first_conv, white_nodes="fc")
    assert "input" not in params  # only the first Conv reads the image
    assert next(n.input[0] for n in model.graph.node if n.name == "fc") in params


def test_refusals_name_the_option(resnet) -> None:
    model = resnet[0]
    with pytest.raises(ValueError, match="nbits=4"):
        quantize(model, nbits=4)
    with pytest.raises(ValueError, match="QLinearOps with static=False"):
        quantize(model, quantization_mode=QuantizationMode.QLinearOps, quantization_params={"input": [np.uint8(0), np.float32(0.1)]})
    with pytest.raises(ValueError, match="needs quantization_params"):
        quantize(model, quantization_mode=QuantizationMode.QLinearOps, static=True)
