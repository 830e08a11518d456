"""The SQNR floor of the default ``quantize``: a model that misses it gets its worst tensors in higher precision,
says so, and ``strict`` turns a miss into an error; the ONNX Runtime drop-in keeps ONNX Runtime's behaviour."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import ortq
from ortq.api.cli import build_cli
from ortq.core.error_measures import sqnr_db


def _outlier_channel_model() -> onnx.ModelProto:
    """x @ w1 puts one channel at 500x the others, x @ w1 @ w2 scales it back: 8-bit activations for the middle
    tensor leave the other channels a few levels, 16 bits do not."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 16)).astype(np.float32) / 4
    w1[:, 3] *= 500.0
    w2 = rng.standard_normal((16, 8)).astype(np.float32) / 4
    w2[3, :] /= 500.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")],
        "outlier_channel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _data(n: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)}


def _sqnr(float_model: onnx.ModelProto, quantized: onnx.ModelProto, data: dict[str, np.ndarray]) -> float:
    import onnxruntime as ort

    def run(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data)[0]

    return sqnr_db(run(float_model), run(quantized))


def test_below_the_floor_keeps_the_worst_tensor_in_16_bits(tmp_path: Path, caplog) -> None:
    model, data, held_out = _outlier_channel_model(), _data(), _data(32, seed=2)
    toolkit = ortq.Toolkit(autoload=False)
    plain = toolkit.quantize(model, None, calibration_data=data, sqnr_floor=None)
    assert plain.verification.min_sqnr_db < ortq.api.toolkit.SQNR_FLOOR_DB and not plain.fallback
    with caplog.at_level(logging.WARNING, logger="ortq"):
        result = toolkit.quantize(model, tmp_path / "q.onnx", calibration_data=data)
    assert result.fallback and any("kept in 16 bits: tensor 'h'" in line for line in result.fallback), result.fallback
    assert "kept in 16 bits" in result.summary()
    assert any("below the floor" in r.getMessage() for r in caplog.records)
    written = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(written, full_check=True)
    assert _sqnr(model, written, held_out) >= ortq.api.toolkit.SQNR_FLOOR_DB
    assert _sqnr(model, written, held_out) > _sqnr(model, plain.model, held_out) + 10.0


def test_strict_turns_a_missed_floor_into_an_error(tmp_path: Path) -> None:
    model, data = _outlier_channel_model(), _data()
    toolkit = ortq.Toolkit(autoload=False)
    # Per-tensor overrides leave nothing for the search to change: the floor is missed, said, and strict raises.
    overrides = {"x": [{"quant_type": "uint8"}]}
    missed = toolkit.quantize(model, None, calibration_data=data, tensor_overrides=overrides)
    assert missed.verification.min_sqnr_db < 15.0 and not missed.fallback
    with pytest.raises(ortq.VerificationError, match="below the floor of 15 dB"):
        toolkit.quantize(model, tmp_path / "q.onnx", calibration_data=data, tensor_overrides=overrides, strict=True)
    # Float is the last resort, so with the search available even a floor of 200 dB is met (by float tensors).
    result = toolkit.quantize(model, None, calibration_data=data, sqnr_floor=200.0, strict=True)
    assert any(line.startswith("kept float") for line in result.fallback)
    # A floor that holds: strict changes nothing.
    assert not toolkit.quantize(model, None, calibration_data=data, sqnr_floor=-5.0, strict=True).fallback


def test_cli_strict_exits_non_zero(tmp_path: Path) -> None:
    model_path, data_path, overrides = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "o.json"
    onnx.save(_outlier_channel_model(), model_path)
    np.savez(data_path, **_data())
    overrides.write_text('{"x": [{"quant_type": "uint8"}]}')
    cli, runner = build_cli(ortq.Toolkit(autoload=False)), CliRunner()
    base = ["quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "-d", str(data_path)]
    ok = runner.invoke(cli, base)
    assert ok.exit_code == 0, ok.output
    assert "kept in 16 bits" in ok.output
    missed = runner.invoke(cli, [*base, "--tensor-overrides", str(overrides), "--strict"])
    assert missed.exit_code != 0 and "below the floor" in missed.output, missed.output
    assert runner.invoke(cli, [*base, "--tensor-overrides", str(overrides)]).exit_code == 0  # said, not fatal
    off = runner.invoke(cli, [*base, "--sqnr-floor", "0", "--strict"])  # 0: no floor
    assert off.exit_code == 0 and "kept in 16 bits" not in off.output


def test_onnxruntime_drop_in_has_no_floor(tmp_path: Path) -> None:
    model_path = tmp_path / "m.onnx"
    onnx.save(_outlier_channel_model(), model_path)

    class Reader(ortq.CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter([{"x": row[None]} for row in _data()["x"]])

        def get_next(self):  # noqa: ANN201
            return next(self.rows, None)

    result = ortq.quantize_static(model_path, tmp_path / "q.onnx", Reader())
    assert not result.fallback and result.config.calibrator == "minmax"
