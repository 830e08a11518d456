"""The ``tensorrt`` target: the QDQ model's layout and the four calibration tables, each read back with a
parser written here from the format's description (never the backend's own code)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.api.cli import build_cli
from ortq.core.error_measures import sqnr_db

# The tensor built to calibrate to about [-60.75, 10]: a one-sided range that ONNX Runtime's own table
# writer (max(hi, lo)) would record as 10, clipping everything below -10.
ASYMMETRIC = "c1"


# -- the model ------------------------------------------------------------------------------------------------
def asymmetric_cnn() -> onnx.ModelProto:
    """x -> Conv -> c1 -> Conv -> Relu -> MaxPool -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y.

    c1's channel 0 sums 27 inputs in [0, 0.9] with weight -2.5 (down to -60.75), channel 1 is a constant 10
    (zero weights, bias 10): c1 calibrates to [-60.75, 10]. c1 feeds a Conv directly, so the tensorrt plan,
    which quantizes the inputs of weighted ops, observes it.
    """
    rng = np.random.default_rng(7)
    w1 = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    w1[0], w1[1] = -2.5, 0.0
    b1 = np.array([0.0, 10.0, 0.0, 0.0], dtype=np.float32)
    w2 = (rng.standard_normal((8, 4, 3, 3)) * 0.05).astype(np.float32)
    b2 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w3 = (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32)
    b3 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w4 = (rng.standard_normal((5, 8)) * 0.5).astype(np.float32)
    b4 = (rng.standard_normal(5) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(v, k) for k, v in
             dict(w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3, w4=w4, b4=b4).items()]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "asymmetric_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def images(n: int, seed: int, bright: bool = False) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).uniform(0.0, 0.9, size=(n, 3, 8, 8)).astype(np.float32)
    if bright:
        x[0] = 0.9  # one all-bright image: c1's channel 0 reaches -2.5 * 27 * 0.9 = -60.75
    return {"x": x}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[ortq.QuantizationResult, Path]:
    out = tmp_path_factory.mktemp("trt")
    result = ortq.Toolkit(autoload=False).quantize(
        asymmetric_cnn(), out / "m.onnx", calibration_data=images(32, seed=1, bright=True), target="tensorrt"
    )
    return result, out


def expected_amax(result: ortq.QuantizationResult) -> dict[str, float]:
    return {t: max(abs(lo), abs(hi)) for t, (lo, hi) in result.ranges.items()}


def f32(value: float) -> float:
    return float(np.float32(value))


# -- independent readers ------------------------------------------------------------------------------------
def read_trt_table(buf: bytes) -> dict[str, str]:
    """ONNX Runtime's CalTableFlatBuffers schema, read with flatbuffers' generic Table accessors:
    root TrtTable { dict: [KeyValue] } (vtable offset 4); KeyValue { key: string (offset 4); value: string (6) }."""
    from flatbuffers import encode, packer
    from flatbuffers.table import Table

    root = Table(bytearray(buf), encode.Get(packer.uoffset, buf, 0))
    field = root.Offset(4)
    assert field, "TrtTable.dict missing"
    start, n = root.Vector(field), root.VectorLen(field)
    entries: dict[str, str] = {}
    for i in range(n):
        kv = Table(root.Bytes, root.Indirect(start + 4 * i))
        key_off, value_off = kv.Offset(4), kv.Offset(6)
        assert key_off and value_off, "KeyValue.key is required and value is always written"
        entries[kv.String(key_off + kv.Pos).decode()] = kv.String(value_off + kv.Pos).decode()
    return entries


def read_native_cache(text: str) -> tuple[str, dict[str, float]]:
    """TensorRT's cache: a header line, then '<tensor>: <big-endian float32 bits in hex>' per line."""
    lines = text.splitlines()
    scales = {}
    for line in lines[1:]:
        name, _, hexbits = line.rpartition(": ")
        assert len(hexbits) == 8, line
        scales[name] = struct.unpack(">f", bytes.fromhex(hexbits))[0]
    return lines[0], scales


