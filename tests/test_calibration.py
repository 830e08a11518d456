"""In-graph observers: isolation between calibrations, failures as exceptions, float16, hostile ranges."""

from __future__ import annotations

import logging
import threading

import numpy as np
import onnx
import pytest
from conftest import run, tiny_cnn, tiny_data
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.pipeline.calibrate import run_calibration
from ortq.core.graph import GraphIndex
from ortq.core.error_measures import sqnr_db


def test_observers_are_graph_nodes_not_extra_outputs(toolkit: ortq.Toolkit) -> None:
    from ortq.pipeline.calibrate import build_observed_model

    model = onnx.shape_inference.infer_shapes(tiny_cnn())
    observed = build_observed_model(model, GraphIndex(model), ["x", "r1"], "token")
    assert [o.name for o in observed.graph.output] == ["y"]
    ops = [n.op_type for n in observed.graph.node]
    # each observer right after its producer, so activations die as early as in the float graph
    assert ops == ["OrtqObserver", "Conv", "Relu", "OrtqObserver", "GlobalAveragePool", "Flatten", "Gemm"]


def test_ranges_equal_numpy_minmax(toolkit: ortq.Toolkit) -> None:
    data = tiny_data(40)
    result = toolkit.quantize(tiny_cnn(), calibration_data=data, batch_size=7)
    assert result.calibration_samples == 40 and result.calibration_batches == 6
    assert result.ranges["x"] == (float(data["x"].min()), float(data["x"].max()))
    relu = np.maximum(run(_with_output(tiny_cnn(), "r1"), data)[1], 0)
    assert result.ranges["r1"] == pytest.approx((float(relu.min()), float(relu.max())), rel=1e-6)


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def test_concurrent_calibrations_do_not_mix(toolkit: ortq.Toolkit) -> None:
    datasets = [{"x": tiny_data(32, seed=s)["x"] * (s + 1)} for s in range(4)]
    alone = [ortq.Toolkit(autoload=False).quantize(tiny_cnn(), calibration_data=d).ranges for d in datasets]
    together: list[dict | None] = [None] * 4

    def work(i: int) -> None:
        together[i] = ortq.Toolkit(autoload=False).quantize(tiny_cnn(), calibration_data=datasets[i]).ranges

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert len({r["x"] for r in alone}) == 4


class FailingStatistic(ortq.MinMaxStatistic):
    def update(self, values):
        if values.ndim == 4 and values.shape[1] == 8:
            raise ValueError("observer exploded")
        super().update(values)


class FailingCalibrator(ortq.Calibrator):
    name = "failing"

    def create_statistic(self, tensor):
        return FailingStatistic()

    def compute_range(self, tensor, statistic, spec):
        return statistic.min, statistic.max


def test_observer_failure_is_a_python_exception_naming_the_tensor() -> None:
    class Plugin:
        @ortq.hookimpl
        def ortq_register_calibrators(self, register):
            register(FailingCalibrator)

    tk = ortq.Toolkit([Plugin()], autoload=False)
    with pytest.raises(ortq.CalibrationError, match=r"observer for tensor 'r1' failed on calibration batch 0: ValueError"):
        tk.quantize(tiny_cnn(), calibration_data=tiny_data(), calibrate_method="failing")
    # the process survived and the next calibration works
    assert tk.quantize(tiny_cnn(), calibration_data=tiny_data()).ranges


def test_float16_tensors_are_observed_through_a_cast(toolkit: ortq.Toolkit) -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
    )
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    data = np.linspace(-3, 5, 32, dtype=np.float32).reshape(8, 4)
    stats = run_calibration(
        model, GraphIndex(model), ["h", "r"], toolkit.calibrator("minmax"), iter([{"x": data}])
    ).statistics
    assert (stats["h"].min, stats["h"].max) == (-3.0, 5.0)
    assert (stats["r"].min, stats["r"].max) == (0.0, 5.0)


def _conv_plus_mask(mask_value: float) -> onnx.ModelProto:
    """Conv output plus an additive mask input, then another conv: a residual-style Add in an integer chain."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(mask_value, np.float32), "fill"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Mul", ["keep_not", "fill"], ["bias"], name="mask_scale"),
        helper.make_node("Add", ["c1", "bias"], ["masked"], name="add_mask"),
        helper.make_node("Relu", ["masked"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "mask",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6, 6]),
         helper.make_tensor_value_info("keep_not", TensorProto.FLOAT, [None, 1, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 6, 6])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("mask_value", [-1e9, -3.4e38])
def test_extreme_fill_value_keeps_its_nodes_float_and_the_model_useful(
    toolkit: ortq.Toolkit, caplog: pytest.LogCaptureFixture, mask_value: float
) -> None:
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((16, 4, 6, 6)).astype(np.float32),
            "keep_not": (rng.random((16, 1, 6, 6)) < 0.3).astype(np.float32)}
    model = _conv_plus_mask(mask_value)
    with caplog.at_level(logging.WARNING):
        result = toolkit.quantize(model, calibration_data=data)
    assert list(result.vetoes) == ["bias"]
    float_nodes = {f.name for f in result.plan.float_nodes}
    assert "add_mask" in float_nodes and "conv1" in result.plan.quantized_nodes
    assert any("stays float" in r.message and "'bias'" in r.message for r in caplog.records)
    onnx.checker.check_model(result.model, full_check=True)
    assert sqnr_db(run(model, data)[0], run(result.model, data)[0]) > 25


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_dynamic_shapes_and_zero_size_batches(toolkit: ortq.Toolkit, method: str) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 4)) * 0.3).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Relu", ["m"], ["y"], name="relu")],
        "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 4])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    feeds = [{"x": rng.standard_normal((2, s, 8)).astype(np.float32)} for s in (5, 0, 11, 3)]
    result = toolkit.quantize(model, calibration_data=feeds, calibrate_method=method)
    assert result.calibration_batches == 4
    onnx.checker.check_model(result.model, full_check=True)
    feed = {"x": rng.standard_normal((3, 7, 8)).astype(np.float32)}
    assert sqnr_db(run(model, feed)[0], run(result.model, feed)[0]) > 25
