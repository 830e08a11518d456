"""Valid but unusual graphs: each quantizes into a checked model that runs and stays close to float.

Every test quantizes, runs ``onnx.checker`` with ``full_check``, runs the result in ONNX Runtime and compares
its outputs with the float model's (SQNR) on the calibration data, then checks the specific outcome.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.core.error_measures import sqnr_db

C = 4
FLOOR_DB = 25.0  # single-digit requantizations of small CNNs: observed 30-45 dB


def _f32(name: str, value) -> TensorProto:  # noqa: ANN001
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _i64(name: str, value) -> TensorProto:  # noqa: ANN001
    return numpy_helper.from_array(np.asarray(value, np.int64), name)


def _conv_w(name: str, seed: int, c_in: int = C, c_out: int = C) -> TensorProto:
    rng = np.random.default_rng(seed)
    return _f32(name, rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in))


def _data(n: int = 16, shape=(C, 8, 8), seed: int = 0) -> dict[str, np.ndarray]:  # noqa: ANN001
    return {"x": np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)}


def _model(nodes, inputs, outputs, inits, opset: int = 13, ir: int = 7, extra_opsets=()):  # noqa: ANN001, ANN202
    graph = helper.make_graph(nodes, "hostile", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir)


def _x(shape=("N", C, 8, 8)) -> onnx.ValueInfoProto:  # noqa: ANN001
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))


def _out(name: str, shape=None) -> onnx.ValueInfoProto:  # noqa: ANN001
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def quantize_and_check(
    model: onnx.ModelProto, data: dict[str, np.ndarray], floor: float = FLOOR_DB, reference_model=None, **options  # noqa: ANN001
):  # noqa: ANN201
    original = model.SerializeToString()
    result = ortq.Toolkit(autoload=False).quantize(model, None, calibration_data=data, **options)
    assert model.SerializeToString() == original, "the caller's model was modified"
    onnx.checker.check_model(result.model, full_check=True)
    reference, actual = _run(reference_model or model, data), _run(result.model, data)
    assert len(reference) == len(actual)
    for ref, act in zip(reference, actual):
        assert ref.shape == act.shape
        assert sqnr_db(ref, act) >= floor, f"SQNR {sqnr_db(ref, act):.1f} dB"
    return result


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _opset7_cnn(ir: int) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc", transB=1),
    ]
    inits = [_conv_w("w", 1), _f32("b", np.full(C, 0.1)), _f32("fc", np.random.default_rng(2).standard_normal((5, C))),
             _f32("fcb", np.full(5, 0.05))]
    # IR 3 requires every initializer among the graph inputs, as exporters of that era wrote them.
    listed = [helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in inits] if ir < 4 else []
    model = _model(nodes, [_x(), *listed], [_out("y", ["N", 5])], inits, opset=7, ir=ir)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_opset7_model_is_upgraded_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ortq"):
        result = quantize_and_check(_opset7_cnn(ir=4), _data())
    assert any("opset 7" in r.getMessage() for r in caplog.records), caplog.text
    assert result.model.opset_import[0].version >= 13
    assert {"conv", "fc"} <= result.plan.quantized_nodes.keys()


def test_opset7_ir3_model_quantizes_its_weights() -> None:
    """IR < 4 lists initializers among the graph inputs, where they are constants (ONNX Runtime lets an input
    override an initializer only from IR 4): raising the IR must not turn every weight into a runtime input."""
    result = quantize_and_check(_opset7_cnn(ir=3), _data())
    assert {"conv", "fc"} <= result.plan.quantized_nodes.keys()


def test_unknown_domain_op_without_shapes_stays_float_and_quantization_continues() -> None:
    """com.microsoft.Gelu (ORT CPU runs it; onnx's shape inference knows nothing about it) mid-CNN."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Gelu", ["c1"], ["g"], name="gelu", domain="com.microsoft"),
        helper.make_node("Conv", ["g", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"], name="relu"),
    ]
    model = _model(nodes, [_x()], [_out("y", ["N", C, 8, 8])], [_conv_w("w1", 1), _conv_w("w2", 2)],
                   extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    result = quantize_and_check(model, _data())
    floats = {f.name: f.reason for f in result.plan.float_nodes}
    assert "gelu" in floats and "no op quantizer" in floats["gelu"]
    assert "conv1" in result.plan.quantized_nodes
    gelu = next(n for n in result.model.graph.node if n.op_type == "Gelu")
    assert gelu.domain == "com.microsoft"


def test_unknown_intermediate_shapes() -> None:
    """No value_info, symbolic dims everywhere, and a Reshape whose target shape is computed at run time."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c1"], ["s"], name="shape"),
        helper.make_node("Reshape", ["c1", "s"], ["r"], name="reshape"),
        helper.make_node("Relu", ["r"], ["a"], name="relu"),
        helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, [_x(("N", C, "H", "W"))], [_out("y", ["N", "C", "H2", "W2"])], [_conv_w("w1", 1), _conv_w("w2", 2)])
    assert not model.graph.value_info
    result = quantize_and_check(model, _data(shape=(C, 7, 9)))
    assert {"conv1", "conv2"} <= result.plan.quantized_nodes.keys()


def _subgraph_model() -> onnx.ModelProto:
    """conv1 -> If / Loop / Scan reading outer tensors (c1, r1, the weight w2) -> Add -> conv3."""
    f = TensorProto.FLOAT
    then_g = helper.make_graph([helper.make_node("Relu", ["c1"], ["t"], name="then_relu")], "then", [],
                               [helper.make_tensor_value_info("t", f, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["c1"], ["e"], name="else_neg")], "else", [],
                               [helper.make_tensor_value_info("e", f, None)])
    loop_g = helper.make_graph(
        [
            helper.make_node("Conv", ["acc", "w2"], ["lc"], name="loop_conv", pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["lc", "r1"], ["acc_out"], name="loop_add"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond"),
        ],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", f, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", f, None)],
    )
    scan_g = helper.make_graph(
        [helper.make_node("Add", ["s_in", "r1_row"], ["s_out"], name="scan_add"),
         helper.make_node("Identity", ["s_out"], ["s_row"], name="scan_id")],
        "scan_body",
        [helper.make_tensor_value_info("s_in", f, None), helper.make_tensor_value_info("r1_row", f, None)],
        [helper.make_tensor_value_info("s_out", f, None), helper.make_tensor_value_info("s_row", f, None)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("ReduceSum", ["x"], ["sx"], name="sum", keepdims=0),
        helper.make_node("Greater", ["sx", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["if_out"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "true", "r1"], ["loop_out"], name="loop", body=loop_g),
        helper.make_node("Scan", ["init", "r1"], ["scan_state", "scan_out"], name="scan", body=scan_g,
                         num_scan_inputs=1),
        helper.make_node("Add", ["if_out", "loop_out"], ["a1"], name="add1"),
        helper.make_node("Add", ["a1", "scan_out"], ["a2"], name="add2"),
        helper.make_node("Conv", ["a2", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1]),
    ]
    inits = [
        _conv_w("w1", 1), _conv_w("w2", 2), _conv_w("w3", 3), _f32("zero", 0.0), _i64("trips", 2),
        numpy_helper.from_array(np.array(True), "true"), _f32("init", np.zeros((C, 8, 8))),
    ]
    return _model(nodes, [_x()], [_out("y", ["N", C, 8, 8])], inits, opset=13)


def test_control_flow_subgraphs_stay_float_and_outer_tensors_survive() -> None:
    model = _subgraph_model()
    onnx.checker.check_model(model, full_check=True)
    result = quantize_and_check(model, _data())
    assert {"conv1", "conv3"} <= result.plan.quantized_nodes.keys()
    assert {"if", "loop", "scan"} <= {f.name for f in result.plan.float_nodes}
    by_name = {n.name: n for n in result.model.graph.node}
    produced = {o for n in result.model.graph.node for o in n.output} | {i.name for i in result.model.graph.initializer}
    for outer in ("c1", "r1", "w2"):
        assert outer in produced, f"{outer!r}, read inside a subgraph, is no longer produced"
    # Nothing inside the subgraphs was rewritten (shape inference may have annotated them, nothing more).
    original = {n.name: n for n in model.graph.node}
    for name in ("if", "loop", "scan"):
        for new, old in zip(by_name[name].attribute, original[name].attribute):
            for g_new, g_old in zip([new.g] if new.HasField("g") else new.graphs, [old.g] if old.HasField("g") else old.graphs):
                assert list(g_new.node) == list(g_old.node)


def test_initializer_shadowing_an_input_is_a_runtime_input() -> None:
    """'k' is a graph input with an initializer as its default: it may be overridden, so it is no constant."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "k"], ["a"], name="add"),
        helper.make_node("Conv", ["a", "kw"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    k = _f32("k", np.random.default_rng(5).standard_normal((1, C, 1, 1)))
    kw = _conv_w("kw", 6)
    inputs = [_x(), helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, C, 1, 1]),
              helper.make_tensor_value_info("kw", TensorProto.FLOAT, [C, C, 3, 3])]
    model = _model(nodes, inputs, [_out("y", ["N", C, 8, 8])], [_conv_w("w1", 1), k, kw])
    result = quantize_and_check(model, _data())
    assert "k" in result.plan.observed_tensors()  # calibrated like any activation
    assert not result.plan.tensors["k"].constant
    assert "conv2" not in result.plan.quantized_nodes  # its weight is overridable: not a constant weight
    # The defaults are still there, untouched, and still overridable.
    inits = {i.name: i for i in result.model.graph.initializer}
    assert inits["k"] == k and inits["kw"] == kw
    assert {"k", "kw"} <= {i.name for i in result.model.graph.input}


def test_duplicate_and_missing_node_names_are_made_unique() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="conv"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "w3"], ["y"], pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, [_x()], [_out("y", ["N", C, 8, 8])], [_conv_w("w1", 1), _conv_w("w2", 2), _conv_w("w3", 3)])
    # ONNX Runtime refuses duplicate node names, so the float reference runs a renamed copy.
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for i, node in enumerate(reference.graph.node):
        node.name = f"n{i}"
    result = quantize_and_check(model, _data(), reference_model=reference)
    names = [n.name for n in result.model.graph.node]
    assert all(names) and len(names) == len(set(names))
    planned = [*result.plan.quantized_nodes, *(f.name for f in result.plan.float_nodes)]
    assert sorted(planned) == ["Conv_2", "Conv_3", "conv", "conv_1"]
    excluded = quantize_and_check(model, _data(), reference_model=reference, nodes_to_exclude=["Conv_2"])
    assert "Conv_2" not in excluded.plan.quantized_nodes
    assert {"conv", "Conv_3"} <= excluded.plan.quantized_nodes.keys()
    float_convs = [n for n in excluded.model.graph.node if n.name == "Conv_2"]
    assert float_convs and float_convs[0].input[1] == "w2"  # still reads its float weight


def test_graph_output_also_consumed_by_another_node() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, [_x()], [_out("c1", ["N", C, 8, 8]), _out("r1", ["N", C, 8, 8]), _out("y", ["N", C, 8, 8])],
                   [_conv_w("w1", 1), _conv_w("w2", 2)])
    result = quantize_and_check(model, _data())
    assert [o.name for o in result.model.graph.output] == ["c1", "r1", "y"]
    assert {"conv1", "conv2"} <= result.plan.quantized_nodes.keys()