def read_text_cache(text: str) -> dict[str, float]:
    """ONNX Runtime's calibration.cache: '<tensor> <dynamic range>' per line."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


# -- the QDQ model ------------------------------------------------------------------------------------------
def test_model_is_valid_and_laid_out_for_tensorrt(exported) -> None:
    result, out = exported
    model = onnx.load(out / "m.onnx")
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, images(4, seed=3))
    assert y.shape == (4, 5) and np.all(np.isfinite(y))

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:  # int8, zero point 0 everywhere: TensorRT is symmetric-only
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            assert inits[node.input[0]].dtype == np.int8, f"{node.name}: TensorRT dequantizes int8 only"

    producer = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3
    relu_fed = 0
    for conv in convs:
        dq = producer[conv.input[1]]  # weights per output channel, along axis 0
        assert dq.op_type == "DequantizeLinear"
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        scale = inits[dq.input[1]]
        assert axis == 0 and scale.shape == (inits[dq.input[0]].shape[0],)
        assert conv.input[2] in inits and inits[conv.input[2]].dtype == np.float32  # biases stay float
        assert producer[conv.input[0]].op_type == "DequantizeLinear"  # every weighted op's input is quantized
        readers = [c.op_type for c in model.graph.node if conv.output[0] in c.input]
        if readers == ["Relu"]:  # no Q between Conv and Relu: TensorRT fuses them and ends in the next Q
            relu_fed += 1
        else:
            assert readers == ["QuantizeLinear"] and conv.output[0] == ASYMMETRIC  # c1 is conv2's input
    assert relu_fed == 2
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert producer[gemm.input[0]].op_type == "DequantizeLinear"
    assert "y" in {o for n in model.graph.node if n.op_type == "Gemm" for o in n.output}  # float logits

    # activation scales are amax / 127 of the calibrated ranges
    for tensor in ("x", ASYMMETRIC, "p2", "f"):
        assert tensor in result.ranges, tensor
        np.testing.assert_allclose(result.params[tensor].scale, f32(expected_amax(result)[tensor]) / 127, rtol=1e-6)


def test_the_constructed_range_is_asymmetric(exported) -> None:
    result, _ = exported
    lo, hi = result.ranges[ASYMMETRIC]
    assert lo == pytest.approx(-60.75, abs=1e-3) and hi == pytest.approx(10.0, abs=1e-4)


def test_accuracy_on_held_out_data(exported) -> None:
    result, out = exported
    feeds = images(64, seed=11)
    ref = ort.InferenceSession(asymmetric_cnn().SerializeToString(), providers=["CPUExecutionProvider"])
    quant = ort.InferenceSession(str(out / "m.onnx"), providers=["CPUExecutionProvider"])
    assert sqnr_db(ref.run(None, feeds)[0], quant.run(None, feeds)[0]) > 25.0


# -- the four tables ----------------------------------------------------------------------------------------
def test_export_writes_four_tables(exported) -> None:
    result, out = exported
    names = sorted(p.name for p in result.artifacts)
    assert names == sorted(["calibration.flatbuffers", "calibration.json", "calibration.cache", "m.trt.cache"])
    assert all(p.parent == out and p.is_file() for p in result.artifacts)
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries


def test_flatbuffers_table(exported) -> None:
    result, out = exported
    entries = read_trt_table((out / "calibration.flatbuffers").read_bytes())
    amax = expected_amax(result)
    assert set(entries) == set(amax)
    for tensor, value in entries.items():
        assert np.float32(float(value)) == np.float32(amax[tensor]), tensor
    assert float(entries[ASYMMETRIC]) == pytest.approx(60.75, abs=1e-3)  # not 10


def test_flatbuffers_table_loads_with_onnxruntimes_generated_reader(exported) -> None:
    _, out = exported
    from onnxruntime.quantization.CalTableFlatBuffers.TrtTable import TrtTable

    buf = (out / "calibration.flatbuffers").read_bytes()
    table = TrtTable.GetRootAs(buf, 0)
    keys = [table.Dict(i).Key().decode() for i in range(table.DictLength())]
    assert keys == sorted(keys) and keys == sorted(read_trt_table(buf))


def test_json_table(exported) -> None:
    result, out = exported
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["CLS"] == "TensorsData"
    assert doc["calibration_method"] == {"CLS": "CalibrationMethod", "value": "CalibrationMethod.MinMax"}
    amax = expected_amax(result)
    assert set(doc["data"]) == set(amax)
    for tensor, entry in doc["data"].items():
        assert entry["CLS"] == "TensorData"
        (lo,), (hi,) = entry["lowest"]["data"], entry["highest"]["data"]
        assert np.float32(hi) == np.float32(amax[tensor]) and np.float32(lo) == -np.float32(amax[tensor]), tensor
    assert doc["data"][ASYMMETRIC]["highest"]["data"][0] == pytest.approx(60.75, abs=1e-3)


def test_json_table_loads_with_onnxruntime(exported) -> None:
    result, out = exported
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(out / "calibration.json")
    for tensor, value in expected_amax(result).items():
        np.testing.assert_array_equal(data[tensor].range_value, ([-f32(value)], [f32(value)]))


def test_text_table(exported) -> None:
    result, out = exported
    text = (out / "calibration.cache").read_text()
    values = read_text_cache(text)
    amax = expected_amax(result)
    assert set(values) == set(amax)
    assert [line.split(" ")[0] for line in text.splitlines()] == sorted(amax)
    for tensor, value in values.items():
        assert np.float32(value) == np.float32(amax[tensor]), tensor
    assert values[ASYMMETRIC] == pytest.approx(60.75, abs=1e-3)


def test_native_tensorrt_cache(exported) -> None:
    result, out = exported
    header, scales = read_native_cache((out / "m.trt.cache").read_text())
    assert header == "TRT-8601-EntropyCalibration2"
    amax = expected_amax(result)
    assert set(scales) == set(amax)
    for tensor, scale in scales.items():
        assert np.float32(scale) == np.float32(amax[tensor]) / np.float32(127), tensor
        # the same scale the QDQ model uses for the tensor, where it has one
        if tensor in result.params:
            assert np.float32(scale) == pytest.approx(float(result.params[tensor].scale), rel=1e-6)
    assert scales[ASYMMETRIC] * 127 == pytest.approx(60.75, abs=1e-3)


# -- options, CLI, errors -----------------------------------------------------------------------------------
def test_cli_export_writes_model_and_tables(tmp_path: Path) -> None:
    model_path, data_path = tmp_path / "net.onnx", tmp_path / "calib.npz"
    onnx.save(asymmetric_cnn(), model_path)
    np.savez(data_path, **images(16, seed=1, bright=True))
    cli = build_cli(ortq.Toolkit(autoload=False))
    runner = CliRunner()

    out = tmp_path / "out"
    res = runner.invoke(cli, ["export", "tensorrt", str(model_path), "-o", str(out), "-d", str(data_path)])
    assert res.exit_code == 0, res.output
    files = {p.name for p in out.iterdir()}
    assert files == {"net.tensorrt.onnx", "calibration.flatbuffers", "calibration.json", "calibration.cache",
                     "net.tensorrt.trt.cache"}
    onnx.checker.check_model(onnx.load(out / "net.tensorrt.onnx"), full_check=True)
    assert read_native_cache((out / "net.tensorrt.trt.cache").read_text())[0] == "TRT-8601-EntropyCalibration2"

    out2 = tmp_path / "out2"
    res = runner.invoke(cli, [
        "export", "tensorrt", str(model_path), "-o", str(out2), "-d", str(data_path),
        "--backend-option", "trt_version=10.3.0", "--backend-option", "algorithm=minmaxcalibration",
    ])
    assert res.exit_code == 0, res.output
    header, scales = read_native_cache((out2 / "net.tensorrt.trt.cache").read_text())
    assert header == "TRT-100300-MinMaxCalibration"
    assert scales[ASYMMETRIC] * 127 == pytest.approx(60.75, abs=1e-3)

    res = runner.invoke(cli, [
        "export", "tensorrt", str(model_path), "-o", str(tmp_path / "out3"), "-d", str(data_path),
        "--backend-option", "trt_version=8601", "--backend-option", "tables=false",
    ])
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "out3").iterdir()} == {"net.tensorrt.onnx"}

    res = runner.invoke(cli, [
        "export", "tensorrt", str(model_path), "-o", str(tmp_path / "out4"), "-d", str(data_path),
        "--backend-option", "trt_version=eight",
    ])
    assert res.exit_code == 1 and "trt_version" in res.output


@pytest.mark.parametrize("given, header", [
    ("8601", "8601"), ("8.6.1", "8601"), ("8.6.1.6", "8601"), ("7.1.3", "7103"), ("8.4", "8400"),
    ("10.3.0", "100300"), ("10.14.1", "101401"), (8203, "8203"),
])
def test_trt_version_forms(given, header) -> None:
    backend = ortq.Toolkit(autoload=False).backend("tensorrt", trt_version=given)
    assert backend.header == f"TRT-{header}-EntropyCalibration2"


@pytest.mark.parametrize("options", [{"trt_version": "8.x"}, {"algorithm": "KL"}, {"tables": "maybe"}])
def test_bad_options_are_refused(options) -> None:
    with pytest.raises(ortq.ConfigError):
        ortq.Toolkit(autoload=False).backend("tensorrt", **options)


def test_default_scheme() -> None:
    config = ortq.Toolkit(autoload=False).backend("tensorrt").default_config()
    assert config.activation.qtype is ortq.QuantType.INT8 and config.activation.symmetric
    assert config.weight.qtype is ortq.QuantType.INT8 and config.weight.symmetric and config.per_channel
    assert config.calibrator == "minmax" and not config.quantize_bias
    assert {"Conv", "ConvTranspose", "MatMul", "Gemm", "MaxPool"} <= config.op_types
    assert not {"Softmax", "LayerNormalization", "BatchNormalization"} & config.op_types


def test_options_tensorrt_cannot_run_are_refused(tmp_path: Path) -> None:
    toolkit = ortq.Toolkit(autoload=False)
    with pytest.raises(ortq.ModelError, match="uint8"):
        toolkit.quantize(asymmetric_cnn(), tmp_path / "a.onnx", calibration_data=images(8, seed=1),
                         target="tensorrt", activation_type="uint8", activation_symmetric=False)
    with pytest.raises(ortq.ModelError, match="int32"):
        toolkit.quantize(asymmetric_cnn(), tmp_path / "b.onnx", calibration_data=images(8, seed=1),
                         target="tensorrt", quantize_bias=True)


def test_vetoed_and_degenerate_ranges() -> None:
    from ortq.plugins.backends.tensorrt import calibration_amax

    result = SimpleNamespace(
        ranges={"a": (-60.0, 10.0), "b": (0.0, 3.5), "z": (0.0, 0.0), "mask": (-1e9, 0.0), "inf": (-np.inf, 1.0)},
        vetoes={"mask": "range beyond extreme_range"},
    )
    assert calibration_amax(result) == {"a": 60.0, "b": 3.5, "z": 127.0}


def deconv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array((rng.standard_normal((3, 4, 2, 2)) * 0.5).astype(np.float32), "wt"),
        numpy_helper.from_array((rng.standard_normal((2, 4, 3, 3)) * 0.3).astype(np.float32), "wc"),
    ]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "wt"], ["u"], name="up", strides=[2, 2]),
        helper.make_node("Relu", ["u"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wc"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "deconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 16, 16])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_conv_transpose_is_float_unless_weights_are_per_tensor(tmp_path: Path) -> None:
    """TensorRT takes ConvTranspose weights per input channel only; ortq's per-channel axis is the output one."""
    toolkit = ortq.Toolkit(autoload=False)
    result = toolkit.quantize(deconv_model(), tmp_path / "a.onnx", calibration_data=images(8, seed=1),
                              target="tensorrt")
    (up,) = [n for n in result.plan.float_nodes if n.name == "up"]
    assert "axis 0" in up.reason and "conv" in result.plan.quantized_nodes

    result = toolkit.quantize(deconv_model(), tmp_path / "b.onnx", calibration_data=images(8, seed=1),
                              target="tensorrt", per_channel=False)
    assert "up" in result.plan.quantized_nodes and len(result.artifacts) == 4
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    producer = {o: n for n in result.model.graph.node for o in n.output}
    deconv = next(n for n in result.model.graph.node if n.op_type == "ConvTranspose")
    assert inits[producer[deconv.input[1]].input[1]].ndim == 0  # one scale for the whole kernel


