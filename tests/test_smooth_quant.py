"""SmoothQuant (ortq.pipeline.smooth_quant): the folds leave the float model's outputs unchanged, add no op,
skip (with the reason) what cannot be folded, and raise int8 accuracy where an input channel is an outlier."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.core.config import QuantConfig
from ortq.core.errors import ConfigError
from ortq.core.graph import GraphIndex
from ortq.pipeline import smooth_quant as sq

sys.path.insert(0, str(Path(__file__).parent))
from models import transformer_block  # noqa: E402

OUTLIER, FACTOR = 5, 40.0


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(ref**2) / np.mean((out - ref) ** 2)))


@pytest.fixture(scope="module")
def block():
    """transformer_block with channel 5 of V (so of the attention context) 40x larger, the output projection's
    row 5 40x smaller: the float function is unchanged, the output projection's input gets an outlier."""
    model, calib, evaluation = transformer_block(seed=0)
    inits = {i.name: i for i in model.graph.initializer}
    for name, index, factor in [("v_w", (slice(None), OUTLIER), FACTOR), ("v_b", OUTLIER, FACTOR),
                                ("attn_out_w", OUTLIER, 1 / FACTOR)]:
        value = numpy_helper.to_array(inits[name]).copy()
        value[index] *= factor
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return model, calib, evaluation


def test_fold_is_exact_in_float_and_adds_no_op(block, caplog):
    model, calib, evaluation = block
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    with caplog.at_level(logging.INFO, logger="ortq.pipeline.smooth_quant"):
        report = sq.smooth_quant(smoothed, QuantConfig(), [calib])
    # the context folds into V's projection through the head split, the GELU output into its "* 0.5"
    assert set(report.smoothed) == {"context_merged", "gelu_out"}
    # post-LN: the block input and the LayerNorm output also feed residual Adds, which would see X / s
    assert "attn_residual" in report.skipped["hidden"] and "ffn_residual" in report.skipped["ln1_out"]
    assert "SmoothQuant skips 'ln1_out'" in caplog.text
    assert [n.op_type for n in smoothed.graph.node] == [n.op_type for n in model.graph.node]
    onnx.checker.check_model(smoothed, full_check=True)
    np.testing.assert_allclose(_run(smoothed, evaluation), _run(model, evaluation), atol=1e-5, rtol=1e-5)
    w = numpy_helper.to_array({i.name: i for i in smoothed.graph.initializer}["v_w"])
    assert np.abs(w[:, OUTLIER]).max() < np.abs(numpy_helper.to_array(
        {i.name: i for i in model.graph.initializer}["v_w"])[:, OUTLIER]).max() / 4  # the outlier moved


def test_int8_sqnr_gains_over_plain_minmax(block):
    model, calib, evaluation = block
    ref = _run(model, evaluation)
    plain = ortq.quantize(model, calibration_data=calib, calibrate_method="minmax", verify=False)
    smooth = ortq.quantize(model, calibration_data=calib, calibrate_method="minmax", smooth_quant=True, verify=False)
    onnx.checker.check_model(smooth.model, full_check=True)
    before, after = _sqnr(ref, _run(plain.model, evaluation)), _sqnr(ref, _run(smooth.model, evaluation))
    assert after > before + 6.0, (before, after)  # measured 15.1 -> 30.3 dB
    assert "smooth_quant" in smooth.seconds
    pinned = ortq.quantize(model, calibration_data=calib, calibrate_method="minmax", smooth_quant_alpha=0.5, verify=False)
    assert _sqnr(ref, _run(pinned.model, evaluation)) > before + 6.0


def _pre_ln(channels: int = 16) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> LayerNormalization (one gamma channel 30x) -> two MatMuls sharing it (Q, K) -> Add."""
    rng = np.random.default_rng(1)
    gamma = np.ones(channels, np.float32)
    gamma[3] = 30.0
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (gamma, "gamma"), (rng.normal(0, 0.1, channels).astype(np.float32), "beta"),
        (rng.normal(0, 0.3, (channels, 8)).astype(np.float32), "wq"),
        (rng.normal(0, 0.3, (channels, 8)).astype(np.float32), "wk")]]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["ln", "wk"], ["k"], name="k"),
             helper.make_node("Add", ["q", "k"], ["y"], name="sum")]
    graph = helper.make_graph(nodes, "pre_ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, channels])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, {"x": rng.normal(0, 1, (32, 4, channels)).astype(np.float32)}


def test_layernorm_fold_shares_one_scale_between_readers():
    model, feed = _pre_ln()
    groups, skipped = sq.find_groups(GraphIndex(model))
    assert len(groups) == 1 and not skipped
    assert {c.node for c in groups[0].consumers} == {"q", "k"}
    assert {e.constant for e in groups[0].edits} == {"gamma", "beta"}
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    report = sq.smooth_quant(smoothed, QuantConfig(), [feed], alpha=0.5)
    assert list(report.smoothed) == ["ln"]
    np.testing.assert_allclose(_run(smoothed, feed), _run(model, feed), atol=1e-5, rtol=1e-5)
    gamma = numpy_helper.to_array({i.name: i for i in smoothed.graph.initializer}["gamma"])
    assert gamma[3] / np.median(gamma) < 10  # the outlier channel was divided down


def test_channel_sketch_memory_is_flat():
    sketch = sq.ChannelSketch(4, rows=16)
    rng = np.random.default_rng(0)
    batches = [rng.normal(0, 1, (8, 5, 4)).astype(np.float32) for _ in range(10)]
    for b in batches:
        sketch.update(b)
    assert sketch.rows.shape == (16, 4) and sketch.seen == 400
    every = np.concatenate([b.reshape(-1, 4) for b in batches])
    np.testing.assert_array_equal(sketch.lo, every.min(axis=0))
    np.testing.assert_array_equal(sketch.hi, every.max(axis=0))
    assert all(any((row == r).all() for r in every) for row in sketch.rows)  # real rows, not made up


def test_bad_options_and_one_shot_data(block):
    model, calib, _ = block
    with pytest.raises(ConfigError, match="smooth_quant_alpha"):
        ortq.quantize(model, calibration_data=calib, smooth_quant_alpha=1.5, verify=False)
    with pytest.raises(ConfigError, match="twice"):
        ortq.quantize(model, calibration_data=iter([calib]), smooth_quant=True, verify=False)