def test_tensor_read_by_a_quantized_and_a_float_node() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Softmax", ["c1"], ["s"], name="softmax", axis=1),  # float on the cpu target
        helper.make_node("Conv", ["c1", "w3"], ["z"], name="conv3", pads=[1, 1, 1, 1]),  # excluded below
    ]
    model = _model(nodes, [_x()], [_out("y", ["N", C, 8, 8]), _out("s", ["N", C, 8, 8]), _out("z", ["N", C, 8, 8])],
                   [_conv_w("w1", 1), _conv_w("w2", 2), _conv_w("w3", 3)])
    result = quantize_and_check(model, _data(), nodes_to_exclude=["conv3"])
    assert {"conv1", "conv2"} <= result.plan.quantized_nodes.keys()
    assert {"softmax", "conv3"} <= {f.name for f in result.plan.float_nodes}
    readers = {n.name: n.input[0] for n in result.model.graph.node if n.name in ("conv2", "softmax", "conv3")}
    # One Q/DQ for c1, shared by every reader (float ones read the dequantized value, as ONNX Runtime's
    # quantizer does), and the float conv keeps its float weight.
    assert len(set(readers.values())) == 1
    conv3 = next(n for n in result.model.graph.node if n.name == "conv3")
    assert conv3.input[1] == "w3"