# -- tables for every tensor (implicit INT8) ------------------------------------------------------------------
def matmul_add_model() -> onnx.ModelProto:
    """x [N, 4] -> MatMul(W) -> m -> Add(b) -> Y: the tensorrt plan quantizes only MatMul's inputs (x), so m and
    Y are ranges TensorRT's implicit INT8 needs that explicit QDQ does not."""
    w = np.array([[-20.0, 2.0], [-20.0, 2.0], [-20.0, 2.0], [0.0, 0.0]], dtype=np.float32)
    b = np.array([0.0, 4.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["Y"], name="add")],
        "matmul_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def test_tables_hold_every_float_tensor(tmp_path: Path) -> None:
    model = matmul_add_model()
    x = np.random.default_rng(5).uniform(0.0, 1.0, (16, 4)).astype(np.float32)
    x[0, :3] = 1.0  # Y[:, 0] reaches -60, Y[:, 1] reaches 10
    m = x @ numpy_helper.to_array(model.graph.initializer[0])
    y = m + numpy_helper.to_array(model.graph.initializer[1])
    expected = {"x": float(np.abs(x).max()), "m": float(np.abs(m).max()), "Y": float(np.abs(y).max())}
    assert expected["Y"] == pytest.approx(60.0) and float(y.max()) == pytest.approx(10.0)

    result = ortq.Toolkit(autoload=False).quantize(model, tmp_path / "m.onnx", calibration_data={"x": x}, target="tensorrt")
    entries = {
        "flatbuffers": {k: float(v) for k, v in read_trt_table((tmp_path / "calibration.flatbuffers").read_bytes()).items()},
        "json": {k: v["highest"]["data"][0] for k, v in json.loads((tmp_path / "calibration.json").read_text())["data"].items()},
        "text": read_text_cache((tmp_path / "calibration.cache").read_text()),
        "native": {k: v * 127 for k, v in read_native_cache((tmp_path / "m.trt.cache").read_text())[1].items()},
    }
    for kind, table in entries.items():
        assert set(table) == set(expected), kind
        for tensor, value in expected.items():
            assert table[tensor] == pytest.approx(value, rel=1e-6), (kind, tensor)
    assert entries["text"]["Y"] == pytest.approx(60.0, rel=1e-6)

    # The explicit-QDQ model is the one written without tables: the extra observations change nothing in it.
    (tmp_path / "plain").mkdir()
    plain = ortq.Toolkit(autoload=False).quantize(
        model, tmp_path / "plain" / "m.onnx", calibration_data={"x": x}, target="tensorrt", backend_options={"tables": False},
    )
    assert plain.model.SerializeToString() == result.model.SerializeToString()
    assert set(plain.ranges) == {"x"} and plain.artifacts == []
