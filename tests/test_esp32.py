"""The ``esp32`` target (Espressif ESP-DL): BN folding, power-of-two exports, C++ that compiles, the host
integer simulation against ONNX Runtime, and refusal of what the chip cannot run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import run
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.api.cli import build_cli
from ortq.plugins.backends.esp32 import Esp32Backend, chip_spec, fold_batch_norm, optimize_for_esp_dl
from ortq.plugins.backends.esp32.chips import HALF_EVEN, HALF_UP
from ortq.plugins.backends.esp32.codegen import filter_layout, filter_unlayout
from ortq.plugins.backends.esp32.qdq import round_div



# -- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toolkit() -> ortq.Toolkit:
    return ortq.Toolkit(autoload=False)


def _export(toolkit: ortq.Toolkit, digits: Path, out: Path, **options) -> ortq.pipeline.run.QuantizationResult:
    out.mkdir(parents=True, exist_ok=True)
    return toolkit.quantize(
        digits / "model.onnx", out / "model.esp32.onnx", calibration_data=digits / "calibration.npz",
        target="esp32", backend_options=options,
    )


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", inputs, outputs, initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _bn_inits(rng: np.random.Generator, prefix: str, c: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_scale": rng.uniform(0.5, 2.0, c).astype(np.float32),
        f"{prefix}_bias": rng.normal(0, 0.5, c).astype(np.float32),
        f"{prefix}_mean": rng.normal(0, 0.5, c).astype(np.float32),
        f"{prefix}_var": rng.uniform(0.2, 3.0, c).astype(np.float32),
    }


def _conv_bn_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv (no bias) -> BN -> Relu -> Conv (bias) -> BN -> Add(per-channel constant) -> Reshape([2, -1]) ->
    Gemm(alpha, beta, transB) -> BN, at a fixed batch of 2."""
    inits = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
        "w2": rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 4).astype(np.float32),
        "wf": rng.normal(0, 0.3, (5, 4 * 6 * 6)).astype(np.float32),
        "bf": rng.normal(0, 0.1, 5).astype(np.float32),
        "add_c": rng.normal(0, 0.3, (1, 4, 1, 1)).astype(np.float32),
        "to_2d": np.array([2, -1], dtype=np.int64),
        **_bn_inits(rng, "bn1", 8), **_bn_inits(rng, "bn2", 4), **_bn_inits(rng, "bn3", 5),
    }
    bn = lambda i, x, y: helper.make_node(  # noqa: E731
        "BatchNormalization", [x, f"bn{i}_scale", f"bn{i}_bias", f"bn{i}_mean", f"bn{i}_var"], [y], name=f"bn{i}",
        epsilon=1e-3,
    )
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn(1, "c1", "n1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        bn(2, "c2", "n2"),
        helper.make_node("Add", ["n2", "add_c"], ["a2"], name="add_bias"),
        helper.make_node("Reshape", ["a2", "to_2d"], ["f"], name="reshape"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["g"], name="fc", transB=1, alpha=0.5, beta=2.0),
        bn(3, "g", "output"),
    ]
    return _model(
        nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 5])], inits,
    )


# -- 1. BatchNormalization folding --------------------------------------------------------------------------
def test_batch_norm_folds_into_conv_and_gemm_with_identical_outputs() -> None:
    rng = np.random.default_rng(0)
    model = _conv_bn_model(rng)
    x = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    expected = run(model, {"input": x})[0]
    folded = fold_batch_norm(onnx.ModelProto.FromString(model.SerializeToString()))
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv", "Add", "Reshape", "Gemm"]
    conv1 = folded.graph.node[0]
    assert len(conv1.input) == 3 and conv1.input[2], "a bias is created for the Conv that had none"
    np.testing.assert_allclose(run(folded, {"input": x})[0], expected, rtol=1e-5, atol=1e-5)
    # The model the original file describes is untouched (weights are new initializers, not edits).
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 3

    # The backend's prepare step also folds the Add into the Conv's bias and makes the batch dynamic (the
    # Reshape to [2, -1] follows it): other batch sizes now run.
    prepared = optimize_for_esp_dl(onnx.ModelProto.FromString(model.SerializeToString()))
    assert [n.op_type for n in prepared.graph.node] == ["Conv", "Relu", "Conv", "Reshape", "Gemm"]
    dims = [vi.type.tensor_type.shape.dim[0] for vi in (*prepared.graph.input, *prepared.graph.output)]
    assert all(d.dim_param == "batch" for d in dims)
    x5 = rng.normal(0, 1, (5, 3, 8, 8)).astype(np.float32)
    batched = run(prepared, {"input": x5})[0]
    np.testing.assert_allclose(batched[:2], run(model, {"input": x5[:2]})[0], rtol=1e-5, atol=1e-5)


