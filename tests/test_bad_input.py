"""Bad input gets one clear error naming the problem, leaves nothing behind, and never touches the input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import tiny_cnn, tiny_data

import ortq
from ortq.api.cli import build_cli


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (b"this is not a model at all \x00\xff\xfe" * 10, "not an ONNX model"),
        (None, "not an ONNX model"),  # truncated protobuf
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_unreadable_model_files(tmp_path: Path, toolkit: ortq.Toolkit, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content if content is not None else tiny_cnn().SerializeToString()[:57])
    before = _files(tmp_path)
    with pytest.raises(ortq.ModelError, match=message) as info:
        toolkit.quantize(path, tmp_path / "out.onnx", calibration_data=tiny_data())
    assert str(path) in str(info.value)
    assert _files(tmp_path) == before


def test_missing_model(tmp_path: Path, toolkit: ortq.Toolkit) -> None:
    with pytest.raises(ortq.ModelError, match="no such model file"):
        toolkit.quantize(tmp_path / "nope.onnx", calibration_data=tiny_data())


def test_model_failing_the_checker(tmp_path: Path, toolkit: ortq.Toolkit) -> None:
    model = tiny_cnn()
    model.graph.node[1].input[0] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    with pytest.raises(ortq.ModelError, match="fails onnx.checker"):
        toolkit.quantize(path, calibration_data=tiny_data())


def test_output_in_missing_folder_fails_before_any_work(tmp_path: Path, cnn_files, toolkit: ortq.Toolkit) -> None:
    model, data = cnn_files
    with pytest.raises(ortq.ModelError, match="output folder .* does not exist"):
        toolkit.quantize(model, tmp_path / "no" / "such" / "q.onnx", calibration_data=data)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"wrong": np.zeros((4, 3, 8, 8), np.float32)}, r"missing input\(s\) \['x'\]; unknown name\(s\) \['wrong'\]"),
        ({"x": np.zeros((4, 3, 8, 8), np.float64)}, "input 'x' has dtype float64, the model expects float32"),
        ({"x": np.zeros((4, 3, 8), np.float32)}, r"expects rank 4 \[\?, 3, 8, 8\]"),
        ({"x": np.zeros((4, 2, 8, 8), np.float32)}, r"expects \[\?, 3, 8, 8\] \(axis 1\)"),
        ({"x": np.zeros((0, 3, 8, 8), np.float32)}, "holds no samples"),
        ([], "holds no samples"),
    ],
    ids=["names", "dtype", "rank", "shape", "empty-array", "empty-list"],
)
def test_mismatched_calibration_data(tmp_path: Path, toolkit: ortq.Toolkit, data, message: str) -> None:
    with pytest.raises(ortq.CalibrationDataError, match=message):
        toolkit.quantize(tiny_cnn(), tmp_path / "q.onnx", calibration_data=data)
    assert not list(tmp_path.iterdir())


def test_nan_in_calibration_data_names_batch_and_input(toolkit: ortq.Toolkit) -> None:
    data = tiny_data(32)
    data["x"][20, 0, 0, 0] = np.nan
    with pytest.raises(ortq.CalibrationDataError, match=r"calibration batch 1: input 'x' contains 1 NaN or Inf"):
        toolkit.quantize(tiny_cnn(), calibration_data=data, batch_size=16)


def test_reader_raising_midway_names_the_sample(tmp_path: Path, toolkit: ortq.Toolkit) -> None:
    class Reader:
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            self.i += 1
            if self.i == 3:
                raise OSError("disk went away")
            return {"x": tiny_data(2)["x"]}

    with pytest.raises(ortq.CalibrationDataError, match=r"reader raised at sample 2: OSError\('disk went away'\)"):
        toolkit.quantize(tiny_cnn(), tmp_path / "q.onnx", calibration_data=Reader())
    assert not list(tmp_path.iterdir())


def test_input_model_is_never_modified(tmp_path: Path, cnn_files, toolkit: ortq.Toolkit) -> None:
    model_path, data = cnn_files
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    proto = onnx.load(model_path)
    proto_bytes = proto.SerializeToString()
    toolkit.quantize(model_path, tmp_path / "q.onnx", calibration_data=data)
    toolkit.quantize(proto, tmp_path / "q2.onnx", calibration_data=data)
    assert hashlib.sha256(model_path.read_bytes()).hexdigest() == digest
    assert proto.SerializeToString() == proto_bytes


def test_existing_output_survives_a_failed_run(tmp_path: Path, cnn_files, toolkit: ortq.Toolkit) -> None:
    model_path, _ = cnn_files
    out = tmp_path / "q.onnx"
    out.write_bytes(b"previous result")
    with pytest.raises(ortq.CalibrationDataError):
        toolkit.quantize(model_path, out, calibration_data={"x": np.zeros((2, 3, 8, 8), np.float16)})
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["q.onnx", "model.onnx", "calib.npz"])


def test_cli_errors_are_one_line_and_non_zero(tmp_path: Path, cnn_files, toolkit: ortq.Toolkit) -> None:
    model_path, data = cnn_files
    bad = tmp_path / "bad.npz"
    np.savez(bad, y=np.zeros((2, 3, 8, 8), np.float32))
    runner = CliRunner()
    result = runner.invoke(build_cli(toolkit), ["quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "-d", str(bad)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {bad}: missing input(s) ['x']; unknown name(s) ['y']; the model's inputs are ['x']"]
    assert "Traceback" not in result.output
    verbose = runner.invoke(build_cli(toolkit), ["-v", "quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "-d", str(bad)])
    assert verbose.exit_code == 1 and "Traceback" in verbose.output
    assert not (tmp_path / "q.onnx").exists()


def test_unknown_option_is_rejected(toolkit: ortq.Toolkit) -> None:
    with pytest.raises(ortq.ConfigError, match="unknown option"):
        toolkit.quantize(tiny_cnn(), calibration_data=tiny_data(), per_chanel=True)
