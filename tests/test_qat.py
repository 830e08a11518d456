"""Already quantized (QAT-exported) models: validated, completed, never quantized twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import run, tiny_cnn
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.api.cli import build_cli
from ortq.core.error_measures import sqnr_db

RNG = np.random.default_rng(7)
W1 = (RNG.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
B1 = (RNG.standard_normal(8) * 0.1).astype(np.float32)
W2 = (RNG.standard_normal((6, 8)) * 0.5).astype(np.float32)
B2 = (RNG.standard_normal(6) * 0.1).astype(np.float32)
W3 = (RNG.standard_normal((6, 4)) * 0.4).astype(np.float32)
B3 = (RNG.standard_normal(4) * 0.1).astype(np.float32)
# Per-channel weight scales that differ per channel and are no powers of two.
W1_SCALES = (np.abs(W1).reshape(8, -1).max(axis=1) / 127 * 1.013).astype(np.float32)
W2_SCALE = np.float32(np.abs(W2).max() / 127 * 1.07)


def _q(values: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int = 0) -> np.ndarray:
    shape = [1] * values.ndim
    shape[axis] = -1
    s = scale.reshape(shape) if scale.ndim else scale
    z = zp.reshape(shape).astype(np.int64) if zp.ndim else int(zp)
    info = np.iinfo(zp.dtype)
    return np.clip(np.rint(values / s) + z, info.min, info.max).astype(zp.dtype)


def qat_model(**tweak: object) -> onnx.ModelProto:
    """What a QAT exporter writes: Q/DQ pairs on activations (uint8 zp 37, int8 zp -3, ...), int8 weights behind
    DQ (per channel on the Conv), and biases left float; the last MatMul's weight was left float too.

    ``tweak`` replaces initializers by name (to build the invalid variants).
    """
    inits = {
        "x_scale": np.array(0.0123457, np.float32), "x_zp": np.array(37, np.uint8),
        "w1_q": _q(W1, W1_SCALES, np.zeros(8, np.int8)), "w1_scale": W1_SCALES, "w1_zp": np.zeros(8, np.int8),
        "b1": B1,
        "c_scale": np.array(0.0456789, np.float32), "c_zp": np.array(-3, np.int8),
        "f_scale": np.array(0.0098765, np.float32), "f_zp": np.array(11, np.uint8),
        "w2_q": _q(W2, W2_SCALE, np.array(0, np.int8)), "w2_scale": np.array(W2_SCALE), "w2_zp": np.array(0, np.int8),
        "b2": B2,
        "h_scale": np.array(0.0271828, np.float32), "h_zp": np.array(131, np.uint8),
        "w3": W3, "b3": B3,
    }
    float_w2 = tweak.pop("float_w2", False)  # PyTorch style: the float weight -> Q -> DQ in the graph
    dq_c_zp = tweak.pop("dq_c_zp", "c_zp")
    dq_c_scale = tweak.pop("dq_c_scale", "c_scale")
    w1_axis = tweak.pop("w1_axis", 0)
    for name, value in tweak.items():
        inits[name] = value  # type: ignore[assignment]
    if dq_c_zp not in inits:
        inits[dq_c_zp] = np.array(253, np.uint8)  # the same bits as int8 -3, read as another type
    if dq_c_scale not in inits:
        inits[dq_c_scale] = np.array(0.0456, np.float32)
    w2_nodes = []
    if float_w2:
        inits["w2"] = W2
        del inits["w2_q"]
        w2_nodes = [helper.make_node("QuantizeLinear", ["w2", "w2_scale", "w2_zp"], ["w2_q"], name="w2_Q")]
    nodes = w2_nodes + [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_DQ"),
        helper.make_node("DequantizeLinear", ["w1_q", "w1_scale", "w1_zp"], ["w1_dq"], name="w1_DQ", axis=w1_axis),
        helper.make_node("Conv", ["x_dq", "w1_dq", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "c_scale", "c_zp"], ["c_q"], name="c_Q"),
        helper.make_node("DequantizeLinear", ["c_q", dq_c_scale, dq_c_zp], ["c_dq"], name="c_DQ"),
        helper.make_node("Relu", ["c_dq"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("QuantizeLinear", ["f", "f_scale", "f_zp"], ["f_q"], name="f_Q"),
        helper.make_node("DequantizeLinear", ["f_q", "f_scale", "f_zp"], ["f_dq"], name="f_DQ"),
        helper.make_node("DequantizeLinear", ["w2_q", "w2_scale", "w2_zp"], ["w2_dq"], name="w2_DQ"),
        helper.make_node("Gemm", ["f_dq", "w2_dq", "b2"], ["h"], name="fc", transB=1),
        helper.make_node("QuantizeLinear", ["h", "h_scale", "h_zp"], ["h_q"], name="h_Q"),
        helper.make_node("DequantizeLinear", ["h_q", "h_scale", "h_zp"], ["h_dq"], name="h_DQ"),
        helper.make_node("MatMul", ["h_dq", "w3"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "b3"], ["y"], name="bias_add"),
    ]
    graph = helper.make_graph(
        nodes, "qat_export",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(model)
    return model


def _data(n: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {"x": rng.uniform(-0.45, 2.6, size=(n, 3, 8, 8)).astype(np.float32)}  # inside what x_Q covers


def _qdq_params(model: onnx.ModelProto) -> dict[str, list[np.ndarray]]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {
        n.name: [inits[t] for t in n.input[1:]]
        for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
    }


def test_qat_export_round_trips_bit_exactly(toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    model, data = qat_model(), _data()
    out = tmp_path / "completed.onnx"
    result = toolkit.quantize_qat(model, out, verify_data=data)
    completed = onnx.load(out)
    before, after = _qdq_params(model), _qdq_params(completed)
    for name, params in before.items():  # every existing scale and zero point, bit for bit, type for type
        assert name in after, name
        for a, b in zip(params, after[name]):
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    # No second quantization: the Q nodes are the input's; the new DQs are for constants only.
    quantizers = [n for n in completed.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(n.name for n in quantizers) == ["c_Q", "f_Q", "h_Q", "x_Q"]
    assert set(result.filled) == {"b1", "b2", "w3", "b3"}
    inits = {i.name: numpy_helper.to_array(i) for i in completed.graph.initializer}
    producers = {o: n for n in completed.graph.node for o in n.output}
    conv = next(n for n in completed.graph.node if n.name == "conv")
    bias_dq = producers[conv.input[2]]
    assert bias_dq.op_type == "DequantizeLinear" and inits[bias_dq.input[0]].dtype == np.int32
    expected = (np.float64(np.float32(0.0123457)) * W1_SCALES.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(inits[bias_dq.input[1]], expected)
    assert not inits[bias_dq.input[2]].any()
    matmul = next(n for n in completed.graph.node if n.name == "matmul")
    w3_dq = producers[matmul.input[1]]
    assert inits[w3_dq.input[0]].dtype == np.int8 and inits[w3_dq.input[1]].shape == (4,)  # per output channel
    add = next(n for n in completed.graph.node if n.name == "bias_add")
    assert producers[add.input[1]].op_type == "DequantizeLinear"
    onnx.checker.check_model(completed, full_check=True)
    # Same quantization, so the outputs stay practically those of the input model.
    reference, actual = run(model, data)[0], run(completed, data)[0]
    assert sqnr_db(reference, actual) > 35.0
    assert result.verification.outputs[0].sqnr_db == pytest.approx(sqnr_db(reference, actual), abs=0.01)
    assert "filled 'b1'" in result.summary()


def test_float_weights_can_stay_float(toolkit: ortq.Toolkit) -> None:
    model, data = qat_model(), _data()
    result = toolkit.quantize_qat(model, None, quantize_weights=False)
    assert set(result.filled) == {"b1", "b2"}  # the MatMul's weight, and so its bias, stay float
    assert "w3" in {i.name for i in result.model.graph.initializer}
    # Only the biases changed (int32 at input x weight scale): the outputs are within a few bias steps.
    assert np.max(np.abs(run(model, data)[0] - run(result.model, data)[0])) < 0.02


def test_static_quantize_refuses_an_already_quantized_model(
    toolkit: ortq.Toolkit, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ortq.ModelError, match=r"already quantized: it holds 4 QuantizeLinear and 6 DequantizeLinear.*ortq qat"):
        toolkit.quantize(qat_model(), None, calibration_data=_data())
    # Calibrating it is refused too (its statistics could only serve a quantization that is refused).
    with pytest.raises(ortq.ModelError, match="already quantized"):
        toolkit.calibrate(qat_model(), _data())
    # Refused as loaded, before any work on it: an opset-10 QDQ model is not upgraded first.
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="x_DQ"),
    ]
    graph = helper.make_graph(
        nodes, "old_qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.uint8), "z")],
    )
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)], ir_version=5)
    with caplog.at_level("WARNING"), pytest.raises(ortq.ModelError, match="already quantized"):
        toolkit.quantize(old, None, calibration_data={"x": np.zeros((2, 1, 4), np.float32)})
    assert "opset" not in caplog.text


def test_float_model_is_sent_to_quantize(toolkit: ortq.Toolkit) -> None:
    with pytest.raises(ortq.ModelError, match="no QuantizeLinear/DequantizeLinear nodes.*ortq quantize"):
        toolkit.quantize_qat(tiny_cnn(), None)


@pytest.mark.parametrize(
    ("tweak", "message"),
    [
        ({"x_scale": np.array(0.0, np.float32)}, "QuantizeLinear 'x_Q' (QuantizeLinear): scale 'x_scale' must be positive"),
        ({"f_scale": np.array(np.nan, np.float32)}, "'f_Q' (QuantizeLinear): scale 'f_scale' must be positive and finite"),
        ({"w1_scale": np.where(np.arange(8) == 3, -1.0, W1_SCALES).astype(np.float32)}, "scale 'w1_scale' must be positive"),
        ({"w2_zp": np.array(300, np.int32), "w2_q": np.zeros((6, 8), np.uint8)}, "zero point 'w2_zp' = 300 is outside uint8 [0, 255]"),
        ({"w2_zp": np.array(3, np.int32), "w2_q": np.zeros((6, 8), np.uint8)}, "zero point type mismatch: 'w2_zp' is int32"),
        ({"dq_c_zp": "c_zp_u8"}, "tensor 'c': zero point type mismatch: QuantizeLinear 'c_Q' (QuantizeLinear) produces int8"),
        ({"dq_c_scale": "c_scale_other"}, "tensor 'c': mismatched Q/DQ parameters"),
        ({"w1_axis": 4}, "per-channel axis 4 is out of range for tensor 'w1_q' of rank 4"),
        ({"w1_axis": 1}, "8 per-channel scale(s) for tensor 'w1_q', whose axis 1 has 3 channel(s)"),
    ],
)
def test_invalid_qdq_parameters_are_named(toolkit: ortq.Toolkit, tweak: dict, message: str) -> None:
    with pytest.raises(ortq.ModelError) as err:
        toolkit.quantize_qat(qat_model(**tweak), None)
    assert message in str(err.value)


def test_parameters_must_be_constants(toolkit: ortq.Toolkit) -> None:
    model = qat_model()
    # The exporter computed the scale at run time (a Mul of two constants is still not a constant input).
    model.graph.node.insert(0, helper.make_node("Identity", ["x_scale"], ["x_scale_runtime"], name="scale_copy"))
    model.graph.node[1].input[1] = "x_scale_runtime"
    with pytest.raises(ortq.ModelError, match=r"'x_Q'.*scale 'x_scale_runtime' is not a constant \(it is computed by node 'scale_copy'"):
        toolkit.quantize_qat(model, None)


def test_int32_bias_zero_point_must_be_zero(toolkit: ortq.Toolkit) -> None:
    model = qat_model()
    model.graph.initializer.extend([
        numpy_helper.from_array(np.zeros(8, np.int32), "b1_q"),
        numpy_helper.from_array(np.full(8, 1e-4, np.float32), "b1_scale"),
        numpy_helper.from_array(np.full(8, 2, np.int32), "b1_zp"),
    ])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["b1_q", "b1_scale", "b1_zp"], ["b1_dq"], name="b1_DQ", axis=0))
    next(n for n in model.graph.node if n.name == "conv").input[2] = "b1_dq"
    with pytest.raises(ortq.ModelError, match="'b1_DQ'.*int32 DequantizeLinear .* must have zero point 0"):
        toolkit.quantize_qat(model, None)


def test_unrunnable_input_is_named(toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    """An input ONNX Runtime cannot run (an op it does not know) fails the comparison, naming the file."""
    model = qat_model()
    model.graph.node[-1].output[0] = "y_pre"
    model.graph.node.append(helper.make_node("Mystery", ["y_pre"], ["y"], name="mystery", domain="test.custom"))
    model.opset_import.append(helper.make_opsetid("test.custom", 1))
    path = tmp_path / "mystery.onnx"
    onnx.save(model, path)
    with pytest.raises(ortq.ModelError, match=r"mystery\.onnx: ONNX Runtime cannot load the input model to compare with"):
        toolkit.quantize_qat(path, None, verify_data=_data(4))


def test_cli_qat(tmp_path: Path) -> None:
    model_path, data_path, out = tmp_path / "qat.onnx", tmp_path / "data.npz", tmp_path / "out.onnx"
    onnx.save(qat_model(), model_path)
    np.savez(data_path, **_data(8))
    cli = build_cli(ortq.Toolkit(autoload=False))
    ok = CliRunner().invoke(cli, ["qat", str(model_path), "-o", str(out), "-d", str(data_path)])
    assert ok.exit_code == 0, ok.output
    assert "validated 4 QuantizeLinear and 6 DequantizeLinear" in ok.output and "vs the input model: SQNR" in ok.output
    assert _qdq_params(onnx.load(out))["x_Q"][0] == np.float32(0.0123457)
    onnx.save(qat_model(x_scale=np.array(-0.5, np.float32)), model_path)
    bad = CliRunner().invoke(cli, ["qat", str(model_path), "-o", str(out)])
    assert bad.exit_code == 1 and "scale 'x_scale' must be positive" in bad.output
    refused = CliRunner().invoke(cli, ["quantize", str(model_path), "-o", str(out), "-d", str(data_path)])
    assert refused.exit_code == 1 and "ortq qat" in refused.output


def test_completed_matmul_bias_fuses_into_qgemm(toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    """The filled-in weight and bias are what ONNX Runtime needs: the float MatMul + Add becomes QGemm."""
    import onnxruntime as ort

    def optimized_ops(model: onnx.ModelProto, name: str) -> list[str]:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp_path / name)
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(tmp_path / name).graph.node]

    before = optimized_ops(qat_model(), "before.onnx")
    after = optimized_ops(toolkit.quantize_qat(qat_model(), None).model, "after.onnx")
    assert before.count("QGemm") == 1 and "Gemm" in before  # the exported MatMul + Add ran in float
    assert after.count("QGemm") == 2 and "Gemm" not in after and after.count("QLinearConv") == 1


def test_qoperator_format_keeps_the_parameters(toolkit: ortq.Toolkit) -> None:
    model, data = qat_model(), _data()
    result = toolkit.quantize_qat(model, None, quant_format="qoperator", verify_data=data)
    ops = [n.op_type for n in result.model.graph.node]
    assert "QGemm" in ops and "Gemm" not in ops  # the fc layer runs as ONNX Runtime's integer Gemm
    # The kernels carry the exported parameters unchanged (their scale/zero-point inputs are the same values).
    stored = {numpy_helper.to_array(i).tobytes() for i in result.model.graph.initializer}
    for name in ("f_scale", "f_zp", "w2_scale", "h_scale", "h_zp"):
        value = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)
        assert value.tobytes() in stored, name
    onnx.checker.check_model(result.model, full_check=True)
    assert sqnr_db(run(model, data)[0], run(result.model, data)[0]) > 35.0
    assert result.left_qdq  # and says which nodes kept their Q/DQ, with reasons
    with pytest.raises(ortq.ConfigError, match="quant_format 'qlinear' is not one of qdq, qoperator"):
        toolkit.quantize_qat(model, None, quant_format="qlinear")


def test_weights_fake_quantized_in_the_graph(toolkit: ortq.Toolkit) -> None:
    """PyTorch exports a QAT weight as float -> QuantizeLinear -> DequantizeLinear: its bias is filled all the same."""
    model, data = qat_model(float_w2=True), _data()
    result = toolkit.quantize_qat(model, None, verify_data=data)
    assert "b2" in result.filled and "w2" in {i.name for i in result.model.graph.initializer}  # the Q -> DQ stays
    assert _qdq_params(result.model)["w2_Q"][0] == W2_SCALE
    assert result.verification.min_sqnr_db > 35.0
