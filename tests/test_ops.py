"""Every built-in op quantizer yields a checked model that stays numerically close to float.

Each case puts the op behind a Conv (so its input is quantized, as in a real network) and names the op in
``op_types_to_quantize`` so targets that keep it float by default still exercise its quantizer.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.core.error_measures import sqnr_db

C = 4


def _model(op_nodes: list[onnx.NodeProto], out_shape: list, extra_inits: list | None = None, opset: int = 13):
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((C, C, 3, 3)) * 0.4).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal(C) * 0.1).astype(np.float32), "b"),
        *(extra_inits or []),
    ]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]), *op_nodes]
    graph = helper.make_graph(
        nodes, "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, C, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _i64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _f32(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


rng = np.random.default_rng(7)
CASES = {
    "ConvTranspose": ([helper.make_node("ConvTranspose", ["c", "wt", "bt"], ["y"], name="op", strides=[2, 2])],
                      [None, 3, 17, 17],
                      [_f32("wt", rng.standard_normal((C, 3, 3, 3)) * 0.3), _f32("bt", [0.1, -0.2, 0.3])]),
    "Softmax": ([helper.make_node("Softmax", ["c"], ["y"], name="op", axis=1)], [None, C, 8, 8], []),
    "AveragePool": ([helper.make_node("AveragePool", ["c"], ["y"], name="op", kernel_shape=[2, 2], strides=[2, 2])],
                    [None, C, 4, 4], []),
    "GlobalAveragePool": ([helper.make_node("GlobalAveragePool", ["c"], ["y"], name="op")], [None, C, 1, 1], []),
    "MaxPool": ([helper.make_node("MaxPool", ["c"], ["y"], name="op", kernel_shape=[2, 2], strides=[2, 2])],
                [None, C, 4, 4], []),
    "LeakyRelu": ([helper.make_node("LeakyRelu", ["c"], ["y"], name="op", alpha=0.1)], [None, C, 8, 8], []),
    "Sigmoid": ([helper.make_node("Sigmoid", ["c"], ["y"], name="op")], [None, C, 8, 8], []),
    "HardSigmoid": ([helper.make_node("HardSigmoid", ["c"], ["y"], name="op")], [None, C, 8, 8], []),
    "Clip": ([helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="op")], [None, C, 8, 8],
             [_f32("lo", -0.5), _f32("hi", 0.5)]),
    "Pad": ([helper.make_node("Pad", ["c", "pads"], ["y"], name="op")], [None, C, 10, 10],
            [_i64("pads", [0, 0, 1, 1, 0, 0, 1, 1])]),
    "Resize": ([helper.make_node("Resize", ["c", "", "scales"], ["y"], name="op", mode="nearest")], [None, C, 16, 16],
               [_f32("scales", [1, 1, 2, 2])]),
    "Concat": ([helper.make_node("Concat", ["c", "x"], ["y"], name="op", axis=1)], [None, 2 * C, 8, 8], []),
    "Split": ([helper.make_node("Split", ["c", "parts"], ["s0", "s1"], name="op", axis=1),
               helper.make_node("Mul", ["s0", "s1"], ["y"], name="mul")], [None, 2, 8, 8], [_i64("parts", [2, 2])]),
    "Slice": ([helper.make_node("Slice", ["c", "st", "en", "ax"], ["y"], name="op")], [None, C, 4, 8],
              [_i64("st", [2]), _i64("en", [6]), _i64("ax", [2])]),
    "Gather": ([helper.make_node("Gather", ["c", "idx"], ["y"], name="op", axis=1)], [None, 2, 8, 8],
               [_i64("idx", [3, 0])]),
    "Reshape": ([helper.make_node("Reshape", ["c", "shape"], ["y"], name="op")], [None, C * 64],
                [_i64("shape", [0, -1])]),
    "Transpose": ([helper.make_node("Transpose", ["c"], ["y"], name="op", perm=[0, 2, 3, 1])], [None, 8, 8, C], []),
    "Flatten": ([helper.make_node("Flatten", ["c"], ["y"], name="op")], [None, C * 64], []),
    "Unsqueeze": ([helper.make_node("Unsqueeze", ["c", "axes"], ["y"], name="op")], [None, 1, C, 8, 8],
                  [_i64("axes", [1])]),
    "Squeeze": ([helper.make_node("Unsqueeze", ["c", "axes"], ["u"], name="unsq"),
                 helper.make_node("Squeeze", ["u", "axes"], ["y"], name="op")], [None, C, 8, 8], [_i64("axes", [1])]),
    "Add": ([helper.make_node("Add", ["c", "x"], ["y"], name="op")], [None, C, 8, 8], []),
    "Mul": ([helper.make_node("Mul", ["c", "k"], ["y"], name="op")], [None, C, 8, 8], [_f32("k", [[[0.5]], [[-1.0]], [[2.0]], [[1.5]]])]),
    "MatMul": ([helper.make_node("MatMul", ["c", "m"], ["y"], name="op")], [None, C, 8, 5],
               [_f32("m", rng.standard_normal((8, 5)) * 0.3)]),
}


@pytest.mark.parametrize("op_type", sorted(CASES))
def test_op_quantizer_is_accurate(toolkit: ortq.Toolkit, op_type: str) -> None:
    nodes, shape, inits = CASES[op_type]
    model = _model(nodes, shape, inits)
    onnx.checker.check_model(model)
    # Enough samples that held-out data rarely leaves the calibrated range: this tests the quantizer, not min/max.
    data = {"x": np.random.default_rng(1).standard_normal((256, C, 8, 8)).astype(np.float32)}
    op_types = ["Conv", *{n.op_type for n in nodes}]
    result = toolkit.quantize(model, calibration_data=data, op_types_to_quantize=op_types)
    assert "op" in result.plan.quantized_nodes, result.plan.float_nodes
    onnx.checker.check_model(result.model, full_check=True)
    evaluation = {"x": np.random.default_rng(2).standard_normal((16, C, 8, 8)).astype(np.float32)}
    sqnr = sqnr_db(run(model, evaluation)[0], run(result.model, evaluation)[0])
    assert sqnr > 25, f"{op_type}: {sqnr:.1f} dB"


def test_data_movement_outputs_share_their_input_parameters(toolkit: ortq.Toolkit) -> None:
    nodes, shape, inits = CASES["Transpose"]
    data = {"x": np.random.default_rng(1).standard_normal((8, C, 8, 8)).astype(np.float32)}
    result = toolkit.quantize(_model(nodes, shape, inits), calibration_data=data)
    assert result.params["y"].same_as(result.params["c"])
    assert "y" not in result.plan.observed_tensors()