def test_quantizing_for_esp32_folds_batch_norm_first(toolkit: ortq.Toolkit) -> None:
    rng = np.random.default_rng(1)
    model = _conv_bn_model(rng)
    result = toolkit.quantize(model, calibration_data={"input": rng.normal(0, 1, (8, 3, 8, 8)).astype(np.float32)}, target="esp32")
    assert "BatchNormalization" not in {n.op_type for n in result.model.graph.node}
    assert result.plan.float_nodes == []


# -- 2. Exponents reproduce the quantized tensors bit for bit ------------------------------------------------
def _cpp_arrays(text: str) -> dict[str, tuple[str, np.ndarray]]:
    arrays = {}
    for m in re.finditer(r"alignas\(16\) const (\w+) (\w+)\[(\d+)\] = \{([^}]*)\};", text):
        ctype, name, size, body = m.groups()
        values = np.array([int(v) for v in body.replace("\n", " ").split(",") if v.strip()], dtype=np.int64)
        assert values.size == int(size)
        arrays[name] = (ctype, values)
    return arrays


def _dequantize_in_ort(qdq: onnx.ModelProto, dq_outputs: list[str]) -> dict[str, np.ndarray]:
    """Run just the QDQ model's DequantizeLinear nodes for these outputs in ONNX Runtime."""
    nodes = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in dq_outputs]
    needed = {x for n in nodes for x in n.input}
    inits = [i for i in qdq.graph.initializer if i.name in needed]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in dq_outputs]
    graph = helper.make_graph(nodes, "dq", [], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=list(qdq.opset_import), ir_version=qdq.ir_version)
    return dict(zip(dq_outputs, run(model, {})))


