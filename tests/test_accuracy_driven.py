"""Accuracy-driven quantization: rank the damage by tensor, keep the fewest tensors float to meet a target."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import ortq
from ortq.tools.accuracy_driven import AccuracyTarget, quantize_to_target
from ortq.core.errors import ConfigError
from ortq.core.error_measures import sqnr_db

from models import outlier_channel_cnn, resnet_like, run_float


def _eval_sqnr(model: onnx.ModelProto, reference: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    (expected,) = run_float(reference, feeds)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sqnr_db(expected, session.run(None, feeds)[0])


@pytest.fixture(scope="module")
def hostile() -> tuple[onnx.ModelProto, dict, dict]:
    return outlier_channel_cnn()


def test_hostile_layer_ranked_first_and_kept_float(toolkit: ortq.Toolkit, hostile, tmp_path) -> None:
    model, calibration, evaluation = hostile
    plain = toolkit.quantize(model, calibration_data=calibration, verify=False)
    assert _eval_sqnr(plain.model, model, evaluation) < 10  # the hostile layer ruins plain 8-bit PTQ
    # `ortq debug` blames the same tensor the search below keeps float.
    assert ortq.debug_models(model, plain.model, evaluation).sorted("injected")[0].tensor == "relu_3_out"

    out = tmp_path / "q.onnx"
    found = quantize_to_target(
        toolkit, model, out, target=AccuracyTarget("sqnr", min_value=30.0),
        calibration_data=calibration, eval_data=evaluation,
    )
    assert found.met and found.final_value >= 30.0
    assert found.quantized_value < 10
    assert found.ranking[0].tensor == "relu_3_out"  # the outlier channel's tensor, nothing downstream of it
    assert [k.tensor for k in found.kept] == ["relu_3_out"]
    kept_nodes = set(found.kept[0].nodes)
    assert "conv_3" in kept_nodes and len(kept_nodes) <= 3
    # conv_4 (which divides the outlier channel back down) is float from the start: its int32 bias step,
    # set by the stretched input scale, is coarser than its output's step.
    assert "rounding it to its int32 step" in found.result.vetoes["b_4"]
    # The written model is the chosen one: it meets the target on held-out data and only those nodes are float.
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert _eval_sqnr(written, model, evaluation) >= 30.0
    float_ops = {n.name for n in written.graph.node if n.op_type in {"Conv", "Gemm"}}
    quantized = set(found.result.plan.quantized_nodes)
    assert kept_nodes.isdisjoint(quantized)
    assert {"conv_1", "conv_2", "conv_5", "fc"} <= quantized
    assert float_ops  # the kept Conv nodes are still there, in float
    # Trials are bounded: one baseline, one per candidate tensor, and a short prefix search.
    assert found.trials <= 1 + len(found.ranking) + 2 * int(np.ceil(np.log2(len(found.ranking) + 1))) + len(found.kept)
    assert "kept float: tensor 'relu_3_out'" in found.summary()


def test_one_ranking_trial_goes_to_the_tensor_injecting_the_most_noise(toolkit: ortq.Toolkit, hostile) -> None:
    """Beyond max_rank_trials, tensors are pre-selected by the channel-averaged noise their quantizer injects:
    the outlier channel's tensor gets the only trial although its global noise ratio looks harmless."""
    model, calibration, evaluation = hostile
    found = quantize_to_target(
        toolkit, model, target=AccuracyTarget("sqnr", min_value=30.0), calibration_data=calibration,
        eval_data=evaluation, max_rank_trials=1,
    )
    assert found.ranking[0].tensor == "relu_3_out" and found.ranking[0].gain > 0
    assert len(found.ranking) > 1 and all(u.value is None for u in found.ranking[1:])
    assert found.met and [k.tensor for k in found.kept] == ["relu_3_out"]


def test_target_met_without_trials_keeps_everything_quantized(toolkit: ortq.Toolkit) -> None:
    model, calibration, evaluation = resnet_like(n_calibration=16, n_evaluation=16)
    found = quantize_to_target(
        toolkit, model, target=AccuracyTarget("sqnr", min_value=10.0), calibration_data=calibration,
        eval_data=evaluation,
    )
    assert found.met and found.kept == [] and found.trials == 1
    assert not any(f.reason.startswith("excluded") for f in found.result.plan.float_nodes if f.op_type == "Conv")


def test_max_drop_on_agreement_metric(toolkit: ortq.Toolkit, hostile) -> None:
    model, calibration, evaluation = hostile
    found = quantize_to_target(
        toolkit, model, target=AccuracyTarget("top1", max_drop=0.05), calibration_data=calibration,
        eval_data=evaluation,
    )
    assert found.float_value == 1.0
    assert found.met and found.final_value >= 0.95 > found.quantized_value
    assert "relu_3_out" in [k.tensor for k in found.kept]


