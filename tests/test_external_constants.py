"""Large tensors outside the initializer list (``Constant`` node values, If/Loop bodies) go to external data too.

A model written with external data must not keep large tensors inline anywhere, or its main file could still
pass ONNX's 2 GB protobuf limit; the tensors read back must be exactly the ones written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.io import model_io
from ortq.io.external_data import _all_tensors, declared_bytes, uses_external
from ortq.core.error_measures import sqnr_db

F = TensorProto.FLOAT
THRESHOLD = 256  # bytes: EXTERNAL_MIN_BYTES lowered so that every constant below crosses it


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(value, f"{name}_value"))


def _model() -> onnx.ModelProto:
    """Conv (weight from a Constant node) -> Relu -> Flatten -> MatMul (Constant) -> Loop (its body holds a 64x64
    initializer and a Constant) -> If (each branch a Constant) -> y."""
    rng = np.random.default_rng(0)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["acc", "body_w"], ["mm"], name="body_matmul"),
            _constant("body_b", (rng.standard_normal((1, 64)) * 0.1).astype(np.float32)),
            helper.make_node("Add", ["mm", "body_b"], ["acc_out"], name="body_add"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", F, ["N", 64])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", F, ["N", 64])],
        [numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "body_w")],
    )
    branches = []
    for name, sign in (("then", 1.0), ("else", -1.0)):
        branches.append(helper.make_graph(
            [_constant(f"{name}_c", (sign * rng.uniform(0.5, 1.5, (1, 64))).astype(np.float32)),
             helper.make_node("Mul", ["loop_out", f"{name}_c"], [f"{name}_out"], name=f"{name}_mul")],
            name, [], [helper.make_tensor_value_info(f"{name}_out", F, ["N", 64])],
        ))
    nodes = [
        _constant("conv_w", (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)),
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        _constant("fc_w", (rng.standard_normal((1024, 64)) / 32).astype(np.float32)),
        helper.make_node("MatMul", ["f", "fc_w"], ["h"], name="fc"),
        helper.make_node("Loop", ["trips", "", "h"], ["loop_out"], name="loop", body=body),
        helper.make_node("ReduceSum", ["x"], ["sx"], name="sum", keepdims=0),
        helper.make_node("Greater", ["sx", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branches[0], else_branch=branches[1]),
    ]
    graph = helper.make_graph(
        nodes, "constants", [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", F, ["N", 64])],
        [numpy_helper.from_array(np.array(2, np.int64), "trips"), numpy_helper.from_array(np.float32(0.0), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model


def _data(n: int = 16, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def _run(source: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    raw = source.SerializeToString() if isinstance(source, onnx.ModelProto) else str(source)
    return ort.InferenceSession(raw, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _inline_large(model: onnx.ModelProto) -> list[str]:
    """Tensors, anywhere in the model, that hold THRESHOLD bytes or more inline."""
    return [t.name for t in _all_tensors(model) if not uses_external(t) and (declared_bytes(t) or 0) >= THRESHOLD]


def _tensor_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in _all_tensors(model)}


@pytest.fixture
def low_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_io, "EXTERNAL_MIN_BYTES", THRESHOLD)


def test_constant_and_subgraph_tensors_are_written_externally(tmp_path: Path, low_threshold: None) -> None:
    model = _model()
    assert len(_inline_large(model)) == 6  # conv_w, fc_w, body_w, body_b, then_c, else_c
    path = tmp_path / "m.onnx"
    model_io.write_with_external_data(model, path, tmp_path / "m.onnx.data", "m.onnx.data")
    written = onnx.load(str(path), load_external_data=False)
    assert _inline_large(written) == []
    assert path.stat().st_size < 4096 < (tmp_path / "m.onnx.data").stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    loaded = onnx.load(str(path))
    expected = _tensor_values(model)
    got = _tensor_values(loaded)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    feed = _data(4)
    np.testing.assert_array_equal(_run(path, feed), _run(model, feed))


def test_the_caller_model_is_left_whole(tmp_path: Path, low_threshold: None) -> None:
    model = _model()
    before = model.SerializeToString()
    model_io.write_with_external_data(model, tmp_path / "m.onnx", tmp_path / "m.onnx.data", "m.onnx.data")
    assert model.SerializeToString() == before


def test_size_estimate_and_shape_inference_see_attribute_tensors(low_threshold: None) -> None:
    model = _model()
    serialized = len(model.SerializeToString())
    assert abs(model_io.model_size(model) - serialized) < 0.01 * serialized
    skeleton, stripped = model_io._skeleton(model, THRESHOLD)
    assert stripped > 0.95 * serialized and _inline_large(skeleton) == []
    inferred = model_io.infer_shapes(_model())
    shapes = {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
    assert shapes["h"] == ["N", 64] and shapes["c"] == ["N", 16, 8, 8]


def test_quantize_external_input_with_constants_and_subgraphs(tmp_path: Path, low_threshold: None) -> None:
    """Input saved by onnx with attribute tensors external too; the quantized output keeps every large tensor
    external, passes the checker by path, and runs like the in-memory result."""
    folder = tmp_path / "in"
    folder.mkdir()
    src = folder / "m.onnx"
    onnx.save(_model(), src, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
              size_threshold=THRESHOLD, convert_attribute=True)
    assert len(list(onnx.external_data_helper._get_all_tensors(onnx.load(str(src), load_external_data=False)))) > 0
    out = tmp_path / "q.onnx"
    data = _data()
    result = ortq.Toolkit(autoload=False).quantize(src, out, calibration_data=data)
    assert {"conv", "fc"} <= result.plan.quantized_nodes.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "q.onnx", "q.onnx.data"]
    written = onnx.load(str(out), load_external_data=False)
    assert _inline_large(written) == []
    loop = next(n for n in written.graph.node if n.op_type == "Loop")
    body_w = next(t for t in loop.attribute[0].g.initializer if t.name == "body_w")
    assert uses_external(body_w)  # the subgraph's float weight, untouched by quantization, is external too
    onnx.checker.check_model(str(out), full_check=True)
    np.testing.assert_array_equal(_run(out, data), _run(result.model, data))
    assert sqnr_db(_run(src, data), _run(out, data)) > 30
