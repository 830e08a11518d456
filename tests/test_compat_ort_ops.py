"""Ops the ONNX Runtime drop-in quantizes as ONNX Runtime does (issue 13), each on a small model of ortq's own:
the quantized model passes the full checker, runs in ONNX Runtime and is checked numerically against the float
model (and against ONNX Runtime's own quantizer on the same data where both quantize the op)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq import compat
from ortq.core.error_measures import sqnr_db


class Reader(compat.CalibrationDataReader):
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)

    def get_next(self):
        return self.feeds.pop(0) if self.feeds else None


def _model(nodes, inputs, outputs, initializers=(), opset: int = 13) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _check(model: onnx.ModelProto, path: Path, feeds: dict[str, np.ndarray], output: int = 0) -> float:
    """Full checker, ONNX Runtime loads and runs it; returns the output's SQNR (dB) against the float model."""
    quantized = onnx.load(path)
    onnx.checker.check_model(quantized, full_check=True)
    return sqnr_db(run(model, feeds)[output], run(quantized, feeds)[output])


def _conv_transpose_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((4, 6, 3, 3)) * 0.5).astype(np.float32), "w")
    b = numpy_helper.from_array((rng.standard_normal(6) * 0.1).astype(np.float32), "b")
    return _model(
        [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv", strides=[2, 2], pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 15, 15])], [w, b],
    )


def test_conv_transpose_is_quantized_by_default_like_onnxruntime(tmp_path: Path) -> None:
    """ONNX Runtime's quantize_static quantizes ConvTranspose without being asked; the cpu target lists it as
    slow-when-quantized, so ortq's own quantize leaves it float, but the drop-in follows ONNX Runtime."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    model = _conv_transpose_model()
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(5)
    calib = {"x": rng.standard_normal((8, 4, 8, 8)).astype(np.float32)}
    evaluation = {"x": rng.standard_normal((8, 4, 8, 8)).astype(np.float32)}
    result = compat.quantize_static(tmp_path / "m.onnx", tmp_path / "q.onnx", Reader([calib]),
                                    activation_type=compat.QuantType.QUInt8, weight_type=compat.QuantType.QInt8)
    assert "deconv" in result.plan.quantized_nodes
    q = onnx.load(tmp_path / "q.onnx")
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    deconv = next(n for n in q.graph.node if n.op_type == "ConvTranspose")
    assert producers.get(deconv.input[0]) == producers.get(deconv.input[1]) == "DequantizeLinear"
    ours = _check(model, tmp_path / "q.onnx", evaluation)
    ort_quantize_static(str(tmp_path / "m.onnx"), str(tmp_path / "ort.onnx"), Reader([calib]),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    theirs = _check(model, tmp_path / "ort.onnx", evaluation)
    assert ours > 30 and ours >= theirs - 0.1, (ours, theirs)
    # ortq's own default for the cpu target is unchanged: float unless named.
    own = ortq.quantize(tmp_path / "m.onnx", tmp_path / "own.onnx", calibration_data=[calib])
    assert "deconv" not in own.plan.quantized_nodes
    named = compat.quantize_static(tmp_path / "m.onnx", tmp_path / "n.onnx", Reader([calib]),
                                   op_types_to_quantize=["Conv"])
    assert "deconv" not in named.plan.quantized_nodes  # a list that does not name it still leaves it out
    qop = compat.quantize_static(tmp_path / "m.onnx", tmp_path / "qop.onnx", Reader([calib]),
                                 quant_format=compat.QuantFormat.QOperator)
    assert "deconv" not in qop.plan.quantized_nodes  # ONNX Runtime's QOperator format has no kernel for it


def _graph_input_ops_model() -> onnx.ModelProto:
    """Ops reading graph inputs directly: Slice, GatherElements, TopK (values and int64 indices), Where."""
    starts = numpy_helper.from_array(np.array([0, 1], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([4, 7], np.int64), "ends")
    idx = numpy_helper.from_array(np.array([[2, 0, 1, 3, 5, 4, 7, 6]] * 3, np.int64), "idx")
    k = numpy_helper.from_array(np.array([3], np.int64), "k")
    return _model(
        [
            helper.make_node("Slice", ["a", "starts", "ends"], ["sliced"], name="slice"),
            helper.make_node("GatherElements", ["b", "idx"], ["gathered"], name="gather", axis=1),
            helper.make_node("TopK", ["b", "k"], ["top", "top_idx"], name="topk", axis=1),
            helper.make_node("Where", ["cond", "a", "b"], ["chosen"], name="where"),
        ],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 8]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 8]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [3, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
         for n, s in (("sliced", [3, 6]), ("gathered", [3, 8]), ("top", [3, 3]), ("chosen", [3, 8]))]
        + [helper.make_tensor_value_info("top_idx", TensorProto.INT64, [3, 3])],
        [starts, ends, idx, k], opset=16,
    )


def _feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.uniform(-1, 1, (3, 8)).astype(np.float32), "b": rng.uniform(0, 6, (3, 8)).astype(np.float32),
            "cond": rng.random((3, 8)) > 0.5}


@pytest.mark.parametrize("quant_format", ["QDQ", "QOperator"])
def test_force_quantize_no_input_check_quantizes_ops_on_graph_inputs(tmp_path: Path, quant_format: str) -> None:
    """ONNX Runtime's ForceQuantizeNoInputCheck: Slice, GatherElements, TopK and Where reading graph inputs are
    quantized (each data-movement output at its input's parameters, Where's inputs and output each at its own);
    without it they stay float, as in ortq's own defaults."""
    model = _graph_input_ops_model()
    calib = [_feeds(s) for s in range(4)]
    evaluation = _feeds(9)
    fmt = getattr(compat.QuantFormat, quant_format)
    result = compat.quantize_static(model, tmp_path / "q.onnx", Reader(calib), quant_format=fmt,
                                    activation_type=compat.QuantType.QUInt8,
                                    extra_options={"ForceQuantizeNoInputCheck": True})
    assert {"slice", "gather", "topk", "where"} <= set(result.plan.quantized_nodes)
    q = onnx.load(tmp_path / "q.onnx")
    ops = [n.op_type for n in q.graph.node]
    if quant_format == "QOperator":
        assert "QLinearWhere" in ops
    else:
        # A data-movement output's Q reads the same scale/zero-point initializers as its input's DQ.
        producers = {o: n for n in q.graph.node for o in n.output}
        consumers = {i: n for n in q.graph.node for i in n.input}
        sl = next(n for n in q.graph.node if n.op_type == "Slice")
        dq, qn = producers[sl.input[0]], consumers[sl.output[0]]
        assert (dq.op_type, qn.op_type) == ("DequantizeLinear", "QuantizeLinear") and dq.input[1:] == qn.input[1:]
    for i, name in enumerate(("sliced", "gathered", "top", "chosen")):
        assert _check(model, tmp_path / "q.onnx", evaluation, output=i) > 35, name
    # The int64 indices are untouched; TopK's order survives 8 bits on these well-separated values.
    assert np.array_equal(run(model, evaluation)[4], run(tmp_path / "q.onnx", evaluation)[4])
    plain = compat.quantize_static(model, tmp_path / "p.onnx", Reader(calib), quant_format=fmt,
                                   extra_options={"ForceQuantizeNoInputCheck": False})
    assert not {"slice", "gather", "topk", "where"} & set(plain.plan.quantized_nodes)
    own = ortq.quantize(model, tmp_path / "own.onnx", calibration_data=calib)
    assert not {"slice", "gather", "topk", "where"} & set(own.plan.quantized_nodes)


@pytest.mark.parametrize("quant_format", ["QDQ", "QOperator"])
def test_named_add_on_a_graph_input_is_quantized(tmp_path: Path, quant_format: str) -> None:
    """An Add of a graph input and a constant, named in op_types_to_quantize: ONNX Runtime quantizes it (Q/DQ on
    the input, the constant stored quantized, Q/DQ on the output); unnamed, it stays float (nothing upstream
    is quantized, so it would only add error)."""
    rng = np.random.default_rng(4)
    c = numpy_helper.from_array(rng.uniform(-1, 1, (4, 16)).astype(np.float32), "c")
    model = _model([helper.make_node("Add", ["x", "c"], ["y"], name="add")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], [c])
    calib = [{"x": rng.uniform(-2, 2, (4, 16)).astype(np.float32)} for _ in range(4)]
    evaluation = {"x": rng.uniform(-2, 2, (4, 16)).astype(np.float32)}
    fmt = getattr(compat.QuantFormat, quant_format)
    result = compat.quantize_static(model, tmp_path / "q.onnx", Reader(calib), quant_format=fmt,
                                    op_types_to_quantize=["Add"], activation_type=compat.QuantType.QUInt8)
    assert "add" in result.plan.quantized_nodes
    ops = [n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node]
    assert ("QLinearAdd" in ops) if quant_format == "QOperator" else (ops.count("DequantizeLinear") == 3)
    assert _check(model, tmp_path / "q.onnx", evaluation) > 30
    plain = compat.quantize_static(model, tmp_path / "p.onnx", Reader(calib), quant_format=fmt)
    assert "add" not in plain.plan.quantized_nodes


def test_instance_normalization_is_quantized_by_the_drop_in_only(tmp_path: Path) -> None:
    """ONNX Runtime quantizes InstanceNormalization unasked (input, gamma as a weight, B as an int32 bias,
    output); no kernel runs it on integers, so ortq's own quantize leaves it float unless named."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    rng = np.random.default_rng(6)
    gamma = numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "gamma")
    beta = numpy_helper.from_array(rng.uniform(-0.5, 0.5, 4).astype(np.float32), "beta")
    model = _model([helper.make_node("InstanceNormalization", ["x", "gamma", "beta"], ["y"], name="inorm")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])], [gamma, beta])
    onnx.save(model, tmp_path / "m.onnx")
    calib = {"x": (rng.standard_normal((8, 4, 6, 6)) * 2 + 1).astype(np.float32)}
    evaluation = {"x": (rng.standard_normal((8, 4, 6, 6)) * 2 + 1).astype(np.float32)}
    result = compat.quantize_static(tmp_path / "m.onnx", tmp_path / "q.onnx", Reader([calib]),
                                    activation_type=compat.QuantType.QUInt8, weight_type=compat.QuantType.QInt8)
    assert "inorm" in result.plan.quantized_nodes
    q = onnx.load(tmp_path / "q.onnx")
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    inorm = next(n for n in q.graph.node if n.op_type == "InstanceNormalization")
    assert [producers.get(i) for i in inorm.input] == ["DequantizeLinear"] * 3
    ours = _check(model, tmp_path / "q.onnx", evaluation)
    ort_quantize_static(str(tmp_path / "m.onnx"), str(tmp_path / "ort.onnx"), Reader([calib]),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    theirs = _check(model, tmp_path / "ort.onnx", evaluation)
    assert ours > 30 and ours >= theirs - 0.1, (ours, theirs)
    own = ortq.quantize(tmp_path / "m.onnx", tmp_path / "own.onnx", calibration_data=[calib])
    assert "inorm" not in own.plan.quantized_nodes
    named = ortq.quantize(tmp_path / "m.onnx", tmp_path / "named.onnx", calibration_data=[calib],
                          op_types_to_quantize=["InstanceNormalization"])
    assert "inorm" in named.plan.quantized_nodes and _check(model, tmp_path / "named.onnx", evaluation) > 30