class _LastOutputMetric(ortq.Metric):
    """Negative max abs error, but 0.0 only for the very outputs of the float model (never for a rebuild)."""

    name = "strict"

    def reset(self) -> None:
        self.worst = 0.0
        self.identical = True

    def update(self, reference, candidate, labels=None) -> None:
        self.identical &= candidate is reference
        a, b = self.select(reference), self.select(candidate)
        self.worst = max(self.worst, float(np.max(np.abs(a - b))) + (0.0 if candidate is reference else 1.0))

    def result(self) -> float:
        return -self.worst


class _StrictPlugin:
    @ortq.hookimpl
    def ortq_register_metrics(self, register) -> None:
        register(_LastOutputMetric)


def test_unreachable_target_returns_best_model_and_says_so(hostile, caplog) -> None:
    toolkit = ortq.Toolkit(autoload=False, plugins=[_StrictPlugin()])
    model, calibration, evaluation = hostile
    found = quantize_to_target(
        toolkit, model, target=AccuracyTarget("strict", max_drop=0.5), calibration_data=calibration,
        eval_data=evaluation,
    )
    assert not found.met
    assert found.float_value == 0.0 and found.final_value > found.quantized_value
    assert "does not meet" in caplog.text


def test_target_needs_exactly_one_bound() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        AccuracyTarget("sqnr")
    with pytest.raises(ConfigError, match="exactly one"):
        AccuracyTarget("sqnr", min_value=1.0, max_drop=0.1)
    with pytest.raises(ConfigError, match="max_drop"):
        AccuracyTarget("top1", max_drop=-1.0)


def test_unknown_metric_is_a_clear_error(toolkit: ortq.Toolkit, hostile) -> None:
    model, calibration, _ = hostile
    with pytest.raises(ortq.OrtqError, match="nosuchmetric"):
        quantize_to_target(toolkit, model, target=AccuracyTarget("nosuchmetric", min_value=1.0),
                           calibration_data=calibration)


def test_cli_min_sqnr_reports_kept_tensors(hostile, tmp_path) -> None:
    from click.testing import CliRunner

    from ortq.api.cli import build_cli

    model, calibration, evaluation = hostile
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **calibration)
    np.savez(tmp_path / "eval.npz", **evaluation)
    args = ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "-d", str(tmp_path / "calib.npz"),
            "--eval-data", str(tmp_path / "eval.npz")]
    cli = build_cli(ortq.Toolkit(autoload=False))
    result = CliRunner().invoke(cli, [*args, "--min-sqnr", "30"])
    assert result.exit_code == 0, result.output
    assert "kept float: tensor 'relu_3_out'" in result.output and "met" in result.output
    assert _eval_sqnr(onnx.load(tmp_path / "q.onnx"), model, evaluation) >= 30

    wide = CliRunner().invoke(cli, [*args, "--min-sqnr", "30", "--fallback", "16bit"])
    assert wide.exit_code == 0, wide.output
    assert "kept in 16 bits: tensor 'relu_3_out' with weights w_3, w_4" in wide.output

    # A target no model meets: the best one is written, and the exit status says the target was missed.
    strict_cli = build_cli(ortq.Toolkit(autoload=False, plugins=[_StrictPlugin()]))
    missed = CliRunner().invoke(strict_cli, [*args, "--max-drop", "0.5", "--metric", "strict"])
    assert missed.exit_code == 1 and "was not met" in missed.output

    # Both targets at once, or an eval set without a target, are usage errors.
    assert CliRunner().invoke(cli, [*args, "--min-sqnr", "30", "--max-drop", "0.1"]).exit_code == 2
    assert CliRunner().invoke(cli, args).exit_code == 2


def test_label_accuracy_target_on_digits(toolkit: ortq.Toolkit, digits) -> None:
    """The bundled example loses a little accuracy at 8 bits; ask for none lost against the labels."""
    found = quantize_to_target(
        toolkit, digits / "model.onnx", target=AccuracyTarget("accuracy", max_drop=0.0),
        calibration_data=digits / "calibration.npz", eval_data=digits / "evaluation.npz", labels="label",
    )
    assert 0.97 < found.float_value <= 1.0
    assert found.met and found.final_value >= found.float_value
    assert len(found.kept) <= 3
    print(f"digits accuracy {found.float_value:.4f} float, {found.quantized_value:.4f} int8, "
          f"{found.final_value:.4f} keeping {[k.tensor for k in found.kept]} ({found.trials} trials)")


