"""Float16 models: observed through a float32 cast, quantized with float16 scales (opset-19 Q/DQ)."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import run, tiny_cnn
from onnx import TensorProto, numpy_helper

import ortq
from ortq.core.error_measures import sqnr_db


def _to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for init in half.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for vi in (*half.graph.input, *half.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(half)
    return half


def test_float16_model_calibrates_and_quantizes(toolkit: ortq.Toolkit) -> None:
    model = _to_float16(tiny_cnn())
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((32, 3, 8, 8)).astype(np.float16)}
    state = toolkit.calibrate(model, data)
    assert {"x", "r1"} <= set(state.statistics)
    assert state.statistics["x"].min == float(data["x"].min())

    result = toolkit.quantize(model, calibration_data=data)
    q = result.model
    onnx.checker.check_model(q, full_check=True)
    assert q.opset_import[0].version >= 19
    assert set(result.plan.quantized_nodes) == {"conv", "relu", "gap", "flatten", "fc"}
    scales = [i for i in q.graph.initializer if i.name.endswith("_scale")]
    assert scales and all(i.data_type == TensorProto.FLOAT16 for i in scales)
    evaluation = {"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float16)}
    reference, actual = run(model, evaluation)[0], run(q, evaluation)[0]
    assert actual.dtype == np.float16
    assert sqnr_db(reference, actual) > 25
