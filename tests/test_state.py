"""Calibration state: save, load, merge shards, and quantize from a state without running the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import tiny_cnn, tiny_data

import ortq
from ortq.api.cli import build_cli


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_merged_shards_equal_one_run_over_all_data(toolkit: ortq.Toolkit, tmp_path: Path, method: str) -> None:
    data = tiny_data(48)
    shards = [{"x": data["x"][:16]}, {"x": data["x"][16:]}]
    whole = toolkit.calibrate(tiny_cnn(), data, calibrate_method=method)
    parts = [toolkit.calibrate(tiny_cnn(), shard, calibrate_method=method) for shard in shards]
    parts[0].save(tmp_path / "a.json")
    parts[1].save(tmp_path / "b.json")
    merged = ortq.CalibrationState.load(tmp_path / "a.json", toolkit.statistic_types())
    merged.merge(ortq.CalibrationState.load(tmp_path / "b.json", toolkit.statistic_types()))
    assert merged.samples == whole.samples == 48
    assert set(merged.statistics) == set(whole.statistics)
    for name, stat in whole.statistics.items():
        assert merged.statistics[name].to_dict() == stat.to_dict(), name
    from_merged = toolkit.quantize(tiny_cnn(), calibration_state=merged)
    from_data = toolkit.quantize(tiny_cnn(), calibration_data=data, calibrate_method=method)
    assert from_merged.ranges == from_data.ranges
    assert from_merged.model.graph == from_data.model.graph


def test_quantize_from_state_matches_direct_quantization(toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    data = tiny_data(32)
    state = toolkit.calibrate(tiny_cnn(), data)
    state.save(tmp_path / "state.json")
    a = toolkit.quantize(tiny_cnn(), calibration_state=tmp_path / "state.json")
    b = toolkit.quantize(tiny_cnn(), calibration_data=data)
    assert a.model.graph == b.model.graph and a.calibration_samples == 32
    assert a.verification.samples == 0  # nothing was run to compare with


def test_histogram_state_serves_other_calibrators(toolkit: ortq.Toolkit) -> None:
    state = toolkit.calibrate(tiny_cnn(), tiny_data(32), calibrate_method="percentile")
    minmax = toolkit.quantize(tiny_cnn(), calibration_state=state, calibrate_method="minmax")
    direct = toolkit.quantize(tiny_cnn(), calibration_data=tiny_data(32), calibrate_method="minmax")
    assert minmax.ranges == direct.ranges


def test_state_of_another_model_or_options_is_refused(toolkit: ortq.Toolkit) -> None:
    state = toolkit.calibrate(tiny_cnn(seed=0), tiny_data())
    with pytest.raises(ortq.CalibrationError, match="different model"):
        toolkit.quantize(tiny_cnn(seed=1), calibration_state=state)
    narrow = toolkit.calibrate(tiny_cnn(), tiny_data(), op_types_to_quantize=["Conv"])
    with pytest.raises(ortq.CalibrationError, match=r"no statistics for tensor\(s\)"):
        toolkit.quantize(tiny_cnn(), calibration_state=narrow)
    with pytest.raises(ortq.ConfigError, match="not both"):
        toolkit.quantize(tiny_cnn(), calibration_data=tiny_data(), calibration_state=state)


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not JSON"),
        ('{"format": "something else"}', "not an ortq calibration state"),
        ('{"format": "ortq.calibration-state", "version": 99}', "version 99"),
        ('{"format": "ortq.calibration-state", "version": 1, "model": {"fingerprint": "x"}, "calibrator": "minmax",'
         ' "statistics": {"t": {"kind": "__import__(\'os\')"}}}', "statistic kind"),
        ('{"format": "ortq.calibration-state", "version": 1, "model": {}, "calibrator": "minmax", "statistics": {}}',
         "malformed"),
    ],
    ids=["not-json", "format", "version", "unknown-kind", "malformed"],
)
def test_bad_state_files_are_refused_without_running_anything(toolkit: ortq.Toolkit, tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(ortq.CalibrationError, match=message):
        ortq.CalibrationState.load(path, toolkit.statistic_types())


def test_state_file_is_documented_json(toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    path = toolkit.calibrate(tiny_cnn(), tiny_data(), calibrate_method="minmax").save(tmp_path / "s.json")
    data = json.loads(path.read_text())
    assert data["format"] == "ortq.calibration-state" and data["version"] == 1
    assert data["statistics"]["x"]["kind"] == "minmax"
    default = toolkit.calibrate(tiny_cnn(), tiny_data())  # the default calibrator ("auto") keeps histograms
    assert default.calibrator == "auto" and default.statistics["x"].kind == "histogram"


def test_cli_calibrate_merge_and_quantize(toolkit: ortq.Toolkit, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), model)
    data = tiny_data(32)
    np.savez(tmp_path / "a.npz", x=data["x"][:16])
    np.savez(tmp_path / "b.npz", x=data["x"][16:])
    cli, runner = build_cli(toolkit), CliRunner()
    for shard in ("a", "b"):
        r = runner.invoke(cli, ["calibrate", str(model), "-d", str(tmp_path / f"{shard}.npz"), "-o", str(tmp_path / f"{shard}.json")])
        assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["merge-states", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "-o", str(tmp_path / "ab.json")])
    assert r.exit_code == 0 and "32 sample(s)" in r.output, r.output
    r = runner.invoke(cli, ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "-s", str(tmp_path / "ab.json")])
    assert r.exit_code == 0, r.output
    direct = toolkit.quantize(model, calibration_data=data)
    assert onnx.load(tmp_path / "q.onnx").graph == direct.model.graph
    r = runner.invoke(cli, ["quantize", str(model), "-o", str(tmp_path / "q2.onnx")])
    assert r.exit_code != 0 and "exactly one of --calibration-data and --calibration-state" in r.output