def test_trials_repeat_no_warning(toolkit: ortq.Toolkit, hostile, caplog) -> None:
    """Every trial rebuilds the model; what it warns about (here: an unfolded constant node) is said once."""
    model, calibration, evaluation = hostile
    model = onnx.ModelProto.FromString(model.SerializeToString())
    fc = next(n for n in model.graph.node if n.name == "fc")
    model.graph.node.insert(0, onnx.helper.make_node("Neg", ["fc_b"], ["fc_b_negated"], name="negate_bias"))
    fc.input[2] = "fc_b_negated"
    found = quantize_to_target(toolkit, model, target=AccuracyTarget("sqnr", min_value=30.0),
                               calibration_data=calibration, eval_data=evaluation)
    assert found.met and found.trials > 5
    advice = [r for r in caplog.records if "was not preprocessed" in r.getMessage()]
    assert len(advice) == 1
    ortq.Toolkit(autoload=False).quantize(model, calibration_data=calibration, verify=False)
    assert len([r for r in caplog.records if "was not preprocessed" in r.getMessage()]) == 2  # filter removed


def test_backward_elimination_drops_tensors_the_others_make_unneeded() -> None:
    """Only b matters; the prefix search handed over a, b, c: a and c go back to 8 bits, b stays."""
    from types import SimpleNamespace

    from ortq.tools.accuracy_driven import TensorSensitivity, _drop_unneeded

    units = [TensorSensitivity(t, [f"node_{t}"], ["Conv"], None, None) for t in "abc"]
    built: list[set[str]] = []
    trials = SimpleNamespace(
        build=lambda kept: built.append(kept) or SimpleNamespace(model={n for u in kept for n in u.nodes}))
    scorer = SimpleNamespace(score_model=lambda nodes: 40.0 if "node_b" in nodes else 5.0,
                             meets=lambda value: value >= 30.0)
    kept, value = _drop_unneeded(units, 40.0, scorer, trials)
    assert [u.tensor for u in kept] == ["b"] and value == 40.0
    assert len(built) == 3  # one trial per tensor of the prefix: c dropped, b needed, a dropped


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 33])
def test_shortest_prefix_finds_the_first_hit_in_few_calls(n: int) -> None:
    from ortq.tools.accuracy_driven import _shortest_prefix

    for first in range(1, n + 1):
        calls: list[int] = []
        found = _shortest_prefix(n, lambda k: calls.append(k) or k >= first)
        assert found == first
        assert len(calls) <= 2 * int(np.ceil(np.log2(first + 1))) + 1
    assert _shortest_prefix(n, lambda k: False) is None
    assert _shortest_prefix(0, lambda k: True) is None


def test_16bit_fallback_keeps_every_node_quantized(toolkit: ortq.Toolkit, hostile) -> None:
    """The outlier tensor and the weights around it (conv_4's tiny compensating weights, which 8 bits round
    to zero) go to 16 bits instead of float: the target holds with all 13 nodes quantized."""
    model, calibration, evaluation = hostile
    found = quantize_to_target(
        toolkit, model, target=AccuracyTarget("sqnr", min_value=30.0), calibration_data=calibration,
        eval_data=evaluation, fallback="16bit",
    )
    assert found.met and [k.tensor for k in found.kept] == ["relu_3_out"]
    assert found.kept[0].weights == ["w_3", "w_4"]
    assert len(found.result.plan.quantized_nodes) == 13 and not found.result.vetoes
    onnx.checker.check_model(found.result.model, full_check=True)
    assert _eval_sqnr(found.result.model, model, evaluation) >= 30.0
    inits = {i.name: i.data_type for i in found.result.model.graph.initializer}
    wide = {n.input[0] for n in found.result.model.graph.node if n.op_type == "DequantizeLinear"
            and inits.get(n.input[0]) in (onnx.TensorProto.INT16, onnx.TensorProto.UINT16)}
    assert len(wide) == 2  # the two widened weights; every other constant stays 8-bit
    assert "kept in 16 bits: tensor 'relu_3_out' with weights w_3, w_4" in found.summary()
    with pytest.raises(ConfigError, match="fallback"):
        quantize_to_target(toolkit, model, target=AccuracyTarget("sqnr", min_value=30.0),
                           calibration_data=calibration, fallback="int4")


def test_warning_filter_leaves_other_threads_alone(caplog) -> None:
    import threading

    from ortq.tools.accuracy_driven import _each_warning_once

    log = __import__("logging").getLogger("ortq.pipeline.run")
    with _each_warning_once():
        log.warning("same words")
        log.warning("same words")  # this thread: said once
        worker = threading.Thread(target=lambda: [log.warning("same words") for _ in range(2)])
        worker.start()
        worker.join()
    log.warning("same words")  # the filter is gone
    assert sum(r.getMessage() == "same words" for r in caplog.records) == 4


def test_module_level_entry_point(hostile) -> None:
    model, calibration, evaluation = hostile
    found = ortq.quantize_to_target(model, target=ortq.AccuracyTarget("sqnr", min_value=30.0),
                                    calibration_data=calibration, eval_data=evaluation)
    assert isinstance(found, ortq.AccuracyDrivenResult) and found.met
