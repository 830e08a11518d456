"""Dynamic quantization: int8 weights offline, activations quantized at run time by ONNX Runtime's kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from models import gemm, run_float, transformer_block
from onnx import helper, numpy_helper

import ortq
from ortq.api.cli import build_cli
from ortq.core.error_measures import cosine_similarity, sqnr_db


def _optimized_ops(model_path: Path, tmp_path: Path) -> list[onnx.NodeProto]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    return list(onnx.load(tmp_path / "optimized.onnx").graph.node)


@pytest.mark.parametrize("per_channel", [False, True])
def test_encoder_block_dynamic(tmp_path: Path, toolkit: ortq.Toolkit, per_channel: bool) -> None:
    model, calibration, evaluation = transformer_block()
    out = tmp_path / "dyn.onnx"
    result = toolkit.quantize_dynamic(model, out, per_channel=per_channel, verify_data=calibration)
    assert result.ranges == {} and result.calibration_samples == 0 and result.calibration_batches == 0
    assert len(result.plan.quantized_nodes) == 6  # q, k, v, attention output, ffn in, ffn out
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    assert result.verification.min_sqnr_db is not None and result.verification.min_sqnr_db > 25
    assert cosine_similarity(run_float(model, evaluation)[0], run_float(q, evaluation)[0]) >= 0.99
    nodes = _optimized_ops(out, tmp_path)
    ops = {n.op_type for n in nodes}
    assert ops & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    optimized = onnx.load(tmp_path / "optimized.onnx")
    constants = {i.name for i in optimized.graph.initializer}
    float_const_matmuls = [n.name for n in nodes if n.op_type in ("MatMul", "Gemm", "FusedMatMul") and n.input[1] in constants]
    assert not float_const_matmuls
    # The float weights are gone: the model shrank about 4x.
    assert result.quantized_bytes < result.float_bytes / 3


def test_gemm_trans_b_with_bias_is_exact_to_quantization_error(toolkit: ortq.Toolkit) -> None:
    model, _, evaluation = gemm(trans_b=1)
    result = toolkit.quantize_dynamic(model)
    assert [n.op_type for n in result.model.graph.node] == ["DynamicQuantizeMatMul"]
    assert len(result.model.graph.node[0].input) == 5  # the bias rides in the kernel
    assert sqnr_db(run_float(model, evaluation)[0], run_float(result.model, evaluation)[0]) > 30


def test_gemm_with_scaled_alpha_stays_float(toolkit: ortq.Toolkit) -> None:
    model, _, _ = gemm(trans_b=0)
    model.graph.node[0].attribute.append(helper.make_attribute("alpha", 0.5))
    result = toolkit.quantize_dynamic(model)
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    assert any("alpha" in f.reason for f in result.plan.float_nodes)


def test_shared_weight_quantized_once(toolkit: ortq.Toolkit) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"), helper.make_node("MatMul", ["h", "w"], ["y"], name="b")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8])], initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = toolkit.quantize_dynamic(model)
    assert [n.op_type for n in result.model.graph.node] == ["DynamicQuantizeMatMul"] * 2
    assert len(result.model.graph.initializer) == 3  # weight, scale, zero point; the float weight is gone


def test_conv_only_when_asked(toolkit: ortq.Toolkit) -> None:
    from conftest import tiny_cnn, tiny_data

    model = tiny_cnn()
    default = toolkit.quantize_dynamic(model)
    assert "ConvInteger" not in {n.op_type for n in default.model.graph.node}
    for weight_type in ("int8", "uint8"):
        for per_channel in (False, True):
            result = toolkit.quantize_dynamic(
                model, op_types_to_quantize=["Conv", "Gemm", "MatMul"], per_channel=per_channel, weight_type=weight_type
            )
            assert "ConvInteger" in {n.op_type for n in result.model.graph.node}
            onnx.checker.check_model(result.model, full_check=True)
            feed = tiny_data(8, seed=4)
            assert sqnr_db(run_float(model, feed)[0], run_float(result.model, feed)[0]) > 20


def test_compat_with_onnxruntime_quant_type(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType

    model, _, evaluation = transformer_block()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    ortq.quantize_dynamic(str(path), str(tmp_path / "q.onnx"), per_channel=True, weight_type=QuantType.QInt8,
                          extra_options={"WeightSymmetric": True})
    q = onnx.load(tmp_path / "q.onnx")
    assert "DynamicQuantizeMatMul" in {n.op_type for n in q.graph.node}
    assert cosine_similarity(run_float(model, evaluation)[0], run_float(q, evaluation)[0]) >= 0.99


def test_compat_warns_on_unknown_extra_options_and_refuses_unsupported_values(tmp_path: Path, caplog) -> None:
    model, _, _ = gemm()
    # ONNX Runtime ignores keys it does not read; so does the drop-in, with a warning naming the key.
    ortq.quantize_dynamic(model, tmp_path / "ok.onnx", extra_options={"MatMulNBitsBlockSize": 32})
    assert "MatMulNBitsBlockSize" in caplog.text
    with pytest.raises(ortq.ConfigError, match="WeightSymmetric"):
        ortq.quantize_dynamic(model, tmp_path / "q.onnx", extra_options={"WeightSymmetric": False})
    assert not (tmp_path / "q.onnx").exists()


def test_cli_dynamic_needs_no_calibration_data(tmp_path: Path, toolkit: ortq.Toolkit) -> None:
    model, _, evaluation = transformer_block()
    path, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(build_cli(toolkit), ["quantize", str(path), "-o", str(out), "--mode", "dynamic"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "dynamic" in result.output
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    assert "DynamicQuantizeMatMul" in {n.op_type for n in q.graph.node}
    assert cosine_similarity(run_float(model, evaluation)[0], run_float(q, evaluation)[0]) >= 0.99
    # Static mode still insists on data.
    result = CliRunner().invoke(build_cli(toolkit), ["quantize", str(path), "-o", str(out)])
    assert result.exit_code != 0


def _embedding_model(vocab: int = 2000, dim: int = 64, seed: int = 0) -> onnx.ModelProto:
    """Token ids -> embedding Gather -> Linear: the front of every transformer."""
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((vocab, dim)) * rng.uniform(0.02, 0.5, size=dim)).astype(np.float32)
    weight = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["embedded"], name="embed", axis=0),
         helper.make_node("MatMul", ["embedded", "w"], ["hidden"], name="proj")],
        "embedding",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", "S"])],
        [helper.make_tensor_value_info("hidden", onnx.TensorProto.FLOAT, ["N", "S", dim])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("per_channel", [False, True])
def test_embedding_gather_reads_an_int8_table(tmp_path: Path, toolkit: ortq.Toolkit, per_channel: bool) -> None:
    model = _embedding_model()
    ids = {"ids": np.random.default_rng(1).integers(0, 2000, size=(4, 16)).astype(np.int64)}
    out = tmp_path / "dyn.onnx"
    result = toolkit.quantize_dynamic(model, out, per_channel=per_channel, verify_data=ids)
    assert set(result.plan.quantized_nodes) == {"embed", "proj"}
    assert "embed" not in {f.name for f in result.plan.float_nodes}
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    tables = [i for i in q.graph.initializer if i.dims == [2000, 64]]
    assert len(tables) == 1 and tables[0].data_type == onnx.TensorProto.INT8  # the float table is gone
    gather = next(n for n in q.graph.node if n.op_type == "Gather")
    assert gather.input[0] == tables[0].name
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear")
    assert dq.input[0] == gather.output[0]  # only the gathered rows are dequantized
    expected, actual = run_float(model, ids)[0], run_float(q, ids)[0]
    assert cosine_similarity(expected, actual) > 0.999
    assert sqnr_db(expected, actual) > (35 if per_channel else 30)
    assert out.stat().st_size < model.ByteSize() / 3.5


def test_embedding_gather_respects_op_types_and_exclusions(toolkit: ortq.Toolkit) -> None:
    model = _embedding_model()
    only_matmul = toolkit.quantize_dynamic(model, op_types_to_quantize=["MatMul"])
    excluded = toolkit.quantize_dynamic(model, nodes_to_exclude=["embed"])
    for result in (only_matmul, excluded):
        assert "embed" not in result.plan.quantized_nodes
        assert any(i.name == "table" and i.data_type == onnx.TensorProto.FLOAT for i in result.model.graph.initializer)


def _lstm_model(
    direction: str = "forward", bias: bool = True, initial_states: bool = True, sequence_lens: bool = True,
    seed: int = 0, seq: int = 9, batch: int = 3, features: int = 24, hidden: int = 48, classes: int = 10,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X -> LSTM -> MatMul on the last hidden state (a sequence classifier), with the requested optional inputs."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    f32 = onnx.TensorProto.FLOAT
    inits = [
        numpy_helper.from_array((rng.standard_normal((dirs, 4 * hidden, features)) / np.sqrt(features)).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal((dirs, 4 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32), "R"),
        numpy_helper.from_array((rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32), "head"),
    ]
    inputs = [helper.make_tensor_value_info("X", f32, [seq, "N", features])]
    feed = {"X": rng.standard_normal((seq, batch, features)).astype(np.float32)}
    lstm_in = ["X", "W", "R", "", "", "", ""]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal((dirs, 8 * hidden)) * 0.2).astype(np.float32), "B"))
        lstm_in[3] = "B"
    if sequence_lens:
        inputs.append(helper.make_tensor_value_info("lens", onnx.TensorProto.INT32, ["N"]))
        feed["lens"] = rng.integers(1, seq + 1, size=batch).astype(np.int32)
        lstm_in[4] = "lens"
    if initial_states:
        for name in ("h0", "c0"):
            inputs.append(helper.make_tensor_value_info(name, f32, [dirs, "N", hidden]))
            feed[name] = (rng.standard_normal((dirs, batch, hidden)) * 0.5).astype(np.float32)
        lstm_in[5:7] = ["h0", "c0"]
    while not lstm_in[-1]:
        lstm_in.pop()
    graph = helper.make_graph(
        [helper.make_node("LSTM", lstm_in, ["Y", "Y_h", "Y_c"], name="lstm", hidden_size=hidden, direction=direction),
         helper.make_node("MatMul", ["Y_h", "head"], ["logits"], name="head_matmul")],
        "lstm", inputs,
        [helper.make_tensor_value_info("Y", f32, [seq, dirs, "N", hidden]),
         helper.make_tensor_value_info("Y_c", f32, [dirs, "N", hidden]),
         helper.make_tensor_value_info("logits", f32, [dirs, "N", classes])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8), feed


@pytest.mark.parametrize(
    ("direction", "bias", "initial_states", "sequence_lens", "per_channel", "weight_type"),
    [
        ("forward", True, True, True, False, "int8"),
        ("bidirectional", True, True, True, True, "int8"),
        ("reverse", False, False, False, True, "int8"),
        ("bidirectional", False, False, True, False, "uint8"),
    ],
)
def test_lstm_becomes_dynamic_quantize_lstm(
    tmp_path: Path, toolkit: ortq.Toolkit, direction: str, bias: bool, initial_states: bool, sequence_lens: bool,
    per_channel: bool, weight_type: str,
) -> None:
    model, feed = _lstm_model(direction, bias, initial_states, sequence_lens)
    dirs, hidden, features = (2 if direction == "bidirectional" else 1), 48, 24
    out = tmp_path / "lstm.onnx"
    result = toolkit.quantize_dynamic(model, out, per_channel=per_channel, weight_type=weight_type, verify_data=[feed])
    assert set(result.plan.quantized_nodes) == {"lstm", "head_matmul"} and not result.plan.float_nodes
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    lstm = next(n for n in q.graph.node if n.name == "lstm")
    assert (lstm.op_type, lstm.domain, len(lstm.input)) == ("DynamicQuantizeLSTM", "com.microsoft", 12)
    inits = {i.name: i for i in q.graph.initializer}
    assert "W" not in inits and "R" not in inits  # the float weights are gone
    qtype = onnx.TensorProto.INT8 if weight_type == "int8" else onnx.TensorProto.UINT8
    # The kernel's layout: [directions, input, 4*hidden]; scales per direction or per gate column.
    scale_shape = [dirs, 4 * hidden] if per_channel else [dirs]
    for position, rows in ((1, features), (2, hidden)):
        weight = inits[lstm.input[position]]
        assert weight.data_type == qtype and list(weight.dims) == [dirs, rows, 4 * hidden]
    for position in (8, 9, 10, 11):
        assert list(inits[lstm.input[position]].dims) == scale_shape
    # Numbers: every output against the float model, and through the verifier.
    for expected, actual in zip(run_float(model, feed), run_float(q, feed)):
        assert cosine_similarity(expected, actual) > 0.999
        assert sqnr_db(expected, actual) > 30
    assert result.verification.min_sqnr_db is not None and result.verification.min_sqnr_db > 30
    assert result.quantized_bytes < result.float_bytes / 3


def test_lstm_with_computed_weights_stays_float_with_a_reason(toolkit: ortq.Toolkit, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="ortq.pipeline.rewrite_dynamic")
    model, feed = _lstm_model()
    # W scaled at run time: no constant to quantize offline.
    model.graph.node.insert(0, helper.make_node("Mul", ["W", "gain"], ["W_scaled"], name="scale_w"))
    model.graph.initializer.append(numpy_helper.from_array(np.array(1.5, np.float32), "gain"))
    model.graph.node[1].input[1] = "W_scaled"
    result = toolkit.quantize_dynamic(model, verify_data=[feed])
    assert [n.op_type for n in result.model.graph.node] == ["Mul", "LSTM", "DynamicQuantizeMatMul"]
    reason = next(f.reason for f in result.plan.float_nodes if f.name == "lstm")
    assert "W and R are not both constants" in reason
    assert any("'lstm'" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert result.verification.min_sqnr_db > 30  # the quantized head alone


def test_lstm_weight_types_and_layouts_the_kernel_lacks_stay_float(toolkit: ortq.Toolkit) -> None:
    from ortq.core.graph import GraphIndex
    from ortq.pipeline.rewrite_dynamic import _lstm_unfit

    model, feed = _lstm_model()
    result = toolkit.quantize_dynamic(model, weight_type="int16", op_types_to_quantize=["LSTM"], verify_data=[feed])
    assert [n.op_type for n in result.model.graph.node] == ["LSTM", "MatMul"]
    assert "8-bit weights only" in next(f.reason for f in result.plan.float_nodes if f.name == "lstm")
    # Batch-first LSTMs (which ONNX Runtime's CPU LSTM cannot run either) have no DynamicQuantizeLSTM form.
    model.graph.node[0].attribute.append(helper.make_attribute("layout", 1))
    config = toolkit.quantize_dynamic(_lstm_model()[0]).config
    assert "layout=1" in _lstm_unfit(model.graph.node[0], GraphIndex(model), config)


def test_lstm_respects_op_types_and_exclusions(toolkit: ortq.Toolkit) -> None:
    model, feed = _lstm_model(direction="bidirectional")
    for options in ({"op_types_to_quantize": ["MatMul"]}, {"nodes_to_exclude": ["lstm"]}, {"nodes_to_quantize": ["head_matmul"]}):
        result = toolkit.quantize_dynamic(model, verify_data=[feed], **options)
        assert [n.op_type for n in result.model.graph.node] == ["LSTM", "DynamicQuantizeMatMul"], options
        assert "lstm" not in result.plan.quantized_nodes
        assert any(i.name == "W" and i.data_type == onnx.TensorProto.FLOAT for i in result.model.graph.initializer)
    only_lstm = toolkit.quantize_dynamic(model, op_types_to_quantize=["LSTM"])
    assert [n.op_type for n in only_lstm.model.graph.node] == ["DynamicQuantizeLSTM", "MatMul"]