@pytest.mark.parametrize(("chip", "bits", "per_channel"), [("esp32s3", 16, False), ("esp32", 8, True)])
def test_exported_exponents_reproduce_the_qdq_weights_bit_for_bit(
    toolkit: ortq.Toolkit, digits: Path, tmp_path: Path, chip: str, bits: int, per_channel: bool
) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    result = toolkit.quantize(
        digits / "model.onnx", tmp_path / "model.esp32.onnx", calibration_data=digits / "calibration.npz",
        target="esp32", backend_options={"chip": chip, "bits": bits}, per_channel=per_channel,
    )
    spec = chip_spec(chip, bits)
    cpp = (tmp_path / "model_coefficient.cpp").read_text()
    hpp = (tmp_path / "model_coefficient.hpp").read_text()
    arrays = _cpp_arrays(cpp)
    assert cpp.count("alignas(16)") == len(arrays) and arrays
    qdq = result.model
    kernels = {n.name: n for n in qdq.graph.node if n.op_type in ("Conv", "Gemm")}
    assert set(kernels) == {"conv1", "conv2", "conv3", "fc"}
    dq_of = {n.output[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    reference = _dequantize_in_ort(qdq, [k.input[i] for k in kernels.values() for i in (1, 2)])
    for name, node in kernels.items():
        ctype, elements = arrays[f"{name}_filter_element"]
        assert ctype == f"int{bits}_t"
        ctor = re.search(rf"dl::Filter<{ctype}> {name}_filter\({name}_filter_element, ([^{{]+), \{{([\d, ]+)\}}", cpp)
        declared = [int(v) for v in ctor.group(2).split(",")]
        if per_channel:
            assert f"{name}_filter_channel_exponent" in ctor.group(1)
            exponent = arrays[f"{name}_filter_channel_exponent"][1]
        else:
            exponent = np.array(int(ctor.group(1)))
        weight = reference[node.input[1]]  # ONNX Runtime's DequantizeLinear of the QDQ model's weight
        if node.op_type == "Conv":
            onnx_shape = weight.shape
            assert declared == [onnx_shape[2], onnx_shape[3], onnx_shape[1], onnx_shape[0]]  # HWCN
            ints = filter_unlayout(elements, onnx_shape, spec)
            exported = ints.astype(np.float64) * np.exp2(exponent.astype(np.float64)).reshape(-1, 1, 1, 1)
        else:  # Gemm, transB=1: weight [N, K] is exported as a [1, 1, K, N] filter
            n_out, k = weight.shape
            assert declared == [1, 1, k, n_out]
            ints = filter_unlayout(elements, (n_out, k, 1, 1), spec)[:, :, 0, 0]
            exported = ints.astype(np.float64) * np.exp2(exponent.astype(np.float64)).reshape(-1, 1)
        assert np.array_equal(exported.astype(np.float32), weight), name
        assert np.all(np.abs(ints) <= spec.qmax)
        # Biases as ESP-DL v1.1 keeps them: per tensor in the activation type at the layer's output exponent,
        # per channel int16 at input + weight[c] + 4 with the object's exponent -128; the QDQ model's bias
        # rounded (half up) onto that grid, within the type's range.
        bctype, bias = arrays[f"{name}_bias_element"]
        bias_exponent = int(re.search(rf"{name}_bias\({name}_bias_element, (-?\d+),", cpp).group(1))
        if per_channel:
            assert bctype == "int16_t" and bias_exponent == -128
            input_exponent = int(re.search(rf"constexpr int {name}_input_exponent = (-?\d+);", hpp).group(1))
            per_element = input_exponent + exponent + 4
        else:
            assert bctype == f"int{bits}_t"
            per_element = int(re.search(rf"constexpr int {name}_output_exponent = (-?\d+);", hpp).group(1))
            assert bias_exponent == per_element
        limit = 2 ** (int(bctype[3:-2]) - 1)
        assert np.all((bias >= -limit) & (bias < limit))
        step = np.exp2(np.asarray(per_element, dtype=np.float64))
        real = reference[node.input[2]].astype(np.float64)
        expected = np.clip(np.floor(real / step + 0.5), -limit, limit - 1)
        assert np.array_equal(bias, expected), name
        assert dq_of[node.input[2]].op_type == "DequantizeLinear"


def test_filter_layouts_follow_the_chip(tmp_path: Path) -> None:
    w = np.arange(17 * 2 * 1 * 1).reshape(17, 2, 1, 1)  # 17 output channels, 2 input channels, 1x1
    s3 = chip_spec("esp32s3", 8)
    flat, declared = filter_layout(w, s3)
    assert declared == [1, 1, 2, 17]
    # First block of 16 output channels with the channels innermost (C0 of n0..n15, then C1 of n0..n15),
    # then the 17th channel in NHWC.
    expected = np.concatenate([w[:16, 0, 0, 0], w[:16, 1, 0, 0], w[16, :, 0, 0]])
    assert np.array_equal(flat, expected)
    esp32_flat, _ = filter_layout(w, chip_spec("esp32", 8))
    assert np.array_equal(esp32_flat, w.transpose(0, 2, 3, 1).reshape(-1))  # NHWC
    int16_flat, _ = filter_layout(w, chip_spec("esp32p4", 16))  # blocks of 8
    assert np.array_equal(int16_flat[:16], np.concatenate([w[:8, 0, 0, 0], w[:8, 1, 0, 0]]))
    for spec in (s3, chip_spec("esp32", 16), chip_spec("esp32p4", 16)):
        for depthwise, shape in ((False, (19, 3, 3, 2)), (True, (21, 1, 3, 3))):
            w = np.random.default_rng(0).integers(-127, 128, shape)
            assert np.array_equal(filter_unlayout(filter_layout(w, spec, depthwise)[0], shape, spec, depthwise), w)


def test_chip_rounding_modes() -> None:
    ties = np.array([-5, -3, -1, 1, 3, 5])  # x.5 after halving
    assert round_div(ties, 2, HALF_UP).tolist() == [-2, -1, 0, 1, 2, 3]  # floor(x + 0.5)
    assert round_div(ties, 2, HALF_EVEN).tolist() == [-2, -2, 0, 0, 2, 2]
    assert chip_spec("esp32s3", 8).rounding == HALF_UP and chip_spec("esp32p4", 8).rounding == HALF_EVEN


def test_power_of_two_scheme_survives_user_options(toolkit: ortq.Toolkit, digits: Path) -> None:
    from ortq.core.scheme import is_power_of_two

    result = toolkit.quantize(
        digits / "model.onnx", calibration_data=digits / "calibration.npz", target="esp32",
        calibrate_method="entropy", per_channel=True, weight_symmetric=True, verify=False,
    )
    assert result.config.activation.power_of_two and result.config.weight.power_of_two
    assert all(is_power_of_two(p.scale) for p in result.params.values())
    assert any(p.per_channel for p in result.params.values())
    with pytest.raises(ortq.ConfigError, match="symmetric"):
        toolkit.quantize(digits / "model.onnx", calibration_data=digits / "calibration.npz", target="esp32",
                         activation_symmetric=False)
    with pytest.raises(ortq.ConfigError, match="chip"):
        toolkit.backend("esp32", chip="esp8266")


# -- 3. `ortq export esp32s3` writes the v1.1 files --------------------------------------------------------
def test_cli_export_writes_cpp_that_compiles(digits: Path, tmp_path: Path) -> None:
    cli = build_cli(ortq.Toolkit(autoload=False))
    out = tmp_path / "export"
    result = CliRunner().invoke(cli, [
        "export", "esp32s3", str(digits / "model.onnx"), "-o", str(out), "-d", str(digits / "calibration.npz"),
    ])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "model.esp32s3.onnx", "model_coefficient.cpp", "model_coefficient.hpp", "model_coefficient_report.md",
        "model_model.hpp",
    ]
    hpp = (out / "model_coefficient.hpp").read_text()
    assert "namespace model_coefficient" in hpp
    for layer in ("conv1", "conv2", "conv3", "fc"):
        assert f"const dl::Filter<int8_t> *get_{layer}_filter();" in hpp
        assert f"const dl::Bias<int8_t> *get_{layer}_bias();" in hpp  # v1.1: int8 per-tensor biases
        assert re.search(rf"constexpr int {layer}_output_exponent = -?\d+;", hpp)
    assert "get_conv1_activation" in hpp and "get_fc_activation" not in hpp
    assert "class MODEL : public Model<int8_t>" in (out / "model_model.hpp").read_text()
    # Compiled against ESP-DL v1.1's real headers in tests/test_esp32_v1.py.


# -- 4. The host simulation against ONNX Runtime -------------------------------------------------------
@pytest.mark.parametrize("chip", ["esp32s3", "esp32"])
def test_host_evaluator_accuracy_matches_onnxruntime(toolkit: ortq.Toolkit, digits: Path, tmp_path: Path, chip: str) -> None:
    result = _export(toolkit, digits, tmp_path, chip=chip)
    with np.load(digits / "evaluation.npz") as data:
        images, labels = data["input"], data["label"]
    float_acc = float(np.mean(run(digits / "model.onnx", {"input": images})[0].argmax(1) == labels))
    qdq_logits = run(result.model, {"input": images})[0]
    qdq_acc = float(np.mean(qdq_logits.argmax(1) == labels))
    backend = Esp32Backend(chip=chip)
    simulated = backend.evaluate(result, {"input": images})["logits"]
    sim_acc = float(np.mean(simulated.argmax(1) == labels))
    print(
        f"\ndigits on {chip} int8 ({len(labels)} images): float {float_acc:.2%}, QDQ (ONNX Runtime) {qdq_acc:.2%}, "
        f"ESP-DL host simulation {sim_acc:.2%}; simulation vs QDQ top-1 agreement "
        f"{np.mean(simulated.argmax(1) == qdq_logits.argmax(1)):.2%}"
    )
    assert abs(sim_acc - qdq_acc) <= 0.01
    assert sim_acc >= float_acc - 0.02
    report = backend.evaluation_report(result, {"input": images}, tmp_path)
    assert report.name == "model_evaluation.md" and "conv2" in report.read_text()


def test_simulation_equals_onnxruntime_where_the_chip_rounds_like_onnx(toolkit: ortq.Toolkit) -> None:
    """ESP32-P4 rounds half to even, as ONNX's QuantizeLinear: without a fused activation (whose single
    rounding differs from the QDQ graph's two) the integer simulation and ONNX Runtime agree exactly."""
    rng = np.random.default_rng(3)
    inits = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "b1": rng.normal(0, 0.2, 8).astype(np.float32),
        "w2": rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32), "b2": rng.normal(0, 0.2, 8).astype(np.float32),
        "wd": rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32),
        "wf": rng.normal(0, 0.3, (16, 5)).astype(np.float32), "bf": rng.normal(0, 0.2, 5).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("MaxPool", ["c1"], ["p1"], name="p1", kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p1", "wd"], ["d"], name="dw", group=8, pads=[2, 2, 2, 2], dilations=[2, 2]),
        helper.make_node("Add", ["c2", "d"], ["a"], name="add"),
        helper.make_node("Clip", ["a", "lo", "hi"], ["r"], name="clip"),
        helper.make_node("Concat", ["r", "c1"], ["cat"], name="cat", axis=1),
        helper.make_node("GlobalMaxPool", ["cat"], ["g"], name="gmp"),
        helper.make_node("Reshape", ["g", "shape"], ["f"], name="reshape"),
        helper.make_node("MatMul", ["f", "wf"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "bf"], ["output"], name="fc_bias"),
    ]
    inits.update(lo=np.array(-1.0, np.float32), hi=np.array(2.0, np.float32), shape=np.array([0, -1], np.int64))
    model = _model(
        nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 5])], inits,
    )
    x = rng.normal(0, 1, (48, 3, 12, 12)).astype(np.float32)
    result = toolkit.quantize(model, calibration_data={"input": x[:16]}, target="esp32", backend_options={"chip": "esp32p4"})
    assert result.plan.float_nodes == []
    simulated = Esp32Backend(chip="esp32p4").evaluate(result, {"input": x[16:]})["output"]
    np.testing.assert_array_equal(simulated, run(result.model, {"input": x[16:]})[0])


