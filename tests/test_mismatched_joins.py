"""A Concat whose inputs' calibrated ranges cannot share one scale stays float (``params.mismatched_joins``).

The synthetic model is a detector head in miniature: box coordinates in pixels (0-300) and class
probabilities (Sigmoid, 0-1) joined by the last Concat. One 8-bit scale for that output (1.2 px) rounds
every probability to 0 or 1.2; with the rule the probabilities keep their own fine scale. The real-model
test runs the same check on YOLOv8n (NudeNet's ``320n.onnx`` from the accuracy benchmark's cache, skipped
where absent).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.pipeline import params as params_module
from tests.models import conv_concat, run_float


def _head(seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w_box = rng.normal(size=(16, 4)).astype(np.float32)
    w_cls = rng.normal(size=(16, 6)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w_box"], ["box_raw"], name="box_matmul"),
        helper.make_node("Sigmoid", ["box_raw"], ["box_unit"], name="box_sigmoid"),
        helper.make_node("Mul", ["box_unit", "img_size"], ["boxes"], name="box_scale"),
        helper.make_node("MatMul", ["x", "w_cls"], ["cls_raw"], name="cls_matmul"),
        helper.make_node("Sigmoid", ["cls_raw"], ["scores"], name="cls_sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["output"], name="head_concat", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 10])],
        [numpy_helper.from_array(w_box, "w_box"), numpy_helper.from_array(w_cls, "w_cls"),
         numpy_helper.from_array(np.array(300.0, np.float32), "img_size")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, rng.normal(size=(64, 16)).astype(np.float32), rng.normal(size=(64, 16)).astype(np.float32)


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - got) ** 2), 1e-30)))


def _quantized_scores(model: onnx.ModelProto, calib: np.ndarray, held_out: np.ndarray):  # noqa: ANN202
    result = ortq.quantize(model, None, calibration_data={"x": calib}, calibrate_method="minmax", verify=False,
                           sqnr_floor=None)
    return result, run_float(result.model, {"x": held_out})[0][:, 4:]


def test_mismatched_output_concat_stays_float_and_keeps_the_scores(monkeypatch) -> None:  # noqa: ANN001
    model, calib, held_out = _head()
    reference = run_float(model, {"x": held_out})[0][:, 4:]

    result, scores = _quantized_scores(model, calib, held_out)
    onnx.checker.check_model(result.model, full_check=True)
    assert "output" in result.vetoes and "head_concat" in result.vetoes["output"], result.vetoes
    assert "kept float around 'output'" in result.summary()
    assert "head_concat" in {n.name for n in result.plan.float_nodes}
    # The Sigmoid outputs keep their own 8-bit scales (~0.004): the scores come through at > 35 dB.
    assert _sqnr(reference, scores) > 35

    # Without the rule the shared scale (~1.2) rounds each probability to 0 or 1.2: the same model's scores
    # fall to 7 dB. This is what the rule prevents, measured, not assumed.
    monkeypatch.setattr(params_module, "MIN_JOIN_STEPS", 0.0)
    unruled, unruled_scores = _quantized_scores(model, calib, held_out)
    assert "output" not in unruled.vetoes
    assert _sqnr(reference, unruled_scores) < 10


def test_concat_of_similar_ranges_stays_quantized() -> None:
    model, calib, _ = conv_concat()
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    result = ortq.quantize(model, None, calibration_data=calib, verify=False, sqnr_floor=None)
    assert not result.vetoes, result.vetoes
    assert concat.output[0] in result.params
    assert concat.name in {n for n in result.plan.quantized_nodes}


CACHE = Path(os.environ.get("ORTQ_BENCH_CACHE") or Path.home() / ".cache" / "ortq-bench")
YOLO = CACHE / "wheels" / "nudenet-3.4.2" / "nudenet" / "320n.onnx"


def test_yolov8n_output_concat_stays_float_and_scores_survive() -> None:
    """NudeNet's YOLOv8n: the last Concat joins boxes (0-322 px) and class probabilities (0-0.85).

    Measured on the benchmark's 160 images: box F1 against the float model 0.19 with that Concat quantized,
    0.78 (minmax) / 0.88 (auto) without it; here the class-score SQNR on 4 held-out images stands in for F1.
    """
    data = YOLO.parent.parent.parent.parent / "nudenet_yolov8n"
    if not (YOLO.exists() and (data / "calibration.npz").exists() and (data / "evaluation.npz").exists()):
        pytest.skip(f"YOLOv8n benchmark cache absent ({CACHE}); run benchmarks/accuracy/run.py once")
    with np.load(data / "calibration.npz") as d:
        calib = np.concatenate([d[f"{i}/images"] for i in range(8)])
    with np.load(data / "evaluation.npz") as d:
        held_out = np.concatenate([d[f"{i}/images"] for i in range(4)])
    result = ortq.quantize(str(YOLO), None, calibration_data={"images": calib}, calibrate_method="minmax",
                           verify=False, sqnr_floor=None)
    assert list(result.vetoes) == ["output0"], result.vetoes
    assert "/model.22/Concat_25" in result.vetoes["output0"]
    model = onnx.load(str(YOLO))
    inner = [n.name for n in model.graph.node if n.op_type == "Concat" and n.output[0] in result.ranges
             and n.name != "/model.22/Concat_25"]
    assert inner and all(name in result.plan.quantized_nodes for name in inner)  # integer kernels kept
    reference = run_float(model, {"images": held_out})[0][:, 4:]
    scores = run_float(result.model, {"images": held_out})[0][:, 4:]
    assert _sqnr(reference, scores) > 4  # 0.4 dB with the Concat quantized, ~7 dB without
