"""ONNX Runtime drop-in behaviours (issue 13): each one a small model of ortq's own, checked numerically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run, tiny_cnn, tiny_data
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq import compat
from ortq.core.error_measures import sqnr_db


class Reader(compat.CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)

    def get_next(self):
        return self.feeds.pop(0) if self.feeds else None


def _cnn_reader(n: int = 16, seed: int = 1) -> Reader:
    x = tiny_data(n, seed)["x"]
    return Reader([{"x": x[i : i + 4]} for i in range(0, n, 4)])


def _matmul_model(dims: list) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 4])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _sqnr(model, quantized, feeds: dict[str, np.ndarray]) -> float:
    return sqnr_db(run(model, feeds)[0], run(quantized, feeds)[0])


def test_minus_one_dim_is_dynamic(tmp_path: Path) -> None:
    model = _matmul_model([-1, 10])
    onnx.checker.check_model(model, full_check=True)  # -1 passes the checker, so it must be accepted
    x = np.random.default_rng(1).standard_normal((5, 10)).astype(np.float32)
    compat.quantize_static(model, tmp_path / "q.onnx", Reader([{"input": x}]))
    q = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(q, full_check=True)
    assert _sqnr(model, q, {"input": x}) > 30


def test_errors_are_the_builtin_exceptions_onnxruntime_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        compat.quantize_static(tiny_cnn(), tmp_path / "q.onnx", None)
    with pytest.raises(FileNotFoundError, match="no-such.onnx"):
        compat.quantize_static(tmp_path / "no-such.onnx", tmp_path / "q.onnx", _cnn_reader())
    with pytest.raises(ValueError, match="extra_options"):
        compat.quantize_static(tiny_cnn(), tmp_path / "q.onnx", _cnn_reader(), extra_options={"BlockSize": "x"})
    assert not (tmp_path / "q.onnx").exists()
    assert issubclass(ortq.CalibrationDataError, ValueError) and issubclass(ortq.ConfigError, ValueError)


def test_scalar_parameters_are_stored_in_typed_fields(tmp_path: Path) -> None:
    compat.quantize_static(tiny_cnn(), tmp_path / "q.onnx", _cnn_reader(), activation_type=compat.QuantType.QUInt8)
    inits = {i.name: i for i in onnx.load(tmp_path / "q.onnx").graph.initializer}
    assert inits["x_zero_point"].int32_data and not inits["x_zero_point"].raw_data
    assert inits["x_scale"].float_data and numpy_helper.to_array(inits["x_scale"]).dtype == np.float32