# -- 5. What the chip cannot run is refused by name -----------------------------------------------------
def _tiny(nodes, inits, out_shape) -> onnx.ModelProto:
    return _model(
        nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)], inits,
    )


def test_unsupported_ops_and_shapes_are_refused_by_name(toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    data = {"input": rng.normal(0, 1, (8, 4, 6, 6)).astype(np.float32)}
    conv = lambda name, w, x, y, **kw: helper.make_node("Conv", [x, name + "_w"], [y], name=name, **kw)  # noqa: E731
    softmax_model = _tiny(
        [conv("conv", None, "input", "c"), helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
         helper.make_node("Softmax", ["f"], ["output"], name="probabilities", axis=1)],
        {"conv_w": rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)}, ["N", 64],
    )
    with pytest.raises(ortq.ModelError, match=r"node 'probabilities' \(Softmax\) cannot run on esp32s3"):
        toolkit.quantize(softmax_model, tmp_path / "softmax.onnx", calibration_data=data, target="esp32")
    grouped = _tiny(
        [conv("grouped_conv", None, "input", "output", group=2, pads=[1, 1, 1, 1])],
        {"grouped_conv_w": rng.normal(0, 0.3, (4, 2, 3, 3)).astype(np.float32)}, ["N", 4, 6, 6],
    )
    with pytest.raises(ortq.ModelError, match=r"node 'grouped_conv' \(Conv\) cannot run on esp32p4: grouped convolution"):
        toolkit.quantize(grouped, tmp_path / "grouped.onnx", calibration_data=data, target="esp32",
                         backend_options={"chip": "esp32p4"})
    # A depthwise convolution (one filter per channel) is ESP-DL's DepthwiseConv2D: accepted.
    depthwise = _tiny(
        [conv("depthwise", None, "input", "output", group=4, pads=[1, 1, 1, 1])],
        {"depthwise_w": rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32)}, ["N", 4, 6, 6],
    )
    result = toolkit.quantize(depthwise, tmp_path / "depthwise.onnx", calibration_data=data, target="esp32",
                              backend_options={"model_name": "dw-net"})
    header = (tmp_path / "dw_net_coefficient.hpp").read_text()
    assert "namespace dw_net_coefficient" in header and "DepthwiseConv2D" in header
    assert result.plan.float_nodes == []
