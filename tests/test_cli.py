"""The command line, through click's runner and once as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import run, tiny_data

import ortq
from ortq.api.cli import build_cli
from ortq.core.error_measures import sqnr_db


def test_quantize_writes_a_valid_model_and_reports(tmp_path: Path, cnn_files, toolkit: ortq.Toolkit) -> None:
    model, data = cnn_files
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(build_cli(toolkit), ["quantize", str(model), "-o", str(out), "-d", str(data)])
    assert result.exit_code == 0, result.output
    assert "SQNR" in result.output and f"wrote {out}" in result.output
    onnx.checker.check_model(onnx.load(out), full_check=True)
    feed = tiny_data(16, seed=5)
    assert sqnr_db(run(model, feed)[0], run(out, feed)[0]) > 30


def test_quantize_options_reach_the_pipeline(tmp_path: Path, cnn_files, toolkit: ortq.Toolkit) -> None:
    model, data = cnn_files
    out = tmp_path / "q.onnx"
    args = ["quantize", str(model), "-o", str(out), "-d", str(data), "--per-tensor", "--activation-type", "int16",
            "--nodes-to-exclude", "fc", "--no-verify"]
    result = CliRunner().invoke(build_cli(toolkit), args)
    assert result.exit_code == 0, result.output
    q = onnx.load(out)
    assert q.opset_import[0].version == 21
    assert {n.op_type for n in q.graph.node if n.name == "fc"} == {"Gemm"}
    types = {i.data_type for i in q.graph.initializer if i.name.endswith("_zero_point")}
    assert onnx.TensorProto.INT16 in types
    assert not any(a.name == "axis" for n in q.graph.node for a in n.attribute if n.op_type == "DequantizeLinear")


def test_calibration_folder_layouts(tmp_path: Path, cnn_files, toolkit: ortq.Toolkit) -> None:
    model, _ = cnn_files
    data = tiny_data(8)
    per_input = tmp_path / "per_input"
    per_input.mkdir()
    np.save(per_input / "x.npy", data["x"])
    pb_samples = tmp_path / "pb"
    for i in range(2):
        (pb_samples / f"test_data_set_{i}").mkdir(parents=True)
        tensor = onnx.numpy_helper.from_array(data["x"][i * 4 : i * 4 + 4], "x")
        (pb_samples / f"test_data_set_{i}" / "input_0.pb").write_bytes(tensor.SerializeToString())
    for folder in (per_input, pb_samples):
        result = toolkit.quantize(model, calibration_data=folder)
        assert result.calibration_samples == 8, folder


def test_info_explains_what_stays_float(tmp_path: Path, cnn_files, toolkit: ortq.Toolkit) -> None:
    model, _ = cnn_files
    result = CliRunner().invoke(build_cli(toolkit), ["info", str(model), "--op-types", "Conv,Relu", "--all-nodes"])
    assert result.exit_code == 0, result.output
    assert "opset: 13" in result.output and "Conv x1" in result.output
    assert "2 node(s) would be quantized" in result.output
    assert "float: fc (Gemm): Gemm is not in the op types selected for target 'cpu'" in result.output


def test_plugins_lists_builtins_and_what_they_register(toolkit: ortq.Toolkit) -> None:
    result = CliRunner().invoke(build_cli(toolkit), ["plugins"])
    assert result.exit_code == 0
    assert "ortq.plugins.ops.conv  [builtin]" in result.output
    assert "op quantizers: Conv, ConvTranspose" in result.output
    assert "targets: cpu, esp32, esp32c3, esp32p4, esp32s2, esp32s3, tensorrt" in result.output
    assert "calibrators: auto, entropy, minmax, mse, percentile" in result.output


def test_plugin_commands_are_added() -> None:
    class Plugin:
        @ortq.hookimpl
        def ortq_register_commands(self, cli):
            @cli.command()
            def hello():
                """Say hello."""
                import click

                click.echo("hello from a plugin")

    result = CliRunner().invoke(build_cli(ortq.Toolkit([Plugin()], autoload=False)), ["hello"])
    assert result.output.strip() == "hello from a plugin"


@pytest.mark.subprocess
def test_real_process_with_autoload_off(tmp_path: Path, cnn_files) -> None:
    model, data = cnn_files
    out = tmp_path / "q.onnx"
    env = {**os.environ, "ORTQ_DISABLE_PLUGIN_AUTOLOAD": "1"}
    ok = subprocess.run([sys.executable, "-m", "ortq", "quantize", str(model), "-o", str(out), "-d", str(data)],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert out.exists()
    listed = subprocess.run([sys.executable, "-m", "ortq", "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert "entry point" not in listed.stdout and "ortq.plugins.backends.cpu" in listed.stdout
    bad = subprocess.run([sys.executable, "-m", "ortq", "quantize", str(tmp_path / "missing.onnx"), "-o", str(out), "-d", str(data)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == f"Error: {tmp_path / 'missing.onnx'}: no such model file"


def test_progress_total_is_read_from_headers(tmp_path: Path) -> None:
    from ortq.io.data import count_samples

    np.savez(tmp_path / "a.npz", x=np.zeros((37, 3), np.float32))
    np.savez_compressed(tmp_path / "b.npz", x=np.zeros((5, 3), np.float32))
    folder = tmp_path / "per_input"
    folder.mkdir()
    np.save(folder / "x.npy", np.zeros((12, 3), np.float32))
    assert count_samples(tmp_path / "a.npz") == 37
    assert count_samples(tmp_path / "b.npz") == 5
    assert count_samples(tmp_path / "a.npz", max_samples=10) == 10
    assert count_samples(folder) == 12
    assert count_samples(object()) is None
