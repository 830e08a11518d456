"""The QOperator format: integer kernels written into the model instead of Q/DQ around float ops.

Every model here passes onnx.checker's full check, runs in ONNX Runtime, and is compared numerically with
the QDQ model it came from (the same calibration) and with the float model.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.api.cli import build_cli
from ortq.core.error_measures import sqnr_db
from ortq.pipeline.rewrite_qoperator import convert_to_qoperator, run_on_quantized

from conftest import tiny_cnn, tiny_data
from models import (
    conv_concat, conv_maxpool_conv, conv_reshape_transpose_conv, conv_resize_conv, matmul_bias, resnet_like, run_float,
    transformer_block,
)

FLOAT_COMPUTE = {"Conv", "MatMul", "Gemm"}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _output_step(model: onnx.ModelProto, output: str) -> float:
    """The quantization step of a graph output written by a DequantizeLinear (its scale)."""
    producer = next(n for n in model.graph.node if output in n.output)
    assert producer.op_type == "DequantizeLinear", producer.op_type
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return float(inits[producer.input[1]].max())


def _converted(model: onnx.ModelProto, toolkit: ortq.Toolkit) -> tuple[onnx.ModelProto, dict[str, str]]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    left = convert_to_qoperator(copy, toolkit)
    onnx.checker.check_model(copy, full_check=True)
    return copy, left


@pytest.fixture(scope="module")
def resnet() -> tuple[onnx.ModelProto, dict, dict, ortq.QuantizationResult]:
    model, calib, evaluation = resnet_like(n_calibration=32, n_evaluation=32)
    qdq = ortq.Toolkit(autoload=False).quantize(model, None, calibration_data=calib)
    return model, calib, evaluation, qdq


def test_resnet_qoperator_agrees_with_qdq_within_one_step(resnet, toolkit: ortq.Toolkit) -> None:
    model, calib, evaluation, qdq = resnet
    qop, left = _converted(qdq.model, toolkit)
    ops = _ops(qop)
    n_conv = sum(n.op_type == "Conv" for n in model.graph.node)
    assert ops["QLinearConv"] == n_conv and not ops.keys() & FLOAT_COMPUTE, ops
    assert ops["QLinearAdd"] == 3 and ops["QGemm"] == 1 and ops["QLinearGlobalAveragePool"] == 1, ops
    assert ops["Relu"] == 0, "every Relu folds into its kernel's output zero point"
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1, "only at the float input and output"
    assert left == {}
    step = _output_step(qdq.model, "logits")
    a, b = _run(qdq.model, evaluation), _run(qop, evaluation)
    assert np.abs(a - b).max() <= step + 1e-6
    (reference,) = run_float(model, evaluation)
    assert sqnr_db(reference, b) > 20.0
    # Fewer nodes and bytes than QDQ: weights, Q/DQ and float biases are gone, int32 biases remain.
    assert len(qop.graph.node) < len(qdq.model.graph.node) / 2


def test_pipeline_writes_qoperator(resnet, toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    model, calib, evaluation, qdq = resnet
    result = toolkit.quantize(model, tmp_path / "q.onnx", calibration_data=calib, quant_format="qoperator")
    assert result.config.quant_format == "qoperator"
    saved = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(saved, full_check=True)
    assert _ops(saved)["QLinearConv"] == 8 and "Conv" not in _ops(saved)
    assert any(o.domain == "com.microsoft" for o in saved.opset_import)
    # The verification stage ran the QOperator model against float, as for QDQ, with the same result.
    assert result.verification.min_sqnr_db > 20.0
    assert abs(result.verification.min_sqnr_db - qdq.verification.min_sqnr_db) < 0.5
    step = _output_step(qdq.model, "logits")
    assert np.abs(_run(qdq.model, evaluation) - _run(saved, evaluation)).max() <= step + 1e-6


def test_mlp_becomes_qgemm_and_agrees_within_one_step(toolkit: ortq.Toolkit) -> None:
    """A 2-D Linear layer (MatMul + bias Add, which ortq fuses) becomes one QGemm with an int32 bias."""
    model, calib, evaluation = matmul_bias(seq=None)
    qdq = toolkit.quantize(model, None, calibration_data=calib, verify=False)
    qop, left = _converted(qdq.model, toolkit)
    ops = _ops(qop)
    assert ops["QGemm"] == 1 and "MatMul" not in ops and "Add" not in ops, ops
    step = _output_step(qdq.model, "output")
    a, b = _run(qdq.model, evaluation), _run(qop, evaluation)
    assert np.abs(a - b).max() <= step + 1e-6
    (reference,) = run_float(model, evaluation)
    assert sqnr_db(reference, b) > 25.0


def test_transformer_matmuls_become_integer_kernels(toolkit: ortq.Toolkit) -> None:
    model, calib, evaluation = transformer_block(n_calibration=16, n_evaluation=16, gelu=False)
    qdq = toolkit.quantize(model, None, calibration_data=calib, verify=False)
    qop, left = _converted(qdq.model, toolkit)
    ops = _ops(qop)
    # The six Linear layers run as integer kernels (3-D inputs: MatMulIntegerToFloat with the bias inside);
    # only the two attention MatMuls of activations stay float, as in the QDQ plan.
    assert ops["MatMulIntegerToFloat"] == 6 and ops["MatMul"] == 2, ops
    a, b = _run(qdq.model, evaluation), _run(qop, evaluation)
    assert sqnr_db(a, b) > 40.0  # the same kernels as ONNX Runtime fuses from the QDQ model
    (reference,) = run_float(model, evaluation)
    assert sqnr_db(reference, b) > 20.0
    assert all(reason for reason in left.values())


def test_converts_onnxruntime_qdq_output(resnet, toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    """The pass reads only the graph: ONNX Runtime's own QDQ model converts as well as ortq's."""
    from onnxruntime import quantization as orq

    model, calib, evaluation, _ = resnet

    class Reader(orq.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib["input"][i : i + 8]} for i in range(0, 32, 8)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    onnx.save(model, tmp_path / "f.onnx")
    orq.quantize_static(
        str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=orq.QuantFormat.QDQ,
        per_channel=True, activation_type=orq.QuantType.QUInt8, weight_type=orq.QuantType.QInt8,
    )
    qdq = onnx.load(tmp_path / "q.onnx")
    qop, left = _converted(qdq, toolkit)
    assert left == {} and _ops(qop)["QLinearConv"] == 8 and not _ops(qop).keys() & FLOAT_COMPUTE
    a, b = _run(qdq, evaluation), _run(qop, evaluation)
    assert np.abs(a - b).max() <= _output_step(qdq, "logits") + 1e-6


def _qat_conv() -> onnx.ModelProto:
    """A QAT-style export: float weights behind QuantizeLinear -> DequantizeLinear, no zero points on the
    weight (defaults), a float bias, and Conv -> Relu -> Q."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
        numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "b"),
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        numpy_helper.from_array(np.array(0.015, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["wq"], axis=0),
        helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "y_scale", "y_zp"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zp"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "qat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_qat_export_with_float_weights_and_bias(toolkit: ortq.Toolkit) -> None:
    model = _qat_conv()
    qop, left = _converted(model, toolkit)
    assert left == {} and _ops(qop) == Counter({"QuantizeLinear": 1, "QLinearConv": 1, "DequantizeLinear": 1})
    conv = next(n for n in qop.graph.node if n.op_type == "QLinearConv")
    inits = {i.name: numpy_helper.to_array(i) for i in qop.graph.initializer}
    assert inits[conv.input[3]].dtype == np.int8 and inits[conv.input[8]].dtype == np.int32
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    a, b = _run(model, {"x": x}), _run(qop, {"x": x})
    assert np.abs(a - b).max() <= 0.015 + 1e-6


def test_folded_weight_rounds_as_onnxruntime_quantizes(toolkit: ortq.Toolkit) -> None:
    """A float weight behind QuantizeLinear is folded to exactly the integers ONNX Runtime's QuantizeLinear
    computes, also for values whose quotient by the scale rounds one way in float32 and the other in float64."""
    rng = np.random.default_rng(0)
    w_scale = np.float32(0.064059205)
    candidates = ((rng.integers(-100, 100, 20000) + 0.5) * np.float64(w_scale)).astype(np.float32)
    candidates = np.nextafter(candidates, rng.choice([-np.inf, np.inf], candidates.size)).astype(np.float32)  # a step off
    ties = candidates[np.rint(candidates / w_scale) != np.rint(candidates.astype(np.float64) / np.float64(w_scale))]
    assert ties.size >= 32
    w = ties[:32].reshape(8, 4)
    inits = [
        numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(w_scale), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"), numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"), numpy_helper.from_array(np.array(128, np.uint8), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["wq"], name="w_Q"),
        helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["m"], name="matmul"),
        helper.make_node("QuantizeLinear", ["m", "y_scale", "y_zp"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zp"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "fold", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    qop, left = _converted(model, toolkit)
    kernel = next(n for n in qop.graph.node if n.op_type == "QLinearMatMul")
    folded = {i.name: numpy_helper.to_array(i) for i in qop.graph.initializer}[kernel.input[3]]
    w_only = helper.make_model(helper.make_graph(
        [helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["wq"])], "q", [],
        [helper.make_tensor_value_info("wq", TensorProto.INT8, [8, 4])], inits[:3],
    ), opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    np.testing.assert_array_equal(folded, _run(w_only, {}))
    x = {"x": rng.uniform(-2.0, 2.0, (4, 8)).astype(np.float32)}
    assert left == {} and np.abs(_run(model, x) - _run(qop, x)).max() <= 0.05 + 1e-6


def test_sixteen_bit_activations_stay_qdq_with_a_reason(toolkit: ortq.Toolkit, caplog: pytest.LogCaptureFixture) -> None:
    """ONNX Runtime has no 16-bit integer kernels: the nodes keep their Q/DQ and the model still runs."""
    model, calib = tiny_cnn(), tiny_data(16)
    qdq = toolkit.quantize(model, None, calibration_data=calib, activation_type="uint16", verify=False)
    with caplog.at_level(logging.INFO, logger="ortq.pipeline.rewrite_qoperator"):
        qop, left = _converted(qdq.model, toolkit)
    assert "8-bit activations only" in left["conv"] and "8-bit activations only" in left["fc"]
    assert "conv" in caplog.text and "8-bit" in caplog.text
    assert _ops(qop)["Conv"] == 1 and _ops(qop)["Gemm"] == 1
    np.testing.assert_allclose(_run(qop, calib), _run(qdq.model, calib), rtol=0, atol=1e-6)


def test_int8_activations_with_uint8_weights_stay_qdq(toolkit: ortq.Toolkit) -> None:
    model, calib = tiny_cnn(), tiny_data(16)
    qdq = toolkit.quantize(
        model, None, calibration_data=calib, activation_type="int8", weight_type="uint8", verify=False,
    )
    qop, left = _converted(qdq.model, toolkit)
    assert "no kernel for that pair" in left["conv"]
    np.testing.assert_allclose(_run(qop, calib), _run(qdq.model, calib), rtol=0, atol=1e-6)


def test_int8_activations_convert(toolkit: ortq.Toolkit) -> None:
    model, calib = tiny_cnn(), tiny_data(16)
    qdq = toolkit.quantize(model, None, calibration_data=calib, activation_type="int8", verify=False)
    qop, left = _converted(qdq.model, toolkit)
    assert _ops(qop)["QLinearConv"] == 1 and _ops(qop)["QGemm"] == 1, _ops(qop)
    assert np.abs(_run(qop, calib) - _run(qdq.model, calib)).max() <= _output_step(qdq.model, "y") + 1e-6


@pytest.mark.parametrize("activation_type", ["uint8", "int8"])
def test_activation_pooling_and_softmax_kernels(toolkit: ortq.Toolkit, activation_type: str) -> None:
    """LeakyRelu, Sigmoid, AveragePool and Softmax (quantized on request) become their com.microsoft kernels."""
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["c1"], ["l"], name="leaky", alpha=0.1),
        helper.make_node("Conv", ["l", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c2"], ["s"], name="sigmoid"),
        helper.make_node("AveragePool", ["s"], ["a"], name="avg", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["a", "w3"], ["c3"], name="conv3"),
        helper.make_node("Softmax", ["c3"], ["y"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "acts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4, 4])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    data = {"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    qdq = toolkit.quantize(
        model, None, calibration_data=data, activation_type=activation_type, verify=False,
        op_types_to_quantize=["Conv", "LeakyRelu", "Sigmoid", "AveragePool", "Softmax"],
    )
    qop, left = _converted(qdq.model, toolkit)
    ops = _ops(qop)
    assert left == {}
    for kernel in ("QLinearLeakyRelu", "QLinearSigmoid", "QLinearAveragePool", "QLinearSoftmax"):
        assert ops[kernel] == 1, ops
    a, b = _run(qdq.model, data), _run(qop, data)
    assert np.abs(a - b).max() <= _output_step(qdq.model, "y") + 1e-6
    (reference,) = run_float(model, data)
    assert sqnr_db(reference, b) > 25.0


def test_hard_sigmoid_keeps_qdq_and_says_why(toolkit: ortq.Toolkit) -> None:
    """HardSigmoid has a QDQ plan but no ONNX Runtime integer kernel: the reason names the missing kernel."""
    rng = np.random.default_rng(8)
    w = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
         numpy_helper.from_array((rng.standard_normal((4, 4, 1, 1)) * 0.3).astype(np.float32), "w2")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("HardSigmoid", ["c1"], ["h"], name="hard_sigmoid"),
        helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "hs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], w,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    data = {"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)}
    qdq = toolkit.quantize(model, None, calibration_data=data, op_types_to_quantize=["Conv", "HardSigmoid"], verify=False)
    qop, left = _converted(qdq.model, toolkit)
    assert left == {"hard_sigmoid": "ONNX Runtime has no QLinearHardSigmoid kernel"}
    assert _ops(qop)["QLinearConv"] == 2 and _ops(qop)["HardSigmoid"] == 1
    np.testing.assert_allclose(_run(qop, data), _run(qdq.model, data), rtol=0, atol=_output_step(qdq.model, "y") + 1e-6)


@pytest.mark.parametrize(
    ("builder", "kernel"),
    [(conv_concat, "QLinearConcat"), (conv_maxpool_conv, "MaxPool"), (conv_resize_conv, "Resize"),
     (conv_reshape_transpose_conv, "Transpose")],
)
def test_concat_and_data_movement_between_convs(toolkit: ortq.Toolkit, builder, kernel: str) -> None:  # noqa: ANN001
    """QLinearConcat requantizes its inputs; MaxPool, Resize, Reshape and Transpose run on the uint8 data."""
    model, calib, evaluation = builder()
    qdq = toolkit.quantize(model, None, calibration_data=calib, verify=False)
    qop, left = _converted(qdq.model, toolkit)
    ops = _ops(qop)
    assert left == {} and ops[kernel] >= 1 and ops["DequantizeLinear"] == 1 and not ops.keys() & FLOAT_COMPUTE, ops
    a, b = _run(qdq.model, evaluation), _run(qop, evaluation)
    assert np.abs(a - b).max() <= _output_step(qdq.model, "output") + 1e-6


def test_zero_padding_pads_with_the_zero_point(toolkit: ortq.Toolkit) -> None:
    """Pad runs on the uint8 data; its constant must become the zero point (a real 0), not integer 0."""
    rng = np.random.default_rng(6)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([0, 0, 2, 2, 0, 0, 2, 2], np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Pad", ["c1", "pads"], ["p"], name="pad"),
        helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    data = {"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    qdq = toolkit.quantize(model, None, calibration_data=data, op_types_to_quantize=["Conv", "Pad"], verify=False)
    qop, left = _converted(qdq.model, toolkit)
    assert left == {} and _ops(qop)["Pad"] == 1 and _ops(qop)["QLinearConv"] == 2, (left, _ops(qop))
    pad = next(n for n in qop.graph.node if n.op_type == "Pad")
    zero_point = {i.name: numpy_helper.to_array(i) for i in qop.graph.initializer}[pad.input[2]]
    assert zero_point.dtype == np.uint8 and int(zero_point) != 0  # a signed range: the real 0 is mid-scale
    a, b = _run(qdq.model, data), _run(qop, data)
    assert np.abs(a - b).max() <= _output_step(qdq.model, "y") + 1e-6


# -- third-party op quantizers provide either format through the same interface ------------------------------
def _depth_to_space_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((4, 2, 3, 3)) * 0.3).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("DepthToSpace", ["c1"], ["d"], name="d2s", blocksize=2),
        helper.make_node("Conv", ["d", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "d2s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    data = {"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    return model, data


class _QdqOnlyDepthToSpace(ortq.OpQuantizer):
    """A third-party op quantizer written before the QOperator format existed: plan only."""

    op_types = ("DepthToSpace",)

    def plan(self, node, ctx):  # noqa: ANN001, ANN201
        return ortq.NodePlan(outputs={0: ortq.SameAs(0)})


class _QOperatorDepthToSpace(_QdqOnlyDepthToSpace):
    def qoperator(self, node, q):  # noqa: ANN001, ANN201
        return run_on_quantized(node, q, eight_bit_only=True)


class _BrokenDepthToSpace(_QdqOnlyDepthToSpace):
    def qoperator(self, node, q):  # noqa: ANN001, ANN201
        return [helper.make_node("DepthToSpace", [q.input(0).name], ["somewhere_else"], blocksize=2)]


def _toolkit_with(quantizer: type[ortq.OpQuantizer]) -> ortq.Toolkit:
    class Plugin:
        @ortq.hookimpl
        def ortq_register_op_quantizers(self, register):  # noqa: ANN001, ANN201
            register(quantizer)

    return ortq.Toolkit(plugins=[Plugin()], autoload=False)


@pytest.mark.parametrize("quantizer", [_QdqOnlyDepthToSpace, _QOperatorDepthToSpace])
def test_third_party_op_quantizer_provides_either_format(quantizer: type[ortq.OpQuantizer]) -> None:
    model, data = _depth_to_space_model()
    tk = _toolkit_with(quantizer)
    qdq = tk.quantize(model, None, calibration_data=data, verify=False)
    qop, left = _converted(qdq.model, tk)
    ops = _ops(qop)
    assert ops["QLinearConv"] == 2 and ops["DepthToSpace"] == 1
    if quantizer is _QOperatorDepthToSpace:
        assert left == {} and ops["DequantizeLinear"] == 1  # DepthToSpace runs on the uint8 tensor
    else:
        assert left == {"d2s": "_QdqOnlyDepthToSpace provides no QOperator form"}
        assert ops["DequantizeLinear"] == 2 and ops["QuantizeLinear"] == 2  # its Q/DQ stay
    a, b = _run(qdq.model, data), _run(qop, data)
    assert np.abs(a - b).max() <= _output_step(qdq.model, "y") + 1e-6


def test_a_plugin_that_drops_an_output_is_named(toolkit: ortq.Toolkit) -> None:
    model, data = _depth_to_space_model()
    tk = _toolkit_with(_BrokenDepthToSpace)
    qdq = tk.quantize(model, None, calibration_data=data, verify=False)
    with pytest.raises(ortq.PluginError, match=r"_BrokenDepthToSpace.qoperator\(\) replaced node 'd2s'"):
        convert_to_qoperator(qdq.model, tk)


# -- options, CLI, targets -------------------------------------------------------------------------------------
def test_cli_format_qoperator(cnn_files: tuple[Path, Path], tmp_path: Path) -> None:
    model_path, data_path = cnn_files
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(
        build_cli(ortq.Toolkit(autoload=False)),
        ["quantize", str(model_path), "-o", str(out), "-d", str(data_path), "--format", "qoperator"],
    )
    assert result.exit_code == 0, result.output
    ops = _ops(onnx.load(out))
    assert ops["QLinearConv"] == 1 and ops["QGemm"] == 1 and "Conv" not in ops


def test_compat_quantize_static_qoperator(tmp_path: Path) -> None:
    from test_compat import Reader

    ortq.quantize_static(
        tiny_cnn(), tmp_path / "q.onnx", Reader(tiny_data()), quant_format=ortq.QuantFormat.QOperator,
        activation_type=ortq.QuantType.QUInt8, toolkit=ortq.Toolkit(autoload=False),
    )
    ops = _ops(onnx.load(tmp_path / "q.onnx"))
    assert ops["QLinearConv"] == 1 and "Conv" not in ops


@pytest.mark.parametrize("target", ["tensorrt", "esp32"])
def test_qdq_only_targets_refuse_qoperator(toolkit: ortq.Toolkit, target: str) -> None:
    with pytest.raises(ortq.ConfigError, match="QDQ format"):
        toolkit.quantize(tiny_cnn(), None, calibration_data=tiny_data(8), target=target, quant_format="qoperator")


def test_unknown_format_is_refused(toolkit: ortq.Toolkit) -> None:
    with pytest.raises(ortq.ConfigError, match="quant_format 'qlinear' is not one of qdq, qoperator"):
        toolkit.quantize(tiny_cnn(), None, calibration_data=tiny_data(8), quant_format="qlinear")
