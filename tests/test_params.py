"""Parameter edge cases: int32 bias overflow, re-planning after a veto without a second calibration pass."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from conftest import run
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.core.error_measures import sqnr_db


def test_bias_that_would_overflow_int32_widens_the_weight_scale(toolkit: ortq.Toolkit) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.01, (32, 16)).astype(np.float32)  # tiny weights: a tiny 16-bit weight scale
    b = rng.normal(0, 1.0, 16).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(0, 1, (64, 32)).astype(np.float32)
    result = toolkit.quantize(model, calibration_data={"x": x}, activation_type="int16", weight_type="int16")
    bias_q = onnx.numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == "b_quantized"))
    assert np.abs(bias_q.astype(np.int64)).max() < np.iinfo(np.int32).max
    assert result.params["w"].source == "widened for bias"
    # ONNX Runtime 1.32 mis-fuses 16-bit QDQ Gemm with a large bias at BASIC and above; check the graph's math.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    quantized = ort.InferenceSession(result.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert sqnr_db(run(model, {"x": x})[0], quantized.run(None, {"x": x})[0]) > 60


def test_replan_after_a_veto_reuses_implied_ranges(toolkit: ortq.Toolkit) -> None:
    """The veto on the mask sends Softmax and its neighbours back to float; the MatMuls downstream then need
    ranges for tensors that were fixed-range or data-movement outputs, which calibration never observed."""
    rng = np.random.default_rng(0)
    seq, dim = 8, 16
    weights = {n: numpy_helper.from_array(rng.normal(0, dim**-0.5, (dim, dim)).astype(np.float32), n) for n in ("wq", "wk", "wv", "wo")}
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Add", ["s", "mask_bias"], ["a"], name="add_mask"),
        helper.make_node("Softmax", ["a"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["c"], name="context"),
        helper.make_node("Transpose", ["c"], ["ct"], name="ct", perm=[0, 1, 2]),
        helper.make_node("MatMul", ["ct", "wo"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, dim]),
         helper.make_tensor_value_info("mask_bias", TensorProto.FLOAT, ["N", 1, seq])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", seq, dim])], list(weights.values()),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mask = np.zeros((32, 1, seq), np.float32)
    mask[:, :, 6:] = -1e9
    feeds = {"x": rng.normal(size=(32, seq, dim)).astype(np.float32), "mask_bias": mask}
    result = toolkit.quantize(model, calibration_data=feeds, matmul_const_b_only=False,
                              op_types_to_quantize=["MatMul", "Add", "Softmax", "Transpose"])
    assert "mask_bias" in result.vetoes
    assert not any("not calibrated" in reason for reason in result.vetoes.values())
    assert {"out", "q", "k", "v"} <= set(result.plan.quantized_nodes)
    onnx.checker.check_model(result.model, full_check=True)
    assert sqnr_db(run(model, feeds)[0], run(result.model, feeds)[0]) > 20
