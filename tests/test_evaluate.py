"""``ortq evaluate`` and metric plugins: the math by hand, a real quantized CNN, a third-party metric, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import run, tiny_cnn, tiny_data
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.api.cli import build_cli
from ortq.core.error_measures import sqnr_db


def feed_metric(metric: ortq.Metric, reference: np.ndarray, candidate: np.ndarray,
                labels: np.ndarray | None = None, batches: int = 1) -> float:
    """Stream the arrays through ``metric`` in ``batches`` pieces, as evaluate does."""
    metric.reset()
    for ref, cand, lab in zip(np.array_split(reference, batches), np.array_split(candidate, batches),
                              np.array_split(labels, batches) if labels is not None else [None] * batches):
        metric.update({"y": ref}, {"y": cand}, lab)
    return metric.result()


# -- metric math against hand-computed values ----------------------------------------------------------------
REF = np.array([
    [0.9, 0.1, 0.5, 0.3, 0.2, 0.0, 0.7],   # ranks: 0, 5, 2, 3, 4, 6, 1
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],   # ranks: 6, 5, 4, 3, 2, 1, 0
    [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # a tie: class 0 ranks before class 1
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
])
CAND = np.array([
    [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0],   # picks 4: reference rank 4 -> in top 5, not top 1
    [0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # picks 1: reference rank 5 -> outside top 5
    [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # picks 1: tied with 0 in the reference, ranked second
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0],   # picks 6: reference's best
])


def test_top1_and_top5_agreement_by_hand(toolkit: ortq.Toolkit) -> None:
    assert feed_metric(toolkit.metric("top1"), REF, CAND) == pytest.approx(1 / 4)   # only row 3
    assert feed_metric(toolkit.metric("top5"), REF, CAND) == pytest.approx(3 / 4)   # rows 0, 2, 3
    # Streaming over batches gives the same numbers, and a model agrees fully with itself, ties included.
    assert feed_metric(toolkit.metric("top5"), REF, CAND, batches=3) == pytest.approx(3 / 4)
    assert feed_metric(toolkit.metric("top1"), REF, REF, batches=2) == 1.0
    assert feed_metric(toolkit.metric("top5"), REF, REF) == 1.0
    # Not symmetric: the candidate's pick among the reference's best, not the reference's pick among the
    # candidate's (the candidate ranks the reference's class 0 second here, but picks class 5, ranked last).
    ref, cand = np.array([[5.0, 4, 3, 2, 1, 0]]), np.array([[0.5, 0, 0, 0, 0, 1]])
    assert feed_metric(toolkit.metric("top5"), ref, cand) == 0.0 and feed_metric(toolkit.metric("top5"), cand, ref) == 1.0


def test_accuracy_and_top5_accuracy_by_hand(toolkit: ortq.Toolkit) -> None:
    labels = np.array([4, 0, 1, 2])
    # argmax of CAND rows: 4, 1, 1, 6 -> correct on rows 0 and 2.
    assert feed_metric(toolkit.metric("accuracy"), REF, CAND, labels) == pytest.approx(2 / 4)
    # Label ranks in REF used as candidate: row0 label 4 -> rank 4; row1 label 0 -> rank 6;
    # row2 label 1 -> rank 1 (tie broken by index); row3 label 2 -> rank 4.
    assert feed_metric(toolkit.metric("top5_accuracy"), CAND, REF, labels, batches=2) == pytest.approx(3 / 4)
    assert feed_metric(toolkit.metric("accuracy"), CAND, REF, labels) == pytest.approx(0.0)
    # A collapsed (constant) output is not credited for ties: only label 0 counts as its argmax.
    constant = np.zeros_like(REF)
    assert feed_metric(toolkit.metric("accuracy"), REF, constant, np.array([0, 1, 2, 0])) == pytest.approx(2 / 4)


def test_cosine_mse_sqnr_by_hand(toolkit: ortq.Toolkit) -> None:
    ref = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    cand = np.array([[4.0, 3.0], [0.0, 2.0], [0.0, 0.0]])
    # per-sample cosines: 24/25, 0, 1 (two zero vectors are identical)
    assert feed_metric(toolkit.metric("cosine"), ref, cand, batches=2) == pytest.approx((24 / 25 + 0 + 1) / 3)
    # squared errors: 1, 1, 1, 4, 0, 0 over 6 elements
    assert feed_metric(toolkit.metric("mse"), ref, cand, batches=3) == pytest.approx(7 / 6)
    # signal 9 + 16 + 1 = 26, noise 7
    assert feed_metric(toolkit.metric("sqnr"), ref, cand, batches=2) == pytest.approx(10 * math.log10(26 / 7))
    assert feed_metric(toolkit.metric("sqnr"), ref, ref) == math.inf
    assert feed_metric(toolkit.metric("mse"), ref, ref) == 0.0


def test_streamed_sqnr_equals_ortq_metrics_helper_on_the_concatenation(toolkit: ortq.Toolkit) -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((37, 10))
    cand = ref + rng.standard_normal(ref.shape) * 0.05
    assert feed_metric(toolkit.metric("sqnr"), ref, cand, batches=5) == pytest.approx(sqnr_db(ref, cand), abs=1e-9)


def test_metric_picks_the_named_output_and_refuses_an_unknown_one(toolkit: ortq.Toolkit) -> None:
    a, b = np.eye(3), np.eye(3)[::-1]
    metric = toolkit.metric("top1", output="second")
    metric.update({"first": a, "second": a}, {"first": a, "second": b})
    assert metric.result() == pytest.approx(1 / 3)  # only the middle row agrees in "second"
    with pytest.raises(ortq.ConfigError, match=r"no output 'third'.*\['first', 'second'\]"):
        toolkit.metric("top1", output="third").update({"first": a, "second": a}, {"first": a, "second": a})
    with pytest.raises(ortq.ConfigError, match=r"top1.*unknown option.*'k'"):
        toolkit.metric("top1", k="3")
    with pytest.raises(ortq.ConfigError, match=r"'y'.*shape \(4,\).*no class axis"):
        toolkit.metric("top1").update({"y": np.ones(4)}, {"y": np.ones(4)})
    with pytest.raises(ortq.ConfigError, match=r"label 9 is outside the model's 3 classes"):
        toolkit.metric("accuracy").update({"y": a}, {"y": a}, np.array([0, 1, 9]))


# -- evaluate on a real quantized model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray], np.ndarray]:
    """tiny_cnn in float and quantized with ortq, held-out data, and labels that the float model gets
    right on exactly 90 of 120 samples (its own argmax, shifted by one class on every fourth sample)."""
    folder = tmp_path_factory.mktemp("evaluate")
    float_path, quant_path = folder / "float.onnx", folder / "quant.onnx"
    onnx.save(tiny_cnn(), float_path)
    ortq.Toolkit(autoload=False).quantize(float_path, quant_path, calibration_data=tiny_data(64))
    data = tiny_data(120, seed=7)
    labels = run(float_path, data)[0].argmax(1)
    labels[::4] = (labels[::4] + 1) % 5
    return float_path, quant_path, data, labels


def test_evaluate_quantized_cnn_figures(toolkit: ortq.Toolkit, cnn_pair) -> None:
    float_path, quant_path, data, labels = cnn_pair
    report = ortq.evaluate(toolkit, float_path, quant_path, data, labels=labels, batch_size=32,
                           metrics=["top1", "accuracy", "cosine", "mse", "sqnr"], latency_runs=5)
    assert (report.samples, report.batches) == (120, 4)
    top1, accuracy, cosine, mse, sqnr = (report[name] for name in ("top1", "accuracy", "cosine", "mse", "sqnr"))
    # The float baseline is the float model against itself.
    assert top1.float_value == 1.0 and mse.float_value == 0.0 and sqnr.float_value == math.inf
    assert cosine.float_value == pytest.approx(1.0, abs=1e-12)
    assert accuracy.float_value == pytest.approx(90 / 120)
    # The quantized figures are the ones numpy gives on ONNX Runtime's outputs.
    ref, quant = run(float_path, data)[0], run(quant_path, data)[0]
    assert top1.quantized_value == pytest.approx(np.mean(ref.argmax(1) == quant.argmax(1)))
    assert accuracy.quantized_value == pytest.approx(np.mean(quant.argmax(1) == labels))
    assert sqnr.quantized_value == pytest.approx(sqnr_db(ref, quant), abs=1e-6)
    assert mse.quantized_value == pytest.approx(np.mean((ref.astype(np.float64) - quant) ** 2), rel=1e-6)
    assert top1.quantized_value >= 0.95 and sqnr.quantized_value > 25 and cosine.quantized_value > 0.999
    # drop: float - quantized for higher-is-better, quantized - float for mse; positive is a loss.
    assert accuracy.drop == pytest.approx(accuracy.float_value - accuracy.quantized_value)
    assert mse.drop == pytest.approx(mse.quantized_value) and mse.drop > 0
    assert report.float_size == float_path.stat().st_size and report.quantized_size == quant_path.stat().st_size
    assert report.float_latency_ms > 0 and report.quantized_latency_ms > 0 and report.latency_runs == 5
    assert report.latency_batch == 1


def test_evaluate_float_against_itself_agrees_exactly(toolkit: ortq.Toolkit, cnn_pair) -> None:
    float_path, _, data, _ = cnn_pair
    report = toolkit.evaluate(float_path, tiny_cnn(), data, metrics=["top1", "top5", "sqnr"], latency_runs=0)
    for result in report.metrics:
        assert result.float_value == result.quantized_value and result.drop == 0.0
    assert report["top1"].quantized_value == 1.0 and report.float_latency_ms is None


def test_defaults_data_sources_and_max_samples(toolkit: ortq.Toolkit, cnn_pair, tmp_path: Path) -> None:
    float_path, quant_path, data, labels = cnn_pair
    full = toolkit.evaluate(float_path, quant_path, data, labels=labels, latency_runs=0)
    assert [m.label for m in full.metrics] == ["accuracy", "top1", "cosine", "sqnr"]
    # The labels as an array inside a .npz (not fed to the model), and as a .npy file: same figures.
    npz = tmp_path / "eval.npz"
    np.savez(npz, x=data["x"], label=labels)
    np.save(tmp_path / "labels.npy", labels)
    from_key = toolkit.evaluate(float_path, quant_path, npz, labels="label", latency_runs=0)
    from_file = toolkit.evaluate(float_path, quant_path, {"x": data["x"]}, labels=tmp_path / "labels.npy", latency_runs=0)
    as_feeds = toolkit.evaluate(float_path, quant_path, [{"x": data["x"][i : i + 10]} for i in range(0, 120, 10)],
                                labels=labels, latency_runs=0)
    for other in (from_key, from_file, as_feeds):
        assert [m.quantized_value for m in other.metrics] == pytest.approx([m.quantized_value for m in full.metrics])
    # max_samples cuts exactly, even inside a batch, and the labels follow.
    cut = toolkit.evaluate(float_path, quant_path, data, labels=labels, max_samples=50, batch_size=16, latency_runs=0)
    assert cut.samples == 50
    quant = run(quant_path, {"x": data["x"][:50]})[0]
    assert cut["accuracy"].quantized_value == pytest.approx(np.mean(quant.argmax(1) == labels[:50]))


# -- a third-party metric ------------------------------------------------------------------------------------
class WorstError(ortq.Metric):
    """A third-party metric in about 20 lines: the largest absolute output error seen."""

    name = "mine"
    higher_is_better = False

    def reset(self) -> None:
        self.worst = 0.0

    def update(self, reference, candidate, labels=None) -> None:
        diff = np.abs(self.select(reference).astype(np.float64) - self.select(candidate))
        self.worst = max(self.worst, float(diff.max(initial=0.0)))

    def result(self) -> float:
        return self.worst


class MetricPlugin:
    @ortq.hookimpl
    def ortq_register_metrics(self, register):
        register(WorstError)


def test_third_party_metric_from_api_and_cli(cnn_pair, tmp_path: Path) -> None:
    float_path, quant_path, data, _ = cnn_pair
    tk = ortq.Toolkit(plugins=[MetricPlugin()], autoload=False)
    report = tk.evaluate(float_path, quant_path, data, metrics=["mine", "sqnr"], latency_runs=0)
    ref, quant = run(float_path, data)[0], run(quant_path, data)[0]
    assert report["mine"].float_value == 0.0
    assert report["mine"].quantized_value == pytest.approx(np.max(np.abs(ref.astype(np.float64) - quant)))
    assert report["mine"].drop == report["mine"].quantized_value > 0

    npz = tmp_path / "eval.npz"
    np.savez(npz, **data)
    out = tmp_path / "report.json"
    cli = build_cli(tk)
    result = CliRunner().invoke(cli, ["evaluate", str(float_path), str(quant_path), "-d", str(npz),
                                      "--metric", "mine", "--metric", "top1", "--json", str(out), "--latency-runs", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == ["metric", "float", "quantized", "drop"]
    assert any(line.startswith("mine ") for line in result.output.splitlines())
    assert "latency: float" in result.output and "size: float" in result.output
    saved = json.loads(out.read_text())
    assert [m["name"] for m in saved["metrics"]] == ["mine", "top1"]
    assert saved["metrics"][0]["quantized"] == pytest.approx(report["mine"].quantized_value)
    assert saved["samples"] == 120 and saved["latency_ms"]["runs"] == 3
    listed = CliRunner().invoke(cli, ["plugins"])
    assert "metrics: accuracy, cosine, mine, mse, sqnr, top1, top5, top5_accuracy" in listed.output


def test_cli_labels_from_the_data_and_json_on_stdout(toolkit: ortq.Toolkit, cnn_pair, tmp_path: Path) -> None:
    float_path, quant_path, data, labels = cnn_pair
    npz = tmp_path / "eval.npz"
    np.savez(npz, x=data["x"], label=labels)
    result = CliRunner().invoke(build_cli(toolkit), ["evaluate", str(float_path), str(quant_path), "-d", str(npz),
                                                     "--labels", "label", "--metric", "accuracy", "--metric",
                                                     "sqnr", "--json", "-", "--latency-runs", "0"])
    assert result.exit_code == 0, result.output
    saved = json.loads(result.output)
    assert saved["metrics"][0]["float"] == pytest.approx(0.75) and saved["metrics"][1]["float"] == "inf"
    assert saved["latency_ms"]["float"] is None


# -- errors --------------------------------------------------------------------------------------------------
def _matmul_model(outputs: tuple[str, ...] = ("y",), input_name: str = "x", scale: float = 1.0) -> onnx.ModelProto:
    weight = (np.random.default_rng(0).standard_normal((8, 5)) * scale).astype(np.float32)
    weight = numpy_helper.from_array(weight, "w")
    nodes = [helper.make_node("MatMul", [input_name, "w"], [outputs[0]])]
    nodes += [helper.make_node("Relu", [outputs[0]], [name]) for name in outputs[1:]]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 5]) for n in outputs], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_errors_are_clear(toolkit: ortq.Toolkit, cnn_pair) -> None:
    float_path, quant_path, data, labels = cnn_pair
    with pytest.raises(ortq.ConfigError, match=r"no metric named 'nope'; registered: accuracy, cosine, mse, sqnr, top1"):
        toolkit.evaluate(float_path, quant_path, data, metrics=["nope"])
    with pytest.raises(ortq.ConfigError, match=r"\['accuracy'\] compare with labels"):
        toolkit.evaluate(float_path, quant_path, data, metrics=["accuracy"])
    with pytest.raises(ortq.ConfigError, match=r"labels hold 100 entries, but the data has more samples"):
        toolkit.evaluate(float_path, quant_path, data, labels=labels[:100], metrics=["accuracy"], latency_runs=0)
    with pytest.raises(ortq.ConfigError, match=r"labels hold 121 entries, the data 120 sample"):
        toolkit.evaluate(float_path, quant_path, data, labels=np.append(labels, 0), metrics=["accuracy"], latency_runs=0)
    with pytest.raises(ortq.ConfigError, match=r"labels 'missing': no such file"):
        toolkit.evaluate(float_path, quant_path, data, labels="missing")
    x = {"x": np.zeros((4, 8), np.float32)}
    with pytest.raises(ortq.ModelError, match=r"different inputs: \{z: float32\} vs \{x: float32\}"):
        toolkit.evaluate(_matmul_model(), _matmul_model(input_name="z"), x)
    with pytest.raises(ortq.ModelError, match=r"different outputs: \['y', 'r'\] vs \['y'\]"):
        toolkit.evaluate(_matmul_model(), _matmul_model(("y", "r")), x)
    result = CliRunner().invoke(build_cli(toolkit), ["evaluate", str(float_path), str(quant_path), "-d",
                                                     str(float_path.parent / "nothing.npz"), "--metric", "nope"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Error:" in result.output


def test_unreadable_label_files_are_one_line_errors(toolkit: ortq.Toolkit, cnn_pair, tmp_path: Path) -> None:
    """A corrupt labels .npz (not a zip at all) or a truncated .npy is an OrtqError naming the file, like data."""
    float_path, quant_path, data, labels = cnn_pair
    np.savez(tmp_path / "good.npz", label=labels)
    broken = {"broken.npz": (tmp_path / "good.npz").read_bytes()[:40], "broken.npy": b"\x93NUMPY\x01\x00"}
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ortq.OrtqError, match=rf"{name}: cannot read as"):
            toolkit.evaluate(float_path, quant_path, data, labels=tmp_path / name, metrics=["accuracy"], latency_runs=0)
    result = CliRunner().invoke(build_cli(toolkit), ["evaluate", str(float_path), str(quant_path), "-d",
                                                     str(tmp_path / "good.npz"), "--labels", str(tmp_path / "broken.npz")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "broken.npz" in result.output


def test_defaults_skip_top1_without_a_class_axis_and_options_reach_the_metric(toolkit: ortq.Toolkit) -> None:
    model = _matmul_model(("y", "r"))
    x = {"x": np.random.default_rng(1).standard_normal((20, 8)).astype(np.float32)}
    report = toolkit.evaluate(model, model, x, metrics=["cosine:output=r", ("sqnr", {"output": "r"})], latency_runs=0)
    assert [m.label for m in report.metrics] == ["cosine:output=r", "sqnr:output=r"]
    # A metric instance (not registered anywhere) is used as given, copied for the float baseline.
    halved = {"x": x["x"][:10]}
    worst = toolkit.evaluate(model, _matmul_model(("y", "r"), scale=0.5), halved, metrics=[WorstError()], latency_runs=0)
    expected = np.max(np.abs(run(model, halved)[0].astype(np.float64) * 0.5))
    assert worst["mine"].float_value == 0.0 and worst["mine"].quantized_value == pytest.approx(expected, rel=1e-6)
    scalar_out = helper.make_model(
        helper.make_graph([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0)], "sum",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert [m.label for m in toolkit.evaluate(scalar_out, scalar_out, x, latency_runs=0).metrics] == ["cosine", "sqnr"]


def test_empty_label_file_is_a_one_line_error(tmp_path) -> None:
    from ortq.tools.evaluate import resolve_labels

    empty = tmp_path / "labels.npy"
    empty.write_bytes(b"")
    with pytest.raises(ortq.OrtqError, match="labels.npy: cannot read as .npy"):
        resolve_labels(empty, None)
